"""The shapes world generator: files, determinism, held-out pairs, Q&A answers, and ingestion."""

from __future__ import annotations

import collections
import hashlib
import json
import re
import shutil

import numpy as np
import pytest
from data_helpers import FakeProcessor, make_shapes_world

from data_tools import shapes
from vlkit.clip.data import ClipPairDataset
from vlkit.data import ConversationDataset, load_clip_pairs, load_conversations


@pytest.fixture(autouse=True)
def data_hf_cache(monkeypatch, tmp_path_factory):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "data_hf_cache")


@pytest.fixture(scope="module")
def data_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    assert shapes.main([str(out), "--n-train", "16", "--n-val", "4", "--n-test", "4", "--n-heldout", "8",
                        "--image-size", "32", "--seed", "3", "--quiet", "--workers", "1"]) == 0
    return out


def _tree_digest(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_writes_every_file_with_the_documented_rows(data_world):
    sizes = {"train": 16, "val": 4, "test": 4, "test_heldout": 8}
    for split, n in sizes.items():
        clip_rows = [json.loads(line) for line in (data_world / f"clip_{split}.jsonl").read_text().splitlines()]
        assert len(clip_rows) == n
        assert set(clip_rows[0]) == {"id", "image", "caption", "objects", "shapes", "label", "labels"}
        for kind in ("align", "instruct"):
            rows = json.loads((data_world / f"{kind}_{split}.json").read_text())
            assert [r["id"] for r in rows] == [r["id"] for r in clip_rows]
        for row in clip_rows:
            assert (data_world / row["image"]).is_file()
            assert row["image"].startswith("images/") and row["image"].endswith(".png")
            assert (row["label"] is not None) == (len(row["labels"]) == 1)
            # "objects" names each shape's colour and kind, and nothing else.
            assert row["objects"].replace(" and ", ", ").split(", ") == [
                f"{'an' if label[0] in 'aeiou' else 'a'} {label}" for label in row["labels"]]
            # "shapes" is the same without the colours (what a greyscale copy shows).
            assert row["shapes"].replace(" and ", ", ").split(", ") == [
                f"{'an' if label.split()[1][0] in 'aeiou' else 'a'} {label.split()[1]}" for label in row["labels"]]
            if row["label"]:
                assert row["labels"] == [row["label"]]
    assert len(list((data_world / "images").glob("*.png"))) == sum(sizes.values())
    world = json.loads((data_world / "world.json").read_text())
    assert world["seed"] == 3 and world["splits"] == sizes
    assert len(world["colours"]) >= 6 and {"circle", "square", "triangle", "star", "cross"} <= set(world["shapes"])
    labels = json.loads((data_world / "zeroshot_labels.json").read_text())
    assert len(labels["classes"]) == len(world["colours"]) * len(world["shapes"])
    assert "red circle" in labels["classes"]
    assert set(labels["heldout_classes"]) < set(labels["classes"])
    assert all("{}" in template for template in labels["templates"])
    # Zero-shot prompts are worded exactly like a one-shape image's `objects` caption.
    assert set(labels["prompts"]) == set(labels["classes"])
    assert labels["prompts"]["red circle"] == ["a red circle"] and labels["prompts"]["orange star"] == ["an orange star"]
    for split in sizes:
        for line in (data_world / f"clip_{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["label"]:
                assert labels["prompts"][row["label"]] == [row["objects"]]


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    one = make_shapes_world(tmp_path / "a", n=4, seed=7)
    shapes.generate(tmp_path / "b", 4, 2, 2, 2, image_size=32, seed=7, workers=2, progress=False)
    other_seed = make_shapes_world(tmp_path / "c", n=4, seed=8)
    assert _tree_digest(one) == _tree_digest(tmp_path / "b")
    assert _tree_digest(one) != _tree_digest(other_seed)


def test_heldout_pairs_only_in_test_heldout(data_world):
    heldout = set(json.loads((data_world / "zeroshot_labels.json").read_text())["heldout_classes"])
    assert len(heldout) == len(shapes.SHAPES)
    # Each shape and each colour still appears in training through other pairs.
    assert len({c.split()[1] for c in heldout}) == len(shapes.SHAPES)
    assert len({c.split()[0] for c in heldout}) == len(heldout)
    mentions = re.compile("|".join(re.escape(c) for c in heldout))
    for split in ("train", "val", "test"):
        for row in map(json.loads, (data_world / f"clip_{split}.jsonl").read_text().splitlines()):
            assert not heldout & set(row["labels"])
        text = (data_world / f"instruct_{split}.json").read_text() + (data_world / f"align_{split}.json").read_text()
        assert not mentions.search(text), f"a held-out pair is named in {split}"
    for row in map(json.loads, (data_world / "clip_test_heldout.jsonl").read_text().splitlines()):
        assert heldout & set(row["labels"])


def test_scene_statistics_over_many_draws():
    world = shapes.make_world(0)
    scenes = [shapes.sample_scene(shapes.split_rng(0, "train", i), world, "train") for i in range(600)]
    single = np.mean([len(s.shapes) == 1 for s in scenes])
    assert 0.42 < single < 0.58
    for scene in scenes:
        positions = [s.position for s in scene.shapes]
        assert len(set(positions)) == len(positions)
        assert len(set(scene.labels)) == len(scene.labels)
    seen = {label for s in scenes for label in s.labels}
    assert len(seen) == len(world.seen_pairs)  # every non-held-out pair shows up
    assert {s.texture for s in scenes} == set(shapes.TEXTURES)


def test_instruct_answers_are_aligned_and_true(data_world):
    clip = {r["id"]: r for r in map(json.loads, (data_world / "clip_train.jsonl").read_text().splitlines())}
    types_seen = set()
    for sample in json.loads((data_world / "instruct_train.json").read_text()):
        answers = [turn["value"] for turn in sample["conversations"] if turn["from"] == "gpt"]
        assert [qa["answer"] for qa in sample["qa"]] == answers
        assert sample["conversations"][0]["value"].startswith("<image>\n")
        labels = clip[sample["id"]]["labels"]
        questions = [turn["value"] for turn in sample["conversations"] if turn["from"] == "human"]
        for question, qa in zip(questions, sample["qa"]):
            types_seen.add(qa["type"])
            if qa["type"] == "colour":
                assert qa["answer"] in shapes.COLOURS and any(label.startswith(qa["answer"]) for label in labels)
            elif qa["type"] == "shape":
                assert any(label.endswith(" " + qa["answer"]) for label in labels)
            elif qa["type"] == "count" and "How many shapes" in question:
                assert qa["answer"] == str(len(labels))
            elif qa["type"] == "existence":
                asked = re.search(r"Is there an? (.+) in the image\?", question).group(1)
                assert qa["answer"] == ("yes" if asked in labels else "no")
            elif qa["type"] == "position":
                assert qa["answer"] in shapes.POSITIONS
    assert types_seen >= {"colour", "shape", "count", "position", "existence", "description"}


@pytest.mark.parametrize("split", ["train", "test_heldout"])
def test_answers_are_balanced_within_each_question_type(split):
    """Guessing without the image cannot beat ~0.55 on any type, even knowing the question's wording."""
    world = shapes.make_world(0)
    answers: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    count_by_question: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for index in range(3000):
        rng = shapes.split_rng(0, split, index)
        scene = shapes.sample_scene(rng, world, split)
        for turn in shapes.instruct_turns(rng, scene, world, split):
            answers[turn["type"]][turn["answer"]] += 1
            if turn["type"] == "count":
                count_by_question[turn["question"]][turn["answer"]] += 1

    def share(counter: collections.Counter, answer: str) -> float:
        return counter[answer] / sum(counter.values())

    for qtype in ("colour", "shape", "count", "position", "existence"):
        top_answer, _ = answers[qtype].most_common(1)[0]
        assert share(answers[qtype], top_answer) <= 0.55, (qtype, answers[qtype])
    assert set(answers["count"]) == {"0", "1", "2", "3"}
    assert all(share(answers["count"], n) >= 0.15 for n in "0123"), answers["count"]
    assert 0.45 <= share(answers["existence"], "yes") <= 0.55
    assert set(answers["position"]) == set(shapes.POSITIONS)
    assert all(share(answers["position"], p) >= 0.15 for p in shapes.POSITIONS)
    assert set(answers["colour"]) <= set(shapes.COLOURS) and set(answers["shape"]) == set(shapes.SHAPES)
    # Knowing the wording ("How many shapes" vs "How many stars") must not give the count away.
    best_guess = sum(max(c.values()) for c in count_by_question.values()) / sum(answers["count"].values())
    assert best_guess <= 0.5, dict(count_by_question)
    total = count_by_question["How many shapes are there?"]
    assert all(0.25 <= share(total, n) <= 0.42 for n in "123"), total


def test_drawn_shape_has_its_colour_at_its_position():
    scene = shapes.Scene([shapes.ShapeSpec("blue", "square", "large", "left"),
                          shapes.ShapeSpec("yellow", "circle", "large", "bottom")], "plain", 128, 0.0)
    image = np.asarray(shapes.render_scene(np.random.default_rng(0), scene, 64), dtype=int)
    assert np.abs(image[32, 13] - shapes.COLOURS["blue"]).max() <= 20  # (0.2, 0.5) of 64 px
    assert np.abs(image[51, 32] - shapes.COLOURS["yellow"]).max() <= 20  # (0.5, 0.8)
    assert np.abs(image[13, 32] - 128).max() <= 2  # the empty top slot is background


def test_outputs_load_through_the_training_ingestion(data_world):
    processor = FakeProcessor()
    for kind in ("align", "instruct"):
        samples = load_conversations(data_world / f"{kind}_train.json")
        assert samples.cache_files, "loaded through datasets' on-disk cache"
        dataset = ConversationDataset(samples, processor, image_root=data_world)
        assert len(dataset) == 16 and dataset.skipped == {}
        item = dataset[0]
        assert item["pixel_values"].shape == (1, 3, 1, 1)
        assert (item["labels"] != -100).any()
    instruct = load_conversations(data_world / "instruct_val.json")
    assert len(instruct[0]["qa"]) == sum(m["role"] == "assistant" for m in instruct[0]["messages"])
    pairs = load_clip_pairs(data_world / "clip_test_heldout.jsonl")
    from transformers import CLIPImageProcessorPil

    dataset = ClipPairDataset(pairs, data_world, CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0, 0, 0], image_std=[1, 1, 1]))
    assert len(dataset) == 8 and dataset[0]["pixel_values"].shape == (3, 32, 32) and dataset.skipped == {}


def test_text_prompt_files_give_each_image_its_description(data_world, tmp_path):
    from data_tools import shapes_text_prompt

    folder = tmp_path / "shapes"
    shutil.copytree(data_world, folder)
    assert shapes_text_prompt.main([str(folder)]) == 0
    for split, every_question in (("train", False), ("test", True), ("test_heldout", True)):
        original = {s["id"]: s for s in json.loads((folder / f"instruct_{split}.json").read_text())}
        rewritten = json.loads((folder / f"text_instruct_{split}.json").read_text())
        assert rewritten and {s["id"] for s in rewritten} <= set(original)
        for sample in rewritten:
            source = original[sample["id"]]
            kept = [qa for qa in source["qa"] if qa["type"] != "description"]
            assert sample["qa"] == kept and "description" not in {qa["type"] for qa in sample["qa"]}
            questions = [turn["value"] for turn in sample["conversations"] if turn["from"] == "human"]
            assert questions[0].startswith("<image>\nThe image shows: ")
            described = [question.split("\n")[-2] for question in questions if "The image shows: " in question]
            assert len(described) == (len(questions) if every_question else 1)
            # The description is the one the world's own description questions answer with.
            truth = [qa["answer"] for qa in source["qa"] if qa["type"] == "description"]
            if truth:
                assert described[0] == f"The image shows: {truth[0]}"
