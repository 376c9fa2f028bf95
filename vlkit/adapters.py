"""LoRA adapters on a VLM's parts, as a recipe's `tune` section asks: the one place peft wraps them.

Training puts them on before it trains (`vlkit.train`), and rebuilding a run folder puts the same
ones on before it loads the trained weights (`vlkit.run_folder`), so the adapter names match. Below
`train/` because inference rebuilds runs too. Every plain LoRA linear they make applies its scale on
the rank side (`vlkit.lora_scale`).
"""

from __future__ import annotations

from vlkit.config import TuneSection
from vlkit.errors import ConfigError
from vlkit.modeling import VlkitForConditionalGeneration


def lora_config(tune: TuneSection, target_modules, task_type: str | None, layers: list[int] | None = None):
    """peft's LoraConfig for one part, from the recipe's `tune` section; `layers`: the decoder layers to
    adapt (None: every layer the target modules match)."""
    from peft import LoraConfig

    return LoraConfig(
        r=tune.lora_r, lora_alpha=tune.lora_alpha, lora_dropout=tune.lora_dropout,
        target_modules=target_modules, task_type=task_type, layers_to_transform=layers,
    )


def llm_lora_layers(language_model, tune: TuneSection) -> list[int] | None:
    """The indices of the LLM's last `tune.lora_layers` decoder layers, or None for all of them."""
    if tune.lora_layers is None:
        return None
    num_layers = language_model.config.get_text_config().num_hidden_layers
    if tune.lora_layers > num_layers:
        raise ConfigError(f"tune.lora_layers={tune.lora_layers}, but the LLM has {num_layers} decoder layers")
    return list(range(num_layers - tune.lora_layers, num_layers))


def decoder_linear_names(language_model) -> list[str]:
    """The names of the Linear modules inside the LLM's decoder layers (q_proj, ..., down_proj): what
    peft's "all-linear" adapts, spelled out."""
    import torch

    return sorted({
        name.rsplit(".", 1)[-1]
        for name, module in language_model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    })


def apply_adapters(model: VlkitForConditionalGeneration, tune: TuneSection) -> None:
    """Wrap the LLM and/or the vision tower with LoRA, as `tune` asks (idempotent per part)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from vlkit.lora_scale import scale_on_rank_side

    if tune.llm in ("lora", "qlora") and not hasattr(model.language_model, "peft_config"):
        if tune.llm == "qlora":
            # Casts norms to fp32 and enables input grads for the 4-bit base; no checkpointing here.
            model.language_model = prepare_model_for_kbit_training(
                model.language_model, use_gradient_checkpointing=False
            )
        layers = llm_lora_layers(model.language_model, tune)
        targets = tune.lora_target_modules
        if layers is not None and targets == "all-linear":  # peft selects layers only among named modules
            targets = decoder_linear_names(model.language_model)
        model.language_model = get_peft_model(
            model.language_model, lora_config(tune, targets, "CAUSAL_LM", layers)
        )
        scale_on_rank_side(model.language_model)
    if tune.vision == "lora" and not hasattr(model.vision_tower, "peft_config"):
        model.vision_tower = get_peft_model(model.vision_tower, lora_config(tune, tune.vision_lora_target_modules, None))
        scale_on_rank_side(model.vision_tower)
