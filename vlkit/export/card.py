"""The model card (`README.md`) of an exported model: Hub metadata plus what was trained, on what, how well.

Owns reading the run's own records (manifest stages, each stage's recipe.yaml and
run_summary.json, optional `eval*.json`, `eval*/eval.json` and `eval/*/eval.json` from `vlkit eval`) and writing them
with `huggingface_hub.ModelCard`. Everything but the manifest is optional: a card never fails an
export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from vlkit.export.source import ExportSource

# Embedded model names -> the Hub repository they come from (for `base_model` metadata).
EMBEDDED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(source: str) -> str | None:
    """The Hub id a base came from, or None for a local folder (the Hub rejects paths as base_model)."""
    if source in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[source]
    if HUB_ID.match(source) and not Path(source).exists():
        return source
    return None


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def stage_section(stage: dict[str, Any], run_dir: Path | None) -> list[str]:
    """Markdown lines for one training stage: its recipe (data, length, rates) and final figures."""
    lines = [f"### Stage `{stage['stage']}` (LLM: {stage.get('tune') or 'frozen'})", ""]
    recipe = None
    if run_dir is not None and (run_dir / "recipe.yaml").is_file():
        try:
            recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        except (OSError, yaml.YAMLError):
            recipe = None
    if recipe:
        data, train, tune = recipe.get("data", {}), recipe.get("train", {}), recipe.get("tune", {})
        data_file = str(Path(data.get("dir", ".")) / data.get("train_file", "?"))
        length = f"{train['max_steps']} steps" if train.get("max_steps") else f"{train.get('epochs', 1)} epoch(s)"
        lines += [
            f"- data: `{data_file}`" + (f", validation `{data['val_file']}`" if data.get("val_file") else ""),
            f"- training: {length}, batch {train.get('batch_size')} x {train.get('gradient_accumulation_steps', 1)}, "
            f"learning rate {train.get('learning_rate')}"
            + (f" (LLM {train['llm_learning_rate']})" if train.get("llm_learning_rate") else ""),
        ]
        if tune.get("llm") in ("lora", "qlora"):
            lines.append(f"- {tune['llm']}: r={tune.get('lora_r')}, alpha={tune.get('lora_alpha')}, "
                         f"targets {tune.get('lora_target_modules')}")
    summary = read_json(run_dir / "run_summary.json") if run_dir is not None else None
    if summary:
        metrics = summary.get("final_metrics", {})
        figures = [f"{key} {value:.4f}" for key, value in sorted(metrics.items())
                   if key.endswith("loss") and isinstance(value, (int, float))]
        lines.append(f"- finished: {summary.get('steps')} steps, {summary.get('samples')} samples, "
                     f"{summary.get('wall_time_s')} s" + (f"; {', '.join(figures)}" if figures else ""))
    elif run_dir is None:
        lines.append(f"- (run dir `{stage.get('output_dir')}` not found; no figures)")
    return [*lines, ""]


def eval_reports(run_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """(file name, report) of every `vlkit eval` report in the run dir."""
    files = sorted({*run_dir.glob("eval*.json"), *run_dir.glob("eval*/eval.json"), *run_dir.glob("eval/*/eval.json")})
    return [(str(path.relative_to(run_dir)), report) for path in files if (report := read_json(path)) is not None]


def eval_section(run_dir: Path) -> list[str]:
    lines = []
    for name, report in eval_reports(run_dir):
        by_type = report.get("by_type", {})
        lines += [f"`{name}`: {report.get('questions')} questions on `{report.get('data')}`", "",
                  "| question type | n | accuracy |", "|---|---:|---:|"]
        lines += [f"| {kind} | {row.get('n')} | {row.get('accuracy', float('nan')):.3f} |" for kind, row in by_type.items()]
        if "overall_accuracy" in report:
            lines.append(f"| **all** | {report.get('questions')} | {report['overall_accuracy']:.3f} |")
        lines.append("")
    return lines


def usage(fmt: str, repo: str) -> list[str]:
    remote = ", trust_remote_code=True" if fmt == "vlkit" else ""
    note = ("The model code (vlkit's `modeling.py`, `processing.py` and the connector) travels in this folder; "
            "`trust_remote_code=True` runs it. vlkit need not be installed.") if fmt == "vlkit" else \
           "A stock `LlavaForConditionalGeneration`: plain transformers loads it, vlkit need not be installed."
    return [
        "## How to load", "", note, "", "```python",
        "from PIL import Image",
        "from transformers import AutoModelForImageTextToText, AutoProcessor", "",
        f'model = AutoModelForImageTextToText.from_pretrained("{repo}"{remote})',
        f'processor = AutoProcessor.from_pretrained("{repo}"{remote})',
        'messages = [{"role": "user", "content": [{"type": "image", "image": Image.open("cat.png")},',
        '                                         {"type": "text", "text": "What is in this picture?"}]}]',
        "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,",
        '                                       return_dict=True, return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=64)",
        'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```", "",
        "vlkit itself loads it too: `vlkit chat FOLDER --image cat.png`, `vlkit eval FOLDER --data ...`.", "",
    ]


def model_card(source: ExportSource, fmt: str, dtype: str, repo: str | None = None) -> ModelCard:
    manifest = source.manifest
    bases = {name: base["source"] for name, base in manifest["bases"].items()}
    spec = manifest["model"]
    connector = spec["connector"]
    data = ModelCardData(
        base_model=[hid for hid in map(hub_id, bases.values()) if hid] or None,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["vlkit", "vision-language", f"connector-{connector['type']}", *(["llava"] if fmt == "llava" else [])],
    )
    from vlkit import __version__

    tune = manifest.get("tune", {})
    modes = {"frozen": "frozen", "lora": "LoRA, merged", "qlora": "QLoRA, merged", "full": "fully trained"}
    title = repo or source.run_dir.name
    origin = f"checkpoint `{source.folder.name}` (step {source.checkpoint_step})" if source.checkpoint_step is not None \
        else "the final weights"
    lines = [
        f"# {title}", "",
        f"A vision-language model built and trained with vlkit {__version__}, from {origin} of run "
        f"`{source.run_dir.name}`: a vision tower and an LLM joined by a trained `{connector['type']}` connector, "
        f"exported as a standalone `{fmt}`-format model in {dtype} (all weights included, nothing to download "
        "besides this folder).", "",
        "| part | base | training |", "|---|---|---|",
        f"| vision tower | `{bases.get('vision')}` (layer {spec['vision_feature_layer']}, "
        f"strategy `{spec['vision_feature_select_strategy']}`) | {modes.get(tune.get('vision', 'frozen'))} |",
        f"| connector | `{json.dumps(connector)}`, {spec['image_seq_length']} tokens per image | trained |",
        f"| LLM | `{bases.get('llm')}` | {modes.get(tune.get('llm', 'frozen'))} |", "",
    ]
    if source.notes:
        lines += ["Export notes:", "", *[f"- {note}" for note in source.notes], ""]
    lines += ["## Training", ""]
    stages = manifest["stages"]
    for index, stage in enumerate(stages):
        run_dir = source.run_dir if index == len(stages) - 1 else Path(stage.get("output_dir") or "")
        lines += stage_section(stage, run_dir if run_dir.is_dir() else None)
    evaluation = eval_section(source.run_dir)
    if evaluation:
        lines += ["## Evaluation", "", *evaluation]
    lines += usage(fmt, repo or "PATH_OR_REPO_ID")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
