"""Per-image scores of how much a hand label of a box-only image would teach (numpy only).

Every score is computed from what the next iteration would use for the image: the teacher's
probability map ``prob`` (H, W) in [0, 1], the box mask ``box`` and the refined mask of the rule
(:func:`bss.hybrid.refine.refine`, with its per-box statistics). Higher means "label this
first". Scores are registered by name in :data:`SCORES`:

* ``expected_errors``  sum over the box pixels of ``min(p, 1 - p)``: the number of pixels the
  refined label is expected to get wrong if the probability were calibrated (large and
  uncertain defects first). Outside the boxes the refined label is background by rule, so
  only box pixels count.
* ``uncertainty``      the mean of ``1 - |2p - 1|`` over the box pixels (size-free).
* ``fill_margin``      how close the predicted fill of a box region is to the rule's
  ``min_fill`` (the fallback threshold): 1 at the threshold, 0 half a unit away; the largest
  over the image's box regions. Near the threshold the box and the refined mask disagree most
  about whether to trust the teacher.
* ``fallback``         the share of the box area whose region fell back to the box/ellipse
  (the rule did not trust the teacher there).
* ``combined``         the mean, over the four scores above, of the image's rank percentile.
* ``random``           a seeded random order (the baseline a ranking must beat).

An image without a box scores 0 on every score but ``random``: the refined label of an empty
box mask is empty, and a box-only image has nothing to teach there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bss.errors import BSSError

BASE_SCORES = ("expected_errors", "uncertainty", "fill_margin", "fallback")
SCORES = BASE_SCORES + ("combined", "random")
DEFAULT_SCORE = "expected_errors"  # best rank correlation with the wrong pixels in bench/active_labelling.py (BENCHMARKS.md)


@dataclass
class ImageScores:
    """The scores of one image plus what a reason line needs."""

    name: str
    values: dict[str, float]
    boxes: int
    fallbacks: int
    fills: list[float] = field(default_factory=list)
    box_pixels: int = 0


def image_scores(name: str, prob: np.ndarray, box: np.ndarray, refined, min_fill: float) -> ImageScores:
    """The base scores of one image; ``refined`` is a :class:`bss.hybrid.refine.Refined`."""
    prob = np.asarray(prob, dtype=np.float32)
    inside = np.asarray(box) > 0
    if prob.shape != inside.shape:
        raise ValueError(f"{name}: probability {prob.shape} and box mask {inside.shape} differ in size")
    n = int(inside.sum())
    if n == 0:
        return ImageScores(name, dict.fromkeys(BASE_SCORES, 0.0), 0, 0, [], 0)
    p = prob[inside]
    stats = refined.boxes
    fell = sum(b.area for b in stats if b.fallback)
    values = {
        "expected_errors": float(np.minimum(p, 1.0 - p).sum()),
        "uncertainty": float((1.0 - np.abs(2.0 * p - 1.0)).mean()),
        "fill_margin": max((max(0.0, 1.0 - 2.0 * abs(b.fill - min_fill)) for b in stats), default=0.0),
        "fallback": fell / max(1, sum(b.area for b in stats)),
    }
    return ImageScores(name, values, len(stats), sum(b.fallback for b in stats), [b.fill for b in stats], n)


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Each value's rank as a fraction in [0, 1] (ties share their mean rank)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return np.ones(len(values))
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for v in np.unique(values):  # ties: mean rank
        same = values == v
        ranks[same] = ranks[same].mean()
    return ranks / (len(values) - 1)


def score_table(scores: list[ImageScores], seed: int = 0) -> dict[str, np.ndarray]:
    """Every registered score for every image (arrays in ``scores`` order); ``combined`` and
    ``random`` need the whole pool, so they are computed here."""
    table = {k: np.array([s.values[k] for s in scores], dtype=np.float64) for k in BASE_SCORES}
    table["combined"] = np.mean([percentile_ranks(table[k]) for k in BASE_SCORES], axis=0) if scores else np.zeros(0)
    has_box = np.array([s.box_pixels > 0 for s in scores], dtype=bool)
    table["combined"] = np.where(has_box, table["combined"], 0.0)
    table["random"] = np.random.default_rng(seed).random(len(scores))
    return table


def check_score(name: str) -> str:
    if name not in SCORES:
        raise BSSError(f"unknown score {name!r}; choose one of {', '.join(SCORES)}.")
    return name


def reason(s: ImageScores, score: str, value: float, rank: int, min_fill: float) -> str:
    """One line saying why the image was chosen: the score that ranked it and what stands out."""
    if s.box_pixels == 0:
        return "no box in the image"
    parts = [f"{score} {value:.3g} (rank {rank})"] if score != "random" else [f"random pick (rank {rank})"]
    if s.fallbacks:
        parts.append(f"{s.fallbacks} of {s.boxes} box region(s) fell back (fill below {min_fill:g})")
    near = [f for f in s.fills if abs(f - min_fill) < 0.1]
    if near and not s.fallbacks:
        parts.append(f"fill {min(near, key=lambda f: abs(f - min_fill)):.2f} near the fallback threshold {min_fill:g}")
    parts.append(f"teacher uncertainty {s.values['uncertainty']:.2f} over {s.box_pixels} box px")
    return "; ".join(parts)
