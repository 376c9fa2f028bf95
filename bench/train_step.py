"""Align- and instruct-stage training steps/s: vlkit versus stock transformers Llava, side by side.

    python bench/train_step.py                    # SmolLM2-135M + tiny CLIP tower; appends to docs/performance.md
    python bench/train_step.py --llm DIR --vision DIR --data DIR --toy --no-append    # tiny models (tests)

Both sides get the same first `--batch-size` samples of the shapes world and the same weights (the
Llava model shares the vlkit model's tensors). One step = zero_grad, forward(labels), backward,
AdamW step, on:

- vlkit: its training path. Align: the tower's features come from the feature cache, samples are
  packed as the recipes pack on CPU (one flat row, attention run per sample: `vlkit.per_sample_sdpa`)
  with their common prefix run once through the frozen LLM in front of it, the LM head runs at
  labelled positions only, and so do the last decoder layer's query and output projections and MLP
  (`vlkit.last_layer`), frozen weights build no gradients (AdamW on the connector). Instruct: the same with LoRA on the LLM (its scale on the rank side,
  `vlkit.lora_scale`; the Llava side runs peft's own), packed flat (the prefix is shared only while
  the LLM is frozen), tower run every step (the default: `data.cache_vision_features` is off for
  instruct), AdamW on connector + LoRA.
- vlkit-compiled: the same with `train.compile` (vlkit/train/compile.py): the LLM's decoder layers
  compiled in place, on the batch the recipe then packs (rows: a compiled layer keeps sdpa); every
  other variant runs eager (`torch.compiler.set_stance("force_eager")`). Its compile falls in the
  warm-up round, and so does its peak RSS.
- vlkit-packed (align): the same without the shared prefix (packed flat only), to show what it buys.
- vlkit-rows (instruct): the same samples packed into rows no longer than the longest, padded, with
  sdpa's causal kernel per row (the layout of a GPU's sdpa and of `train.compile`): what one flat
  row with per-sample attention buys.
- Llava, plain: `LlavaForConditionalGeneration` as loaded (every weight requires grad), padded
  batch, forward(labels)/backward, AdamW on the projector (+ LoRA via peft for instruct).
- Llava, frozen: the same, with the tower and LLM set `requires_grad_(False)` by hand, as
  LLaVA's own training code does: a stricter reference than the plain loop.

MFU = the FLOPs the step must do (`parts.train_step_flops`, vlkit's work) / step time / the best
fp32 matmul rate measured in this process between rounds. Peak RSS: see bench/common.py (the
shared weights count in every row). Speed-ups are medians of per-round ratios; against the goals
the lowest and highest round's ratio are printed too. Each timed step follows `--settle` untimed
steps of the same variant (default 1), as in a training loop: right after another variant's step, a
stock Llava step measured up to 1.3x slower. aten ops (fwd+bwd): the operators one forward and backward
dispatch (`common.dispatched_operators`), what a GPU's host must queue each step whatever the batch; a
compiled variant's are not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from common import (
    REPO,
    add_run_options,
    dispatched_operators,
    interleaved,
    markdown_table,
    matmul_peak,
    median_ratio,
    publish,
    ratio_spread,
    start,
    verdict,
)
from parts import (
    default_vision,
    first_samples,
    llava_twin,
    lora_on_llava,
    shapes_data,
    train_step_flops,
    trainable,
)

GOALS = {"align": 2.0, "instruct": 1.3}
MFU_GOAL = 0.50

def recipe_lora() -> dict[str, float]:
    """The LoRA settings of recipes/tiny/instruct.yaml, so the benchmark times what the recipe trains."""
    from vlkit.recipe import load_recipe

    tune = load_recipe(REPO / "recipes/tiny/instruct.yaml").tune
    return {"r": tune.lora_r, "alpha": tune.lora_alpha, "dropout": tune.lora_dropout}


LORA = recipe_lora()
VARIANTS = ("vlkit", "vlkit-compiled", "vlkit-packed", "vlkit-rows", "llava-plain", "llava-frozen")


@dataclass
class Variant:
    model: torch.nn.Module
    batch: dict
    optimizer: torch.optim.Optimizer
    compiled: bool = False  # the others run eager even where vlkit-compiled compiled the shared layers
    attention: str | None = None  # the LLM's attention implementation for this variant (vlkit's shared model)

    def use_attention(self) -> None:
        """The variant's attention on the shared LLM: one config attribute, which every layer reads."""
        from vlkit.compat import set_attention_implementation

        if self.attention is not None:
            set_attention_implementation(self.model.language_model.config, self.attention)

    def step(self) -> None:
        self.use_attention()
        with contextlib.nullcontext() if self.compiled else torch.compiler.set_stance("force_eager"):
            self.optimizer.zero_grad(set_to_none=True)
            self.model(**self.batch).loss.backward()
            self.optimizer.step()

    def forward_backward(self) -> None:
        """The step without its optimizer: what a GPU's host queues per step beside a fused AdamW's few kernels
        (this CPU bench runs AdamW per tensor)."""
        self.use_attention()
        with torch.compiler.set_stance("force_eager"):
            self.optimizer.zero_grad(set_to_none=True)
            self.model(**self.batch).loss.backward()


class Bench:
    """Builds the models once; `stage(name)` returns its variants (instruct adds LoRA: run align first)."""

    def __init__(self, args, workdir: Path) -> None:
        from vlkit import build_vlm

        self.args, self.workdir = args, workdir
        vision = args.vision or default_vision(workdir)
        self.data = shapes_data(workdir, args.batch_size, args.data)
        torch.manual_seed(0)
        self.model, self.processor = build_vlm(vision=vision, llm=args.llm, connector={"type": "mlp", "depth": 2})
        self.model.use_loss_at_labels()  # as vlkit's training does
        self.sources = f"LLM {args.llm}, vision {Path(vision).name}, mlp connector, batch {args.batch_size}"
        # Llava twins before any LoRA: to_llava maps the plain weight names.
        self.twins = {}

    def twin(self, key: str):
        if key not in self.twins:
            self.twins[key] = llava_twin(self.model)
        return self.twins[key]

    def batches(self, stage: str, cache: bool) -> tuple[dict, dict, dict]:
        """(vlkit batch, Llava batch, facts for FLOPs, the other variants' batches) for the stage's samples."""
        from vlkit.compat import attention_implementation
        from vlkit.data import ConversationDataset, VlkitCollator
        from vlkit.data.packing import collator_packing
        from vlkit.features import cache_features_for

        samples = first_samples(self.data, stage, self.args.batch_size)
        pad = self.processor.tokenizer.pad_token_id
        plain = ConversationDataset(samples, self.processor, self.data, max_length=None)
        items = [plain[i] for i in range(len(plain))]
        fast = ConversationDataset(samples, self.processor, self.data, max_length=None)
        if cache:
            cache_features_for(self.model, self.processor.image_processor, [fast], home=self.workdir, progress=False)
        # As the recipes collate on CPU: packed (flat, the LLM switched to per-sample sdpa), or (align: the
        # LLM is frozen) the shared prefix once, whichever takes fewer token slots; train.compile packs rows.
        share = self.processor.image_token_id if stage == "align" else None
        pack = collator_packing(True, self.model, on_cpu=True)
        self.attention = attention_implementation(self.model.language_model.config)
        fast_items = [fast[i] for i in range(len(fast))]
        vlkit_batch = VlkitCollator(pad, pack=pack, share_prefix_before=share)(fast_items)
        others = {
            "compiled": VlkitCollator(pad, pack=True, share_prefix_before=share)(fast_items),
            "packed": VlkitCollator(pad, pack=pack)(fast_items),  # what the prefix buys
            "rows": VlkitCollator(pad, pack=True)(fast_items),  # what one flat row buys
        }
        prefix = vlkit_batch["prefix_ids"].shape[1] if "prefix_ids" in vlkit_batch else 0
        llava_batch = VlkitCollator(pad)(items)
        facts = {
            "lengths": [len(item["input_ids"]) for item in items],
            "supervised": int((llava_batch["labels"][:, 1:] != -100).sum()),
            "images": int(llava_batch["pixel_values"].shape[0]),
            "padded_tokens": int(llava_batch["input_ids"].numel()),
            "vlkit_tokens": prefix + int(vlkit_batch["input_ids"].numel()),
            "shared_prefix": prefix,
            "rows_tokens": int(others["rows"]["input_ids"].numel()),
        }
        return vlkit_batch, llava_batch, facts, others

    def stage(self, stage: str, names=VARIANTS) -> tuple[dict[str, Variant], dict]:
        from vlkit.config import TuneSection
        from vlkit.train.stages import apply_adapters, set_trainable

        cache = stage == "align"  # the recipe default: on for align, off for instruct
        twins = {name: self.twin(f"{stage}/{name}") for name in names if name.startswith("llava")}
        tune = TuneSection() if stage == "align" else TuneSection(
            llm="lora", lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"])
        apply_adapters(self.model, tune)
        set_trainable(self.model, tune)
        for name, llava in twins.items():
            llava.train()
            llava.requires_grad_(name == "llava-plain")  # plain: every weight as loaded requires grad
            llava.model.multi_modal_projector.requires_grad_(True)
            if stage == "instruct":
                lora_on_llava(llava, LORA["r"], LORA["alpha"], LORA["dropout"])  # freezes the LLM's base weights
        vlkit_batch, llava_batch, facts, others = self.batches(stage, cache)
        variants = {}

        def vlkit_variant(batch: dict, attention: str, compiled: bool = False) -> Variant:
            return Variant(self.model, batch, torch.optim.AdamW(trainable(self.model), lr=1e-4), compiled, attention)

        if "vlkit" in names:
            variants["vlkit"] = vlkit_variant(vlkit_batch, self.attention)
        if "vlkit-compiled" in names:
            from vlkit.train.compile import compile_decoder_layers

            # As train.compile does in the recipes: the shared prefix (align) passes the decoder a cache.
            compile_decoder_layers(self.model, around_cache="prefix_ids" in others["compiled"])
            variants["vlkit-compiled"] = vlkit_variant(others["compiled"], "sdpa", compiled=True)
        if "vlkit-packed" in names and stage == "align":
            variants["vlkit-packed"] = vlkit_variant(others["packed"], self.attention)
        if "vlkit-rows" in names and stage == "instruct":
            variants["vlkit-rows"] = vlkit_variant(others["rows"], "sdpa")
        for name, llava in twins.items():
            if name == "llava-plain":
                params = [*llava.model.multi_modal_projector.parameters(),
                          *(p for n, p in llava.named_parameters() if "lora_" in n)]
            else:
                params = trainable(llava)
            variants[name] = Variant(llava, llava_batch, torch.optim.AdamW(params, lr=1e-4))
        if "vlkit" in names and twins:
            self.check_same_function(variants, tune)
        facts["flops"] = train_step_flops(self.model, facts["lengths"], facts["supervised"], facts["images"],
                                          tower_runs=not cache, shared_prefix=facts["shared_prefix"])
        facts["lora_params"] = sum(p.numel() for n, p in self.model.named_parameters() if "lora_" in n)
        for name, llava in twins.items():
            assert sum(p.numel() for n, p in llava.named_parameters() if "lora_" in n) == facts["lora_params"], name
        return variants, facts

    @staticmethod
    def check_same_function(variants: dict[str, Variant], tune) -> None:
        """Before timing: every variant gives the same loss on its batch (same weights, same samples)."""
        losses = {}
        for name, variant in variants.items():
            variant.use_attention()
            modes = {m: m.training for m in variant.model.modules()}
            variant.model.eval()  # no LoRA dropout in the comparison
            with torch.no_grad():
                losses[name] = float(variant.model(**variant.batch).loss)
            for module, mode in modes.items():
                module.training = mode
        reference = losses["vlkit"]
        for name, loss in losses.items():
            if abs(loss - reference) > 1e-3 * max(1.0, abs(reference)):
                raise SystemExit(f"benchmark invalid: {name} loss {loss:.6f} != vlkit loss {reference:.6f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--vision", default=None, help="default: runs/tiny-clip, runs/demo/clip, or a random tiny tower")
    parser.add_argument("--data", default=None, help="a shapes world folder (default: data/shapes, or generated)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stages", default="align,instruct")
    parser.add_argument("--settle", type=int, default=1,
                        help="untimed steps of a variant right before each timed one (bench/common.py interleaved)")
    parser.add_argument("--toy", action="store_true", help="quick settings for tests (1 round)")
    add_run_options(parser)
    args = parser.parse_args(argv)
    start(args)
    if args.toy:
        args.rounds = 1
    torch.manual_seed(0)
    stages = [s for s in args.stages.split(",") if s]
    rows, lines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args, Path(tmp))
        for stage in stages:
            variants, facts = bench.stage(stage)
            peaks: list[float] = [matmul_peak()]
            rss: dict[str, float] = {}
            times = interleaved({name: v.step for name, v in variants.items()}, rounds=args.rounds,
                                between=lambda: peaks.append(matmul_peak()), peak_rss=rss,  # noqa: B023
                                settle=args.settle)
            peak = statistics.median(peaks)
            flops = sum(facts["flops"].values())
            for name, variant in variants.items():
                seconds = statistics.median(times[name])
                speedup = median_ratio(times[name], times["vlkit"])
                # Counted after the timing; a compiled variant's kernels are not aten calls one by one.
                operators = "-" if variant.compiled else f"{dispatched_operators(variant.forward_backward):,}"
                rows.append([stage, name, f"{seconds:.3f}", f"{1 / seconds:.2f}",
                             "1.00 (ref.)" if name == "vlkit" else f"{speedup:.2f}x",
                             f"{100 * flops / seconds / peak:.1f}%", f"{rss[name]:.0f}", operators])
            plain = median_ratio(times["llava-plain"], times["vlkit"])
            frozen = median_ratio(times["llava-frozen"], times["vlkit"])
            mfu = flops / statistics.median(times["vlkit"]) / peak
            lines.append(f"- {stage}: vlkit vs plain Llava loop {verdict(plain, GOALS[stage])} "
                         f"({ratio_spread(times['llava-plain'], times['vlkit'])}); vs hand-frozen Llava {frozen:.2f}x")
            if "vlkit-compiled" in times:
                compiled = median_ratio(times["llava-plain"], times["vlkit-compiled"])
                lines.append(f"- {stage}: train.compile vs eager: "
                             f"{median_ratio(times['vlkit'], times['vlkit-compiled']):.2f}x; compiled vs plain Llava "
                             f"{verdict(compiled, GOALS[stage])} "
                             f"({ratio_spread(times['llava-plain'], times['vlkit-compiled'])})")
            if "vlkit-packed" in times:
                lines.append(f"- {stage}: the shared prefix vs packing only: "
                             f"{median_ratio(times['vlkit-packed'], times['vlkit']):.2f}x")
            if "vlkit-rows" in times:
                rows_tokens = facts["rows_tokens"]
                lines.append(f"- {stage}: one flat row, attention per sample ({facts['vlkit_tokens']} token slots) vs "
                             f"packed rows ({rows_tokens}): {median_ratio(times['vlkit-rows'], times['vlkit']):.2f}x")
            if stage == "instruct":
                lines.append(f"- instruct MFU (vlkit): {verdict(100 * mfu, 100 * MFU_GOAL, '%')}")
            parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in facts["flops"].items() if v)
            lines.append(f"  ({stage}: {len(facts['lengths'])} samples, {sum(facts['lengths'])} tokens; padded batch "
                         f"{facts['padded_tokens']} token slots, vlkit's {facts['vlkit_tokens']} "
                         f"({facts['shared_prefix']}-token prefix shared); "
                         f"{facts['supervised']} labelled; GFLOP/step: {parts}; matmul peak {peak / 1e9:.1f} GFLOP/s)")
    table = markdown_table(["stage", "variant", "s/step", "steps/s", "vlkit speed-up", "MFU", "peak RSS MiB",
                            "aten ops (fwd+bwd)"], rows)
    body = f"{bench.sources}, {args.rounds} interleaved rounds.\n\n{table}\n\n" + "\n".join(lines)
    publish("Training step: vlkit vs stock Llava", body, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
