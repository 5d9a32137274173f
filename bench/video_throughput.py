"""Frames per second of predict.py --video (bss.video.predict_videos) beside predict.py --images
(bss.predict.predict_folder) on the same frames, on the CPU (issue 23).

    python bench/video_throughput.py [--frames 200] [--size 256 192] [--checkpoint best.pt]
                                     [--threads 1] [--batch-size 8] [--repeats 3] [--json out.json]

The frames are the real sewer CCTV frames of ../shared/data/coudlabs_sewer (cycled to --frames,
resized to --size, width height) or, where that folder is absent, synthetic ones. They are written
once as an MJPG .avi (the video path) and once as PNG files (the image path). Each repeat runs,
in alternating order, the image path with its defaults (decode, predict, masks/ + overlays/ PNGs,
predictions.json) and the video path (decode, predict, overlay video + timeline.csv +
timeline.png) and the video path with --masks; the median of the repeats is printed side by
side, with the time per frame. Without --checkpoint a randomly initialised UNetAttention/resnet18
at the default plan (whole frames at image_size 128x128) is saved: a forward pass costs the same
whatever the weights. Timings on a shared CPU are noisy: compare the columns of one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bss.environment import quiet  # noqa: E402

quiet(offline=True, bars=False)

SHARED = ROOT.parent / "shared" / "data" / "coudlabs_sewer"


def make_checkpoint(path: Path) -> Path:
    from bss.config import from_dict
    from bss.models import build_model
    from bss.training.checkpoint import save_checkpoint

    cfg = from_dict({"model": {"name": "UNetAttention", "args": {"encoder_name": "resnet18", "encoder_weights": None}}, "tracking": {"enabled": False}})
    return save_checkpoint(path, build_model(cfg.model).eval(), cfg, {}, 0)


def frames(count: int, size: tuple[int, int]):
    """``count`` BGR frames of ``size`` (width, height) and where they come from."""
    import cv2
    import numpy as np

    real = sorted(SHARED.glob("images/*/*.png"))
    if real:
        decoded = [cv2.resize(cv2.imread(str(p)), size, interpolation=cv2.INTER_AREA) for p in real]
        return [decoded[i % len(decoded)] for i in range(count)], f"{len(real)} coudlabs_sewer frames, cycled"
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        frame = rng.normal(60, 12, size=(size[1], size[0], 3))
        cv2.circle(frame, ((7 * i) % size[0], size[1] // 2), 20, (190, 190, 190), -1)
        out.append(np.clip(frame, 0, 255).astype(np.uint8))
    return out, "synthetic frames"


def write_inputs(folder: Path, bgr: list, fps: float = 25.0) -> tuple[Path, Path]:
    import cv2

    images = folder / "images"
    images.mkdir()
    writer = cv2.VideoWriter(str(folder / "survey.avi"), cv2.VideoWriter_fourcc(*"MJPG"), fps, (bgr[0].shape[1], bgr[0].shape[0]))
    for i, frame in enumerate(bgr):
        writer.write(frame)
        cv2.imwrite(str(images / f"frame_{i:05d}.png"), frame)
    writer.release()
    return folder / "survey.avi", images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--size", type=int, nargs=2, default=[256, 192], metavar=("W", "H"))
    parser.add_argument("--checkpoint", help="default: a random UNetAttention/resnet18 at the default plan (128x128 whole frames)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import contextlib
    import io

    import torch

    from bss.predict import predict_folder
    from bss.video import predict_videos

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bss-bench-video-") as tmp:
        tmp = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(tmp / "model.pt")
        bgr, origin = frames(args.frames, tuple(args.size))
        video, images = write_inputs(tmp, bgr)
        common = dict(overwrite=True, batch_size=args.batch_size, device="cpu", progress=False)
        paths = {
            "images (predict_folder)": lambda: predict_folder(checkpoint, images, tmp / "out-images", num_workers=0, **common),
            "video (predict_videos)": lambda: predict_videos(checkpoint, video, tmp / "out-video", **common),
            "video --masks": lambda: predict_videos(checkpoint, video, tmp / "out-video-masks", masks=True, **common),
        }
        seconds = {name: [] for name in paths}
        for repeat in range(args.repeats):
            order = list(paths) if repeat % 2 == 0 else list(reversed(paths))
            for name in order:
                start = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):  # the video path's summary lines
                    paths[name]()
                seconds[name].append(time.perf_counter() - start)
    print(f"{args.frames} frames of {args.size[0]}x{args.size[1]} ({origin}), {checkpoint.name}, torch threads {args.threads}, batch {args.batch_size}, CPU")
    print(f"median of {args.repeats} runs (each run's total, model loading included):")
    rows = {}
    for name, times in seconds.items():
        median = statistics.median(times)
        rows[name] = {"seconds": times, "median_s": median, "frames_per_s": args.frames / median, "ms_per_frame": 1000 * median / args.frames}
        print(
            f"  {name:<24} {rows[name]['frames_per_s']:6.1f} frames/s  {rows[name]['ms_per_frame']:6.1f} ms/frame  (runs: {', '.join(f'{t:.2f}' for t in times)} s)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "origin": origin, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
