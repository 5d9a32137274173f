"""Build a hybrid dataset NAME_H<N>: the box masks of NAME's box-only images refined by a trained
model, plus NAME_BASELINE's exact masks (EVAL and TEST never enter it).

    python drivers/make_hybrid.py --dataset obstacle --model runs/train/best.pt [--number N]
        [--mode inside_box|grabcut|blend] [--threshold 0.5] [--min-fill 0.4] [--fallback box|ellipse]
        [--fill-holes] [--sure 0.9] [--grabcut-iterations 4] [--blend-alpha 0.5] [--soft] [--tta] [--overwrite]
        [--address HOST:PORT]

N defaults to the next free number. Rule (default, "Simple Does It"-style): predicted foreground is
kept only inside the boxes; a box region the model fills less than --min-fill falls back to the box
(or its inscribed ellipse). The rule's flags are those of the registered modes
(bss.hybrid.refine.REFINE_MODES): each says which modes read it. Where the dataset keeps truth/ masks, the label IoU of the boxes and of
the refined masks is printed and saved in the manifest.

A killed run (Ctrl-C, SIGTERM, SIGKILL) keeps the images it refined in .NAME_H<N>.partial/; the same
command again refines only the rest. --address refines on the nodes of a Ray cluster (the data root
and the checkpoint on storage every node mounts).
"""

from __future__ import annotations

import argparse
import signal

import _common
from bss.data.io import parse_size
from bss.hybrid.refine import REFINE_MODES, RefineRule, rule_parameters


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # a killed run cleans up its temporary folder like Ctrl-C does


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="source dataset name under --data-root (or a folder)")
    parser.add_argument("--model", required=True, help="checkpoint (best.pt) of the model that refines the boxes")
    parser.add_argument("--number", type=int, help="N of NAME_H<N> (default: the next free number)")
    parser.add_argument("--data-root", default="datasets")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing NAME_H<N>")
    rule = parser.add_argument_group("refinement rule")
    rule.add_argument("--mode", choices=list(REFINE_MODES), default=RefineRule().mode, help="; ".join(f"{m.name}: {m.help}" for m in REFINE_MODES.values()))
    for name, (param, users) in rule_parameters().items():
        rule.add_argument("--" + name.replace("_", "-"), **param.argparse(name, users, len(REFINE_MODES)))
    infer = parser.add_argument_group("inference")
    infer.add_argument("--tta", action="store_true", help="average with the horizontally flipped prediction")
    infer.add_argument("--input-size", help="WIDTHxHEIGHT to predict at, e.g. 256x192 (default: the checkpoint's image_size)")
    infer.add_argument("--batch-size", type=int, default=8)
    infer.add_argument("--workers", type=int, help="DataLoader worker processes decoding images (default: 0 on 2 cores or fewer, else up to 4)")
    infer.add_argument("--device", default="auto")
    infer.add_argument("--quiet", action="store_true", help="no progress bar")
    infer.add_argument(
        "--address",
        help="refine on the Ray cluster at ADDRESS (host:port, or auto): one worker per CPU (per GPU where the cluster has GPUs); "
        "the data root and the checkpoint must be on storage every node mounts. Default: in this process",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)

    from bss.hybrid import format_quality, make_hybrid
    from bss.inference import default_workers

    rule_obj = RefineRule(mode=args.mode, **{name: getattr(args, name) for name in rule_parameters()})
    result = make_hybrid(
        args.dataset,
        args.model,
        data_root=args.data_root,
        number=args.number,
        rule=rule_obj,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        num_workers=default_workers() if args.workers is None else args.workers,
        progress=not args.quiet,
        device=args.device,
        tta=args.tta,
        input_size=parse_size(args.input_size, "--input-size")[::-1] if args.input_size else None,  # (height, width)
        address=args.address,
    )
    if result.discarded:
        print(f"{result.discarded} images of an earlier run with another model, rule or settings were discarded")
    if result.resumed:
        print(f"resumed: {result.resumed} images refined by an earlier run were kept, {result.refined} refined now")
    if result.nodes is not None:
        print(f"refined on Ray nodes {', '.join(result.nodes) or '(none: nothing left to refine)'}")
    counts = result.manifest["counts"]
    print(
        f"{result.path}: {counts['images']} images ({counts['refined']} refined, {counts['baseline']} from BASELINE); "
        f"{counts['fallback_boxes']} of {counts['boxes']} box regions fell back; EVAL ({counts['excluded_eval']}) and TEST ({counts['excluded_test']}) excluded"
    )
    print(format_quality(result.label_quality))
    return 0


if __name__ == "__main__":
    _common.run(main)
