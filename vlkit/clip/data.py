"""CLIP training data: image-caption pairs -> (augmented, normalised) pixels + tokenized captions.

Rows come from `vlkit.data.formats.load_clip_pairs` (JSONL or CSV; one `image` path relative to
the image root and one `caption`, or a list of captions of which one is drawn per step). Images
go through `load_image` (root confinement, RGB), the model's image processor (resize + centre
crop, without normalisation), the recipe's augmentation, then the processor's mean/std. With
`cache_images` the resized uint8 image is kept in memory, so later epochs skip decoding.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vlkit.clip.augment import Augment
from vlkit.data.images import load_image
from vlkit.errors import DataError


def _read_rows(path: Path) -> list[dict[str, Any]]:
    # Fallback reader, used only while vlkit.data.formats has no `load_clip_pairs`.
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number} is not valid JSON ({error.msg})") from None
    return rows


def load_pairs(path: str | Path, image_column: str = "image", caption_column: str = "caption") -> list[dict[str, Any]]:
    """CLIP pairs as a list of row dicts with at least `image_column` and `caption_column`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CLIP pairs file not found: {path}")
    try:
        from vlkit.data.formats import load_clip_pairs
    except ImportError:
        rows = _read_rows(path)
    else:
        rows = list(load_clip_pairs(str(path), image_column=image_column, caption_column=caption_column))
    if not rows:
        raise DataError(f"{path} holds no CLIP pairs")
    for column in (image_column, caption_column):
        if column not in rows[0]:
            raise DataError(f"{path} has no '{column}' column (columns: {', '.join(rows[0])}); set data.{column.split('_')[0]}_column")
    return rows


def captions_of(row: dict[str, Any], caption_column: str) -> list[str]:
    """A row's caption(s) as a list."""
    value = row[caption_column]
    return [value] if isinstance(value, str) else [str(v) for v in value]


class ClipPairDataset(Dataset):
    """One item = {"pixel_values": float[3, H, W] normalised, "caption": str}."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        image_root: str | Path,
        image_processor,
        augment: Augment | None = None,
        image_column: str = "image",
        caption_column: str = "caption",
        cache_images: bool = True,
        allow_outside_root: bool = False,
    ) -> None:
        self.rows = rows
        self.image_root = Path(image_root)
        self.image_processor = image_processor
        self.augment = augment if augment is not None and augment.enabled else None
        self.image_column = image_column
        self.caption_column = caption_column
        self.allow_outside_root = allow_outside_root
        self.cache: dict[int, torch.Tensor] | None = {} if cache_images else None
        self.mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.rows)

    def _image_uint8(self, index: int) -> torch.Tensor:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        image = load_image(self.rows[index][self.image_column], self.image_root, self.allow_outside_root)
        pixels = self.image_processor(images=image, do_normalize=False, do_rescale=False, return_tensors="pt")["pixel_values"][0]
        pixels = pixels.round().clamp(0, 255).to(torch.uint8)  # [3, H, W]
        if self.cache is not None:
            self.cache[index] = pixels
        return pixels

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self._image_uint8(index).float() / 255.0
        if self.augment is not None:
            image = self.augment(image)
        captions = captions_of(self.rows[index], self.caption_column)
        caption = captions[int(torch.randint(len(captions), ()))] if len(captions) > 1 else captions[0]
        return {"pixel_values": (image - self.mean) / self.std, "caption": caption}


class ClipCollator:
    """Stacks pixels and tokenizes captions (padded to the longest, truncated to `max_length`)."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        text = self.tokenizer(
            [item["caption"] for item in items],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
        }
