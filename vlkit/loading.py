"""`load_any`: one loader for every kind of model vlkit can talk to (chat, eval, demo).

    loaded = load_any("runs/tiny-instruct")          # or an exported folder, or a hub id
    print(loaded.describe())
    inputs = loaded.prompt_inputs([[{"role": "user", "content": "<image>\\nWhat is this?"}]], [[image]])
    reply = loaded.decode(loaded.model.generate(**inputs)[0, inputs["input_ids"].shape[1]:])

Owns telling the kinds apart and loading each:

    run dir / checkpoint   has manifest.json          -> vlkit.run_folder.rebuild (as it was trained)
    vlkit folder           config.json model_type vlkit (save_pretrained, or `export --format vlkit`)
                                                      -> vlkit's own classes, no remote code needed
    llava folder           config.json model_type llava (`export --format llava`, llava-hf models)
                                                      -> stock LlavaForConditionalGeneration + AutoProcessor
    hub id                 not a local path           -> its config.json decides vlkit or llava

and giving both processor kinds one conversation interface: `prompt_inputs(conversations, images)`
with messages whose string content carries `<image>` markers, `render`, `decode`. VlkitProcessor has
it already; Llava processors get `LlavaConversationProcessor`. Anything that cannot be loaded is a
`ModelLoadError` with one line.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlkit.errors import ModelLoadError, first_line

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
# Modules kept in full precision under --load-4bit: the vision side is small and sensitive to
# quantization, and the LM head is what bitsandbytes leaves alone by default.
# transformers matches these from the start of a module's name (or as a suffix): vlkit's and Llava's names.
SKIP_4BIT = ["vision_tower", "connector", "model.vision_tower", "model.multi_modal_projector", "lm_head"]
# End-of-turn markers of common chat templates; a tokenizer whose eos is another token still ends a
# reply at these (only those that are single special tokens of the tokenizer are used).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


# --- device and dtype ---------------------------------------------------------------------------------
def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an unavailable device is a ModelLoadError."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"unknown device '{device}'; use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' asked for but no CUDA GPU is available; use --device cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """`auto` is float32 on CPU (fastest there) and bfloat16 (or float16) on a GPU; None keeps the saved one."""
    if isinstance(dtype, torch.dtype) or dtype is None:
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            # Natively: torch counts a GPU that emulates bf16 (before Ampere) as supporting it.
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if dtype not in DTYPE_NAMES:
        raise ModelLoadError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16")
    return DTYPE_NAMES[dtype]


def four_bit_config(dtype: torch.dtype):
    """--load-4bit for a whole VLM folder: the one 4-bit config (vlkit.run_folder), the vision side kept out."""
    from vlkit.run_folder import quantization_config

    return quantization_config(dtype, skip_modules=SKIP_4BIT)


# --- the Llava side of the conversation interface ---------------------------------------------------
def content_parts(content: str, image_token: str) -> list[dict[str, str]]:
    """'<image>\\nWhat is it?' -> [{"type": "image"}, {"type": "text", "text": "What is it?"}].

    Stock Llava chat templates iterate content lists; the newline after a marker belongs to the
    marker (the templates write their own)."""
    parts: list[dict[str, str]] = []
    for index, piece in enumerate(content.split(image_token)):
        if index:
            parts.append({"type": "image"})
            piece = piece[1:] if piece.startswith("\n") else piece
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


class LlavaConversationProcessor:
    """A stock Llava processor behind VlkitProcessor's conversation interface.

    Other attributes (`tokenizer`, `image_processor`, `save_pretrained`, ...) are the wrapped
    processor's.
    """

    def __init__(self, processor, model_config) -> None:
        self.processor = processor
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self._model_config = model_config
        self._image_seq_length: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.processor, name)

    @property
    def image_seq_length(self) -> int:
        """Placeholder tokens per image, measured once on a blank image (the processor decides)."""
        if self._image_seq_length is None:
            encoded = self.processor(text=self.image_token, images=[Image.new("RGB", (64, 64))], return_tensors="pt")
            self._image_seq_length = int((encoded["input_ids"] == self.image_token_id).sum())
        return self._image_seq_length

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        converted = [
            {"role": m["role"], "content": content_parts(m["content"], self.image_token)
             if isinstance(m["content"], str) else m["content"]}
            for m in messages
        ]
        return self.processor.apply_chat_template(converted, add_generation_prompt=add_generation_prompt, tokenize=False)

    def adds_bos(self, text: str) -> bool:
        """Whether tokenizing `text` needs the tokenizer's special tokens (the template did not write a BOS)."""
        bos = self.processor.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def prompt_inputs(self, conversations: list[list[dict[str, Any]]], images: list[list] | None = None):
        texts = [self.render(conversation, add_generation_prompt=True) for conversation in conversations]
        flat_images = [image for group in (images or []) for image in group] or None
        tokenizer = self.processor.tokenizer
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # generation continues every row from its last token
        try:
            return self.processor(text=texts, images=flat_images, padding=True, return_tensors="pt",
                                  add_special_tokens=self.adds_bos(texts[0]))
        finally:
            tokenizer.padding_side = padding_side

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        return self.processor.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)


# --- the loaded model -----------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model ready to generate, its conversation processor, and where it came from.

    kind: "run" | "vlkit" | "llava".  source: what the user named.
    """

    model: Any
    processor: Any
    kind: str
    source: str
    device: torch.device
    load_seconds: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)  # extra facts for describe(), e.g. the LLM's name

    # conversation interface (the same for both processor kinds)
    def prompt_inputs(self, conversations: list[list[dict[str, Any]]], images: list[list] | None = None):
        """Left-padded generation inputs on the model's device, pixel values in the vision tower's dtype."""
        inputs = self.processor.prompt_inputs(conversations, images)
        vision_dtype = next(self.parts()[0].parameters()).dtype
        return inputs.to(device=self.device, dtype=vision_dtype)  # casts only the floating-point tensors

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return self.processor.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self.processor.render(messages, add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_token(self) -> str:
        return self.processor.image_token

    @property
    def image_token_id(self) -> int:
        return int(self.processor.image_token_id)

    @property
    def image_seq_length(self) -> int:
        """Placeholder tokens per image."""
        return int(self.processor.image_seq_length)

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def context_length(self) -> int | None:
        """The LLM's context window in tokens, when its config says."""
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(self.text_config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Prompt length of one conversation (with the generation prompt), image tokens included,
        without preprocessing any image: text tokens + (tokens per image - 1) per `<image>` marker."""
        text = self.render(messages, add_generation_prompt=True)
        add_special = self.processor.adds_bos(text) if hasattr(self.processor, "adds_bos") else False
        ids = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
        markers = sum(1 for token in ids if token == self.image_token_id)
        return len(ids) + markers * (self.image_seq_length - 1)

    def end_of_turn_ids(self) -> list[int]:
        """Token ids that end a reply: the generation config's and tokenizer's eos, plus the
        template's end-of-turn marker when it is a special token of its own."""
        ids: list[int] = []
        configured = self.model.generation_config.eos_token_id
        ids += configured if isinstance(configured, list) else ([configured] if configured is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        special = set(self.tokenizer.all_special_tokens) | set(getattr(self.tokenizer, "added_tokens_encoder", {}))
        for token in END_OF_TURN_TOKENS:
            if token in special:
                ids.append(self.tokenizer.convert_tokens_to_ids(token))
        return sorted(set(ids))

    # --- describe() -------------------------------------------------------------------------------------
    def parts(self) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        """(vision tower, connector, LLM) modules, for either model class."""
        model = self.model
        if self.kind == "llava":
            inner = model.model
            return inner.vision_tower, inner.multi_modal_projector, inner.language_model
        return model.vision_tower, model.connector, model.language_model

    def describe(self) -> str:
        """What was loaded, one part per line: vision tower, connector + tokens per image, LLM, device."""
        vision, connector, llm = self.parts()
        config = self.model.config
        vision_config = config.vision_config
        size = getattr(vision_config, "image_size", "?")
        vision_line = (f"{type(vision).__name__} ({vision_config.model_type}): "
                       f"{getattr(vision_config, 'num_hidden_layers', '?')} layers, {size}x{size} px, "
                       f"{millions(vision)} params")
        if self.kind == "llava":
            connector_name = f"llava projector (mlp, depth 2, {config.projector_hidden_act})"
        else:
            options = {k: v for k, v in config.connector_config.items() if k != "type"}
            shown = ", ".join(f"{k} {v}" for k, v in options.items() if not isinstance(v, (dict, list)))
            connector_name = config.connector_config["type"] + (f" ({shown})" if shown else "")
        connector_line = f"{connector_name}: {self.image_seq_length} tokens per image, {millions(connector)} params"
        llm_name = self.notes.get("llm") or (self.text_config.name_or_path or "") or self.text_config.model_type
        llm_class = type(llm).__name__
        lora = " + LoRA" if any("lora_" in name for name, _ in llm.named_parameters()) else ""
        context = self.context_length
        llm_line = (f"{llm_class} ({Path(str(llm_name)).name or llm_name}): "
                    f"{getattr(self.text_config, 'num_hidden_layers', '?')} layers, "
                    f"context {context if context else 'unknown'}, {millions(llm)} params{lora}")
        dtype = next(self.model.parameters()).dtype
        quantized = " (LLM in 4-bit)" if getattr(self.model, "is_loaded_in_4bit", False) or self.notes.get("4bit") else ""
        rows = [
            ("model", f"{self.source} ({KIND_NAMES[self.kind]})"),
            ("vision tower", vision_line),
            ("connector", connector_line),
            ("LLM", llm_line),
            ("device", f"{self.device}, {str(dtype).replace('torch.', '')}{quantized}, loaded in {self.load_seconds:.1f} s"),
        ]
        return "\n".join(f"{name:<13} {value}" for name, value in rows)


KIND_NAMES = {"run": "vlkit run", "vlkit": "vlkit folder", "llava": "llava folder"}


def millions(module: torch.nn.Module) -> str:
    count = sum(p.numel() for p in module.parameters())
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count / 1e3:.1f}K"


# --- the kinds ------------------------------------------------------------------------------------------
def model_type_of(config_file: Path) -> str | None:
    try:
        return json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{config_file} is not readable JSON ({first_line(error)})") from None


def load_run_dir(folder: Path, device: torch.device, dtype: torch.dtype | None, load_4bit: bool) -> tuple[Any, Any, dict]:
    from vlkit.run_folder import RunManifest, rebuild

    manifest = RunManifest.read(folder)
    if load_4bit and not manifest.quantized:
        # A run dir loads as it was trained (4-bit for qlora runs): the same base its adapters were trained on.
        raise ModelLoadError(
            f"a run dir loads as it was trained, and {folder} is not a qlora run; to chat in 4-bit, export it "
            f"(vlkit export {folder} OUT) and run vlkit chat OUT --load-4bit"
        )
    model, processor = rebuild(manifest)
    if dtype is not None and not manifest.quantized:
        model.to(dtype)
    model.to(device)
    return model, processor, {"llm": manifest.bases["llm"].source}


def model_on_device(model_class, source: str, device: torch.device, dtype: torch.dtype | None, load_4bit: bool):
    """`model_class.from_pretrained(source)` on `device`: in `dtype` (None: as saved), or in 4-bit there."""
    kwargs: dict[str, Any] = {"dtype": dtype or "auto"}
    if load_4bit:
        kwargs.update(quantization_config=four_bit_config(dtype or torch.float32), device_map={"": str(device)})
    model = model_class.from_pretrained(source, **kwargs)
    if not load_4bit:  # a 4-bit model is placed by device_map and cannot be moved
        model.to(device)
    return model


def load_vlkit_folder(source: str, device: torch.device, dtype: torch.dtype | None, load_4bit: bool):
    # vlkit's own classes, not the folder's remote code: `--format vlkit` exports carry an auto_map,
    # but with vlkit installed its classes are the same code (and need no trust_remote_code).
    from vlkit.modeling import VlkitForConditionalGeneration
    from vlkit.processing import VlkitProcessor

    model = model_on_device(VlkitForConditionalGeneration, source, device, dtype, load_4bit)
    return model, VlkitProcessor.from_pretrained(source), {}


def load_llava_folder(source: str, device: torch.device, dtype: torch.dtype | None, load_4bit: bool):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = model_on_device(LlavaForConditionalGeneration, source, device, dtype, load_4bit)
    return model, LlavaConversationProcessor(AutoProcessor.from_pretrained(source), model.config), {}


FOLDER_LOADERS = {"vlkit": load_vlkit_folder, "llava": load_llava_folder}


def local_kind(folder: Path) -> str:
    """"run", "vlkit" or "llava" for a local folder, or a ModelLoadError saying what it is instead."""
    if (folder / "manifest.json").is_file():
        return "run"
    if (folder / "config.json").is_file():
        model_type = model_type_of(folder / "config.json")
        if model_type in FOLDER_LOADERS:
            return model_type
        raise ModelLoadError(
            f"{folder} holds a '{model_type}' model, not a vision-language model vlkit can chat with "
            "(it reads vlkit runs, vlkit folders and llava folders)"
        )
    from vlkit.run_folder import latest_checkpoint

    newest = latest_checkpoint(folder / "checkpoints")
    if newest is not None:
        raise ModelLoadError(f"{folder} is an unfinished run; use its newest checkpoint: {newest}")
    raise ModelLoadError(
        f"{folder} is neither a vlkit run (manifest.json) nor a model folder (config.json); give a run dir, "
        "an exported folder or a hub id"
    )


def hub_config_file(repo_id: str) -> Path:
    """config.json of a hub model: from the local cache, else fetched after one quick probe.

    The probe is a single HEAD request, so an offline machine fails in seconds instead of
    waiting out huggingface_hub's retries."""
    from huggingface_hub import constants, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import get_session

    try:
        return Path(hf_hub_download(repo_id, "config.json", local_files_only=True))
    except Exception:
        pass  # not cached
    where = f"'{repo_id}' is not a local folder"
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"{where}, and the Hub is off (HF_HUB_OFFLINE); check the path or download it first")
    try:
        response = get_session().head(hf_hub_url(repo_id, "config.json"), follow_redirects=True, timeout=10)
    except Exception as error:
        raise ModelLoadError(
            f"{where}, and the Hub cannot be reached ({type(error).__name__}); check the path, or your connection"
        ) from None
    if response.status_code in (401, 403, 404):
        raise ModelLoadError(
            f"{where}, and the Hub has no model '{repo_id}' you can read (HTTP {response.status_code}); "
            "check the path or the id (gated or private models need `hf auth login`)"
        )
    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception as error:
        raise ModelLoadError(f"{where}, and its config.json could not be fetched from the Hub ({first_line(error)}); "
                             "check the path, or try again later") from None


def hub_kind(repo_id: str) -> str:
    """The kind of a hub model, from its config.json; a ModelLoadError when it cannot be had."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelLoadError(f"'{repo_id}' is not a local folder (nor a valid hub id); check the path") from None
    model_type = model_type_of(hub_config_file(repo_id))
    if model_type not in FOLDER_LOADERS:
        raise ModelLoadError(f"hub model '{repo_id}' is a '{model_type}' model; vlkit chats with vlkit and llava models")
    return model_type


def load_any(path_or_id: str, device: str = "auto", dtype: str | torch.dtype | None = "auto",
             load_4bit: bool = False) -> LoadedModel:
    """Load a run dir, checkpoint, vlkit or llava folder, or hub id, in eval mode on `device`.

    dtype: "auto" (float32 on CPU, bfloat16/float16 on a GPU), a dtype name, or None to keep the
    saved one (a run dir: the dtype it was trained in). load_4bit quantizes the LLM with bitsandbytes.
    """
    import vlkit  # noqa: F401  (registers vlkit's classes with transformers' Auto classes)

    started = time.perf_counter()
    resolved_device = resolve_device(device)
    requested_dtype = resolve_dtype(dtype, resolved_device)  # checked before any file is read
    if load_4bit and resolved_device.type == "mps":
        raise ModelLoadError("--load-4bit (bitsandbytes) does not run on mps; use --device cpu or a CUDA GPU")
    folder = Path(path_or_id).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ModelLoadError(f"{folder} is a file; give a run dir, an exported folder or a hub id")
    kind = local_kind(folder) if folder.is_dir() else hub_kind(str(path_or_id))
    source = str(folder) if folder.is_dir() else str(path_or_id)
    # A run dir keeps its trained dtype unless one is named; folders default to the device's best.
    wanted = None if (kind == "run" and dtype == "auto") else requested_dtype
    try:
        if kind == "run":
            model, processor, notes = load_run_dir(folder, resolved_device, wanted, load_4bit)
        else:
            model, processor, notes = FOLDER_LOADERS[kind](source, resolved_device, wanted, load_4bit)
    except ModelLoadError:
        raise
    except ImportError as error:
        raise ModelLoadError(f"cannot load '{path_or_id}': {first_line(error)}") from None
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise ModelLoadError(f"cannot load '{path_or_id}' as a {KIND_NAMES[kind]}: {first_line(error)}") from None
    if load_4bit:
        notes["4bit"] = "yes"
    model.eval()
    return LoadedModel(model=model, processor=processor, kind=kind, source=source, device=resolved_device,
                       load_seconds=time.perf_counter() - started, notes=notes)
