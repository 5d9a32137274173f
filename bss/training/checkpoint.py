"""Checkpoints: ``state_dict`` plus the resolved config and metrics, loadable with
``torch.load(path, weights_only=True)`` (never a pickled model object)."""

from __future__ import annotations

from pathlib import Path

import torch

from bss.config import Config, NamedArgs, from_dict
from bss.data.io import atomic_path
from bss.errors import BSSError

FORMAT_VERSION = 1


def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: Config, metrics: dict, epoch: float) -> Path:
    """Write atomically (temp file + rename, :func:`~bss.data.io.atomic_path`) so a crash never
    leaves a half checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "state_dict": _plain_state(model),
        "config": config.to_dict(),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "epoch": float(epoch),
    }
    with atomic_path(path, fsync=False) as tmp:  # no fsync, as before: a checkpoint is rewritten often, and a lost one is retrained
        torch.save(payload, tmp)
    return path


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BSSError(f"checkpoint {path} not found.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds; one line, without torch's advice
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            first = "it holds pickled Python objects, which BSS never loads (a BSS checkpoint is weights + config only)"
        raise BSSError(f"{path}: not a readable BSS checkpoint: {first[:200]}. Use a best.pt written by BSS.") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "config" not in payload:
        raise BSSError(f"{path}: not a BSS checkpoint (expected a dict with state_dict and config).")
    return payload


def checkpoint_config(path: str | Path, payload: dict) -> Config:
    """The checkpoint's config, validated; a bad one is an error naming the checkpoint."""
    from bss.errors import ConfigError

    try:
        return from_dict(payload["config"])
    except ConfigError as exc:
        raise BSSError(f"{path}: its config is not valid ({exc}); the checkpoint was not written by this version of BSS, or was edited.") from None


def _load_state(model: torch.nn.Module, state: dict) -> None:
    """Load ``state`` strictly, less the weights of encoder stages the model dropped."""
    from bss.models.stages import without_dropped_stages

    model.load_state_dict(without_dropped_stages(getattr(model, "encoder", None), state))


def load_state_into(model: torch.nn.Module, path: str | Path) -> None:
    _load_state(getattr(model, "_orig_mod", model), read_checkpoint(path)["state_dict"])


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config]:
    """Rebuild the model from the checkpoint's own config and load its weights."""
    from bss.models import build_model

    payload = read_checkpoint(path)
    config = checkpoint_config(path, payload)
    # the weights come from the checkpoint: never download or read encoder weights again
    model = build_model(NamedArgs(config.model.name, {**config.model.args, "encoder_weights": None}))
    try:
        _load_state(model, payload["state_dict"])
    except RuntimeError as exc:
        raise BSSError(f"{path}: weights do not fit the model its config describes ({str(exc)[:200]}).") from None
    return model.to(device).eval(), config
