"""The data path alone: dataset + collator, in samples/s on one core, for align and instruct batches.

    python bench/data.py                              # SmolLM2's tokenizer, the shapes world of this checkout
    python bench/data.py --llm DIR --vision DIR --data DIR --toy --no-append    # tiny models (tests)

What one training sample costs before the model sees it: reading the row, decoding the image, the
image processor, and the collator (padding or packing). The chat template, tokenizing and label
masking run once per data set (`ConversationDataset`'s cached `datasets.map`), so they are timed
apart, as "encode texts". The reference in the same process is what every sample cost before that
cache: `processor.encode_conversation` (template, tokenizer, labels and images) per sample.
Goal (issue 17): >= 1,000 instruct samples/s per core.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import add_run_options, interleaved, markdown_table, median_ratio, publish, start, verdict
from parts import FILES, default_vision, first_samples, shapes_data

GOAL_INSTRUCT_PER_CORE = 1000.0


def iterate(dataset, collator, n: int, batch_size: int) -> None:
    for first in range(0, n, batch_size):
        collator([dataset[i] for i in range(first, min(n, first + batch_size))])


def encode_every_sample(dataset, processor, collator, n: int, batch_size: int) -> None:
    """The reference: template, tokenizer, labels and images per sample, as before the text cache."""
    from vlkit.data.images import load_image

    for first in range(0, n, batch_size):
        items = []
        for i in range(first, min(n, first + batch_size)):
            sample = dataset.samples[i]
            images = [load_image(path, dataset.image_root) for path in sample["images"]]
            encoded = processor.encode_conversation(sample["messages"], images, max_length=dataset.max_length)
            items.append({"input_ids": torch.as_tensor(encoded["input_ids"]),
                          "labels": torch.as_tensor(encoded["labels"]), "pixel_values": encoded["pixel_values"]})
        collator(items)


def measure(stage: str, processor, data: Path, n: int, batch_size: int, rounds: int) -> tuple[list, dict]:
    from vlkit.data import ConversationDataset, VlkitCollator

    samples = first_samples(data, stage, n)
    n = len(samples)
    started = time.perf_counter()
    dataset = ConversationDataset(samples, processor, data, max_length=512)
    prepare = time.perf_counter() - started
    collator = VlkitCollator(processor.tokenizer.pad_token_id, pack=True)
    times = interleaved({
        "cached texts": lambda: iterate(dataset, collator, n, batch_size),
        "encode per sample": lambda: encode_every_sample(dataset, processor, collator, n, batch_size),
    }, rounds=rounds)
    rates = {name: n / min(seconds) for name, seconds in times.items()}
    speedup = median_ratio(times["encode per sample"], times["cached texts"])
    row = [stage, n, f"{prepare:.2f}", f"{rates['cached texts']:.0f}", f"{rates['encode per sample']:.0f}",
           f"{speedup:.2f}x"]
    return row, rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", default="smollm2-135m-instruct", help="LLM name or folder (its tokenizer is used)")
    parser.add_argument("--vision", help="vision tower folder (default: a CLIP run here, else a random tiny tower)")
    parser.add_argument("--data", help="shapes-world folder (default: data/shapes, else generated)")
    parser.add_argument("--n", type=int, default=1024, help="samples per stage")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--toy", action="store_true", help="quick settings for tests")
    add_run_options(parser)
    args = parser.parse_args(argv)
    if args.toy:
        args.n, args.rounds = min(args.n, 16), 1
    start(args)
    from vlkit import build_vlm

    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        vision = args.vision or default_vision(workdir)
        data = shapes_data(workdir, args.n, args.data)
        _, processor = build_vlm(vision=vision, llm=args.llm, connector={"type": "mlp", "depth": 2})
        rows, rates = [], {}
        for stage in FILES:
            row, rates[stage] = measure(stage, processor, data, args.n, args.batch_size, args.rounds)
            rows.append(row)
    headers = ["stage", "samples", "encode texts (s, once)", "samples/s", "samples/s, encode per sample", "speed-up"]
    instruct = rates["instruct"]["cached texts"]
    body = "\n".join([
        f"{torch.get_num_threads()} torch thread(s), batch {args.batch_size}, packing on, max_length 512, "
        f"LLM {Path(args.llm).name}, best of {args.rounds} rounds.",
        "",
        markdown_table(headers, rows),
        "",
        f"- instruct data path per core: {instruct:.0f} samples/s, {verdict(instruct, GOAL_INSTRUCT_PER_CORE, ' samples/s')}",
    ])
    publish("Data path: dataset + collator", body, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
