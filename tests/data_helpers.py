"""Helpers shared by the data tests: a small fake processor, image writers, a tiny shapes world.

The fake processor follows `VlkitProcessor.encode_conversation`'s contract (image tokens per
marker, labels on assistant words only, `ImageTokenMismatchError`, `DataError` when truncation
would cut image tokens or leave no label) without loading a tokenizer, so these tests stay fast;
one test per file also runs the real processor.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from vlkit.errors import DataError, ImageTokenMismatchError
from vlkit.modeling import IGNORE_INDEX


class FakeProcessor:
    image_token_id = 1
    image_seq_length = 4
    role_token_id = 2

    def __init__(self) -> None:
        self.tokenizer = SimpleNamespace(pad_token_id=0)
        self.calls = 0

    def encode_text(self, messages, num_images, max_length=None):
        self.calls += 1
        markers = sum(m["content"].count("<image>") for m in messages)
        if markers != num_images:
            raise ImageTokenMismatchError(f"{num_images} image(s) but {markers} <image> marker(s)")
        input_ids, labels = [], []
        for message in messages:
            input_ids.append(self.role_token_id)
            labels.append(IGNORE_INDEX)
            for word in message["content"].replace("<image>", " <image> ").split():
                if word == "<image>":
                    input_ids += [self.image_token_id] * self.image_seq_length
                    labels += [IGNORE_INDEX] * self.image_seq_length
                else:
                    token = 10 + sum(word.encode()) % 90
                    input_ids.append(token)
                    labels.append(token if message["role"] == "assistant" else IGNORE_INDEX)
        if max_length is not None and len(input_ids) > max_length:
            if self.image_token_id in input_ids[max_length:]:
                raise DataError(f"sample is {len(input_ids)} tokens; truncating would cut through image tokens")
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError("sample has no assistant tokens left to learn from")
        return {"input_ids": input_ids, "labels": labels}

    def encode_images(self, images):
        if not images:
            return None
        # Mean colour of each image as a 1x1 "pixel", so tests can tell which image was loaded.
        return torch.stack(
            [torch.from_numpy(np.asarray(image, dtype=np.float32).mean(axis=(0, 1))).view(3, 1, 1) for image in images]
        )

    def encode_conversation(self, messages, images=None, max_length=None):
        images = list(images or [])
        return {**self.encode_text(messages, len(images), max_length), "pixel_values": self.encode_images(images)}


def write_png(path: Path, colour=(200, 30, 30), size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def write_truncated_png(path: Path) -> Path:
    """A PNG whose header is fine but whose pixel data stops half-way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    image.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_cmyk_jpeg(path: Path, cmyk=(0, 255, 255, 0), size: int = 16) -> Path:
    """A CMYK JPEG: (0, 255, 255, 0) is pure red."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("CMYK", (size, size), cmyk).save(path, format="JPEG", quality=95)
    return path


def llava_sample(sample_id: str, image: str | None, question: str = "<image>\nWhat colour?", answer: str = "red") -> dict:
    record = {"id": sample_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    return record


def write_json(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


def make_shapes_world(out_dir: Path, n: int = 8, seed: int = 0, image_size: int = 32) -> Path:
    from data_tools.shapes import generate

    generate(out_dir, n_train=n, n_val=n // 2, n_test=n // 2, n_heldout=n // 2, image_size=image_size, seed=seed,
             workers=1, progress=False)
    return out_dir
