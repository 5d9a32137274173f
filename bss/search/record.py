"""The loop's record: what ``<run-dir>/state.json`` holds, as types.

:class:`LoopRecord` is the whole file; it holds one :class:`IterationRecord` per iteration, and
each stage of :mod:`bss.search.stages` fills in its own part (``search``, ``promoted``,
``teacher``, ``decision``, ``hybrid``, ``test``). A part that is None has not run yet: resume
skips every part that is set. The JSON is the same as the untyped dicts of earlier versions
(a part not set yet is left out), so a ``state.json`` written before still resumes; one that does not
fit is refused in one line by :func:`load_record`.

Nothing outside this module reads the record by string keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from bss.errors import BSSError
from bss.search.fingerprint import Fingerprint
from bss.search.plan import Plan
from bss.search.promotion import Promoted
from bss.search.stop import Decision

VERSION = 1


# --------------------------------------------------------------------------- (de)serialisation


def to_json(record: Any) -> Any:
    """A record as plain JSON values; an optional field that is None (not set yet) is left out."""
    if dataclasses.is_dataclass(record):
        return {f.name: to_json(v) for f in dataclasses.fields(record) if (v := getattr(record, f.name)) is not None or f.default is not None}
    if isinstance(record, dict):
        return {k: to_json(v) for k, v in record.items()}
    if isinstance(record, (list, tuple)):
        return [to_json(v) for v in record]
    return record


def _convert(kind: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        real = [a for a in typing.get_args(kind) if a is not type(None)]
        return _convert(real[0], value, where) if len(real) == 1 else value
    if origin is list:
        (item,) = typing.get_args(kind) or (Any,)
        if not isinstance(value, list):
            raise ValueError(f"{where}: a list expected, found {type(value).__name__}")
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(kind):
        return from_json(kind, value, where)
    return value


def from_json(cls: type, data: Any, where: str = "") -> Any:
    """The dataclass ``cls`` from JSON values (a ValueError names the place that does not fit)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: an object expected, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown key {unknown[0]!r}")
    try:
        return cls(**{k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()})
    except TypeError as exc:  # a required field missing
        raise ValueError(f"{where or cls.__name__}: {exc}") from None


# --------------------------------------------------------------------------- the parts


@dataclass
class DataRecord:
    """The source dataset as the loop found it (written once, before any training)."""

    generated: bool = False  # the synthetic default was generated
    splits_made: bool = False
    counts: dict = field(default_factory=dict)  # split name -> images
    fingerprint: Fingerprint | None = None
    box_only: int | None = None  # images with a box mask and no hand label (None: not counted, older runs)
    plan: Plan | None = None  # scale, frame, whole or patches (None: a run from before the plan: the fingerprint's input_size)


@dataclass
class BoxScores:
    """The EVAL box masks scored against the exact masks, as if they were a model's output."""

    iou: float
    dice: float
    recall: float
    precision: float


@dataclass
class TrialRecord:
    ordinal: int
    key: str
    state: str  # complete | stopped | failed | lost
    params: dict
    evaluations: int = 0
    best: dict | None = None  # the trial's best evaluation row (eval_iou, eval_recall, ...)
    error: str | None = None
    run_id: str | None = None
    host: str | None = None
    node_id: str | None = None
    node_name: str | None = None
    lost_attempts: list = field(default_factory=list)
    eval_label_iou: float | None = None  # measured as a teacher on EVAL (promotion step 2), where it was near the best


@dataclass
class SearchRecord:
    mode: str  # search | retrain
    wall_seconds: float
    counts: dict  # complete/stopped/failed/lost -> trials
    trials: list[TrialRecord] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    done: bool = True

    @property
    def ok(self) -> int:
        return self.counts.get("complete", 0) + self.counts.get("stopped", 0)


@dataclass
class TeacherRecord:
    """The promoted model as a teacher on EVAL (:class:`bss.hybrid.teacher_quality.TeacherQuality`)."""

    images: int
    box_iou_pixels: float  # the EVAL boxes' own label IoU
    box_iou_per_image: float
    raw_iou_pixels: float  # the raw prediction, boxes ignored
    label_iou_pixels: float  # boxes refined by this model with the chosen rule: the headline
    label_iou_per_image: float
    default_rule_iou_pixels: float
    rule: dict  # the chosen RefineRule
    top_rules: list = field(default_factory=list)
    rules_tried: int = 0
    seconds: float = 0.0
    label_image_iou: list[float] | None = None  # each EVAL image's label IoU with the chosen rule (the stop rule's noise estimate)
    logged: bool = True  # its figures are in MLflow (False: measured at promotion, logged by the teacher stage)

    @property
    def admissible(self) -> bool:
        """A teacher is worth a H<n> only when its refined EVAL labels beat the EVAL boxes."""
        return self.label_iou_pixels > self.box_iou_pixels


@dataclass
class HybridRecord:
    """The training set of the next iteration: a new H<n> (``name``), the same set (``reused``),
    or none (``refused``, why)."""

    done: bool = False
    number: int | None = None  # fixed before the folder is made (a resume never makes a second)
    checkpoint_sha256: str | None = None
    path: str | None = None
    name: str | None = None
    images: int | None = None
    label_quality: dict | None = None  # against truth/, where the source keeps it
    seconds: float | None = None
    reused: str | None = None
    refused: str | None = None


@dataclass
class IterationRecord:
    index: int
    train_dataset: str | None = None
    run_id: str | None = None  # the iteration's MLflow run
    search: SearchRecord | None = None
    promoted: Promoted | None = None  # None after a search: no trial finished an evaluation
    teacher: TeacherRecord | None = None
    decision: Decision | None = None
    hybrid: HybridRecord | None = None
    test: dict | None = None  # TEST scores of the promoted model (after the last decision)
    eval_image_iou: list[float] | None = None  # per-image EVAL IoU of the promoted model (the stop rule's noise estimate)
    done: bool = False

    @property
    def searched(self) -> bool:
        return self.search is not None and self.search.done


@dataclass
class BestRecord:
    """The final model so far: the best iteration by EVAL (image-only figures)."""

    iteration: int
    value: float | None
    checkpoint: str


@dataclass
class RegisteredModel:
    name: str
    version: str
    alias: str
    iteration: int


@dataclass
class LoopRecord:
    settings: dict  # LoopSettings.to_dict(), frozen at the start
    version: int = VERSION
    parent_run_id: str | None = None  # the loop's MLflow run
    tracking_uri: str | None = None  # the store it went to, made absolute (drivers/ui.py --run-dir opens it)
    data: DataRecord | None = None
    boxes_eval: BoxScores | None = None
    iterations: list[IterationRecord] = field(default_factory=list)
    best: BestRecord | None = None
    stopped: str | None = None  # why the loop stopped early
    report: dict | None = None  # report file kind -> path
    registered_model: RegisteredModel | None = None
    finished: bool = False

    def iteration(self, index: int) -> IterationRecord:
        """Iteration ``index``'s record, created (with those before it) when missing."""
        while len(self.iterations) <= index:
            self.iterations.append(IterationRecord(index=len(self.iterations)))
        return self.iterations[index]

    def to_json(self) -> dict:
        return to_json(self)


def load_record(data: Any, path: str = "state.json") -> LoopRecord:
    """A :class:`LoopRecord` from a parsed ``state.json``; one that does not fit is refused in one line."""
    version = data.get("version") if isinstance(data, dict) else "?"
    if version != VERSION:
        raise BSSError(f"{path}: unknown state format (version {version}); start a new run with another --run-dir.")
    try:
        return from_json(LoopRecord, data)
    except ValueError as exc:
        raise BSSError(f"{path}: not a state file this version of BSS can resume ({exc}); start a new run with another --run-dir.") from None
