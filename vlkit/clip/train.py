"""Stage 0 training: a `stage: clip` recipe -> a standard HF CLIP folder in `output_dir`.

`transformers.Trainer` runs the loop (optimizer, schedule, mixed precision, accumulation, DDP
under `torchrun` / `accelerate launch`); vlkit adds the contrastive loss (inside the model's
forward, see `ContrastiveModel`), the logit-scale clamp after every optimizer step, weight decay
only on matrices (open_clip: no decay on biases, norms, embeddings' 1-d params, the logit scale),
and the run dir: `recipe.yaml` (resolved), the CLIP folder (model + processor + tokenizer),
`run_summary.json`, `loss.png`, and, with `data.val_file`, `eval_val/metrics.json`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from vlkit.clip.augment import Augment
from vlkit.clip.data import ClipCollator, ClipPairDataset, captions_of, load_pairs
from vlkit.clip.loss import clamp_logit_scale
from vlkit.clip.model import (
    ContrastiveModel,
    build_clip_model,
    build_image_processor,
    build_tokenizer,
    save_clip_folder,
)
from vlkit.clip.recipe import ClipRecipe, load_clip_recipe
from vlkit.config import dump_recipe
from vlkit.errors import DataError

logger = logging.getLogger(__name__)


class LogitScaleClamp(TrainerCallback):
    """Clamp `logit_scale` to [0, ln(max_scale)] right after every optimizer step (CLIP paper)."""

    def __init__(self, logit_scale: torch.nn.Parameter, max_scale: float) -> None:
        self.logit_scale = logit_scale
        self.max_scale = max_scale

    def on_optimizer_step(self, args, state, control, **kwargs):
        clamp_logit_scale(self.logit_scale, self.max_scale)


class ClipTrainer(Trainer):
    """Trainer with open_clip's weight-decay split and the logit scale in the logs."""

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        # Decay weight matrices only: biases, norm gains, class embedding, logit scale/bias are < 2-d.
        return [name for name, parameter in model.named_parameters() if parameter.ndim >= 2]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        logs["logit_scale"] = round(float(model.clip.logit_scale.detach().exp()), 4)
        super().log(logs, start_time)


def _labels_file(recipe: ClipRecipe) -> Path | None:
    data = recipe.data
    if data.labels_file:
        return data.path(data.labels_file)
    for neighbour in (data.val_file, data.train_file):
        if neighbour:
            candidate = data.path(neighbour).parent / "zeroshot_labels.json"
            if candidate.is_file():
                return candidate
    return None


def _zero_shot_texts(labels_file: Path | None) -> list[str]:
    """Class names, filled templates and per-class prompts: words the word-level tokenizer should know."""
    if labels_file is None or not labels_file.is_file():
        return []
    spec = json.loads(labels_file.read_text())
    classes, templates = spec.get("classes", []), spec.get("templates", [])
    prompts = [text for texts in (spec.get("prompts") or {}).values() for text in texts]
    return [*classes, *(template.format(name) for name in classes[:1] for template in templates), *prompts]


def training_arguments(recipe: ClipRecipe, checkpoint_dir: Path) -> TrainingArguments:
    """The recipe's `train` section as `TrainingArguments`."""
    train = recipe.train
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        lr_scheduler_type=train.lr_scheduler,
        optim=train.optimizer,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_epsilon=train.adam_epsilon,
        max_grad_norm=train.max_grad_norm if train.max_grad_norm is not None else 0.0,
        seed=train.seed,
        bf16=train.bf16,
        fp16=train.fp16,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if train.save_steps else "no",
        save_steps=train.save_steps or 500,
        report_to=train.report_to or "none",
        dataloader_num_workers=train.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning needs an accelerator; on CPU torch warns
        dataloader_persistent_workers=train.num_workers > 0,
        dataloader_drop_last=True,  # every rank must gather equally sized feature blocks
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )


def plot_loss(log_history: list[dict[str, Any]], path: Path) -> None:
    """Training loss (and logit scale) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(entry["step"], entry["loss"], entry.get("logit_scale")) for entry in log_history if "loss" in entry]
    fig, ax = plt.subplots(figsize=(7, 4))
    if points:
        steps, losses, scales = zip(*points)
        ax.plot(steps, losses, color="tab:blue", label="train loss")
        if all(scale is not None for scale in scales):
            twin = ax.twinx()
            twin.plot(steps, scales, color="tab:orange", alpha=0.7, label="logit scale")
            twin.set_ylabel("logit scale", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("contrastive loss", color="tab:blue")
    ax.set_title("CLIP training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_clip(recipe: ClipRecipe) -> Path:
    """Train the recipe's CLIP model; returns the run dir, which is also a loadable CLIP folder."""
    started = time.time()
    run_dir = Path(recipe.output_dir)
    set_seed(recipe.train.seed)
    data = recipe.data

    rows = load_pairs(data.path(data.train_file), data.image_column, data.caption_column)
    if data.max_train_samples:
        rows = rows[: data.max_train_samples]
    if len(rows) < recipe.train.batch_size:
        raise DataError(
            f"{len(rows)} training pairs are fewer than one batch (train.batch_size={recipe.train.batch_size}); "
            "lower the batch size or add data"
        )
    labels_file = _labels_file(recipe)
    captions = [caption for row in rows for caption in captions_of(row, data.caption_column)]
    tokenizer = build_tokenizer(recipe, captions, _zero_shot_texts(labels_file))
    clip = build_clip_model(recipe, tokenizer)
    image_processor = build_image_processor(recipe, clip.config.vision_config)
    model = ContrastiveModel(clip, recipe.loss.type, recipe.loss.gather_with_grad, recipe.loss.siglip_bias_init)

    dataset = ClipPairDataset(
        rows,
        data.image_root_path(),
        image_processor,
        Augment(recipe.augment),
        data.image_column,
        data.caption_column,
        cache_images=data.cache_images,
        allow_outside_root=data.allow_images_outside_root,
    )
    args = training_arguments(recipe, run_dir / "checkpoints")
    if args.process_index == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("CLIP: %d pairs, %.2fM of %.2fM parameters trained", len(rows), trainable / 1e6, total / 1e6)

    trainer = ClipTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=ClipCollator(tokenizer, clip.config.text_config.max_position_embeddings),
        callbacks=[LogitScaleClamp(clip.logit_scale, recipe.loss.logit_scale_max)],
    )
    result = trainer.train()
    if not trainer.is_world_process_zero():
        return run_dir

    save_clip_folder(clip, tokenizer, image_processor, run_dir)
    if recipe.train.save_steps is None and (run_dir / "checkpoints").is_dir() and not any((run_dir / "checkpoints").iterdir()):
        (run_dir / "checkpoints").rmdir()
    plot_loss(trainer.state.log_history, run_dir / "loss.png")
    train_seconds = time.time() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary: dict[str, Any] = {
        "stage": "clip",
        "steps": trainer.state.global_step,
        "samples": trainer.state.global_step * args.train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "epochs": round(float(trainer.state.epoch or 0), 3),
        "world_size": args.world_size,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "wall_time_s": round(train_seconds, 1),
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
        "final_metrics": {
            "train_loss": losses[-1] if losses else None,
            "mean_train_loss": result.training_loss,
            "logit_scale": float(clip.logit_scale.detach().exp()),
        },
    }
    if data.val_file:
        from vlkit.clip.evaluate import evaluate_clip

        metrics = evaluate_clip(
            run_dir,
            data.path(data.val_file),
            data.image_root_path(),
            run_dir / "eval_val",
            labels_file=labels_file,
            batch_size=recipe.train.eval_batch_size,
            image_column=data.image_column,
            caption_column=data.caption_column,
        )
        summary["final_metrics"]["val"] = {
            **{k: v for k, v in metrics.get("zero_shot", {}).items() if k in ("top1", "top5", "heldout_classes_top1")},
            **{k: v for k, v in metrics["retrieval"].items() if "R@" in k or "mean_rank" in k},
        }
        summary["wall_time_with_eval_s"] = round(time.time() - started, 1)
    (run_dir / "run_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return run_dir


def run(args) -> int:
    """`vlkit train RECIPE [k=v ...] [--dry-run]` for a `stage: clip` recipe."""
    recipe = load_clip_recipe(args.recipe, list(getattr(args, "overrides", None) or []))
    if getattr(args, "dry_run", False):
        print(dump_recipe(recipe), end="")
        print(f"# dry run: would train a CLIP model into {recipe.output_dir}")
        return 0
    run_dir = train_clip(recipe)
    print(f"CLIP model written to {run_dir}")
    return 0
