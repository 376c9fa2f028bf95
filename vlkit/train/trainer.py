"""`VlkitTrainer`: transformers' Trainer, saving only what was trained, atomically (`StagedCheckpoints`, which
the CLIP stage's Trainer shares).

The loop, mixed precision, gradient accumulation, schedulers, logging and checkpoint rotation
are the Trainer's. This subclass changes these things:
- the optimizer holds only trainable parameters, in one group per part with its own learning rate;
- checkpoints hold `trainable.safetensors` + `manifest.json` instead of the whole model, full and
  unsharded under FSDP and ZeRO-3 too (every rank joins the gather, the main one writes); under
  FSDP the Trainer's whole-model file is skipped, only the optimizer shards are added;
- each checkpoint is written into a staging folder and renamed into place, so a crash during a
  save leaves the previous checkpoint intact;
- resuming checks that the frozen bases are the ones the checkpoint was trained on;
- evaluation runs the layers `train.compile` compiled eagerly: its no-grad forward would compile them
  once more, for a pass over a few val samples.
Beside it, what every Trainer stage shares around `train()`: samples/s in the logs (`ThroughputCallback`,
at the batch trained at), and a step out of memory as one line saying what to change
and the batch `train.auto_find_batch_size` found (`trained_within_memory`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.utils import save_fsdp_optimizer
from transformers import Trainer, TrainerCallback

from vlkit.compat import PREFIX_CHECKPOINT_DIR, SCHEDULER_NAME, rotate_checkpoints
from vlkit.errors import OutOfMemoryError, first_line, is_out_of_memory
from vlkit.train.checkpoint import (
    check_bases_unchanged,
    gather_trained,
    load_trained,
    read_manifest,
    write_trained,
)
from vlkit.train.stages import part_of

logger = logging.getLogger(__name__)

STAGING = ".staging"


class StagedCheckpoints(Trainer):
    """Each checkpoint is written into a staging folder and renamed into place (every stage's Trainer)."""

    def _save_checkpoint(self, model, trial) -> None:
        # Let the Trainer write the checkpoint into a staging folder, then rename it into place.
        final_root = self.args.output_dir
        staging_root = os.path.join(final_root, STAGING)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)
        self.accelerator.wait_for_everyone()  # no rank writes into the staging folder before it is emptied
        self.args.output_dir = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = final_root
        # Every rank writes files of its own there (RNG state, optimizer shards): all must be done before
        # the rename, or a slower rank finds its folder gone and fails ("Parent directory ... does not exist").
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            target = os.path.join(final_root, name)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(os.path.join(staging_root, name), target)
            rotate_checkpoints(output_dir=final_root, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()


class VlkitTrainer(StagedCheckpoints):
    # The private Trainer hooks overridden here are listed, and pinned by a test, in vlkit.compat.TRAINER_HOOKS.
    def __init__(self, *args, manifest: dict[str, Any], part_learning_rates: dict[str, float], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.manifest = manifest
        self.part_learning_rates = part_learning_rates

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict[tuple[str, bool], list] = {}
            for name, parameter in opt_model.named_parameters():
                if parameter.requires_grad:  # frozen weights get no optimizer state at all
                    groups.setdefault((part_of(name), name in decay), []).append(parameter)
            param_groups = [
                {
                    "params": params,
                    "lr": self.part_learning_rates.get(part, self.args.learning_rate),
                    "weight_decay": self.args.weight_decay if decays else 0.0,
                }
                for (part, decays), params in groups.items()
            ]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def prediction_step(self, *args, **kwargs):
        with torch.compiler.set_stance("force_eager"):
            return super().prediction_step(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Every rank joins the gather (under FSDP each holds a shard of the trained weights); one writes.
        output_dir = output_dir or self.args.output_dir
        state = gather_trained(self.accelerator.unwrap_model(self.model), self.manifest)
        if self.args.should_save:
            write_trained(state, output_dir, self.manifest)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # Under FSDP the Trainer would also write the whole model, frozen bases included (gigabytes for a
        # 7B LLM); the trained weights are in trainable.safetensors already, so only the optimizer is saved.
        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        check_bases_unchanged(read_manifest(resume_from_checkpoint), f"checkpoint {resume_from_checkpoint}",
                              resume_from_checkpoint)
        load_trained(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)


class Throughput:
    """Samples/s between one logged step and the next: the Trainer stages' `ThroughputCallback` and loops of
    their own (the visual_words reader) log it alike."""

    def __init__(self, samples_per_step: int) -> None:
        self.samples_per_step = samples_per_step
        self.restart(0)

    def restart(self, step: int) -> None:
        self.last_time, self.last_step = time.perf_counter(), step

    def since_last(self, step: int) -> float | None:
        """The rate since the last call (or restart), None if no step was taken; `step` is the new mark."""
        now, steps = time.perf_counter(), step - self.last_step
        rate = round(steps * self.samples_per_step / (now - self.last_time), 2) if steps > 0 else None
        self.last_time, self.last_step = now, step
        return rate


def samples_per_step(args, state) -> int:
    """Samples one optimizer step takes over all processes, at the batch the Trainer runs: under
    `train.auto_find_batch_size` that can be less than the recipe's `batch_size`."""
    return state.train_batch_size * args.gradient_accumulation_steps * args.world_size


@contextmanager
def trained_within_memory(trainer: Trainer, memory_savers: str) -> Iterator[None]:
    """Around `trainer.train()`: a step that runs out of memory ends the run with one line saying what to change,
    instead of a traceback (checkpoints written before it stay; `memory_savers` names the stage's other keys that
    save memory), and a batch `train.auto_find_batch_size` shrank is named at the end."""
    requested = trainer.args.per_device_train_batch_size  # the recipe's; the Trainer keeps the one it runs apart
    try:
        yield
    except RuntimeError as error:
        searched_to_zero = str(error).startswith("No executable batch size found")  # accelerate's search's last word
        if not (is_out_of_memory(error) or searched_to_zero):
            raise
        if searched_to_zero:
            message = (f"out of memory at every batch size train.auto_find_batch_size tried, down to 1 (from "
                       f"train.batch_size={requested}): the model does not fit; try {memory_savers}")
        else:
            message = (f"out of memory in a training step at train.batch_size={requested}: lower it (raising "
                       "train.gradient_accumulation_steps keeps the samples per optimizer step), or set "
                       f"train.auto_find_batch_size: true to find one that fits; to save memory otherwise: {memory_savers} "
                       f"({first_line(error)})")
        raise OutOfMemoryError(message) from error
    fitted = trainer.state.train_batch_size
    if fitted is not None and fitted < requested:
        logger.warning("train.auto_find_batch_size: batch %d ran out of memory; trained at batch %d (set "
                       "train.batch_size: %d to start there next time)", requested, fitted, fitted)


class ThroughputCallback(TrainerCallback):
    """Adds samples/s to every log line, so the progress bar, TensorBoard and the run's log history
    (run_summary.json) show it."""

    def __init__(self) -> None:
        self.throughput = Throughput(0)

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        # Called again for each batch size auto_find_batch_size tries.
        self.throughput.samples_per_step = samples_per_step(args, state)
        self.throughput.restart(state.global_step)  # a resumed run starts mid-way

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs is None or "loss" not in logs:
            return
        rate = self.throughput.since_last(state.global_step)
        if rate is not None:
            logs["samples_per_s"] = rate
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["samples_per_s"] = rate  # the Trainer copied logs there


