"""Vision towers: load any Hugging Face vision model and describe the patch features it yields.

Owns the mapping from a folder or hub id to (vision model, image processor), including the
vision half of a two-tower `CLIPModel` / `SiglipModel` / `VisionTextDualEncoderModel` folder,
and the facts the rest of vlkit needs about a tower: its hidden width, how many prefix (CLS /
register) tokens precede the patches, and how many feature tokens an image becomes. Convolutional
towers (ResNet, ConvNext) yield feature maps, read as h * w tokens (`vlkit.feature_maps`).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    Dinov2Model,
    Dinov2WithRegistersModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionModel,
    VisionTextDualEncoderModel,
)

from vlkit.errors import ModelLoadError, first_line
from vlkit.feature_maps import as_tokens, is_convolutional

logger = logging.getLogger(__name__)

# model_type of the folder's config -> class that loads just the vision tower from it.
VISION_TOWER_CLASSES: dict[str, type[PreTrainedModel]] = {
    "clip": CLIPVisionModel,
    "clip_vision_model": CLIPVisionModel,
    "siglip": SiglipVisionModel,
    "siglip_vision_model": SiglipVisionModel,
    "dinov2": Dinov2Model,
    "dinov2_with_registers": Dinov2WithRegistersModel,
}


def vision_part(config: PretrainedConfig) -> PretrainedConfig:
    """The vision sub-config of a two-tower config, or the config itself."""
    return getattr(config, "vision_config", None) or config


def num_prefix_tokens(vision_config: PretrainedConfig) -> int:
    """Tokens before the patch tokens in the tower's hidden states (CLS, registers)."""
    model_type = vision_config.model_type
    if model_type.startswith("siglip") or is_convolutional(vision_config):
        return 0  # SigLIP has no CLS token; a feature map has only positions
    if model_type == "dinov2_with_registers":
        return 1 + int(vision_config.num_register_tokens)
    return 1  # CLIP, DINOv2 and most ViTs prepend one CLS token


def _height_width(size) -> tuple[int, int] | None:
    """(height, width) of a processor's size: a dict, or the SizeDict loaded processors hold (not a dict)."""
    if size is None:
        return None
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    height, width = get("height"), get("width")
    return (int(height), int(width)) if height and width else None


def image_size_of(image_processor, vision_config: PretrainedConfig) -> tuple[int, int]:
    """(height, width) of the pixel_values the processor produces."""
    crop = _height_width(getattr(image_processor, "crop_size", None))
    if getattr(image_processor, "do_center_crop", False) and crop:
        return crop
    size = _height_width(getattr(image_processor, "size", None))
    if size:
        return size
    image_size = getattr(vision_config, "image_size", 224)
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def num_patches(image_processor, vision_config: PretrainedConfig) -> int:
    """Patch tokens per image (prefix tokens excluded)."""
    height, width = image_size_of(image_processor, vision_config)
    patch = vision_config.patch_size
    return (height // patch) * (width // patch)


@torch.no_grad()
def num_feature_tokens(tower: PreTrainedModel, image_processor, layer: int = -2) -> int:
    """Feature tokens per image (prefix tokens excluded) at hidden_states[layer]."""
    if not is_convolutional(tower.config):
        return num_patches(image_processor, tower.config)
    # A CNN's map size follows from each stage's stride, padding and rounding, which differ between
    # architectures: one forward on a blank image of the processor's size measures it exactly.
    height, width = image_size_of(image_processor, tower.config)
    parameter = next(tower.parameters())
    blank = torch.zeros(1, tower.config.num_channels, height, width, device=parameter.device, dtype=parameter.dtype)
    return int(as_tokens(tower(pixel_values=blank, output_hidden_states=True).hidden_states[layer]).shape[1])


def default_image_processor(vision_config: PretrainedConfig):
    """A CLIP-style processor sized to the tower, for folders that ship none (e.g. config-built towers)."""
    image_size = getattr(vision_config, "image_size", 224)  # CNN configs need not name one
    size = image_size if isinstance(image_size, int) else image_size[0]
    # Without torchvision, transformers falls back to the PIL backend anyway (with a warning); pick it directly.
    processor_class = CLIPImageProcessorPil
    if importlib.util.find_spec("torchvision"):
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def save_default_image_processor(vision_config: PretrainedConfig, folder: str) -> None:
    """Save the default processor next to a config-built tower, so the folder is complete."""
    default_image_processor(vision_config).save_pretrained(folder)


def build_vision_tower_from_config(vision_config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised tower (tests, or stage 0 before training)."""
    return AutoModel.from_config(vision_part(vision_config))


def load_vision_tower(name_or_path: str, dtype: torch.dtype | None = None):
    """Load (vision tower, image processor) from a local folder or hub id."""
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except Exception as error:  # transformers raises OSError/ValueError/HF errors for missing repos
        hint = "a folder with config.json" if not Path(str(name_or_path)).exists() else "a folder whose config.json loads"
        raise ModelLoadError(
            f"cannot load vision tower '{name_or_path}': {first_line(error)}; give {hint} or a reachable hub id"
        ) from None
    tower_class = VISION_TOWER_CLASSES.get(config.model_type)
    try:
        if tower_class is not None:
            tower = tower_class.from_pretrained(name_or_path, dtype=dtype)
        elif config.model_type == "vision-text-dual-encoder":  # the CLIP stage's output with a CNN tower
            tower = VisionTextDualEncoderModel.from_pretrained(name_or_path, dtype=dtype).vision_model
        elif getattr(config, "vision_config", None) is not None:
            raise ModelLoadError(
                f"vision tower '{name_or_path}' is a '{config.model_type}' model whose vision half vlkit does not know how "
                f"to extract; known: {', '.join(sorted(VISION_TOWER_CLASSES))}"
            )
        else:
            tower = AutoModel.from_pretrained(name_or_path, dtype=dtype)
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"cannot load vision tower weights from '{name_or_path}': {first_line(error)}") from None
    try:
        image_processor = AutoImageProcessor.from_pretrained(name_or_path)
    except Exception:
        logger.info("no image processor in %s; using a CLIP-style default sized to the tower", name_or_path)
        image_processor = default_image_processor(tower.config)
    return tower, image_processor

