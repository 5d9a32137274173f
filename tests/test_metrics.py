"""Metrics against hand-computed confusion counts, empty masks included."""

from __future__ import annotations

import pytest
import torch

from bss.metrics import SegmentationMetrics, confusion_counts, scores_from_counts


def logits(mask):
    return torch.where(torch.as_tensor(mask, dtype=torch.bool), 10.0, -10.0).float()


def test_hand_computed_image():
    target = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])
    pred = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0]])  # TP 2, FP 1, FN 2, TN 3
    assert confusion_counts(pred[None], target[None]).tolist() == [[2, 1, 2, 3]]
    m = SegmentationMetrics()
    m.update(logits(pred)[None, None], target[None, None].float())
    out = m.compute()
    assert out["iou"] == pytest.approx(2 / 5)
    assert out["dice"] == pytest.approx(4 / 7)  # measured: 2TP / (2TP+FP+FN)
    assert out["recall"] == pytest.approx(2 / 4)
    assert out["precision"] == pytest.approx(2 / 3)


def test_micro_versus_per_image_and_empty_masks():
    t1 = torch.zeros(1, 4, 4)
    t1[0, :2] = 1  # 8 px
    p1 = t1.clone()  # perfect
    t2 = torch.zeros(1, 4, 4)  # empty truth
    p2 = torch.zeros(1, 4, 4)
    p2[0, 0, 0] = 1  # one false positive
    t3, p3 = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)  # empty and empty: agrees
    m = SegmentationMetrics()
    m.update(logits(torch.stack([p1, p2, p3])), torch.stack([t1, t2, t3]))
    out = m.compute()
    assert out["iou"] == pytest.approx(8 / 9)  # micro: TP 8, FP 1
    assert out["precision"] == pytest.approx(8 / 9) and out["recall"] == 1.0
    assert out["iou_per_image"] == pytest.approx((1 + 0 + 1) / 3)
    assert out["precision_per_image"] == pytest.approx((1 + 0 + 1) / 3)
    assert out["recall_per_image"] == 1.0  # nothing to find counts as found


def test_threshold_is_on_the_probability():
    target = torch.ones(1, 1, 2, 2)
    lg = torch.full((1, 1, 2, 2), 0.5)  # sigmoid 0.62
    low, high = SegmentationMetrics(0.6), SegmentationMetrics(0.7)
    low.update(lg, target)
    high.update(lg, target)
    assert low.compute()["recall"] == 1.0 and high.compute()["recall"] == 0.0


def test_all_foreground_has_low_precision():
    target = torch.zeros(1, 1, 10, 10)
    target[..., :1, :] = 1
    m = SegmentationMetrics()
    m.update(torch.full_like(target, 10.0), target)
    out = m.compute()
    assert out["recall"] == 1.0 and out["precision"] == pytest.approx(0.1) and out["foreground_fraction"] == 1.0


def test_scores_vectorised_shape():
    counts = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 5]])
    s = scores_from_counts(counts)
    assert s["iou"].tolist() == [1.0, 1.0]


def test_compute_without_updates_raises():
    with pytest.raises(ValueError):
        SegmentationMetrics().compute()
