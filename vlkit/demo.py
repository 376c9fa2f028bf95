"""`make demo`: the whole mission on a 2-core CPU, offline, in minutes.

1. generate the shapes world (train / val / test / test_heldout);
2. stage 0: CLIP-pretrain a small vision tower, a tiny ResNet (recipes/tiny/clip.yaml);
3. stages 1-2: align, then instruction-tune, with the embedded SmolLM2-135M-Instruct
   (recipes/tiny/align.yaml, recipes/tiny/instruct.yaml);
4. evaluate on test and test_heldout: VQA accuracy by question type, descriptions, and the same
   questions without the image (the chance baseline); linear probes of colour, shape, position and
   count on the tower's features and the connector's output (vlkit/probe.py), which say where
   information is lost;
5. export to Hugging Face format, reload the export, answer held-out questions and describe
   skimage's astronaut photo (when scikit-image, a dev extra, is installed);
6. write runs/demo/report.md with the figures and plots.

Every stage goes through the same recipes and functions as `vlkit train` / `vlkit eval`, with
overrides for the sizes; `--fast` runs a reduced version. A finished stage is reused when the
demo runs again with the same recipe and sizes (delete runs/demo to start over).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlkit.llm import DEFAULT_LLM

FIGURES = "figures.json"  # what a demo run measured, beside report.md


def tiny_recipe(name: str) -> Path:
    """recipes/tiny/NAME as vlkit ships it: the wheel carries recipes/ as the package
    vlkit.shipped_recipes (pyproject.toml), so an installed vlkit runs the demo from any directory."""
    try:
        shipped = importlib.resources.files("vlkit.shipped_recipes")
    except ModuleNotFoundError:
        # An editable install maps that package to recipes/ too, but setuptools' editable import hook
        # finds a mapped folder only with an __init__.py (recipes/ holds YAML only): read the checkout's.
        shipped = Path(__file__).resolve().parents[1] / "recipes"
    return Path(shipped / "tiny" / name)  # a namespace package's files() joins to a plain Path


@dataclass
class DemoSize:
    """How big each stage is. `full` fits ~20 minutes on 2 cores; `fast` ~5."""

    n_train: int
    n_eval: int  # images per test split
    eval_images: int  # images scored per split
    clip: list[str]
    align: list[str]
    instruct: list[str]
    llm: str = DEFAULT_LLM
    batch_size: int | None = None  # None: the recipes' own
    val_samples: int = 32  # per LLM stage: its end-of-run val loss (the demo scores VQA separately)
    probe_train: int = 3000  # train images the linear probes are fitted on (0: no probe)
    budget_minutes: float | None = None  # the wall-time goal this size is meant to fit
    targets: bool = True  # hold the figures to issue 18's goals (vlkit/demo_report.py)
    extra: dict[str, list[str]] = field(default_factory=dict)


SIZES = {
    # On 2 idle AVX512-BF16 cores SmolLM2 trains (bf16) ~8 captions or ~3.5 conversations per second: ~500 captions,
    # ~2200 conversations. AVX2-only cores train in float32 (`bf16: auto`), ~2.5 captions per second.
    # 30,000 train images against 10,000, same steps: CLIP zero-shot on test_heldout 0.794 -> 0.873, the
    # reader's images with every slot right on val 0.840 -> 0.935 (README, "Measured so far").
    "full": DemoSize(n_train=30000, n_eval=200, eval_images=200, budget_minutes=20, probe_train=1500,
                     clip=[], align=[], instruct=[]),  # the recipes as shipped
    # On a slow day (instruct steps of ~10 s) 12 instruct steps and probes on 1000 images took 6.7 min.
    "fast": DemoSize(n_train=1000, n_eval=50, eval_images=10, batch_size=8, val_samples=8, budget_minutes=5, probe_train=500, targets=False,
                     clip=["train.max_steps=150"], align=["train.max_steps=300"], instruct=["train.max_steps=8"]),
}


def log(message: str) -> None:
    print(f"\n=== {message}", flush=True)


def stage_recipe(recipe_name: str, out: Path, overrides: list[str]):
    """The shipped recipe with the demo's overrides, resolved and validated."""
    from vlkit.recipe import load_recipe

    # A stage that is not reusable (unfinished, or of another recipe) trains again over its folder.
    return load_recipe(tiny_recipe(recipe_name), [f"output_dir={out}", "overwrite=true", *overrides])


def reusable(run_dir: Path, recipe) -> bool:
    """A finished run of exactly this recipe, continuing the run it started from as that run is now: a
    changed recipe or size, or a retrained `init_from` run, trains the stage again."""
    from vlkit.config import dump_recipe
    from vlkit.run_folder import MANIFEST, RunManifest, read_manifest
    from vlkit.train.run import dtype_from_parent

    if getattr(recipe, "init_from", None) and (Path(recipe.init_from) / MANIFEST).is_file():
        dtype_from_parent(recipe, read_manifest(recipe.init_from))  # as the stage records it in its recipe.yaml
    saved = run_dir / "recipe.yaml"
    finished = (run_dir / "run_summary.json").is_file() and saved.is_file() and saved.read_text() == dump_recipe(recipe)
    has_manifest = (run_dir / MANIFEST).is_file()  # VLM stages; a CLIP folder continues nothing
    return finished and not (has_manifest and RunManifest.read(run_dir).init_from_changed())


def train_stage(recipe) -> Path:
    if recipe.stage == "clip":
        from vlkit.train.clip import train_clip

        return Path(train_clip(recipe))
    from vlkit.train.run import train_vlm

    return train_vlm(recipe)


def world_outdated(data_dir: Path, n_train: int) -> bool:
    """No shapes world in data_dir, one of another size, or one of another generator version (v2
    balanced the answers, so a v1 world would measure a v1 no-image baseline)."""
    from data_tools.shapes import VERSION

    world_file = data_dir / "world.json"
    if not world_file.is_file():
        return True
    world = json.loads(world_file.read_text())
    return world.get("version") != VERSION or world["splits"]["train"] != n_train


def previous_timings(out: Path) -> dict[str, float]:
    """The timings of the last finished demo in `out` (its figures.json), or {}."""
    path = out / FIGURES
    return json.loads(path.read_text()).get("timings", {}) if path.is_file() else {}


def run_pipeline(out: Path, data_dir: Path, size: DemoSize) -> dict[str, Any]:
    """Run every stage (reusing finished ones); return the figures for the report."""
    from data_tools.shapes import generate

    figures: dict[str, Any] = {"timings": {}, "data_dir": str(data_dir)}
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)

    new_world = world_outdated(data_dir, size.n_train)
    if new_world:
        log(f"data: generating the shapes world in {data_dir}")
        generate(data_dir, n_train=size.n_train, n_val=size.n_eval, n_test=size.n_eval, seed=0)
        figures["timings"]["data"] = round(time.time() - started, 1)
    else:  # a reused world counts with the time it took, as reused stages do (when the last report knows it)
        figures["timings"]["data"] = previous_timings(out).get("data", 0.0)

    data = [f"data.dir={data_dir}"]
    val = [f"data.max_val_samples={size.val_samples}"]
    batch = [f"train.batch_size={size.batch_size}"] if size.batch_size else []
    stages = [
        ("clip", "clip.yaml", [*data, *size.clip, *size.extra.get("clip", [])]),
        ("align", "align.yaml", [*data, f"model.vision={out / 'clip'}", f"model.llm={size.llm}",
                                 *batch, *val, "train.report_to=[]",
                                 *size.align, *size.extra.get("align", [])]),
        ("instruct", "instruct.yaml", [*data, f"init_from={out / 'align'}", *batch, *val, "train.report_to=[]", *size.instruct, *size.extra.get("instruct", [])]),
    ]
    upstream_trained = new_world  # new data or a retrained stage invalidates the stages built on it
    for name, recipe_name, overrides in stages:
        stage_started = time.time()
        recipe = stage_recipe(recipe_name, out / name, overrides)
        if not upstream_trained and reusable(out / name, recipe):
            log(f"stage {name}: reusing {out / name} (same recipe)")
        else:
            log(f"stage {name}: vlkit train recipes/tiny/{recipe_name} {' '.join(overrides)}")
            train_stage(recipe)
            upstream_trained = True
        summary = json.loads((out / name / "run_summary.json").read_text())
        # The stage's own wall time, so a reused stage still reports what it cost.
        figures["timings"][name] = summary.get("wall_time_s", round(time.time() - stage_started, 1))
        figures[name] = summary.get("final_metrics", {})

    stage_started = time.time()
    figures["clip_eval"] = evaluate_clip_stage(out, data_dir)
    figures["vqa"] = evaluate_vlm_stage(out, data_dir, size)
    figures["reader"] = reader_stage(out, data_dir)
    if size.probe_train:
        figures["probe"] = probe_stage(out, data_dir, size)
    figures["timings"]["eval"] = round(time.time() - stage_started, 1)
    stage_started = time.time()
    figures["export"] = export_stage(out, data_dir)
    figures["timings"]["export"] = round(time.time() - stage_started, 1)
    figures["timings"]["this run"] = round(time.time() - started, 1)
    figures["timings"]["all stages"] = round(sum(v for k, v in figures["timings"].items() if k != "this run"), 1)
    figures["budget_minutes"] = size.budget_minutes
    figures["targets"] = size.targets
    return figures


def evaluate_clip_stage(out: Path, data_dir: Path) -> dict[str, Any]:
    from vlkit.clip.evaluate import evaluate_clip
    from vlkit.config import read_yaml

    log("eval: CLIP zero-shot + retrieval on test and test_heldout")
    # Retrieval scores the captions the stage trained on (recipes/tiny/clip.yaml: the `objects` column).
    caption_column = read_yaml(out / "clip" / "recipe.yaml")["data"].get("caption_column", "caption")
    results = {}
    for split in ("test", "test_heldout"):
        results[split] = evaluate_clip(out / "clip", data_dir / f"clip_{split}.jsonl", data_dir,
                                       out / "eval" / f"clip_{split}", labels_file=data_dir / "zeroshot_labels.json",
                                       caption_column=caption_column)
    return results


# Questions per generate() call. On 2 cores, against 16: descriptions (48 new tokens) 1.5x faster, short
# answers 1.2x (117 / 120 test questions of each: 28.7 -> 18.8 s, 8.9 -> 7.6 s).
EVAL_BATCH = 64


def evaluate_vlm_stage(out: Path, data_dir: Path, size: DemoSize) -> dict[str, Any]:
    from vlkit.evaluate import evaluate_vlm
    from vlkit.train.checkpoint import load_run

    log("eval: VQA on test (with and without the image) and test_heldout")
    model, processor = load_run(out / "instruct")
    results = {}
    for split in ("test", "test_heldout"):
        # The no-image baseline measures guessing from the question's wording, which both splits share.
        results[split] = evaluate_vlm(model, processor, data_dir / f"instruct_{split}.json", data_dir,
                                      out / "eval" / f"vqa_{split}", batch_size=EVAL_BATCH, max_samples=size.eval_images,
                                      no_image_baseline=split == "test", model_name=str(out / "instruct"),
                                      scorer="data_tools.shapes_scoring:scorer_for")
    return results


def reader_stage(out: Path, data_dir: Path) -> dict[str, Any]:
    """What a visual_words align run's reader reads on test and test_heldout ({} for other connectors):
    slots and images read right, shapes read right, and the shapes of unseen colour x shape pairs."""
    from vlkit.data.words import infer_layout, read_words_file
    from vlkit.train.checkpoint import load_run
    from vlkit.train.words import read_back

    manifest = json.loads((out / "align" / "manifest.json").read_text())
    if manifest["model"]["connector"].get("type") != "visual_words":
        return {}
    log("eval: the visual_words reader on test and test_heldout")
    model, processor = load_run(out / "align")
    layout = infer_layout(read_words_file(data_dir / "words_train.jsonl", data_dir))
    world = json.loads((data_dir / "world.json").read_text())
    shapes, unseen = set(world["shapes"]), {tuple(pair) for pair in world["heldout_pairs"]}
    results = {}
    for split in ("test", "test_heldout"):
        rows = read_words_file(data_dir / f"words_{split}.jsonl", data_dir)
        read, scores = read_back(model, processor.image_processor, rows, layout)
        # A shape slot follows its colour word: "left: small red circle at left."
        shape_slots = [((row.words[slot - 1], row.words[slot]), row.words[slot] == words[slot])
                       for row, words in zip(rows, read) for slot in range(len(layout)) if row.words[slot] in shapes]
        unseen_slots = [ok for pair, ok in shape_slots if pair in unseen]
        results[split] = {
            "images": len(rows),
            **scores,
            "shape_accuracy": sum(ok for _, ok in shape_slots) / max(1, len(shape_slots)),
            "unseen_pair_shapes": len(unseen_slots),
            "unseen_pair_shape_accuracy": sum(unseen_slots) / len(unseen_slots) if unseen_slots else None,
        }
    return results


def probe_stage(out: Path, data_dir: Path, size: DemoSize) -> dict[str, Any]:
    """vlkit/probe.py on the instruct run: linear probes on the tower's features and the connector's output."""
    from vlkit.probe import data_dir_files, markdown, probe

    log(f"probe: python -m vlkit.probe {out / 'instruct'} --data {data_dir} --n-train {size.probe_train}")
    started = time.time()
    report = probe(str(out / "instruct"), *data_dir_files(data_dir), n_train=size.probe_train)
    report["seconds"] = round(time.time() - started, 1)
    (out / "eval" / "probe.json").write_text(json.dumps(report, indent=1) + "\n")
    report["markdown"] = markdown(report)
    return report


def export_stage(out: Path, data_dir: Path) -> dict[str, Any]:
    """Export the instruct run, reload the export, answer held-out questions, describe a photo."""
    import torch
    from PIL import Image

    try:
        from skimage import data as skimage_data
    except ImportError:  # a dev extra: an installed vlkit runs the demo without it and says so
        skimage_data = None

    from vlkit.data.images import load_image
    from vlkit.export import export_run
    from vlkit.loading import load_any

    export_dir = out / "export"
    log(f"export: vlkit export {out / 'instruct'} {export_dir}, then reload it")
    export_format = export_run(out / "instruct", export_dir, format="auto", overwrite=True)
    loaded = load_any(str(export_dir))
    heldout = json.loads((data_dir / "instruct_test_heldout.json").read_text())[:3]
    answers = []
    conversations, images = [], []
    for sample in heldout:
        question = sample["conversations"][0]["value"]
        conversations.append([{"role": "user", "content": question}])
        images.append([load_image(sample["image"], data_dir)])
    if skimage_data is not None:
        conversations.append([{"role": "user", "content": "<image>\nDescribe the image in one sentence."}])
        images.append([Image.fromarray(skimage_data.astronaut())])
    with torch.no_grad():
        inputs = loaded.prompt_inputs(conversations, images)
        output = loaded.model.generate(**inputs, max_new_tokens=48, do_sample=False)
    replies = [loaded.decode(row[inputs["input_ids"].shape[1]:]).strip() for row in output]
    for sample, reply in zip(heldout, replies):
        answers.append({"image": sample["image"], "question": sample["conversations"][0]["value"].replace("<image>\n", ""),
                        "truth": sample["conversations"][1]["value"], "answer": reply})
    astronaut = replies[-1] if skimage_data is not None else "not described: scikit-image is not installed"
    return {"format": export_format, "dir": str(export_dir), "heldout_answers": answers, "astronaut": astronaut}


def write_report(out: Path, figures: dict[str, Any], size_name: str) -> Path:
    from vlkit.demo_report import render_report

    path = out / "report.md"
    path.write_text(render_report(out, figures, size_name))
    (out / FIGURES).write_text(json.dumps(figures, indent=2, default=str))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="reduced version (~5 minutes)")
    parser.add_argument("--out", default="runs/demo", help="where runs, evals and report.md go")
    parser.add_argument("--data", default="data/shapes", help="where the shapes world is generated")
    args = parser.parse_args(argv)
    from vlkit.cli import quiet_library_noise

    quiet_library_noise()
    logging.basicConfig(level=logging.WARNING)
    size_name = "fast" if args.fast else "full"
    out = Path(args.out + ("-fast" if args.fast else ""))
    figures = run_pipeline(out, Path(args.data + ("-fast" if args.fast else "")), SIZES[size_name])
    report = write_report(out, figures, size_name)
    from vlkit.demo_report import summary_table

    print("\n" + summary_table(figures))
    print(f"\nreport: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
