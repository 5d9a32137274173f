"""The loop's settings: :class:`LoopSettings` is the one home of every default and its help text.

Settings marked ``result`` change what the loop computes: they are frozen in ``state.json`` at
the start, and a different value on ``--resume`` is an error. ``drivers/search.py`` builds its
flags' help from :func:`help_text`, so a default is written once, here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from bss.errors import BSSError

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


def _setting(default, help: str, result: bool = True):
    return field(default=default, metadata={"help": help, "result": result})


@dataclass
class LoopSettings:
    dataset: str = _setting(
        "",
        "source dataset under --data-root; NAME_BASELINE/EVAL/TEST are made if missing; a missing synthetic class (obstacle, deposition, deformation, disconnect) is generated",
    )
    data_root: str = _setting("datasets", "folder holding the datasets")
    config: str = _setting("config.yaml", "base training config")
    space: str | None = _setting(None, "search space YAML (default: search_spaces/cpu.yaml without a GPU, search_spaces/default.yaml with one)")
    trials: int | None = _setting(None, "trials per search (default: the space's searcher.trials)")
    iterations: int = _setting(3, "iterations including iteration 0 on BASELINE")
    promotion: str = _setting(
        "guarded_recall",
        "promotion rule: guarded_recall: best EVAL --metric among models within --margin of the best EVAL IoU (a model teaches H<n> only if its EVAL label IoU beats the current labels'); floor: best --metric with --floor-metric >= --floor",
    )
    metric: str = _setting("recall", "EVAL metric that promotes and decides")
    margin: float = _setting(0.03, "guarded_recall: --metric decides among models within this EVAL IoU of the best")
    label_guard: bool = _setting(
        True,
        "guarded_recall, where the dataset has box-only images: the models within --margin are measured as teachers on EVAL, and those whose EVAL label IoU trails the best one's by more than --noise-z paired standard errors drop out before --metric decides",
    )
    floor_metric: str = _setting("precision", "floor rule: EVAL metric that must clear --floor to be promoted")
    floor: float = _setting(0.3, "floor rule: minimum EVAL --floor-metric of a promoted model")
    stop: str = _setting("guarded", "stop rule")
    tolerance: float = _setting(0.02, "stop when the EVAL IoU falls more than this below the best so far")
    patience: int = _setting(1, "stop after this many iterations in a row without a new best")
    noise_z: float = _setting(
        2.0,
        "the tolerance of comparing two iterations is at least this many standard errors of their paired per-image EVAL IoU difference (few EVAL images: a wider tolerance); 0: --tolerance alone",
    )
    ties: str = _setting(
        "labels",
        "a later iteration whose EVAL IoU is within --tolerance of the best but not above it: labels: a new best when it trained on better labels (a later H<n>); earlier: the earlier model stays",
    )
    retrain_best: bool = _setting(False, "iterations >= 1 retrain the best config so far with --trials seeds instead of searching")
    seed: int = _setting(0, "seed of the data, the splits, the searcher and the trials")
    algorithm: str | None = _setting(None, "searcher (default: the space's searcher.algorithm)")
    scheduler: str | None = _setting(None, "early stopping (default: the space's scheduler.name)")
    time_budget: float | None = _setting(None, "wall-clock limit of each search in seconds; running trials are stopped")
    budget: float | None = _setting(
        None,
        "wall-clock budget of the whole loop (600, 90s, 10m, 1.5h): each search gets its share of the time left, and no later search starts with less than a minute left",
    )
    split_fractions: list = _setting((0.6, 0.2, 0.2), "BASELINE/EVAL/TEST fractions of the hand-labelled images")
    resolution: str = _setting(
        "auto",
        "how trials see the frames: auto: planned from the dataset's fingerprint (whole frames, or patches at the scale that keeps thin defects and small boxes); whole: every frame squeezed to a 160-px input (as before)",
    )
    patch_size: int | None = _setting(None, "side of a planned patch and sliding window in pixels, a multiple of 32 (default: 128 on CPU, 256 on a GPU)")
    experiment: str = _setting("bss-search", "MLflow experiment", result=False)
    tracking_uri: str | None = _setting(None, "MLflow tracking URI (default: the config's tracking.uri, sqlite:///mlflow.db)", result=False)
    # recorded at the start, never given
    device_kind: str = _setting("cpu", "", result=False)
    config_digest: str | None = _setting(None, "", result=False)
    space_digest: str | None = _setting(None, "", result=False)

    def __post_init__(self):
        self.split_fractions = [float(x) for x in self.split_fractions]

    @classmethod
    def names(cls, result_only: bool = False) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["help"] and (f.metadata["result"] or not result_only))

    @classmethod
    def from_dict(cls, data: dict) -> "LoopSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def resolve(cls, given: dict, stored: dict | None, gpus: int) -> "LoopSettings":
        """The settings of a run: ``given`` (None = not given) over the defaults for a new run;
        for a resumed one the stored settings, where any ``result`` setting given differently is
        an error."""
        given = {k: (list(v) if isinstance(v, tuple) else v) for k, v in given.items() if k in cls.names()}
        if stored is not None:
            stored = {"ties": "earlier", "noise_z": 0.0, "label_guard": False, **stored}  # a run started before these options keeps the rule of its time
            for key in cls.names(result_only=True):
                value, before = given.get(key), stored.get(key)
                if (
                    value is None
                    or key not in stored
                    or value == before
                    or (key in ("config", "space", "data_root") and Path(str(value)).resolve() == Path(str(before)).resolve())
                ):
                    continue
                raise BSSError(
                    f"--resume continues with the settings the run started with; --{key.replace('_', '-')} was {before!r}, now {value!r}. Leave it out, or start a new run with another --run-dir."
                )
            return cls.from_dict(stored)
        settings = cls(**{k: v for k, v in given.items() if v is not None})
        if settings.space is None:
            settings.space = str(SPACES / ("default.yaml" if gpus else "cpu.yaml"))
        settings.device_kind = "gpu" if gpus else "cpu"
        settings.check()
        return settings

    def check(self) -> None:
        from bss.search.plan import check_resolution
        from bss.search.searchers import SPACE_SEARCHERS

        for name, value, least in (("--iterations", self.iterations, 1), ("--trials", self.trials, 1)):
            if value is not None and value < least:
                raise BSSError(f"{name} must be at least {least}, got {value}.")
        for name, value in (("--budget", self.budget), ("--time-budget", self.time_budget)):
            if value is not None and value <= 0:
                raise BSSError(f"{name} must be positive, got {value}.")
        if self.algorithm not in (None,) + SPACE_SEARCHERS:
            raise BSSError(f"--algorithm must be one of {', '.join(SPACE_SEARCHERS)}, got {self.algorithm!r}.")
        if self.scheduler not in (None, "asha", "fifo"):
            raise BSSError(f"--scheduler must be asha or fifo, got {self.scheduler!r}.")
        check_resolution(self.resolution, self.patch_size)


def help_text(name: str) -> str:
    """A flag's help: the setting's text and its default (for ``argparse``)."""
    f = next(f for f in dataclasses.fields(LoopSettings) if f.name == name)
    default = f.default
    shown = "" if default in (None, "", False) else f" (default: {', '.join(map(str, default)) if isinstance(default, tuple) else default})"
    return f.metadata["help"] + shown


def parse_duration(text: str) -> float:
    """``"90"``/``"90s"``, ``"10m"``, ``"1.5h"`` -> seconds (for ``--budget``)."""
    value = str(text).strip().lower()
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(value[-1:], None)
    number = value[:-1] if scale else value
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise BSSError(f"--budget {text!r}: give a duration such as 600, 90s, 10m or 1.5h.") from None
    if not seconds > 0 or seconds == float("inf"):
        raise BSSError(f"--budget {text!r} must be a positive duration.")
    return seconds
