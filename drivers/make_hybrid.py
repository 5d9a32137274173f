"""Build a hybrid dataset NAME_H<N>: the box masks of NAME's box-only images refined by a trained
model, plus NAME_BASELINE's exact masks (EVAL and TEST never enter it).

    python drivers/make_hybrid.py --dataset obstacle --model runs/train/best.pt [--number N]
        [--min-fill 0.4] [--fallback box|ellipse] [--threshold 0.5] [--mode inside_box|grabcut|blend]
        [--blend-alpha 0.5] [--soft] [--fill-holes] [--tta] [--overwrite]

N defaults to the next free number. Rule (default, "Simple Does It"-style): predicted foreground is
kept only inside the boxes; a box region the model fills less than --min-fill falls back to the box
(or its inscribed ellipse). Where the dataset keeps truth/ masks, the label IoU of the boxes and of
the refined masks is printed and saved in the manifest.
"""

from __future__ import annotations

import argparse
import signal

import _common
from bss.data.io import parse_size
from bss.hybrid.refine import MODES


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
    rule.add_argument(
        "--mode",
        choices=MODES,
        default="inside_box",
        help="inside_box: the thresholded prediction inside the boxes; grabcut: that, refined with the image's colours (GrabCut seeded by the prediction); blend: the seed's rule",
    )
    rule.add_argument("--threshold", type=float, default=0.5, help="probability (blend: blended value) above which a pixel is foreground")
    rule.add_argument("--min-fill", type=float, default=0.4, help="inside_box: a box region predicted less full than this falls back")
    rule.add_argument("--fallback", choices=("box", "ellipse"), default="box", help="inside_box: the conservative mask of a fallback region")
    rule.add_argument("--fill-holes", action="store_true", help="inside_box: fill holes of the kept prediction")
    rule.add_argument("--sure", type=float, default=0.9, help="grabcut: probability above which a pixel inside a box is certain foreground")
    rule.add_argument("--blend-alpha", type=float, default=0.5, help="blend: weight of the box")
    rule.add_argument("--soft", action="store_true", help="also write soft labels (8-bit probability) to soft/")
    infer = parser.add_argument_group("inference")
    infer.add_argument("--tta", action="store_true", help="average with the horizontally flipped prediction")
    infer.add_argument("--input-size", help="WIDTHxHEIGHT to predict at, e.g. 256x192 (default: the checkpoint's image_size)")
    infer.add_argument("--batch-size", type=int, default=8)
    infer.add_argument("--workers", type=int, help="DataLoader worker processes decoding images (default: 0 on 2 cores or fewer, else up to 4)")
    infer.add_argument("--device", default="auto")
    infer.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)

    from bss.hybrid import RefineRule, format_quality, make_hybrid
    from bss.inference import default_workers

    rule_obj = RefineRule(
        mode=args.mode,
        threshold=args.threshold,
        min_fill=args.min_fill,
        fallback=args.fallback,
        fill_holes=args.fill_holes,
        blend_alpha=args.blend_alpha,
        sure=args.sure,
        soft=args.soft,
    )
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
    )
    counts = result.manifest["counts"]
    print(
        f"{result.path}: {counts['images']} images ({counts['refined']} refined, {counts['baseline']} from BASELINE); "
        f"{counts['fallback_boxes']} of {counts['boxes']} box regions fell back; EVAL ({counts['excluded_eval']}) and TEST ({counts['excluded_test']}) excluded"
    )
    print(format_quality(result.label_quality))
    return 0


if __name__ == "__main__":
    _common.run(main)
