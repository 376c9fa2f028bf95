"""Shared prompt prefix: the tokens every sample of a batch starts with run through the LLM once.

A recipe's samples begin alike: the system turn and the user header before the image are the same
tokens in every sample (~14 of a ~45-token caption sample with the tiny recipes' system prompt, 24 with
SmolLM2's default one). The collator cuts that common start off each row and passes it once as
`prefix_ids`; the model computes its keys and values for one row and lets every row attend to them
(`VlkitForConditionalGeneration.forward`). Nothing before the first image or the first supervised
token is shared, so the image merge and the loss see only the rows' own tokens, and the loss and
gradients equal the padded batch's.

The collator takes whichever layout has fewer token slots: packed rows, or the shared prefix once plus
each sample's remainder padded to the longest. With flat packing it always shares the prefix and packs
the remainders flat after it (`flat_prefix_batch`), for an attention that lets each sample see the
prefix (`vlkit.per_sample_sdpa`).
"""

from __future__ import annotations

import torch

from vlkit.modeling import IGNORE_INDEX


def shared_prefix_length(ids: list[torch.Tensor], labels: list[torch.Tensor], image_token_id: int | None) -> int:
    """How many leading tokens all samples share, stopping before any image placeholder, before the
    token whose label is the first supervised one (the loss predicts it from the prefix's last
    position otherwise), and one token short of the shortest sample (each row keeps a token)."""
    shortest = min(len(x) for x in ids)
    first = ids[0][: shortest - 1]
    same = torch.ones(len(first), dtype=torch.bool)
    for row in ids[1:]:
        same &= row[: len(first)] == first
    if image_token_id is not None:
        same &= first != image_token_id
    for row_labels in labels:
        supervised = (row_labels[: len(first) + 1] != IGNORE_INDEX).nonzero()
        if len(supervised):
            same[max(int(supervised[0]) - 1, 0) :] = False
    mismatch = (~same).nonzero()
    return int(mismatch[0]) if len(mismatch) else len(first)


def prefix_batch(
    ids: list[torch.Tensor], labels: list[torch.Tensor], pad_token_id: int, prefix_length: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """`prefix_ids` [B, P] (the same row B times, so batch splitters keep it with its rows), the rows'
    remainders right-padded (`input_ids`, `labels`), `attention_mask` [B, P + S] over prefix and
    remainder, and `position_ids` continuing from P."""
    rest = [x[prefix_length:] for x in ids]
    length = max(len(x) for x in rest)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch_ids = torch.full((len(ids), length), pad_token_id, dtype=torch.long)
    batch_labels = torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), prefix_length + length), dtype=torch.long)
    attention_mask[:, :prefix_length] = 1
    for row, (row_ids, row_labels) in enumerate(zip(rest, labels)):
        batch_ids[row, : len(row_ids)] = row_ids
        batch_labels[row, : len(row_ids)] = row_labels[prefix_length:]
        attention_mask[row, prefix_length : prefix_length + len(row_ids)] = 1
    position_ids = torch.arange(prefix_length, prefix_length + length).expand(len(ids), length).clone()
    return {
        "input_ids": batch_ids, "labels": batch_labels, "attention_mask": attention_mask,
        "position_ids": position_ids, "prefix_ids": ids[0][:prefix_length].expand(len(ids), prefix_length).clone(),
    }


def flat_prefix_batch(
    ids: list[torch.Tensor], labels: list[torch.Tensor], pad_token_id: int, prefix_length: int,
    pad_to_multiple_of: int | None = None,
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """`prefix_ids` [1, P] and the remainders packed flat into one row (`vlkit.data.packing.pack_batch`),
    their positions continuing from P, no mask; and the sample order the row holds."""
    from vlkit.data.packing import flat_capacity, pack_batch

    rest = [x[prefix_length:] for x in ids]
    capacity = flat_capacity([len(x) for x in rest], pad_to_multiple_of)
    batch, order = pack_batch(rest, [x[prefix_length:] for x in labels], pad_token_id, capacity)
    batch["position_ids"] += prefix_length  # each remainder continues the prefix
    del batch["use_cache"]  # the model passes the prefix's cache itself
    batch["prefix_ids"] = ids[0][None, :prefix_length].clone()
    return batch, order
