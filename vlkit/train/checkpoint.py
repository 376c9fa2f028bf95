"""Run dirs and checkpoints: only what was trained, a manifest of the frozen bases, atomic writes.

A run dir (and every `checkpoints/checkpoint-N` inside it) holds:

    manifest.json           the bases (vision tower, LLM) with a content hash, how they were joined
                            (connector, feature layer, ...), the LoRA setup, the stages so far
    trainable.safetensors   the weights that are not the bases': connector, LoRA, a full-tuned LLM

so a checkpoint of a 7B run is megabytes. `load_run` rebuilds the model from the bases and the
manifest and loads those weights; `vlkit export` makes a standalone model from it. Files are
written to a temporary name and renamed, so a crash mid-save never leaves a torn file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlkit.errors import ConfigError, ModelLoadError
from vlkit.llm import resolve_llm_path, vlkit_home

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINABLE = "trainable.safetensors"
RUN_FORMAT = "vlkit-run/1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


# --- atomic file writes --------------------------------------------------------------------------------
def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(staging, path)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, staging, metadata=metadata)
    os.replace(staging, path)


# --- base fingerprints ----------------------------------------------------------------------------------
def local_folder(source: str) -> Path | None:
    """The local folder behind a model source: a path, an embedded name, or a cached hub id."""
    resolved = Path(resolve_llm_path(source))
    if resolved.is_dir():
        return resolved
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:
        return None


def content_hash(source: str) -> str | None:
    """sha256 over the weight files of a base model, cached by (path, size, mtime)."""
    folder = local_folder(source)
    if folder is None:
        logger.warning("cannot fingerprint base '%s' (not a local folder); resume will not check it", source)
        return None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    key = json.dumps([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    cache_file = vlkit_home() / "hashes.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    cache_key = hashlib.sha256(key.encode()).hexdigest()
    if cache_key in cache:
        return cache[cache_key]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode())
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 22), b""):
                digest.update(block)
    cache[cache_key] = digest.hexdigest()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache_file, json.dumps(cache))
    return cache[cache_key]


# --- manifests ------------------------------------------------------------------------------------------
def build_manifest(
    recipe, model, bases: dict[str, str], history: list[dict[str, Any]], system_prompt: str | None = None
) -> dict[str, Any]:
    """Everything needed to rebuild the model from its bases (system_prompt: the one build_vlm used)."""
    config = model.config
    return {
        "format": RUN_FORMAT,
        "stage": recipe.stage,
        "bases": {name: {"source": source, "sha256": content_hash(source)} for name, source in bases.items()},
        "model": {
            "connector": config.connector_config,
            "vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "dtype": recipe.model.dtype,
            "image_seq_length": config.image_seq_length,
            "system_prompt": system_prompt,
        },
        "tune": recipe.tune.model_dump(mode="json"),
        "stages": [*history, {"stage": recipe.stage, "output_dir": recipe.output_dir, "tune": recipe.tune.llm}],
    }


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ModelLoadError(f"{folder} is not a vlkit run or checkpoint (no {MANIFEST}); train one with vlkit train")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != RUN_FORMAT:
        raise ModelLoadError(f"{path} has format {manifest.get('format')!r}; this vlkit reads {RUN_FORMAT}")
    return manifest


def check_bases_unchanged(manifest: dict[str, Any], where: str) -> None:
    """Resuming or continuing on a base whose weights changed is an error."""
    for name, base in manifest["bases"].items():
        if base.get("sha256") is None:
            continue
        current = content_hash(base["source"])
        if current is not None and current != base["sha256"]:
            raise ConfigError(
                f"the {name} base '{base['source']}' changed since {where} was saved (content hash differs); "
                "restore the original weights or start a new run"
            )


def saved_state(model: torch.nn.Module, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights that are not the bases': connector, LoRA, and any base part tuned in full."""
    full_llm = any(stage.get("tune") == "full" for stage in manifest["stages"])
    state = {}
    for name, parameter in model.named_parameters():
        if (
            parameter.requires_grad
            or name.startswith("connector.")
            or "lora_" in name
            or (full_llm and name.startswith("language_model."))
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


def load_trained(model: torch.nn.Module, folder: str | Path) -> None:
    """Load trainable.safetensors into a model rebuilt from the manifest; names must all match."""
    path = Path(folder) / TRAINABLE
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no {TRAINABLE}; the run did not finish a save")
    state = load_file(path)
    parameters = dict(model.named_parameters())
    unknown = [name for name in state if name not in parameters]
    if unknown:
        raise ModelLoadError(
            f"{path} holds {len(unknown)} weight(s) this model lacks (e.g. {unknown[0]}); was it built differently?"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(like(parameters[name], tensor.to(parameters[name].dtype)))


def like(parameter: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` laid out as `parameter`: this rank's shard when FSDP2 sharded it into a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(parameter, DTensor):
        return tensor
    # Every rank read the same file, so each cuts out its own shard: no communication (src_data_rank=None).
    return distribute_tensor(tensor.to(parameter.device), parameter.device_mesh, parameter.placements, src_data_rank=None)


def load_run(folder: str | Path, device: str | None = None):
    """Rebuild (model, processor) from a run dir or checkpoint: bases + manifest + trained weights."""
    from transformers import BitsAndBytesConfig

    from vlkit.build import build_vlm
    from vlkit.config import TuneSection
    from vlkit.train.stages import apply_adapters

    manifest = read_manifest(folder)
    tune = TuneSection(**manifest["tune"])
    spec = manifest["model"]
    dtype = getattr(torch, spec["dtype"])
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype) if tune.llm == "qlora" else None
    model, processor = build_vlm(
        vision=manifest["bases"]["vision"]["source"],
        llm=manifest["bases"]["llm"]["source"],
        connector=spec["connector"],
        vision_feature_layer=spec["vision_feature_layer"],
        vision_feature_select_strategy=spec["vision_feature_select_strategy"],
        system_prompt=spec.get("system_prompt"),  # absent in runs made before it existed
        dtype=dtype,
        llm_quantization_config=quantization,
    )
    apply_adapters(model, tune)
    load_trained(model, folder)
    model.eval()
    if device:
        model.to(device)
    return model, processor
