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


# ---- ignored pixels (student.ignore_band): IGNORE in the target leaves a pixel out ----------

from bss.losses.masked import IGNORE  # noqa: E402

SINGLE = [name for name in LOSSES if name != "WeightedSum"]


def box_only_case():
    """A refined image's target, 4x4: the box is the top-left 2x3 block; inside it the teacher
    was sure of 4 foreground pixels and unsure of 2 (IGNORE); the 10 pixels outside are background."""
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 0, :2] = 1
    target[0, 0, 1, :2] = 1
    target[0, 0, :2, 2] = IGNORE
    logits = torch.where(target == 1, torch.full_like(target, BIG), torch.full_like(target, -BIG))  # right on every labelled pixel
    return target, logits


def build(name):
    if name == "WeightedSum":
        terms = [{"name": "TverskyLoss", "args": {"alpha": 0.3, "beta": 0.7}, "weight": 1.0}, {"name": "BCEWithLogitsLoss", "weight": 0.5}]
        return build_loss(NamedArgs(name, {"terms": terms}))
    return build_loss(NamedArgs(name, {}))


@pytest.mark.parametrize("name", list(LOSSES))
def test_an_ignored_pixel_neither_changes_the_loss_nor_gets_a_gradient(name):
    target, logits = box_only_case()
    loss = build(name)
    reference = loss(logits, target).item()
    for value in (-BIG, -1.0, 0.0, 2.5, BIG):  # whatever the model says on the unsure pixels
        moved = logits.clone()
        moved[0, 0, :2, 2] = value
        moved.requires_grad_(True)
        out = loss(moved, target)
        out.backward()
        assert out.item() == pytest.approx(reference, abs=1e-6), (name, value)
        assert torch.all(moved.grad[0, 0, :2, 2] == 0), (name, value)
    # the same figure as the loss over the labelled pixels alone (the 14 others, as one row)
    keep = target != IGNORE
    assert reference == pytest.approx(loss(logits[keep].view(1, 1, 1, -1), target[keep].view(1, 1, 1, -1)).item(), abs=1e-6), name


@pytest.mark.parametrize("name", SINGLE)
def test_a_pixel_outside_every_box_counts_as_background(name):
    """Foreground predicted outside the box is a false positive, although the box's unsure pixels are ignored."""
    target, logits = box_only_case()
    loss = build_loss(NamedArgs(name, {}))
    wrong = logits.clone()
    wrong[0, 0, 3, 3] = BIG  # outside the box
    assert loss(wrong, target).item() > loss(logits, target).item() + 0.01, name


def test_ignored_tversky_by_hand():
    """4 TP; one foreground predicted outside the box: 1 FP; the 2 ignored pixels predicted
    foreground add nothing: loss = 1 - 4 / (4 + alpha * 1)."""
    target, logits = box_only_case()
    logits[0, 0, :2, 2] = BIG  # unsure pixels predicted foreground: ignored
    logits[0, 0, 3, 3] = BIG  # outside the box: a false positive
    loss = build_loss(NamedArgs("TverskyLoss", {"alpha": 0.3, "beta": 0.7}))(logits, target)
    assert loss.item() == pytest.approx(1 - 4 / (4 + 0.3 * 1), abs=1e-4)
    bce = build_loss(NamedArgs("BCEWithLogitsLoss"))(logits, target)  # mean over the 14 labelled pixels: one wrong by BIG
    assert bce.item() == pytest.approx(BIG / 14, rel=1e-3)


def test_without_ignored_pixels_the_losses_are_smp_and_torch_unchanged():
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.6).float()
    soft = torch.rand(2, 1, 8, 8)  # a soft target (student.soft_targets)
    for t in (target, soft):
        ours = build_loss(NamedArgs("TverskyLoss", {"alpha": 0.3, "beta": 0.7}))(logits, t)
        assert ours.item() == pytest.approx(smp.losses.TverskyLoss("binary", alpha=0.3, beta=0.7)(logits, t).item(), rel=1e-6)
        assert build_loss(NamedArgs("BCEWithLogitsLoss"))(logits, t).item() == pytest.approx(torch.nn.BCEWithLogitsLoss()(logits, t).item(), rel=1e-6)
    weighted = build_loss(NamedArgs("BCEWithLogitsLoss", {"pos_weight": 3.0}))(logits, target)
    assert weighted.item() == pytest.approx(torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0))(logits, target).item(), rel=1e-6)
