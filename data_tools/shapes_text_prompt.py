"""The shapes world's instruct files with each image's description given as text: the LLM stage's ceiling.

    python -m data_tools.shapes_text_prompt data/shapes
    vlkit train recipes/tiny/instruct.yaml data.train_file=text_instruct_train.json ...
    vlkit eval RUN --data data/shapes/text_instruct_test.json --images data/shapes \\
        --scorer data_tools.shapes_scoring:scorer_for

Writes text_instruct_{split}.json next to instruct_{split}.json. Each conversation loses its
description turns and gains "The image shows: <the scene's canonical description>" in front of its
first question (train, val), or of every question (test, test_heldout: `vlkit eval` asks each
question on its own). The image is still passed. Trained on these, the LLM stage shows how well it
answers when the picture reaches it as words, so a VLM's score can be read against what the same
steps give from a perfect description.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_tools.shapes import World, canonical_description, make_world, sample_scene, split_rng

SPLITS_ASKED_ONE_BY_ONE = ("test", "test_heldout")


def with_description(sample: dict, description: str, every_question: bool) -> dict | None:
    """The sample without its description turns, the description before its first (or every) question."""
    messages, qa = [], []
    turns = sample["conversations"]
    for number, record in enumerate(sample["qa"]):
        if record["type"] == "description":
            continue
        question = turns[2 * number]["value"].replace("<image>\n", "").replace("\n<image>", "")
        if every_question or not messages:
            question = f"The image shows: {description}\n{question}"
        messages += [{"from": "human", "value": question}, turns[2 * number + 1]]
        qa.append(record)
    if not messages:
        return None
    messages[0] = {"from": "human", "value": "<image>\n" + messages[0]["value"]}
    return {**sample, "conversations": messages, "qa": qa}


def write_split(data_dir: Path, world: World, split: str) -> int:
    samples = json.loads((data_dir / f"instruct_{split}.json").read_text())
    out = []
    for sample in samples:
        index = int(sample["id"].rsplit("_", 1)[1])
        scene = sample_scene(split_rng(world.seed, split, index), world, split)
        rewritten = with_description(sample, canonical_description(scene), split in SPLITS_ASKED_ONE_BY_ONE)
        if rewritten is not None:
            out.append(rewritten)
    (data_dir / f"text_instruct_{split}.json").write_text(json.dumps(out))
    return len(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.shapes_text_prompt", description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", help="a folder written by python -m data_tools.shapes")
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir)
    world_info = json.loads((data_dir / "world.json").read_text())
    world = make_world(world_info["seed"], world_info["image_size"])
    for split in ("train", "val", "test", "test_heldout"):
        if (data_dir / f"instruct_{split}.json").is_file():
            print(f"text_instruct_{split}.json: {write_split(data_dir, world, split)} conversations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
