"""Merge a VIA CSV export of newly hand-labelled images into a dataset's labels.csv.

    python drivers/merge_labels.py --dataset obstacle --export via_export.csv [--no-baseline]

The export is checked like any VIA export and against the dataset (unknown file, wrong file
size, malformed or out-of-image shape, an image already labelled or listed twice): any problem
is one error line naming the export's line, exit status 2, nothing written. labels.csv is
rewritten atomically (the old one kept as labels.csv.bak); its other rows are left as they are.
When the splits exist, the new images are then added to NAME_BASELINE (NAME_EVAL and NAME_TEST
unchanged); --no-baseline skips that (run it later with --baseline-only).
"""

from __future__ import annotations

import argparse

import _common


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="source dataset name under --data-root")
    parser.add_argument("--export", help="the VIA CSV export (Annotation > Export annotations (as csv))")
    parser.add_argument("--data-root", default="datasets")
    parser.add_argument("--no-backup", action="store_true", help="do not keep labels.csv.bak")
    parser.add_argument("--no-baseline", action="store_true", help="only merge labels.csv; leave NAME_BASELINE as it is")
    parser.add_argument("--baseline-only", action="store_true", help="no export: add the hand-labelled images that are in no split to NAME_BASELINE")
    args = parser.parse_args()

    from bss.active.baseline import add_to_baseline
    from bss.errors import BSSError

    if not args.baseline_only:
        if not args.export:
            raise BSSError("--export is required (the VIA CSV export to merge), unless --baseline-only.")
        from bss.active.merge import merge_labels

        result = merge_labels(args.dataset, args.export, args.data_root, backup=not args.no_backup)
        print(
            f"{result.labels}: merged {len(result.merged)} image(s), {result.regions} region(s)"
            + (f"; {result.ignored_unlabelled} unlabelled row(s) of the export ignored" if result.ignored_unlabelled else "")
            + (f"; previous file kept as {result.backup.name}" if result.backup else "")
        )
    if args.no_baseline:
        return 0
    from pathlib import Path

    added = add_to_baseline(args.dataset, args.data_root)
    if added:
        print(f"{args.dataset}_BASELINE: added {len(added)} newly labelled image(s); {args.dataset}_EVAL and {args.dataset}_TEST unchanged")
    elif not (Path(args.data_root) / f"{args.dataset}_BASELINE").is_dir():
        print(f"no splits yet: drivers/preprocess.py --dataset {args.dataset} draws them from all the hand labels")
    else:
        print(f"{args.dataset}_BASELINE already holds every hand-labelled image outside EVAL and TEST")
    return 0


if __name__ == "__main__":
    _common.run(main)
