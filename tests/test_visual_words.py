"""The visual_words connector: words files, the reader's align stage outside the LLM, and the tokens it
gives the LLM (its own word embeddings of the words the reader chose)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import write_recipe

from data_tools.shapes import WORDS_ORDER
from vlkit.connectors import build_connector
from vlkit.data.words import IGNORE, WordsRow, infer_layout, read_words_file, slot_targets
from vlkit.errors import ConfigError, DataError
from vlkit.recipe import load_recipe
from vlkit.train.checkpoint import load_run
from vlkit.train.run import train_vlm

GROUPS = [[[7]], [[2], [3, 4], []], [[5], [6]]]  # fixed "7", then a choice of 3 words (one 2 tokens long, one empty)


def test_tokens_are_the_llm_embeddings_of_the_chosen_words():
    connector = build_connector({"type": "visual_words", "groups": GROUPS, "num_patches": 4, "hidden": 8}, 6, 5).eval()
    table = torch.randn(10, 5)
    connector.use_llm_embeddings(table)
    assert connector.num_tokens(4) == 1 + 2 + 1
    # Make the reader certain: choose candidate 1 ([3, 4]) in slot 1 and candidate 0 ([5]) in slot 2.
    last = connector.reader[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, -50, 50, -50, 50, -50]))
        tokens = connector(torch.randn(3, 4, 6))
    expected = torch.stack([table[7], table[3], table[4], table[5]])
    assert tokens.shape == (3, 4, 5)
    assert torch.allclose(tokens, expected.expand(3, -1, -1), atol=1e-5)
    with torch.no_grad():
        last.bias.copy_(torch.tensor([0.0, -50, -50, 50, -50, 50]))  # the empty word, then [6]
        tokens = connector(torch.randn(1, 4, 6))
    assert torch.allclose(tokens[0], torch.stack([table[7], torch.zeros(5), torch.zeros(5), table[6]]), atol=1e-5)


def test_connector_errors_say_what_is_missing():
    with pytest.raises(ConfigError, match="needs 'groups' and 'num_patches'"):
        build_connector({"type": "visual_words"}, 6, 5)
    connector = build_connector({"type": "visual_words", "groups": GROUPS, "num_patches": 4}, 6, 5)
    with pytest.raises(ConfigError, match="reads 4 patches; the tower gives 9"):
        connector.num_tokens(9)


def write_lines(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_words_files_layout_and_targets(tmp_path):
    rows = read_words_file(write_lines(tmp_path / "w.jsonl", [
        {"image": "a.png", "words": "left: red circle."},
        {"image": "b.png", "words": "left: blue nothing."},
    ]), tmp_path)
    assert rows[0].image == str(tmp_path / "a.png")
    layout = infer_layout(rows)
    assert layout == [["left:"], ["red", "blue"], ["circle.", "nothing."]]
    unseen = [WordsRow("c.png", ["left:", "green", "circle."])]
    assert slot_targets(rows + unseen, layout).tolist() == [[0, 0, 0], [0, 1, 1], [0, IGNORE, 0]]


@pytest.mark.parametrize("rows, message", [
    ([{"image": "a.png", "words": "a b"}, {"image": "b.png", "words": "a b c"}],
     "every text needs the same number of words (one layout); row 1 has 2, row 2 has 3"),
    ([{"image": "a.png"}], 'a row needs an "image" path and a "words" text'),
    ([], "no rows"),
])
def test_bad_words_files_are_one_line_errors(tmp_path, rows, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_words_file(write_lines(tmp_path / "w.jsonl", rows), tmp_path)
    with pytest.raises(DataError, match="words file not found"):
        read_words_file(tmp_path / "missing.jsonl", tmp_path)


def test_the_shapes_world_writes_one_layout(shapes_dir):
    rows = read_words_file(f"{shapes_dir}/words_train.jsonl", shapes_dir)
    layout = infer_layout(rows)
    fixed = [words[0] for words in layout if len(words) == 1]
    # Each position is named before its shape and after it: "left: small red circle at left."
    assert fixed == ["shapes:", *(word for position in WORDS_ORDER for word in (f"{position}:", "at", f"{position}."))]
    assert all(len(words) > 1 for words in layout if words[0] not in fixed)  # every other slot is a choice
    for row in rows:  # "shapes: N." counts the positions that hold a shape
        assert row.words[1] == f"{len(WORDS_ORDER) - row.words.count('nothing')}."


def as_a_cuda_build_without_a_gpu(monkeypatch) -> None:
    """torch.accelerator as a CUDA build of torch (what `pip install torch` gives) answers on a machine without a GPU:
    it names cuda unless asked to check that cuda is there."""
    real = torch.accelerator.current_accelerator
    monkeypatch.setattr(torch.accelerator, "current_accelerator",
                        lambda check_available=False: real(True) if check_available else torch.device("cuda"))


def test_align_stage_trains_the_reader_and_instruct_continues_it(tmp_path, shapes_dir, tiny_vision_dir, tiny_llm_dir,
                                                                 monkeypatch):
    as_a_cuda_build_without_a_gpu(monkeypatch)  # the reader must still train on the CPU
    align = {
        "stage": "align", "output_dir": str(tmp_path / "align"),
        "model": {"vision": tiny_vision_dir, "llm": tiny_llm_dir, "connector": {"type": "visual_words", "hidden": 64}},
        "data": {"dir": shapes_dir, "train_file": "words_train.jsonl", "val_file": "words_val.jsonl", "max_val_samples": 5,
                 "hue_rotated_copies": 1, "colour_words": ["red", "orange", "yellow", "green", "blue", "purple", "pink",
                                                           "brown"]},
        "train": {"batch_size": 24, "max_steps": 300, "learning_rate": 3e-3, "logging_steps": 50, "report_to": [],
                  "warmup_ratio": 0.0, "weight_decay": 0.0, "profile_step": 7},
    }
    align_dir = train_vlm(load_recipe(write_recipe(tmp_path / "align.yaml", align)))
    assert (align_dir / "profile.txt").read_text().startswith("step 7: ")  # the reader's own loop profiles too
    for name in ("recipe.yaml", "manifest.json", "trainable.safetensors", "run_summary.json", "loss.png",
                 "processor/processor_config.json"):
        assert (align_dir / name).is_file(), name
    manifest = json.loads((align_dir / "manifest.json").read_text())
    connector = manifest["model"]["connector"]
    assert connector["num_patches"] == 16 and len(connector["groups"]) == 2 + 6 * len(WORDS_ORDER)  # "shapes: 2." "left: small red circle at left."
    summary = json.loads((align_dir / "run_summary.json").read_text())
    metrics = summary["final_metrics"]
    # The 24 train images are learned by heart (a random tiny tower still tells them apart); the loss fell.
    assert metrics["train_all_slots_right"] == 1.0, metrics
    assert summary["log_history"][-1]["loss"] < summary["log_history"][0]["loss"] / 10
    assert 0 <= metrics["eval_slot_accuracy"] <= 1 and summary["val_samples"] == 5
    assert summary["layout"]["image_tokens"] == manifest["model"]["image_seq_length"]
    peak = summary["peak_memory_gib"]
    assert peak["host_rss"] > 0.05 and (peak["accelerator"] is None) == (not torch.accelerator.is_available())
    assert all(name.startswith("connector.reader.") for name in load_file(align_dir / "trainable.safetensors"))

    instruct = {
        "stage": "instruct", "output_dir": str(tmp_path / "instruct"), "init_from": str(align_dir),
        "tune": {"llm": "lora", "lora_r": 4, "lora_alpha": 8, "connector": "frozen"},
        "data": {"dir": shapes_dir, "train_file": "instruct_train.json", "max_length": 320},
        "train": {"batch_size": 4, "max_steps": 2, "logging_steps": 1, "report_to": []},
    }
    instruct_dir = train_vlm(load_recipe(write_recipe(tmp_path / "instruct.yaml", instruct)))
    # tune.connector: frozen kept the reader as the align stage left it; LoRA trained.
    before, after = load_file(align_dir / "trainable.safetensors"), load_file(instruct_dir / "trainable.safetensors")
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert any("lora_" in name for name in after)
    model, processor = load_run(instruct_dir)
    words = model.get_input_embeddings().weight
    # The rebuilt connector speaks in the LLM's words again: its table is the LLM's embedding rows.
    first_word = model.connector.groups[0][0]
    assert torch.equal(model.connector.option_embeddings[0, : len(first_word)], words[first_word].to(torch.float32))
    assert processor.image_seq_length == manifest["model"]["image_seq_length"]


def test_a_frozen_connector_is_for_the_instruct_stage_and_something_must_train(tmp_path, shapes_dir):
    recipe = {"stage": "align", "output_dir": str(tmp_path / "out"), "model": {"vision": "v"},
              "tune": {"connector": "frozen"}, "data": {"dir": shapes_dir, "train_file": "words_train.jsonl"}}
    with pytest.raises(ConfigError, match="tune.connector: frozen is for the instruct stage"):
        train_vlm(load_recipe(write_recipe(tmp_path / "a.yaml", recipe)))
    recipe.update(stage="instruct", tune={"connector": "frozen", "llm": "frozen"})
    with pytest.raises(ConfigError, match="nothing would train"):
        train_vlm(load_recipe(write_recipe(tmp_path / "i.yaml", recipe)))


def test_the_words_stage_runs_in_one_process(tmp_path, shapes_dir, tiny_vision_dir, tiny_llm_dir, monkeypatch):
    align = {
        "stage": "align", "output_dir": str(tmp_path / "align"),
        "model": {"vision": tiny_vision_dir, "llm": tiny_llm_dir, "connector": {"type": "visual_words"}},
        "data": {"dir": shapes_dir, "train_file": "words_train.jsonl"},
    }
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="trains in one process"):
        train_vlm(load_recipe(write_recipe(tmp_path / "align.yaml", align)))


class ChannelMeans:
    """A stand-in tower whose one feature vector is the image's mean per channel."""

    vision_tower = torch.nn.Linear(1, 1)  # where the features are computed: its parameters' device

    def get_vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(2, 3))[:, None, :]


def test_hue_rotated_copies_leave_the_colour_slots_unscored(shapes_dir):
    from transformers import CLIPImageProcessor

    from vlkit.train.words import colour_slots, tower_features, training_pool

    rows = read_words_file(f"{shapes_dir}/words_train.jsonl", shapes_dir)
    layout = infer_layout(rows)
    targets = slot_targets(rows, layout)
    colours = colour_slots(layout, ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown"])
    assert len(colours) == len(WORDS_ORDER)  # "left: small red circle at left.": one colour slot per position
    # Equal mean and std on every channel, so the features keep hue rotation's sums.
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_mean=[0.5] * 3, image_std=[0.5] * 3)
    model = ChannelMeans()
    features = tower_features(model, processor, rows)
    pool, pool_targets = training_pool(model, processor, rows, features, targets, 2, colours, seed=0)
    assert pool.shape == (3 * len(rows), 1, 3) and pool_targets.shape == (3 * len(rows), targets.shape[1])
    assert torch.equal(pool[: len(rows)], features) and torch.equal(pool_targets[: len(rows)], targets)
    others = [slot for slot in range(targets.shape[1]) if slot not in colours]
    for copy in (1, 2):
        part = slice(copy * len(rows), (copy + 1) * len(rows))
        assert (pool_targets[part][:, colours] == IGNORE).all()
        assert torch.equal(pool_targets[part][:, others], targets[:, others])
        # The copies are turned (their channels differ), and each pixel's grey level is kept (up to the
        # clamp into [0, 1] and 8-bit rounding).
        assert (pool[part] - features).abs().amax() > 0.02
        assert torch.allclose(pool[part].sum(-1), features.sum(-1), atol=0.02)
    assert not torch.equal(pool[len(rows) : 2 * len(rows)], pool[2 * len(rows) :])  # each copy draws its angles


def test_hue_rotated_copies_need_colour_words_and_a_words_stage(tmp_path, shapes_dir):
    recipe = {"stage": "align", "output_dir": str(tmp_path / "out"), "model": {"vision": "v"},
              "data": {"dir": shapes_dir, "train_file": "words_train.jsonl", "hue_rotated_copies": 1}}
    with pytest.raises(ConfigError, match="list them in data.colour_words"):
        load_recipe(write_recipe(tmp_path / "a.yaml", recipe))
    recipe["data"].update(train_file="align_train.json", colour_words=["red"])
    with pytest.raises(ConfigError, match="only the align stage of a visual_words connector reads it"):
        train_vlm(load_recipe(write_recipe(tmp_path / "b.yaml", recipe)))
