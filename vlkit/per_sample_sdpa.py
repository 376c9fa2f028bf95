"""sdpa for the samples of a flat-packed row: padding-free packing where no variable-length kernel exists.

Flat packing (`vlkit.data.packing`) lays a batch's samples one after another in one row with no pad
token, so the LLM's projections, MLP and norms work on the batch's real tokens only. Its attention
must still keep the samples apart. Flash and flex attention do that with a variable-length kernel;
sdpa over the whole row would attend through a [T, T] mask, most of it masked.

This module registers one more attention implementation with transformers (`AttentionInterface` and
`AttentionMaskInterface`). For a one-row batch without a padding mask, its mask builder builds
nothing (a [T, T] mask of a flat row of 256 captions is 130 MB, 0.4 s to build on CPU) and its
attention reads the samples from the position ids (a sample starts where they do not continue by
one, transformers' rule for packed samples). On CPU, where the samples are 16 tokens long or more on
average, it calls sdpa's causal kernel once per sample: no padding and no copies. Otherwise (shorter
samples, where a call each costs more than it saves; cached keys; a GPU, where a call is a kernel
launch) it lays the samples' queries, keys and values out as a batch of rows, each padded after its
end, for one call, and takes each sample's output back. `bench/attention.py` measures both forms.
Either way the attention does what rows of one sample each would do, while everything else in the
layer works on the real tokens only. Keys cached before the row (a shared prompt prefix,
`vlkit.data.prefix`; a conversation's earlier turns) are seen by every sample, through a mask.
Every other batch gets transformers' own sdpa with the mask sdpa gets, so padded batches and
batched generation compute exactly what sdpa computes. Under CPU autocast (`train.bf16` on CPU) a
training forward's attention runs in float32 with autocast off, since sdpa's bf16 backward is the
slow part there; forwards without gradients are left to autocast.

It holds only for LLMs whose mask is causal and nothing else (no sliding window, no attention
chunks: `attends_causally_only`). vlkit's training switches such an sdpa LLM to it where it packs
flat (`vlkit.data.packing.use_per_sample_sdpa`, which probes that a packed sample then gives its
logits alone). The name is a runtime setting that configs do not save, so run folders and exports
load with sdpa.
"""

from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from vlkit.modeling import packed_sample_lengths

PER_SAMPLE_SDPA = "vlkit_per_sample_sdpa"


def per_sample_mask(batch_size: int, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None,
                    **kwargs) -> torch.Tensor | None:
    """sdpa's mask, except for one row without a padding mask: none, the attention reads the position ids."""
    if batch_size == 1 and attention_mask is None:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask,
                     **kwargs)


def per_sample_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [B, heads, T, D] -> ([B, T, heads, D], None)."""
    if trains_under_cpu_autocast(query):
        # A layer's attention trained 1.4-3.7x faster in float32 than in autocast's bf16 on CPU, whose bf16 sdpa
        # backward is slow (bench/attention.py); the output projection after it casts back under the same autocast.
        with torch.autocast("cpu", enabled=False):
            return attend_per_sample(module, query.float(), key.float(), value.float(), attention_mask,
                                     position_ids, **kwargs)
    return attend_per_sample(module, query, key, value, attention_mask, position_ids, **kwargs)


def trains_under_cpu_autocast(query: torch.Tensor) -> bool:
    """A training forward (its backward will run) on CPU under autocast."""
    return query.device.type == "cpu" and query.requires_grad and torch.is_autocast_enabled("cpu")


def attend_per_sample(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Each sample of a one-row batch attends to itself (and to cached keys); every other batch gets sdpa."""
    kwargs.pop("is_causal", None)  # set here per call
    if attention_mask is not None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, position_ids=position_ids, **kwargs)
    length = query.shape[2]
    lengths = row_sample_lengths(position_ids) if position_ids is not None and length > 1 else [length]
    cached = key.shape[2] - length  # keys before the row: every sample sees them
    if len(lengths) == 1 and (cached == 0 or length == 1):
        return sdpa_attention_forward(module, query, key, value, None, position_ids=position_ids, **kwargs)
    if not cached and calls_per_sample_pay(lengths, query.device):
        parts = zip(*(x.split(lengths, dim=2) for x in (query, key, value)))  # split: its backward is one cat
        outputs = [sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0] for q, k, v in parts]
        return torch.cat(outputs, dim=1), None
    samples = samples_as_rows(tuple(lengths), query.device)
    query, key_rows, value_rows = (samples.rows(x) for x in (query, key[:, :, cached:], value[:, :, cached:]))
    if not cached:
        output, _ = sdpa_attention_forward(module, query, key_rows, value_rows, None, is_causal=True, **kwargs)
        return samples.row_of_samples(output), None
    # Every sample sees the cached keys and, causally, its own; a padded query sees the cache (its output
    # is dropped, and a row with no key to see would give NaN).
    def with_cache(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :, :cached].expand(len(lengths), -1, -1, -1), rows], dim=2)

    longest = query.shape[2]
    mask = torch.ones(longest, cached + longest, dtype=torch.bool, device=query.device)
    mask[:, cached:] = torch.ones(longest, longest, dtype=torch.bool, device=query.device).tril()
    output, _ = sdpa_attention_forward(module, query, with_cache(key, key_rows), with_cache(value, value_rows),
                                       mask[None, None], **kwargs)
    return samples.row_of_samples(output), None


# Every layer of a forward gets the same position ids: their lengths are read once (a read that, on a GPU,
# waits for the queued work), not once per layer. The one tensor kept is the last row's position ids.
row_sample_lengths = functools.lru_cache(maxsize=1)(packed_sample_lengths)


# One sdpa call per sample skips the rows' padding and copies but pays a call per sample. On these 2 CPU cores
# it was the faster form from a mean sample length of 10 tokens up on one thread, 16 on two (bench/attention.py).
MEAN_LENGTH_FOR_CALLS_PER_SAMPLE = 16


def calls_per_sample_pay(lengths: list[int], device: torch.device) -> bool:
    """Whether one sdpa call per sample beats one call over padded rows: on CPU, for samples long enough."""
    return device.type == "cpu" and sum(lengths) >= MEAN_LENGTH_FOR_CALLS_PER_SAMPLE * len(lengths)


class SamplesAsRows:
    """The samples of a one-row batch as a batch of rows for the attention alone: [1, heads, T, D] ->
    [samples, heads, longest, D], each padded after its end, and sdpa's output back to [1, T, heads, D]."""

    def __init__(self, lengths: tuple[int, ...], device: torch.device) -> None:
        # The indices are built on the host and copied without waiting: made on a GPU, their length would be
        # read back there first, while the forward's work is queued.
        sizes = torch.tensor(lengths)
        self.count, self.longest = len(lengths), max(lengths)
        sample = torch.repeat_interleave(torch.arange(self.count), sizes)  # [T]
        offset = torch.arange(len(sample)) - (torch.cumsum(sizes, 0) - sizes)[sample]  # [T]
        self.sample, self.offset = (x.to(device, non_blocking=True) for x in (sample, offset))

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.new_zeros(self.count, x.shape[1], self.longest, x.shape[3])
        rows[self.sample, :, self.offset] = x[0].transpose(0, 1)  # [T, heads, D] into each sample's row
        return rows

    def row_of_samples(self, output: torch.Tensor) -> torch.Tensor:
        return output[self.sample, self.offset][None]  # [samples, longest, heads, D] -> [1, T, heads, D]


# Built once per forward, like the lengths, not once per layer.
samples_as_rows = functools.lru_cache(maxsize=1)(SamplesAsRows)


AttentionInterface.register(PER_SAMPLE_SDPA, per_sample_sdpa)
AttentionMaskInterface.register(PER_SAMPLE_SDPA, per_sample_mask)


def attends_causally_only(text_config) -> bool:
    """No sliding window or attention chunks: each sample's causal block is all its mask holds."""
    window = getattr(text_config, "sliding_window", None) if getattr(text_config, "use_sliding_window", True) else None
    return not window and not getattr(text_config, "attention_chunk_size", None)
