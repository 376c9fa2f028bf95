"""One `TrainingArguments` builder for every stage (clip, align, instruct).

The recipe keys every stage shares (`vlkit.config.BaseTrainSection`) become the same Trainer
settings here, whatever the stage; a stage passes only what is its own (CLIP's optimizer
settings, the VLM stages' evaluation and checkpoint rotation) as keyword arguments.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.training_args import ParallelMode

from vlkit.compat import cpu_has_native_bf16
from vlkit.config import BaseTrainSection

logger = logging.getLogger(__name__)


def dataloader_workers(requested: int | None) -> int:
    """The recipe's `num_workers`, or by default: none without CUDA, else up to 4 per GPU from the free cores."""
    if requested is not None:
        return requested
    if not torch.cuda.is_available():
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores // max(1, torch.cuda.device_count()) - 1))  # one core stays with the training


def resolve_bf16(requested: bool | str, on_cpu: bool) -> bool:
    """`train.bf16` as the Trainer takes it: `auto` is bf16 only where the hardware computes it natively.

    An AVX2-only CPU (e.g. AMD Zen 3) emulates bf16: one align step of recipes/tiny/align_captions.yaml took ~185 s
    there against 6.3 s in float32, while AVX512-BF16 cores run it ~1.8x faster than float32.
    """
    if requested == "auto":
        if on_cpu:
            native = cpu_has_native_bf16(unknown=False)
            if not native:
                logger.info("train.bf16=auto: this CPU has no native bf16 (AVX512-BF16 or AMX); training in float32")
            return native
        # Natively: torch counts a GPU that only emulates bf16 (before Ampere: V100, T4) as supporting it.
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if requested and on_cpu and not cpu_has_native_bf16():
        logger.warning("train.bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is emulated and ~30x slower "
                       "than float32: set train.bf16=auto or false")
    return bool(requested)


def training_arguments(train: BaseTrainSection, output_dir: str | Path, **stage_specific: Any) -> TrainingArguments:
    """`TrainingArguments` from a recipe's `train` section; `stage_specific` adds or replaces arguments (an
    `accelerator_config` adds to or replaces keys of the shared one)."""
    workers = dataloader_workers(train.num_workers)
    on_cpu = not torch.accelerator.is_available()  # a CUDA build on a machine without a GPU counts as CPU
    bf16 = resolve_bf16(train.bf16, on_cpu)
    shared: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": train.batch_size,
        "auto_find_batch_size": train.auto_find_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "learning_rate": train.learning_rate,
        "weight_decay": train.weight_decay,
        "num_train_epochs": train.epochs,
        "max_steps": train.max_steps or -1,
        "warmup_steps": train.warmup(),  # transformers reads a value < 1 as a fraction of all steps
        "lr_scheduler_type": train.lr_scheduler,
        "max_grad_norm": train.max_grad_norm if train.max_grad_norm is not None else 0.0,
        "logging_steps": train.logging_steps,
        # The filter reads every step's loss on the host, which on a GPU waits for the step's backward before the
        # optimizer and the next batch are queued. Off, a non-finite loss shows in the logged mean.
        "logging_nan_inf_filter": False,
        "save_strategy": "steps" if train.save_steps else "no",
        "save_steps": train.save_steps or 500,
        "save_total_limit": train.save_total_limit,
        "seed": train.seed,
        "bf16": bf16,
        # bf16 on a machine without an accelerator is CPU autocast (on AVX512-BF16 cores ~1.3x a SmolLM2 instruct
        # step, ~1.8x an align step: docs/performance.md); transformers accepts it only with use_cpu.
        "use_cpu": bf16 and on_cpu,
        "report_to": train.report_to or "none",
        "dataloader_num_workers": workers,
        "dataloader_persistent_workers": workers > 0,  # not restarted every epoch
        "dataloader_pin_memory": torch.cuda.is_available(),  # pinning needs an accelerator; on CPU torch warns
        # A pinned batch's copy to the GPU is queued, not waited for (the host runs on to the forward).
        "accelerator_config": {"non_blocking": torch.cuda.is_available()},
        "remove_unused_columns": False,  # the collators take the columns they need
        "disable_tqdm": False,
    }
    accelerator_config = {**shared["accelerator_config"], **(stage_specific.pop("accelerator_config", None) or {})}
    args = TrainingArguments(**{**shared, **stage_specific, "accelerator_config": accelerator_config})
    recipe_precision(args)
    one_gpu_without_a_launcher(args)
    return args


def launched_processes() -> int:
    """How many processes a launcher (accelerate, torchrun) started for this run (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_mixed_precision() -> str:
    """The mixed precision an accelerate launch config asks for ("no" without one)."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


def recipe_precision(args: TrainingArguments) -> None:
    """The recipe decides mixed precision: transformers starts from the launch config's (ACCELERATE_MIXED_PRECISION)
    and replaces it only when bf16 or fp16 is on, so `mixed_precision: bf16` in an accelerate config would train
    a `train.bf16: false` recipe under bf16 autocast while its run folder says float32. (Under DeepSpeed the launch
    config's precision is DeepSpeed's own; a disagreement is refused before loading: `run.check_launch_precision`.)"""
    launch_config = launch_mixed_precision()
    if not (args.bf16 or args.fp16) and launch_config != "no":
        logger.warning("the launch config asks for mixed_precision=%s but the recipe's train.bf16 is off: training "
                       "without mixed precision, as the recipe says (set train.bf16: true or auto for bf16)", launch_config)
        args.mixed_precision = "no"


def one_gpu_without_a_launcher(args: TrainingArguments) -> None:
    """A plain `vlkit train` on a machine with several GPUs trains on one. The Trainer would wrap the model in
    nn.DataParallel over all of them: a copy of the model to every GPU each step, and a batch of batch_size x GPUs
    where the recipe says per process. `accelerate launch` gives one process per GPU instead."""
    if args.parallel_mode == ParallelMode.NOT_DISTRIBUTED and args.n_gpu > 1:
        logger.warning("%d GPUs and no launcher: training on the first one; for all of them run `accelerate launch "
                       "--config_file recipes/accelerate/ddp.yaml --num_processes %d -m vlkit train ...`",
                       args.n_gpu, args.n_gpu)
        args._n_gpu = 1  # what the Trainer itself sets for a model it must not replicate
