"""Label quality: how close box masks and refined (hybrid) masks are to the true masks.

Synthetic datasets keep the exact mask of every image in ``truth/``. For the refined images we
count, per image, TP/FP/FN of the box mask and of the hybrid mask against the truth and report

- ``*_iou_per_image``: the mean of the per-image IoUs (an image with nothing in the truth and
  nothing in the label counts 1.0, as in :mod:`bss.metrics`),
- ``*_iou_pixels``: the IoU over all pixels of all images (counts summed first).

Refinement helps when the hybrid figures are above the box figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bss.data.io import is_image, read_mask
from bss.data.layout import list_samples
from bss.metrics import iou_from_counts, mask_counts, scores_from_counts


def iou(row: list[int]) -> float:
    """IoU of one ``[TP, FP, FN, TN]`` row, 1.0 when both are empty (:func:`bss.metrics.iou_from_counts`)."""
    return float(iou_from_counts(row))


class LabelQuality:
    """Accumulates box-vs-truth and hybrid-vs-truth counts image by image."""

    def __init__(self) -> None:
        self.box: list[list[int]] = []
        self.hybrid: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.box)

    def add(self, truth: np.ndarray, box: np.ndarray, hybrid: np.ndarray) -> dict:
        """Add one image; return its two IoUs."""
        if not (truth.shape == box.shape == hybrid.shape):
            raise ValueError(f"truth {truth.shape}, box {box.shape} and hybrid {hybrid.shape} differ in size")
        return self.add_counts(mask_counts(box, truth), mask_counts(hybrid, truth))

    def add_counts(self, box_counts: list[int], hybrid_counts: list[int]) -> dict:
        self.box.append(list(box_counts))
        self.hybrid.append(list(hybrid_counts))
        return {"box_iou": iou(self.box[-1]), "hybrid_iou": iou(self.hybrid[-1])}

    def result(self) -> dict | None:
        if not self.box:
            return None
        out: dict = {"images": len(self.box)}
        for name, rows in (("box", self.box), ("hybrid", self.hybrid)):
            table = torch.tensor(rows, dtype=torch.long)
            per_image = scores_from_counts(table)
            pixels = scores_from_counts(table.sum(0))
            out[f"{name}_iou_per_image"] = float(per_image["iou"].mean())
            out[f"{name}_iou_pixels"] = float(pixels["iou"])
            out[f"{name}_precision_pixels"] = float(pixels["precision"])
            out[f"{name}_recall_pixels"] = float(pixels["recall"])
        return out


def truth_files(truth_dir: Path | None) -> dict[str, Path]:
    """stem -> truth mask path (empty when the dataset keeps no truth)."""
    if truth_dir is None or not Path(truth_dir).is_dir():
        return {}
    return {p.stem: p for p in sorted(Path(truth_dir).iterdir()) if is_image(p)}


def format_quality(quality: dict | None) -> str:
    """A two-row table for the terminal."""
    if not quality:
        return "label quality: no truth/ masks in the source dataset; not measured."
    return (
        f"label IoU against truth/ over {quality['images']} refined images (mean per image | all pixels):\n"
        f"  boxes : {quality['box_iou_per_image']:.4f} | {quality['box_iou_pixels']:.4f}\n"
        f"  hybrid: {quality['hybrid_iou_per_image']:.4f} | {quality['hybrid_iou_pixels']:.4f}"
    )


def measure_folder(hybrid_dir: str | Path, source_dir: str | Path, stems: list[str] | None = None) -> dict | None:
    """Label quality of an existing hybrid dataset against its source's ``truth/`` and ``masks/``.

    ``stems`` defaults to the refined images listed in the hybrid's manifest.
    """
    import json

    hybrid_dir, source_dir = Path(hybrid_dir), Path(source_dir)
    truths = truth_files(source_dir / "truth")
    if not truths:
        return None
    if stems is None:
        manifest = json.loads((hybrid_dir / "manifest.json").read_text())
        stems = [Path(row["image"]).stem for row in manifest["images"] if row["origin"] == "refined"]
    boxes = {s.stem: s.mask for s in list_samples(source_dir)}
    quality = LabelQuality()
    for stem in stems:
        if stem in truths:
            quality.add(read_mask(truths[stem]), read_mask(boxes[stem]), read_mask(hybrid_dir / "masks" / f"{stem}.png"))
    return quality.result()
