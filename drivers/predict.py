"""Predict masks for new images (any size) or inspection videos with a trained checkpoint.

    python drivers/predict.py --model runs/train/best.pt --images new_frames/ --out predictions/
        [--probabilities] [--no-overlays] [--threshold 0.5] [--tta] [--overwrite] [--address HOST:PORT]
    python drivers/predict.py --model runs/train/best.pt --video survey.mp4 --out predictions/
        [--every N | --fps F] [--masks] [--alert 0.01] [--threshold 0.5] [--tta] [--overwrite]

Images: writes OUT/masks/<stem>.png (0/255, the image's size), OUT/overlays/<stem>.png,
optionally OUT/probabilities/<stem>.png (8-bit probability) and OUT/predictions.json.
--address predicts them on the nodes of a Ray cluster (one worker per CPU, per GPU where the
cluster has GPUs), the same files byte for byte; the images folder, the checkpoint and OUT's
parent must be on storage every node mounts.

Video (a file, or a folder of videos): frames streamed with OpenCV, every N-th kept (--fps F:
every round(source rate / F)-th), predicted in batches; writes OUT/<video>_overlay.mp4 (the kept
frames, defect tinted, frame and time burned in), OUT/timeline.csv (per kept frame: defect
fraction, components, largest component's box), OUT/timeline.png (the stretches at or above
--alert shaded) and with --masks OUT/masks/<video>_<frame>.png. An interrupted run (Ctrl-C,
SIGTERM) is continued by the same command.

A non-empty OUT is refused unless --overwrite (which only replaces a previous prediction).
"""

from __future__ import annotations

import argparse
import signal

import _common


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # a killed run cleans up (images) or closes its files (video) like Ctrl-C does


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint (best.pt)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images to predict (not recursive)")
    source.add_argument("--video", help="a video file, or a folder of videos (not recursive)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous prediction in --out")
    parser.add_argument("--probabilities", action="store_true", help="images: also write 8-bit probability maps")
    parser.add_argument("--no-overlays", action="store_true", help="images: skip the overlay pngs")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--every", type=int, help="video: keep every N-th frame (default 1: all)")
    rate.add_argument("--fps", type=float, help="video: keep about F frames per second of recording")
    parser.add_argument("--masks", action="store_true", help="video: also write masks/<video>_<frame>.png")
    parser.add_argument("--alert", type=float, default=0.01, help="video: defect pixel fraction from which timeline.png shades a stretch (default 0.01)")
    parser.add_argument("--threshold", type=float, help="probability threshold (default: the checkpoint's)")
    parser.add_argument("--tta", action="store_true", help="average with the horizontally flipped prediction")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, help="images: DataLoader worker processes decoding images (default: 0 on 2 cores or fewer, else up to 4)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--address",
        help="images: predict on the Ray cluster at ADDRESS (host:port, or auto): one worker per CPU (per GPU where the cluster has GPUs); "
        "the images folder, the checkpoint and --out's parent must be on storage every node mounts. Default: in this process",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    if args.images and (args.every or args.fps or args.masks):
        parser.error("--every, --fps and --masks are for --video")
    if args.video and args.address:
        parser.error("--address is for --images (a video is predicted in this process)")
    return args


def main() -> int:
    args = _arguments()
    signal.signal(signal.SIGTERM, _interrupt)
    common = dict(overwrite=args.overwrite, threshold=args.threshold, batch_size=args.batch_size, device=args.device, tta=args.tta, progress=not args.quiet)
    if args.video:
        from bss.video import predict_videos

        result = predict_videos(args.model, args.video, args.out, every=args.every, fps=args.fps, masks=args.masks, alert=args.alert, **common)
        rate = result.predicted / max(result.seconds, 1e-9)
        print(f"{result.predicted} frames of {len(result.runs)} video(s) -> {result.out} ({result.seconds:.1f} s, {rate:.1f} frames/s)")
        return 0

    from bss.inference import default_workers
    from bss.predict import predict_folder

    workers = default_workers() if args.workers is None else args.workers
    result = predict_folder(
        args.model, args.images, args.out, probabilities=args.probabilities, overlays=not args.no_overlays, num_workers=workers, address=args.address, **common
    )
    ray = result.summary["inference"].get("ray")
    where = f" on Ray nodes {', '.join(ray['nodes'])}" if ray else ""
    print(f"{result.count} images -> {result.out}{where} ({result.seconds:.1f} s, {result.count / max(result.seconds, 1e-9):.1f} images/s)")
    return 0


if __name__ == "__main__":
    _common.run(main)
