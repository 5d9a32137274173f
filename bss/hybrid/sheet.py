"""A picture of what an ``H<n>`` learned from the boxes: for a few refined images,
image | box (yellow) | refined H<n> mask (red) | truth (green, where the dataset keeps one),
with each label's IoU against the truth. Drawn by the loop for every H<n> it makes. Where the
boxes are small against the frame, each row adds crops of box, mask and truth around the
defect at native resolution (:func:`bss.visualization.with_crops`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bss.data.io import read_image, read_mask
from bss.hybrid.label_quality import truth_files
from bss.visualization import PRED_COLOUR, TRUTH_COLOUR, image_grid, mask_iou, tint, with_crops

BOX_COLOUR = np.array([255, 210, 0], dtype=np.float32)


def refined_sheet(hybrid_dir: str | Path, path: str | Path, samples: int = 4) -> Path | None:
    """Write the sheet of the first ``samples`` refined images of ``hybrid_dir`` (its manifest
    names the source, whose ``masks/`` are the boxes); None when nothing was refined."""
    import json

    hybrid_dir = Path(hybrid_dir)
    manifest = json.loads((hybrid_dir / "manifest.json").read_text())
    source = Path(manifest["source"])
    truths = truth_files(source / "truth")
    refined = [e["image"] for e in manifest["images"] if e.get("origin") == "refined"][:samples]
    rows, labels, focus = [], [], []
    for name in refined:
        stem = Path(name).stem
        rgb = read_image(hybrid_dir / "images" / name)
        box = read_mask(source / "masks" / f"{stem}.png") > 0
        mask = read_mask(hybrid_dir / "masks" / f"{stem}.png") > 0
        row, label = [rgb, tint(rgb, box, BOX_COLOUR), tint(rgb, mask, PRED_COLOUR)], ["", "", ""]
        if stem in truths:
            truth = read_mask(truths[stem]) > 0
            row.append(tint(rgb, truth, TRUTH_COLOUR))
            label = ["", f"IoU {mask_iou(box, truth):.2f}", f"IoU {mask_iou(mask, truth):.2f}", ""]
        rows.append(row)
        labels.append(label)
        focus.append(box)
    if not rows:
        return None
    headers = ["image", "box", hybrid_dir.name] + (["truth"] if truths else [])
    rows, headers, _ = with_crops(rows, focus, headers, [c for c in (1, 2, 3) if c < len(headers)])
    rule = manifest.get("rule", {})
    caption = f"{hybrid_dir.name}: {manifest['counts']['refined']} refined images; rule {rule.get('mode')} threshold {rule.get('threshold')}"
    return image_grid(rows, path, headers=headers, labels=labels, caption=caption)
