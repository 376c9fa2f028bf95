"""Per-sample sdpa's two forms side by side, by mean sample length and CPU threads: where each pays.

    python bench/attention.py                 # appends to docs/performance.md
    python bench/attention.py --toy --no-append

`vlkit.per_sample_sdpa` attends within each sample of a flat-packed row in one of two forms: one
sdpa call per sample (no padding, no copies, a call each), or one call over the samples laid out
as padded rows (one call, the padding and two copies). Both run here on one layer's queries, keys
and values of SmolLM2-135M's shape (9 query heads, 3 key/value heads, head dim 64), forward and
backward, for rows of samples drawn from a range of lengths, on 1 and on `--threads` torch threads.
The last column is the form the module picks (`calls_per_sample_pay`). Both forms must give the
same output and gradients, or the run stops.

A second table times the same layer under CPU bf16 autocast, as `train.bf16` trains on CPU (the
queries and keys float32, as RoPE's float32 tables leave them; the values bf16): the attention in
autocast's bf16 against float32 with autocast off, which the module does in training
(`trains_under_cpu_autocast`).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections.abc import Callable

import torch
from common import add_run_options, interleaved, markdown_table, median_ratio, publish, start

# (name, shortest, longest, samples): captions, captions after an image's tokens, conversations, a mix.
CASES = [
    ("very short", 4, 8, 128),
    ("short", 8, 14, 128),
    ("short, 12-20 tokens", 12, 20, 128),  # about the threshold: these draws average 15.98
    ("captions", 15, 40, 64),
    ("image + caption", 80, 110, 32),
    ("conversations", 120, 180, 8),
    ("mixed", 20, 300, 16),
]


def layer_inputs(lengths: list[int], generator: torch.Generator) -> tuple:
    """A SmolLM2-shaped attention module and one flat row's queries, keys, values and position ids."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    module = LlamaAttention(config, layer_idx=0)
    tokens = sum(lengths)
    query, key, value = (torch.randn(1, tokens, heads, 64, generator=generator).transpose(1, 2)
                         for heads in (9, 3, 3))  # the layout transformers' attention receives
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return module, query, key, value, positions


def attention_step(form: str, inputs) -> Callable[[], list[torch.Tensor]]:
    """Forward and backward through per_sample_sdpa in the given form; returns output and input gradients."""
    import vlkit.per_sample_sdpa as per_sample

    module, query, key, value, positions = inputs
    threshold = 0 if form == "calls" else 10**9

    def step() -> list[torch.Tensor]:
        per_sample.MEAN_LENGTH_FOR_CALLS_PER_SAMPLE, saved = threshold, per_sample.MEAN_LENGTH_FOR_CALLS_PER_SAMPLE
        try:
            q, k, v = (x.detach().requires_grad_() for x in (query, key, value))
            output, _ = per_sample.per_sample_sdpa(module, q, k, v, None, position_ids=positions, scaling=0.125)
            output.square().sum().backward()
        finally:
            per_sample.MEAN_LENGTH_FOR_CALLS_PER_SAMPLE = saved
        return [output.detach(), q.grad, k.grad, v.grad]

    return step


def autocast_step(float32: bool, inputs) -> Callable[[], None]:
    """Forward and backward through per_sample_sdpa under CPU bf16 autocast, its attention in float32 or bf16."""
    import vlkit.per_sample_sdpa as per_sample

    module, query, key, value, positions = inputs
    value = value.bfloat16()  # a bf16 projection's output; the queries and keys stay float32 after RoPE

    def step() -> None:
        keep = per_sample.trains_under_cpu_autocast
        if not float32:
            per_sample.trains_under_cpu_autocast = lambda query: False
        try:
            q, k, v = (x.detach().requires_grad_() for x in (query, key, value))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output, _ = per_sample.per_sample_sdpa(module, q, k, v, None, position_ids=positions, scaling=0.125)
            output.float().square().sum().backward()
        finally:
            per_sample.trains_under_cpu_autocast = keep

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--most-threads", type=int, default=2, help="also measure on this many threads")
    parser.add_argument("--toy", action="store_true", help="quick settings for tests (2 cases, 1 round)")
    add_run_options(parser)
    args = parser.parse_args(argv)
    start(args)
    from vlkit.per_sample_sdpa import calls_per_sample_pay

    cases = CASES[:: len(CASES) - 1] if args.toy else CASES
    rounds = 1 if args.toy else args.rounds
    rows = []
    for name, shortest, longest, count in cases:
        rng = random.Random(0)
        lengths = [rng.randint(shortest, longest) for _ in range(count)]
        inputs = layer_inputs(lengths, torch.Generator().manual_seed(0))
        steps = {form: attention_step(form, inputs) for form in ("calls", "rows")}
        for calls_result, rows_result in zip(steps["calls"](), steps["rows"]()):
            if not torch.allclose(calls_result, rows_result, atol=1e-5, rtol=1e-4):
                raise SystemExit(f"benchmark invalid: the two forms differ on {name}")
        for threads in sorted({1, args.most_threads}):
            torch.set_num_threads(threads)
            times = interleaved(steps, rounds=rounds)
            rows.append([name, f"{statistics.mean(lengths):.0f}", count, threads,
                         f"{1e3 * statistics.median(times['rows']):.2f}", f"{1e3 * statistics.median(times['calls']):.2f}",
                         f"{median_ratio(times['rows'], times['calls']):.2f}x",
                         "calls" if calls_per_sample_pay(lengths, torch.device("cpu")) else "rows"])
        torch.set_num_threads(args.threads)
    table = markdown_table(["samples", "mean length", "count", "threads", "rows ms", "calls ms",
                            "calls speed-up", "picked"], rows)
    autocast_rows = []
    for name, shortest, longest, count in [case for case in cases if case[0] in ("captions", "conversations", "mixed")]:
        rng = random.Random(0)
        inputs = layer_inputs([rng.randint(shortest, longest) for _ in range(count)], torch.Generator().manual_seed(0))
        steps = {"bf16": autocast_step(False, inputs), "float32": autocast_step(True, inputs)}
        for threads in sorted({1, args.most_threads}):
            torch.set_num_threads(threads)
            times = interleaved(steps, rounds=rounds)
            autocast_rows.append([name, threads, f"{1e3 * statistics.median(times['bf16']):.2f}",
                                  f"{1e3 * statistics.median(times['float32']):.2f}",
                                  f"{median_ratio(times['bf16'], times['float32']):.2f}x"])
        torch.set_num_threads(args.threads)
    autocast_table = markdown_table(["samples", "threads", "bf16 ms", "float32 ms", "float32 speed-up"], autocast_rows)
    body = (f"One layer's attention, forward and backward, SmolLM2-135M's heads, {rounds} interleaved rounds: one sdpa "
            f"call per sample (calls) vs one call over padded rows (rows).\n\n{table}\n\n"
            f"The same under CPU bf16 autocast, in the form picked above: the attention in bf16 (autocast's choice) "
            f"vs in float32 with autocast off (what training does).\n\n{autocast_table}")
    publish("Per-sample sdpa: calls per sample vs padded rows", body, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
