"""Packing: several samples share a row instead of each sample padding its own row to the longest.

A batch of samples is laid into rows no longer than its longest sample (first-fit decreasing), so
no row is longer than in the padded batch, and there are fewer rows. Each sample's position ids
restart at 0; with no 2-D `attention_mask` and no cache, transformers' mask builder reads those restarts
(`masking_utils.find_packed_sequence_indices`) and gives every sample its own causal block, so no
token attends across samples (sdpa, eager and flex attention alike). Flash attention reads the
restarts only in a batch of one row, so under it packing is always flat (`collator_packing`). The
loss is a sum over the same supervised tokens, so it equals the padded batch's.

Flat packing (`data.packing: flat`) lays the whole batch into one row as long as all its samples
together, so no pad token is computed at all. Every attention call then spans the batch, which pays
only where attention skips the blocks between samples: a variable-length kernel (`VARLEN_ATTENTION`:
flex attention's block mask, flash attention's `cu_seqlens`), or sdpa on one row per sample
(`vlkit.per_sample_sdpa`, which vlkit switches an sdpa LLM to). Eager attention would attend through
a full mask, so the recipe refuses it. `data.packing: true` is flat wherever that is the least work:
under flash attention, and under sdpa when training on CPU and not compiled (`collator_packing`). On
a GPU, sdpa keeps rows until the flat row is measured there (`bench/gpu.py`, vlkit-flat-sdpa).

`packing_supported(model)` checks a loaded model once (a causal LM with its own mask code could
ignore the restarts): a sample packed behind another must give the same logits as the sample alone.
"""

from __future__ import annotations

import logging

import torch

from vlkit.compat import attention_implementation
from vlkit.modeling import IGNORE_INDEX
from vlkit.per_sample_sdpa import PER_SAMPLE_SDPA, attends_causally_only

logger = logging.getLogger(__name__)

# Attention implementations that compute only each packed sample's own causal block of a row.
VARLEN_ATTENTION = ("flex_attention", "flash_attention_2", "flash_attention_3")


def flat_capacity(lengths: list[int], pad_to_multiple_of: int | None = None) -> int:
    """The row length of a flat-packed batch: every sample in one row, rounded up to the multiple."""
    total = sum(lengths)
    return -(-total // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of else total


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of samples per row, each row's lengths summing to <= capacity."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"sample of {length} tokens does not fit a row of {capacity}")
        row = next((r for r, space in enumerate(free) if space >= length), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= length
    return rows


def pack_batch(
    ids: list[torch.Tensor], labels: list[torch.Tensor], pad_token_id: int, capacity: int
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Packed `input_ids`, `labels`, `position_ids` [rows, capacity] (+ `use_cache=False`), and the
    sample order they hold.

    The first label of every sample is ignored: in a packed row it would be predicted from the end
    of the previous sample (padded, it is never predicted at all). Leftover space is padding with
    ignored labels whose positions continue the row's last sample: a row that holds one sample then
    has no restart, and when no row has one transformers builds no mask and sdpa runs its causal
    kernel; on a GPU that is the flash kernel, on CPU the gain is within allocator noise
    (bench/train_step.py, vlkit-masked). The padding attends only to tokens before it, and nothing
    attends to it, so the loss does not change.
    """
    rows = pack_rows([len(x) for x in ids], capacity)
    input_ids = torch.full((len(rows), capacity), pad_token_id, dtype=torch.long)
    batch_labels = torch.full((len(rows), capacity), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), capacity), dtype=torch.long)
    order: list[int] = []
    for row, members in enumerate(rows):
        start = n = 0
        for index in members:
            n = len(ids[index])
            input_ids[row, start : start + n] = ids[index]
            batch_labels[row, start : start + n] = labels[index]
            batch_labels[row, start] = IGNORE_INDEX
            position_ids[row, start : start + n] = torch.arange(n)
            start += n
            order.append(index)
        position_ids[row, start:] = torch.arange(n, n + capacity - start)
    # use_cache=False: transformers reads restarting positions only when no cache is being built.
    return {"input_ids": input_ids, "labels": batch_labels, "position_ids": position_ids, "use_cache": False}, order


def collator_packing(requested: bool | str, model, on_cpu: bool = False, compiled: bool = False) -> bool | str:
    """`data.packing` as the collator takes it for this model; an sdpa LLM that packs flat is switched to
    per-sample sdpa here (`use_per_sample_sdpa`).

    Off when the LLM ignores restarting positions (`packing_supported`). Flat under flash attention, which
    reads restarts only in a batch of one row (transformers' `_is_packed_sequence`): several packed rows
    would attend across samples there. Under sdpa, flat when asked for, or when training on CPU with eager
    layers. Rows elsewhere: with `train.compile` (the samples' lengths, read from the position ids, would
    break a compiled layer's graph), on a GPU (until the flat row is measured there), and where per-sample
    sdpa does not serve this LLM (a sliding window, or its probe fails).
    """
    if not requested or not packing_supported(model):
        return False
    implementation = str(attention_implementation(model.language_model.config))
    if implementation.startswith("flash_attention"):
        return "flat"
    if implementation in ("sdpa", PER_SAMPLE_SDPA) and (requested == "flat" or (on_cpu and not compiled)):
        if use_per_sample_sdpa(model):
            return "flat"
        if requested == "flat":
            logger.warning("per-sample sdpa does not serve this LLM (sliding window, or its probe failed): "
                           "packing rows instead of one flat row")
        return True
    return requested


def use_per_sample_sdpa(model) -> bool:
    """Switch the VLM's sdpa LLM to per-sample sdpa (`vlkit.per_sample_sdpa`) for flat-packed batches.

    False, and nothing changed, when the LLM's attention is not sdpa, has a sliding window or chunks,
    or when a packed sample does not then give the logits it gives alone (`packing_supported`).
    """
    language_model = model.language_model
    config = language_model.config
    if attention_implementation(config) == PER_SAMPLE_SDPA:
        return True
    if attention_implementation(config) != "sdpa" or not attends_causally_only(config):
        return False
    language_model.set_attn_implementation(PER_SAMPLE_SDPA)
    if packing_supported(model, warn=False):
        return True
    logger.warning("per-sample sdpa gives a packed sample other logits than it has alone; keeping sdpa")
    language_model.set_attn_implementation("sdpa")
    return False


@torch.no_grad()
def packing_supported(model, warn: bool = True) -> bool:
    """Whether the model's LLM keeps packed samples apart: sample B behind sample A == sample B alone."""
    language_model = model.language_model
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    device = model.get_input_embeddings().weight.device
    first = torch.randint(0, min(vocab, 1000), (7,), generator=generator)
    second = torch.randint(0, min(vocab, 1000), (5,), generator=generator)
    was_training = language_model.training
    language_model.eval()  # no dropout in the comparison
    try:
        alone = language_model(input_ids=second[None].to(device), use_cache=False).logits[0].float()
        packed_ids = torch.cat([first, second])[None].to(device)
        positions = torch.cat([torch.arange(7), torch.arange(5)])[None].to(device)
        packed = language_model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits[0, 7:].float()
    finally:
        language_model.train(was_training)
    scale = alone.abs().max().clamp(min=1.0)
    tolerance = 1e-4 if model.dtype == torch.float32 else 3e-2
    same = bool(((packed - alone).abs().max() / scale) <= tolerance)
    if not same and warn:
        logger.warning("the LLM attends across packed samples (it ignores restarting position ids); padding instead")
    return same
