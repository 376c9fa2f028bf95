"""`--format llava`: write a vlkit model as a stock `LlavaForConditionalGeneration` folder.

Owns when the mapping is exact (`llava_blocker`), the weight-name mapping, the `LlavaConfig`
and the `LlavaProcessor` whose placeholder count equals vlkit's `image_seq_length`:

    vision_tower.*             -> model.vision_tower.*
    connector.layers.0 / .2    -> model.multi_modal_projector.linear_1 / linear_2
    language_model.model.*     -> model.language_model.*
    language_model.lm_head.*   -> lm_head.*          (dropped on save when tied to the embeddings)

Llava's `vision_feature_select_strategy: default` drops exactly one prefix token while vlkit's
drops `vision_num_prefix_tokens`, so `default` maps only for towers with one (CLIP, DINOv2).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from vlkit.feature_maps import is_convolutional
from vlkit.modeling import VlkitConfig, VlkitForConditionalGeneration
from vlkit.vision import image_size_of

WEIGHT_RENAMES: tuple[tuple[str, str], ...] = (
    ("vision_tower.", "model.vision_tower."),
    ("connector.layers.0.", "model.multi_modal_projector.linear_1."),
    ("connector.layers.2.", "model.multi_modal_projector.linear_2."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)


def connector_blocker(connector_config: dict[str, Any]) -> str | None:
    """Why a connector has no Llava counterpart, or None (checkable from a manifest, before loading)."""
    kind, depth = connector_config.get("type"), connector_config.get("depth", 2)
    if kind != "mlp" or depth != 2:
        shown = f"{kind} (depth {depth})" if kind == "mlp" else str(kind)
        return f"Llava's projector is an mlp connector of depth 2, this model's connector is {shown}"
    if connector_config.get("activation", "gelu") != "gelu":
        return f"Llava's projector uses gelu, this model's mlp connector uses {connector_config['activation']}"
    return None


def llava_image_seq_length(config: VlkitConfig, image_processor) -> int:
    """Placeholder tokens per image as LlavaProcessor counts them (patches + prefix, minus 1 for `default`)."""
    vision = config.vision_config
    height, width = image_size_of(image_processor, vision)
    count = (height // vision.patch_size) * (width // vision.patch_size) + config.vision_num_prefix_tokens
    return count - 1 if config.vision_feature_select_strategy == "default" else count


def llava_weight_name(name: str) -> str | None:
    for old, new in WEIGHT_RENAMES:
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def llava_config(config: VlkitConfig) -> LlavaConfig:
    return LlavaConfig(
        vision_config=copy.deepcopy(config.vision_config),
        text_config=copy.deepcopy(config.text_config),
        image_token_index=config.image_token_id,
        image_seq_length=config.image_seq_length,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_feature_layer=config.vision_feature_layer,
        multimodal_projector_bias=bool(config.connector_config.get("bias", True)),
        tie_word_embeddings=bool(getattr(config.text_config, "tie_word_embeddings", False)),
    )


def llava_blocker(model: VlkitForConditionalGeneration, processor) -> str | None:
    """Why this model cannot be written as a stock Llava model, or None when the mapping is exact."""
    config = model.config
    if is_convolutional(config.vision_config):
        return (f"the vision tower ({config.vision_config.model_type}) is convolutional and stock Llava reads "
                "token-sequence towers only")
    reason = connector_blocker(config.connector_config)
    if reason:
        return reason
    if not isinstance(config.vision_feature_layer, int):
        return f"vision_feature_layer {config.vision_feature_layer!r} is not a single layer"
    prefix = config.vision_num_prefix_tokens
    if config.vision_feature_select_strategy == "default" and prefix != 1:
        return (
            f"the vision tower has {prefix} prefix token(s) and vision_feature_select_strategy is 'default'; "
            "Llava's 'default' drops exactly 1"
        )
    if getattr(config.vision_config, "patch_size", None) is None:
        return f"the vision tower ({config.vision_config.model_type}) has no patch_size for LlavaProcessor"
    expected = llava_image_seq_length(config, processor.image_processor)
    if expected != config.image_seq_length:
        return f"LlavaProcessor would insert {expected} image tokens per image but this model uses {config.image_seq_length}"
    with torch.device("meta"):
        target = set(LlavaForConditionalGeneration(llava_config(config)).state_dict())
    mapped = {llava_weight_name(name) for name in model.state_dict()}
    if None in mapped:
        name = next(n for n in model.state_dict() if llava_weight_name(n) is None)
        return f"weight {name} has no place in a Llava model"
    if mapped != target:
        odd = sorted(mapped ^ target)[0]
        side = "has no place in" if odd in mapped else "is missing for"
        return f"weight {odd} {side} LlavaForConditionalGeneration (vision tower or LLM class is not what Llava builds)"
    return None


def to_llava(model: VlkitForConditionalGeneration) -> LlavaForConditionalGeneration:
    """The same weights under Llava's names, without copying them (built on the meta device, then assigned)."""
    config = llava_config(model.config)
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    state = {llava_weight_name(name): tensor for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied again below, to the embeddings
    result = llava.load_state_dict(state, strict=False, assign=True)
    expected_missing = ["lm_head.weight"] if config.tie_word_embeddings else []
    if sorted(result.missing_keys) != expected_missing or result.unexpected_keys:
        raise RuntimeError(f"llava mapping incomplete: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    if config.tie_word_embeddings:
        llava.tie_weights()
    dtype = next(model.parameters()).dtype
    for part in (config, config.vision_config, config.text_config):
        part.dtype = dtype
        part.name_or_path = ""  # the base folders are not needed (nor wanted) to load the export
    return llava.eval()


def llava_processor(model: VlkitForConditionalGeneration, processor) -> LlavaProcessor:
    config = model.config
    return LlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        # vlkit's template: the LLM's own, wrapped to render [{"type": "image"}, ...] as "<image>\n".
        chat_template=processor.chat_template,
        image_token=processor.image_token,
        num_additional_image_tokens=config.vision_num_prefix_tokens,
    )


def write_llava(
    model: VlkitForConditionalGeneration, processor, out: Path, generation_config: GenerationConfig, max_shard_size: str
) -> None:
    """config.json + safetensors + generation_config.json + processor files, all stock Llava."""
    llava = to_llava(model)
    llava.generation_config = generation_config
    llava.save_pretrained(out, max_shard_size=max_shard_size)
    llava_processor(model, processor).save_pretrained(out)
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json, for loaders that read only it
