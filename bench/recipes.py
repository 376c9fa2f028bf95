"""The shipped tiny recipes through `vlkit train` at GPU size: samples/s per stage, and where one step's time goes.

    python bench/recipes.py                       # GPU: CLIP, align (the visual_words reader), LoRA instruct on SmolLM2
    python bench/recipes.py --instruct-batch 512 --no-fit-batch --steps 60   # exactly batch 512
    python bench/recipes.py --stages instruct --keep runs/bench --compile   # again, with train.compile
    python bench/recipes.py --stages instruct --keep runs/bench --flat      # again, padding-free (flex attention)
    python bench/recipes.py --stages instruct --keep runs/bench --set model.dtype=bfloat16   # any recipe override
    python bench/recipes.py --toy --llm DIR --vision DIR --data DIR --no-append   # CPU, tiny models (tests)

Each stage is `recipes/tiny/<stage>.yaml` as `make demo` runs it (vlkit.demo.stage_recipe), with a
batch size for the GPU, `--steps` steps and `train.profile_step` set, so its run folder gets
`profile.txt` (the step's wall time, the GPU's busy share, the top operators; vlkit/train/profile.py).
The instruct batch is fitted to the GPU: `--instruct-batch` is the most tried, with
`train.auto_find_batch_size` (0.9x after each out-of-memory step); the table gives the batch trained at.
A shapes world of `--images` train images is generated unless `--data` names one. `--vision` skips the
CLIP stage and aligns on that tower instead.

samples/s (steady): the median of the intervals `train.logging_steps` apart after the first, as the
progress bar shows them (the Trainer stages). samples/s (whole run): the samples over the stage's
wall time, start-up, tower features and saving included. Peak memory: run_summary.json's
`peak_memory_gib`, the stage's peak GPU memory (on CPU the process's peak resident memory): what a larger
`--instruct-batch` must fit. Goals on an H100/H200-class GPU (issue 17): instruct >= 1,000 samples/s,
align >= 3,000.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import add_run_options, markdown_table, publish, start, verdict

GOALS = {"instruct": 1000.0, "align": 3000.0}
STAGES = ("clip", "align", "instruct")
TOP_OPERATORS_SHOWN = 12


def stage_overrides(args, stage: str, data_dir: Path, out: Path) -> list[str]:
    """The overrides of the shipped recipe for this bench: data, batch, steps, profile, no reports."""
    batch = {"clip": args.clip_batch, "align": args.align_batch, "instruct": args.instruct_batch}[stage]
    common = [f"data.dir={data_dir}", f"train.batch_size={batch}", f"train.max_steps={args.steps}",
              f"train.profile_step={args.profile_step}", f"train.logging_steps={args.logging_steps}",
              "train.report_to=[]"]
    if stage == "clip":
        return common
    common += ["data.max_val_samples=8"]
    if stage == "align":
        vision = args.vision or out / "clip"
        return [*common, f"model.vision={vision}", f"model.llm={args.llm}"]
    # The tiny align stage is the visual_words reader, outside the LLM: only instruct has layers to compile.
    flat = ["data.packing=flat", "model.attn_implementation=flex_attention"] if args.flat else []
    fit = ["train.auto_find_batch_size=true"] if args.fit_batch else []
    return [*common, f"init_from={out / 'align'}", *(["train.compile=true"] if args.compile else []), *flat, *fit,
            *args.set]


def steady_samples_per_s(summary: dict) -> float | None:
    """The median samples/s of the logged intervals after the first (None: the stage logs none)."""
    rates = [entry["samples_per_s"] for entry in summary.get("log_history", []) if "samples_per_s" in entry]
    return statistics.median(rates[1:]) if len(rates) > 1 else None


def profile_head(run_dir: Path, rows: int) -> list[str]:
    """The first line of the stage's profile.txt and its table's first `rows` operators."""
    path = run_dir / "profile.txt"
    if not path.is_file():
        return ["(no profile: the stage ended before its profiled step)"]
    lines = path.read_text().splitlines()
    table_start = next((i for i, line in enumerate(lines) if line.startswith("---")), len(lines))
    return [lines[0], *lines[table_start : table_start + 3 + rows]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--vision", default=None, help="a vision tower to align on (skips the CLIP stage)")
    parser.add_argument("--data", default=None, help="a shapes world folder (default: one generated)")
    parser.add_argument("--images", type=int, default=4000, help="train images of the generated world")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--profile-step", type=int, default=30)
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument("--clip-batch", type=int, default=1024)
    parser.add_argument("--align-batch", type=int, default=1024)
    # On one H200 the instruct stage trained 236 samples/s at batch 64 and 648 at 256, the GPU busy for 15% and 44%
    # of a step (docs/performance.md): the host's per-step work barely grew with the batch, the GPU's did.
    parser.add_argument("--instruct-batch", type=int, default=1024, help="the instruct batch, or the most tried")
    parser.add_argument("--fit-batch", action=argparse.BooleanOptionalAction, default=True,
                        help="train.auto_find_batch_size on the instruct stage (--no-fit-batch: exactly --instruct-batch)")
    parser.add_argument("--compile", action="store_true", help="train.compile on the instruct stage")
    parser.add_argument("--flat", action="store_true",
                        help="instruct with data.packing: flat and flex attention (GPU: flex has no backward on CPU)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one more override of the instruct stage (repeatable), e.g. model.dtype=bfloat16")
    parser.add_argument("--keep", default=None, help="write the runs here instead of a temporary folder")
    parser.add_argument("--toy", action="store_true", help="a few small steps on CPU (tests)")
    add_run_options(parser)
    args = parser.parse_args(argv)
    if args.flat and not torch.cuda.is_available():
        raise SystemExit("--flat needs a GPU: torch's flex attention has no backward pass on CPU")
    if args.toy:
        args.steps, args.profile_step, args.logging_steps = 4, 3, 1
        args.clip_batch, args.align_batch, args.instruct_batch = 8, 8, 2
    elif not torch.cuda.is_available():
        raise SystemExit("no GPU: bench/recipes.py sizes the recipes for a GPU; use --toy to check it on CPU")
    start(args)
    from vlkit.demo import stage_recipe, train_stage

    stages = [s for s in args.stages.split(",") if s]
    if args.vision:
        stages = [s for s in stages if s != "clip"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    rows, lines, profiles = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or tmp)
        data_dir = Path(args.data) if args.data else out / "shapes"
        if not args.data and not (data_dir / "world.json").is_file():  # a kept folder's world is reused
            from data_tools.shapes import generate

            generate(data_dir, n_train=args.images, n_val=64, n_test=64, seed=0)
        for stage in stages:
            recipe = stage_recipe(f"{stage}.yaml", out / stage, stage_overrides(args, stage, data_dir, out))
            train_stage(recipe)
            summary = json.loads((out / stage / "run_summary.json").read_text())
            steady = steady_samples_per_s(summary)
            whole = summary["samples"] / summary["wall_time_s"] if summary.get("wall_time_s") else None
            peak = summary.get("peak_memory_gib", {})
            memory = peak.get("accelerator") if peak.get("accelerator") is not None else peak.get("host_rss")
            # The batch trained at: less than the recipe's where auto_find_batch_size ran out of memory first.
            batch = summary.get("batch_size") or recipe.train.batch_size
            fitted = f" (of {recipe.train.batch_size})" if batch != recipe.train.batch_size else ""
            rows.append([stage, str(summary["steps"]), f"{batch}{fitted}",
                         f"{steady:.1f}" if steady else "-", f"{whole:.1f}" if whole else "-",
                         f"{memory:.2f}" if memory is not None else "-"])
            if stage in GOALS and steady is not None and not args.toy:
                lines.append(f"- {stage}: {verdict(steady, GOALS[stage], ' samples/s')}")
            profiles += [f"**{stage}** (`{out / stage / 'profile.txt'}`):", "", "```",
                         *profile_head(out / stage, TOP_OPERATORS_SHOWN), "```", ""]
    # The peak memory a larger batch must fit: the GPU's for the stage, or the process's resident memory on CPU.
    table = markdown_table(["stage", "steps", "batch", "samples/s (steady)", "samples/s (whole run)",
                            "peak GPU memory (GiB)" if torch.cuda.is_available() else "peak host RSS (GiB)"], rows)
    body = "\n".join([f"{device}; LLM {args.llm}; {args.steps} steps a stage, step {args.profile_step} profiled"
                      f"{'; instruct with train.compile' if args.compile else ''}"
                      f"{'; instruct flat-packed with flex attention' if args.flat else ''}"
                      f"{''.join(f'; instruct {override}' for override in args.set)}.", "",
                      table, "", *lines, "", *profiles])
    publish("Tiny recipes at GPU size: samples/s and one step's profile", body, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
