"""`linear` connector: one linear projection per patch (LLaVA-1.0)."""

from __future__ import annotations

import torch
from torch import nn

from vlkit.connectors.base import Connector
from vlkit.connectors.registry import register_connector


@register_connector("linear")
class LinearConnector(Connector):
    def __init__(self, vision_hidden_size: int, text_hidden_size: int, bias: bool = True) -> None:
        super().__init__(vision_hidden_size, text_hidden_size)
        self.proj = nn.Linear(vision_hidden_size, text_hidden_size, bias=bias)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # [B, N, Dv] -> [B, N, Dt]; per-patch, so padded patches cannot leak into real ones.
        return self.proj(features)

    def num_tokens(self, num_patches: int) -> int:
        return num_patches
