#!/usr/bin/env python
"""Write a procedural sewer-CCTV dataset (images, box masks, VIA hand labels, exact truth).

python drivers/make_synthetic.py                       # datasets/obstacle, 1000 images
python drivers/make_synthetic.py --name deposition --count 200 --size 352x288
python drivers/make_synthetic.py --name small_obstacle --defect obstacle --size 1280x960 --area-scale 0.05   # small objects in large frames
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from bss.data.synthetic import DEFECTS, SynthConfig, generate_dataset, parse_size  # noqa: E402
from bss.errors import BSSError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="obstacle", help="dataset folder under --data-root (default: obstacle)")
    parser.add_argument("--defect", choices=DEFECTS, default=None, help="defect class to paint (default: --name if it is a defect class, else obstacle)")
    parser.add_argument("--count", type=int, default=1000, help="number of images (default: 1000)")
    parser.add_argument("--hand-labelled", type=int, default=200, help="images that get exact polygons in labels.csv (default: 200)")
    parser.add_argument("--size", default="256x192", help="image size WIDTHxHEIGHT (default: 256x192)")
    parser.add_argument(
        "--area-scale",
        type=float,
        default=1.0,
        help="the defects' area as a share of the default sizes (default: 1; 0.05: small objects, thin disconnect gaps)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files (default: 0)")
    parser.add_argument("--data-root", default="datasets", help="folder holding the datasets (default: datasets)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same name")
    parser.add_argument("--workers", type=int, default=2, help="processes to render with (default: 2)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        width, height = parse_size(args.size)
        defect = args.defect or (args.name if args.name in DEFECTS else "obstacle")
        cfg = SynthConfig(args.name, defect, args.count, args.hand_labelled, width, height, args.seed, args.area_scale)
        report = generate_dataset(cfg, args.data_root, overwrite=args.overwrite, workers=args.workers)
    except BSSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {report.folder}: {report.count} {defect} images {width}x{height} (seed {args.seed}"
        + (f", defect area x{args.area_scale:g}" if args.area_scale != 1 else "")
        + "), "
        f"{report.hand_labelled} hand-labelled, {report.empty} without a defect, in {report.seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
