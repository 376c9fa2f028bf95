"""vlkit.adapters: LoRA on the LLM as a recipe's `tune` section asks, including `lora_layers`."""

from __future__ import annotations

import pytest
import torch

from vlkit import build_vlm
from vlkit.adapters import apply_adapters, decoder_linear_names
from vlkit.config import TuneSection
from vlkit.errors import ConfigError


def adapted_modules(model) -> dict[int, set[str]]:
    """Per decoder layer index, the names of the modules that carry a LoRA A matrix."""
    found: dict[int, set[str]] = {}
    for name, _ in model.language_model.named_modules():
        if name.endswith(".lora_A"):
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            found.setdefault(layer, set()).add(parts[-2])
    return found


@pytest.fixture
def fresh_vlm(tiny_vision_dir, tiny_llm_dir):
    torch.manual_seed(0)
    model, _ = build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, connector={"type": "linear"})
    return model


def test_lora_on_every_layer_by_default(fresh_vlm):
    linear_names = set(decoder_linear_names(fresh_vlm.language_model))
    assert {"q_proj", "v_proj", "down_proj"} <= linear_names and "lm_head" not in linear_names
    apply_adapters(fresh_vlm, TuneSection(llm="lora", lora_r=2))
    assert adapted_modules(fresh_vlm) == {0: linear_names, 1: linear_names}  # the tiny Llama has 2 layers


def test_lora_layers_adapts_only_the_last_ones_and_gradients_stop_there(fresh_vlm):
    linear_names = set(decoder_linear_names(fresh_vlm.language_model))
    apply_adapters(fresh_vlm, TuneSection(llm="lora", lora_r=2, lora_layers=1))
    assert adapted_modules(fresh_vlm) == {1: linear_names}
    for parameter in fresh_vlm.parameters():
        parameter.requires_grad_(False)
    for name, parameter in fresh_vlm.language_model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    # The first layer's output needs no gradient, so autograd records nothing below layer 1.
    recorded = []
    first_layer = fresh_vlm.language_model.get_base_model().model.layers[0]
    first_layer.register_forward_hook(lambda module, args, output: recorded.append(
        (output[0] if isinstance(output, tuple) else output).requires_grad))
    input_ids = torch.randint(0, 50, (2, 6))
    loss = fresh_vlm.language_model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    assert recorded == [False]
    assert all(p.grad is not None for n, p in fresh_vlm.language_model.named_parameters() if "lora_" in n)


def test_lora_layers_beyond_the_llm_is_a_config_error(fresh_vlm):
    with pytest.raises(ConfigError, match="tune.lora_layers=3, but the LLM has 2 decoder layers"):
        apply_adapters(fresh_vlm, TuneSection(llm="lora", lora_layers=3))
