"""Encoder stages a model never runs, dropped so that checkpoints hold only what is used.

smp's own encoders keep every stage whatever ``encoder_depth`` says: a ``resnet18`` at depth 3
runs conv1, layer1 and layer2 (0.7M parameters) but carries layer3 and layer4 (10.5M more)
through every optimizer step and into every checkpoint (44 MB instead of 3 MB). timm encoders
(``tu-*``) are already cut by timm. Dropping happens after the model is built, and weights loaded
later skip the dropped stages, so training and its random draws are exactly as before.
"""

from __future__ import annotations

import torch
from torch import nn


def drop_unused_stages(encoder: nn.Module) -> None:
    """Replace the stages deeper than the encoder's depth by ``nn.Identity``."""
    depth = getattr(encoder, "_depth", None)
    get_stages = getattr(encoder, "get_stages", None)
    if depth is None or get_stages is None:
        return
    try:
        stages = get_stages()
    except (AttributeError, NotImplementedError):
        return
    unused = {id(module) for stride, modules in stages.items() if stride > 2**depth for module in modules}
    for name, child in list(encoder.named_children()):
        if id(child) in unused:
            setattr(encoder, name, nn.Identity())


def without_dropped_stages(encoder: nn.Module | None, state: dict[str, torch.Tensor], prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    """``state`` (a model's, or with ``prefix=""`` an encoder's) less the weights of the stages
    ``encoder`` dropped: weights written before stages were dropped, or from a deeper encoder,
    still load; anything else that does not fit still fails to load."""
    children = encoder.named_children() if isinstance(encoder, nn.Module) else ()
    dropped = tuple(f"{prefix}{name}." for name, module in children if isinstance(module, nn.Identity))
    return {key: value for key, value in state.items() if not key.startswith(dropped)} if dropped else state
