"""`qformer` connector: BLIP-2's Querying Transformer (Li et al., 2023) between vision tower and LLM.

Owns N learnable query tokens, a `transformers.Blip2QFormerModel` whose cross-attention reads
the patch features (`encoder_hidden_size` = vision width), and the projection to the LLM width:

    query_tokens[1, Q, Dq] --Q-Former (self-attn; cross-attn to features[B, N, Dv])--> [B, Q, Dq]
                           --proj--> tokens[B, Q, Dt]

The output has Q tokens whatever N is. Padded patches are hidden from the cross-attention with
`encoder_attention_mask`. Weight names mirror BLIP-2's (`query_tokens`, `qformer.*`), so
`init_from: PATH` copies them from a BLIP-2 checkpoint folder (safetensors only) by name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from vlkit.connectors.base import Connector
from vlkit.connectors.registry import register_connector
from vlkit.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)

# BLIP-2's Q-Former shape (BERT-base with cross-attention every other layer), used when neither
# the recipe nor an `init_from` checkpoint says otherwise.
BLIP2_DEFAULTS: dict[str, int] = {
    "num_queries": 32,
    "hidden_size": 768,
    "depth": 12,
    "num_heads": 12,
    "intermediate_size": 3072,
    "cross_attention_frequency": 2,
}


@register_connector("qformer")
class QFormerConnector(Connector):
    """Learned queries -> Blip2QFormerModel (cross-attending to the patches) -> Linear to the LLM width.

    Shape options left unset come from `init_from`'s config.json when given, else BLIP-2's defaults.
    """

    def __init__(
        self,
        vision_hidden_size: int,
        text_hidden_size: int,
        num_queries: int | None = None,
        hidden_size: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        intermediate_size: int | None = None,
        cross_attention_frequency: int | None = None,
        dropout: float = 0.0,
        init_from: str | None = None,
    ) -> None:
        super().__init__(vision_hidden_size, text_hidden_size)
        requested = {
            "num_queries": num_queries,
            "hidden_size": hidden_size,
            "depth": depth,
            "num_heads": num_heads,
            "intermediate_size": intermediate_size,
            "cross_attention_frequency": cross_attention_frequency,
        }
        base = dict(BLIP2_DEFAULTS)
        if init_from is not None:
            base = _checkpoint_shape(Path(init_from))
            for key, value in requested.items():
                if value is not None and value != base[key]:
                    raise ConfigError(
                        f"qformer connector option {key}={value} differs from the init_from checkpoint "
                        f"({key}={base[key]}); remove the option or init_from"
                    )
        elif hidden_size is not None and intermediate_size is None:
            base["intermediate_size"] = 4 * hidden_size  # keep BERT's ratio when only the width changes
        shape = {key: base[key] if value is None else value for key, value in requested.items()}
        for key, value in shape.items():
            if value < 1:
                raise ConfigError(f"qformer connector {key} must be >= 1, got {value}")
        if shape["hidden_size"] % shape["num_heads"]:
            raise ConfigError(
                f"qformer connector hidden_size={shape['hidden_size']} must be divisible by num_heads={shape['num_heads']}"
            )

        self.num_queries = shape["num_queries"]
        # The config to save with a model: explicit shape, no init_from. A saved model then loads
        # without the BLIP-2 folder, and from_pretrained does not copy weights it overwrites anyway.
        self.resolved_config: dict = {"type": "qformer", **shape, "dropout": dropout}
        config = Blip2QFormerConfig(
            hidden_size=shape["hidden_size"],
            num_hidden_layers=shape["depth"],
            num_attention_heads=shape["num_heads"],
            intermediate_size=shape["intermediate_size"],
            cross_attention_frequency=shape["cross_attention_frequency"],
            encoder_hidden_size=vision_hidden_size,  # the cross-attention keys/values read the patches
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        # [1, Q, Dq] as in BLIP-2 (so checkpoints copy by name); normal(0.02) as BLIP-2 initialises them.
        self.query_tokens = nn.Parameter(torch.empty(1, self.num_queries, config.hidden_size))
        nn.init.normal_(self.query_tokens, mean=0.0, std=config.initializer_range)
        self.qformer = Blip2QFormerModel(config)
        self.proj = nn.Linear(config.hidden_size, text_hidden_size)  # BLIP-2's language_projection
        if init_from is not None:
            self._load_blip2_weights(Path(init_from))

    def num_tokens(self, num_patches: int) -> int:
        return self.num_queries

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch = features.shape[0]
        if mask is not None:
            mask = mask.bool()
            # Masked keys get zero attention weight, but 0 * inf/NaN junk is still NaN: zero it first.
            features = features.masked_fill(~mask.unsqueeze(-1), 0.0)
        queries = self.query_tokens.expand(batch, -1, -1)  # [B, Q, Dq]
        hidden = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=features,  # [B, N, Dv]
            encoder_attention_mask=mask,  # [B, N], True = real patch
        ).last_hidden_state  # [B, Q, Dq]
        return self.proj(hidden.to(self.proj.weight.dtype))  # [B, Q, Dt]

    def _load_blip2_weights(self, folder: Path) -> None:
        """Copy `query_tokens` and `qformer.*` from a BLIP-2 folder's safetensors, name for name.

        The cross-attention key/value weights read the vision features, so they only fit a vision
        tower of the checkpoint's width (1408 for EVA ViT-g); for another width they keep their
        fresh init and a warning names them.
        """
        own = {"query_tokens": self.query_tokens}
        own.update({f"qformer.{name}": tensor for name, tensor in self.qformer.state_dict(keep_vars=True).items()})
        loaded: set[str] = set()
        kept_fresh: list[str] = []
        checkpoint_width = self.vision_hidden_size
        with torch.no_grad():
            for file in _safetensors_files(folder):
                with safe_open(str(file), framework="pt") as reader:
                    for name in reader.keys():
                        if name not in own:
                            continue  # LLM, vision tower, language_projection, text-only Q-Former parts
                        source = reader.get_tensor(name)
                        target = own[name]
                        if source.shape != target.shape:
                            if ".crossattention.attention.key." in name or ".crossattention.attention.value." in name:
                                kept_fresh.append(name)
                                checkpoint_width = source.shape[-1]
                                continue
                            raise ModelLoadError(
                                f"BLIP-2 weight {name} in {folder} has shape {tuple(source.shape)}, "
                                f"expected {tuple(target.shape)}; the checkpoint's config.json does not match its weights"
                            )
                        target.copy_(source)
                        loaded.add(name)
        missing = sorted(set(own) - loaded - set(kept_fresh))
        if missing:
            raise ModelLoadError(
                f"{folder} lacks {len(missing)} Q-Former weight(s) (first: {missing[0]}); is it a BLIP-2 checkpoint?"
            )
        if kept_fresh:
            logger.warning(
                "qformer init_from %s: %d cross-attention key/value weights are for vision width %d, not %d; "
                "they keep their fresh init",
                folder,
                len(kept_fresh),
                checkpoint_width,
                self.vision_hidden_size,
            )
        logger.info("qformer: copied %d tensors (query_tokens, qformer.*) from %s", len(loaded), folder)


def _checkpoint_shape(folder: Path) -> dict[str, int]:
    """The Q-Former shape of a BLIP-2 folder's config.json."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"qformer init_from: {config_file} not found; point init_from at a BLIP-2 checkpoint folder")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "blip-2":
        raise ConfigError(
            f"qformer init_from: {folder} holds a '{config.get('model_type')}' model, not 'blip-2'; "
            f"point init_from at a BLIP-2 checkpoint folder"
        )
    qformer = Blip2QFormerConfig(**config.get("qformer_config", {}))
    shape = {
        "num_queries": config.get("num_query_tokens", 32),
        "hidden_size": qformer.hidden_size,
        "depth": qformer.num_hidden_layers,
        "num_heads": qformer.num_attention_heads,
        "intermediate_size": qformer.intermediate_size,
        "cross_attention_frequency": qformer.cross_attention_frequency,
    }
    # Only the shape is carried over (and saved with a model), so the rest must be BLIP-2's, as it
    # is in every published checkpoint.
    default = Blip2QFormerConfig()
    for key in ("hidden_act", "layer_norm_eps"):
        if getattr(qformer, key) != getattr(default, key):
            raise ModelLoadError(
                f"qformer init_from: {folder} has Q-Former {key}={getattr(qformer, key)!r}; "
                f"vlkit's qformer supports BLIP-2's {getattr(default, key)!r} only"
            )
    return shape


def _safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of a `save_pretrained` folder, sharded or not; never pickle."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelLoadError(
        f"qformer init_from: no model.safetensors in {folder}; vlkit does not load pickle (.bin) weights, "
        f"re-save the checkpoint with save_pretrained"
    )
