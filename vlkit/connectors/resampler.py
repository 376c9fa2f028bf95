"""`resampler` connector: learned latents cross-attending to the patches (Flamingo perceiver, Qwen-VL adapter).

Owns the projection of the patches to the resampler width, their 2D position encoding, the
perceiver blocks (`transformers`' `Idefics2PerceiverResampler`, reused as is) and the projection
to the LLM width:

    features[B, N, Dv] --Linear--> + 2D sincos positions --> context[B, N, H]
    latents[L, H] --depth x (cross-attn to [context; latents], gated MLP)--> RMSNorm --Linear--> [B, L, Dt]

The output has L tokens whatever the image size. `depth: 1` is a Qwen-VL style single
cross-attention layer (plus the block's MLP); Idefics2 uses depth 3. Padded patches are hidden
from the cross-attention by its attention mask, and positions are counted over real patches
only, so a padded sample gives the same tokens as the unpadded one.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

from vlkit.connectors.base import Connector
from vlkit.connectors.registry import register_connector
from vlkit.errors import ConfigError


@register_connector("resampler")
class ResamplerConnector(Connector):
    """Linear -> + 2D positions -> Idefics2PerceiverResampler (L latents, `depth` blocks) -> Linear.

    `hidden_size` is the width the latents work at (default: the LLM width); set it lower to keep
    the resampler small in front of a wide LLM.
    """

    def __init__(
        self,
        vision_hidden_size: int,
        text_hidden_size: int,
        num_latents: int = 64,
        depth: int = 3,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        num_key_value_heads: int | None = None,
        position_embedding: str = "sincos",
    ) -> None:
        super().__init__(vision_hidden_size, text_hidden_size)
        hidden_size = hidden_size or text_hidden_size
        num_heads = num_heads or max(1, hidden_size // 64)  # 64-wide heads by default
        num_key_value_heads = num_key_value_heads or num_heads
        for key, value in (("num_latents", num_latents), ("depth", depth), ("hidden_size", hidden_size)):
            if value < 1:
                raise ConfigError(f"resampler connector {key} must be >= 1, got {value}")
        if hidden_size % num_heads or num_heads % num_key_value_heads:
            raise ConfigError(
                f"resampler connector needs hidden_size ({hidden_size}) divisible by num_heads ({num_heads}) "
                f"and num_heads divisible by num_key_value_heads ({num_key_value_heads})"
            )
        if position_embedding not in ("sincos", "none"):
            raise ConfigError(
                f"resampler connector position_embedding must be 'sincos' or 'none', got '{position_embedding}'"
            )
        self.num_latents = num_latents
        self.hidden_size = hidden_size
        self.position_embedding = position_embedding

        self.input_proj = nn.Linear(vision_hidden_size, hidden_size)  # Qwen-VL's kv_proj
        config = Idefics2PerceiverConfig(
            hidden_size=hidden_size,
            resampler_n_latents=num_latents,
            resampler_depth=depth,
            resampler_n_heads=num_heads,
            resampler_head_dim=hidden_size // num_heads,
            num_key_value_heads=num_key_value_heads,
        )
        self.perceiver = Idefics2PerceiverResampler(config)
        # Idefics2 initialises every latent to ones (its weights are always loaded); identical latents
        # would get identical gradients and never diverge, so draw them as Qwen-VL does.
        with torch.no_grad():
            nn.init.trunc_normal_(self.perceiver.latents, std=0.02)
        self.output_proj = nn.Linear(hidden_size, text_hidden_size)

    def num_tokens(self, num_patches: int) -> int:
        return self.num_latents

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, num_patches, _ = features.shape
        if mask is None:
            mask = torch.ones(batch, num_patches, dtype=torch.bool, device=features.device)
        mask = mask.bool()
        # Masked keys get zero attention weight, but 0 * inf/NaN junk is still NaN: zero it first.
        features = features.masked_fill(~mask.unsqueeze(-1), 0.0)
        context = self.input_proj(features)  # [B, N, H]
        if self.position_embedding == "sincos":
            context = context + self._positions(mask).to(context.dtype)
        latents = self.perceiver(context=context, attention_mask=mask)  # [B, L, H]
        return self.output_proj(latents)  # [B, L, Dt]

    def _positions(self, mask: torch.Tensor) -> torch.Tensor:
        """Position encodings [B, N, H] of each sample's real patches, counted in mask order; 0 at padding."""
        counts = mask.sum(dim=-1)  # [B] real patches per sample
        rank = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # [B, N] index among the real patches
        positions = torch.zeros(*mask.shape, self.hidden_size, device=mask.device)
        for count in counts.unique().tolist():
            if count == 0:
                continue
            rows = counts == count
            table = patch_position_table(count, self.hidden_size, device=mask.device)  # [count, H]
            positions[rows] = table[rank[rows]]
        return positions * mask.unsqueeze(-1)


def patch_position_table(num_patches: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed position encodings [N, dim] for N patch features in raster order.

    The patch grid is not passed to a connector, so it is derived from N:
    - N = g^2 + k with k < g: k leading tokens that are not patches (CLS, DINOv2 registers: HF
      vision towers put them first) get zeros, the g x g grid gets 2D sincos (MAE / Qwen-VL);
    - anything else (e.g. a non-square grid): 1D sincos over the sequence, which still orders the
      patches in raster order. A g x (g+m) grid has at least g extra tokens, so it lands here.
    """
    side = math.isqrt(num_patches)
    extra = num_patches - side * side
    if extra < side:
        rows, cols = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
        half = dim // 2
        grid = torch.cat([_sincos(rows.flatten(), half), _sincos(cols.flatten(), dim - half)], dim=-1)  # [g*g, dim]
        return torch.cat([torch.zeros(extra, dim, device=device), grid], dim=0)
    return _sincos(torch.arange(num_patches, device=device), dim)


def _sincos(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """1D sin/cos encoding [P, dim] of integer positions (Transformer / MAE); an odd last column is 0."""
    quarter = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=positions.device, dtype=torch.float32) / max(quarter, 1))
    angles = positions.float().unsqueeze(-1) * omega  # [P, dim/2]
    encoding = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return nn.functional.pad(encoding, (0, dim - 2 * quarter))
