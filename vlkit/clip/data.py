"""CLIP training data: image-caption pairs -> (augmented, normalised) pixels + tokenized captions.

Pairs come from `vlkit.data.formats.load_clip_pairs` (JSONL or CSV; one `image` path relative to
the image root and one `caption`, or a list of captions of which one is drawn per step). Bad pairs
get what bad samples get in every stage (`vlkit.data.dataset.SkippingDataset`, reasons from
`vlkit.data.checks`): an empty caption or an image that is missing, empty or outside the root is
dropped up front, an image that does not decode is skipped when it is loaded and replaced by the
next good pair, and each is counted by reason (or, with `on_bad_sample="error"`, stops the run).
Images go through `load_image` (root confinement, RGB), the model's image processor (resize +
centre crop, without normalisation), the recipe's augmentation, then the processor's mean/std.
With `cache_images` the resized uint8 image is kept in memory, so later epochs skip decoding.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import datasets
import torch

from vlkit.clip.augment import Augment
from vlkit.data.checks import Problem, check_caption, check_images
from vlkit.data.dataset import SkippingDataset, SkipSample, load_sample_images
from vlkit.data.formats import load_clip_pairs
from vlkit.errors import DataError


def read_pairs(path: str | Path, image_column: str = "image", caption_column: str = "caption") -> datasets.Dataset:
    """CLIP pairs as a Dataset with the standard `id`, `image` and `caption` columns (and the file's own)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CLIP pairs file not found: {path}")
    pairs = load_clip_pairs(str(path), image_column=image_column, caption_column=caption_column)
    if len(pairs) == 0:
        raise DataError(f"{path} holds no CLIP pairs")
    return pairs


def load_pairs(path: str | Path, image_column: str = "image", caption_column: str = "caption") -> list[dict[str, Any]]:
    """CLIP pairs as a list of row dicts (see `read_pairs`), for code that indexes and slices rows."""
    return list(read_pairs(path, image_column, caption_column))


def captions_of(row: dict[str, Any], caption_column: str = "caption") -> list[str]:
    """A row's caption(s) as a list."""
    value = row[caption_column]
    return [value] if isinstance(value, str) else [str(v) for v in value]


def check_pairs(
    pairs: datasets.Dataset, image_root: str | Path | None, allow_images_outside_root: bool = False
) -> list[Problem | None]:
    """Each pair's up-front problem (empty caption; image missing, empty or outside the root), or None."""
    root = None if image_root is None else str(image_root)
    problems: list[Problem | None] = []
    for batch in pairs.select_columns(["image", "caption"]).iter(batch_size=1024):
        for path, caption in zip(batch["image"], batch["caption"]):
            problems.append(check_caption(caption) or check_images([path], root, allow_images_outside_root))
    return problems


class ClipPairDataset(SkippingDataset):
    """One item = {"id", "pixel_values": float[3, H, W] normalised, "caption": str}; bad pairs skipped and counted.

    pairs: a Dataset from `read_pairs` / `load_clip_pairs`, or rows with `id`, `image` and `caption`.
    problems: `check_pairs(pairs, ...)` when the caller already ran it (it is not run twice).
    """

    def __init__(
        self,
        pairs: datasets.Dataset | Iterable[dict[str, Any]],
        image_root: str | Path,
        image_processor,
        augment: Augment | None = None,
        *,
        cache_images: bool = True,
        on_bad_sample: str = "skip",
        allow_images_outside_root: bool = False,
        problems: list[Problem | None] | None = None,
    ) -> None:
        self._init_skipping(on_bad_sample)
        self.image_root = str(image_root)
        self.image_processor = image_processor
        self.augment = augment if augment is not None and augment.enabled else None
        self.allow_images_outside_root = allow_images_outside_root
        self.cache: dict[str, torch.Tensor] | None = {} if cache_images else None  # image path -> uint8 pixels
        self.mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]
        if not isinstance(pairs, datasets.Dataset):
            rows = list(pairs)
            if not rows:
                raise DataError("there are no CLIP pairs; check the data file")
            pairs = datasets.Dataset.from_list(rows)
        missing = {"id", "image", "caption"} - set(pairs.column_names)
        if missing:
            raise DataError(f"pairs lack {sorted(missing)}; load the file with vlkit.clip.data.read_pairs first")
        if problems is None:
            problems = check_pairs(pairs, self.image_root, allow_images_outside_root)
        self.samples = self._drop_bad(pairs, problems)

    def _image_uint8(self, path: str) -> torch.Tensor:
        if self.cache is not None and path in self.cache:
            return self.cache[path]
        (image,) = load_sample_images([path], self.image_root, self.allow_images_outside_root)
        try:
            processed = self.image_processor(images=image, do_normalize=False, do_rescale=False, return_tensors="pt")
        except (DataError, ValueError) as error:
            raise SkipSample("corrupt_image", str(error)) from None
        pixels = processed["pixel_values"][0].round().clamp(0, 255).to(torch.uint8)  # [3, H, W]
        if self.cache is not None:
            self.cache[path] = pixels
        return pixels

    def load(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = self._image_uint8(sample["image"]).float() / 255.0
        recolour = self.augment.draw_recolour() if self.augment is not None else None
        if self.augment is not None:
            image = self.augment(image, recolour=recolour)
        column = self.augment.caption_column(recolour) if self.augment is not None else None
        captions = captions_of(sample, column or "caption")
        caption = captions[int(torch.randint(len(captions), ()))] if len(captions) > 1 else captions[0]
        return {"id": sample["id"], "pixel_values": (image - self.mean) / self.std, "caption": caption}


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
