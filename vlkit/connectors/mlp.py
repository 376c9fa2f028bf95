"""`mlp` connector: Linear -> (GELU -> Linear) x (depth - 1), per patch (LLaVA-1.5 uses depth 2)."""

from __future__ import annotations

import torch
from torch import nn

from vlkit.connectors.base import Connector
from vlkit.connectors.registry import register_connector
from vlkit.errors import ConfigError


@register_connector("mlp")
class MLPConnector(Connector):
    def __init__(
        self, vision_hidden_size: int, text_hidden_size: int, depth: int = 2, activation: str = "gelu", bias: bool = True
    ) -> None:
        super().__init__(vision_hidden_size, text_hidden_size)
        if depth < 1:
            raise ConfigError(f"mlp connector depth must be >= 1, got {depth}")
        if activation != "gelu":
            raise ConfigError(f"mlp connector activation must be 'gelu', got '{activation}'")
        self.depth = depth
        layers: list[nn.Module] = [nn.Linear(vision_hidden_size, text_hidden_size, bias=bias)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(text_hidden_size, text_hidden_size, bias=bias)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # [B, N, Dv] -> [B, N, Dt]
        return self.layers(features)

    def num_tokens(self, num_patches: int) -> int:
        return num_patches
