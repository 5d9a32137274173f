"""Predict masks for new images (any size) with a trained checkpoint.

    python drivers/predict.py --model runs/train/best.pt --images new_frames/ --out predictions/
        [--probabilities] [--no-overlays] [--threshold 0.5] [--tta] [--overwrite]

Writes OUT/masks/<stem>.png (0/255, the image's size), OUT/overlays/<stem>.png, optionally
OUT/probabilities/<stem>.png (8-bit probability) and OUT/predictions.json. A non-empty OUT is
refused unless --overwrite (which only replaces a previous prediction folder).
"""

from __future__ import annotations

import argparse
import signal

import _common


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # a killed run cleans up its temporary folder like Ctrl-C does


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint (best.pt)")
    parser.add_argument("--images", required=True, help="folder of images to predict (not recursive)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous prediction in --out")
    parser.add_argument("--probabilities", action="store_true", help="also write 8-bit probability maps")
    parser.add_argument("--no-overlays", action="store_true", help="skip the overlay pngs")
    parser.add_argument("--threshold", type=float, help="probability threshold (default: the checkpoint's)")
    parser.add_argument("--tta", action="store_true", help="average with the horizontally flipped prediction")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, help="DataLoader worker processes decoding images (default: 0 on 2 cores or fewer, else up to 4)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)

    from bss.inference import default_workers
    from bss.predict import predict_folder

    result = predict_folder(
        args.model,
        args.images,
        args.out,
        overwrite=args.overwrite,
        probabilities=args.probabilities,
        overlays=not args.no_overlays,
        threshold=args.threshold,
        batch_size=args.batch_size,
        num_workers=default_workers() if args.workers is None else args.workers,
        device=args.device,
        tta=args.tta,
        progress=not args.quiet,
    )
    print(f"{result.count} images -> {result.out} ({result.seconds:.1f} s, {result.count / max(result.seconds, 1e-9):.1f} images/s)")
    return 0


if __name__ == "__main__":
    _common.run(main)
