"""`vlkit data validate`: exit codes, counts and examples on real files."""

from __future__ import annotations

import json
import shutil

import pytest
from data_helpers import llava_sample, make_shapes_world, write_json, write_png, write_truncated_png

from vlkit.cli import main
from vlkit.data.validate import validate_file


@pytest.fixture(autouse=True)
def data_hf_cache(monkeypatch, tmp_path_factory):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "data_hf_cache")


@pytest.fixture(scope="module")
def data_clean_world(tmp_path_factory):
    return make_shapes_world(tmp_path_factory.mktemp("validate_world"), n=12, seed=1)


def test_clean_generated_set_exits_zero(data_clean_world, capsys):
    for name in ("instruct_train.json", "align_val.json", "clip_test_heldout.jsonl"):
        assert main(["data", "validate", str(data_clean_world / name), "--images", str(data_clean_world)]) == 0
        out = capsys.readouterr().out
        assert out.strip().endswith("usable") and out.splitlines()[-1].startswith("OK")


def test_one_corrupt_image_exits_non_zero_and_names_it(data_clean_world, tmp_path, capsys):
    world = shutil.copytree(data_clean_world, tmp_path / "world")
    first = json.loads((world / "instruct_train.json").read_text())[3]
    write_truncated_png(world / first["image"])
    code = main(["data", "validate", str(world / "instruct_train.json"), "--images", str(world)])
    out = capsys.readouterr().out
    assert code == 1
    assert "corrupt_image: 1 sample(s)" in out and f"- {first['id']}: image does not decode" in out
    assert out.splitlines()[-1] == "FAILED: 1 of 12 samples are bad (8.33%)"
    # The clip file of the same split shares the image, and fails the same way.
    assert main(["data", "validate", str(world / "clip_train.jsonl"), "--images", str(world)]) == 1


def test_every_problem_is_counted_with_examples(tmp_path):
    root = tmp_path / "images"
    write_png(root / "ok.png")
    (root / "empty.png").write_bytes(b"")
    rows = [
        llava_sample("ok", "ok.png"),
        llava_sample("missing1", "missing1.png"),
        llava_sample("missing2", "missing2.png"),
        llava_sample("zero", "empty.png"),
        llava_sample("escape", "../secret.png"),
        llava_sample("mismatch", "ok.png", "<image><image>"),
        {"id": "empty", "conversations": []},
    ]
    report = validate_file(write_json(tmp_path / "d.json", rows), root, progress=False)
    assert report.total == 7 and report.bad == 6
    assert dict(report.counts) == {"missing_image": 2, "empty_image": 1, "image_outside_root": 1,
                                   "image_token_mismatch": 1, "empty_conversation": 1}
    assert [sample_id for sample_id, _ in report.examples["missing_image"]] == ["missing1", "missing2"]
    assert not report.passed() and report.passed(max_bad_fraction=0.9)


def test_max_bad_fraction_and_show(tmp_path, capsys):
    root = tmp_path / "images"
    write_png(root / "ok.png")
    rows = [llava_sample(f"s{i}", "ok.png") for i in range(9)] + [llava_sample("bad", "gone.png")]
    path = str(write_json(tmp_path / "d.json", rows))
    assert main(["data", "validate", path, "--images", str(root), "--max-bad-fraction", "0.2"]) == 0
    assert "within --max-bad-fraction 0.2" in capsys.readouterr().out
    assert main(["data", "validate", path, "--images", str(root), "--max-bad-fraction", "0.05", "--show", "0"]) == 1
    out = capsys.readouterr().out
    assert "above --max-bad-fraction 0.05" in out and "- bad:" not in out


def test_model_measures_lengths(tmp_path, tiny_vlm, capsys):
    model, processor = tiny_vlm
    processor.save_pretrained(tmp_path / "model")
    model.config.save_pretrained(tmp_path / "model")
    root = tmp_path / "images"
    write_png(root / "ok.png")
    rows = [llava_sample("short", "ok.png"), llava_sample("long", "ok.png", "tell me more " * 12 + "<image>")]
    path = str(write_json(tmp_path / "d.json", rows))
    args = ["data", "validate", path, "--images", str(root), "--model", str(tmp_path / "model")]
    assert main(args) == 0  # within the LLM's own max_position_embeddings (512)
    assert main(args + ["--max-length", "96"]) == 1
    out = capsys.readouterr().out
    assert "too_long: 1 sample(s)" in out and "- long:" in out and "> max_length 96" in out


def test_usage_errors_are_one_line(tmp_path, capsys):
    write_png(tmp_path / "ok.png")
    path = str(write_json(tmp_path / "d.json", [llava_sample("a", "ok.png")]))
    assert main(["data", "validate", path, "--images", str(tmp_path), "--max-length", "10"]) == 2
    assert main(["data", "validate", str(tmp_path / "none.json"), "--images", str(tmp_path)]) == 2
    assert main(["data", "validate", path, "--images", str(tmp_path / "no_such_dir")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in errors] == ["error", "error", "error"]
    assert "needs --model" in errors[0] and "not found" in errors[1] and "not a folder" in errors[2]


def test_model_may_be_a_run_dir_or_a_checkpoint_of_a_run_cut_short(tmp_path, shapes_dir, tiny_vision_dir,
                                                                   tiny_llm_dir, capsys, monkeypatch):
    """--model takes what users have: a run dir (its processor/ folder, and the LLM base's length limit), or a
    checkpoint of a run that never finished (processor/ is written when the stage is set up)."""
    from train_helpers import align_recipe, write_recipe

    import vlkit.train.run as run_module
    from vlkit.recipe import load_recipe

    tree = align_recipe(tmp_path / "run", tiny_vision_dir, tiny_llm_dir, shapes_dir, max_steps=1)
    tree["train"]["save_steps"] = 1

    def killed_before_the_summary(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "write_summary", killed_before_the_summary)
    with pytest.raises(KeyboardInterrupt):
        run_module.train_vlm(load_recipe(write_recipe(tmp_path / "align.yaml", tree)))
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    assert (checkpoint / "manifest.json").is_file() and not (tmp_path / "run" / "run_summary.json").exists()
    monkeypatch.undo()

    def validate(model) -> None:
        args = ["data", "validate", f"{shapes_dir}/instruct_val.json", "--images", shapes_dir, "--model", str(model)]
        assert main(args) == 0
        assert "lengths measured against max_length 512" in capsys.readouterr().out  # the tiny LLM's positions

    validate(checkpoint)
    validate(run_module.train_vlm(load_recipe(write_recipe(tmp_path / "again.yaml", {**tree, "overwrite": True}))))
