"""`build_vlm`: assemble a VLM from a vision tower, a connector config and an LLM.

    model, processor = build_vlm(vision="openai/clip-vit-large-patch14-336",
                                 llm="smollm2-135m-instruct", connector={"type": "mlp"})

Owns the joining decisions: the `<image>` special token (added to the tokenizer and the LLM's
embeddings if missing), how many placeholder tokens an image becomes, and the check that the
connector's output fits the LLM.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vlkit.compat import attention_implementation
from vlkit.connectors.registry import CONNECTORS, build_connector, connector_options, log_connector_summary
from vlkit.errors import ConfigError
from vlkit.feature_maps import feature_width
from vlkit.llm import DEFAULT_LLM, load_llm
from vlkit.modeling import IMAGE_TOKEN, VlkitConfig, VlkitForConditionalGeneration
from vlkit.processing import VlkitProcessor, system_prompt_template
from vlkit.vision import load_vision_tower, num_feature_tokens, num_prefix_tokens

logger = logging.getLogger(__name__)



def add_image_token(tokenizer: PreTrainedTokenizerBase, language_model: PreTrainedModel) -> int:
    """Make `<image>` a special token of the tokenizer (and the LLM's vocabulary); return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any real token serves
    rows = language_model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        # New rows are the mean of the old ones, not random: a run dir stores only what was
        # trained, so rebuilding the model must reproduce these rows exactly.
        with torch.no_grad():
            for embedding in {language_model.get_input_embeddings(), language_model.get_output_embeddings()}:
                if embedding is not None and embedding.weight.shape[0] > rows:
                    embedding.weight[rows:] = embedding.weight[:rows].mean(dim=0)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def check_connector_fits(connector: torch.nn.Module, num_patch_tokens: int, vision_width: int, text_width: int) -> int:
    """Run the connector once on zeros; return its token count or raise ConfigError on a width mismatch."""
    with torch.no_grad():
        dtype = next(connector.parameters()).dtype
        out = connector(torch.zeros(1, num_patch_tokens, vision_width, dtype=dtype))
    if out.shape[-1] != text_width:
        raise ConfigError(
            f"connector '{connector.connector_type}' outputs width {out.shape[-1]} but the LLM's hidden size is "
            f"{text_width}; set the connector's output to the LLM width"
        )
    expected = connector.num_tokens(num_patch_tokens)
    if out.shape[1] != expected:
        raise ConfigError(
            f"connector '{connector.connector_type}' made {out.shape[1]} tokens but num_tokens({num_patch_tokens}) "
            f"says {expected}; its num_tokens is wrong"
        )
    return expected


def build_vlm(
    vision: str,
    llm: str = DEFAULT_LLM,
    connector: dict[str, Any] | str = "mlp",
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    dtype: torch.dtype | None = None,
    llm_quantization_config=None,
    attn_implementation: str | None = None,
    system_prompt: str | None = None,
) -> tuple[VlkitForConditionalGeneration, VlkitProcessor]:
    """Load the vision tower and LLM, build the connector, and return (model, processor).

    system_prompt: replaces the LLM template's default system turn (SmolLM2's is ~15 tokens of
    every sample) in conversations that bring none; None keeps the template as it is.
    """
    connector_config = {"type": connector} if isinstance(connector, str) else dict(connector)
    if vision_feature_select_strategy not in ("default", "full"):
        raise ConfigError(
            f"vision_feature_select_strategy must be 'default' or 'full', got '{vision_feature_select_strategy}'"
        )
    vision_tower, image_processor = load_vision_tower(vision, dtype=dtype)
    language_model, tokenizer = load_llm(
        llm, dtype=dtype, quantization_config=llm_quantization_config, attn_implementation=attn_implementation
    )
    image_token_id = add_image_token(tokenizer, language_model)
    if system_prompt is not None:
        if not tokenizer.chat_template:
            raise ConfigError("system_prompt needs an LLM with a chat template; this tokenizer has none")
        tokenizer.chat_template = system_prompt_template(tokenizer.chat_template, system_prompt)

    vision_config = vision_tower.config
    text_config = language_model.config
    prefix = num_prefix_tokens(vision_config)
    patch_tokens = num_feature_tokens(vision_tower, image_processor, vision_feature_layer)
    if vision_feature_select_strategy == "full":
        patch_tokens += prefix
    vision_width = feature_width(vision_config, vision_feature_layer)  # a CNN's stages differ in width
    kind = connector_config.get("type")
    if kind in CONNECTORS and "num_patches" in connector_options(kind) and "num_patches" not in connector_config:
        connector_config["num_patches"] = patch_tokens  # a reader over all patches is sized by their count
    probe = build_connector(connector_config, vision_width, text_config.hidden_size)
    probe.use_llm_embeddings(language_model.get_input_embeddings().weight)
    image_seq_length = check_connector_fits(probe, patch_tokens, vision_width, text_config.hidden_size)

    config = VlkitConfig(
        vision_config=vision_config,
        text_config=text_config,
        # A connector may resolve its options (e.g. a Q-Former read from a BLIP-2 folder) so the
        # saved config rebuilds it without that folder.
        connector_config=getattr(probe, "resolved_config", connector_config),
        image_token=IMAGE_TOKEN,
        image_token_id=image_token_id,
        image_seq_length=image_seq_length,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        vision_num_prefix_tokens=prefix,
        # Keep the attention implementation each part was loaded with (a plain value would reset both).
        attn_implementation={
            "vision_config": attention_implementation(vision_config),
            "text_config": attention_implementation(text_config),
        },
    )
    model = VlkitForConditionalGeneration(config, vision_tower=vision_tower, language_model=language_model)
    model.connector.load_state_dict(probe.state_dict())
    if dtype is not None:
        model.connector.to(dtype)
    # Never generate a placeholder token: it has no meaning as output.
    model.generation_config.bad_words_ids = [[image_token_id]]
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = VlkitProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=image_seq_length, image_token=IMAGE_TOKEN
    )
    log_connector_summary(model.connector, patch_tokens)
    return model, processor
