"""Binary segmentation metrics from confusion counts.

A pixel is predicted foreground when ``sigmoid(logit) > threshold``. Per image we count
TP, FP, FN (and TN). Then

- IoU = TP / (TP + FP + FN)
- Dice = 2 TP / (2 TP + FP + FN)      (computed from the counts, not derived from IoU)
- Recall = TP / (TP + FN)
- Precision = TP / (TP + FP)

*Micro* figures (``iou``, ``dice``, ...) sum the counts over the whole split first; *per-image*
figures (``iou_per_image``, ...) average each image's value. A ratio whose denominator is 0
(nothing to find and nothing predicted) counts as 1.0: the prediction agrees with the truth.
"""

from __future__ import annotations

import numpy as np
import torch


def confusion_counts(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image ``[TP, FP, FN, TN]`` (int64, shape (N, 4)) from boolean/0-1 tensors (N, ...)."""
    pred = pred.bool().flatten(1)
    target = target.bool().flatten(1)
    tp = (pred & target).sum(1)
    fp = (pred & ~target).sum(1)
    fn = (~pred & target).sum(1)
    tn = (~pred & ~target).sum(1)
    return torch.stack([tp, fp, fn, tn], dim=1).long()


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1), torch.ones_like(num))


def mask_counts(label: np.ndarray, truth: np.ndarray) -> list[int]:
    """``[TP, FP, FN, TN]`` of one binary mask against the truth (numpy; any non-zero is foreground)."""
    label, truth = np.asarray(label) > 0, np.asarray(truth) > 0
    tp = int(np.count_nonzero(label & truth))
    fp = int(np.count_nonzero(label & ~truth))
    fn = int(np.count_nonzero(~label & truth))
    return [tp, fp, fn, label.size - tp - fp - fn]


def iou_from_counts(counts) -> torch.Tensor:
    """IoU = TP / (TP + FP + FN) of each row of ``counts`` (..., 4: a tensor, array or list), 1.0
    where the union is empty: the one IoU of BSS (metrics, label quality, overlays)."""
    counts = torch.as_tensor(counts)
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    return _ratio(tp, tp + fp + fn)


def scores_from_counts(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """IoU, Dice, Recall, Precision for each row of ``counts`` (..., 4)."""
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    return {
        "iou": iou_from_counts(counts),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "recall": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
    }


class SegmentationMetrics:
    """Accumulates confusion counts batch by batch; :meth:`compute` gives micro and per-image figures."""

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        self._counts: list[torch.Tensor] = []

    def reset(self) -> None:
        self._counts.clear()

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        pred = torch.sigmoid(logits.float()) > self.threshold
        self._counts.append(confusion_counts(pred, target > 0.5).cpu())

    @property
    def counts(self) -> torch.Tensor:
        return torch.cat(self._counts) if self._counts else torch.zeros((0, 4), dtype=torch.long)

    def compute(self) -> dict[str, float]:
        return summarize(self.counts)


def summarize(counts) -> dict[str, float]:
    """The figures of a split from its per-image ``[TP, FP, FN, TN]`` rows (N, 4): micro
    (``iou``, ...), per-image means (``iou_per_image``, ...) and the predicted foreground fraction."""
    counts = torch.as_tensor(counts, dtype=torch.long).reshape(-1, 4)
    if len(counts) == 0:
        raise ValueError("no images were evaluated")
    out = {name: float(value) for name, value in scores_from_counts(counts.sum(0)).items()}
    for name, values in scores_from_counts(counts).items():
        out[f"{name}_per_image"] = float(values.mean())
    out["foreground_fraction"] = float((counts[:, 0] + counts[:, 1]).sum() / counts.sum())
    return out
