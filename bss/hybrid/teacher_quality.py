"""How well a teacher refines boxes, measured where the truth is known: the EVAL images.

Every EVAL image has both its box mask (in the source's ``masks/``) and its exact mask (in
``NAME_EVAL/masks``). The teacher predicts the EVAL images exactly as :func:`make_hybrid`
predicts the box-only ones; each candidate :class:`RefineRule` of a small grid turns box +
probability into a refined mask, scored against the exact mask: the **EVAL label IoU** (over
all pixels, and the mean per image). Nothing of EVAL enters a training set: EVAL only chooses
the rule's parameters and measures.

This is the label-quality estimate for real datasets, which have no ``truth/``. The loop uses it

* to choose the rule per iteration (:func:`choose_rule`, on probabilities computed once), and
* as a guard: an ``H<n+1>`` whose EVAL label IoU does not beat that of the current training
  labels (the boxes, for ``H1``) is not made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bss.data.io import read_mask
from bss.data.layout import list_samples, resolve_dataset
from bss.errors import DatasetError
from bss.hybrid.refine import REFINE_MODES, RefineRule, refine
from bss.metrics import iou_from_counts, mask_counts, scores_from_counts


def default_grid(images: bool = True) -> list[RefineRule]:
    """The default rule first (it wins ties), then every mode's grid (:meth:`RefineMode.grid`,
    in the order of :data:`REFINE_MODES`): 140 ``inside_box`` rules and 16 ``grabcut`` ones.
    ``images=False`` leaves out the modes that need the image."""
    grid = [RefineRule()]
    for mode in REFINE_MODES.values():
        if mode.needs_image and not images:
            continue
        for values in mode.grid():
            rule = RefineRule(mode=mode.name, **values)
            if rule != grid[0]:
                grid.append(rule)
    return grid


@dataclass
class RuleScore:
    rule: RefineRule
    iou_pixels: float
    iou_per_image: float
    image_iou: list[float] = field(default_factory=list)  # each EVAL image's label IoU, in EVAL's order

    def to_dict(self) -> dict:
        return {"rule": self.rule.to_dict(), "iou_pixels": round(self.iou_pixels, 4), "iou_per_image": round(self.iou_per_image, 4)}


@dataclass
class TeacherQuality:
    """The EVAL label IoU of the boxes, of the raw prediction, and of the best rule of the grid."""

    images: int
    box_iou_pixels: float
    box_iou_per_image: float
    raw_iou_pixels: float  # probability > 0.5, boxes ignored
    best: RuleScore
    default: RuleScore  # the default rule's score, for comparison
    table: list[RuleScore] = field(default_factory=list)

    @property
    def label_iou(self) -> float:
        """The headline figure: EVAL label IoU over all pixels of the chosen rule."""
        return self.best.iou_pixels

    def to_dict(self, top: int = 10) -> dict:
        ranked = sorted(self.table, key=lambda s: -s.iou_pixels)[:top]
        return {
            "images": self.images,
            "box_iou_pixels": round(self.box_iou_pixels, 4),
            "box_iou_per_image": round(self.box_iou_per_image, 4),
            "raw_iou_pixels": round(self.raw_iou_pixels, 4),
            "label_iou_pixels": round(self.best.iou_pixels, 4),
            "label_iou_per_image": round(self.best.iou_per_image, 4),
            "label_image_iou": [round(v, 6) for v in self.best.image_iou],
            "default_rule_iou_pixels": round(self.default.iou_pixels, 4),
            "rule": self.best.rule.to_dict(),
            "top_rules": [s.to_dict() for s in ranked],
            "rules_tried": len(self.table),
        }


def _score(rows: list[list[int]]) -> tuple[float, float, list[float]]:
    """IoU over all pixels (counts summed first), the mean of the per-image IoUs, and those."""
    table = torch.as_tensor(rows, dtype=torch.long)
    per_image = [float(v) for v in iou_from_counts(table).numpy()]
    return float(iou_from_counts(table.sum(0))), float(np.mean(per_image)), per_image


def choose_rule(
    probabilities: list[np.ndarray],
    boxes: list[np.ndarray],
    truths: list[np.ndarray],
    grid: list[RefineRule] | None = None,
    images: list[np.ndarray] | None = None,
) -> TeacherQuality:
    """Score every rule of ``grid`` on (probability, box, truth) triples; the best by IoU over all
    pixels wins (ties: the earlier rule in the grid, so the default rule wins a tie). Rules that
    need the image (``grabcut``) are scored only when ``images`` are given."""
    if not probabilities:
        raise ValueError("choose_rule needs at least one image")
    grid = [r for r in (grid or default_grid()) if images is not None or not r.needs_image]
    images = images if images is not None else [None] * len(probabilities)
    scores = []
    for rule in grid:
        rows = [mask_counts(refine(p, b, rule, image=im).mask, t) for p, b, t, im in zip(probabilities, boxes, truths, images)]
        scores.append(RuleScore(rule, *_score(rows)))
    best = max(scores, key=lambda s: s.iou_pixels)  # first of equals
    box = _score([mask_counts(b, t) for b, t in zip(boxes, truths)])
    raw = _score([mask_counts(p > 0.5, t) for p, t in zip(probabilities, truths)])
    return TeacherQuality(len(probabilities), box[0], box[1], raw[0], best, scores[0], scores)


def eval_triples(dataset: str, data_root: str | Path) -> list[tuple[Path, Path, Path]]:
    """(image, box mask, exact mask) of every EVAL image of ``dataset``."""
    root = Path(data_root)
    source = resolve_dataset(dataset, root)
    boxes = {s.stem: s.mask for s in list_samples(source)}
    out = []
    for sample in list_samples(resolve_dataset(f"{Path(dataset).name}_EVAL", root)):
        if sample.stem not in boxes:
            raise DatasetError(
                f"{source / 'masks'}: the EVAL image {sample.image.name} has no box mask in the source dataset; the splits do not belong to it (rerun drivers/preprocess.py --overwrite)."
            )
        out.append((sample.image, boxes[sample.stem], sample.mask))
    return out


def measure_teacher(
    checkpoint: str | Path,
    dataset: str,
    data_root: str | Path,
    grid: list[RefineRule] | None = None,
    batch_size: int = 8,
    device: str = "auto",
    threads: int | None = None,
) -> TeacherQuality:
    """Predict the EVAL images with ``checkpoint`` (as make_hybrid does, with as many torch
    threads: the rule chosen here decides the H<n> made there) and score the grid."""
    from bss.environment import deterministic_inference
    from bss.inference import ImageFolderDataset, Predictor

    triples = eval_triples(dataset, data_root)
    predictor = Predictor.from_checkpoint(checkpoint, device=device)
    data = ImageFolderDataset(
        [t[0] for t in triples], predictor.input_size, extras={"box": [t[1] for t in triples], "truth": [t[2] for t in triples]}, keep_image=True
    )
    probs, boxes, truths, images = [], [], [], []
    with deterministic_inference(threads):
        for item, prob in predictor.predict(data, batch_size, 0, progress=False):
            probs.append(prob)
            boxes.append(np.asarray(item["box"]) > 0)
            truths.append(np.asarray(item["truth"]) > 0)
            images.append(item["rgb"])
    return choose_rule(probs, boxes, truths, grid, images)


def box_quality(dataset: str, data_root: str | Path) -> dict:
    """The EVAL box masks' own figures against the exact masks (no model): IoU, Dice, Recall, Precision over all pixels."""
    total = np.zeros(4, dtype=np.int64)
    for _, box, truth in eval_triples(dataset, data_root):
        b, t = read_mask(box), read_mask(truth)
        if b.shape != t.shape:
            raise DatasetError(f"{box}: box mask is {b.shape[1]}x{b.shape[0]} but the exact mask {truth} is {t.shape[1]}x{t.shape[0]}.")
        total += np.asarray(mask_counts(b, t))
    return {k: float(v) for k, v in scores_from_counts(torch.from_numpy(total)).items()}
