"""Ignored pixels: a target value of :data:`IGNORE` leaves the pixel out of the loss.

A student's target on a refined image (:class:`bss.data.segmentation_dataset.SegmentationDataset`
with ``ignore_band``) marks the pixels the teacher was unsure of with ``IGNORE``. smp's Tversky,
Dice and Focal losses take it as their ``ignore_index`` (:func:`bss.losses.build_loss` sets it):
an ignored pixel's probability and target are zeroed before the sums, so it adds nothing to TP,
FP or FN, and Focal drops it. :class:`BCEWithLogits` averages over the pixels that are not
ignored. A target without ``IGNORE`` gives exactly the loss it gave before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -1  # a target value no label takes (labels are in [0, 1])


class BCEWithLogits(torch.nn.Module):
    """``torch.nn.BCEWithLogitsLoss`` (mean over pixels) over the pixels whose target is not
    :data:`IGNORE`; soft targets in [0, 1] are taken as they are. ``pos_weight``: a number."""

    def __init__(self, pos_weight: float | None = None):
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != IGNORE
        pos_weight = None if self.pos_weight is None else torch.tensor(float(self.pos_weight), device=logits.device, dtype=logits.dtype)
        per_pixel = F.binary_cross_entropy_with_logits(logits, torch.where(valid, target, 0.0), pos_weight=pos_weight, reduction="none")
        return (per_pixel * valid).sum() / valid.sum().clamp(min=1)
