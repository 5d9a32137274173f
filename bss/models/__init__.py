"""Models by name: ``build_model(NamedArgs("UNetAttention", {"encoder_name": "resnet34"}))``.

``MODELS`` maps a name to a class: ``UNetAttention`` and every smp architecture (Unet,
UnetPlusPlus, FPN, DeepLabV3Plus, ...). Encoders are smp's by name (``resnet34``,
``tu-efficientnet_lite0``, ...); ``encoder_weights`` is handled by :mod:`bss.models.weights`.
"""

from __future__ import annotations

import inspect

import segmentation_models_pytorch as smp
import torch

from bss.config import NamedArgs
from bss.errors import ConfigError, suggest
from bss.models.stages import drop_unused_stages
from bss.models.unet_attention import UNetAttention
from bss.models.weights import resolve_weights

MODELS: dict[str, type[torch.nn.Module]] = {"UNetAttention": UNetAttention}
MODELS.update({cls.__name__: cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()})


def accepted_args(cls: type) -> set[str]:
    """The named constructor arguments of ``cls`` and of the classes it passes ``**kwargs`` to."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is torch.nn.Module:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def check_args(name: str, args: dict) -> None:
    """Refuse an argument the model does not take (smp passes unknown ones on to the encoder,
    where a misspelt ``decoder_channelz`` is silently ignored). A timm encoder (``tu-*``) does
    take extra keyword arguments, so there only a near-miss of a known argument is refused."""
    valid = accepted_args(MODELS[name])
    timm = str(args.get("encoder_name", "")).startswith("tu-")
    for key in args:
        if key in valid:
            continue
        hint = suggest(key, sorted(valid), None, cutoff=0.75)
        if hint or not timm:
            hint = hint or f" {name} takes: {', '.join(sorted(valid))}."
            raise ConfigError(f"config key 'model.args.{key}': {name} has no argument {key!r}.{hint}")


def build_model(spec: NamedArgs) -> torch.nn.Module:
    if spec.name not in MODELS:
        raise ConfigError(f"config key 'model.name': unknown model {spec.name!r}; valid: {', '.join(MODELS)}.")
    args = dict(spec.args)
    check_args(spec.name, args)
    args.setdefault("classes", 1)
    encoder_name = args.get("encoder_name", "resnet34")
    if encoder_name not in smp.encoders.get_encoder_names() and not str(encoder_name).startswith("tu-"):
        raise ConfigError(
            f"config key 'model.args.encoder_name': unknown encoder {encoder_name!r}; see smp.encoders.get_encoder_names() (or a timm name as tu-<name>)."
        )
    args["encoder_weights"], load = resolve_weights(encoder_name, args.get("encoder_weights"))
    try:
        model = MODELS[spec.name](**args)
    except (TypeError, KeyError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"config key 'model.args' does not fit {spec.name}: {exc}") from None
    drop_unused_stages(model.encoder)
    if load is not None:
        load(model.encoder)
    return model
