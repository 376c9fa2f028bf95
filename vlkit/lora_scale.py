"""LoRA's scale applied on the rank side: the one place vlkit changes how peft's LoRA linears compute.

peft computes a LoRA linear as `base(x) + B(A(x)) * scale`: one more pass over the layer's whole
[tokens, out_features] output forward, and another backward. `base(x) + B(A(x) * scale)` is the same
value (the scale is one number) and multiplies the [tokens, r] tensor instead. A SmolLM2 LoRA instruct
step on CPU ran 1.036-1.045x faster for it (two runs, each in one process). `vlkit.adapters` puts it
on every adapter it makes, so training and inference both use it; `bench/train_step.py` times it
against stock peft, which the Llava side keeps. Its layers also skip peft's cast of their input to the
adapter's dtype under autocast, which would be undone at the adapter's first matmul (`skips_input_cast`).
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant


class RankSideScale(LoraVariant):
    """A peft LoRA variant (the hook DoRA uses): vanilla LoRA with the scale on the rank side.

    Merging goes through peft's own delta weight, so merged and exported weights are peft's.
    """

    @staticmethod
    def init(module: LoraLinear, adapter_name: str, **kwargs) -> None:
        """Nothing to set up: the adapter's weights are vanilla LoRA's."""

    @staticmethod
    def forward(module: LoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(lora_A.weight.dtype)  # peft's input cast, switched off on these layers (`skips_input_cast`)
        rank_side = lora_A(module.lora_dropout[active_adapter](x)) * module.scaling[active_adapter]
        return result + lora_B(rank_side)

    @staticmethod
    def merge_safe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)


def scale_on_rank_side(part: torch.nn.Module) -> int:
    """Give every plain LoRA linear of `part` the rank-side scale; returns how many adapters it changed.

    Left alone: adapters that already have a variant (DoRA, ...), a bias on B (vanilla LoRA scales that
    too), and other layer types (4-bit, embeddings, convolutions), whose forwards peft writes apart.
    """
    changed = 0
    for module in part.modules():
        if type(module) is not LoraLinear:
            continue
        for adapter, lora_B in module.lora_B.items():
            if adapter not in module.lora_variant and lora_B.bias is None:
                module.lora_variant[adapter] = RankSideScale()
                changed += 1
        skips_input_cast(module)
    return changed


def skips_input_cast(module: LoraLinear) -> None:
    """Turn peft's cast of the input to the adapter's dtype off where every adapter is RankSideScale, which
    casts only without autocast. Under autocast the cast is undone at lora_A's matmul: a bf16 input (the
    down projection's, [tokens, intermediate]) went to float32 and back to bf16, forward and backward, for
    the same values. A SmolLM2 LoRA instruct step of 8 samples under CPU bf16 autocast ran 1.029x faster
    without it (8 interleaved rounds in one process)."""
    if module.lora_variant and all(isinstance(module.lora_variant.get(name), RankSideScale) for name in module.lora_A):
        module.cast_input_dtype_enabled = False
