"""Stage 0 training (CLIP): a `stage: clip` recipe -> a standard HF CLIP folder in `output_dir`.

`transformers.Trainer` runs the loop (optimizer, schedule, mixed precision, accumulation, DDP
under `torchrun` / `accelerate launch`); vlkit adds the contrastive loss (inside the model's
forward, see `ContrastiveModel`), the logit-scale clamp after every optimizer step, weight decay
only on matrices (open_clip: no decay on biases, norms, embeddings' 1-d params, the logit scale),
and the run dir: `recipe.yaml` (resolved), the CLIP folder (model + processor + tokenizer),
`run_summary.json`, `loss.png`, and, with `data.val_file`, `eval_val/metrics.json`.
Checkpoints (`train.save_steps`) hold the whole model, the optimizer, the RNG states and the tokenizer;
`resume=true` continues the newest (`checkpoint_to_resume`, shared with the VLM stages).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from vlkit.clip.augment import Augment
from vlkit.clip.data import ClipCollator, ClipPairDataset, captions_of, check_pairs, read_pairs
from vlkit.clip.loss import clamp_logit_scale
from vlkit.clip.model import (
    ContrastiveModel,
    build_clip_model,
    build_image_processor,
    build_tokenizer,
    save_clip_folder,
)
from vlkit.clip.recipe import ClipRecipe
from vlkit.config import dump_recipe
from vlkit.errors import DataError
from vlkit.train.arguments import training_arguments
from vlkit.train.output_dir import checkpoint_to_resume, claimed_output_dir
from vlkit.train.plots import plot_loss
from vlkit.train.profile import peak_memory_gib, profile_callbacks, reset_peak_memory
from vlkit.train.trainer import (
    StagedCheckpoints,
    ThroughputCallback,
    samples_per_step,
    trained_within_memory,
)

logger = logging.getLogger(__name__)


class LogitScaleClamp(TrainerCallback):
    """Clamp `logit_scale` to [0, ln(max_scale)] right after every optimizer step (CLIP paper)."""

    def __init__(self, logit_scale: torch.nn.Parameter, max_scale: float) -> None:
        self.logit_scale = logit_scale
        self.max_scale = max_scale

    def on_optimizer_step(self, args, state, control, **kwargs):
        clamp_logit_scale(self.logit_scale, self.max_scale)


class ClipTrainer(StagedCheckpoints):
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


def clip_training_arguments(recipe: ClipRecipe, checkpoint_dir: Path) -> TrainingArguments:
    """The shared `train` keys (`vlkit.train.arguments`) plus what is CLIP's own."""
    train = recipe.train
    return training_arguments(
        train,
        checkpoint_dir,
        optim=train.optimizer,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_epsilon=train.adam_epsilon,
        fp16=train.fp16,
        logging_first_step=True,
        dataloader_drop_last=True,  # every rank must gather equally sized feature blocks
        use_cpu=not torch.cuda.is_available(),
    )


@dataclass
class ClipParts:
    """What a CLIP run trains and on what: built by `build_parts` before the Trainer starts."""

    tokenizer: PreTrainedTokenizerBase
    clip: PreTrainedModel
    image_processor: Any
    model: ContrastiveModel
    train_set: ClipPairDataset
    labels_file: Path | None


def build_parts(recipe: ClipRecipe, tokenizer_folder: str | None = None) -> ClipParts:
    """Pairs checked -> tokenizer (from the captions trained on, or the one a resumed checkpoint holds) -> model ->
    image processor -> dataset."""
    data = recipe.data
    pairs = read_pairs(data.path(data.train_file), data.image_column, data.caption_column)
    problems = check_pairs(pairs, data.image_root_path(), data.allow_images_outside_root)
    usable = [index for index, problem in enumerate(problems) if problem is None][: data.max_train_samples]
    columns = ["caption"]
    augment = recipe.augment
    for key, column in (("colourless_caption_column", augment.colourless_caption_column),
                        ("caption_swap_column", augment.caption_swap_column)):
        if column and column not in pairs.column_names:
            raise DataError(f"augment.{key}: {data.train_file} has no column '{column}' (columns: {pairs.column_names})")
        if column and column not in columns:
            columns.append(column)
    # The tokenizer learns every caption it will be given, the other columns' included.
    captions = [caption for row in pairs.select(usable).select_columns(columns)
                for column in columns for caption in captions_of(row, column)]
    labels_file = _labels_file(recipe)
    tokenizer = build_tokenizer(recipe, captions, _zero_shot_texts(labels_file), folder=tokenizer_folder)
    clip = build_clip_model(recipe, tokenizer)
    image_processor = build_image_processor(recipe, clip.config.vision_config)
    model = ContrastiveModel(clip, recipe.loss.type, recipe.loss.gather_with_grad, recipe.loss.siglip_bias_init,
                             recipe.loss.same_caption_positive)
    train_set = ClipPairDataset(
        pairs,
        data.image_root_path(),
        image_processor,
        Augment(recipe.augment),
        cache_images=data.cache_images,
        on_bad_sample=data.on_bad_sample,
        allow_images_outside_root=data.allow_images_outside_root,
        problems=problems,
    )
    if data.max_train_samples:
        train_set.samples = train_set.samples.select(range(min(data.max_train_samples, len(train_set.samples))))
    if len(train_set) < recipe.train.batch_size:
        raise DataError(
            f"{len(train_set)} usable training pairs are fewer than one batch (train.batch_size={recipe.train.batch_size}; "
            f"{train_set.summary()}); lower the batch size or add data"
        )
    return ClipParts(tokenizer, clip, image_processor, model, train_set, labels_file)


def run_summary(parts: ClipParts, trainer: Trainer, result: Any, started: float,
                resumed_from: str | None = None) -> dict[str, Any]:
    """run_summary.json: the VLM stages' keys (steps, samples, skipped_* by reason, log) plus CLIP's."""
    args, state, model = trainer.args, trainer.state, parts.model
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    return {
        "stage": "clip",
        "steps": state.global_step,
        "samples": state.global_step * samples_per_step(args, state),
        "batch_size": state.train_batch_size,  # per process; less than the recipe's where auto-fitted
        "epochs": round(float(state.epoch or 0), 3),
        "world_size": args.world_size,
        "resumed_from": resumed_from,
        "train_samples_available": len(parts.train_set),
        "skipped_samples": parts.train_set.num_skipped,
        "skipped_by_reason": parts.train_set.skipped,
        "skipped_ids": parts.train_set.skipped_ids,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "wall_time_s": round(time.time() - started, 1),
        "peak_memory_gib": peak_memory_gib(),
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
        "final_metrics": {
            "train_loss": losses[-1] if losses else None,
            "mean_train_loss": result.training_loss,
            "logit_scale": float(parts.clip.logit_scale.detach().exp()),
        },
        "log_history": state.log_history,
    }


def evaluate_val(recipe: ClipRecipe, run_dir: Path, labels_file: Path | None) -> dict[str, float]:
    """Zero-shot and retrieval on `data.val_file` (full metrics in eval_val/); the headline numbers."""
    from vlkit.clip.evaluate import evaluate_clip

    data = recipe.data
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
    return {
        **{k: v for k, v in metrics.get("zero_shot", {}).items() if k in ("top1", "top5", "heldout_classes_top1")},
        **{k: v for k, v in metrics["retrieval"].items() if "R@" in k or "mean_rank" in k},
    }


# What a CLIP checkpoint holds when complete: the Trainer's state, the whole model, the tokenizer trained on the
# captions (a resumed run reads it back rather than training another).
CHECKPOINT_MARKS = ("trainer_state.json", "model.safetensors", "tokenizer_config.json")


def checkpoint_to_resume_clip(recipe: ClipRecipe) -> str | None:
    """The checkpoint the run continues from (None: it starts afresh); a finished or interrupted run in output_dir
    is replaced only with overwrite=true (the align and instruct runs built on a CLIP tower check its weights)."""
    return checkpoint_to_resume(Path(recipe.output_dir), recipe.resume, recipe.overwrite, CHECKPOINT_MARKS)


def train_clip(recipe: ClipRecipe) -> Path:
    """Train the recipe's CLIP model; returns the run dir, which is also a loadable CLIP folder."""
    started = time.time()
    reset_peak_memory()
    resume_from = checkpoint_to_resume_clip(recipe)
    with claimed_output_dir(Path(recipe.output_dir), dump_recipe(recipe), recipe.overwrite and not resume_from) as run_dir:
        set_seed(recipe.train.seed)
        parts = build_parts(recipe, tokenizer_folder=resume_from)
        args = clip_training_arguments(recipe, run_dir / "checkpoints")
        trainable = sum(p.numel() for p in parts.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in parts.model.parameters())
        logger.info("CLIP: %d pairs, %.2fM of %.2fM parameters trained", len(parts.train_set), trainable / 1e6,
                    total / 1e6)
        trainer = ClipTrainer(
            model=parts.model,
            args=args,
            train_dataset=parts.train_set,
            processing_class=parts.tokenizer,  # saved into each checkpoint, for a resumed run to read back
            data_collator=ClipCollator(parts.tokenizer, parts.clip.config.text_config.max_position_embeddings),
            callbacks=[LogitScaleClamp(parts.clip.logit_scale, recipe.loss.logit_scale_max),
                       ThroughputCallback(),
                       *profile_callbacks(recipe.train, run_dir)],
        )
    with trained_within_memory(trainer, "train.bf16: true, smaller vision and text configs"):
        result = trainer.train(resume_from_checkpoint=resume_from)
    if not trainer.is_world_process_zero():
        return run_dir

    save_clip_folder(parts.clip, parts.tokenizer, parts.image_processor, run_dir)
    checkpoints = run_dir / "checkpoints"
    if recipe.train.save_steps is None and checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    plot_loss(trainer.state.log_history, run_dir / "loss.png", title=f"clip: {recipe.output_dir}", secondary="logit_scale")
    summary = run_summary(parts, trainer, result, started, resume_from)
    if parts.train_set.num_skipped:
        logger.warning("skipped %d bad pair(s): %s", parts.train_set.num_skipped, parts.train_set.summary())
    if recipe.data.val_file:
        summary["final_metrics"]["val"] = evaluate_val(recipe, run_dir, parts.labels_file)
        summary["wall_time_with_eval_s"] = round(time.time() - started, 1)
    (run_dir / "run_summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return run_dir
