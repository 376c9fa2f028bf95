"""`vlkit eval MODEL --data FILE --images DIR [--out DIR]`: score a model, write JSON + markdown + PNG.

A CLIP folder gets zero-shot classification and retrieval (`vlkit.clip.evaluate`). A VLM (run dir,
saved or exported folder) answers every question of a conversation file (any format
`vlkit.data.load_conversations` reads): each user turn is asked on its own, with the sample's
images, in batched, left-padded, greedy passes, and scored against the assistant turn that follows
it. Samples that carry `qa` records (`{"type", "answer"}` per assistant turn) are grouped and
scored by those; the others by the form of the answer (yes/no, multiple choice, open).
- scoring is pluggable (`vlkit.scoring`): `--scorer auto|exact_match|yes_no|multiple_choice` or
  `module:factory` (the shapes world's: `data_tools.shapes_scoring:scorer_for`);
- yes/no questions also get POPE's precision, recall and F1 of "yes";
- with `--no-image-baseline` the same questions are asked without the image: the honest chance
  level of an LLM that guesses from the question alone.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vlkit.errors import DataError, OutOfMemoryError, first_line, is_out_of_memory
from vlkit.modeling import IMAGE_TOKEN
from vlkit.scoring import Scorer, answer_kind, resolve_scorer, yes_no_metrics

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS = {"description": 48, "open": 32}
DEFAULT_MAX_NEW_TOKENS = 8


# --- data -----------------------------------------------------------------------------------------------
def question_items(samples, limit: int | None = None) -> list[dict[str, Any]]:
    """One item per scored question: id, images, question text, type, answer."""
    items = []
    for sample in samples:
        questions = [m["content"] for m in sample["messages"] if m["role"] == "user"]
        qa = sample.get("qa") or []
        if qa:
            if len(questions) < len(qa):
                raise DataError(f"sample {sample['id']}: {len(qa)} qa records but {len(questions)} user turns")
            for record in qa:
                if "answer" not in record or "type" not in record:
                    raise DataError(f"sample {sample['id']}: a qa record lacks 'type' or 'answer' ({record})")
            pairs = [(question, record["type"], str(record["answer"])) for question, record in zip(questions, qa)]
        else:  # free-form: each user turn against the assistant turn after it
            messages = sample["messages"]
            pairs = [(message["content"], answer_kind(reply["content"]), reply["content"])
                     for message, reply in zip(messages, messages[1:])
                     if message["role"] == "user" and reply["role"] == "assistant"]
        for question, question_type, answer in pairs:
            items.append({"id": sample["id"], "images": list(sample["images"]),
                          "question": question.replace(IMAGE_TOKEN, "").strip(), "type": question_type, "answer": answer})
        if limit and len({item["id"] for item in items}) >= limit:
            break
    if not items:
        raise DataError("no scorable questions: the samples need user turns answered by assistant turns")
    return items


# --- answering ------------------------------------------------------------------------------------------
@torch.no_grad()
def answer_all(model, processor, items: list[dict[str, Any]], image_root: Path, with_image: bool,
               batch_size: int, desc: str) -> list[str]:
    """Greedy answers for every item, batched by type (so short answers stop early)."""
    from vlkit.data.images import load_image

    answers: list[str] = [""] * len(items)
    by_type: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_type[item["type"]].append(index)
    progress = tqdm(total=len(items), desc=desc, unit="q")
    for question_type, indices in by_type.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            conversations, images = [], []
            for index in chunk:
                item = items[index]
                marker = "<image>\n" * len(item["images"]) if with_image else ""
                conversations.append([{"role": "user", "content": marker + item["question"]}])
                images.append([load_image(p, image_root) for p in item["images"]] if with_image else [])
            inputs = processor.prompt_inputs(conversations, images).to(model.device)
            output = model.generate(**inputs, do_sample=False,
                                    max_new_tokens=MAX_NEW_TOKENS.get(question_type, DEFAULT_MAX_NEW_TOKENS))
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            for index, tokens in zip(chunk, new_tokens):
                answers[index] = processor.decode(tokens, skip_special_tokens=True).strip()
            progress.update(len(chunk))
    progress.close()
    return answers


def evaluate_vlm(model, processor, data_file: str | Path, image_root: str | Path, out_dir: str | Path | None = None,
                 batch_size: int = 16, max_samples: int | None = None, no_image_baseline: bool = False,
                 model_name: str = "", scorer: str | Scorer | None = None) -> dict[str, Any]:
    """Score a VLM on a conversation file; write eval.json, eval.md, eval.png, predictions.jsonl.

    scorer: a `vlkit.scoring` name, a `module:factory` or a callable (default "auto").
    """
    from vlkit.data.formats import load_conversations

    data_file, image_root = Path(data_file), Path(image_root)
    items = question_items(load_conversations(data_file), limit=max_samples)
    score = resolve_scorer(scorer, data_file)
    started = time.time()
    model.eval()
    predictions = answer_all(model, processor, items, image_root, True, batch_size, "answering")
    baseline = answer_all(model, processor, items, image_root, False, batch_size, "no-image baseline") \
        if no_image_baseline else None

    report: dict[str, Any] = {"model": model_name, "data": str(data_file), "questions": len(items),
                              "images": len({item["id"] for item in items}), "by_type": {}}
    for question_type in sorted({item["type"] for item in items}):
        indices = [i for i, item in enumerate(items) if item["type"] == question_type]
        correct = [score(predictions[i], items[i]["answer"], question_type) for i in indices]
        row = {"n": len(indices), "accuracy": sum(correct) / len(indices)}
        if baseline is not None:
            row["no_image_accuracy"] = sum(
                score(baseline[i], items[i]["answer"], question_type) for i in indices) / len(indices)
        report["by_type"][question_type] = row
    all_correct = [score(p, item["answer"], item["type"]) for p, item in zip(predictions, items)]
    report["overall_accuracy"] = sum(all_correct) / len(items)
    yes_no_items = [i for i, item in enumerate(items) if answer_kind(item["answer"]) == "yes/no"]
    if yes_no_items:  # POPE's figures: a model that always says "yes" shows here, not in accuracy
        report["yes_no"] = yes_no_metrics([predictions[i] for i in yes_no_items], [items[i]["answer"] for i in yes_no_items])
    report["wall_time_s"] = round(time.time() - started, 1)
    if out_dir is not None:
        write_report(report, items, predictions, baseline, Path(out_dir))
    return report


def write_report(report, items, predictions, baseline, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    with open(out / "predictions.jsonl", "w") as file:
        for index, (item, prediction) in enumerate(zip(items, predictions)):
            record = {**item, "prediction": prediction}
            if baseline is not None:
                record["no_image_prediction"] = baseline[index]
            file.write(json.dumps(record) + "\n")
    (out / "eval.md").write_text(markdown_table(report))
    plot_accuracy(report, out / "eval.png")


def markdown_table(report: dict[str, Any]) -> str:
    has_baseline = any("no_image_accuracy" in row for row in report["by_type"].values())
    header = "| question type | n | accuracy |" + (" no-image baseline |" if has_baseline else "")
    lines = [f"Evaluation of {report['model'] or 'model'} on {report['data']} ({report['images']} images, "
             f"{report['questions']} questions)", "", header, "|---|---:|---:|" + ("---:|" if has_baseline else "")]
    for question_type, row in report["by_type"].items():
        line = f"| {question_type} | {row['n']} | {row['accuracy']:.3f} |"
        if has_baseline:
            line += f" {row['no_image_accuracy']:.3f} |"
        lines.append(line)
    lines.append(f"| **all** | {report['questions']} | {report['overall_accuracy']:.3f} |" + (" |" if has_baseline else ""))
    if "yes_no" in report:
        pope = report["yes_no"]
        lines += ["", "Yes/no questions: " + ", ".join(f"{name.replace('_', ' ')} {value:.3f}" for name, value in pope.items())]
    return "\n".join(lines) + "\n"


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = list(report["by_type"])
    accuracy = [report["by_type"][t]["accuracy"] for t in types]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    positions = range(len(types))
    axis.bar([p - 0.2 for p in positions], accuracy, width=0.4, label="with image")
    if all("no_image_accuracy" in report["by_type"][t] for t in types):
        axis.bar([p + 0.2 for p in positions], [report["by_type"][t]["no_image_accuracy"] for t in types],
                 width=0.4, label="no image (baseline)", color="grey")
    axis.set_xticks(list(positions), types)
    axis.set_ylim(0, 1)
    axis.set_ylabel("accuracy")
    axis.set_title(Path(report["data"]).name)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --- CLI ------------------------------------------------------------------------------------------------
def is_clip_folder(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") in ("clip", "siglip",
                                                                                     "vision-text-dual-encoder")


def run(args) -> int:
    model_path = Path(args.model)
    if not Path(args.data).is_file():
        raise DataError(f"data file not found: {args.data}")
    if is_clip_folder(model_path):
        from vlkit.clip.evaluate import run as run_clip_eval

        return run_clip_eval(args)
    from vlkit.loading import load_any

    loaded = load_any(args.model)  # raises a one-line ModelLoadError for what cannot be loaded
    # A run dir keeps its evals; an exported folder stays as exported (a later push would upload extra files).
    # One folder per data file, as for CLIP folders: a test and a held-out eval of one run keep both reports.
    out = Path(args.out) if args.out else (
        model_path / "eval" if (model_path / "manifest.json").is_file() else Path("eval") / model_path.name
    ) / Path(args.data).stem
    try:
        report = evaluate_vlm(loaded.model, loaded.processor, args.data, args.images, out, batch_size=args.batch_size,
                              max_samples=args.max_samples, no_image_baseline=args.no_image_baseline,
                              model_name=args.model, scorer=args.scorer)
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        raise OutOfMemoryError(f"out of memory answering {args.batch_size} questions at a time: lower --batch-size "
                               f"({first_line(error)})") from error
    print(markdown_table(report))
    print(f"wrote {out}/eval.json, eval.md, eval.png, predictions.jsonl")
    return 0
