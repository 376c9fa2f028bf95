"""Data file formats: LLaVA JSON, ShareGPT (LLaMA-Factory) and CLIP pairs, loaded as `datasets.Dataset`.

Every conversation loader yields the same normalized sample, whatever the file said:

    {"id": str, "images": [path relative to the image root, ...],
     "messages": [{"role": "system" | "user" | "assistant", "content": str with "<image>" markers}],
     **extra}  # every other top-level field of the record, e.g. "qa" of the shapes world

Files are read with `datasets.load_dataset` (Arrow, memory-mapped, cached) and normalized with a
cached `.map`, so a large file is parsed once. Normalizing never raises for a bad sample: a
sample with an unknown role, no turns or a wrong `<image>` count comes through as it is, and the
checks in `vlkit.data.checks` report it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from vlkit.errors import DataError
from vlkit.modeling import IMAGE_TOKEN

CONVERSATION_FORMATS = ("llava", "sharegpt")
ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
# Record fields the normalizer consumes; every other field is kept as an extra column.
CONVERSATION_KEYS = ("conversations", "messages")
IMAGE_KEYS = ("image", "images")


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None]
    return [str(value)]


def normalize_messages(turns: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """LLaVA `{from, value}` or OpenAI `{role, content}` turns as `{role, content}` with vlkit's role names."""
    messages = []
    for turn in turns or []:
        role = turn.get("role") if turn.get("role") is not None else turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        role = str(role or "").strip().lower()
        messages.append({"role": ROLE_NAMES.get(role, role), "content": "" if content is None else str(content)})
    return messages


def normalize_record(record: dict[str, Any], index: int, format: str) -> dict[str, Any]:
    """One raw LLaVA / ShareGPT record as a normalized sample (see the module docstring)."""
    turns = next((record[k] for k in CONVERSATION_KEYS if record.get(k) is not None), None)
    messages = normalize_messages(turns)
    images = [path for key in IMAGE_KEYS for path in _as_list(record.get(key))]
    if format == "llava" and images and not any(IMAGE_TOKEN in m["content"] for m in messages):
        # LLaVA's convention: an image without a marker goes before the first user turn's text.
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is not None:
            first_user["content"] = f"{IMAGE_TOKEN}\n" * len(images) + first_user["content"]
    sample_id = record.get("id")
    return {
        "id": str(index) if sample_id is None or sample_id == "" else str(sample_id),
        "images": images,
        "messages": messages,
    }


def _normalize_batch(batch: dict[str, list], indices: list[int], format: str) -> dict[str, list]:
    keys = list(batch)
    out: dict[str, list] = {"id": [], "images": [], "messages": []}
    for row, index in enumerate(indices):
        sample = normalize_record({key: batch[key][row] for key in keys}, index, format)
        for key in out:
            out[key].append(sample[key])
    return out


def _read_json(path: Path, cache_dir: str | None) -> datasets.Dataset:
    try:
        return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as error:  # datasets wraps parse errors in several types
        if holds_no_records(path):  # datasets says "corresponds to no data", which reads like a syntax error
            raise no_samples(path) from None
        raise DataError(f"cannot read {path} as JSON or JSON Lines: {error}; check the file's syntax") from None


def no_samples(path: Path) -> DataError:
    return DataError(f"{path} holds no samples (an empty file, list or object); give a data file with samples")


def holds_no_records(path: Path) -> bool:
    """An empty file, blank lines only, or an empty JSON list or object."""
    text = path.read_text(encoding="utf-8", errors="replace").strip().lstrip("\ufeff")
    return text == "" or any(text.startswith(open_) and text[1:].strip() == close for open_, close in ("[]", "{}"))


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON Lines file; a line that is not JSON is a
    one-line DataError naming the file and line."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not JSON ({error.msg})") from None


def _first_record(path: Path) -> dict[str, Any]:
    """The first record of a JSON list or JSON Lines file, read without parsing the whole file."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip("\ufeff \t\r\n")
    decoder = json.JSONDecoder()
    try:
        if head.startswith("["):
            head = head[1:].lstrip()
            if head.startswith("]"):
                return {}
        record, _ = decoder.raw_decode(head)
    except json.JSONDecodeError:
        # A first record longer than the peek window: fall back to a full parse.
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                record = json.loads(f.readline())
            else:
                data = json.load(f)
                record = data[0] if isinstance(data, list) and data else {}
    return record if isinstance(record, dict) else {}


def detect_format(path: str | os.PathLike) -> str:
    """'llava', 'sharegpt' or 'clip', from the file's extension and the keys of its first record."""
    path = Path(path)
    if path.suffix in (".csv", ".tsv"):
        return "clip"
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        record = _first_record(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        if holds_no_records(path):
            raise no_samples(path) from None
        raise DataError(f"cannot read {path} as JSON or JSON Lines: {error}") from None
    if "messages" in record:
        return "sharegpt"
    if "conversations" in record:
        # LLaMA-Factory's own ShareGPT flavour also uses "conversations" (+ "images", plural).
        return "sharegpt" if "images" in record and "image" not in record else "llava"
    if "caption" in record or "text" in record:
        return "clip"
    if not record:
        return "llava"
    raise DataError(
        f"cannot tell the format of {path}: its first record has keys {sorted(record)}; expected 'conversations' "
        "(LLaVA), 'messages' (ShareGPT) or 'caption' (CLIP pairs); pass the format explicitly"
    )


def load_conversations(
    path: str | os.PathLike, format: str = "auto", cache_dir: str | None = None, num_proc: int | None = None
) -> datasets.Dataset:
    """Load a LLaVA or ShareGPT file as a Dataset of normalized samples (extra fields kept)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if format == "auto":
        format = detect_format(path)
    if format not in CONVERSATION_FORMATS:
        raise DataError(f"'{format}' is not a conversation format; use one of {', '.join(CONVERSATION_FORMATS)}")
    raw = _read_json(path, cache_dir)
    if len(raw) == 0:
        return datasets.Dataset.from_dict({"id": [], "images": [], "messages": []}, features=CONVERSATION_FEATURES)
    if not any(key in raw.column_names for key in CONVERSATION_KEYS):
        raise DataError(
            f"{path} has no 'conversations' or 'messages' field (columns: {raw.column_names}); "
            "is it a CLIP pairs file? use load_clip_pairs"
        )
    consumed = [c for c in raw.column_names if c in CONVERSATION_KEYS + IMAGE_KEYS + ("id",)]
    return raw.map(
        _normalize_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={"format": format},
        remove_columns=consumed,
        features=_output_features(raw, consumed),
        num_proc=num_proc,
        desc=f"normalizing {format} samples",
    )


CONVERSATION_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "images": datasets.List(datasets.Value("string")),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    }
)


def _output_features(raw: datasets.Dataset, consumed: list[str]) -> datasets.Features:
    extras = {name: feature for name, feature in raw.features.items() if name not in consumed}
    return datasets.Features({**CONVERSATION_FEATURES, **extras})


def load_clip_pairs(
    path: str | os.PathLike,
    image_column: str = "image",
    caption_column: str = "caption",
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load image-caption pairs (JSON Lines, JSON list, CSV or TSV) as a Dataset.

    Every column of the file is kept, plus standard ones: `id` (str; the row number when the file
    has none), `image` (the image path, from `image_column`) and `caption` (from `caption_column`:
    a string, or a list of strings for data with several captions per image).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix in (".csv", ".tsv"):
        try:
            raw = datasets.load_dataset(
                "csv", data_files=str(path), split="train", cache_dir=cache_dir,
                delimiter="\t" if path.suffix == ".tsv" else ",",
            )
        except Exception as error:
            raise DataError(f"cannot read {path} as CSV: {error}") from None
    else:
        raw = _read_json(path, cache_dir)
    for column, option in ((image_column, "image_column"), (caption_column, "caption_column")):
        if column not in raw.column_names:
            raise DataError(
                f"{path} has no column '{column}' (columns: {raw.column_names}); in a recipe, set data.{option} to "
                f"the right name (vlkit eval and vlkit data validate read '{column}')"
            )
    caption_feature = raw.features[caption_column]
    if isinstance(caption_feature, datasets.Value):
        caption_feature = datasets.Value("string")
    features = {**raw.features, "id": datasets.Value("string"), "image": datasets.Value("string"),
                "caption": caption_feature}
    return raw.map(
        _normalize_pair_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={"image_column": image_column, "caption_column": caption_column},
        features=datasets.Features(features),
        desc="normalizing CLIP pairs",
    )


def _normalize_pair_batch(
    batch: dict[str, list], indices: list[int], image_column: str, caption_column: str
) -> dict[str, list]:
    ids = batch["id"] if "id" in batch else [None] * len(indices)
    return {
        "id": [str(index) if value is None or value == "" else str(value) for value, index in zip(ids, indices)],
        "image": ["" if value is None else str(value) for value in batch[image_column]],
        "caption": [
            [str(v) for v in value] if isinstance(value, list) else ("" if value is None else str(value))
            for value in batch[caption_column]
        ],
    }
