"""`pixel_shuffle` connector: fold s x s neighbouring patches into one token, then project (Idefics3, nanoVLM).

Owns the space-to-depth fold of a square patch grid and the projection to the LLM width:

    features[B, N, Dv] --fold s x s--> [B, N / s^2, s^2 * Dv] --linear | mlp--> [B, N / s^2 * K, Dt]

`tokens_per_group` (K, default 1) projects each folded block to K tokens, K different learned views
of the same block, written in a row: when one block is the whole image (a CNN's 3 x 3 map folded
by 3), the LLM gets K tokens that each see the whole layout, and its attention can pick among them
(README, issue 18: K = 8 against 1).

The fold keeps Idefics3's layout (raster order of the s x s blocks; channels ordered (row in
block, column in block, Dv)), so its `modality_projection` weights fit ours (at K = 1).
The grid is that of the (padded) length N; padded patches are zeroed before folding, so a
token never depends on the junk in padding, and a token made only of real patches is unaffected.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlkit.connectors.base import Connector
from vlkit.connectors.registry import register_connector
from vlkit.errors import ConfigError


@register_connector("pixel_shuffle")
class PixelShuffleConnector(Connector):
    """Space-to-depth over the patch grid, then `linear` (Idefics3) or `mlp` (Linear-GELU-Linear)."""

    def __init__(
        self,
        vision_hidden_size: int,
        text_hidden_size: int,
        scale_factor: int = 2,
        projection: str = "linear",
        bias: bool = False,
        tokens_per_group: int = 1,
    ) -> None:
        super().__init__(vision_hidden_size, text_hidden_size)
        if scale_factor < 1:
            raise ConfigError(f"pixel_shuffle connector scale_factor must be >= 1, got {scale_factor}")
        if tokens_per_group < 1:
            raise ConfigError(f"pixel_shuffle connector tokens_per_group must be >= 1, got {tokens_per_group}")
        if projection not in ("linear", "mlp"):
            raise ConfigError(f"pixel_shuffle connector projection must be 'linear' or 'mlp', got '{projection}'")
        self.scale_factor = scale_factor
        self.tokens_per_group = tokens_per_group
        folded_size = vision_hidden_size * scale_factor**2
        out_size = tokens_per_group * text_hidden_size
        if projection == "linear":
            # Idefics3 / nanoVLM: one bias-free linear layer.
            self.proj: nn.Module = nn.Linear(folded_size, out_size, bias=bias)
        else:
            self.proj = nn.Sequential(
                nn.Linear(folded_size, text_hidden_size, bias=bias),
                nn.GELU(),
                nn.Linear(text_hidden_size, out_size, bias=bias),
            )

    def grid_side(self, num_patches: int) -> int:
        """Side of the square patch grid, or a ConfigError if N patches cannot be folded by s."""
        side = math.isqrt(num_patches)
        s = self.scale_factor
        if side * side != num_patches or side % s != 0:
            raise ConfigError(
                f"pixel_shuffle connector needs a square patch grid with a side divisible by scale_factor={s}, "
                f"got {num_patches} patches; drop the CLS token (vision_feature_select_strategy: default) "
                f"or change connector.scale_factor"
            )
        return side

    def num_tokens(self, num_patches: int) -> int:
        self.grid_side(num_patches)  # raises for a grid it cannot fold
        return num_patches // self.scale_factor**2 * self.tokens_per_group

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, num_patches, dim = features.shape
        side, s = self.grid_side(num_patches), self.scale_factor
        if mask is not None:
            # Zero padded patches (masked_fill, not a product: junk may be inf/NaN) before folding.
            features = features.masked_fill(~mask.bool().unsqueeze(-1), 0.0)
        # [B, N, Dv] -> [B, H/s, s, W/s, s, Dv] -> [B, H/s, W/s, s, s, Dv] -> [B, N/s^2, s^2 * Dv]
        folded = features.reshape(batch, side // s, s, side // s, s, dim).permute(0, 1, 3, 2, 4, 5)
        folded = folded.reshape(batch, num_patches // s**2, s * s * dim)
        tokens = self.proj(folded)  # [B, N/s^2, K * Dt]
        return tokens.reshape(batch, -1, self.text_hidden_size)  # [B, N/s^2 * K, Dt]: a block's K tokens in a row
