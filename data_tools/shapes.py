"""The shapes world: a deterministic synthetic vision-language data set drawn with Pillow.

    python -m data_tools.shapes OUT_DIR [--n-train N --n-val N --n-test N --n-heldout N
                                         --image-size S --seed K --workers W]

Each image shows 1-3 coloured shapes (one of 5 positions, small or large) on a textured grey
background with sensor noise. OUT_DIR is the image root of every file written:

    images/{split}_{i:06d}.png
    clip_{split}.jsonl       {"id", "image", "caption", "objects", "shapes", "label" (single-shape images) | null, "labels"}
                             ("objects": a caption naming only colour and shape, "a red circle and a blue star";
                             "shapes": the same without colours, "a circle and a star")
    align_{split}.json       LLaVA format, one caption turn per image
    instruct_{split}.json    LLaVA format, multi-turn Q&A; "qa" holds each answer's type and exact answer
    probe_{split}.jsonl      {"image", "colour", "shape", "position" (the one shape of single-shape images,
                             else null), "count", "shape_at_left" ... "colour_at_centre" (what is at each
                             position, null where nothing is)}: labels for the linear probes
                             (python -m vlkit.probe)
    words_{split}.jsonl      {"image", "words"}: how many shapes and what is at each position, in one fixed
                             layout of words ("shapes: 2. left: small red circle at left. top: - - nothing
                             at top. ..."), the targets of a visual_words connector's reader (vlkit.data.words)
    zeroshot_labels.json     {"classes", "templates", "prompts" (per class: its one-shape `objects` caption),
                             "heldout_classes"}
    world.json               colours, shapes, positions, held-out pairs, split sizes, seed

Answers are balanced within each question type, so that a model answering without the image (even
knowing the question's wording) cannot beat about 0.4-0.5: counts spread over 0-3, existence is half
yes, positions and colours and shapes are uniform.

Splits are train, val, test and test_heldout. A few colour x shape pairs (one per shape, chosen by
the seed) never appear in train/val/test, not even in a question; every test_heldout image contains
at least one of them, which measures compositional generalisation.

Everything comes from `numpy.random.default_rng([seed, split, index])`, so the output is the same
byte for byte whatever the number of worker processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

# 2: balanced count answers; 3: zero-shot prompts worded like the `objects` captions; 4: probe files;
# 5: binding probe labels (shape and colour at each position); 6: words files (visual_words);
# 7: words files start with the number of shapes; 8: CLIP pairs carry `shapes` captions (no colours);
# 9: words files name each position after its shape too ("left: small red circle at left.")
VERSION = 9

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 165, 60),
    "blue": (40, 85, 225),
    "purple": (140, 50, 190),
    "pink": (245, 125, 195),
    "brown": (125, 75, 30),
}
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon"]
PLURALS = {"cross": "crosses"}
SIZES = ["small", "large"]
POSITIONS: dict[str, tuple[float, float]] = {  # centre of each slot, as a fraction of the image
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "centre": (0.5, 0.5),
}
# Radii keep shapes inside the image and apart from each other even after jitter.
RADIUS = {"small": 0.07, "large": 0.125}
JITTER = 0.015
TEXTURES = ["plain", "noise", "stripes", "checker", "gradient"]
SPLITS = ["train", "val", "test", "test_heldout"]
SHAPE_COUNT_WEIGHTS = [0.5, 0.25, 0.25]  # 1, 2, 3 shapes: about half the images are single-shape
# Share of count questions that ask for the total, by number of shapes: inversely proportional to
# SHAPE_COUNT_WEIGHTS, so "How many shapes are there?" answers 1, 2 and 3 equally often.
TOTAL_COUNT_SHARE = {1: 0.4, 2: 0.8, 3: 0.8}

ZEROSHOT_TEMPLATES = [
    "a photo of a {}.",
    "a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a picture showing a {}.",
]

NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    size: str
    position: str

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    shapes: list[ShapeSpec]
    texture: str
    background: int  # grey level
    noise: float  # sensor noise sigma
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return [spec.label for spec in self.shapes]


@dataclass(frozen=True)
class World:
    seed: int
    image_size: int
    heldout_pairs: tuple[tuple[str, str], ...]

    @property
    def all_pairs(self) -> list[tuple[str, str]]:
        return [(colour, shape) for shape in SHAPES for colour in COLOURS]

    @property
    def seen_pairs(self) -> list[tuple[str, str]]:
        return [pair for pair in self.all_pairs if pair not in self.heldout_pairs]


def make_world(seed: int, image_size: int = 64) -> World:
    """Pick the held-out pairs: one colour per shape, each colour used at most once."""
    rng = np.random.default_rng([seed, 1_000_003])
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    return World(seed, image_size, tuple((colours[i % len(colours)], shape) for i, shape in enumerate(SHAPES)))


def split_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _pick(rng: np.random.Generator, options: list) -> Any:
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, world: World, split: str) -> Scene:
    """Draw the content of one image; test_heldout images contain at least one held-out pair."""
    count = int(rng.choice([1, 2, 3], p=SHAPE_COUNT_WEIGHTS))
    positions = [str(p) for p in rng.permutation(list(POSITIONS))[:count]]
    pairs: list[tuple[str, str]] = []
    for i in range(count):
        pool = list(world.heldout_pairs) if (split == "test_heldout" and i == 0) else world.seen_pairs
        pool = [pair for pair in pool if pair not in pairs]  # every colour x shape at most once per image
        pairs.append(_pick(rng, pool))
    shapes = [
        ShapeSpec(colour, shape, _pick(rng, SIZES), position)
        for (colour, shape), position in zip(pairs, positions)
    ]
    return Scene(
        shapes=shapes,
        texture=_pick(rng, TEXTURES),
        background=int(rng.integers(70, 191)),
        noise=float(rng.uniform(0.0, 8.0)),
    )


# --- drawing ------------------------------------------------------------------------------------


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius r, rotated by `angle` radians."""
    if shape == "square":
        points = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    elif shape == "triangle":
        points = [(math.cos(a), math.sin(a) + 0.2) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        points = [
            ((1.0 if k % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
             (1.0 if k % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5))
            for k in range(10)
        ]
    elif shape == "cross":
        w = 0.32
        points = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                  (-1, -w), (-w, -w)]
    elif shape == "diamond":
        points = [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]
    elif shape == "hexagon":
        points = [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]
    else:
        raise ValueError(f"no polygon for shape '{shape}'")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]


def _background(rng: np.random.Generator, scene: Scene, size: int) -> np.ndarray:
    """A grey texture (never coloured, so it cannot be mistaken for a shape's colour)."""
    grey = np.full((size, size), float(scene.background))
    yy, xx = np.mgrid[0:size, 0:size] / size
    if scene.texture == "noise":
        grey += rng.normal(0.0, 14.0, (size, size))
    elif scene.texture == "stripes":
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(0.08, 0.2)
        grey += 16.0 * np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period)
    elif scene.texture == "checker":
        cells = int(rng.integers(4, 10))
        grey += np.where(((xx * cells).astype(int) + (yy * cells).astype(int)) % 2 == 0, 14.0, -14.0)
    elif scene.texture == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        grey += 30.0 * ((xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta))
    return np.repeat(grey[:, :, None], 3, axis=2)


def render_scene(rng: np.random.Generator, scene: Scene, size: int) -> Image.Image:
    """Draw a scene: background, then shapes supersampled for smooth edges, then sensor noise."""
    scale = 4 if size <= 128 else 2
    big = size * scale
    background = np.clip(_background(rng, scene, size), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(background, mode="RGB").resize((big, big), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for spec in scene.shapes:
        fx, fy = POSITIONS[spec.position]
        cx = (fx + rng.uniform(-JITTER, JITTER)) * big
        cy = (fy + rng.uniform(-JITTER, JITTER)) * big
        r = RADIUS[spec.size] * rng.uniform(0.94, 1.06) * big
        colour = tuple(int(np.clip(c + rng.integers(-14, 15), 0, 255)) for c in COLOURS[spec.colour])
        if spec.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.polygon(_polygon(spec.shape, cx, cy, r, rng.uniform(-0.17, 0.17)), fill=colour)
    image = canvas.resize((size, size), Image.Resampling.BOX)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, scene.noise, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


# --- text ---------------------------------------------------------------------------------------

POSITION_PHRASES = {
    "left": ["on the left", "on the left side", "at the left"],
    "right": ["on the right", "on the right side", "at the right"],
    "top": ["at the top", "near the top", "at the top of the image"],
    "bottom": ["at the bottom", "near the bottom", "at the bottom of the image"],
    "centre": ["in the centre", "in the middle", "at the centre"],
}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
TEXTURE_WORDS = {
    "plain": "plain grey",
    "noise": "noisy grey",
    "stripes": "striped grey",
    "checker": "checkered grey",
    "gradient": "shaded grey",
}
CAPTION_OPENERS = ["", "A picture of ", "An image of ", "There is ", "This image shows ", "A drawing of "]
ALIGN_PROMPTS = [
    "Describe the image briefly.",
    "What is in this picture?",
    "Give a short caption for this image.",
    "Summarize the visual content of the image.",
    "Write a brief description of the image.",
]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def listed(parts: list[str]) -> str:
    """Phrases as every caption and description lists its shapes: a / a and b / a, b and c."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def canonical_description(scene: Scene) -> str:
    """The fixed one-sentence description used as the exact answer of description questions."""
    parts = [f"{_article(s.size)} {s.size} {s.colour} {s.shape} {POSITION_PHRASES[s.position][0]}" for s in scene.shapes]
    text = listed(parts)
    return text[0].upper() + text[1:] + "."


def objects_caption(scene: Scene) -> str:
    """Only what each shape is: in a contrastive batch, position, size and background already tell most
    images apart, so captions that name them let a tower skip learning shapes."""
    parts = [class_prompt(spec.colour, spec.shape) for spec in scene.shapes]
    return listed(parts)


def shapes_caption(scene: Scene) -> str:
    """The `objects` caption without colours ("a circle and a star"): what a greyscale copy of the image
    shows (a CLIP recipe's `augment.grayscale_caption_column: shapes`)."""
    parts = [f"{_article(spec.shape)} {spec.shape}" for spec in scene.shapes]
    return listed(parts)


def class_prompt(colour: str, shape: str) -> str:
    """The zero-shot prompt of a colour x shape class: exactly the `objects` caption of an image showing
    only that shape. A text tower trained from scratch on these captions never saw template words such
    as "photo": after 600 CLIP steps the tiny ResNet scored val zero-shot top-1 0.34 with ZEROSHOT_TEMPLATES
    and 0.51 with these prompts (docs/clip.md)."""
    label = f"{colour} {shape}"
    return f"{_article(label)} {label}"


def varied_caption(rng: np.random.Generator, scene: Scene) -> str:
    """A caption with varied wording (synonyms, order, optional size and background)."""
    order = list(rng.permutation(len(scene.shapes)))
    parts = []
    for index in order:
        spec = scene.shapes[int(index)]
        words = [spec.colour, spec.shape]
        if rng.random() < 0.8:
            words.insert(0, _pick(rng, SIZE_WORDS[spec.size]))
        noun = " ".join(words)
        parts.append(f"{_article(noun)} {noun} {_pick(rng, POSITION_PHRASES[spec.position])}")
    body = listed(parts)
    if len(parts) > 1 and rng.random() < 0.3:
        body = f"{NUMBER_WORDS[len(parts)]} shapes: {body}"
    text = _pick(rng, CAPTION_OPENERS) + body
    if rng.random() < 0.3:
        text += f" on a {TEXTURE_WORDS[scene.texture]} background"
    return text[0].upper() + text[1:] + "."


def count_question(rng: np.random.Generator, shapes: list[ShapeSpec]) -> tuple[str, str]:
    """A count question whose answers are balanced, so guessing without the image stays near 0.4.

    "How many shapes" is asked of a scene with n shapes with probability TOTAL_COUNT_SHARE[n]: half
    the scenes are single-shape, so single-shape scenes are asked it half as often, which spreads
    its answers evenly over 1, 2 and 3. Otherwise "How many <shape>s" asks about a present shape or
    an absent one with equal odds, so its answers are 0 or 1 (2 when a shape repeats) about equally.
    """
    if rng.random() < TOTAL_COUNT_SHARE[len(shapes)]:
        return "How many shapes are there?", str(len(shapes))
    present = [spec.shape for spec in shapes]
    absent = [shape for shape in SHAPES if shape not in present]
    asked = _pick(rng, present) if rng.random() < 0.5 else _pick(rng, absent)
    return f"How many {_plural(asked)} are there?", str(present.count(asked))


def instruct_turns(rng: np.random.Generator, scene: Scene, world: World, split: str) -> list[dict[str, str]]:
    """2-4 questions of distinct types, each with its type and exact (short) answer."""
    shapes = scene.shapes
    shape_counts = {s.shape: sum(o.shape == s.shape for o in shapes) for s in shapes}
    colour_counts = {s.colour: sum(o.colour == s.colour for o in shapes) for s in shapes}
    types = ["colour", "shape", "count", "position", "existence", "description"]
    chosen = [str(t) for t in rng.permutation(types)[: int(rng.integers(2, 5))]]
    turns = []
    for qtype in chosen:
        spec = shapes[int(rng.integers(len(shapes)))]
        if qtype == "colour":
            if shape_counts[spec.shape] == 1 and rng.random() < 0.5:
                question = f"What colour is the {spec.shape}?"
            else:
                question = f"What colour is the shape {POSITION_PHRASES[spec.position][0]}?"
            answer = spec.colour
        elif qtype == "shape":
            if colour_counts[spec.colour] == 1 and rng.random() < 0.5:
                question = f"What shape is the {spec.colour} object?"
            else:
                question = f"What shape is {POSITION_PHRASES[spec.position][0]}?"
            answer = spec.shape
        elif qtype == "count":
            question, answer = count_question(rng, shapes)
        elif qtype == "position":
            question = f"Where is the {spec.label}?"
            answer = spec.position
        elif qtype == "existence":
            if rng.random() < 0.5:
                asked = spec.label
            else:
                # Outside test_heldout, a held-out pair may not even be named in a question.
                pool = world.all_pairs if split == "test_heldout" else world.seen_pairs
                absent = [f"{c} {s}" for c, s in pool if f"{c} {s}" not in scene.labels]
                asked = _pick(rng, absent)
            question = f"Is there {_article(asked)} {asked} in the image?"
            answer = "yes" if asked in scene.labels else "no"
        else:
            question, answer = "Describe the image in one sentence.", canonical_description(scene)
        turns.append({"type": qtype, "question": question, "answer": answer})
    return turns


# --- one image ----------------------------------------------------------------------------------


def make_example(world: World, split: str, index: int, out_dir: str | None) -> dict[str, Any]:
    """Sample, draw (and save, when out_dir is given) one image; return its records for every file."""
    rng = split_rng(world.seed, split, index)
    scene = sample_scene(rng, world, split)
    image = render_scene(rng, scene, world.image_size)
    sample_id = f"{split}_{index:06d}"
    rel_path = f"images/{sample_id}.png"
    if out_dir is not None:
        image.save(os.path.join(out_dir, rel_path), format="PNG", compress_level=1)
    single = len(scene.shapes) == 1
    clip = {
        "id": sample_id,
        "image": rel_path,
        "caption": varied_caption(rng, scene),
        "objects": objects_caption(scene),
        "shapes": shapes_caption(scene),
        "label": scene.labels[0] if single else None,
        "labels": scene.labels,
    }
    prompt = _pick(rng, ALIGN_PROMPTS)
    user = f"<image>\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n<image>"
    align = {
        "id": sample_id,
        "image": rel_path,
        "conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": varied_caption(rng, scene)}],
    }
    conversations = []
    turns = instruct_turns(rng, scene, world, split)
    for number, turn in enumerate(turns):
        question = f"<image>\n{turn['question']}" if number == 0 else turn["question"]
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": turn["answer"]}]
    instruct = {
        "id": sample_id,
        "image": rel_path,
        "conversations": conversations,
        "qa": [{"type": t["type"], "answer": t["answer"]} for t in turns],
    }
    single_spec = scene.shapes[0] if single else None
    probe = {"image": rel_path, "colour": single_spec and single_spec.colour, "shape": single_spec and single_spec.shape,
             "position": single_spec and single_spec.position, "count": str(len(scene.shapes))}
    probe.update(binding_labels(scene))
    words = {"image": rel_path, "words": layout_words(scene)}
    return {"clip": clip, "align": align, "instruct": instruct, "probe": probe, "words": words}


# The reading order of the words files' layout (left to right, top to bottom).
WORDS_ORDER = ("left", "top", "centre", "bottom", "right")


def layout_words(scene: Scene) -> str:
    """How many shapes there are and what is at each position, in one fixed layout of words (the targets
    of a visual_words connector's reader, vlkit.data.words): "shapes: 2. left: small red circle at left.
    top: - - nothing at top. centre: ...".

    - The number is read from the image like every other word: without it, an LLM that reads the layout
      for 136 LoRA steps answered "How many shapes are there?" right 35 times of 57, by counting the
      filled positions.
    - The position comes before the shape ("What shape is on the left?" reads on from "left:") and after
      it ("Where is the red circle?" reads on from "red circle at"): an LLM copies the words that follow
      the ones it finds. Same recipes and machine, 200 test images: position 0.869 -> 0.972, existence
      0.564 -> 0.968 (README, "Measured so far")."""
    at = {spec.position: spec for spec in scene.shapes}
    parts = [f"{position}: {at[position].size} {at[position].colour} {at[position].shape} at {position}."
             if position in at else f"{position}: - - nothing at {position}." for position in WORDS_ORDER]
    return " ".join([f"shapes: {len(scene.shapes)}.", *parts])


def binding_labels(scene: Scene) -> dict[str, str | None]:
    """`shape_at_{position}` and `colour_at_{position}` of every image (null where the slot is empty): the
    probe tasks of binding, which multi-shape questions ("What shape is on the left?") need and
    single-shape labels cannot measure."""
    at = {spec.position: spec for spec in scene.shapes}
    labels: dict[str, str | None] = {}
    for attribute in ("shape", "colour"):
        for position in POSITIONS:
            labels[f"{attribute}_at_{position}"] = getattr(at[position], attribute) if position in at else None
    return labels


def _make_chunk(args: tuple[World, str, int, int, str]) -> list[dict[str, Any]]:
    world, split, start, stop, out_dir = args
    return [make_example(world, split, index, out_dir) for index in range(start, stop)]


# --- the whole set ------------------------------------------------------------------------------


def _chunks(world: World, sizes: dict[str, int], out_dir: str, chunk: int) -> Iterator[tuple]:
    for split, n in sizes.items():
        for start in range(0, n, chunk):
            yield (world, split, start, min(start + chunk, n), out_dir)


def generate(
    out_dir: str | os.PathLike,
    n_train: int = 1000,
    n_val: int = 100,
    n_test: int = 100,
    n_heldout: int | None = None,
    image_size: int = 64,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the shapes world into out_dir and return the contents of world.json."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    world = make_world(seed, image_size)
    sizes = {"train": n_train, "val": n_val, "test": n_test, "test_heldout": n_test if n_heldout is None else n_heldout}
    total = sum(sizes.values())
    if workers is None:  # a process per core, but not for a handful of images
        workers = min(os.cpu_count() or 1, total // 256 + 1)
    tasks = list(_chunks(world, sizes, str(out), chunk=64))
    records: dict[str, list[dict[str, Any]]] = {split: [] for split in sizes}
    bar = tqdm(total=total, desc="drawing shapes", unit="img", disable=not progress)
    if workers <= 1:
        results: Iterator[list[dict[str, Any]]] = map(_make_chunk, tasks)
    else:
        pool = ProcessPoolExecutor(workers)
        results = pool.map(_make_chunk, tasks)  # keeps task order, so output is independent of workers
    for task, chunk_records in zip(tasks, results):
        records[task[1]] += chunk_records
        bar.update(len(chunk_records))
    bar.close()
    if workers > 1:
        pool.shutdown()

    for split, rows in records.items():
        for kind in ("clip", "probe", "words"):
            with open(out / f"{kind}_{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row[kind]) + "\n" for row in rows)
        for kind in ("align", "instruct"):
            with open(out / f"{kind}_{split}.json", "w", encoding="utf-8") as f:
                json.dump([row[kind] for row in rows], f, indent=1)
    heldout_classes = [f"{c} {s}" for c, s in world.heldout_pairs]
    labels = {
        "classes": [f"{c} {s}" for c, s in world.all_pairs],
        "templates": ZEROSHOT_TEMPLATES,  # for towers trained on other captions; `prompts` take precedence
        "prompts": {f"{c} {s}": [class_prompt(c, s)] for c, s in world.all_pairs},
        "heldout_classes": heldout_classes,
    }
    (out / "zeroshot_labels.json").write_text(json.dumps(labels, indent=1) + "\n")
    description = {
        "version": VERSION,
        "seed": seed,
        "image_size": image_size,
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "shapes": SHAPES,
        "sizes": SIZES,
        "positions": list(POSITIONS),
        "textures": TEXTURES,
        "heldout_pairs": [list(pair) for pair in world.heldout_pairs],
        "heldout_classes": heldout_classes,
        "splits": sizes,
        "question_types": ["colour", "shape", "count", "position", "existence", "description"],
        "image_root": ".",
    }
    (out / "world.json").write_text(json.dumps(description, indent=1) + "\n")
    return description


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.shapes", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-val", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--n-heldout", type=int, default=None, help="test_heldout size (default: --n-test)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.image_size < 16:
        parser.error("--image-size must be at least 16")
    start = time.perf_counter()
    world = generate(
        args.out_dir, args.n_train, args.n_val, args.n_test, args.n_heldout, args.image_size, args.seed,
        args.workers, progress=not args.quiet,
    )
    total = sum(world["splits"].values())
    print(f"wrote {total} images ({world['splits']}) to {args.out_dir} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
