"""Convolutional vision towers (HF ResNet, ConvNext, RegNet): their feature maps read as tokens.

A ViT's hidden states are token sequences [B, P + N, D]. A CNN's (`output_hidden_states=True`)
are feature maps [B, C, h, w]: the stem's output, then each stage's, each stage with its own
width. The connector reads a map as h * w tokens of width C, row by row, so every connector
(and pixel_shuffle's 2-D folding) works on it unchanged.

Imports nothing of vlkit: `vlkit export --format vlkit` ships this file with the model code.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

# model_type of the towers whose hidden states are feature maps; their stem is hidden_states[0].
CONVOLUTIONAL_TOWERS = ("resnet", "convnext", "convnextv2", "regnet")


def is_convolutional(vision_config: PretrainedConfig) -> bool:
    """True for a tower whose hidden states are [B, C, h, w] feature maps."""
    return vision_config.model_type in CONVOLUTIONAL_TOWERS


def tower_input(pixel_values: torch.Tensor, vision_config: PretrainedConfig, dtype: torch.dtype) -> torch.Tensor:
    """pixel_values as the tower reads them fastest: its dtype, and for a CNN the channels-last layout,
    in which oneDNN's CPU convolutions (and cuDNN's tensor-core ones) run; the weights stay as they are,
    so saved checkpoints are unchanged (bench/clip.py measures the step)."""
    pixel_values = pixel_values.to(dtype)
    if is_convolutional(vision_config) and pixel_values.dim() == 4:
        return pixel_values.contiguous(memory_format=torch.channels_last)
    return pixel_values


def feature_width(vision_config: PretrainedConfig, layer: int) -> int:
    """Width of the tower's hidden_states[layer]: a ViT's hidden_size, a CNN stage's channels."""
    if not is_convolutional(vision_config):
        return int(vision_config.hidden_size)
    # ResNet and RegNet name their stem's width embedding_size; ConvNext's stem has the first stage's.
    stem = getattr(vision_config, "embedding_size", vision_config.hidden_sizes[0])
    return int([stem, *vision_config.hidden_sizes][layer])


def as_tokens(hidden_state: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h * w, C] (row-major); a token sequence [B, N, D] passes unchanged."""
    if hidden_state.dim() == 4:
        return hidden_state.flatten(2).transpose(1, 2)
    return hidden_state
