"""Train one model from a config and record it in MLflow.

python drivers/train.py --config config.yaml [--set epochs=3 model.args.encoder_name=resnet34]
"""

from __future__ import annotations

import argparse

import _common


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys, e.g. epochs=3")
    parser.add_argument("--output-dir", help="where best.pt and overlays.png go (default: the config's output_dir)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's tracking.uri)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not record the run in MLflow")
    args = parser.parse_args()

    from bss.config import load_config, parse_overrides
    from bss.training.run import tracked_training

    overrides = parse_overrides(args.set)
    if args.tracking_uri:
        overrides.setdefault("tracking", {})["uri"] = args.tracking_uri
    if args.no_mlflow:
        overrides.setdefault("tracking", {})["enabled"] = False
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    config = load_config(args.config, overrides)
    result = tracked_training(config)
    m = result.best_metrics
    print(f"best EVAL (epoch {result.best_epoch:.2f}): IoU {m['iou']:.4f}  Dice {m['dice']:.4f}  Recall {m['recall']:.4f}  Precision {m['precision']:.4f}")
    print(f"checkpoint: {result.checkpoint}   ({result.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    _common.run(main)
