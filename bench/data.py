"""The data path alone: dataset + collator, in samples/s on one core, for align and instruct batches.

    python bench/data.py                              # SmolLM2's tokenizer, the shapes world of this checkout
    python bench/data.py --llm DIR --vision DIR --data DIR --toy --no-append    # tiny models (tests)

What one training sample costs before the model sees it: reading the row, decoding the image, the
image processor, and the collator (padding or packing). The chat template, tokenizing and label
masking run once per data set (`ConversationDataset`'s cached `datasets.map`), so they are timed
apart, as "encode texts". The data path measured runs the image processor once per batch, in the
collator (`defer_images=True`); the references in the same process run it once per sample, in the
dataset, and, as before the text cache, `processor.encode_conversation` (template, tokenizer, labels
and images) per sample. The image processor alone is timed per image, called singly and on a batch.
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
    dataset = ConversationDataset(samples, processor, data, max_length=512, defer_images=True)
    prepare = time.perf_counter() - started
    per_sample = ConversationDataset(samples, processor, data, max_length=512)  # reuses the cached texts
    collator = VlkitCollator(processor.tokenizer.pad_token_id, pack=True, processor=processor)
    plain = VlkitCollator(processor.tokenizer.pad_token_id, pack=True)
    times = interleaved({
        "cached texts": lambda: iterate(dataset, collator, n, batch_size),
        "images per sample": lambda: iterate(per_sample, plain, n, batch_size),
        "encode per sample": lambda: encode_every_sample(dataset, processor, plain, n, batch_size),
    }, rounds=rounds)
    rates = {name: n / min(seconds) for name, seconds in times.items()}
    row = [stage, n, f"{prepare:.2f}", f"{rates['cached texts']:.0f}", f"{rates['images per sample']:.0f}",
           f"{median_ratio(times['images per sample'], times['cached texts']):.2f}x",
           f"{rates['encode per sample']:.0f}", f"{median_ratio(times['encode per sample'], times['cached texts']):.2f}x"]
    return row, rates


def image_processor_cost(processor, data: Path, n: int, batch_size: int, rounds: int) -> dict[str, float]:
    """Milliseconds per image of the image processor alone, called per image and on `batch_size` images."""
    from vlkit.data.images import load_image

    paths = [path for group in first_samples(data, "instruct", n)["images"] for path in group][:n]
    images = [load_image(path, data) for path in paths]
    times = interleaved({
        "single": lambda: [processor.encode_images([image]) for image in images],
        "batched": lambda: [processor.encode_images(images[i : i + batch_size]) for i in range(0, len(images), batch_size)],
    }, rounds=rounds)
    return {name: 1000 * min(seconds) / len(images) for name, seconds in times.items()}


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
        cost = image_processor_cost(processor, data, args.n, args.batch_size, args.rounds)
    headers = ["stage", "samples", "encode texts (s, once)", "samples/s", "samples/s, images per sample", "speed-up",
               "samples/s, encode per sample", "speed-up"]
    instruct = rates["instruct"]["cached texts"]
    body = "\n".join([
        f"{torch.get_num_threads()} torch thread(s), batch {args.batch_size}, packing on, max_length 512, "
        f"LLM {Path(args.llm).name}, best of {args.rounds} rounds.",
        "",
        markdown_table(headers, rows),
        "",
        f"- image processor per image: {cost['single']:.3f} ms called per image, {cost['batched']:.3f} ms called on "
        f"{args.batch_size} images ({cost['single'] / cost['batched']:.2f}x)",
        f"- instruct data path per core: {instruct:.0f} samples/s, {verdict(instruct, GOAL_INSTRUCT_PER_CORE, ' samples/s')}",
    ])
    publish("Data path: dataset + collator", body, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
