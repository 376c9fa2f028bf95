"""The run folder format: what a run dir (or one of its checkpoints) holds, and rebuilding a model from it.

A run dir, and every `checkpoints/checkpoint-N` inside it, holds:

    manifest.json           the bases (vision tower, LLM) with a content hash and where they were, how
                            they were joined (connector, feature layer, ...), the LoRA setup, the stages
    trainable.safetensors   the weights that are not the bases': connector, LoRA, a full-tuned LLM

A local base is recorded as given (`source`), as an absolute path, and relative to the run dir (for
a checkpoint, the run dir around it), with a sha256 of its weight files; a hub id or an embedded LLM
name is recorded as given. So a runs tree moved elsewhere still loads, from any working directory,
and a base whose weights changed is caught. Manifests written before those fields existed load as
they always did.

Owns the constants, `RunManifest` (one typed description of a manifest), the one 4-bit config
(`quantization_config`: what QLoRA trains on is what every reload quantizes to), `load_trained`, and
`rebuild`, the one way back from a folder to (model, processor). Training writes the format
(`vlkit.train.checkpoint`); inference (`vlkit.loading`, `vlkit.export`) reads it from here, below
`train/`, so it need not import the training package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlkit.config import TuneSection
from vlkit.errors import ConfigError, ModelLoadError, first_line
from vlkit.llm import EMBEDDED_LLMS, resolve_llm_path, vlkit_home

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINABLE = "trainable.safetensors"
RUN_FORMAT = "vlkit-run/1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
CHECKPOINTS = "checkpoints"
# How an error names each recorded location.
LOCATION_NAMES = {"vision": "vision tower", "llm": "LLM", "init_from": "init_from run"}


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary name and rename, so a crash mid-write never leaves a torn file."""
    path = Path(path)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(staging, path)


# --- folders --------------------------------------------------------------------------------------------
def run_dir_of(folder: str | Path) -> Path:
    """The run dir a folder belongs to: itself, or the run dir around a `checkpoints/checkpoint-N`."""
    from vlkit.compat import PREFIX_CHECKPOINT_DIR

    folder = Path(folder)
    if folder.parent.name == CHECKPOINTS and folder.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-"):
        return folder.parent.parent
    return folder


def latest_checkpoint(checkpoints_dir: str | Path, marks: tuple[str, ...] = (MANIFEST, "trainer_state.json")) -> str | None:
    """The newest complete checkpoint, or None: one holding every file in `marks` (the VLM stages': a
    manifest and the trainer state)."""
    from vlkit.compat import PREFIX_CHECKPOINT_DIR

    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return None
    complete = [
        path for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if all((path / mark).is_file() for mark in marks)
    ]
    if not complete:
        return None
    return str(max(complete, key=lambda path: int(path.name.rsplit("-", 1)[1])))


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
        logger.warning("cannot fingerprint base '%s' (not a local folder); it will not be checked on reload", source)
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


def trained_hash(run: str | Path) -> str | None:
    """sha256 of a run's trainable.safetensors (what an `init_from` continues), None if it has none."""
    path = Path(run) / TRAINABLE
    if not path.is_file():
        return None
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


# --- where things are -------------------------------------------------------------------------------------
def is_local_path(source: str) -> bool:
    """Whether a source names a local folder (an embedded LLM name never does, even if a folder shares it)."""
    return source not in EMBEDDED_LLMS and Path(source).expanduser().is_dir()


def _absolute(path: str | Path) -> Path:
    # Lexical, not resolve(): a symlinked model store keeps the name the user gave it.
    return Path(os.path.normpath(Path(path).expanduser().absolute()))


@dataclass(frozen=True)
class Location:
    """Where a base (or the run continued from) was: as given, absolute, relative to the run dir, its hash.

    `absolute` and `relative` are set for local folders only; hub ids and embedded names have neither.
    """

    source: str
    sha256: str | None = None
    absolute: str | None = None
    relative: str | None = None

    @classmethod
    def record(cls, source: str, run_dir: str | Path, sha256: str | None) -> Location:
        """The location of `source` as a manifest of the run dir `run_dir` records it."""
        if not is_local_path(source):
            return cls(source=source, sha256=sha256)
        absolute = _absolute(source)
        try:
            relative = os.path.relpath(absolute, _absolute(run_dir))
        except ValueError:  # on another drive (Windows): no relative path exists
            relative = None
        return cls(source=source, sha256=sha256, absolute=str(absolute), relative=relative)

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> Location:
        return cls(source=entry["source"], sha256=entry.get("sha256"), absolute=entry.get("absolute"),
                   relative=entry.get("relative"))

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"source": self.source, "sha256": self.sha256}
        if self.absolute is not None:
            entry.update(absolute=self.absolute, relative=self.relative)
        return entry

    def candidates(self, run_dir: str | Path | None) -> list[str]:
        """Where to look, in order: as given (from the working directory), absolute, relative to the run dir."""
        found = [self.source, self.absolute]
        if self.relative is not None and run_dir is not None:
            found.append(str(_absolute(Path(run_dir) / self.relative)))
        return list(dict.fromkeys(path for path in found if path))

    def find(self, run_dir: str | Path | None, what: str) -> str:
        """The source to load: the first candidate that exists, or a one-line ModelLoadError naming them all.

        Without recorded paths (a hub id, an embedded name, a manifest older than these fields) the
        source is returned as given.
        """
        if self.absolute is None and self.relative is None:
            return self.source
        candidates = self.candidates(run_dir)
        for candidate in candidates:
            if Path(candidate).expanduser().is_dir():
                return candidate
        raise ModelLoadError(
            f"cannot find the {what}: tried {', '.join(candidates)}; put it back at one of those paths "
            "(a runs tree moved as a whole keeps working)"
        )


def check_unchanged(name: str, location: Location, found: str, where: str) -> None:
    """A base whose weights changed since `where` was saved is an error (nothing to check without a hash)."""
    if location.sha256 is None or local_folder(found) is None:
        return  # a hub model not downloaded yet: nothing local to check (nor worth a warning on every load)
    current = content_hash(found)
    if current is not None and current != location.sha256:
        raise ConfigError(
            f"the {name} base '{found}' changed since {where} was saved (content hash differs); "
            "restore the original weights or start a new run"
        )


def check_bases_unchanged(manifest: dict[str, Any], where: str, folder: str | Path | None = None) -> None:
    """Resuming, continuing or reloading on a base whose weights changed is an error.

    folder: the run dir or checkpoint the manifest came from, to find bases relative to it.
    """
    run_dir = run_dir_of(folder) if folder is not None else None
    for name, entry in manifest["bases"].items():
        location = Location.from_json(entry)
        found = location.find(run_dir, f"{LOCATION_NAMES.get(name, name)} of {where}")
        check_unchanged(name, location, found, where)


# --- the manifest ---------------------------------------------------------------------------------------
def read_manifest(folder: str | Path) -> dict[str, Any]:
    """manifest.json of a run dir or checkpoint as stored (format checked); `RunManifest.read` types it."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ModelLoadError(f"{folder} is not a vlkit run or checkpoint (no {MANIFEST}); train one with vlkit train")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != RUN_FORMAT:
        raise ModelLoadError(f"{path} has format {manifest.get('format')!r}; this vlkit reads {RUN_FORMAT}")
    return manifest


@dataclass(frozen=True)
class RunManifest:
    """One run dir or checkpoint, described by its manifest.json.

    model: how the parts were joined (connector, vision_feature_layer, vision_feature_select_strategy,
    dtype, image_seq_length, system_prompt). stages: every stage so far, oldest first.
    """

    folder: Path
    stage: str
    bases: dict[str, Location]  # "vision", "llm"
    model: dict[str, Any]
    tune: TuneSection
    stages: list[dict[str, Any]]
    init_from: Location | None = None

    @classmethod
    def read(cls, folder: str | Path) -> RunManifest:
        return cls.from_json(read_manifest(folder), folder)

    @classmethod
    def from_json(cls, manifest: dict[str, Any], folder: str | Path) -> RunManifest:
        init_from = manifest.get("init_from")
        return cls(
            folder=Path(folder), stage=manifest["stage"],
            bases={name: Location.from_json(entry) for name, entry in manifest["bases"].items()},
            model=manifest["model"], tune=TuneSection(**manifest["tune"]), stages=manifest["stages"],
            init_from=Location.from_json(init_from) if init_from else None,
        )

    @property
    def run_dir(self) -> Path:
        return run_dir_of(self.folder)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.model["dtype"])

    @property
    def quantized(self) -> bool:
        """Whether the LLM was trained on a 4-bit base (QLoRA)."""
        return self.tune.llm == "qlora"

    def init_from_changed(self) -> bool:
        """Whether the run this one continued (`init_from`) holds other trained weights now than when this
        one started, or is gone; False when nothing was recorded to compare with."""
        if self.init_from is None or self.init_from.sha256 is None:
            return False
        try:
            found = self.init_from.find(self.run_dir, LOCATION_NAMES["init_from"])
        except ModelLoadError:
            return True
        return trained_hash(found) != self.init_from.sha256

    def locate(self, name: str) -> str:
        """Where base `name` ("vision", "llm") is now; its hash is checked; a VlkitError if missing or changed."""
        location = self.bases[name]
        where = f"run {self.folder}"
        found = location.find(self.run_dir, f"{LOCATION_NAMES.get(name, name)} of {where}")
        check_unchanged(name, location, found, where)
        return found


# --- rebuilding -----------------------------------------------------------------------------------------
def quantization_config(dtype: torch.dtype, skip_modules: list[str] | None = None):
    """The one 4-bit config: NF4 with double quantization, computing in `dtype`.

    QLoRA trains its adapters on exactly this base, so every reload of a QLoRA run must quantize the
    same way (other settings give other weights, and the adapters no longer fit). skip_modules: modules
    left in full precision when a whole VLM is quantized at load time.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=skip_modules,
    )


def load_trained(model: torch.nn.Module, folder: str | Path, prefix: str = "") -> None:
    """Load trainable.safetensors into a model rebuilt from the manifest; names must all match. `prefix`: only
    the weights whose names start with it (e.g. "connector.")."""
    from safetensors.torch import load_file

    path = Path(folder) / TRAINABLE
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no {TRAINABLE}; the run did not finish a save")
    try:
        state = load_file(path)
    except Exception as error:  # safetensors' own error type: a torn or foreign file
        raise ModelLoadError(f"cannot read {path} ({first_line(error)}); the file is damaged: train again, or "
                             "use an earlier checkpoint of the run") from None
    state = {name: tensor for name, tensor in state.items() if name.startswith(prefix)}
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


def rebuild(
    run: str | Path | RunManifest,
    *,
    quantize: bool | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
):
    """(model, processor) of a run dir or checkpoint: the bases, the run's adapters, the trained weights.

    quantize: None builds the LLM as the run trained it (4-bit for QLoRA); False builds it unquantized
    (a QLoRA run's LoRA then sits on the full-precision base, e.g. to merge it); True quantizes it.
    dtype: the run's own dtype unless given. The model is returned in eval mode.
    """
    from vlkit.adapters import apply_adapters
    from vlkit.build import build_vlm

    manifest = run if isinstance(run, RunManifest) else RunManifest.read(run)
    dtype = dtype or manifest.dtype
    quantized = manifest.quantized if quantize is None else quantize
    tune = manifest.tune
    if tune.llm == "qlora" and not quantized:
        tune = tune.model_copy(update={"llm": "lora"})  # same LoRA layout (names match), no 4-bit preparation
    spec = manifest.model
    model, processor = build_vlm(
        vision=manifest.locate("vision"),
        llm=manifest.locate("llm"),
        connector=spec["connector"],
        vision_feature_layer=spec["vision_feature_layer"],
        vision_feature_select_strategy=spec["vision_feature_select_strategy"],
        system_prompt=spec.get("system_prompt"),  # absent in runs made before it existed
        dtype=dtype,
        llm_quantization_config=quantization_config(dtype) if quantized else None,
        attn_implementation=attn_implementation,
    )
    apply_adapters(model, tune)
    load_trained(model, manifest.folder)
    model.eval()
    return model, processor


def load_run(folder: str | Path, device: str | None = None):
    """(model, processor) of a run dir or checkpoint, as it was trained, in eval mode (on `device` if given)."""
    model, processor = rebuild(folder)
    if device:
        model.to(device)
    return model, processor
