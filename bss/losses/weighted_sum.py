"""A weighted sum of losses, e.g. 0.5 * Tversky + 0.5 * BCE."""

from __future__ import annotations

import torch


class WeightedSum(torch.nn.Module):
    def __init__(self, losses: list[torch.nn.Module], weights: list[float]):
        super().__init__()
        if len(losses) != len(weights):
            raise ValueError("one weight per loss")
        self.losses = torch.nn.ModuleList(losses)
        self.weights = list(weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * loss(logits, target) for w, loss in zip(self.weights, self.losses))
