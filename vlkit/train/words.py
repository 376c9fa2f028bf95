"""The align stage of a `visual_words` connector: its reader learns a words file's words from the frozen
tower's features, outside the LLM (a direct loss per slot; about a minute on two CPU cores).

The LLM answers from text within a few hundred steps but needs many more to learn to read an image
token it has never seen (README, issue 18); a reader trained here gives it tokens it reads as text.

Order: the layout from the train words file and the LLM's tokenizer; the model built with it; the
tower's features of every train and val image, computed once (and of `data.hue_rotated_copies` copies of
the train images with their hue turned, whose colour slots go unscored); the reader trained with AdamW and the
recipe's schedule, on standardised features (the standardisation is folded into its first layer
afterwards); the run dir written as every stage writes it (manifest.json + trainable.safetensors,
processor/, run_summary.json, loss.png), so `init_from` continues it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from vlkit.data.words import IGNORE, WordsRow, infer_layout, layout_token_ids, read_words_file, slot_targets
from vlkit.errors import ConfigError
from vlkit.train.arguments import launched_processes

if TYPE_CHECKING:
    from vlkit.train.profile import StepProfiler


def tower_device(model) -> torch.device:
    """Where the model's vision tower is (the features are computed, and the reader trains, there)."""
    return next(model.vision_tower.parameters()).device


@torch.no_grad()
def tower_features(model, image_processor, rows: list[WordsRow], batch_size: int = 64, desc: str = "features",
                   hue_seed: int | None = None) -> torch.Tensor:
    """[rows, N, Dv] float32 features of each row's image, as the connector receives them; with `hue_seed`,
    of each image with its hue turned by an angle drawn from a generator of that seed."""
    from vlkit.data.images import load_image

    generator = torch.Generator().manual_seed(hue_seed) if hue_seed is not None else None
    chunks = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
        images = [load_image(row.image) for row in rows[start : start + batch_size]]
        if generator is not None:
            images = [hue_rotated(image, float(torch.rand((), generator=generator)) * 2 * math.pi) for image in images]
        pixels = image_processor(images, return_tensors="pt")["pixel_values"]
        chunks.append(model.get_vision_features(pixels.to(tower_device(model))).float())
    return torch.cat(chunks)


def hue_rotated(image: Image.Image, angle: float) -> Image.Image:
    """An RGB image with its hue turned by `angle` radians (vlkit.clip.augment.hue_rotate), back in 8 bits."""
    from vlkit.clip.augment import hue_rotate

    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    turned = hue_rotate(pixels, angle).permute(1, 2, 0).mul(255.0).round().to(torch.uint8).numpy()
    return Image.fromarray(turned, mode="RGB")


def colour_slots(layout: list[list[str]], colour_words: list[str]) -> list[int]:
    """The slots whose candidates include a colour word: unscored on hue-rotated copies."""
    colours = set(colour_words)
    return [slot for slot, words in enumerate(layout) if colours & set(words)]


def slot_loss(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Mean over the slots with a choice (fixed text has one candidate) of their cross-entropy."""
    losses = [torch.nn.functional.cross_entropy(slot, targets[:, k], ignore_index=IGNORE)
              for k, slot in enumerate(logits) if slot.shape[1] > 1]
    return torch.stack(losses).mean()


@torch.no_grad()
def slot_choices(connector, features: torch.Tensor) -> torch.Tensor:
    """[rows, slots] index of the candidate the reader chooses at every slot."""
    connector.eval()
    return torch.stack([slot.argmax(-1) for slot in connector.slot_logits(features)], dim=1).cpu()


def slot_accuracy(options: list[int], choices: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Accuracy of `slot_choices` over the slots with a choice (options: candidates per slot), and the
    share of images with every slot right."""
    choice = [k for k, count in enumerate(options) if count > 1]
    wanted = targets[:, choice]
    right = (choices[:, choice] == wanted) | (wanted == IGNORE)
    return {"slot_accuracy": round(right.float().mean().item(), 4), "all_slots_right": round(right.all(1).float().mean().item(), 4)}


def read_back(model, image_processor, rows: list[WordsRow], layout: list[list[str]]) -> tuple[list[list[str]], dict]:
    """(the word the model's reader chooses at every slot of each row's image, `slot_accuracy` of those
    choices against the rows' words); layout: the train file's."""
    connector = model.connector
    features = tower_features(model, image_processor, rows, desc="reader")
    choices = slot_choices(connector, features.to(connector.reader[0].weight.dtype))
    words = [[layout[slot][index] for slot, index in enumerate(row)] for row in choices.tolist()]
    return words, slot_accuracy(connector.options, choices, slot_targets(rows, layout))


def fold_standardisation(layer: torch.nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make `layer(x)` compute what it computed on `(x - mean) / std`."""
    with torch.no_grad():
        weight = layer.weight / std
        layer.bias -= (weight * mean).sum(dim=1)
        layer.weight.copy_(weight)


def read_words(recipe, tokenizer) -> tuple[list[WordsRow], list[WordsRow], list[list[int]]]:
    """(train rows, val rows, the connector's `groups`) of a recipe's words files."""
    if launched_processes() > 1:
        raise ConfigError("the visual_words align stage trains in one process (a minute on a CPU); run it without "
                          "accelerate launch or torchrun")
    data = recipe.data
    rows = read_words_file(data.path(data.train_file), data.image_root_path())[: data.max_train_samples]
    val_rows = read_words_file(data.path(data.val_file), data.image_root_path())[: data.max_val_samples] if data.val_file else []
    return rows, val_rows, layout_token_ids(infer_layout(rows), tokenizer)


def training_pool(model, image_processor, rows: list[WordsRow], features: torch.Tensor, targets: torch.Tensor,
                  copies: int, unscored_slots: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, targets) the reader draws its batches from: the rows' own, then `copies` hue-rotated
    copies of them whose `unscored_slots` targets are IGNORE."""
    pool_features, pool_targets = [features], [targets]
    for copy in range(copies):
        pool_features.append(tower_features(model, image_processor, rows, hue_seed=seed * 1000 + copy,
                                            desc=f"tower features (hue-rotated copy {copy + 1})"))
        colourless = targets.clone()
        colourless[:, unscored_slots] = IGNORE
        pool_targets.append(colourless)
    return torch.cat(pool_features), torch.cat(pool_targets)


def train_reader(connector, pool: torch.Tensor, pool_targets: torch.Tensor, train, rows: int,
                 profiler: StepProfiler | None = None) -> list[dict]:
    """AdamW steps of the connector's reader on batches drawn from the standardised `pool` and its targets,
    with the recipe's schedule (an epoch: `rows` samples); returns the log history."""
    from transformers import get_scheduler

    from vlkit.train.trainer import Throughput

    steps = train.max_steps or math.ceil(train.epochs * math.ceil(rows / train.batch_size))
    optimizer = torch.optim.AdamW(connector.reader.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)
    warmup = train.warmup_steps if train.warmup_steps is not None else math.ceil(train.warmup_ratio * steps)
    scheduler = get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    generator = torch.Generator().manual_seed(train.seed)
    history, running = [], []
    dtype = connector.reader[0].weight.dtype
    pool_targets = pool_targets.to(pool.device)
    connector.train()
    if profiler:
        profiler.step_ended(0)
    throughput = Throughput(train.batch_size)
    for step in tqdm(range(1, steps + 1), desc="reader", unit="step"):
        batch = torch.randint(0, len(pool), (train.batch_size,), generator=generator).to(pool.device)
        loss = slot_loss(connector.slot_logits(pool[batch].to(dtype), dropout=True), pool_targets[batch])
        optimizer.zero_grad()
        loss.backward()
        if train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(connector.reader.parameters(), train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        running.append(loss.detach())  # read at logging only: on a GPU a read per step waits for the step
        if step % train.logging_steps == 0 or step == steps:
            mean_loss = torch.stack(running).mean().item()
            history.append({"step": step, "loss": mean_loss, "learning_rate": scheduler.get_last_lr()[0],
                            "samples_per_s": throughput.since_last(step)})
            running = []
        if profiler:
            profiler.step_ended(step)
    if profiler:
        profiler.abandon()
    return history


def fit_reader(model, image_processor, train, rows: list[WordsRow], val_rows: list[WordsRow],
               hue_rotated_copies: int = 0, colour_words: list[str] | None = None,
               profiler: StepProfiler | None = None) -> tuple[list[dict], dict]:
    """Train the model's visual_words reader on the rows (train: the recipe's train section), and on
    `hue_rotated_copies` hue-rotated copies of them with the slots of `colour_words` unscored; return
    (log history, final metrics, on the rows as they are). `profiler`: told the end of every step."""
    model.eval()  # the tower and LLM stay as they are; only the reader trains
    connector = model.connector
    layout = infer_layout(rows)
    features = tower_features(model, image_processor, rows, desc="tower features (train)")
    targets = slot_targets(rows, layout)
    pool, pool_targets = training_pool(model, image_processor, rows, features, targets,
                                       hue_rotated_copies, colour_slots(layout, colour_words or []), train.seed)
    flat = pool.flatten(1)
    mean, std = flat.mean(0), flat.std(0).clamp(min=1e-6)
    standardised = ((flat - mean) / std).view_as(pool)
    del flat, pool  # keep only the standardised pool (0.6 GB a copy of 30,000 images)

    history = train_reader(connector, standardised, pool_targets, train, len(rows), profiler)
    dtype = connector.reader[0].weight.dtype
    fold_standardisation(connector.reader[0], mean.to(dtype), std.to(dtype))
    metrics = {"train_loss": history[-1]["loss"],
               **{f"train_{k}": v for k, v in slot_accuracy(connector.options, slot_choices(connector, features.to(dtype)),
                                                            targets).items()}}
    if val_rows:
        val_features = tower_features(model, image_processor, val_rows, desc="tower features (val)")
        scores = slot_accuracy(connector.options, slot_choices(connector, val_features.to(dtype)),
                               slot_targets(val_rows, layout))
        metrics.update({f"eval_{k}": v for k, v in scores.items()})
    return history, metrics
