"""Training datasets that skip bad samples, count them, and never crash a dataloader worker.

`ConversationDataset` turns normalized conversation samples (see `vlkit.data.formats`) into
`{"id", "input_ids", "labels", "pixel_values"}` items with `processor.encode_conversation`
(with `defer_images=True`, decoded `images` that `VlkitCollator` processes per batch).
CLIP pairs have theirs, on the same `SkippingDataset`, in `vlkit.clip.data.ClipPairDataset`.

Bad data is handled in two places:

1. An up-front pass drops samples whose text is unusable (no turns, no answer, unknown role,
   `<image>` count mismatch, too long to truncate safely) or whose image files escape the root,
   are missing or are empty. The text checks run as a cached `datasets.map` (tokenizing is the
   costly part, and it depends only on the text); the file checks run on every construction,
   because a cache would hide files that were added or removed since.
2. At load time an image that does not decode, or a sample the processor rejects, is marked bad
   and replaced by the next good sample (index + 1, + 2, ...), so the same run always sees the
   same data. Marks live in a shared-memory tensor, so counts from dataloader worker processes
   reach the main process.

`on_bad_sample="error"` raises `DataError` naming the sample id and the reason instead.
`.skipped` (reason -> count), `.skipped_ids` (reason -> first ids) and `summary()` feed the
run summary.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from typing import Any

import datasets
import torch
from tqdm import tqdm

from vlkit.data.checks import (
    REASONS,
    Problem,
    check_images,
    check_messages,
    encode_text_or_problem,
)
from vlkit.data.images import image_problem, load_image
from vlkit.errors import ConfigError, DataError, ImageError

logger = logging.getLogger(__name__)

REASON_CODES = {reason: code for code, reason in enumerate(REASONS, start=1)}  # 0 = good
MAX_IDS = 10  # ids kept per reason for the summary
MAX_SUBSTITUTES = 64  # consecutive bad samples tolerated before giving up
MAX_LOGGED = 5  # load-time skips logged per process


def _as_dataset(dataset_or_samples: datasets.Dataset | Iterable[dict[str, Any]]) -> datasets.Dataset:
    if isinstance(dataset_or_samples, datasets.Dataset):
        return dataset_or_samples
    samples = list(dataset_or_samples)
    if not samples:
        raise DataError("the data set is empty; check the data file")
    return datasets.Dataset.from_list(samples)


def _encode_texts(
    messages: list[list[dict[str, str]]], images: list[list[str]], processor: Any, max_length: int | None
) -> dict[str, list]:
    """Batched `datasets.map` function: each sample's text encoding, or its problem ("" when fine)."""
    columns: dict[str, list] = {"reason": [], "detail": [], "input_ids": [], "labels": []}
    for sample_messages, sample_images in zip(messages, images):
        encoded, problem = None, check_messages(sample_messages, len(sample_images))
        if problem is None:
            encoded, problem = encode_text_or_problem(processor, sample_messages, len(sample_images), max_length)
        columns["reason"].append(problem[0] if problem else "")
        columns["detail"].append(problem[1] if problem else "")
        columns["input_ids"].append(encoded["input_ids"] if encoded else [])
        columns["labels"].append(encoded["labels"] if encoded else [])
    return columns


class SkippingDataset(torch.utils.data.Dataset):
    """Base class: load-time skip-and-substitute with counts shared across worker processes.

    Subclasses set `self.samples` (a datasets.Dataset with an "id" column) and implement
    `load(sample) -> item`, raising `SkipSample` for a bad sample.
    """

    samples: datasets.Dataset

    def _init_skipping(self, on_bad_sample: str) -> None:
        if on_bad_sample not in ("skip", "error"):
            raise ConfigError(f"on_bad_sample must be 'skip' or 'error', got '{on_bad_sample}'")
        self.on_bad_sample = on_bad_sample
        self.prepass_skipped: Counter[str] = Counter()
        self.prepass_ids: dict[str, list[str]] = {}
        self._logged = 0

    def _drop_bad(self, samples: datasets.Dataset, problems: list[Problem | None]) -> datasets.Dataset:
        """Record the up-front problems; raise in error mode; return the good samples."""
        bad = [(i, p) for i, p in enumerate(problems) if p is not None]
        all_ids = list(samples["id"]) if bad else []
        if bad and self.on_bad_sample == "error":
            index, (reason, detail) = bad[0]
            raise DataError(f"sample '{all_ids[index]}' is unusable ({reason}): {detail}")
        for index, (reason, detail) in bad:
            self.prepass_skipped[reason] += 1
            ids = self.prepass_ids.setdefault(reason, [])
            if len(ids) < MAX_IDS:
                ids.append(all_ids[index])
                if len(ids) <= 3:
                    logger.warning("skipping sample '%s' (%s): %s", ids[-1], reason, detail)
        keep = [i for i, p in enumerate(problems) if p is None]
        if not keep:
            raise DataError(f"no usable samples among {len(samples)}: {self._describe(dict(self.prepass_skipped))}")
        if bad:
            logger.warning("dropped %d of %d samples before training: %s", len(bad), len(samples),
                           self._describe(dict(self.prepass_skipped)))
        good = samples.select(keep) if len(keep) < len(samples) else samples
        # One byte per sample in shared memory: 0 = not known bad, else the reason's code.
        self._bad = torch.zeros(len(good), dtype=torch.uint8).share_memory_()
        return good

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, sample: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.samples)
        last: Problem | None = None
        for attempt in range(min(n, MAX_SUBSTITUTES)):
            position = (index + attempt) % n
            if self._bad[position]:
                continue
            sample = self.samples[position]
            try:
                return self.load(sample)
            except SkipSample as skip:
                last = (skip.reason, skip.detail)
                self._mark_bad(position, sample["id"], skip.reason, skip.detail)
        raise DataError(
            f"{min(n, MAX_SUBSTITUTES)} samples in a row from index {index} are unusable"
            + (f"; the last: {last[0]}: {last[1]}" if last else "")
            + f"; run `vlkit data validate` on the data ({self.summary()})"
        )

    def _mark_bad(self, position: int, sample_id: str, reason: str, detail: str) -> None:
        if self.on_bad_sample == "error":
            raise DataError(f"sample '{sample_id}' is unusable ({reason}): {detail}")
        self._bad[position] = REASON_CODES[reason]
        if self._logged < MAX_LOGGED:
            self._logged += 1
            logger.warning("skipping sample '%s' (%s): %s", sample_id, reason, detail)

    @property
    def skipped(self) -> dict[str, int]:
        """reason -> number of samples skipped, up front and at load time (all worker processes)."""
        counts = Counter(self.prepass_skipped)
        for code, count in enumerate(torch.bincount(self._bad.long(), minlength=len(REASONS) + 1).tolist()):
            if code and count:
                counts[list(REASONS)[code - 1]] += count
        return {reason: counts[reason] for reason in REASONS if counts[reason]}

    @property
    def skipped_ids(self) -> dict[str, list[str]]:
        """reason -> the first few ids of skipped samples."""
        ids = {reason: list(values) for reason, values in self.prepass_ids.items()}
        for code, reason in enumerate(REASONS, start=1):
            positions = (self._bad == code).nonzero().flatten()[:MAX_IDS].tolist()
            if positions:
                found = ids.setdefault(reason, [])
                found += [self.samples[p]["id"] for p in positions][: MAX_IDS - len(found)]
        return {reason: ids[reason] for reason in REASONS if ids.get(reason)}

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line for the run summary, e.g. "skipped 2 samples: missing_image=2 (ids: a, b)"."""
        skipped = self.skipped
        if not skipped:
            return "skipped 0 samples"
        return f"skipped {sum(skipped.values())} samples: {self._describe(skipped)}"

    def _describe(self, counts: dict[str, int]) -> str:
        ids = self.skipped_ids if hasattr(self, "_bad") else self.prepass_ids
        parts = []
        for reason, count in counts.items():
            shown = ids.get(reason, [])[:3]
            parts.append(f"{reason}={count}" + (f" (ids: {', '.join(shown)})" if shown else ""))
        return ", ".join(parts)


class SkipSample(Exception):
    """Raised by a `SkippingDataset.load` for a sample that must be skipped; the dataset counts it by reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def load_sample_images(paths: list[str], image_root: str | None, allow_outside_root: bool) -> list:
    """A sample's images, opened; an image that cannot be read raises `SkipSample` with the reason `check` gives."""
    images = []
    for path in paths:
        try:
            images.append(load_image(path, image_root, allow_outside_root))
        except ImageError as error:
            problem = image_problem(path, image_root, allow_outside_root)  # what changed since the check
            raise SkipSample(problem[0] if problem else "corrupt_image", str(error)) from None
    return images


class ConversationDataset(SkippingDataset):
    """Normalized conversations -> processor-encoded training items, bad samples skipped and counted.

    dataset_or_samples: a `datasets.Dataset` from `load_conversations`, or a list of normalized samples.
    processor: has `encode_conversation(messages, images, max_length) -> {"input_ids", "labels",
        "pixel_values"}` (`VlkitProcessor`).
    image_root: the folder image paths are relative to.
    max_length: longer samples are truncated by the processor; those it cannot truncate (it would cut
        image tokens or every answer) are dropped up front.
    defer_images: items carry the decoded `images` (RGB PIL) instead of `pixel_values`, and
        `VlkitCollator(processor=...)` runs the image processor once per batch, which is cheaper per
        image. An image the processor rejects then fails its batch (a `DataError` naming the samples)
        instead of being skipped; it gets only decoded RGB images, which stock image processors accept.
    """

    def __init__(
        self,
        dataset_or_samples: datasets.Dataset | Iterable[dict[str, Any]],
        processor: Any,
        image_root: str | os.PathLike | None,
        max_length: int | None = None,
        on_bad_sample: str = "skip",
        allow_images_outside_root: bool = False,
        num_proc: int | None = None,
        defer_images: bool = False,
    ) -> None:
        self._init_skipping(on_bad_sample)
        self.processor = processor
        self.defer_images = defer_images
        self.image_root = None if image_root is None else str(image_root)
        self.max_length = max_length
        self.allow_images_outside_root = allow_images_outside_root
        samples = _as_dataset(dataset_or_samples)
        missing = {"id", "images", "messages"} - set(samples.column_names)
        if missing:
            raise DataError(
                f"samples lack {sorted(missing)}; load the file with vlkit.data.load_conversations first"
            )
        self.samples = self._drop_bad(*self._encode_and_check(samples, num_proc))

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, processor: Any, image_root: str | os.PathLike, format: str = "auto",
        **kwargs: Any,
    ) -> ConversationDataset:
        from vlkit.data.formats import load_conversations

        return cls(load_conversations(path, format=format), processor, image_root, **kwargs)

    def _encode_and_check(self, samples: datasets.Dataset, num_proc: int | None) -> tuple[datasets.Dataset, list]:
        """The samples with their text encoding (`input_ids`, `labels`) and each one's problem.

        Templating, tokenizing and label masking run once per data set, as a `datasets.map` that
        `datasets` caches on disk (fingerprinted by the data, the processor and max_length), so later
        runs on the same file reuse it. The file checks are never cached.
        """
        text = samples.map(
            _encode_texts,
            batched=True,
            batch_size=256,
            input_columns=["messages", "images"],
            remove_columns=samples.column_names,
            fn_kwargs={"processor": self.processor, "max_length": self.max_length},
            num_proc=num_proc,
            desc="encoding texts" + (f" (max_length {self.max_length})" if self.max_length else ""),
        )
        problems: list[Problem | None] = [
            (reason, detail) if reason else None for reason, detail in zip(text["reason"], text["detail"])
        ]
        images = samples.select_columns(["images"])
        position = 0
        with tqdm(total=len(samples), desc="checking image files", unit="sample", disable=len(samples) < 10_000) as bar:
            for batch in images.iter(batch_size=1024):
                for paths in batch["images"]:
                    if problems[position] is None and paths:
                        problems[position] = check_images(paths, self.image_root, self.allow_images_outside_root)
                    position += 1
                bar.update(len(batch["images"]))
        encoded = samples.remove_columns([c for c in ("input_ids", "labels") if c in samples.column_names])
        encoded = datasets.concatenate_datasets([encoded, text.select_columns(["input_ids", "labels"])], axis=1)
        return encoded, problems

    # A `vlkit.features.CachedFeatures` (set by `vlkit train` when `data.cache_vision_features`): items then
    # carry the frozen tower's stored `vision_features` instead of `pixel_values`.
    vision_features = None

    def _stored_features(self, paths: list[str]) -> torch.Tensor:
        from vlkit.data.images import resolve_image_path
        from vlkit.features import MissingFeatures

        try:
            resolved = [resolve_image_path(p, self.image_root, self.allow_images_outside_root) for p in paths]
            return self.vision_features.lookup(resolved)
        except MissingFeatures as missing:
            raise SkipSample(missing.reason, missing.detail) from None
        except ImageError as error:
            raise SkipSample("image_outside_root", str(error)) from None

    def load(self, sample: dict[str, Any]) -> dict[str, Any]:
        # The text was encoded up front (`_encode_and_check`); only the images are read here.
        item = {
            "id": sample["id"],
            "input_ids": torch.as_tensor(sample["input_ids"], dtype=torch.long),
            "labels": torch.as_tensor(sample["labels"], dtype=torch.long),
            "pixel_values": None,
        }
        if self.vision_features is not None and sample["images"]:
            item["vision_features"] = self._stored_features(sample["images"])
        elif sample["images"] and self.defer_images:
            # The collator processes the whole batch's images in one call.
            item["images"] = load_sample_images(sample["images"], self.image_root, self.allow_images_outside_root)
        elif sample["images"]:
            images = load_sample_images(sample["images"], self.image_root, self.allow_images_outside_root)
            try:
                item["pixel_values"] = self.processor.encode_images(images)
            except (DataError, ValueError) as error:
                raise SkipSample("corrupt_image", str(error)) from None
        return item

