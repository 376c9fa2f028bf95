"""The `stage: clip` recipe schema (pydantic v2), built on the sections every stage shares.

The machinery (YAML, `a.b=value` overrides, one-line `ConfigError`s with a did-you-mean) and the
shared `data` / `train` keys come from `vlkit.config`; this module adds only what is the clip
stage's own (towers, loss, augmentation, optimizer settings). Relative data paths resolve against
`data.dir`; `data.dir` and `output_dir` resolve against the working directory (the repo root for
`make demo`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, model_validator

from vlkit.clip.loss import LOGIT_SCALE_INIT, LOGIT_SCALE_MAX
from vlkit.config import (
    BaseDataSection,
    BaseTrainSection,
    StrictSection,
    apply_overrides,
    read_yaml,
    validate_tree,
)


class DataSection(BaseDataSection):
    """`train_file`: CLIP pairs, JSONL or CSV; with `val_file`, zero-shot + retrieval eval runs on it at the end."""

    labels_file: str | None = None  # zero-shot classes + templates; default: zeroshot_labels.json next to val_file
    image_column: str = "image"
    caption_column: str = "caption"
    cache_images: bool = True  # keep decoded, resized images in memory after the first epoch


class TowerSection(StrictSection):
    """One tower: built from a config dict (random init) or loaded from a pretrained folder."""

    config: dict[str, Any] | None = None  # CLIPVisionConfig / CLIPTextConfig keyword arguments
    pretrained: str | None = None  # HF folder or hub id: a CLIPModel, or a single tower

    @model_validator(mode="after")
    def _one_source(self) -> TowerSection:
        if (self.config is None) == (self.pretrained is None):
            raise ValueError("give exactly one of `config` (train from scratch) or `pretrained` (a folder)")
        return self


class ModelSection(StrictSection):
    vision: TowerSection
    text: TowerSection
    projection_dim: int = Field(default=512, ge=1)
    lock: Literal["vision", "text"] | None = None  # LiT: freeze this (pretrained) tower
    tokenizer: str | None = None  # folder; default: the text tower's folder, or word-level from the captions
    max_text_length: int = Field(default=32, ge=2)
    logit_scale_init: float | None = Field(default=None, gt=0)  # default: 1/0.07 (clip), 10 (siglip)

    @model_validator(mode="after")
    def _lock_needs_pretrained(self) -> ModelSection:
        if self.lock and getattr(self, self.lock).pretrained is None:
            raise ValueError(f"lock: {self.lock} freezes a pretrained tower; set model.{self.lock}.pretrained")
        return self


class LossSection(StrictSection):
    type: Literal["clip", "siglip"] = "clip"
    gather_with_grad: bool = True  # exact multi-process gradients (open_clip's local loss)
    logit_scale_max: float = Field(default=LOGIT_SCALE_MAX, gt=1)
    siglip_bias_init: float = -10.0
    # siglip: an image is a positive of every copy of its caption in the batch, not a negative of the
    # copies (templated captions such as the shapes world's repeat within a batch). clip: no effect.
    same_caption_positive: bool = False


class AugmentSection(StrictSection):
    """Training-time augmentation. All off by default: in the shapes world colour is the label
    and position is in the captions, so colour jitter and crops would teach wrong answers."""

    random_resized_crop: bool = False
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: bool = False
    brightness: float = Field(default=0.4, ge=0)
    contrast: float = Field(default=0.4, ge=0)
    saturation: float = Field(default=0.4, ge=0)
    horizontal_flip: bool = False  # off by default: flips swap "left" and "right" in captions
    # The share of images shown in greyscale, and of the others whose hue is turned by a random angle
    # about the grey axis (greys stay grey; every colour moves round the colour wheel, with its lightness
    # and saturation kept). Each such image is paired with its caption from `colourless_caption_column`
    # (a caption without colour words, such as the shapes world's `shapes` column) when that is set, else
    # with its usual caption. Shape must then be read without colour's help. The column was called
    # `grayscale_caption_column` before hue rotation came; that name still reads.
    grayscale: float = Field(default=0.0, ge=0, le=1)
    hue_rotation: float = Field(default=0.0, ge=0, le=1)
    colourless_caption_column: str | None = Field(
        default=None, validation_alias=AliasChoices("colourless_caption_column", "grayscale_caption_column"))
    # The share of the other pairs whose caption comes from `caption_swap_column` instead, the image
    # unchanged (the shapes world's `shapes`: "a circle and a star" for a red circle and a blue star).
    # Such a caption is told apart from the batch's other captions by shape alone, and is true of the
    # image in any colour, so the tower cannot lean on colour to tell the shapes apart.
    caption_swap: float = Field(default=0.0, ge=0, le=1)
    caption_swap_column: str | None = None

    @model_validator(mode="after")
    def _swap_needs_column(self) -> AugmentSection:
        if self.caption_swap > 0 and not self.caption_swap_column:
            raise ValueError("caption_swap draws captions from another column; set augment.caption_swap_column")
        return self


class TrainSection(BaseTrainSection):
    """The shared train keys with CLIP's defaults, plus the optimizer settings contrastive training tunes."""

    batch_size: int = Field(default=128, ge=2)  # per process; contrastive loss needs >= 2
    learning_rate: float = Field(default=5e-4, gt=0)
    epochs: float = Field(default=10, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    optimizer: str = "adamw_torch"  # any TrainingArguments.optim name
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98  # CLIP paper; steadier than 0.999 for contrastive training
    adam_epsilon: float = 1e-6
    fp16: bool = False
    eval_batch_size: int = Field(default=128, ge=1)

    @model_validator(mode="after")
    def _one_half_precision(self) -> TrainSection:
        # bf16 `auto` turns bf16 on where the GPU computes it, and transformers refuses fp16 and bf16 together.
        if self.fp16 and self.bf16 is not False:
            raise ValueError(f"fp16 and bf16 ({self.bf16}) cannot both be on; set train.bf16: false to train in fp16")
        return self


class ClipRecipe(StrictSection):
    stage: Literal["clip"] = "clip"
    output_dir: str
    overwrite: bool = False  # replace a finished (or interrupted) run in output_dir
    resume: bool | str = False  # true: the newest checkpoint in output_dir/checkpoints; or a checkpoint path
    data: DataSection
    model: ModelSection
    loss: LossSection = Field(default_factory=LossSection)
    augment: AugmentSection = Field(default_factory=AugmentSection)
    train: TrainSection = Field(default_factory=TrainSection)

    def logit_scale_init(self) -> float:
        """ln of the initial logit scale, as `CLIPConfig.logit_scale_init_value` stores it."""
        scale = self.model.logit_scale_init or (LOGIT_SCALE_INIT if self.loss.type == "clip" else 10.0)
        return math.log(min(scale, self.loss.logit_scale_max))


def parse_clip_recipe(tree: dict) -> ClipRecipe:
    """Validate a recipe dict; a bad key or value raises a one-line `ConfigError`."""
    return validate_tree(tree, ClipRecipe)


def load_clip_recipe(path: str | Path, overrides: list[str] | None = None) -> ClipRecipe:
    """Read a `stage: clip` recipe YAML, apply `a.b=value` overrides, validate it."""
    return parse_clip_recipe(apply_overrides(read_yaml(path), overrides))
