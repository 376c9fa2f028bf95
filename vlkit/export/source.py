"""What `vlkit export` exports: a finished run dir or checkpoint, loaded as one standalone model.

Owns finding the folder to export (refusing an unfinished run with the name of its newest
checkpoint), rebuilding it (`vlkit.run_folder.rebuild`), merging LoRA into the LLM and vision
tower, and the QLoRA case: the LoRA weights are merged into the 4-bit base weights *dequantized*
(the very weights the adapters trained on, in the export dtype), not into the original full-precision
base, and not back into 4 bits, which would round the merged weights again. The export then computes
what the trained model computed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from vlkit.errors import VlkitError
from vlkit.run_folder import MANIFEST, TRAINABLE, latest_checkpoint, read_manifest, rebuild, run_dir_of

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(VlkitError):
    """A run cannot be exported as asked (unfinished run, unknown format, format that does not apply)."""


@dataclass
class ExportSource:
    """A folder to export, its manifest, and the run dir around it (for the model card)."""

    folder: Path
    manifest: dict[str, Any]
    run_dir: Path  # the run dir itself, or the one a checkpoint lives in
    checkpoint_step: int | None = None  # set when exporting a checkpoint
    notes: list[str] = field(default_factory=list)  # facts about the export for the model card

    @property
    def connector(self) -> dict[str, Any]:
        return self.manifest["model"]["connector"]


def resolve_source(path: str | Path) -> ExportSource:
    """A run dir or `checkpoints/checkpoint-N` with a complete save, or an ExportError saying what to export."""
    folder = Path(path)
    if not folder.is_dir():
        raise ExportError(f"{folder} does not exist; give a vlkit run dir or one of its checkpoints/checkpoint-N")
    if not ((folder / MANIFEST).is_file() and (folder / TRAINABLE).is_file()):
        newest = latest_checkpoint(folder / "checkpoints")
        if newest is not None:
            raise ExportError(
                f"{folder} is an unfinished run (no final {TRAINABLE}); export its newest checkpoint instead: {newest}"
            )
        raise ExportError(f"{folder} is not a finished vlkit run or checkpoint (needs {MANIFEST} and {TRAINABLE})")
    try:
        manifest = read_manifest(folder)
    except VlkitError as error:
        raise ExportError(str(error)) from None
    run_dir = run_dir_of(folder)
    step = None
    if run_dir != folder:  # a checkpoint
        state = folder / "trainer_state.json"
        step = json.loads(state.read_text()).get("global_step") if state.is_file() else None
        if step is None:
            step = int(folder.name.rsplit("-", 1)[1]) if folder.name.rsplit("-", 1)[1].isdigit() else None
    return ExportSource(folder=folder, manifest=manifest, run_dir=run_dir, checkpoint_step=step)


def merge_adapters(model: torch.nn.Module) -> list[str]:
    """Fold LoRA weights into the LLM / vision tower (peft `merge_and_unload`); return the parts merged."""
    merged = []
    for part in ("language_model", "vision_tower"):
        module = getattr(model, part)
        if hasattr(module, "peft_config"):
            setattr(model, part, module.merge_and_unload())
            merged.append(part)
    return merged


def dequantized_llm_weights(quantized_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The 4-bit LLM weights a QLoRA run trained on, dequantized, by module name in the language model."""
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    return {name: dequantize_4bit(module.weight.data, module.weight.quant_state)
            for name, module in quantized_model.language_model.named_modules() if isinstance(module, Linear4bit)}


def load_qlora_dequantized(source: ExportSource, dtype: torch.dtype):
    """(model, processor) of a QLoRA run on its 4-bit base dequantized into `dtype`, LoRA still unmerged."""
    model, processor = rebuild(source.folder, quantize=False, dtype=dtype)  # first: it draws the seeded rows
    # Read from a fresh rebuild: bitsandbytes repacks 4-bit weights for its CPU kernel on the first forward.
    trained_on = dequantized_llm_weights(rebuild(source.folder)[0])
    modules = dict(model.language_model.named_modules())
    with torch.no_grad():
        for name, weight in trained_on.items():
            modules[name].weight.copy_(weight.to(dtype))  # same module names: the LoRA layout does not change
    return model, processor


def run_seed(source: ExportSource) -> int:
    """The seed the run was trained with (recipe.yaml's train.seed), else 0."""
    recipe = source.run_dir / "recipe.yaml"
    try:
        return int(yaml.safe_load(recipe.read_text())["train"]["seed"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return 0


def load_merged(source: ExportSource, dtype: torch.dtype):
    """(standalone model in `dtype`, processor): bases + trained weights, LoRA merged, nothing left to fetch."""
    # build_vlm gives the `<image>` token a freshly drawn embedding row that no run saves (it only
    # matters as a tied lm_head row). Drawing it under the run's seed makes exports reproducible
    # and re-draws the row training drew (train_vlm seeds the same way before build_vlm).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run_seed(source))
        model, processor = _load(source, dtype)
    merged = merge_adapters(model)
    if merged:
        source.notes.append(f"LoRA weights merged into: {', '.join(merged)}.")
    model.to(dtype)
    model.eval()
    return model, processor


def _load(source: ExportSource, dtype: torch.dtype):
    if source.manifest["tune"].get("llm") == "qlora":
        model, processor = load_qlora_dequantized(source, dtype)
        source.notes.append(
            "Trained with QLoRA on a 4-bit (NF4) base; the LoRA weights were merged into that base dequantized "
            f"to {str(dtype).removeprefix('torch.')}, so the export computes what the trained model computed "
            "with weights that are no longer 4-bit."
        )
    else:
        model, processor = rebuild(source.folder)
    return model, processor
