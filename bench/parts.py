"""What the VLM benchmarks share: the vision tower and data they run on, the stock-Llava twin, FLOPs.

The twin is a `transformers.LlavaForConditionalGeneration` holding the very same weight tensors
as the vlkit model (`vlkit.export.llava.to_llava`, the mapping `vlkit export --format llava` writes),
so both sides compute the same function and any speed difference is the code path's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from common import REPO
from torch import nn

# recipes/tiny/clip.yaml's vision tower, used when that file is absent (a random tower runs as fast).
TINY_CLIP_VISION = {"image_size": 64, "patch_size": 8, "hidden_size": 128, "intermediate_size": 512,
                    "num_hidden_layers": 4, "num_attention_heads": 4}
TRAINED_TOWERS = ("runs/tiny-clip", "runs/demo/clip")
FILES = {"align": "align_train.json", "instruct": "instruct_train.json"}


def default_vision(workdir: Path) -> str:
    """A ViT CLIP run of this checkout, else a random tower with the tiny CLIP recipe's vision config
    (stock Llava, the reference, cannot run a CNN tower such as the shipped recipe's ResNet)."""
    for candidate in TRAINED_TOWERS:
        config = REPO / candidate / "config.json"
        if config.is_file():
            config = json.loads(config.read_text())
            tower_type = config.get("vision_config", {}).get("model_type", config.get("model_type"))
            if tower_type in ("clip", "clip_vision_model"):
                return str(REPO / candidate)
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from vlkit.vision import save_default_image_processor

    config = dict(TINY_CLIP_VISION)
    recipe = REPO / "recipes/tiny/clip.yaml"
    if recipe.is_file():
        recipe_tower = yaml.safe_load(recipe.read_text())["model"]["vision"]["config"]
        if recipe_tower.get("model_type", "clip_vision_model") == "clip_vision_model":  # else keep the ViT above
            config.update(recipe_tower)
    folder = workdir / "random-tiny-clip-vision"
    torch.manual_seed(0)
    tower_config = CLIPVisionConfig(**config)
    CLIPVisionModel(tower_config).save_pretrained(folder)
    save_default_image_processor(tower_config, str(folder))
    return str(folder)


def shapes_data(workdir: Path, n: int, data: str | None = None) -> Path:
    """The shapes world of this checkout (data/shapes), else a small one generated into workdir."""
    folder = Path(data) if data else REPO / "data" / "shapes"
    if all((folder / name).is_file() for name in FILES.values()):
        return folder
    from data_tools.shapes import generate

    folder = workdir / "shapes"
    generate(folder, n_train=max(n, 16), n_val=4, n_test=4, seed=0, workers=1, progress=False)
    return folder


def first_samples(folder: Path, stage: str, n: int):
    from vlkit.data import load_conversations

    samples = load_conversations(str(folder / FILES[stage]))
    return samples.select(range(min(n, len(samples))))


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights an optimizer steps: those that require a gradient."""
    return [p for p in module.parameters() if p.requires_grad]


def llava_twin(model) -> torch.nn.Module:
    """A stock LlavaForConditionalGeneration sharing the vlkit model's weight tensors (no copy)."""
    from vlkit.export.llava import llava_weight_name, to_llava

    llava = to_llava(model)
    # to_llava builds on the meta device and assigns the state dict; buffers outside it (rotary
    # inv_freq, position ids) stay on meta. Share the vlkit model's, under Llava's names.
    buffers = {llava_weight_name(name): buffer for name, buffer in model.named_buffers()}
    for name, buffer in list(llava.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            llava.get_submodule(owner).register_buffer(leaf, buffers[name], persistent=False)
    return llava


def lora_on_llava(llava, r: int, alpha: float, dropout: float) -> None:
    """LoRA on the Llava twin's language model: the adapters vlkit's `tune.llm: lora` puts on its LLM."""
    from peft import LoraConfig, get_peft_model

    targets = sorted({name.rsplit(".", 1)[-1] for name, module in llava.model.language_model.named_modules()
                      if isinstance(module, nn.Linear)})
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    llava.model.language_model = get_peft_model(llava.model.language_model, config)


# --- analytic FLOPs ------------------------------------------------------------------------------------
def _linear_params(module: nn.Module, lora: bool) -> int:
    total = 0
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and ("lora_" in name) == lora:
            total += sub.in_features * sub.out_features
    return total


def train_step_flops(
    model, lengths: list[int], supervised: int, images: int, tower_runs: bool, shared_prefix: int = 0
) -> dict[str, float]:
    """FLOPs one training step must do, by part, for a batch of samples of `lengths` tokens.

    Frozen weights need no weight gradients: the frozen LLM costs 2 (forward) + 2 (input gradient)
    FLOPs per weight per token; LoRA weights 2 + 4. Attention is counted causal (the half that is
    computed), the LM head only at the `supervised` positions the loss reads, and so the last decoder
    layer's query/output projections and MLP where the model trims them (`vlkit.last_layer`), the
    connector at image tokens, and the frozen tower forward only when it runs (not when features are
    cached). A `shared_prefix` of P tokens runs once for the batch, not once per sample. The count is the
    work a step must do: a variant doing more (train.compile leaves the last layer whole) shows it as a
    lower MFU.
    """
    from vlkit.last_layer import position_wise_parts

    text = model.config.text_config
    decoder_layers = model.language_model.get_decoder().layers
    body = _linear_params(decoder_layers, lora=False)
    lora = _linear_params(decoder_layers, lora=True)
    repeats = (len(lengths) - 1) * shared_prefix  # prefix tokens the batch no longer runs
    tokens = sum(lengths) - repeats
    width = text.num_attention_heads * getattr(text, "head_dim", text.hidden_size // text.num_attention_heads)
    attention_forward = sum(2 * n * n * width for n in lengths) * text.num_hidden_layers  # QK^T + AV, causal half
    attention_forward -= (len(lengths) - 1) * 2 * shared_prefix**2 * width * text.num_hidden_layers
    head = model.get_output_embeddings()
    connector = sum(p.numel() for p in model.connector.parameters() if p.ndim == 2)
    image_tokens = images * model.config.image_seq_length
    unread = 0  # the trimmed layer's work at positions the head does not read (the prefix's cache runs it whole)
    if getattr(model, "trim_last_layer", False):
        parts = position_wise_parts(decoder_layers[-1])
        frozen_weights = sum(_linear_params(p, lora=False) for p in parts)
        lora_weights = sum(_linear_params(p, lora=True) for p in parts)
        unread = (4 * frozen_weights + 6 * lora_weights) * (tokens - shared_prefix - supervised)
    flops = {
        "llm": 4 * body * tokens + 6 * lora * tokens - unread,
        "attention": 3 * attention_forward,  # forward + 2x for the backward
        "lm_head": 4 * head.in_features * head.out_features * supervised,
        "connector": 6 * connector * image_tokens,
        "tower": 0.0,
    }
    if tower_runs:
        vision = model.config.vision_config
        per_image = vision.image_size // vision.patch_size
        tower_tokens = per_image * per_image + 1
        tower_width = vision.hidden_size
        flops["tower"] = images * (2 * _linear_params(model.vision_tower, lora=False) * tower_tokens
                                   + 4 * tower_tokens**2 * tower_width * vision.num_hidden_layers)
    return flops
