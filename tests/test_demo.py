"""The `make demo` pipeline at toy size: the same code and recipes, with overrides for the sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlkit.demo import DemoSize, run_pipeline, write_report
from vlkit.demo_report import summary_table

TINY_CLIP = [  # a convolutional tower, like the shipped recipe's, at toy size (its last stage: 4 x 4 at 32 px)
    "model.vision.config={model_type: resnet, image_size: 32, embedding_size: 8, hidden_sizes: [8, 16], "
    "depths: [1, 1], layer_type: basic}",
    "model.text.config={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2}",
    "model.projection_dim=16", "train.batch_size=16", "data.val_file=null",
]


@pytest.mark.slow
def test_demo_pipeline_at_toy_size(tmp_path, tiny_llm_dir):
    size = DemoSize(
        n_train=32, n_eval=6, eval_images=4, llm=tiny_llm_dir, batch_size=4, val_samples=3, budget_minutes=600,
        clip=["train.max_steps=4", *TINY_CLIP], instruct=["train.max_steps=2"],  # the recipe sets max_steps: 3000
        align=["train.max_steps=20"],  # the visual_words reader: an MLP on the tower's cached features
    )
    out = tmp_path / "demo"
    figures = run_pipeline(out, tmp_path / "shapes", size)
    report = write_report(out, figures, "toy")
    text = report.read_text()
    for stage in ("clip", "align", "instruct"):
        assert (out / stage / "run_summary.json").is_file()
        assert f"{stage}/loss.png" in text
    for stage in ("align", "instruct"):
        assert json.loads((out / stage / "run_summary.json").read_text())["val_samples"] == 3
    assert "(budget 600 min: met)" in text
    for split in ("test", "test_heldout"):
        by_type = figures["vqa"][split]["by_type"]
        assert by_type and all(0.0 <= row["accuracy"] <= 1.0 for row in by_type.values())
        # The no-image baseline is measured on test only: both splits ask the same wordings.
        assert all(("no_image_accuracy" in row) == (split == "test") for row in by_type.values())
        assert (out / "eval" / f"vqa_{split}" / "eval.png").is_file()
        assert "top1" in figures["clip_eval"][split]["zero_shot"]
    assert (out / "eval" / "clip_test" / "confusion_matrix.png").is_file()
    assert len(figures["export"]["heldout_answers"]) == 3
    assert figures["export"]["format"] == "vlkit"  # stock Llava reads token-sequence towers only
    assert "| colour |" in text or "| shape |" in text
    # What the visual_words reader reads by itself: every test_heldout image holds an unseen colour x shape pair.
    read = figures["reader"]
    assert read["test"]["unseen_pair_shapes"] == 0 and read["test_heldout"]["images"] == 6
    assert read["test_heldout"]["unseen_pair_shapes"] >= 6 and 0 <= read["test_heldout"]["unseen_pair_shape_accuracy"] <= 1
    assert "| test_heldout | 6 |" in text and "shapes of unseen colour x shape pairs" in text
    # The linear probes of the tower and the connector are in the report and in eval/probe.json.
    tasks = set(figures["probe"]["tasks"])
    assert {"colour", "shape", "position", "count"} <= tasks and {task for task in tasks if "_at_" in task}
    assert "shape_at_* (mean)" in summary_table(figures)  # binding: one mean per attribute on the summary line
    assert "## Linear probes" in text and "| count |" in text and "connector (" in text
    assert json.loads((out / "eval" / "probe.json").read_text())["tasks"]["count"]["n_train"] == 32
    saved = json.loads((out / "figures.json").read_text())
    assert saved["timings"]["all stages"] > 0
    assert Path(figures["export"]["dir"]).is_dir()


def test_a_finished_stage_is_reused_only_with_the_same_recipe(tmp_path):
    from vlkit.config import dump_recipe
    from vlkit.demo import reusable, stage_recipe

    run_dir = tmp_path / "align"
    recipe = stage_recipe("align.yaml", run_dir, ["train.max_steps=3"])
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    assert not reusable(run_dir, recipe)  # no run_summary.json: the run did not finish
    (run_dir / "run_summary.json").write_text("{}")
    assert reusable(run_dir, recipe)
    assert not reusable(run_dir, stage_recipe("align.yaml", run_dir, ["train.max_steps=4"]))


def test_a_finished_stage_is_not_reused_once_its_init_from_run_was_retrained(tmp_path):
    import torch
    from safetensors.torch import save_file

    from vlkit.config import dump_recipe
    from vlkit.demo import reusable, stage_recipe
    from vlkit.run_folder import MANIFEST, RUN_FORMAT, TRAINABLE, Location, trained_hash

    parent, run_dir = tmp_path / "align", tmp_path / "instruct"
    parent.mkdir()
    save_file({"connector.weight": torch.zeros(2)}, parent / TRAINABLE)
    recipe = stage_recipe("instruct.yaml", run_dir, ["train.max_steps=3", f"init_from={parent}"])
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    (run_dir / "run_summary.json").write_text("{}")
    manifest = {"format": RUN_FORMAT, "stage": "instruct", "bases": {}, "model": {}, "tune": {}, "stages": [],
                "init_from": Location.record(str(parent), run_dir, trained_hash(parent)).to_json()}
    (run_dir / MANIFEST).write_text(json.dumps(manifest))
    assert reusable(run_dir, recipe)
    save_file({"connector.weight": torch.ones(2)}, parent / TRAINABLE)  # the align stage trained again
    assert not reusable(run_dir, recipe)


def test_the_report_names_every_missed_goal():
    from vlkit.demo_report import shortfalls

    def row(accuracy, baseline):
        return {"accuracy": accuracy, "no_image_accuracy": baseline}

    figures = {"vqa": {
        "test": {"by_type": {"colour": row(0.95, 0.1), "count": row(0.5, 0.6), "existence": row(0.9, 0.5)}},
        "test_heldout": {"by_type": {}},
    }, "clip_eval": {"test": {"zero_shot": {"top1": 0.9}}, "test_heldout": {"zero_shot": {"top1": 0.85}}}}
    assert shortfalls(figures) == ["Targets missed on test: count 0.500 < 0.85.",
                                   "Less than 0.3 above the no-image baseline: count 0.500 vs 0.600."]
    figures["vqa"]["test"]["by_type"]["count"] = row(0.9, 0.6)
    assert shortfalls(figures) == []
    figures["vqa"]["test"]["by_type"]["count"] = row(0.9, 0.7)  # met, but only 0.2 above guessing
    assert shortfalls(figures) == ["Less than 0.3 above the no-image baseline: count 0.900 vs 0.700."]
    figures["vqa"]["test"]["by_type"]["count"] = row(0.9, 0.6)
    figures["vqa"]["test_heldout"]["by_type"] = {"colour": {"accuracy": 0.85}, "count": {"accuracy": 0.79}}
    figures["clip_eval"]["test_heldout"]["zero_shot"]["top1"] = 0.7
    assert shortfalls(figures) == ["test_heldout more than 0.1 below test: count 0.790 vs 0.900.",
                                   "CLIP zero-shot top-1 below 0.85: test_heldout 0.700."]
    figures["targets"] = False  # `make demo FAST=1`: figures without goals
    assert shortfalls(figures) == []


def test_the_world_is_generated_again_for_another_size_or_generator_version(tmp_path):
    from data_tools.shapes import VERSION
    from vlkit.demo import world_outdated

    assert world_outdated(tmp_path, 32)  # none yet
    (tmp_path / "world.json").write_text(json.dumps({"version": VERSION, "splits": {"train": 32}}))
    assert not world_outdated(tmp_path, 32)
    assert world_outdated(tmp_path, 64)
    (tmp_path / "world.json").write_text(json.dumps({"version": VERSION - 1, "splits": {"train": 32}}))
    assert world_outdated(tmp_path, 32)  # v1 answers were not balanced


def test_a_reused_world_counts_with_the_time_it_took(tmp_path):
    from vlkit.demo import FIGURES, previous_timings

    assert previous_timings(tmp_path) == {}  # no earlier demo here: nothing to carry
    (tmp_path / FIGURES).write_text(json.dumps({"timings": {"data": 7.7, "clip": 294.7}}))
    assert previous_timings(tmp_path)["data"] == 7.7


def test_a_stage_continuing_a_bf16_run_is_reused_as_it_recorded_its_dtype(tmp_path):
    """An init_from stage without model.dtype trains in its parent's and records that in its recipe.yaml; the
    reuse check reads the recipe the same way, so the stage is not retrained for a dtype it did not name."""
    from vlkit.config import dump_recipe
    from vlkit.demo import reusable, stage_recipe
    from vlkit.run_folder import MANIFEST, RUN_FORMAT
    from vlkit.train.run import dtype_from_parent

    parent, run_dir = tmp_path / "align", tmp_path / "instruct"
    parent.mkdir()
    (parent / MANIFEST).write_text(json.dumps({"format": RUN_FORMAT, "model": {"dtype": "bfloat16"}}))
    trained = stage_recipe("instruct.yaml", run_dir, ["train.max_steps=3", f"init_from={parent}"])
    dtype_from_parent(trained, {"model": {"dtype": "bfloat16"}})  # as plan_run sets it before recipe.yaml is written
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(dump_recipe(trained))
    (run_dir / "run_summary.json").write_text("{}")
    fresh = stage_recipe("instruct.yaml", run_dir, ["train.max_steps=3", f"init_from={parent}"])
    assert fresh.model.dtype == "float32" and reusable(run_dir, fresh)
    explicit = stage_recipe("instruct.yaml", run_dir, ["train.max_steps=3", f"init_from={parent}", "model.dtype=float32"])
    assert not reusable(run_dir, explicit)  # a dtype the recipe names is its own
