"""The refinement rule: a coarse box mask + a model's probability map -> a refined mask (numpy only).

A :class:`RefineRule` is a mode and its parameters. Modes are classes registered by name in
:data:`REFINE_MODES`; each owns its parameters (default, range, CLI help), the grid of values
the loop tries on EVAL (:func:`bss.hybrid.teacher_quality.default_grid`), its description,
whether it needs the image, and the refinement itself. Adding a mode is one class (a
:class:`RefineMode` subclass decorated with :func:`register_mode`) and one test.

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
foreground, pixels below ``background`` (0: none) certain background, the rest probable
background; outside every box is certain background. OpenCV's GrabCut (``grabcut_iterations``)
then moves the probable pixels to the side whose colour model fits them, so the mask follows the
defect's edges rather than the upsampled prediction's. Where a thin defect's colour matches
much of its box (a dark joint gap in a dark pipe), GrabCut without a background seed can flood
the box; ``background`` keeps the pixels the teacher is sure of out of its reach (on 704x512
thin disconnects, H label IoU 0.58 -> 0.70 with ``background`` 0.02; on the real scratch photos
of ``neu_seg`` it costs 0.005 EVAL label IoU). The grid tries 0.02 and 0 (0, no seed, is the
default of a rule given by hand: the rule records of earlier runs keep their meaning). The
box-region fallback of ``inside_box`` applies afterwards. It needs the image (``refine(...,
image=rgb)``); on the default synthetic data it raised the EVAL label IoU from 0.840 to 0.872.
GrabCut initialises its colour models from OpenCV's random generator; the generator is seeded
before every call, so the same inputs always give the same mask (whatever ran before, in
whichever thread).

Mode ``blend`` is the seed's rule: ``alpha * box + (1 - alpha) * probability``, thresholded at
``threshold`` (not restricted to the boxes, no fallback). Note that ``blend_alpha >= threshold``
turns every box pixel foreground (the result is the box) and ``blend_alpha = 0`` is the raw
prediction.

``soft`` keeps a soft label as well: the probability inside the regions whose prediction is kept,
1 on a fallback mask, 0 outside the boxes (``inside_box``), or the blend value (``blend``). The
binary mask is always produced (datasets' ``masks/`` are binary); the soft one is written to
``soft/`` beside it.

A rule serialises to one flat dict (``to_dict``: ``mode`` and every registered parameter), the
form stored in ``state.json`` and in hybrid manifests; ``from_dict`` reads it back, a missing
parameter taking its default.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cv2
import numpy as np

from bss.errors import ConfigError

FALLBACKS = ("box", "ellipse")
GRABCUT_SEED = 0  # OpenCV's generator is seeded with this before every GrabCut: the same inputs, the same mask
# the key order of a rule's dict before the registry (state.json and manifests keep it); parameters of later modes follow
_DICT_ORDER = ("threshold", "min_fill", "fallback", "fill_holes", "blend_alpha", "sure", "background", "grabcut_iterations", "soft")


@dataclass(frozen=True)
class Param:
    """One parameter of the rule: its default, what it means (the CLI's help), and its valid values
    (``choices`` for text; ``low``/``high`` for numbers, inclusive unless ``open``)."""

    default: Any
    help: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    open: bool = False  # the bounds themselves are invalid

    def clean(self, name: str, value: Any) -> Any:
        """``value`` checked and in the default's type; a bad one is a ConfigError naming ``name``."""
        where = f"refine rule {name!r}"
        kind = type(self.default)
        if kind is bool:
            if not isinstance(value, (bool, np.bool_)):
                raise ConfigError(f"{where} must be true or false, got {value!r}.")
            return bool(value)
        if kind is str:
            if value not in self.choices:
                raise ConfigError(f"{where} must be one of {', '.join(self.choices)}, got {value!r}.")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or (kind is int and float(value) != int(value)):
            raise ConfigError(f"{where} must be {'a whole number' if kind is int else 'a number'}, got {value!r}.")
        value = kind(value)
        below = self.low is not None and (value <= self.low if self.open else value < self.low)
        above = self.high is not None and (value >= self.high if self.open else value > self.high)
        if below or above:
            if self.high is None:
                text = f"at least {self.low:g}"
            else:
                text = f"between {self.low:g} and {self.high:g}" + (" (exclusive)" if self.open else "")
            raise ConfigError(f"{where} must be {text}, got {value!r}.")
        return value

    def argparse(self, name: str, users: list[str], modes: int) -> dict:
        """``add_argument`` keywords of ``--name`` (its help says which modes read it, unless all do)."""
        text = self.help if len(users) == modes else f"{', '.join(users)}: {self.help}"
        if isinstance(self.default, bool):
            import argparse

            return {"action": argparse.BooleanOptionalAction if self.default else "store_true", "help": text}
        if self.choices:
            return {"choices": self.choices, "default": self.default, "help": text}
        return {"type": type(self.default), "default": self.default, "help": text}


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


def _judge_regions(mask: np.ndarray, box: np.ndarray, prob: np.ndarray, rule: "RefineRule") -> Refined:
    """Keep ``mask`` inside each box region, or fall back where its fill is below ``min_fill``;
    fill holes if asked; the soft label alongside."""
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


def grabcut_foreground(image: np.ndarray, box: np.ndarray, prob: np.ndarray, rule: "RefineRule") -> np.ndarray:
    """Teacher-seeded GrabCut inside the boxes (bool mask); the thresholded prediction if GrabCut cannot run.

    OpenCV's generator (one per thread) is seeded just before the call, so the colour models
    start the same way for the same inputs, whatever ran before in this thread."""
    seeds = np.full(box.shape, cv2.GC_BGD, np.uint8)
    seeds[box] = cv2.GC_PR_BGD
    seeds[box & (prob < rule.background)] = cv2.GC_BGD
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
        cv2.setRNGSeed(GRABCUT_SEED)
        cv2.grabCut(np.ascontiguousarray(rgb[..., :3], dtype=np.uint8), seeds, None, bgd, fgd, int(rule.grabcut_iterations), cv2.GC_INIT_WITH_MASK)
    except cv2.error:  # a colour model it cannot fit (e.g. too few pixels on one side)
        return fg
    return ((seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)) & box


# ---------------------------------------------------------------------------------- the modes
REFINE_MODES: dict[str, type["RefineMode"]] = {}


def register_mode(cls: type["RefineMode"]) -> type["RefineMode"]:
    """Class decorator: make ``cls`` a mode, under ``cls.name``."""
    REFINE_MODES[cls.name] = cls
    return cls


class RefineMode:
    """A refinement mode. A subclass sets ``name``, ``help`` (the CLI's line for it), ``params``
    (its own parameters; those of its base classes are inherited), ``search`` (the values tried on
    EVAL, a grid: every combination) and ``needs_image``, and implements :meth:`apply` and
    :meth:`explain`. Every method takes the whole rule, whose parameters it reads as attributes."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    needs_image: ClassVar[bool] = False
    params: ClassVar[dict[str, Param]] = {
        "threshold": Param(0.5, "probability (blend: blended value) above which a pixel is foreground", low=0.0, high=1.0, open=True),
        "soft": Param(False, "also write soft labels (8-bit probability) to soft/"),
    }
    search: ClassVar[dict[str, tuple]] = {}

    @classmethod
    def parameters(cls) -> dict[str, Param]:
        """This mode's parameters: its own and its base classes'."""
        out: dict[str, Param] = {}
        for klass in reversed(cls.__mro__):
            out.update(vars(klass).get("params", {}))
        return out

    @classmethod
    def check(cls, rule: "RefineRule") -> None:
        """Checks across parameters (each one's own range is checked by its :class:`Param`)."""

    @classmethod
    def grid(cls) -> list[dict]:
        """The parameter sets tried on EVAL: every combination of ``search`` (none when it is empty)."""
        if not cls.search:
            return []
        return [dict(zip(cls.search, values)) for values in itertools.product(*cls.search.values())]

    @classmethod
    def apply(cls, rule: "RefineRule", prob: np.ndarray, box: np.ndarray, image: np.ndarray | None) -> Refined:
        raise NotImplementedError

    @classmethod
    def explain(cls, rule: "RefineRule") -> str:
        """What the rule does, in words (the hybrid manifest's ``rule.description``)."""
        raise NotImplementedError

    @classmethod
    def describe(cls, rule: "RefineRule") -> str:
        """One line: the mode, then the values of its parameters (a switch only when on)."""
        own = cls.parameters()
        values = [(name, value) for name, value in rule.to_dict().items() if name in own]  # in the dict's order
        words = [f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}" for name, value in values if not isinstance(value, bool)]
        return ", ".join([cls.name, *words, *(name for name, value in values if value is True)])


@register_mode
class InsideBox(RefineMode):
    name = "inside_box"
    help = "the thresholded prediction inside the boxes"
    params = {
        "min_fill": Param(0.4, "a box region predicted less full than this falls back", low=0.0, high=1.0),
        "fallback": Param("box", "the conservative mask of a fallback region", choices=FALLBACKS),
        "fill_holes": Param(False, "fill holes of the kept prediction"),
    }
    # 5 thresholds x 7 fill floors x 2 fallbacks x 2 = 140 rules
    search = {
        "threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
        "min_fill": (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5),
        "fallback": FALLBACKS,
        "fill_holes": (False, True),
    }

    @classmethod
    def foreground(cls, rule: "RefineRule", prob: np.ndarray, box: np.ndarray, image: np.ndarray | None) -> np.ndarray:
        """The predicted foreground inside the boxes, before the box regions are judged."""
        return (prob > rule.threshold) & box

    @classmethod
    def apply(cls, rule: "RefineRule", prob: np.ndarray, box: np.ndarray, image: np.ndarray | None) -> Refined:
        return _judge_regions(cls.foreground(rule, prob, box, image), box, prob, rule)

    @classmethod
    def seeds_text(cls, rule: "RefineRule") -> str:
        return f"probability > {rule.threshold} kept inside the boxes only"

    @classmethod
    def explain(cls, rule: "RefineRule") -> str:
        return (
            f"{cls.seeds_text(rule)}; a box region whose predicted fill is below "
            f"{rule.min_fill} falls back to the {'box' if rule.fallback == 'box' else 'inscribed ellipse'}" + ("; holes filled" if rule.fill_holes else "")
        )


@register_mode
class GrabCut(InsideBox):
    name = "grabcut"
    help = "that, refined with the image's colours (GrabCut seeded by the prediction)"
    needs_image = True
    params = {
        "sure": Param(0.9, "probability above which a pixel inside a box is certain foreground", low=0.0, high=1.0, open=True),
        "background": Param(0.0, "probability below which a pixel inside a box is certain background (0: GrabCut decides every box pixel)", low=0.0, high=1.0),
        "grabcut_iterations": Param(4, "OpenCV GrabCut iterations", low=1),
    }
    # colour refinement costs ~50 ms an image: 2 background seeds x 2 thresholds x 2 sure levels x 2 fill floors = 16 rules;
    # the seeded ones first, so that they win a tie (a flood costs far more than the seed: see the module's docstring)
    search = {"background": (0.02, 0.0), "threshold": (0.3, 0.5), "sure": (0.9, 0.95), "min_fill": (0.0, 0.2)}

    @classmethod
    def check(cls, rule: "RefineRule") -> None:
        if rule.sure < rule.threshold:
            raise ConfigError(f"refine rule 'sure' must be at least 'threshold' ({rule.threshold}) and below 1, got {rule.sure!r}.")
        if rule.background > rule.threshold:
            raise ConfigError(f"refine rule 'background' must be at most 'threshold' ({rule.threshold}), got {rule.background!r}.")

    @classmethod
    def foreground(cls, rule: "RefineRule", prob: np.ndarray, box: np.ndarray, image: np.ndarray | None) -> np.ndarray:
        return grabcut_foreground(image, box, prob, rule)

    @classmethod
    def seeds_text(cls, rule: "RefineRule") -> str:
        background = f", < {rule.background} sure background" if rule.background > 0 else ""
        return f"GrabCut inside the boxes seeded by the probability (> {rule.sure} sure, > {rule.threshold} probable foreground{background}), {rule.grabcut_iterations} iterations"


@register_mode
class Blend(RefineMode):
    name = "blend"
    help = "the seed's rule"
    params = {"blend_alpha": Param(0.5, "weight of the box", low=0.0, high=1.0)}

    @classmethod
    def apply(cls, rule: "RefineRule", prob: np.ndarray, box: np.ndarray, image: np.ndarray | None) -> Refined:
        value = rule.blend_alpha * box.astype(np.float32) + (1.0 - rule.blend_alpha) * prob
        mask = value > rule.threshold
        stats = [BoxStat(bb, int(region.sum()), float(mask[win][region].mean()), False) for win, region, bb in box_regions(box)]
        return Refined(mask.astype(np.uint8), value if rule.soft else None, stats)

    @classmethod
    def explain(cls, rule: "RefineRule") -> str:
        return f"mask = {rule.blend_alpha} * box + {1 - rule.blend_alpha:g} * probability > {rule.threshold}"


def refine_mode(name: str) -> type[RefineMode]:
    """The mode registered as ``name``; an unknown name is a ConfigError listing the valid ones."""
    if name not in REFINE_MODES:
        raise ConfigError(f"refine rule 'mode' must be one of {', '.join(REFINE_MODES)}, got {name!r}.")
    return REFINE_MODES[name]


def rule_parameters() -> dict[str, tuple[Param, list[str]]]:
    """Every parameter of every registered mode, in a rule dict's key order: (its Param, the modes that read it)."""
    found: dict[str, tuple[Param, list[str]]] = {}
    for mode in REFINE_MODES.values():
        for name, param in mode.parameters().items():
            found.setdefault(name, (param, []))[1].append(mode.name)
    order = [n for n in _DICT_ORDER if n in found] + [n for n in found if n not in _DICT_ORDER]
    return {name: found[name] for name in order}


# ---------------------------------------------------------------------------------- the rule
class RefineRule:
    """How a box mask and a probability map become a refined mask: a mode and the values of every
    parameter (defaults where not given; each checked). Immutable and hashable; its parameters
    read as attributes (``rule.threshold``)."""

    def __init__(self, mode: str = "inside_box", **values: Any) -> None:
        kind = refine_mode(mode)
        known = rule_parameters()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown refine rule key {unknown[0]!r}; valid: {', '.join(sorted(['mode', *known]))}.")
        cleaned = {name: param.clean(name, values.get(name, param.default)) for name, (param, _) in known.items()}
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "_values", cleaned)
        kind.check(self)

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"refine rule has no parameter {name!r}; its parameters: {', '.join(values)}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a refine rule is immutable; use rule.replace({name}=...)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RefineRule) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().items()))

    def __repr__(self) -> str:
        return f"RefineRule({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def __reduce__(self):
        return (RefineRule.from_dict, (self.to_dict(),))

    @property
    def kind(self) -> type[RefineMode]:
        """The mode's class."""
        return REFINE_MODES[self.mode]

    @property
    def needs_image(self) -> bool:
        return self.kind.needs_image

    def replace(self, **changes: Any) -> "RefineRule":
        return RefineRule.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict:
        """``{"mode": ..., <every parameter>: value}``: the form stored in state.json and manifests."""
        return {"mode": self.mode, **self._values}

    @classmethod
    def from_dict(cls, data: dict) -> "RefineRule":
        """A rule from :meth:`to_dict`'s form (a manifest's ``description`` is ignored); a missing
        parameter takes its default, an unknown one is a ConfigError listing the valid ones."""
        data = {k: v for k, v in data.items() if k != "description"}
        return cls(**data)

    def apply(self, prob: np.ndarray, box: np.ndarray, image: np.ndarray | None = None) -> Refined:
        return self.kind.apply(self, prob, box, image)

    def explain(self) -> str:
        """What the rule does, in words (the hybrid manifest's ``rule.description``)."""
        return self.kind.explain(self)

    def describe(self) -> str:
        """One line, e.g. ``grabcut, threshold 0.5, min_fill 0.2, fallback box, sure 0.9, background 0.02, grabcut_iterations 4``."""
        return self.kind.describe(self)


def describe(rule: "RefineRule | dict") -> str:
    """One line of a rule, or of a rule's dict as stored in state.json (see :meth:`RefineRule.describe`)."""
    return (rule if isinstance(rule, RefineRule) else RefineRule.from_dict(rule)).describe()


def refine(probability: np.ndarray, box: np.ndarray, rule: RefineRule | None = None, image: np.ndarray | None = None) -> Refined:
    """Apply ``rule`` to one image: ``probability`` float (H, W) in [0, 1], ``box`` 0/1 (H, W);
    ``image`` uint8 (H, W, 3), needed by the modes that say so (``grabcut``)."""
    rule = rule or RefineRule()
    prob = np.asarray(probability, dtype=np.float32)
    box = np.asarray(box) > 0
    if prob.shape != box.shape:
        raise ValueError(f"probability {prob.shape} and box mask {box.shape} differ in size")
    if rule.needs_image:
        if image is None:
            raise ConfigError(f"refine rule mode {rule.mode!r} needs the image (refine(prob, box, rule, image=rgb)).")
        if np.asarray(image).shape[:2] != box.shape:
            raise ValueError(f"image {np.asarray(image).shape[:2]} and box mask {box.shape} differ in size")
    return rule.apply(prob, box, image)


def changed_fraction(before: np.ndarray, after: np.ndarray) -> float:
    """Fraction of pixels whose label differs between two binary masks."""
    return float(np.count_nonzero((np.asarray(before) > 0) != (np.asarray(after) > 0))) / max(1, np.asarray(before).size)
