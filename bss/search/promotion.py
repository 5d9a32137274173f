"""Promotion: which evaluation of which trial becomes the iteration's model.

A rule is a small object registered by name in :data:`PROMOTION_RULES`; each has

* ``admissible(row)``: may this evaluation be promoted at all;
* ``objective(row)``: one number, what TPE and ASHA maximise and what picks the checkpoint
  *inside* a trial (the trial saves ``promote.pt`` whenever an evaluation scores higher);
* ``choose(candidates, teachers)``: the promoted trial, or None; ``near(candidates)``: the ones
  worth measuring as teachers first (``teachers``: their EVAL label IoU), if the rule compares
  teachers.

``guarded_recall`` (the default) promotes by EVAL Recall *among good segmenters*:

1. among the trials that finished an evaluation, those within ``margin`` of the best EVAL IoU;
2. where the dataset has box-only images and more than one model is left: each is measured as a
   teacher (its EVAL *label* IoU: the EVAL boxes refined with it, as H<n> would be), and those
   more than ``label_z`` paired standard errors of the per-image label IoU below the best one
   drop out (``label_z`` 0: this step is off);
3. of those, the highest EVAL Recall (ties: higher IoU, then the earlier trial).

Its objective is ``IoU + margin * Recall``: a model more than ``margin`` IoU behind another can
never score above it, so the search is steered toward good segmenters and Recall only separates
near-equals, as in step 3. A model that paints the whole box (or more) loses on IoU and cannot win.

Why step 2 (measured, issue 18): with a handful of EVAL images, models within the IoU margin are
near-equals on image-only figures, but not as teachers. Synthetic ``obstacle``, 18 hand labels,
the four trials of one search trained to the end: EVAL IoU 0.846 / 0.825 / 0.807 / 0.779 with
EVAL label IoU 0.946 / 0.915 / 0.928 / 0.917, and the H1 each would make scored 0.876 / 0.831 /
0.867 / 0.829 against the truth (60 held-out frames: 0.791 / 0.720 / 0.753 / 0.712). Recall alone
promoted the second (recall 0.898 against 0.861); the label IoU, anchored by the boxes, is a far
less noisy measurement (paired SE about 0.01 against 0.04 for image IoU) and ranks the teachers
as the truth does. On ``neu_scratches`` the two candidates' label IoU were 0.804 and 0.802 (within
the noise), and Recall chose as before.

The promoted model is judged on image-only EVAL figures, as it will be used on new footage where
there are no boxes. There is no box floor here: whether it may *teach* (refine the boxes into
H<n>) is judged like with like, by its EVAL *label* IoU against the boxes' own
(:attr:`bss.search.record.TeacherRecord.admissible`, in the stop rule). The box floor of earlier
versions threw good teachers away: where boxes are tight no model from few hand labels beats them
image-only, yet the same model refines them better than they are (issue 18: a real tile set,
boxes' EVAL IoU 0.750, best trial 0.61 image-only, label IoU 0.805 as a teacher).

``floor`` is the seed's rule: the best EVAL ``metric`` among evaluations whose EVAL
``floor_metric`` is at least ``floor``. Recall with a precision floor of 0.3 is won by models
that over-segment (measured in issue 9: promoted IoU 0.31-0.36 against 0.79 for a plain run);
it stays available by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from bss.config import METRICS
from bss.data.io import atomic_write_json, atomic_write_text, publish_copy
from bss.errors import BSSError, ConfigError


def _value(row: dict, metric: str) -> float:
    return float(row[f"eval_{metric}"])


@dataclass(frozen=True)
class PromotionRule:
    """Base: subclasses override ``admissible``, ``objective`` and (if needed) ``choose``."""

    metric: str = "recall"
    name = "base"

    def __post_init__(self):
        for label, value in self._metric_fields():
            if value not in METRICS:
                raise ConfigError(f"{label} must be one of {', '.join(METRICS)}, got {value!r}.")

    def _metric_fields(self):
        return (("--metric", self.metric),)

    def admissible(self, row: dict) -> bool:
        raise NotImplementedError

    def objective(self, row: dict) -> float:
        raise NotImplementedError

    def better(self, row: dict, than: dict | None) -> bool:
        """Whether ``row`` beats ``than`` inside one trial (the checkpoint to keep)."""
        return than is None or self.objective(row) > self.objective(than)

    def eligible(self, candidates: list["Candidate"]) -> list["Candidate"]:
        return [c for c in candidates if c.state in ("complete", "stopped") and c.best is not None and c.checkpoint and self.admissible(c.best)]

    def choose(self, candidates: list["Candidate"], teachers: "dict[int, TeacherScore] | None" = None) -> "Candidate | None":
        """The promoted trial; ``teachers`` (ordinal -> EVAL label IoU as a teacher) is used by
        rules that compare teachers (:attr:`compares_teachers`)."""
        eligible = self.eligible(candidates)
        # max() keeps the first of equal keys; candidates are in proposal order -> earlier trial wins
        return max(eligible, key=lambda c: self.objective(c.best)) if eligible else None

    @property
    def compares_teachers(self) -> bool:
        return False

    def near(self, candidates: list["Candidate"]) -> list["Candidate"]:
        """The candidates worth measuring as teachers before choosing (none by default)."""
        return []

    def describe(self) -> str:
        return self.name

    def floor_text(self) -> str:
        """What an admissible model must reach, for messages."""
        raise NotImplementedError


@dataclass(frozen=True)
class GuardedRecall(PromotionRule):
    """Best EVAL Recall among models within ``margin`` of the best EVAL IoU."""

    margin: float = 0.03
    label_z: float = 0.0  # step 2: paired standard errors of EVAL label IoU a candidate may trail by (0: off)
    name = "guarded_recall"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= float(self.margin) <= 1.0:
            raise ConfigError(f"--margin must be between 0 and 1 (an IoU difference), got {self.margin!r}.")
        if not float(self.label_z) >= 0.0:
            raise ConfigError(f"--noise-z must be 0 or more (standard errors), got {self.label_z!r}.")

    @property
    def compares_teachers(self) -> bool:
        return self.label_z > 0

    def admissible(self, row: dict) -> bool:
        return True  # every finished evaluation: how good a teacher it is, is judged as a teacher

    def objective(self, row: dict) -> float:
        return _value(row, "iou") + self.margin * _value(row, self.metric)

    def near(self, candidates: list["Candidate"]) -> list["Candidate"]:
        """Step 1: the eligible models within ``margin`` of the best EVAL IoU."""
        eligible = self.eligible(candidates)
        if not eligible:
            return []
        best_iou = max(_value(c.best, "iou") for c in eligible)
        return [c for c in eligible if _value(c.best, "iou") >= best_iou - self.margin - 1e-12]

    def choose(self, candidates, teachers: "dict[int, TeacherScore] | None" = None):
        near = self.near(candidates)
        if not near:
            return None
        if teachers and self.compares_teachers:
            near = as_good_teachers(near, teachers, self.label_z)
        return max(near, key=lambda c: (_value(c.best, self.metric), _value(c.best, "iou")))

    def describe(self) -> str:
        guard = f", whose EVAL label IoU as teachers is within {self.label_z:g} paired SEs of the best one's" if self.compares_teachers else ""
        return f"best EVAL {self.metric} among models within {self.margin:g} of the best EVAL IoU{guard}"

    def floor_text(self) -> str:
        return "a finished EVAL evaluation"


@dataclass(frozen=True)
class FloorRule(PromotionRule):
    """The seed's rule: best EVAL ``metric`` with EVAL ``floor_metric`` >= ``floor`` (ties: IoU)."""

    floor_metric: str = "precision"
    floor: float = 0.3
    tie_metric: str = "iou"
    name = "floor"

    def _metric_fields(self):
        return (("--metric", self.metric), ("--floor-metric", self.floor_metric), ("tie metric", self.tie_metric))

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= float(self.floor) <= 1.0:
            raise ConfigError(f"--floor must be between 0 and 1 (a {self.floor_metric} value), got {self.floor!r}.")

    def admissible(self, row: dict) -> bool:
        return _value(row, self.floor_metric) >= self.floor

    def key(self, row: dict) -> tuple:
        return (self.admissible(row), _value(row, self.metric), _value(row, self.tie_metric))

    def objective(self, row: dict) -> float:
        """The metric if admissible, else in [-1, 0): rises as the floor metric nears the floor."""
        if self.admissible(row):
            return _value(row, self.metric)
        return _value(row, self.floor_metric) / max(self.floor, 1e-9) - 1.0

    def better(self, row: dict, than: dict | None) -> bool:
        return than is None or self.key(row) > self.key(than)

    def choose(self, candidates, teachers=None):
        eligible = self.eligible(candidates)
        return max(eligible, key=lambda c: self.key(c.best)) if eligible else None

    def describe(self) -> str:
        return f"best EVAL {self.metric} with EVAL {self.floor_metric} >= {self.floor:g} (ties: {self.tie_metric})"

    def floor_text(self) -> str:
        return f"EVAL {self.floor_metric} >= {self.floor:g}"


@dataclass(frozen=True)
class TeacherScore:
    """A candidate measured as a teacher on EVAL (:func:`bss.hybrid.teacher_quality.measure_teacher`)."""

    label_iou: float  # over all EVAL pixels, with the rule chosen for this model
    image_iou: tuple[float, ...]  # each EVAL image's label IoU, in EVAL's order


def as_good_teachers(near: list["Candidate"], teachers: dict[int, "TeacherScore"], z: float) -> list["Candidate"]:
    """Step 2: the candidates (by ordinal in ``teachers``) whose EVAL label IoU is within ``z``
    paired standard errors of the best one's; a candidate not measured, or one whose noise cannot
    be estimated (fewer than 2 EVAL images), stays."""
    from bss.search.stop import paired_se

    measured = [c for c in near if c.ordinal in teachers]
    if len(measured) < 2:
        return near
    top = teachers[max(measured, key=lambda c: teachers[c.ordinal].label_iou).ordinal]

    def keeps(c: "Candidate") -> bool:
        score = teachers.get(c.ordinal)
        if score is None:
            return True
        se = paired_se(top.image_iou, score.image_iou)
        return se is None or top.label_iou - score.label_iou <= z * se + 1e-12

    return [c for c in near if keeps(c)]


PROMOTION_RULES = {rule.name: rule for rule in (GuardedRecall, FloorRule)}


def build_promotion_rule(name: str, **kwargs) -> PromotionRule:
    """The rule registered as ``name``; keyword arguments it does not take are ignored."""
    if name not in PROMOTION_RULES:
        raise ConfigError(f"--promotion must be one of {', '.join(PROMOTION_RULES)}, got {name!r}.")
    cls = PROMOTION_RULES[name]
    fields = set(cls.__dataclass_fields__)
    return cls(**{k: v for k, v in kwargs.items() if k in fields and v is not None})


@dataclass
class Candidate:
    """A finished trial as promotion sees it."""

    ordinal: int  # 1-based, in the order the searcher proposed it
    key: str
    state: str  # complete | stopped | failed | lost
    params: dict
    best: dict | None  # the trial's best evaluation row under the rule
    checkpoint: str | None  # promote.pt of that evaluation
    config: dict | None = None
    run_id: str | None = None
    error: str | None = None
    evaluations: int = 0
    train_seconds: float = 0.0
    setup_seconds: float | None = None
    history: list = field(default_factory=list)
    where: dict = field(default_factory=dict)  # host, node_id, node_name of the attempt that counts; lost_attempts


def choose(candidates: list[Candidate], rule: PromotionRule, teachers: dict[int, TeacherScore] | None = None) -> Candidate | None:
    """The promoted trial, or None when no trial has an admissible evaluation."""
    return rule.choose(candidates, teachers)


@dataclass
class Promoted:
    iteration: int
    ordinal: int
    key: str
    checkpoint: str
    config_path: str
    metrics: dict  # eval_* of the promoted evaluation
    params: dict
    epoch: float
    run_id: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def promote(candidate: Candidate, iteration: int, dest: str | Path) -> Promoted:
    """Copy the winner's checkpoint and resolved config to ``dest`` (``best.pt``, ``config.yaml``)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if not candidate.checkpoint or not Path(candidate.checkpoint).is_file():
        raise BSSError(
            f"the checkpoint of trial {candidate.ordinal} ({candidate.checkpoint}) is missing; with a Ray cluster, --run-dir must be on storage every node can reach."
        )
    publish_copy(candidate.checkpoint, dest / "best.pt")
    config = dict(candidate.config or {})
    atomic_write_text(dest / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    metrics = {k: float(v) for k, v in candidate.best.items() if k.startswith("eval_") and isinstance(v, (int, float))}
    promoted = Promoted(
        iteration,
        candidate.ordinal,
        candidate.key,
        str(dest / "best.pt"),
        str(dest / "config.yaml"),
        metrics,
        candidate.params,
        float(candidate.best.get("epoch", 0.0)),
        candidate.run_id,
    )
    atomic_write_json(dest / "promotion.json", promoted.to_dict())
    return promoted
