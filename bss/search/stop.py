"""Stop rules: after each iteration, is its promoted model a new best, and does the loop go on?

A rule is an object registered by name in :data:`STOP_RULES` with one pure method,
``decide(history) -> Decision``: ``history`` holds one :class:`Outcome` per iteration so far
(the last one is being decided), and the rule reads everything it needs from it (the best so
far, how many iterations in a row brought no gain), so it is tested with crafted numbers alone.

``guarded`` (the default) never calls an iteration better, nor keeps it as final, when its EVAL
IoU fell by more than ``tolerance``, whatever its Recall did:

* the first iteration is the baseline;
* no admissible model -> stop;
* EVAL IoU more than ``tolerance`` below the best IoU of any kept iteration -> stop;
* higher EVAL ``metric`` (Recall) than the best, or an IoU gain of more than ``tolerance`` ->
  a new best (it refines the next H<n>);
* otherwise no gain; after ``patience`` such iterations in a row -> stop.
"""

from __future__ import annotations

from dataclasses import dataclass

from bss.errors import ConfigError


@dataclass(frozen=True)
class Outcome:
    """One iteration as the stop rule sees it: its promoted EVAL metrics (None: nothing promoted)."""

    iteration: int
    metrics: dict | None  # {"eval_iou": ..., "eval_recall": ..., ...}
    new_best: bool = False  # as decided earlier (ignored for the last entry)


@dataclass(frozen=True)
class Decision:
    verdict: str
    stop: bool
    new_best: bool
    value: float | None = None  # the iteration's EVAL metric

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "stop": self.stop, "new_best": self.new_best, "value": self.value}


class StopRule:
    """A stop rule: a pure function of the run's history. Add one by subclassing, overriding
    :meth:`decide` (and :meth:`describe`), and registering it in :data:`STOP_RULES`."""

    name = ""

    def decide(self, history: list[Outcome]) -> Decision:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class GuardedStop(StopRule):
    metric: str = "recall"
    tolerance: float = 0.02
    patience: int = 1
    name = "guarded"

    def __post_init__(self):
        if self.tolerance < 0:
            raise ConfigError(f"--tolerance must be 0 or more, got {self.tolerance}.")
        if self.patience < 1:
            raise ConfigError(f"--patience must be at least 1, got {self.patience}.")

    def decide(self, history: list[Outcome]) -> Decision:
        *earlier, current = history
        kept = [o for o in earlier if o.new_best and o.metrics]
        m = current.metrics
        value = None if m is None else float(m[f"eval_{self.metric}"])
        if not kept:
            if m is None:
                return Decision("stop: no admissible model", True, False, None)
            return Decision("baseline", False, True, value)
        if m is None:
            return Decision("stop: no admissible model", True, False, None)
        best = kept[-1].metrics
        top_iou = max(float(o.metrics["eval_iou"]) for o in kept)
        iou, best_value = float(m["eval_iou"]), float(best[f"eval_{self.metric}"])
        if iou < top_iou - self.tolerance:
            return Decision(f"stop: EVAL IoU {iou - top_iou:+.3f} below the best (tolerance {self.tolerance:g})", True, False, value)
        if value > best_value + 1e-9 or iou > float(best["eval_iou"]) + self.tolerance:
            return Decision(f"improved ({self.metric} {value - best_value:+.3f}, IoU {iou - float(best['eval_iou']):+.3f})", False, True, value)
        no_gain = 1
        for o in reversed(earlier):
            if o.new_best:
                break
            no_gain += 1
        if no_gain >= self.patience:
            return Decision(f"stop: no gain for {no_gain} iteration(s) (patience {self.patience})", True, False, value)
        return Decision(f"no gain ({self.metric} {value - best_value:+.3f}, {no_gain}/{self.patience})", False, False, value)

    def describe(self) -> str:
        return (
            f"a new best needs a higher EVAL {self.metric} (or EVAL IoU +{self.tolerance:g}) without EVAL IoU falling more than "
            f"{self.tolerance:g}; an IoU drop beyond that stops, and so do {self.patience} iteration(s) without gain"
        )


STOP_RULES = {rule.name: rule for rule in (GuardedStop,)}


def build_stop_rule(name: str, **kwargs):
    if name not in STOP_RULES:
        raise ConfigError(f"--stop must be one of {', '.join(STOP_RULES)}, got {name!r}.")
    cls = STOP_RULES[name]
    return cls(**{k: v for k, v in kwargs.items() if k in cls.__dataclass_fields__ and v is not None})
