"""VlkitConfig and VlkitForConditionalGeneration: vision tower -> connector -> causal LM.

A stock `PreTrainedModel` + `GenerationMixin`, registered with `AutoConfig` and
`AutoModelForImageTextToText`, so `save_pretrained`, `from_pretrained`, `generate` and
`push_to_hub` are the library's own. Image features replace the embeddings of the image
placeholder tokens (`image_token_id`), in order, across the whole batch: a sample may hold
any number of images, or none.

Shapes: pixel_values [I, 3, H, W] (I = images in the batch, in placeholder order);
vision hidden states [I, P + N, Dv] (P prefix tokens, N patches); connector output
[I, M, Dt]; input_ids [B, T] with I * M placeholder tokens in total.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlkit.compat import cache_argument, cache_keyword, mark_pretrained, reruns_in_backward
from vlkit.connectors import build_connector
from vlkit.errors import ImageTokenMismatchError
from vlkit.feature_maps import as_tokens, feature_width, tower_input
from vlkit.last_layer import hooks_see_every_call, last_decoder_layer, last_layer_at, trims_last_layer

logger = logging.getLogger(__name__)

# The text-format constants every layer shares: the image placeholder and the label of positions that
# are not trained on (the value transformers' losses ignore).
IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100


class VlkitConfig(PretrainedConfig):
    """Composite config: `vision_config` + `connector_config` + `text_config` and how they join.

    vision_feature_layer: which hidden state of the tower feeds the connector (-2 = penultimate).
    vision_feature_select_strategy: "default" drops the tower's prefix (CLS/register) tokens,
        "full" keeps them.
    vision_num_prefix_tokens: how many prefix tokens the tower emits (1 for CLIP, 0 for SigLIP).
    image_seq_length: placeholder tokens per image = connector.num_tokens(patches).
    """

    model_type = "vlkit"
    # The plain mapping form every transformers 5 release reads; the sub-configs are built below.
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}
    default_sub_model_types = {"vision_config": "clip_vision_model", "text_config": "llama"}

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    connector_config: dict | None = None
    image_token: str = IMAGE_TOKEN
    image_token_id: int = -1
    image_seq_length: int = 0
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    vision_num_prefix_tokens: int = 1
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        for key, default_type in self.default_sub_model_types.items():
            sub_config = getattr(self, key)
            if sub_config is None:
                sub_config = {}
            if isinstance(sub_config, dict):
                sub_config = CONFIG_MAPPING[sub_config.get("model_type", default_type)](**sub_config)
            setattr(self, key, sub_config)
        # A training switch that older vlkit versions stored here; the model holds it now.
        kwargs.pop("logits_at_labels_only", None)
        super().__post_init__(**kwargs)
        if self.connector_config is None:
            self.connector_config = {"type": "mlp", "depth": 2}
        # Tying lives in the LLM's own config; mirror it so the top-level model reports it.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))


def packed_sample_lengths(position_ids: torch.Tensor) -> list[int]:
    """The lengths of the samples packed into a one-row batch: a sample starts where the position ids
    do not continue by one (the rule of transformers' `find_packed_sequence_indices`)."""
    row = position_ids.reshape(-1)
    starts = [0, *((row[1:] - row[:-1] != 1).nonzero().flatten() + 1).tolist(), len(row)]
    return [end - start for start, end in zip(starts[:-1], starts[1:])]


def labels_read_at(labels: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) where the LM head reads for a loss on `labels` [B, T]: each position whose next
    label is supervised, row-major."""
    return (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)


def turn_weights(supervised: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """[B, T] bool of supervised positions -> a weight per supervised position (row-major): 1 / n ** power,
    n the length of its run of consecutive supervised positions (one answer turn). Power 1: each turn
    weighs 1 in all; 0.5 (InternVL 2.5's square averaging): a turn of n tokens weighs sqrt(n)."""
    starts = supervised.clone()
    starts[:, 1:] &= ~supervised[:, :-1]
    turn = starts.flatten().cumsum(0)[supervised.flatten()]  # 1-based turn id of each supervised position
    return torch.bincount(turn)[turn].float().pow(-power)


@dataclass
class VlkitCausalLMOutputWithPast(CausalLMOutputWithPast):
    """The LLM's own output fields (whatever transformers names them), plus the image tokens."""

    image_hidden_states: torch.Tensor | None = None  # [I, M, Dt]: the connector's output


class VlkitPreTrainedModel(PreTrainedModel):
    config_class = VlkitConfig
    config: VlkitConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False


class VlkitForConditionalGeneration(VlkitPreTrainedModel, GenerationMixin):
    """Vision tower + connector + causal LM.

    `vision_tower` and `language_model` may be passed in already loaded (what `build_vlm` does);
    otherwise they are built from the config (what `from_pretrained` does before loading weights).
    """

    def __init__(
        self,
        config: VlkitConfig,
        vision_tower: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ) -> None:
        super().__init__(config)
        self.vision_tower = vision_tower if vision_tower is not None else AutoModel.from_config(config.vision_config)
        self.connector = build_connector(
            config.connector_config,
            feature_width(config.vision_config, config.vision_feature_layer),
            config.text_config.hidden_size,
        )
        self.language_model = (
            language_model if language_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        )
        # Pretrained parts keep their weights: mark them initialised before post_init runs the init pass.
        for pretrained in (vision_tower, language_model):
            if pretrained is not None:
                mark_pretrained(pretrained)
        # Training-only: apply the LM head at supervised positions only. Off unless the training code
        # turns it on with `use_loss_at_labels()`, which first checks that the loss stays the LLM's own.
        self.logits_at_labels_only = False
        # With it, the last decoder layer's position-wise parts run at supervised positions only
        # (`vlkit.last_layer`), where `use_loss_at_labels()` finds that gives the same loss.
        self.trim_last_layer = False
        # Training-only too (`train.loss_average: turn | square`): the labels-only loss weighs each answer
        # turn's tokens by 1 / length ** this power (None: the plain token average).
        self.loss_turn_power: float | None = None
        self.post_init()

    # --- embeddings: the LLM's ------------------------------------------------------------------
    def get_input_embeddings(self) -> torch.nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> torch.nn.Module:
        return self.language_model.get_decoder()

    # --- images ---------------------------------------------------------------------------------
    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features the connector consumes: [I, 3, H, W] -> [I, N, Dv]."""
        pixels = tower_input(pixel_values, self.vision_tower.config, next(self.vision_tower.parameters()).dtype)
        outputs = self.vision_tower(pixel_values=pixels, output_hidden_states=True)
        features = as_tokens(outputs.hidden_states[self.config.vision_feature_layer])  # a CNN's map: h*w tokens
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, self.config.vision_num_prefix_tokens :]
        return features

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """Image tokens for the LLM: [I, 3, H, W] -> [I, M, Dt]."""
        features = self.get_vision_features(pixel_values)
        connector_dtype = next(self.connector.parameters()).dtype
        return self.connector(features.to(connector_dtype))

    def merge_image_features(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Write image features into the placeholder positions, in order."""
        placeholder_mask = input_ids == self.config.image_token_id
        num_placeholders = int(placeholder_mask.sum())
        num_features = image_features.shape[0] * image_features.shape[1]
        if num_placeholders != num_features:
            raise ImageTokenMismatchError(
                f"the batch has {num_placeholders} image placeholder tokens but {image_features.shape[0]} image(s) of "
                f"{image_features.shape[1]} tokens = {num_features}; build inputs with the model's VlkitProcessor"
            )
        return inputs_embeds.masked_scatter(
            placeholder_mask.unsqueeze(-1), image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        vision_features: torch.Tensor | None = None,
        prefix_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> VlkitCausalLMOutputWithPast:
        """`vision_features` [I, N, Dv]: the tower's output computed earlier (`get_vision_features`, the
        feature cache of `vlkit.features`, or a chat's earlier turn); given instead of pixel_values, only
        the connector runs. The key/value cache travels in `kwargs` to the LLM untouched, under the name
        the installed transformers gives it. `prefix_ids` [B, P] (the same row B times): text every row
        starts with, passed once by the training collator (`vlkit.data.prefix`); input_ids are then each
        row's remainder and attention_mask covers both."""
        cache = cache_argument(kwargs)
        if prefix_ids is not None:
            if cache is not None or inputs_embeds is not None:
                raise ValueError("prefix_ids are for training batches of input_ids, without a cache")
            if not bool((prefix_ids == prefix_ids[:1]).all()):
                raise ValueError("prefix_ids must be the same row repeated: the prefix every sample shares")
            # Only for a frozen LLM: its prefix then needs no backward through a second decoder call, which
            # sharding cannot give (FSDP2 frees a module's parameters after each call). Not under
            # checkpointing either: the rerun layers would append to the prefix's cache again.
            frozen = not any(p.requires_grad for p in self.language_model.parameters())
            checkpointing = reruns_in_backward(self.language_model.get_decoder())
            if labels is not None and self.logits_at_labels_only and frozen and not checkpointing:
                kwargs[cache_keyword(self.language_model.get_decoder().forward)] = self.prefix_cache(prefix_ids)
            else:  # the LLM's own loss, an LLM that trains, or checkpointing: the rows whole again
                input_ids, labels, position_ids = self.rows_with_prefix(prefix_ids, input_ids, labels, position_ids)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_features = None
        if pixel_values is not None and vision_features is not None:
            raise ValueError("pass pixel_values or vision_features, not both")
        if pixel_values is not None or vision_features is not None:
            if input_ids is None:
                raise ValueError("pixel_values need input_ids to locate the image placeholder tokens")
            if vision_features is not None:  # the frozen tower's output, computed once: only the connector runs
                image_features = self.connector(vision_features.to(next(self.connector.parameters()).dtype))
            else:
                image_features = self.get_image_features(pixel_values)
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
        elif input_ids is not None and cache is None and (input_ids == self.config.image_token_id).any():
            raise ImageTokenMismatchError(
                "the inputs hold image placeholder tokens but no pixel_values; pass the images too"
            )
        if labels is not None and (cache is None or prefix_ids is not None) and self.logits_at_labels_only:
            loss = self.loss_at_labels(inputs_embeds, attention_mask, position_ids, labels, **kwargs)
            return VlkitCausalLMOutputWithPast(loss=loss, image_hidden_states=image_features)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        return VlkitCausalLMOutputWithPast(**outputs, image_hidden_states=image_features)

    @torch.no_grad()
    def prefix_cache(self, prefix_ids: torch.LongTensor):
        """Keys and values of the shared prefix (text only, through the frozen LLM), computed for one row
        and repeated for all B rows."""
        from transformers import DynamicCache

        decoder = self.language_model.get_decoder()
        cache = DynamicCache(config=self.config.text_config)
        decoder(input_ids=prefix_ids[:1], use_cache=True, **{cache_keyword(decoder.forward): cache})
        cache.batch_repeat_interleave(prefix_ids.shape[0])
        return cache

    @staticmethod
    def rows_with_prefix(prefix_ids, input_ids, labels, position_ids):
        """The batch without the shared prefix: each row's prefix written back in front of it (in a flat
        row, in front of each of its samples)."""
        prefix_length = prefix_ids.shape[1]
        lengths = packed_sample_lengths(position_ids) if position_ids is not None and len(input_ids) == 1 else []
        if len(lengths) > 1:
            prefix = prefix_ids[0]

            def with_prefix(row: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
                return torch.cat([piece for part in row[0].split(lengths) for piece in (fill, part)])[None]

            ignored = torch.full_like(prefix, IGNORE_INDEX)
            start = torch.arange(prefix_length, device=position_ids.device)
            return (with_prefix(input_ids, prefix), None if labels is None else with_prefix(labels, ignored),
                    with_prefix(position_ids, start))
        input_ids = torch.cat([prefix_ids, input_ids], dim=1)
        if labels is not None:
            labels = torch.cat([torch.full_like(prefix_ids, IGNORE_INDEX), labels], dim=1)
        if position_ids is not None:
            start = torch.arange(prefix_length, device=position_ids.device).expand(len(position_ids), -1)
            position_ids = torch.cat([start, position_ids], dim=1)
        return input_ids, labels, position_ids

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            inputs.pop("vision_features", None)  # like pixel_values: after prefill the cache holds the image
        return inputs

    def loss_at_labels(self, inputs_embeds, attention_mask, position_ids, labels, num_items_in_batch=None, **kwargs):
        """Next-token loss computing logits only where labels are (the LM head is ~20% of a small LLM's FLOPs).

        Same value as the LLM's own loss: shifted labels, float32 logits, sum / num_items_in_batch when the
        Trainer counts tokens across devices and accumulation steps, else the mean over supervised tokens.
        Only used once `use_loss_at_labels()` has checked that the LLM does nothing after its head.
        """
        decoder = self.language_model.get_decoder()
        # Where the head reads, found once before the decoder's work is queued: on a GPU, finding it (a
        # data-dependent size) makes the host wait for the queued work, which here is only the embeddings.
        labels = labels.to(inputs_embeds.device)
        read = labels_read_at(labels)
        # Turn weights read sizes too (a mask, bincount): found here, not after the decoder's forward was queued.
        weights = turn_weights(labels[:, 1:] != IGNORE_INDEX, self.loss_turn_power) \
            if self.loss_turn_power is not None else None
        with self.last_layer_where(labels, decoder, inputs_embeds.device, read):
            hidden = decoder(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False, **kwargs,
            ).last_hidden_state
        return self.head_loss(hidden, labels, num_items_in_batch, read, weights)

    def last_layer_where(self, labels: torch.LongTensor, decoder: torch.nn.Module, device: torch.device,
                         read: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The decoder's last layer computing its position-wise parts where the head reads it (`vlkit.last_layer`),
        or a block that changes nothing: not probed, or a layer the hooks cannot follow (`hooks_see_every_call`).
        `read`: `labels_read_at(labels)` if already found."""
        layer = last_decoder_layer(decoder) if self.trim_last_layer else None
        if layer is None or not hooks_see_every_call(decoder, layer):
            return contextlib.nullcontext()
        return last_layer_at(layer, tuple(labels.shape), read or labels_read_at(labels.to(device)))

    def head_loss(
        self, hidden: torch.Tensor, labels: torch.LongTensor, num_items_in_batch: int | torch.Tensor | None = None,
        read: tuple[torch.Tensor, torch.Tensor] | None = None, weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The LM head and cross-entropy at supervised positions: hidden [B, T, Dt], labels [B, T];
        `read`: `labels_read_at(labels)` and `weights`: the turn weights, if already found."""
        labels = labels.to(hidden.device)
        rows, positions = read or labels_read_at(labels)
        targets = labels[rows, positions + 1]  # each read position predicts the next token
        logits = self.get_output_embeddings()(hidden[rows, positions]).float()  # [K, vocab]
        if self.loss_turn_power is not None:
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            if weights is None:
                weights = turn_weights(labels[:, 1:] != IGNORE_INDEX, self.loss_turn_power)
            loss = (losses * weights).sum() / weights.sum()
            if num_items_in_batch is None:
                return loss
            # Accumulated or gathered batches: each part in proportion to its supervised tokens, as the
            # token average weighs them (the Trainer sums the parts).
            return loss * len(targets) / torch.as_tensor(num_items_in_batch, device=loss.device)
        if num_items_in_batch is None:
            return torch.nn.functional.cross_entropy(logits, targets)
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        return loss / torch.as_tensor(num_items_in_batch, device=loss.device)

    @torch.no_grad()
    def use_loss_at_labels(self) -> bool:
        """Turn labels-only logits on when they give this LLM's own loss; returns whether they are on.

        Some LLMs change the logits after the head (Gemma 2 soft-caps them, Cohere scales them), and
        `head_loss` would silently skip that. A one-time probe feeds the LLM's own forward large hidden
        states in place of its decoder's output (a forward hook) and compares its loss with `head_loss`
        on the same states; large, because soft-capping is invisible on a random model's small logits.
        """
        self.logits_at_labels_only = self.trim_last_layer = False
        try:
            same = self._head_loss_matches_the_llm()
        except Exception as error:  # an LLM without the usual decoder/head split: keep the full forward
            logger.warning("full logits in training: the labels-only loss probe failed (%s)", error)
            return False
        if not same:
            logger.warning("full logits in training: this LLM changes its logits after the head")
        self.logits_at_labels_only = same
        self.trim_last_layer = same and trims_last_layer(
            self.language_model.get_decoder(), self.config.text_config.hidden_size
        )
        return same

    def _head_loss_matches_the_llm(self) -> bool:
        language_model, head = self.language_model, self.get_output_embeddings()
        generator = torch.Generator().manual_seed(0)
        device, dtype = head.weight.device, self.get_input_embeddings().weight.dtype
        vocab = self.get_input_embeddings().weight.shape[0]
        input_ids = torch.randint(0, min(vocab, 1000), (1, 8), generator=generator).to(device)
        labels = input_ids.clone()
        labels[0, :3] = IGNORE_INDEX
        hidden = torch.randn(1, 8, self.config.text_config.hidden_size, generator=generator).to(device, dtype)
        hidden = hidden * (20.0 / head(hidden).float().std().clamp(min=1e-6))  # logits of std ~20

        def replace_decoder_output(module, args, output):
            if isinstance(output, tuple):
                return (hidden, *output[1:])
            output.last_hidden_state = hidden
            return output

        was_training = language_model.training
        language_model.eval()  # no dropout in the comparison
        handle = language_model.get_decoder().register_forward_hook(replace_decoder_output)
        try:
            own = language_model(input_ids=input_ids, labels=labels, use_cache=False).loss.float()
        finally:
            handle.remove()
            language_model.train(was_training)
        mine = self.head_loss(hidden, labels).float()
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        return bool((own - mine).abs() <= tolerance * own.abs().clamp(min=1.0))


AutoConfig.register(VlkitConfig.model_type, VlkitConfig, exist_ok=True)
AutoModelForImageTextToText.register(VlkitConfig, VlkitForConditionalGeneration, exist_ok=True)
