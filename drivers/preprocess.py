"""Split a dataset's hand-labelled images into NAME_BASELINE, NAME_EVAL and NAME_TEST.

python drivers/preprocess.py --dataset obstacle [--fractions 0.6 0.2 0.2] [--seed 0] [--overwrite]
"""

from __future__ import annotations

import argparse

import _common


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="dataset name under --data-root (or a folder)")
    parser.add_argument("--data-root", default="datasets")
    parser.add_argument("--fractions", type=float, nargs=3, default=[0.6, 0.2, 0.2], metavar=("BASELINE", "EVAL", "TEST"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing split")
    args = parser.parse_args()

    from bss.data.splits import make_splits

    counts = make_splits(args.dataset, args.data_root, tuple(args.fractions), args.seed, args.overwrite)
    for split, n in counts.items():
        print(f"{args.dataset}_{split}: {n} images")
    return 0


if __name__ == "__main__":
    _common.run(main)
