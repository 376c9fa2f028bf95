"""LoRA adapters on a VLM's parts, as a recipe's `tune` section asks: the one place peft wraps them.

Training puts them on before it trains (`vlkit.train`), and rebuilding a run folder puts the same
ones on before it loads the trained weights (`vlkit.run_folder`), so the adapter names match. Below
`train/` because inference rebuilds runs too.
"""

from __future__ import annotations

from vlkit.config import TuneSection
from vlkit.modeling import VlkitForConditionalGeneration


def lora_config(tune: TuneSection, target_modules, task_type: str | None):
    """peft's LoraConfig for one part, from the recipe's `tune` section."""
    from peft import LoraConfig

    return LoraConfig(
        r=tune.lora_r, lora_alpha=tune.lora_alpha, lora_dropout=tune.lora_dropout,
        target_modules=target_modules, task_type=task_type,
    )


def apply_adapters(model: VlkitForConditionalGeneration, tune: TuneSection) -> None:
    """Wrap the LLM and/or the vision tower with LoRA, as `tune` asks (idempotent per part)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if tune.llm in ("lora", "qlora") and not hasattr(model.language_model, "peft_config"):
        if tune.llm == "qlora":
            # Casts norms to fp32 and enables input grads for the 4-bit base; no checkpointing here.
            model.language_model = prepare_model_for_kbit_training(
                model.language_model, use_gradient_checkpointing=False
            )
        model.language_model = get_peft_model(
            model.language_model, lora_config(tune, tune.lora_target_modules, "CAUSAL_LM")
        )
    if tune.vision == "lora" and not hasattr(model.vision_tower, "peft_config"):
        model.vision_tower = get_peft_model(model.vision_tower, lora_config(tune, tune.vision_lora_target_modules, None))
