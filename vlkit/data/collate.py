"""Batch collation for conversation training items.

`VlkitCollator` pads `input_ids` (pad token), `labels` (-100) and builds `attention_mask`; it
concatenates every sample's `pixel_values` (or stored `vision_features`) in batch order, which is
the order the model splices image features into the `<image>` placeholders. Items that carry
decoded `images` instead (`ConversationDataset(defer_images=True)`) get their `pixel_values` here,
from one image-processor call for the whole batch. Text-only samples contribute no images; a batch
with no images at all has no `pixel_values` key. With `pack=True` several samples share a row
(`vlkit.data.packing`) instead of padding; with `pack="flat"` the whole batch is one row.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from vlkit.errors import DataError
from vlkit.modeling import IGNORE_INDEX


class VlkitCollator:
    """Pad a list of `{"input_ids", "labels", "pixel_values" or "images"}` items into a model batch.

    pad_token_id: id written into padded positions (masked out by attention_mask and labels).
    padding_side: "right" for training; "left" when the batch is continued by generation.
    pad_to_multiple_of: round the padded length up (helps tensor-core kernels on GPU).
    pack: lay several samples into one row (`vlkit.data.packing`) instead of padding each: the batch
        then has `position_ids` that restart per sample and no `attention_mask`. "flat": one row holding
        the whole batch, no pad tokens (for a variable-length attention kernel).
    processor: has `encode_images(images) -> pixel_values` (`VlkitProcessor`); needed only for items
        that carry decoded `images` rather than `pixel_values`.
    share_prefix_before: the image placeholder id; given, the tokens every sample starts with (up to
        the first image or supervised token) are passed once as `prefix_ids` (`vlkit.data.prefix`)
        whenever that takes fewer token slots than packing (or padding); with flat packing, always, the
        remainders packed flat after it (for an attention that reads them: `vlkit.per_sample_sdpa`).
    """

    def __init__(
        self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None,
        pack: bool | Literal["flat"] = False,
        processor: Any = None, share_prefix_before: int | None = None,
    ) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got '{padding_side}'")
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; set the tokenizer's pad token")
        if pack not in (True, False, "flat"):
            raise ValueError(f"pack must be true, false or 'flat', got {pack!r}")
        if pack and padding_side == "left":
            raise ValueError("packing is for training batches; generation batches are left-padded, not packed")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pack = pack
        self.processor = processor
        self.share_prefix_before = share_prefix_before if padding_side == "right" else None

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(item["input_ids"], dtype=torch.long) for item in items]
        labels = [torch.as_tensor(item["labels"], dtype=torch.long) for item in items]
        length = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shared = self._shared_prefix_batch(ids, labels, length)
        if shared is not None:
            batch, order = shared
            return self._add_images(batch, [items[i] for i in order])
        if self.pack:
            from vlkit.data.packing import pack_batch

            batch, order = pack_batch(ids, labels, self.pad_token_id, self._row_capacity(ids, length))
            return self._add_images(batch, [items[i] for i in order])
        batch_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        batch_labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, (row_ids, row_labels) in enumerate(zip(ids, labels)):
            n = len(row_ids)
            span = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            batch_ids[row, span] = row_ids
            batch_labels[row, span] = row_labels
            attention_mask[row, span] = 1
        batch = {"input_ids": batch_ids, "labels": batch_labels, "attention_mask": attention_mask}
        return self._add_images(batch, items)

    def _row_capacity(self, ids: list[torch.Tensor], length: int) -> int:
        """A packed row's length: the padded length, or with flat packing the whole batch's."""
        if self.pack != "flat":
            return length
        from vlkit.data.packing import flat_capacity

        return flat_capacity([len(x) for x in ids], self.pad_to_multiple_of)

    def _shared_prefix_batch(
        self, ids: list[torch.Tensor], labels: list[torch.Tensor], length: int
    ) -> tuple[dict[str, torch.Tensor], list[int]] | None:
        """The batch with its common start passed once, when that takes the fewest token slots (with flat
        packing always: the remainders are packed flat too), and the sample order it holds."""
        if self.share_prefix_before is None or len(ids) < 2:
            return None
        from vlkit.data.packing import pack_rows
        from vlkit.data.prefix import flat_prefix_batch, prefix_batch, shared_prefix_length

        prefix_length = shared_prefix_length(ids, labels, self.share_prefix_before)
        if prefix_length == 0:
            return None
        if self.pack == "flat":
            return flat_prefix_batch(ids, labels, self.pad_token_id, prefix_length, self.pad_to_multiple_of)
        other_slots = len(ids) * length
        if self.pack:
            other_slots = len(pack_rows([len(x) for x in ids], length)) * length
        if prefix_length + len(ids) * (length - prefix_length) >= other_slots:
            return None
        batch = prefix_batch(ids, labels, self.pad_token_id, prefix_length, self.pad_to_multiple_of)
        return batch, list(range(len(ids)))

    def _add_images(self, batch: dict[str, torch.Tensor], items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Images in the order their placeholders appear in the batch."""
        pixel_values = self._pixel_values(items)
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values, dim=0)  # [total images, 3, H, W]
        vision_features = [item["vision_features"] for item in items if item.get("vision_features") is not None]
        if vision_features:
            batch["vision_features"] = torch.cat(vision_features, dim=0)  # [total images, N, Dv], stored features
        return batch

    def _pixel_values(self, items: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Each item's pixel_values in item order; the decoded `images` of all items go through one processor
        call, which costs less per image than a call per sample (bench/data.py measures both)."""
        images = [image for item in items for image in item.get("images") or ()]
        if images:
            if self.processor is None:
                raise ValueError("items carry decoded `images`; give VlkitCollator the processor (processor=...)")
            try:
                encoded = self.processor.encode_images(images)  # [all images of the batch, 3, H, W]
            except ValueError as error:  # the dataset can no longer skip the sample; name the batch's samples
                ids = [str(item.get("id")) for item in items if item.get("images")]
                raise DataError(f"the image processor rejects an image of samples {', '.join(ids)}: {error}") from None
        pixel_values, start = [], 0
        for item in items:
            if item.get("images"):
                pixel_values.append(encoded[start : start + len(item["images"])])
                start += len(item["images"])
            elif item.get("pixel_values") is not None:
                pixel_values.append(item["pixel_values"])
        return pixel_values
