"""What each stage trains, as data, and the code that applies it to a model.

    | stage    | vision tower        | connector | LLM                      |
    |----------|---------------------|-----------|--------------------------|
    | align    | frozen              | trained   | frozen                   |
    | instruct | frozen / LoRA / full | trained / frozen | LoRA / QLoRA / full / frozen |

(`stage: clip` trains the towers themselves; see `vlkit.clip`.)
"""

from __future__ import annotations

import logging

import torch
from torch import nn

# apply_adapters lives below train/ (rebuilding a run for inference needs it); re-exported here.
from vlkit.adapters import apply_adapters as apply_adapters
from vlkit.adapters import lora_config as lora_config
from vlkit.config import TuneSection, VlmRecipe
from vlkit.errors import ConfigError
from vlkit.modeling import VlkitForConditionalGeneration

logger = logging.getLogger(__name__)

# stage -> part -> the training modes a recipe may choose for it
STAGE_TABLE: dict[str, dict[str, tuple[str, ...]]] = {
    "align": {"vision": ("frozen",), "connector": ("trained",), "llm": ("frozen",)},
    "instruct": {"vision": ("frozen", "lora", "full"), "connector": ("trained", "frozen"),
                 "llm": ("lora", "qlora", "full", "frozen")},
}

PARTS = ("vision_tower", "connector", "language_model")


def check_stage(recipe: VlmRecipe) -> None:
    """Refuse a `tune` section the stage table does not allow."""
    allowed = STAGE_TABLE[recipe.stage]
    if recipe.tune.llm not in allowed["llm"]:
        raise ConfigError(
            f"stage '{recipe.stage}' keeps the LLM {'/'.join(allowed['llm'])}, but tune.llm is '{recipe.tune.llm}'; "
            "use stage: instruct to train the LLM"
        )
    if recipe.tune.vision not in allowed["vision"]:
        raise ConfigError(
            f"stage '{recipe.stage}' keeps the vision tower {'/'.join(allowed['vision'])}, "
            f"but tune.vision is '{recipe.tune.vision}'"
        )
    if recipe.tune.connector not in allowed["connector"]:
        raise ConfigError(f"stage '{recipe.stage}' trains the connector; tune.connector: frozen is for the instruct stage")
    if recipe.tune.connector == "frozen" and recipe.tune.llm == "frozen" and recipe.tune.vision == "frozen":
        raise ConfigError("tune.connector, tune.llm and tune.vision are all frozen: nothing would train")


def set_trainable(model: VlkitForConditionalGeneration, tune: TuneSection) -> None:
    """requires_grad per part: the connector unless frozen; LoRA weights only; the whole LLM / tower for `full`."""
    for parameter in model.parameters():
        parameter.requires_grad = False
    for parameter in model.connector.parameters():
        parameter.requires_grad = tune.connector == "trained"
    if tune.llm == "full":
        for parameter in model.language_model.parameters():
            parameter.requires_grad = True
    if tune.vision == "full":
        for parameter in model.vision_tower.parameters():
            parameter.requires_grad = True
    for part in (model.language_model, model.vision_tower):
        for name, parameter in part.named_parameters():
            if "lora_" in name:
                parameter.requires_grad = True
    # Frozen parts run in eval mode: no dropout noise in features the stage cannot change. A tower tuned
    # in full stays in eval mode too: a CNN's BatchNorm statistics are buffers, which the run does not
    # save, so they must not drift from the base's (the usual frozen-BN fine-tuning of a CNN).
    model.vision_tower.train(tune.vision == "lora")
    model.language_model.train(tune.llm != "frozen")
    if tune.llm == "qlora":
        keep_4bit_layers_differentiable(model)


def connector_weights_in_float32(model: VlkitForConditionalGeneration, init_from: str | None = None) -> bool:
    """Keep a trained connector's weights in float32 in a half-precision model; returns whether it changed.

    AdamW on bf16 weights rounds away every update smaller than ~0.4% of a weight (8 bits of mantissa), which a
    decaying learning rate reaches; float32 weights keep them, and under autocast the connector still computes
    in bf16. Its input is cast to its dtype and its output to the LLM's (`get_image_features`,
    `merge_image_features`). LoRA weights are float32 already (peft); full-tuned parts keep the model's dtype.
    `init_from`: the run the model was rebuilt from, whose connector is read again as it was saved (float32),
    not as the half-precision rebuild rounded it.
    """
    trained = [p for p in model.connector.parameters() if p.requires_grad]
    if not trained or all(p.dtype == torch.float32 for p in trained):
        return False
    model.connector.float()
    if init_from is not None:
        from vlkit.run_folder import load_trained

        load_trained(model, init_from, prefix="connector.")
    return True


def keep_4bit_layers_differentiable(model: nn.Module) -> int:
    """Keep bitsandbytes' 4-bit layers on their differentiable kernel; returns how many there are.

    On a CPU with AVX512-BF16, a 4-bit layer that once runs in eval mode without grad (the stage's one-time
    probes, an evaluation) repacks its weight for an inference kernel that has no backward, and keeps it.
    Every later step would then drop the gradient through the layer to the LoRA weights below it, with a
    warning from torch's autograd and no error. Training keeps the loaded packing; inference (chat, eval of
    a saved run) builds its own layers and keeps the fast kernel.
    """
    import bitsandbytes as bnb

    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    for layer in layers:
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError("a 4-bit layer was repacked for inference before training set it up; "
                               "set_trainable must come before the model's first forward")
        layer.support_avx512bf16_for_cpu = False  # bitsandbytes' switch for that repacking
    return len(layers)


def part_of(name: str) -> str:
    return next((part for part in PARTS if name.startswith(part + ".")), "other")


def trainable_table(model: nn.Module) -> str:
    """A table of trainable / total parameters per part, logged at the start of every run."""
    rows = {part: [0, 0] for part in (*PARTS, "other")}
    for name, parameter in model.named_parameters():
        row = rows[part_of(name)]
        row[1] += parameter.numel()
        if parameter.requires_grad:
            row[0] += parameter.numel()
    lines = [f"{'part':<16}{'trainable':>14}{'total':>14}{'%':>8}"]
    for part, (trainable, total) in rows.items():
        if total:
            lines.append(f"{part:<16}{trainable:>14,}{total:>14,}{100 * trainable / total:>7.2f}%")
    trainable = sum(r[0] for r in rows.values())
    total = sum(r[1] for r in rows.values())
    lines.append(f"{'all':<16}{trainable:>14,}{total:>14,}{100 * trainable / max(total, 1):>7.2f}%")
    return "\n".join(lines)
