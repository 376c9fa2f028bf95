"""Saving what a run trained, under one process or several: gather, write atomically, manifest.

The run folder format itself (manifest.json + trainable.safetensors, reading it back, rebuilding
the model, the 4-bit config) is `vlkit.run_folder`'s; this module writes it during training: the
manifest of a run (`build_manifest`), the trained weights gathered whole under FSDP or ZeRO-3
(`gather_trained`), and both written to a temporary name and renamed (`write_trained`), so a crash
mid-save never leaves a torn file. The reading side is re-exported here for existing callers.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# The format lives in vlkit.run_folder; these names stay importable from here for existing callers.
from vlkit.run_folder import MANIFEST as MANIFEST
from vlkit.run_folder import RUN_FORMAT as RUN_FORMAT
from vlkit.run_folder import TRAINABLE as TRAINABLE
from vlkit.run_folder import Location, trained_hash
from vlkit.run_folder import atomic_write_text as atomic_write_text
from vlkit.run_folder import check_bases_unchanged as check_bases_unchanged
from vlkit.run_folder import content_hash as content_hash
from vlkit.run_folder import load_run as load_run
from vlkit.run_folder import load_trained as load_trained
from vlkit.run_folder import read_manifest as read_manifest


# --- atomic file writes --------------------------------------------------------------------------------
def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, staging, metadata=metadata)
    os.replace(staging, path)


# --- manifests ------------------------------------------------------------------------------------------
def build_manifest(
    recipe, model, bases: dict[str, str], history: list[dict[str, Any]], system_prompt: str | None = None
) -> dict[str, Any]:
    """Everything needed to rebuild the model from its bases (system_prompt: the one build_vlm used).

    A local base (and the run continued from) is recorded as given, absolute and relative to the run
    dir, with a content hash, so the run loads after its tree moves (see vlkit.run_folder.Location).
    """
    config = model.config
    run_dir = recipe.output_dir
    manifest = {
        "format": RUN_FORMAT,
        "stage": recipe.stage,
        "bases": {
            name: Location.record(source, run_dir, content_hash(source)).to_json() for name, source in bases.items()
        },
        "model": {
            "connector": config.connector_config,
            "vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "dtype": recipe.model.dtype,
            "image_seq_length": config.image_seq_length,
            "system_prompt": system_prompt,
        },
        "tune": recipe.tune.model_dump(mode="json"),
        "stages": [*history, {"stage": recipe.stage, "output_dir": recipe.output_dir, "tune": recipe.tune.llm,
                              "vision": recipe.tune.vision}],
    }
    if recipe.init_from:
        manifest["init_from"] = Location.record(recipe.init_from, run_dir, trained_hash(recipe.init_from)).to_json()
    return manifest


def saved_state(model: torch.nn.Module, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights that are not the bases': connector, LoRA, and any base part tuned in full."""
    full_llm = any(stage.get("tune") == "full" for stage in manifest["stages"])
    full_vision = any(stage.get("vision") == "full" for stage in manifest["stages"])
    state = {}
    for name, parameter in model.named_parameters():
        if (
            parameter.requires_grad
            or name.startswith("connector.")
            or "lora_" in name
            or (full_llm and name.startswith("language_model."))
            or (full_vision and name.startswith("vision_tower."))
        ):
            state[name] = parameter
    return state


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a parameter that FSDP2 sharded into a DTensor (other tensors as they are).

    Gathering a DTensor is a collective: every rank must call this for the same tensors in the same order.
    """
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_trained(model: torch.nn.Module, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`saved_state` with every tensor full and unsharded; under FSDP or ZeRO-3 every rank must call it."""
    state = saved_state(model, manifest)
    with zero3_gathered(list(state.values())):
        return {name: full_tensor(parameter.detach()).clone() for name, parameter in state.items()}


def zero3_gathered(parameters: list[torch.Tensor]):
    """A context in which DeepSpeed ZeRO-3's partitioned parameters hold their whole tensors (a collective)."""
    if not any(hasattr(parameter, "ds_id") for parameter in parameters):  # ZeRO-3 tags what it partitions
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)


def write_trained(state: dict[str, torch.Tensor], folder: str | Path, manifest: dict[str, Any]) -> None:
    """Write trainable.safetensors, then manifest.json (the manifest marks a complete save)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(state, folder / TRAINABLE, metadata={"format": RUN_FORMAT})
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2))


def save_trained(model: torch.nn.Module, folder: str | Path, manifest: dict[str, Any]) -> None:
    """Write a model's trained weights and the manifest (one process; see gather_trained for several)."""
    write_trained(gather_trained(model, manifest), folder, manifest)
