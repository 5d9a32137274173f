"""Losses by name, and which Tversky weight punishes which error."""

from __future__ import annotations

import pytest
import torch

from bss.config import NamedArgs
from bss.errors import ConfigError
from bss.losses import LOSSES, build_loss

BIG = 20.0  # a logit that sigmoid maps to ~1


def case():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1  # 8 foreground pixels
    fp_pred = torch.full_like(target, BIG)  # everything foreground: 8 FP, 0 FN
    return target, fp_pred


def test_tversky_alpha_weights_false_positives_beta_false_negatives():
    target, fp_pred = case()
    alpha_heavy = build_loss(NamedArgs("TverskyLoss", {"alpha": 0.9, "beta": 0.1}))
    beta_heavy = build_loss(NamedArgs("TverskyLoss", {"alpha": 0.1, "beta": 0.9}))
    # only false positives: loss = 1 - 8 / (8 + alpha * 8)
    assert alpha_heavy(fp_pred, target).item() == pytest.approx(1 - 8 / (8 + 0.9 * 8), abs=1e-3)
    assert beta_heavy(fp_pred, target).item() == pytest.approx(1 - 8 / (8 + 0.1 * 8), abs=1e-3)
    # half the foreground found: only false negatives, which beta weights
    half = torch.zeros_like(target)
    half[..., :1, :] = BIG
    half[..., 1:, :] = -BIG  # 4 TP, 4 FN, 0 FP
    assert beta_heavy(half, target).item() > alpha_heavy(half, target).item()
    assert beta_heavy(half, target).item() == pytest.approx(1 - 4 / (4 + 0.9 * 4), abs=1e-3)


def test_every_loss_builds_and_is_zero_ish_when_perfect():
    target, _ = case()
    perfect = torch.where(target > 0, torch.full_like(target, BIG), torch.full_like(target, -BIG))
    for name in LOSSES:
        if name == "WeightedSum":
            continue
        loss = build_loss(NamedArgs(name, {}))
        assert loss(perfect, target).item() < 0.05, name
        assert loss(-perfect, target).item() > 0.5, name


def test_weighted_sum_adds_its_terms():
    target, fp_pred = case()
    terms = [{"name": "TverskyLoss", "args": {"alpha": 0.5, "beta": 0.5}, "weight": 2.0}, {"name": "BCEWithLogitsLoss", "weight": 0.5}]
    total = build_loss(NamedArgs("WeightedSum", {"terms": terms}))(fp_pred, target)
    parts = 2.0 * build_loss(NamedArgs("TverskyLoss", {"alpha": 0.5, "beta": 0.5}))(fp_pred, target) + 0.5 * torch.nn.BCEWithLogitsLoss()(fp_pred, target)
    assert total.item() == pytest.approx(parts.item(), rel=1e-5)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown loss 'Tversky'; valid: TverskyLoss, DiceLoss"):
        build_loss(NamedArgs("Tversky"))
    with pytest.raises(ConfigError, match="does not fit TverskyLoss"):
        build_loss(NamedArgs("TverskyLoss", {"gamma_ray": 1}))
    with pytest.raises(ConfigError, match="WeightedSum"):
        build_loss(NamedArgs("WeightedSum", {"terms": []}))
