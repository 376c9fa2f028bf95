"""`vlkit eval` on a VLM: scoring rules, outputs, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

from train_helpers import finish, start_cli

from data_tools.shapes_scoring import named_pairs, normalize_answer, score
from vlkit.cli import main as cli_main
from vlkit.evaluate import evaluate_vlm
from vlkit.scoring import exact_match, multiple_choice, resolve_scorer, yes_no, yes_no_metrics
from vlkit.scoring import normalize_answer as vqa_normalize

VOCABULARY = {"colours": ["red", "blue", "green"], "shapes": ["circle", "square", "cross"]}
SHAPES_SCORER = "data_tools.shapes_scoring:scorer_for"


def test_generic_scorers():
    assert vqa_normalize("The Two  dogs!") == "2 dogs" and vqa_normalize("It isnt, 1,000") == "it isn't 1000"
    assert exact_match("A cat.", "cat") and not exact_match("a black cat", "cat")
    assert yes_no("Yes, there is.", "yes") and not yes_no("No.", "yes") and not yes_no("Maybe", "no")
    assert multiple_choice("(B) a dog", "B") and multiple_choice("The answer is C.", "C")
    assert not multiple_choice("A dog", "B")
    auto = resolve_scorer(None, "any.json")
    assert auto("yes it is", "Yes", "") and auto("B.", "B", "") and auto("two", "2", "") and not auto("3", "2", "")
    pope = yes_no_metrics(["yes", "yes", "no", "yes"], ["yes", "no", "no", "yes"])
    assert pope["precision"] == 2 / 3 and pope["recall"] == 1.0 and pope["accuracy"] == 0.75
    assert pope["yes_ratio"] == 0.75 and abs(pope["f1"] - 0.8) < 1e-9


def test_shapes_world_scoring_rules():
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
                          batch_size=8, max_samples=3, no_image_baseline=True, scorer=SHAPES_SCORER)
    assert report["images"] == 3 and report["questions"] >= 6
    for row in report["by_type"].values():
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["no_image_accuracy"] <= 1
    for name in ("eval.json", "eval.md", "eval.png", "predictions.jsonl"):
        assert (tmp_path / name).is_file()
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == report["questions"] and "no_image_prediction" in json.loads(lines[0])


def test_bad_input_is_one_line(tiny_vlm, shapes_dir, tmp_path, capsys, monkeypatch):
    model, processor = tiny_vlm
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    samples = json.loads(open(f"{shapes_dir}/instruct_test.json").read())[:2]
    del samples[1]["qa"][0]["answer"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(samples))
    # A real process for one case, so that everything it prints is seen (not only what Python writes to
    # sys.stderr); it starts first and runs while the other cases run in-process.
    unloadable = start_cli("eval", str(tmp_path / "no-model"), "--data", str(broken), "--images", shapes_dir)

    assert cli_main(["eval", str(tmp_path / "model"), "--data", str(tmp_path / "nope.json"), "--images", shapes_dir]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: data file not found")

    assert cli_main(["eval", str(tmp_path / "model"), "--data", str(broken), "--images", shapes_dir]) == 2
    assert "lacks 'type' or 'answer'" in capsys.readouterr().err.strip().splitlines()[-1]

    # Out of memory while answering: what to lower, not a traceback.
    from vlkit.modeling import VlkitForConditionalGeneration

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 1099511627776 bytes.")

    monkeypatch.setattr(VlkitForConditionalGeneration, "generate", out_of_memory)
    one = tmp_path / "one.json"
    one.write_text(json.dumps(json.loads(open(f"{shapes_dir}/instruct_test.json").read())[:1]))
    assert cli_main(["eval", str(tmp_path / "model"), "--data", str(one), "--images", shapes_dir,
                     "--out", str(tmp_path / "oom"), "--batch-size", "4"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: out of memory answering 4 questions at a time: lower --batch-size ([enforce fail")

    unloadable = finish(unloadable)
    assert unloadable.returncode == 2
    assert unloadable.stderr.strip().splitlines()[-1].startswith("error:")
    assert len([line for line in unloadable.stderr.splitlines() if line.startswith("error:")]) == 1


def test_free_form_llava_file_needs_no_world(tiny_vlm, shapes_dir, tmp_path, capsys):
    model, processor = tiny_vlm
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    samples = json.loads(open(f"{shapes_dir}/instruct_test.json").read())[:3]
    for sample in samples:
        sample.pop("qa", None)  # a plain LLaVA file: questions and free-form answers only
    plain = tmp_path / "data" / "llava.json"
    plain.parent.mkdir()
    plain.write_text(json.dumps(samples))
    assert not (plain.parent / "world.json").exists()
    returncode = cli_main(["eval", str(tmp_path / "model"), "--data", str(plain), "--images", shapes_dir,
                           "--out", str(tmp_path / "out"), "--batch-size", "8"])
    printed = capsys.readouterr()
    assert returncode == 0, printed.err[-2000:]
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    turns = sum(1 for s in samples for m in s["conversations"] if m["from"] == "gpt")
    assert report["questions"] == turns and set(report["by_type"]) <= {"yes/no", "multiple choice", "open"}
    if "yes/no" in report["by_type"]:
        assert set(report["yes_no"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
        assert "Yes/no questions: accuracy" in printed.out


def test_evals_of_one_model_on_two_files_keep_both_reports(tiny_vlm, shapes_dir, tmp_path, monkeypatch):
    """Without --out, each data file's report has its own folder (eval/MODEL_NAME/DATA_NAME for a saved
    model): a test and a held-out eval of one model, as README runs them, no longer overwrite each other."""
    model, processor = tiny_vlm
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    for split in ("test", "test_heldout"):
        assert cli_main(["eval", "model", "--data", f"{shapes_dir}/instruct_{split}.json", "--images", shapes_dir,
                         "--max-samples", "1", "--scorer", "data_tools.shapes_scoring:scorer_for"]) == 0
    reports = {split: json.loads((tmp_path / "eval" / "model" / f"instruct_{split}" / "eval.json").read_text())
               for split in ("test", "test_heldout")}
    assert {Path(report["data"]).name for report in reports.values()} == {"instruct_test.json",
                                                                           "instruct_test_heldout.json"}
