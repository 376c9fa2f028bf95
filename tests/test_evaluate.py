"""`vlkit eval` on a VLM: scoring rules, outputs, and one-line errors for bad input."""

from __future__ import annotations

import json

from train_helpers import run_cli

from vlkit.evaluate import evaluate_vlm, named_pairs, normalize_answer, score

VOCABULARY = {"colours": ["red", "blue", "green"], "shapes": ["circle", "square", "cross"]}


def test_scoring_rules():
    assert normalize_answer(" Red. ") == "red" and normalize_answer("Two") == "2" and normalize_answer("No.") == "no"
    assert score("There are two.", "2", "count", VOCABULARY) is False  # exact match, not containment
    assert score("2", "2", "count", VOCABULARY)
    truth = "A small red circle on the left and a large blue square at the top."
    assert named_pairs(truth, VOCABULARY["colours"], VOCABULARY["shapes"]) == {("red", "circle"), ("blue", "square")}
    assert score("A blue square and a red circle.", truth, "description", VOCABULARY)
    assert not score("A red circle.", truth, "description", VOCABULARY)
    assert named_pairs("two green crosses", VOCABULARY["colours"], VOCABULARY["shapes"]) == {("green", "cross")}


def test_evaluate_writes_json_markdown_png_and_baseline(tiny_vlm, shapes_dir, tmp_path):
    model, processor = tiny_vlm
    report = evaluate_vlm(model, processor, f"{shapes_dir}/instruct_test.json", shapes_dir, tmp_path,
                          batch_size=8, max_samples=3, no_image_baseline=True)
    assert report["images"] == 3 and report["questions"] >= 6
    for row in report["by_type"].values():
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["no_image_accuracy"] <= 1
    for name in ("eval.json", "eval.md", "eval.png", "predictions.jsonl"):
        assert (tmp_path / name).is_file()
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == report["questions"] and "no_image_prediction" in json.loads(lines[0])


def test_bad_input_is_one_line(tiny_vlm, shapes_dir, tmp_path):
    model, processor = tiny_vlm
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    missing = run_cli("eval", str(tmp_path / "model"), "--data", str(tmp_path / "nope.json"), "--images", shapes_dir)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: data file not found")

    samples = json.loads(open(f"{shapes_dir}/instruct_test.json").read())[:2]
    del samples[1]["qa"][0]["answer"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(samples))
    result = run_cli("eval", str(tmp_path / "model"), "--data", str(broken), "--images", shapes_dir)
    assert result.returncode == 2 and "lacks 'type' or 'answer'" in result.stderr.strip().splitlines()[-1]

    unloadable = run_cli("eval", str(tmp_path / "no-model"), "--data", str(broken), "--images", shapes_dir)
    assert unloadable.returncode == 2
    assert unloadable.stderr.strip().splitlines()[-1].startswith("error:")
    assert len([line for line in unloadable.stderr.splitlines() if line.startswith("error:")]) == 1
