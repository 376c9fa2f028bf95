"""`vlkit export RUN_OR_CHECKPOINT OUT_DIR [--format auto|llava|vlkit] ...`: a standalone Hugging Face folder.

Owns the order of an export: check the arguments and OUT_DIR before loading anything, load the
run with LoRA merged (`source`), pick the format (`llava` when the mapping is exact, else
`vlkit`), write the weights, processor, generation config and model card into a staging folder
that is renamed to OUT_DIR only when complete, then optionally upload it with huggingface_hub.

    from vlkit.export import export_run
    export_run("runs/tiny-instruct", "out/tiny-llava", format="llava")  # -> "llava"
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

from transformers import GenerationConfig

from vlkit.errors import first_line
from vlkit.export.source import DTYPES, ExportError, ExportSource, load_merged, resolve_source

FORMATS = ("auto", "llava", "vlkit")

__all__ = ["ExportError", "export_run", "push_folder", "run"]


def is_vlkit_export(folder: Path) -> bool:
    """Whether `folder` is what `vlkit export` writes: config.json and a model card tagged vlkit."""
    from huggingface_hub import ModelCard

    card = folder / "README.md"
    if not ((folder / "config.json").is_file() and card.is_file()):
        return False
    try:
        return "vlkit" in (ModelCard.load(card).data.tags or [])
    except Exception:  # noqa: BLE001 (a README without card metadata, or with broken YAML: not ours)
        return False


def check_arguments(source: Path, out_dir: Path, format: str, dtype: str, overwrite: bool, repo_id: str | None) -> None:
    """Everything checkable before loading weights; one ExportError line otherwise."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format '{format}'; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown export dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a folder; choose another OUT_DIR")
    out, src = out_dir.resolve(), source.resolve()
    if out == Path.cwd().resolve() or out in Path.cwd().resolve().parents:
        raise ExportError(f"OUT_DIR {out_dir} is the current folder or holds it; export to a new folder, "
                          f"e.g. {Path(out_dir) / 'export'}")
    if out == src or out in src.parents or src in out.parents:
        raise ExportError(f"OUT_DIR {out_dir} overlaps the run {source}; export to a folder outside the run")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ExportError(f"{out_dir} exists and is not empty; pass --overwrite to replace it or choose another OUT_DIR")
        if not is_vlkit_export(out_dir):  # --overwrite deletes the folder: never a base model's or a run's
            raise ExportError(f"{out_dir} is not an earlier vlkit export (a model folder whose README.md card is "
                              "tagged vlkit), and --overwrite replaces only those; choose another OUT_DIR")
    if repo_id is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            raise ExportError(f"'{repo_id}' is not a valid Hub repo id; use NAME or ORG/NAME") from None


def generation_config_for(model, processor) -> GenerationConfig:
    """The model's own generation config, with pad/eos filled in and the image token never generated."""
    config = copy.deepcopy(model.generation_config)
    tokenizer = processor.tokenizer
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    image_token = [model.config.image_token_id]
    if image_token not in (config.bad_words_ids or []):
        config.bad_words_ids = [*(config.bad_words_ids or []), image_token]
    return config


def choose_format(requested: str, model, processor) -> str:
    from vlkit.export.llava import llava_blocker

    if requested == "vlkit":
        return "vlkit"
    reason = llava_blocker(model, processor)
    if reason is None:
        return "llava"
    if requested == "llava":
        raise ExportError(f"--format llava does not apply: {reason}; use --format vlkit")
    return "vlkit"


def write_folder(source: ExportSource, model, processor, fmt: str, folder: Path, dtype: str, max_shard_size: str,
                 repo_id: str | None) -> None:
    from vlkit.export.card import model_card

    generation_config = generation_config_for(model, processor)
    if fmt == "llava":
        from vlkit.export.llava import write_llava

        write_llava(model, processor, folder, generation_config, max_shard_size)
    else:
        from vlkit.export.remote_code import write_vlkit

        write_vlkit(model, processor, folder, generation_config, max_shard_size)
    model_card(source, fmt, dtype, repo_id).save(folder / "README.md")


def export_run(source: str | Path, out_dir: str | Path, format: str = "auto", dtype: str = "float32",
               max_shard_size: str = "2GB", overwrite: bool = False, repo_id: str | None = None) -> str:
    """Export a run dir or checkpoint to `out_dir`; return the format written ("llava" or "vlkit")."""
    check_arguments(Path(source), Path(out_dir), format, dtype, overwrite, repo_id)
    out = Path(out_dir).resolve()  # its parent holds the staging folder: "out/.." for "out/", not "out" itself
    export_source = resolve_source(source)
    if format == "llava":
        from vlkit.export.llava import connector_blocker

        reason = connector_blocker(export_source.connector)  # refuse before loading any weights
        if reason:
            raise ExportError(f"--format llava does not apply: {reason}; use --format vlkit")
    model, processor = load_merged(export_source, DTYPES[dtype])
    fmt = choose_format(format, model, processor)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written next to OUT_DIR and renamed when complete: a failed export leaves no half folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_folder(export_source, model, processor, fmt, staging, dtype, max_shard_size, repo_id)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return fmt


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create the Hub repo (if needed) and upload the exported folder; return the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload model exported with vlkit")
    except Exception as error:  # network, auth, permissions: the export itself is complete and kept
        raise ExportError(
            f"upload to {repo_id} failed ({type(error).__name__}: {first_line(error)}); the export is complete in "
            f"{folder}, upload it later with: hf upload {repo_id} {folder}"
        ) from None
    return str(url)


def how_to_load(out: Path, fmt: str) -> str:
    if fmt == "llava":
        return (f"load it with stock transformers:\n  AutoModelForImageTextToText.from_pretrained('{out}')\n"
                f"  AutoProcessor.from_pretrained('{out}')")
    return (f"it carries vlkit's model code; load it with:\n"
            f"  AutoModelForImageTextToText.from_pretrained('{out}', trust_remote_code=True)\n"
            f"  AutoProcessor.from_pretrained('{out}', trust_remote_code=True)")


def run(args) -> int:
    """CLI entry: `vlkit export`."""
    out = Path(args.out_dir)
    fmt = export_run(args.source, out, format=args.format, dtype=args.dtype, max_shard_size=args.max_shard_size,
                     overwrite=args.overwrite, repo_id=args.push_to_hub)
    print(f"exported {args.source} -> {out} (format {fmt}, {args.dtype}); {how_to_load(out, fmt)}")
    if args.push_to_hub:
        url = push_folder(out, args.push_to_hub, private=args.private)
        print(f"uploaded to {url}")
    return 0
