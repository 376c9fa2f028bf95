"""The connector bake-off: align + instruct on the shapes world with each connector, same budget.

    python bench/connectors.py                          # SmolLM2-135M-Instruct, ~20 min on 2 cores; writes docs/connectors.md
    python bench/connectors.py --llm DIR --instruct-steps 200   # another LLM, a bigger budget
    python bench/connectors.py --toy --llm DIR --vision DIR --data DIR --out FILE   # tiny models (tests)

Every connector gets the same vision tower, the same LLM, the same samples in the same order and
the same steps, through vlkit's own code: the shipped recipes `recipes/tiny/align_captions.yaml` and
`recipes/tiny/instruct.yaml` with overrides (`train_vlm`), then `evaluate_vlm` on the shapes
world's `test` split. Only `model.connector` differs.

The default LLM is the real SmolLM2-135M-Instruct at a budget that fits about 20 minutes on 2
CPU cores. A smaller stand-in was tried and dropped: SmolLM2 cut to its first 6 of 30 layers starts
instruct at loss 17 and answered no test question right after 24 + 48 steps, which ranks nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import REPO, command_line, machine, markdown_table
from parts import default_vision, shapes_data

from vlkit.cli import quiet_library_noise

DOCS_PAGE = REPO / "docs" / "connectors.md"
QUESTION_TYPES = ("colour", "shape", "count", "position", "existence")


def connector_configs(patches_per_side: int, toy: bool) -> dict[str, dict[str, Any]]:
    """One config per connector. Q-Former and resampler compress to half the patch count (at least 4)
    so that every connector's token count says something; pixel shuffle folds 2x2 patches."""
    compressed = max(4, patches_per_side**2 // 2)
    sizes = {"hidden_size": 64, "depth": 1, "num_heads": 2, "intermediate_size": 128} if toy else {
        "hidden_size": 256, "depth": 2, "num_heads": 4, "intermediate_size": 1024}
    return {
        "linear": {"type": "linear"},
        "mlp": {"type": "mlp", "depth": 2},
        "pixel_shuffle": {"type": "pixel_shuffle", "scale_factor": 2, "projection": "mlp"},
        "qformer": {"type": "qformer", "num_queries": compressed, **sizes, "cross_attention_frequency": 1},
        "resampler": {"type": "resampler", "num_latents": compressed, "depth": sizes["depth"]},
    }


def last_logged_loss(summary: dict[str, Any]) -> float | None:
    losses = [row["loss"] for row in summary.get("log_history", []) if "loss" in row]
    return float(losses[-1]) if losses else None


def run_connector(name: str, connector: dict, args, llm: str, vision: str, data: Path, workdir: Path) -> dict:
    """Train align then instruct with this connector, score VQA on test; return the table's figures."""
    from vlkit.evaluate import evaluate_vlm
    from vlkit.recipe import load_recipe
    from vlkit.train.checkpoint import load_run
    from vlkit.train.run import train_vlm

    common = [f"data.dir={data}", "data.val_file=null", "overwrite=true", "train.report_to=[]",
              f"train.batch_size={args.batch_size}", "train.save_steps=null", "train.logging_steps=4"]
    align = load_recipe(REPO / "recipes/tiny/align_captions.yaml", [
        *common, f"output_dir={workdir / name / 'align'}", f"model.vision={vision}", f"model.llm={llm}",
        f"model.connector={json.dumps(connector)}", f"train.max_steps={args.align_steps}"])
    align_dir = train_vlm(align)
    instruct = load_recipe(REPO / "recipes/tiny/instruct.yaml", [
        *common, f"output_dir={workdir / name / 'instruct'}", f"init_from={align_dir}",
        f"train.max_steps={args.instruct_steps}"])
    instruct_dir = train_vlm(instruct)

    summaries = {stage: json.loads((workdir / name / stage / "run_summary.json").read_text())
                 for stage in ("align", "instruct")}
    model, processor = load_run(instruct_dir)
    scored = evaluate_vlm(model, processor, data / "instruct_test.json", data, workdir / name / "eval",
                          max_samples=args.eval_images, model_name=name, scorer="data_tools.shapes_scoring:scorer_for")
    trainable = {stage: sum(p.numel() for n, p in model.named_parameters() if part(n) in stage_parts)
                 for stage, stage_parts in (("align", {"connector"}), ("instruct", {"connector", "lora"}))}
    return {
        "connector": name,
        "tokens": int(model.config.image_seq_length),
        "align_params": trainable["align"],
        "instruct_params": trainable["instruct"],
        "align_samples_per_s": summaries["align"]["final_metrics"].get("train_samples_per_second"),
        "instruct_samples_per_s": summaries["instruct"]["final_metrics"].get("train_samples_per_second"),
        "align_loss": last_logged_loss(summaries["align"]),
        "instruct_loss": last_logged_loss(summaries["instruct"]),
        "accuracy": {t: row["accuracy"] for t, row in scored["by_type"].items()},
        "questions": sum(row["n"] for row in scored["by_type"].values()),
    }


def part(parameter_name: str) -> str:
    if "lora_" in parameter_name:
        return "lora"
    return "connector" if parameter_name.startswith("connector.") else "other"


def mean_accuracy(row: dict) -> float:
    values = [row["accuracy"][t] for t in QUESTION_TYPES if t in row["accuracy"]]
    return sum(values) / len(values) if values else 0.0


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.scatter(row["tokens"], mean_accuracy(row), s=40)
        ax.annotate(row["connector"], (row["tokens"], mean_accuracy(row)), textcoords="offset points", xytext=(5, 4))
    ax.set_xlabel("image tokens per image")
    ax.set_ylabel(f"mean VQA accuracy ({len(QUESTION_TYPES)} question types)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(rows: list[dict], args, llm_label: str, vision: str, wall_s: float, png: Path, out: Path) -> str:
    def fmt(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    headers = ["connector", "image tokens", "trainable (align)", "trainable (instruct, + LoRA)",
               "align samples/s", "instruct samples/s", *QUESTION_TYPES, "mean", "final loss align / instruct"]
    table = markdown_table(headers, [[
        r["connector"], r["tokens"], f"{r['align_params']:,}", f"{r['instruct_params']:,}",
        fmt(r["align_samples_per_s"], ".2f"), fmt(r["instruct_samples_per_s"], ".2f"),
        *(fmt(r["accuracy"].get(t)) for t in QUESTION_TYPES), fmt(mean_accuracy(r)),
        f"{fmt(r['align_loss'])} / {fmt(r['instruct_loss'])}",
    ] for r in rows])
    ranked = sorted(rows, key=mean_accuracy, reverse=True)
    best, worst = ranked[0], ranked[-1]
    questions = rows[0]["questions"] if rows else 0
    return "\n".join([
        "# Connector bake-off",
        "",
        "Written by `bench/connectors.py`: align then instruct on the shapes world with each connector, "
        "the same tower, LLM, samples and steps; held-out VQA exact-match accuracy on `test` "
        f"({args.eval_images} images, {questions} questions per connector, so a difference under ~0.1 "
        "is within sampling noise).",
        "",
        f"Machine: {machine()}",
        "",
        f"Command: `{command_line()}` ({wall_s / 60:.1f} min for all five)",
        "",
        f"LLM: {llm_label}. Vision tower: `{Path(vision).name}` ({vision_note(vision)}). "
        f"Budget per connector: align {args.align_steps} steps, instruct {args.instruct_steps} steps (LoRA, "
        f"the tiny recipe's settings), batch {args.batch_size}.",
        "",
        table,
        "",
        f"![mean accuracy against image tokens]({png.name})",
        "",
        f"Best mean accuracy: {best['connector']} ({mean_accuracy(best):.3f}, {best['tokens']} tokens); "
        f"worst: {worst['connector']} ({mean_accuracy(worst):.3f}, {worst['tokens']} tokens).",
        "",
    ])


def tower_grid(vision: str) -> tuple[int, int]:
    """(image size, patch size) of a vision folder or CLIP folder."""
    config = json.loads((Path(vision) / "config.json").read_text())
    config = config.get("vision_config", config)
    return config["image_size"], config["patch_size"]


def vision_note(vision: str) -> str:
    image_size, patch_size = tower_grid(vision)
    side = image_size // patch_size
    return f"{image_size} px, {patch_size} px patches: {side * side} patches"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", default="smollm2-135m-instruct", help="an LLM name or folder")
    parser.add_argument("--vision", default=None, help="default: runs/tiny-clip, runs/demo/clip, or a random tiny tower")
    parser.add_argument("--data", default=None, help="a shapes world folder (default: data/shapes, or generated)")
    parser.add_argument("--connectors", default="linear,mlp,pixel_shuffle,qformer,resampler")
    parser.add_argument("--align-steps", type=int, default=16)
    parser.add_argument("--instruct-steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-images", type=int, default=60)
    parser.add_argument("--toy", action="store_true", help="quick settings for tests")
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--out", default=str(DOCS_PAGE), help="the markdown page written (PNG beside it)")
    args = parser.parse_args(argv)
    if args.toy:
        args.align_steps, args.instruct_steps, args.batch_size, args.eval_images = 2, 2, 4, 4
    quiet_library_noise()
    torch.manual_seed(0)

    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        vision = args.vision or default_vision(workdir)
        data = shapes_data(workdir, 32, args.data)
        llm, llm_label = args.llm, f"`{args.llm}`"
        image_size, patch_size = tower_grid(vision)
        configs = connector_configs(image_size // patch_size, args.toy)
        rows = []
        for name in args.connectors.split(","):
            print(f"\n=== {name}: align {args.align_steps} steps, instruct {args.instruct_steps} steps", flush=True)
            rows.append(run_connector(name, configs[name], args, llm, vision, data, workdir))
            print(f"=== {name}: {rows[-1]['tokens']} tokens, mean accuracy {mean_accuracy(rows[-1]):.3f}", flush=True)
    wall_s = time.time() - started

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot(rows, png, f"{llm_label.strip('`')}; align {args.align_steps} + instruct {args.instruct_steps} steps")
    page = render(rows, args, llm_label, vision, wall_s, png, out)
    out.write_text(page)
    print("\n" + page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
