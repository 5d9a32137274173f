#!/usr/bin/env python
"""Turn one class of a YOLO detection dataset into a BSS dataset: images, box masks, labels.csv.

    python drivers/import_yolo.py --source DIR --class obstacle --name NAME [--data-root datasets] [--overwrite] [--copy]

See docs/bring_your_own_data.md for the whole path from a YOLO dataset to a trained model.
"""

from __future__ import annotations

import argparse
import sys

import _common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="YOLO dataset folder: data.yaml (or dataset.yaml), images/, labels/")
    parser.add_argument("--class", dest="class_spec", required=True, help="class name (case-insensitive) or integer id to import")
    parser.add_argument("--name", required=True, help="name of the new dataset, created as <data-root>/<name>")
    parser.add_argument("--data-root", default="datasets", help="folder holding the datasets (default: datasets)")
    parser.add_argument("--overwrite", action="store_true", help="replace <data-root>/<name> if it exists")
    parser.add_argument("--copy", action="store_true", help="copy the images instead of hard-linking them")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from bss.data.yolo_import import import_yolo, summary

    manifest = import_yolo(
        args.source,
        args.class_spec,
        args.name,
        data_root=args.data_root,
        overwrite=args.overwrite,
        copy=args.copy,
        log=lambda message: print(f"warning: {message}", file=sys.stderr),
    )
    print(summary(manifest))
    return 0


if __name__ == "__main__":
    _common.run(main)
