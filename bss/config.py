"""The training config: a typed, validated object loaded from YAML.

Keys follow the seed's ``config.yaml``; see the README's "Config" table. A file may start from
another with ``_base_: other.yaml`` and override a few keys (nested dicts merge key by key).
Every mistake (unknown key, wrong type, bad value) raises one :class:`~bss.errors.ConfigError`
naming the key, with a did-you-mean for misspellings.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from bss.errors import ConfigError, suggest, yaml_problem

METRICS = ("iou", "dice", "recall", "precision")  # the one list of metric names (bss.metrics computes them)


@dataclass
class NamedArgs:
    """A component picked by name from a registry, with keyword arguments for it."""

    name: str
    args: dict = field(default_factory=dict)


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"  # any MLflow tracking URI; relative sqlite paths are from the cwd
    experiment: str = "bss"
    enabled: bool = True


AUGMENTATIONS = ("default", "strong")  # bss.data.segmentation_dataset.train_augmentation


@dataclass
class StudentConfig:
    """How a model trains on a hybrid dataset ``NAME_H<n>`` (a *student*). The defaults change
    nothing; each option acts on the *refined* images (origin ``refined`` in the H<n> manifest,
    their teacher probability in ``soft/``) and leaves hand-labelled images as they are:

    - ``ignore_band: [low, high]``: pixels of a refined image whose teacher probability is in
      [low, high] are left out of the loss; the rest keep their hard label (outside every box the
      probability is 0: known background). Needs ``soft/`` (make the H<n> with soft labels).
    - ``ignore_edge: k``: pixels of a refined image within ``k`` pixels (at training resolution)
      of its mask's edge, inside its boxes, are left out of the loss: a teacher's edges are
      where its mask is most often wrong (blobby, a pixel or two thick or thin), and the student
      learns edges from the hand-labelled images instead. Outside the boxes stays known
      background. Needs no ``soft/``. 0: off.
    - ``soft_targets``: the teacher probability is the target instead of the hard mask (``soft/``).
    - ``hand_fraction``: the share of each epoch's draws that are hand-labelled images (drawn
      again as often as needed; the epoch keeps its length). 0: as they come.
    - ``init_from``: a checkpoint whose weights start the model (e.g. the teacher's best.pt).
    - ``augment``: ``default`` or ``strong`` (larger affine, colour jitter, blur/noise).
    """

    ignore_band: Optional[list] = None
    ignore_edge: int = 0
    soft_targets: bool = False
    hand_fraction: float = 0.0
    init_from: Optional[str] = None
    augment: str = "default"

    @property
    def needs_soft(self) -> bool:
        """Whether refined images need their teacher probability (``soft/``)."""
        return self.ignore_band is not None or self.soft_targets

    @property
    def needs_targets(self) -> bool:
        """Whether refined images get float targets (with ``IGNORE``) instead of their 0/1 mask."""
        return self.needs_soft or self.ignore_edge > 0


@dataclass
class PatchConfig:
    """Training on patches and predicting with overlapping sliding windows (as nnU-Net does), so
    that thin or small defects keep their pixels in large frames. The default (``frame_size``
    null) changes nothing: every frame is resized to ``image_size``, the network sees it whole.

    - ``frame_size: [height, width]``: every frame is first resized to this size (the planned
      scale; the decode-once cache keeps it). Training cuts random patches of ``image_size`` from
      it; inference (EVAL, TEST, the teacher, H<n>, ``predict.py``) slides windows of
      ``image_size`` over it and blends them with Gaussian weights. Each side at least
      ``image_size``'s.
    - ``foreground``: the share of training patches centred on a foreground pixel of the mask
      (nnU-Net: one third); the rest are cut anywhere.
    - ``overlap``: how much neighbouring windows overlap, as a fraction of the window (0 to 0.9).
    """

    frame_size: Optional[list] = None
    foreground: float = 1 / 3
    overlap: float = 0.5

    @property
    def enabled(self) -> bool:
        return self.frame_size is not None


@dataclass
class Config:
    seed: int = 0
    epochs: int = 10
    learning_rate: float = 1e-3
    batch_size: int = 8
    criterion: NamedArgs = field(default_factory=lambda: NamedArgs("TverskyLoss", {"alpha": 0.3, "beta": 0.7}))
    train_dataset: str = "obstacle_BASELINE"
    evaluation_dataset: str = "obstacle_EVAL"
    image_size: list = field(default_factory=lambda: [128, 128])  # [height, width], each divisible by 32
    model: NamedArgs = field(default_factory=lambda: NamedArgs("UNetAttention", {"encoder_name": "resnet18", "encoder_weights": None}))
    val_per_epoch: int = 1
    visualization_samples: int = 4
    # beyond the seed's keys
    data_root: str = "datasets"
    output_dir: str = "runs/train"
    threshold: float = 0.5  # on the sigmoid probability
    selection_metric: str = "iou"  # EVAL metric that picks the best checkpoint
    weight_decay: float = 0.0
    augment: bool = True
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = False  # mixed precision (bf16 where supported, else fp16 with a grad scaler)
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    cache_images: bool = True  # decode + resize each image once, keep at training resolution
    max_steps_per_epoch: int = 0  # 0 = whole epoch; >0 caps it (tests, smoke runs)
    train_steps: int = 0  # >0: at least this many optimizer steps (and at least `epochs` epochs), whatever the dataset's size; 0: `epochs` decides
    evaluations: int = 0  # >0: this many EVAL evaluations spread evenly over the run (instead of val_per_epoch per epoch)
    student: StudentConfig = field(default_factory=StudentConfig)  # training on a hybrid dataset H<n>
    patches: PatchConfig = field(default_factory=PatchConfig)  # patch training + sliding-window inference (frame_size null: whole frames)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def steps_per_epoch(self, train_images: int) -> int:
        """Optimizer steps in one epoch over ``train_images`` images (the last partial batch is dropped)."""
        full = train_images // self.batch_size if train_images > self.batch_size else 1
        return min(full, self.max_steps_per_epoch) if self.max_steps_per_epoch else full

    def planned_epochs(self, train_images: int) -> int:
        """``epochs``; with ``train_steps``, at least ``epochs`` and at least ``train_steps`` steps:
        a small training set still gets enough steps, a larger one enough passes over its images."""
        if not self.train_steps:
            return self.epochs
        return max(self.epochs, -(-self.train_steps // self.steps_per_epoch(train_images)))

    def planned_evaluations(self, train_images: int) -> int:
        """How many evaluations a run on ``train_images`` images makes."""
        total = self.planned_epochs(train_images) * self.steps_per_epoch(train_images)
        return min(self.evaluations, total) if self.evaluations else self.planned_epochs(train_images) * self.val_per_epoch

    @property
    def height(self) -> int:
        return int(self.image_size[0])

    @property
    def width(self) -> int:
        return int(self.image_size[1])

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) every frame is resized to before the network sees it: ``patches.frame_size``,
        else ``image_size`` (the whole frame is one network input)."""
        size = self.patches.frame_size or self.image_size
        return int(size[0]), int(size[1])

    @property
    def window(self) -> tuple[int, int] | None:
        """(height, width) of a training patch and an inference window (``image_size``) where the
        config has patches; None: the whole frame is one network input."""
        return (self.height, self.width) if self.patches.enabled else None


def _suggest(key: str, valid: list[str]) -> str:
    return suggest(key, valid, "Valid keys")


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<top level>'}' must be a mapping, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key '{path}'.{_suggest(str(key), names)}")
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field (e.g. model.name) is missing
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<top level>'}' is incomplete: {exc}.") from None


def _coerce(hint, value, path: str):
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else _build(hint, value, path + ".")
    origin = typing.get_origin(hint) or hint
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if origin is typing.Union:
        return value
    if not isinstance(value, origin) or (origin is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{path}' must be {getattr(origin, '__name__', origin)}, got {value!r} ({type(value).__name__}).")
    return value


def validate(cfg: Config) -> Config:
    """Check values that types alone cannot; raise ConfigError naming the key."""
    size = cfg.image_size
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        raise ConfigError(f"config key 'image_size' must be [height, width] (two integers), got {size!r}.")
    if any(v <= 0 or v % 32 for v in size):
        raise ConfigError(f"config key 'image_size' must be [height, width] with each a positive multiple of 32 (the UNet downsamples 5 times), got {size!r}.")
    for key in ("learning_rate", "weight_decay", "threshold"):
        if not math.isfinite(getattr(cfg, key)):
            raise ConfigError(f"config key '{key}' must be a finite number, got {getattr(cfg, key)!r}.")
    positive = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "val_per_epoch": cfg.val_per_epoch, "learning_rate": cfg.learning_rate}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value!r}.")
    for key in ("visualization_samples", "num_workers", "max_steps_per_epoch", "train_steps", "evaluations", "weight_decay"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must not be negative, got {getattr(cfg, key)!r}.")
    if not 0.0 < cfg.threshold < 1.0:
        raise ConfigError(f"config key 'threshold' must be between 0 and 1 (a sigmoid probability), got {cfg.threshold!r}.")
    if cfg.selection_metric not in METRICS:
        raise ConfigError(f"config key 'selection_metric' must be one of {', '.join(METRICS)}, got {cfg.selection_metric!r}.")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"config key 'device' must be auto, cpu, cuda or cuda:N, got {cfg.device!r}.")
    for key in ("model", "criterion"):
        component = getattr(cfg, key)
        if not isinstance(component.args, dict):
            raise ConfigError(f"config key '{key}.args' must be a mapping, got {component.args!r}.")
    _validate_student(cfg.student)
    _validate_patches(cfg.patches, cfg.image_size)
    return cfg


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_student(student: StudentConfig) -> None:
    band = student.ignore_band
    if band is not None and not (isinstance(band, list) and len(band) == 2 and all(_is_number(v) for v in band) and 0.0 < band[0] < band[1] < 1.0):
        raise ConfigError(
            f"config key 'student.ignore_band' must be [low, high], teacher probabilities with 0 < low < high < 1 (e.g. [0.3, 0.7]), or null; got {band!r}."
        )
    if band is not None:
        student.ignore_band = [float(v) for v in band]
    if isinstance(student.ignore_edge, bool) or not isinstance(student.ignore_edge, int) or student.ignore_edge < 0:
        raise ConfigError(
            f"config key 'student.ignore_edge' must be a whole number of pixels, 0 or more (the band along a refined mask's edge left out of the loss; 0: off), got {student.ignore_edge!r}."
        )
    if not (_is_number(student.hand_fraction) and 0.0 <= student.hand_fraction < 1.0):
        raise ConfigError(
            f"config key 'student.hand_fraction' must be at least 0 and below 1 (the share of hand-labelled images in each epoch; 0: as they come), got {student.hand_fraction!r}."
        )
    if student.init_from is not None and (not isinstance(student.init_from, str) or not student.init_from):
        raise ConfigError(f"config key 'student.init_from' must be the path of a checkpoint (best.pt) or null, got {student.init_from!r}.")
    if student.augment not in AUGMENTATIONS:
        raise ConfigError(f"config key 'student.augment' must be one of {', '.join(AUGMENTATIONS)}, got {student.augment!r}.")


def _validate_patches(patches: PatchConfig, image_size: list) -> None:
    size = patches.frame_size
    if size is not None:
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
            raise ConfigError(f"config key 'patches.frame_size' must be [height, width] (two integers) or null, got {size!r}.")
        if size[0] < image_size[0] or size[1] < image_size[1]:
            raise ConfigError(
                f"config key 'patches.frame_size' {size!r} must be at least image_size {image_size!r} on each side "
                "(patches and windows of image_size are cut from the frame); lower image_size or raise frame_size."
            )
    if not (_is_number(patches.foreground) and 0.0 <= patches.foreground <= 1.0):
        raise ConfigError(f"config key 'patches.foreground' must be between 0 and 1 (the share of patches centred on foreground), got {patches.foreground!r}.")
    if not (_is_number(patches.overlap) and 0.0 <= patches.overlap <= 0.9):
        raise ConfigError(f"config key 'patches.overlap' must be between 0 and 0.9 (a fraction of the window), got {patches.overlap!r}.")
    patches.foreground, patches.overlap = float(patches.foreground), float(patches.overlap)


def merge(base: dict, override: dict) -> dict:
    """Deep-merge ``override`` into a copy of ``base`` (nested dicts merge; other values replace)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not value.pop("_delete_", False):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _chain: tuple = ()) -> dict:
    """Read a YAML mapping, following ``_base_`` (relative to the file) recursively; a cycle is an error."""
    path = Path(path)
    if path.resolve() in _chain:
        cycle = " -> ".join(str(p) for p in _chain + (path.resolve(),))
        raise ConfigError(f"{path}: '_base_' chain loops back on itself ({cycle}); remove one of the _base_ lines.")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_problem(path, exc)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values.")
    base = data.pop("_base_", None)
    if base is not None:
        data = merge(read_yaml(path.parent / base, _chain + (path.resolve(),)), data)
    return data


def from_dict(data: dict) -> Config:
    return validate(_build(Config, data, ""))


def load_config(path: str | Path, overrides: dict | None = None) -> Config:
    """Load ``path`` (with its ``_base_`` chain), apply ``overrides`` and validate."""
    data = read_yaml(path)
    if overrides:
        data = merge(data, overrides)
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_overrides(pairs: list[str]) -> dict:
    """``["model.args.encoder_name=resnet34", "epochs=3"]`` -> nested dict, values parsed as YAML."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like key=value (e.g. epochs=3 or model.args.encoder_name=resnet34).")
        key, raw = pair.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or "unreadable"
            raise ConfigError(f"override {pair!r}: the value is not valid YAML ({problem}); quote it, e.g. {key.strip()}='...'.") from None
    return out
