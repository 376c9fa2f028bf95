"""`mlp` connector: Linear -> (GELU -> Linear) x (depth - 1), per patch (LLaVA-1.5 uses depth 2).

`positions: N` adds a learned bias per token index after the first Linear, so each output token
says where in the image it came from. A ViT's patch features already carry that (position
embeddings); a CNN's feature-map tokens do not (convolutions are translation-equivariant), and a
per-patch connector would otherwise leave the LLM to infer a token's place from its own positions.
"""

from __future__ import annotations

import torch
from torch import nn

from vlkit.connectors.base import Connector
from vlkit.connectors.registry import register_connector
from vlkit.errors import ConfigError


@register_connector("mlp")
class MLPConnector(Connector):
    def __init__(
        self, vision_hidden_size: int, text_hidden_size: int, depth: int = 2, activation: str = "gelu", bias: bool = True,
        positions: int = 0,
    ) -> None:
        super().__init__(vision_hidden_size, text_hidden_size)
        if depth < 1:
            raise ConfigError(f"mlp connector depth must be >= 1, got {depth}")
        if activation != "gelu":
            raise ConfigError(f"mlp connector activation must be 'gelu', got '{activation}'")
        if positions < 0:
            raise ConfigError(f"mlp connector positions must be >= 0 (0: none), got {positions}")
        self.depth = depth
        self.positions = positions
        layers: list[nn.Module] = [nn.Linear(vision_hidden_size, text_hidden_size, bias=bias)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(text_hidden_size, text_hidden_size, bias=bias)]
        self.layers = nn.Sequential(*layers)
        # Zero at the start: the connector begins as the plain per-patch MLP and learns the offsets.
        self.position_bias = nn.Parameter(torch.zeros(positions, text_hidden_size)) if positions else None

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # [B, N, Dv] -> [B, N, Dt]
        if self.position_bias is None:
            return self.layers(features)
        if features.shape[1] != self.positions:
            raise ConfigError(
                f"mlp connector has {self.positions} position biases but the tower gives {features.shape[1]} tokens "
                f"per image; set connector.positions: {features.shape[1]} (or 0 for none)"
            )
        hidden = self.layers[0](features) + self.position_bias.to(features.dtype)
        return self.layers[1:](hidden)

    def num_tokens(self, num_patches: int) -> int:
        return num_patches
