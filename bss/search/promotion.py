"""Promotion: which evaluation of which trial becomes the iteration's model.

The rule: maximise the EVAL ``metric`` (recall by default) among evaluations whose EVAL
``floor_metric`` (precision by default) is at least ``floor``; ties go to the higher IoU, then to
the earlier trial. The floor is what keeps a model that calls every pixel foreground (recall 1.0,
precision = the foreground share) from winning.

The same rule picks the checkpoint *inside* a trial (the trial saves ``promote.pt`` whenever an
evaluation beats its previous best under the rule) and the trial *across* trials, so the
promoted figures are exactly those of the promoted weights. Searchers and ASHA see one number,
:meth:`PromotionRule.objective`: the metric when the floor is met, otherwise a value below 0 that
grows as the floor metric approaches the floor (so TPE is pulled towards admissible models).
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from bss.config import METRICS
from bss.errors import BSSError, ConfigError
from bss.search.state import atomic_write_json


@dataclass(frozen=True)
class PromotionRule:
    metric: str = "recall"
    floor_metric: str = "precision"
    floor: float = 0.3
    tie_metric: str = "iou"

    def __post_init__(self):
        for name, value in (("--metric", self.metric), ("--floor-metric", self.floor_metric), ("tie metric", self.tie_metric)):
            if value not in METRICS:
                raise ConfigError(f"{name} must be one of {', '.join(METRICS)}, got {value!r}.")
        if not 0.0 <= float(self.floor) <= 1.0:
            raise ConfigError(f"--floor must be between 0 and 1 (a {self.floor_metric} value), got {self.floor!r}.")

    def admissible(self, row: dict) -> bool:
        return float(row[f"eval_{self.floor_metric}"]) >= self.floor

    def key(self, row: dict) -> tuple:
        """Sort key: admissible first, then the metric, then the tie metric."""
        return (self.admissible(row), float(row[f"eval_{self.metric}"]), float(row[f"eval_{self.tie_metric}"]))

    def objective(self, row: dict) -> float:
        """One number for TPE and ASHA: the metric if admissible, else in [-1, 0)."""
        if self.admissible(row):
            return float(row[f"eval_{self.metric}"])
        return float(row[f"eval_{self.floor_metric}"]) / max(self.floor, 1e-9) - 1.0

    def better(self, row: dict, than: dict | None) -> bool:
        return than is None or self.key(row) > self.key(than)

    def describe(self) -> str:
        return f"best EVAL {self.metric} with EVAL {self.floor_metric} >= {self.floor:g} (ties: {self.tie_metric})"


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


def choose(candidates: list[Candidate], rule: PromotionRule) -> Candidate | None:
    """The promoted trial, or None when no trial has an admissible evaluation."""
    eligible = [c for c in candidates if c.state in ("complete", "stopped") and c.best is not None and c.checkpoint and rule.admissible(c.best)]
    if not eligible:
        return None
    # max() keeps the first of equal keys; candidates are in proposal order -> earlier trial wins
    return max(eligible, key=lambda c: rule.key(c.best))


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
        raise BSSError(f"the checkpoint of trial {candidate.ordinal} ({candidate.checkpoint}) is missing; with a Ray cluster, --run-dir must be on storage every node can reach.")
    tmp = dest / "best.pt.tmp"
    shutil.copyfile(candidate.checkpoint, tmp)
    tmp.replace(dest / "best.pt")
    config = dict(candidate.config or {})
    (dest / "config.yaml.tmp").write_text(yaml.safe_dump(config, sort_keys=False))
    (dest / "config.yaml.tmp").replace(dest / "config.yaml")
    metrics = {k: float(v) for k, v in candidate.best.items() if k.startswith("eval_") and isinstance(v, (int, float))}
    promoted = Promoted(iteration, candidate.ordinal, candidate.key, str(dest / "best.pt"), str(dest / "config.yaml"), metrics, candidate.params, float(candidate.best.get("epoch", 0.0)), candidate.run_id)
    atomic_write_json(dest / "promotion.json", promoted.to_dict())
    return promoted
