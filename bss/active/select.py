"""Choose ``count`` images by a score, skipping near-duplicates of frames already chosen.

Inspection videos give runs of almost identical frames; their scores are almost identical too,
so a plain top-``count`` would spend the labelling budget on one defect seen ten times. Each
image gets a tiny *thumbnail signature* (grey, blurred, 24x32, zero mean and unit variance: so
a brightness or contrast change of the same view does not count as different). Two frames are
near-duplicates when the mean absolute difference of their signatures is below ``near``.
Measured on the real sewer sample (``../shared/data/coudlabs_sewer``, 92 frames): two frames of
the same defect a moment apart 0.007 and 0.093, the same pipe a few metres on 0.098, the median
pair of frames 0.78; synthetic frames are never nearer than 0.36 to each other. Greedy: in score order, an image is taken unless it is a near-duplicate of an image
already taken. ``near = 0`` turns the suppression off.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

SIGNATURE_SHAPE = (24, 32)  # height, width
DEFAULT_NEAR = 0.12


def signature(rgb: np.ndarray) -> np.ndarray:
    """The thumbnail signature of an RGB (or grey) uint8 image: float32 (24, 32), zero mean, unit std."""
    grey = np.asarray(rgb)
    if grey.ndim == 3:
        grey = cv2.cvtColor(np.ascontiguousarray(grey[..., :3]), cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey.astype(np.float32), SIGNATURE_SHAPE[::-1], interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (3, 3), 0)
    std = float(small.std())
    return ((small - small.mean()) / (std if std > 1e-6 else 1.0)).astype(np.float32)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@dataclass
class Pick:
    index: int  # into the pool
    rank: int  # 1-based position among the chosen
    skipped: list[tuple[int, int, float]]  # (pool index, index of the chosen look-alike, distance) passed over for it


def choose(
    values: np.ndarray, count: int, signatures: list[np.ndarray] | None = None, near: float = DEFAULT_NEAR, eligible: np.ndarray | None = None
) -> tuple[list[Pick], list[tuple[int, int, float]]]:
    """Greedy choice of up to ``count`` pool indices by decreasing ``values`` (ties: pool order).

    Returns the picks and every (index, look-alike, distance) skipped as a near-duplicate.
    ``eligible`` (bool per image) leaves the others out (images without a box)."""
    values = np.asarray(values, dtype=np.float64)
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    picks: list[Pick] = []
    skipped: list[tuple[int, int, float]] = []
    for i in order:
        if len(picks) >= count:
            break
        if eligible is not None and not eligible[i]:
            continue
        if signatures is not None and near > 0 and picks:
            d, j = min((distance(signatures[i], signatures[p.index]), p.index) for p in picks)
            if d < near:
                skipped.append((i, j, d))
                continue
        picks.append(Pick(i, len(picks) + 1, []))
    return picks, skipped
