"""UNetAttention: smp's Unet with an attention gate on the deepest encoder feature, and dropout.

The gate (channel squeeze-excitation times a spatial map, as in scSE) re-weights the bottleneck
feature before the decoder sees it, so the decoder starts from the regions the encoder finds
most defect-like; Dropout2d on the gated bottleneck regularises the small hand-labelled sets.
``decoder_attention: scse`` also puts smp's scSE blocks in every decoder stage.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import nn


class AttentionGate(nn.Module):
    """Concurrent channel and spatial attention (scSE) with a residual path."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.channel = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1), nn.Sigmoid()
        )
        self.spatial = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.channel(x) + x * self.spatial(x)


class UNetAttention(smp.Unet):
    def __init__(
        self, encoder_name: str = "resnet34", encoder_weights=None, dropout: float = 0.2, decoder_attention: str | None = None, classes: int = 1, **kwargs
    ):
        super().__init__(encoder_name=encoder_name, encoder_weights=encoder_weights, decoder_attention_type=decoder_attention, classes=classes, **kwargs)
        deepest = self.encoder.out_channels[-1]
        self.bottleneck_attention = AttentionGate(deepest)
        self.bottleneck_dropout = nn.Dropout2d(p=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_shape(x)
        features = list(self.encoder(x))
        features[-1] = self.bottleneck_dropout(self.bottleneck_attention(features[-1]))
        return self.segmentation_head(self.decoder(features))
