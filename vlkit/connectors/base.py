"""The connector contract shared by every connector.

A connector maps vision-tower patch features to LLM input embeddings:

    forward(features[B, N, Dv], mask[B, N] | None) -> tokens[B, M, Dt]
    num_tokens(N) -> M

`mask` is True at real patches and False at padding; connectors that pool or attend across
patches must ignore padded ones. Connectors with a fixed output (Q-Former, resampler) return
the same M for every N.
"""

from __future__ import annotations

import torch
from torch import nn


class Connector(nn.Module):
    """Base class: subclasses set `connector_type` and implement `forward` and `num_tokens`."""

    connector_type: str = ""

    def __init__(self, vision_hidden_size: int, text_hidden_size: int) -> None:
        super().__init__()
        self.vision_hidden_size = vision_hidden_size
        self.text_hidden_size = text_hidden_size

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def num_tokens(self, num_patches: int) -> int:
        raise NotImplementedError

    def use_llm_embeddings(self, table: torch.Tensor) -> None:
        """Called with the LLM's input embeddings [V, Dt] when the model is built; a connector that
        speaks in the LLM's words (visual_words) copies the rows it needs, the others ignore it."""
