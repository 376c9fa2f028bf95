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
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
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
    return TrainingArguments(**{**shared, **stage_specific, "accelerator_config": accelerator_config})
