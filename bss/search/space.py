"""Search spaces: a YAML file -> validated distributions for Optuna (TPE) and Ray Tune.

A space file (``search_spaces/*.yaml``) has four sections::

    fixed:                      # config keys set for every trial, over the base --config
      epochs: 5
      image_size: [96, 128]
    params:                     # config keys searched; dotted paths reach nested keys
      learning_rate: {loguniform: [1.0e-4, 1.0e-2]}
      criterion.args.alpha: {uniform: [0.2, 0.8]}
      batch_size: {choice: [4, 8, 16]}
      epochs: {int: [3, 8]}
      model.args: {choice: {small: {encoder_name: resnet18, encoder_depth: 3}, lite0: {...}}}
    searcher: {algorithm: tpe, trials: 8, n_startup_trials: 3, multivariate: true}
    scheduler: {name: asha, grace_period: 2, reduction_factor: 2}

Distributions: ``loguniform: [low, high]`` (0 < low < high), ``uniform: [low, high]``,
``int: [low, high]`` (inclusive; ``{int: [low, high], log: true}`` samples on a log scale) and
``choice: [a, b, ...]`` or ``choice: {label: value, ...}`` (values may be lists or mappings; a
mapping value merges into the mapping at that key, so ``model.args`` choices can change several
encoder arguments together). Every key is checked against the training config (unknown key ->
did-you-mean), every bound and choice is applied to the base config and validated, and encoder
names are checked, so a mistake is one :class:`~bss.errors.ConfigError` before any trial runs.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bss.config import Config, from_dict, merge, read_yaml
from bss.errors import ConfigError, suggest
from bss.search.searchers import SPACE_SEARCHERS

SECTIONS = ("fixed", "params", "searcher", "scheduler")
KINDS = ("loguniform", "uniform", "int", "choice")
# keys the loop sets for every trial; searching or fixing them would break the loop's bookkeeping
LOOP_KEYS = ("train_dataset", "evaluation_dataset", "data_root", "output_dir", "tracking", "seed", "device")
SCHEDULERS = ("asha", "fifo")


@dataclass(frozen=True)
class Param:
    """One searched config key."""

    key: str  # dotted config path, e.g. "criterion.args.alpha"
    kind: str  # loguniform | uniform | int | choice
    low: float | None = None
    high: float | None = None
    log: bool = False
    labels: tuple = ()  # choice: what Optuna sees (str/int/float/bool/None)
    values: tuple = ()  # choice: the config value each label stands for

    def optuna(self):
        import optuna

        if self.kind == "loguniform":
            return optuna.distributions.FloatDistribution(self.low, self.high, log=True)
        if self.kind == "uniform":
            return optuna.distributions.FloatDistribution(self.low, self.high)
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.CategoricalDistribution(list(self.labels))

    def decode(self, sampled: Any) -> Any:
        """The config value for what the searcher sampled (a choice label -> its value)."""
        if self.kind != "choice":
            return int(sampled) if self.kind == "int" else float(sampled)
        for label, value in zip(self.labels, self.values):
            if label == sampled:
                return copy.deepcopy(value)
        raise ConfigError(f"search space key '{self.key}': {sampled!r} is not one of its choices {list(self.labels)}.")

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice {list(self.labels)}"
        return f"{self.kind} [{self.low:g}, {self.high:g}]" + (" log" if self.log and self.kind == "int" else "")


@dataclass
class SearchSpace:
    """A validated search space: fixed overrides, searched params, searcher and scheduler options."""

    path: str
    fixed: dict = field(default_factory=dict)  # nested, as a config fragment
    params: tuple = ()  # Param, in file order
    searcher: dict = field(default_factory=lambda: {"algorithm": "tpe", "trials": 8, "n_startup_trials": 3, "multivariate": True})
    scheduler: dict = field(default_factory=lambda: {"name": "asha", "grace_period": 1, "reduction_factor": 2})

    # ---- for the searchers ---------------------------------------------------------------
    def optuna_space(self) -> dict:
        return {p.key: p.optuna() for p in self.params}

    # ---- trial configs -------------------------------------------------------------------
    def decode(self, sampled: dict) -> dict:
        """Searcher output ``{"criterion.args.alpha": 0.4, ...}`` -> config values by key."""
        by_key = {p.key: p for p in self.params}
        return {key: by_key[key].decode(value) for key, value in sampled.items() if key in by_key}

    def apply(self, base: dict, sampled: dict) -> dict:
        """``base`` (a config dict) with ``fixed`` and the decoded ``sampled`` params set."""
        out = merge(copy.deepcopy(base), copy.deepcopy(self.fixed))
        for key, value in self.decode(sampled).items():
            out = set_key(out, key, value)
        return out

    def sets(self, key: str) -> bool:
        """Whether the space fixes or searches the config key ``key`` (dotted)."""
        node = self.fixed
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            node = node[part]
        return node is not None or any(p.key == key or p.key.startswith(key + ".") for p in self.params)

    def digest(self) -> str:
        text = json.dumps(
            {"fixed": self.fixed, "params": [dataclasses.asdict(p) for p in self.params], "searcher": self.searcher, "scheduler": self.scheduler},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def describe(self) -> list[str]:
        return [f"{p.key}: {p.describe()}" for p in self.params]


# --------------------------------------------------------------------------- config paths


def set_key(config: dict, key: str, value: Any) -> dict:
    """Set dotted ``key`` in a copy of ``config``; a mapping value merges into a mapping there."""
    out = copy.deepcopy(config)
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = merge(node[last], value)
    else:
        node[last] = value
    return out


def check_key(key: str, where: str) -> None:
    """``key`` must name a config field (below a component's ``args`` anything goes)."""
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{where}: {key!r} is not a config key (use dotted paths like criterion.args.alpha).")
    parts = key.split(".")
    if parts[0] in LOOP_KEYS:
        raise ConfigError(f"{where}: '{key}' is set by the search loop for every trial (datasets, seeds, folders, tracking); remove it from the search space.")
    cls: Any = Config
    for depth, part in enumerate(parts):
        if cls is dict:  # inside NamedArgs.args: free-form keyword arguments
            return
        if not dataclasses.is_dataclass(cls):
            prefix = ".".join(parts[:depth])
            raise ConfigError(f"{where}: '{key}' goes below '{prefix}', which is not a mapping.")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            names = [f.name for f in dataclasses.fields(cls)]
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.6)
            prefix = ".".join(parts[:depth])
            hint = (
                f" Did you mean '{'.'.join(parts[:depth] + [close[0]] + parts[depth + 1 :])}'?"
                if close
                else f" Valid keys{' under ' + prefix if prefix else ''}: {', '.join(names)}."
            )
            raise ConfigError(f"{where}: unknown config key '{key}'.{hint}")
        hint = hints[part]
        cls = typing.get_origin(hint) or hint


# --------------------------------------------------------------------------- parsing


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: bound {value!r} is not a number.")
    try:
        number = float(value)  # YAML reads 1e-3 (without a dot) as a string
    except ValueError:
        raise ConfigError(f"{where}: bound {value!r} is not a number.") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where}: bound {value!r} must be finite.")
    return number


def _label(value: Any, index: int) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= 60 else f"option{index}"


def parse_param(key: str, spec: Any) -> Param:
    where = f"params.{key}"
    check_key(key, "params")
    usage = "write one of {loguniform: [low, high]}, {uniform: [low, high]}, {int: [low, high]} or {choice: [a, b, ...]}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: {spec!r} is not a distribution; {usage} (constant values go under 'fixed:').")
    kinds = [k for k in spec if k in KINDS]
    extra = [k for k in spec if k not in KINDS and k != "log"]
    if len(kinds) != 1 or extra:
        bad = extra[0] if extra else None
        hint = suggest(bad, KINDS, None) if bad else ""
        what = f"unknown distribution '{bad}'.{hint}" if bad else ("more than one distribution." if kinds else "no distribution.")
        raise ConfigError(f"{where}: {what} {usage[0].upper()}{usage[1:]}.")
    kind = kinds[0]
    arg = spec[kind]
    log = spec.get("log", False)
    if not isinstance(log, bool) or (log and kind != "int"):
        raise ConfigError(f"{where}: 'log: true' only applies to int (use loguniform for floats).")
    if kind == "choice":
        if isinstance(arg, dict):
            labels, values = tuple(str(k) for k in arg), tuple(arg.values())
        elif isinstance(arg, list):
            labels, values = tuple(_label(v, i) for i, v in enumerate(arg)), tuple(arg)
        else:
            raise ConfigError(f"{where}: choice takes a list [a, b, ...] or a mapping {{label: value}}, got {arg!r}.")
        if not values:
            raise ConfigError(f"{where}: choice needs at least one value.")
        if len(set(map(str, labels))) != len(labels):
            raise ConfigError(f"{where}: choice lists a value twice ({list(labels)}).")
        return Param(key, kind, labels=labels, values=values)
    if not isinstance(arg, list) or len(arg) != 2:
        raise ConfigError(f"{where}: {kind} takes [low, high], got {arg!r}.")
    low, high = (_number(v, where) for v in arg)
    if not low < high:
        raise ConfigError(f"{where}: {kind} needs low < high, got [{arg[0]}, {arg[1]}].")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs 0 < low, got {arg[0]}.")
    if kind == "int":
        if not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{where}: int takes integer bounds, got {arg!r}.")
        if log and low < 1:
            raise ConfigError(f"{where}: int with log: true needs low >= 1, got {arg[0]}.")
    return Param(key, kind, low=low, high=high, log=log)


def _options(section: str, given: Any, defaults: dict, allowed: dict) -> dict:
    if given is None:
        return dict(defaults)
    if not isinstance(given, dict):
        raise ConfigError(f"{section}: must be a mapping, got {given!r}.")
    out = dict(defaults)
    for key, value in given.items():
        if key not in allowed:
            raise ConfigError(f"{section}: unknown option '{key}'." + suggest(key, allowed, "Valid", cutoff=0.5))
        check = allowed[key]
        if not check(value):
            raise ConfigError(f"{section}.{key}: invalid value {value!r}.")
        out[key] = value
    return out


_positive_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
SEARCHER_OPTIONS = {
    "algorithm": lambda v: v in SPACE_SEARCHERS,
    "trials": _positive_int,
    "n_startup_trials": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "multivariate": lambda v: isinstance(v, bool),
}
SCHEDULER_OPTIONS = {
    "name": lambda v: v in SCHEDULERS,
    "grace_period": _positive_int,
    "reduction_factor": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 1,
}


def parse_space(data: dict, path: str = "<space>") -> SearchSpace:
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown section '{unknown[0]}'." + suggest(unknown[0], SECTIONS, "Valid sections"))
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"fixed: must be a mapping of config keys to values, got {fixed!r}.")
    nested: dict = {}
    for key, value in fixed.items():
        check_key(str(key), "fixed")
        nested = set_key(nested, str(key), value)
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError("params: the space needs at least one searched key, e.g. learning_rate: {loguniform: [1.0e-4, 1.0e-2]}.")
    parsed = tuple(parse_param(str(key), spec) for key, spec in params.items())
    keys = [p.key for p in parsed]
    for a in keys:
        for b in keys:
            if a != b and b.startswith(a + "."):
                raise ConfigError(f"params: '{b}' lies inside '{a}'; search one or the other.")
    searcher = _options("searcher", data.get("searcher"), SearchSpace.__dataclass_fields__["searcher"].default_factory(), SEARCHER_OPTIONS)
    scheduler = _options("scheduler", data.get("scheduler"), SearchSpace.__dataclass_fields__["scheduler"].default_factory(), SCHEDULER_OPTIONS)
    return SearchSpace(path=path, fixed=nested, params=parsed, searcher=searcher, scheduler=scheduler)


def _encoder_names(config: dict) -> list[str]:
    return [str(config.get("model", {}).get("args", {}).get("encoder_name", "resnet34"))]


def check_against(space: SearchSpace, base: dict) -> None:
    """Apply every bound and every choice to ``base`` and validate the result as a Config."""
    import segmentation_models_pytorch as smp

    known_encoders = set(smp.encoders.get_encoder_names())
    probes: list[tuple[str, dict]] = [("fixed", {})]
    for p in space.params:
        samples = list(p.labels) if p.kind == "choice" else [p.low, p.high]
        for sample in samples:
            probes.append((f"params.{p.key} = {sample!r}", {p.key: sample}))
    for where, sample in probes:
        try:
            config = space.apply(base, sample)
            from_dict(config)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        for name in _encoder_names(config):
            if name not in known_encoders and not name.startswith("tu-"):
                hint = suggest(name, sorted(known_encoders), None) or " See smp.encoders.get_encoder_names(), or a timm encoder as tu-<name>."
                raise ConfigError(f"{where}: unknown encoder {name!r}.{hint}")


def load_space(path: str | Path, base: dict | None = None) -> SearchSpace:
    """Read and validate a space file; with ``base`` (a config dict) also check every value."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space {path} not found; the shipped ones are search_spaces/cpu.yaml and search_spaces/default.yaml.")
    try:
        data = read_yaml(path)
        space = parse_space(data, str(path))
        if base is not None:
            check_against(space, base)
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith(str(path)) else f"search space {path}: {text}") from None
    return space
