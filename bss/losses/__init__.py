"""Losses by name: ``build_loss(NamedArgs("TverskyLoss", {"alpha": 0.3, "beta": 0.7}))``.

All take raw logits (N, 1, H, W) and a target of the same shape: 0/1, or a soft label in [0, 1];
a pixel whose target is :data:`~bss.losses.masked.IGNORE` (-1) is left out of the loss (see
:mod:`bss.losses.masked`).

TverskyLoss is smp's: ``1 - TP / (TP + alpha * FP + beta * FN)``. **alpha weights false positives,
beta weights false negatives**: beta > alpha trades precision for recall (tested in
tests/test_losses.py). alpha = beta = 0.5 is the Dice loss.
"""

from __future__ import annotations

import math

import segmentation_models_pytorch as smp
import torch

from bss.config import NamedArgs
from bss.errors import ConfigError
from bss.losses.masked import IGNORE, BCEWithLogits
from bss.losses.weighted_sum import WeightedSum


def _binary(cls):
    def make(**kwargs):
        kwargs.setdefault("mode", "binary")
        kwargs.setdefault("ignore_index", IGNORE)
        return cls(**kwargs)

    make.__name__ = cls.__name__
    return make


NUMERIC_ARGS = ("alpha", "beta", "gamma", "smooth", "eps", "pos_weight")  # checked here: smp would fail mid-training

LOSSES = {
    "TverskyLoss": _binary(smp.losses.TverskyLoss),
    "DiceLoss": _binary(smp.losses.DiceLoss),
    "FocalLoss": _binary(smp.losses.FocalLoss),
    "BCEWithLogitsLoss": BCEWithLogits,
    "WeightedSum": None,  # built below: {"terms": [{"name", "args", "weight"}, ...]}
}


def build_loss(spec: NamedArgs) -> torch.nn.Module:
    if spec.name not in LOSSES:
        raise ConfigError(f"config key 'criterion.name': unknown loss {spec.name!r}; valid: {', '.join(LOSSES)}.")
    if spec.name == "WeightedSum":
        terms = spec.args.get("terms")
        if not isinstance(terms, list) or not terms or set(spec.args) - {"terms"}:
            raise ConfigError("config key 'criterion.args' of WeightedSum must be {terms: [{name, args, weight}, ...]}.")
        losses, weights = [], []
        for i, term in enumerate(terms):
            if not isinstance(term, dict) or "name" not in term or set(term) - {"name", "args", "weight"}:
                raise ConfigError(f"config key 'criterion.args.terms[{i}]' must be a mapping with name, args and weight.")
            losses.append(build_loss(NamedArgs(term["name"], term.get("args") or {})))
            weights.append(float(term.get("weight", 1.0)))
        return WeightedSum(losses, weights)
    for key, value in spec.args.items():
        if key in NUMERIC_ARGS and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ConfigError(f"config key 'criterion.args.{key}' must be a finite number, got {value!r}.")
    try:
        return LOSSES[spec.name](**spec.args)
    except TypeError as exc:
        raise ConfigError(f"config key 'criterion.args' does not fit {spec.name}: {exc}.") from None
