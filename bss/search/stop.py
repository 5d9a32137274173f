"""The stop rule: after each iteration, is its model a new best, does it teach the next H<n>, and
does the loop go on? Every stop of the loop is decided here, once, with the reason.

A rule is an object registered by name in :data:`STOP_RULES` with one pure method,
``decide(history) -> Decision``. :class:`History` holds one :class:`Outcome` per iteration so
far (the last one is being decided) and what the rule needs besides: the label IoU the next
H<n> must beat, the iterations and the time left. So a rule is tested with crafted numbers alone.

``guarded`` (the default) judges two things, like with like:

The **model** (image-only EVAL figures: what ``predict.py`` uses on new footage, where there are
no boxes). It never calls an iteration better, nor keeps it as final, when its EVAL IoU fell by
more than ``tolerance``, whatever its Recall did:

* the first iteration is the baseline;
* no model (no trial finished an evaluation) -> stop (``no_model``);
* EVAL IoU more than ``tolerance`` below the best IoU of any kept iteration -> stop (``iou_drop``);
* higher EVAL ``metric`` (Recall) than the best, or an IoU gain of more than ``tolerance`` ->
  a new best (``improved``);
* otherwise a tie (EVAL IoU within the tolerance of the best). With ``ties="labels"`` (the
  default) a tie goes to the model trained on the better labels: an iteration whose training
  set is a later H<n> than the best's (every H<n> is made only when its teacher's EVAL label IoU
  beat the labels before it, and H1 adds the box-only images to BASELINE) is a new best
  (``better_labels``). Measured why (issue 18, ``bench/student_recipe.py``): with the few EVAL
  images of a real split (6-7 of 30-36 hand labels), EVAL cannot rank models that close: three
  teacher seeds on ``obstacle`` ranked 0.833 > 0.824 > 0.803 on EVAL and 0.772 < 0.752 > 0.820
  ... on 60 held-out images, while every student trained on H1 beat the teacher on those 60
  (7 of 7 runs: 0.797-0.849 against 0.772; ``neu_patches`` 3 of 3, ``neu_scratches`` 3 of 3).
  ``ties="earlier"``: the earlier model stays (``no_gain``);
* after ``patience`` iterations in a row without a new best -> stop (``patience``).

**The tolerance knows EVAL's noise.** ``tolerance`` is the least difference that counts; where
each iteration's per-image EVAL IoU is known (``Outcome.image_iou``, the same EVAL images in the
same order), the tolerance of a comparison is ``max(tolerance, noise_z x SE)``, SE the standard
error of the mean per-image IoU difference between this model and the best kept (a paired
comparison). Measured why (``bench/student_recipe.py --hand-labels 30``): on 6 EVAL images the
H1 students scored 0.038-0.047 below their teacher, with a paired SE of 0.034-0.042, while on 60
held-out images they were 0.025-0.077 above it. ``noise_z`` 0: the fixed tolerance alone.

The **teacher** (a new best, when iterations are left): it refines the next H<n> only when its
EVAL *label* IoU (the EVAL boxes refined by it, exactly as H<n> will be) beats that of the
labels the loop trains on now: the EVAL boxes' own for H1, the teacher that made H<k> for
H<k+1>, there by more than ``noise_z`` paired standard errors of the two teachers' per-image
EVAL label IoU (measured why: on ``neu_scratches`` with 7 EVAL images, a teacher 0.004 above
H1's made an H2 whose labels were 0.014 *worse* against the truth, and the model trained on it,
kept as final on a Recall gain, scored 0.025 below the H1 student on 60 held-out photos). Otherwise no H<n> is made and the loop stops
(``labels_not_better``); its model is still the final model when it is the best.

The **budget**: no iteration starts with less than ``min_search_seconds`` of ``--budget`` left
(``budget``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bss.errors import ConfigError

REASONS = ("baseline", "improved", "better_labels", "no_gain", "no_model", "iou_drop", "patience", "labels_not_better", "budget")


@dataclass(frozen=True)
class Outcome:
    """One iteration as the stop rule sees it."""

    iteration: int
    metrics: dict | None  # the promoted model's EVAL figures {"eval_iou": ..., "eval_recall": ...}; None: no model
    label_iou: float | None = None  # its EVAL label IoU as a teacher (None: not measured)
    new_best: bool = False  # as decided earlier (ignored for the last entry)
    labels_rank: int = 0  # how far its training labels came: 0 BASELINE, n the run's n-th H<n> (each made only when better)
    trained_on: str = ""  # its training set's name, for the verdict
    image_iou: tuple[float, ...] | None = None  # per-image EVAL IoU of its model, in EVAL's order (None: not measured)
    label_image_iou: tuple[float, ...] | None = None  # per-image EVAL label IoU as a teacher, in EVAL's order


@dataclass(frozen=True)
class History:
    """What the rule decides on: the outcomes so far, the last being decided."""

    outcomes: tuple[Outcome, ...]
    labels_to_beat: float = 0.0  # EVAL label IoU of the labels trained on now (the boxes' own for H1)
    labels_name: str = "the EVAL boxes"  # what those labels are, for the verdict
    iterations_left: int = 1  # iterations the loop may run after this one (0: nothing to teach for)
    time_left: float | None = None  # seconds of --budget left (None: no budget)
    labels_image_iou: tuple[float, ...] | None = None  # per image, when those labels came from a teacher (None: the boxes)

    @property
    def current(self) -> Outcome:
        return self.outcomes[-1]


@dataclass(frozen=True)
class Decision:
    verdict: str
    stop: bool
    new_best: bool
    value: float | None = None  # the iteration's EVAL metric
    make_hybrid: bool = False  # this iteration's model refines the next H<n>
    reason: str = ""  # one of REASONS

    @property
    def stop_text(self) -> str | None:
        """Why the loop stops ("stop: ..."), without what was decided before it; None: it goes on."""
        at = self.verdict.find("stop: ")
        return self.verdict[at:] if self.stop and at >= 0 else None

    def then_stop(self, reason: str, why: str) -> "Decision":
        return replace(self, verdict=f"{self.verdict}; then stop: {why}", stop=True, make_hybrid=False, reason=reason)


class StopRule:
    """A stop rule: a pure function of the run's history. Add one by subclassing, overriding
    :meth:`decide` (and :meth:`describe`), and registering it in :data:`STOP_RULES`."""

    name = ""

    def decide(self, history: History) -> Decision:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class GuardedStop(StopRule):
    metric: str = "recall"
    tolerance: float = 0.02
    patience: int = 1
    min_search_seconds: float = 60.0
    ties: str = "labels"  # labels: a tie goes to the model trained on better labels; earlier: to the earlier model
    noise_z: float = 2.0  # the tolerance of a comparison is at least this many paired standard errors (0: off)
    name = "guarded"

    def __post_init__(self):
        if self.tolerance < 0:
            raise ConfigError(f"--tolerance must be 0 or more, got {self.tolerance}.")
        if self.patience < 1:
            raise ConfigError(f"--patience must be at least 1, got {self.patience}.")
        if not self.noise_z >= 0:
            raise ConfigError(f"--noise-z must be 0 or more (standard errors), got {self.noise_z}.")
        if self.ties not in TIES:
            raise ConfigError(f"--ties must be one of {', '.join(TIES)}, got {self.ties!r}.")

    def decide(self, history: History) -> Decision:
        decision = self.judge_model(history.outcomes)
        if decision.stop:
            return decision
        if decision.new_best and history.iterations_left > 0:
            decision = self.judge_teacher(history, decision)
        if not decision.stop and history.iterations_left > 0 and history.time_left is not None and history.time_left < self.min_search_seconds:
            return decision.then_stop(
                "budget", f"the --budget is spent ({max(0.0, history.time_left):.0f} s left, a search needs {self.min_search_seconds:g} s)"
            )
        return decision

    def judge_model(self, outcomes: tuple[Outcome, ...]) -> Decision:
        """The iteration's model on image-only EVAL figures, against the best kept so far."""
        *earlier, current = outcomes
        kept = [o for o in earlier if o.new_best and o.metrics]
        m = current.metrics
        if m is None:
            return Decision("stop: no model (no trial finished an evaluation)", True, False, None, reason="no_model")
        value = float(m[f"eval_{self.metric}"])
        if not kept:
            return Decision("baseline", False, True, value, reason="baseline")
        best_kept = kept[-1]
        best = best_kept.metrics
        top_iou = max(float(o.metrics["eval_iou"]) for o in kept)
        iou, best_value = float(m["eval_iou"]), float(best[f"eval_{self.metric}"])
        tolerance, why = self.tolerance_of(current, best_kept)
        if iou < top_iou - tolerance:
            return Decision(f"stop: EVAL IoU {iou - top_iou:+.3f} below the best (tolerance {why})", True, False, value, reason="iou_drop")
        if value > best_value + 1e-9 or iou > float(best["eval_iou"]) + tolerance:
            return Decision(
                f"improved ({self.metric} {value - best_value:+.3f}, IoU {iou - float(best['eval_iou']):+.3f})", False, True, value, reason="improved"
            )
        if self.ties == "labels" and current.labels_rank > best_kept.labels_rank:
            return Decision(
                f"kept: a tie on EVAL ({self.metric} {value - best_value:+.3f}, IoU {iou - float(best['eval_iou']):+.3f}, within {why}) "
                f"goes to the model trained on better labels ({labels_text(current)} over {labels_text(best_kept)})",
                False,
                True,
                value,
                reason="better_labels",
            )
        no_gain = 1
        for o in reversed(earlier):
            if o.new_best:
                break
            no_gain += 1
        if no_gain >= self.patience:
            return Decision(f"stop: no gain for {no_gain} iteration(s) (patience {self.patience})", True, False, value, reason="patience")
        return Decision(f"no gain ({self.metric} {value - best_value:+.3f}, {no_gain}/{self.patience})", False, False, value, reason="no_gain")

    def tolerance_of(self, current: Outcome, best: Outcome) -> tuple[float, str]:
        """The tolerance of comparing ``current`` with ``best``, and how it was set (for verdicts)."""
        se = paired_se(current.image_iou, best.image_iou)
        if se is None or self.noise_z * se <= self.tolerance:
            return self.tolerance, f"{self.tolerance:g}"
        n = len(current.image_iou or ())
        return self.noise_z * se, f"{self.noise_z * se:.3f}: {self.noise_z:g} x the paired SE {se:.3f} of {n} EVAL images"

    def judge_teacher(self, history: History, decision: Decision) -> Decision:
        """A new best teaches the next H<n> only when its EVAL label IoU beats the current labels'."""
        label_iou = history.current.label_iou
        margin, why = self.labels_margin(history)
        if label_iou is not None and label_iou > history.labels_to_beat + margin:
            return replace(decision, make_hybrid=True)
        shown = "not measured" if label_iou is None else f"{label_iou:.3f}"
        return decision.then_stop(
            "labels_not_better",
            f"its EVAL label IoU as a teacher ({shown}) does not beat {history.labels_name} ({history.labels_to_beat:.3f}){why}; no H<n> is made",
        )

    def labels_margin(self, history: History) -> tuple[float, str]:
        """How much a new teacher must beat the teacher of the current H<n> by: ``noise_z`` paired
        standard errors of their per-image EVAL label IoU (0 against the boxes, and unmeasured)."""
        se = paired_se(history.current.label_image_iou, history.labels_image_iou) if self.noise_z else None
        if not se:
            return 0.0, ""
        n = len(history.labels_image_iou or ())
        return self.noise_z * se, f" by more than the noise ({self.noise_z * se:.3f}: {self.noise_z:g} x the paired SE {se:.3f} of {n} EVAL images)"

    def describe(self) -> str:
        return (
            f"a new best needs a higher EVAL {self.metric} (or EVAL IoU +{self.tolerance:g}) without EVAL IoU falling more than "
            f"{self.tolerance:g}"
            + (f" (or {self.noise_z:g} paired standard errors of the per-image EVAL IoU, if more)" if self.noise_z else "")
            + ("; within that, a tie goes to the model trained on better labels" if self.ties == "labels" else "")
            + f"; an IoU drop beyond that stops, and so do {self.patience} iteration(s) without gain; "
            "a new best refines the next H<n> only if its EVAL label IoU beats the current labels'"
        )


TIES = ("labels", "earlier")


def paired_se(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> float | None:
    """Standard error of the mean of ``a - b`` (per-image figures of two models on the same
    images); None without two comparable lists of at least 2 images."""
    if a is None or b is None or len(a) != len(b) or len(a) < 2:
        return None
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return (variance / len(diffs)) ** 0.5


def labels_text(outcome: Outcome) -> str:
    if outcome.trained_on:
        return outcome.trained_on
    return "BASELINE" if outcome.labels_rank == 0 else f"the run's hybrid number {outcome.labels_rank}"


STOP_RULES = {rule.name: rule for rule in (GuardedStop,)}


def build_stop_rule(name: str, **kwargs):
    if name not in STOP_RULES:
        raise ConfigError(f"--stop must be one of {', '.join(STOP_RULES)}, got {name!r}.")
    cls = STOP_RULES[name]
    return cls(**{k: v for k, v in kwargs.items() if k in cls.__dataclass_fields__ and v is not None})
