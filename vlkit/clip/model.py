"""Stage-0 model wiring: a `transformers.CLIPModel` built from a recipe, plus its training wrapper.

Three ways to start, per tower: from a config dict (random init), from a pretrained folder (a full
`CLIPModel` folder gives its tower *and* projection; a `CLIPVisionModel` / `CLIPTextModel` folder
gives the tower, with a fresh projection), and locked (LiT: the pretrained tower, and its
projection if it came with one, are frozen and kept in eval mode).

The trained artefact is a stock `CLIPModel`; with a convolutional image tower (`model.vision.config:
{model_type: resnet, image_size: 64, ...}`, or a ResNet / ConvNext folder) it is a stock
`VisionTextDualEncoderModel` (same tower, projection and logit-scale names; vlkit's VLM stages
read its vision half). `ContrastiveModel` only adds what training needs around it (the loss, and
SigLIP's learnable bias, which is not saved: it shifts every logit equally, so ranking,
zero-shot and retrieval do not depend on it). `image_embeds` / `text_embeds` embed with either.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)
from transformers.modeling_outputs import ModelOutput

from vlkit.clip.loss import build_loss, text_keys
from vlkit.clip.recipe import ClipRecipe, TowerSection
from vlkit.clip.tokenizer import build_word_tokenizer
from vlkit.errors import ConfigError, ModelLoadError
from vlkit.feature_maps import CONVOLUTIONAL_TOWERS, is_convolutional, tower_input

logger = logging.getLogger(__name__)

try:  # transformers 5 without torchvision: the PIL backend is what `CLIPImageProcessor` resolves to
    from transformers import CLIPImageProcessorPil as _ImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import CLIPImageProcessor as _ImageProcessor


def clip_image_processor(image_size: int):
    """A CLIP image processor (resize shortest edge + centre crop + CLIP mean/std) for `image_size`."""
    return _ImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


@dataclass
class LoadedTower:
    tower: nn.Module  # CLIPVisionModel | CLIPTextModel
    projection: nn.Linear | None  # None: the folder had none, a fresh one is trained
    folder: str | None


def _load_tower(section: TowerSection, kind: str) -> LoadedTower:
    """Load a pretrained vision/text tower (and its projection, from a full CLIP folder)."""
    path = section.pretrained
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read model.{kind}.pretrained '{path}': {str(error).splitlines()[0]}") from None
    if config.model_type == "clip":
        clip = CLIPModel.from_pretrained(path)
        if kind == "vision":
            return LoadedTower(clip.vision_model, clip.visual_projection, path)
        return LoadedTower(clip.text_model, clip.text_projection, path)
    if kind == "vision" and is_convolutional(config):
        return LoadedTower(AutoModel.from_pretrained(path), None, path)
    tower_types = {"vision": ("clip_vision_model", CLIPVisionModel), "text": ("clip_text_model", CLIPTextModel)}
    model_type, tower_class = tower_types[kind]
    if config.model_type != model_type:
        also = f", '{model_type}' or {' / '.join(CONVOLUTIONAL_TOWERS)}" if kind == "vision" else f" or '{model_type}'"
        raise ConfigError(
            f"model.{kind}.pretrained '{path}' is a '{config.model_type}' model; a CLIP {kind} tower needs a 'clip'{also} folder"
        )
    return LoadedTower(tower_class.from_pretrained(path), None, path)


def vision_config_from(settings: dict) -> PretrainedConfig:
    """`model.vision.config` as a config: CLIPVisionConfig keywords, or `model_type: resnet` (etc.) and its keywords."""
    settings = dict(settings)
    model_type = settings.pop("model_type", "clip_vision_model")
    if model_type != "clip_vision_model" and model_type not in CONVOLUTIONAL_TOWERS:
        raise ConfigError(
            f"model.vision.config.model_type '{model_type}' is not a CLIP-trainable image tower; "
            f"use clip_vision_model or {', '.join(CONVOLUTIONAL_TOWERS)}"
        )
    if model_type != "clip_vision_model" and "image_size" not in settings:
        raise ConfigError(f"model.vision.config needs image_size for a {model_type} tower (it sizes the image processor)")
    return CONFIG_MAPPING[model_type](**settings)


def build_tokenizer(recipe: ClipRecipe, captions: list[str], extra_texts: list[str] = (),
                    folder: str | None = None) -> PreTrainedTokenizerBase:
    """The text tower's tokenizer: `folder`'s (a checkpoint resumed), else `model.tokenizer`, else the pretrained
    text folder's, else a word-level tokenizer trained on the captions (+ zero-shot class names and templates)."""
    folder = folder or recipe.model.tokenizer or recipe.model.text.pretrained
    if folder:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot load a tokenizer from '{folder}': {str(error).splitlines()[0]}") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return build_word_tokenizer([*captions, *extra_texts], model_max_length=recipe.model.max_text_length)


def build_image_processor(recipe: ClipRecipe, vision_config: PretrainedConfig):
    """The pretrained vision folder's image processor, or a CLIP one sized to the tower."""
    if recipe.model.vision.pretrained:
        try:
            return AutoImageProcessor.from_pretrained(recipe.model.vision.pretrained)
        except (OSError, ValueError):
            logger.warning("no image processor in %s; using a CLIP one", recipe.model.vision.pretrained)
    return clip_image_processor(int(getattr(vision_config, "image_size", 224)))  # CNN configs need not name one


def two_tower_model(recipe: ClipRecipe, vision_config: PretrainedConfig, text_config: PretrainedConfig) -> PreTrainedModel:
    """A `CLIPModel`, or a `VisionTextDualEncoderModel` around a convolutional image tower."""
    common = {"projection_dim": recipe.model.projection_dim, "logit_scale_init_value": recipe.logit_scale_init()}
    if not is_convolutional(vision_config):
        return CLIPModel(CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), **common))
    vision_config = copy.deepcopy(vision_config)
    # The dual encoder sizes its projection from vision_config.hidden_size: the pooled last stage's width.
    vision_config.hidden_size = vision_config.hidden_sizes[-1]
    config = VisionTextDualEncoderConfig(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), **common)
    return VisionTextDualEncoderModel(config)


def build_clip_model(recipe: ClipRecipe, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A `CLIPModel` (or dual encoder, see `two_tower_model`) with towers from configs or folders, locked tower frozen."""
    model_section = recipe.model
    loaded = {
        kind: _load_tower(section, kind)
        for kind, section in (("vision", model_section.vision), ("text", model_section.text))
        if section.pretrained
    }
    if "vision" in loaded:
        vision_config = loaded["vision"].tower.config
    else:
        vision_config = vision_config_from(model_section.vision.config)
    if "text" in loaded:
        text_config = loaded["text"].tower.config
    else:
        text_kwargs = {"max_position_embeddings": model_section.max_text_length, **model_section.text.config}
        text_config = CLIPTextConfig(
            **text_kwargs,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    if text_config.eos_token_id != tokenizer.eos_token_id:
        raise ConfigError(
            f"the tokenizer's eos id ({tokenizer.eos_token_id}) differs from the text tower's "
            f"eos_token_id ({text_config.eos_token_id}); CLIP pools at eos, so they must agree"
        )
    model = two_tower_model(recipe, vision_config, text_config)

    frozen: list[nn.Module] = []
    for kind, part in loaded.items():
        tower = model.vision_model if kind == "vision" else model.text_model
        projection = model.visual_projection if kind == "vision" else model.text_projection
        tower.load_state_dict(part.tower.state_dict())
        projection_loaded = part.projection is not None and part.projection.weight.shape == projection.weight.shape
        if projection_loaded:
            projection.load_state_dict(part.projection.state_dict())
        elif part.projection is not None:
            logger.warning(
                "%s projection of %s has shape %s, the recipe's projection_dim gives %s: training a fresh one",
                kind, part.folder, tuple(part.projection.weight.shape), tuple(projection.weight.shape),
            )
        if model_section.lock == kind:
            frozen.append(tower)
            if projection_loaded:
                frozen.append(projection)
    for module in frozen:
        module.requires_grad_(False)
        module.eval()
    return model


def image_embeds(model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected, unnormalised image embeddings [B, D] (what `CLIPModel.get_image_features` gives).

    A ResNet pools to [B, C, 1, 1]; flattened here, because the dual encoder's own
    `get_image_features` would project it along the wrong axis.
    """
    vision = model.vision_model
    pixels = tower_input(pixel_values, vision.config, pixel_values.dtype)
    return model.visual_projection(vision(pixel_values=pixels).pooler_output.flatten(1))


def text_embeds(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Projected, unnormalised text embeddings [B, D] (what `CLIPModel.get_text_features` gives)."""
    return model.text_projection(model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output)


class ContrastiveModel(nn.Module):
    """What the Trainer trains: a `CLIPModel` (or dual encoder) plus its loss (and SigLIP's bias).

    forward(pixel_values[B, 3, H, W], input_ids[B, T], attention_mask[B, T]) ->
    ModelOutput(loss, image_embeds[B, D], text_embeds[B, D]); embeddings are L2-normalised.
    Computing the loss inside forward keeps the gather inside DDP's forward/backward.
    """

    def __init__(self, clip: PreTrainedModel, loss_type: str = "clip", gather_with_grad: bool = True, siglip_bias_init: float = -10.0,
                 same_caption_positive: bool = False):
        super().__init__()
        self.clip = clip
        self.loss_fn = build_loss(loss_type, gather_with_grad)
        self.same_caption_positive = same_caption_positive and loss_type == "siglip"
        self.logit_bias = nn.Parameter(torch.tensor(siglip_bias_init)) if loss_type == "siglip" else None
        self.config = clip.config  # Trainer reads model.config in a few places

    def _locked(self, module: nn.Module) -> bool:
        return not any(p.requires_grad for p in module.parameters())

    def train(self, mode: bool = True) -> ContrastiveModel:
        super().train(mode)
        for module in (self.clip.vision_model, self.clip.text_model, self.clip.visual_projection, self.clip.text_projection):
            if self._locked(module):
                module.eval()  # a locked (LiT) tower stays in eval mode
        return self

    def _embed(self, locked: bool, fn, *inputs) -> torch.Tensor:
        if locked:
            with torch.no_grad():  # no activations kept for a frozen tower
                return fn(self.clip, *inputs)
        return fn(self.clip, *inputs)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ModelOutput:
        clip = self.clip
        image = self._embed(
            self._locked(clip.vision_model) and self._locked(clip.visual_projection), image_embeds, pixel_values
        )
        text = self._embed(
            self._locked(clip.text_model) and self._locked(clip.text_projection), text_embeds, input_ids, attention_mask
        )
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        keys = text_keys(input_ids, attention_mask) if self.same_caption_positive else None
        loss = self.loss_fn(image, text, clip.logit_scale, self.logit_bias, keys)
        return ModelOutput(loss=loss, image_embeds=image, text_embeds=text)


def save_clip_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, image_processor, out_dir: str | Path) -> Path:
    """Write a standard HF CLIP folder: model (safetensors) + CLIPProcessor (image processor + tokenizer)."""
    from transformers import CLIPProcessor

    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    # CLIPProcessor's tokenizer check wants a CLIP tokenizer class; save the two parts plus a
    # processor_config.json so both AutoProcessor and the parts load from the folder.
    image_processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    try:
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    except (TypeError, ValueError) as error:  # the parts alone still load with Auto* classes
        logger.info("CLIPProcessor not saved (%s); image processor and tokenizer are", error)
    return out_dir
