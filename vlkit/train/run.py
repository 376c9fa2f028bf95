"""`vlkit train RECIPE [a.b=value ...] [--dry-run]`: run one stage of a recipe.

Order matters for the user: everything a recipe can get wrong (keys, types, data files, the
output dir, `init_from`) is checked before any model loads. Then the model is built (or
continued from `init_from`), the stage's freezing applied and logged as a table, the Trainer
run, and the run dir written: recipe.yaml, manifest.json + trainable.safetensors, processor/,
run_summary.json, loss.png, logs/ (TensorBoard), checkpoints/.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlkit.config import VlmRecipe, dump_recipe
from vlkit.connectors.registry import checked_connector_config
from vlkit.errors import ConfigError
from vlkit.llm import DEFAULT_LLM, EMBEDDED_LLMS
from vlkit.recipe import load_recipe
from vlkit.run_folder import atomic_write_text, read_manifest
from vlkit.train.output_dir import SUMMARY, checkpoint_to_resume, claimed_output_dir, every_rank_ready
from vlkit.train.profile import memory_phrase, peak_memory_gib, reset_peak_memory
from vlkit.train.stages import STAGE_TABLE, check_stage

logger = logging.getLogger("vlkit.train")

# The vision-feature cache may take at most this share of the free disk under $VLKIT_HOME.
FEATURE_CACHE_SHARE_OF_FREE_DISK = 0.8
# train.loss_average -> the power of a turn's length its tokens are divided by (vlkit.modeling.turn_weights)
TURN_POWERS = {"turn": 1.0, "square": 0.5}


@dataclass
class Plan:
    """What a run will do, resolved from the recipe without loading any weights."""

    recipe: VlmRecipe
    vision: str
    llm: str
    connector: dict[str, Any]
    resume_from: str | None
    parent: dict[str, Any] | None  # the init_from run's manifest

    def describe(self) -> str:
        tune = self.recipe.tune
        lines = [
            f"stage     {self.recipe.stage}  ->  {self.recipe.output_dir}",
            f"vision    {self.vision}  ({'LoRA' if tune.vision == 'lora' else 'frozen'})",
            f"connector {self.connector}  ({tune.connector})",
            f"llm       {self.llm}  ({tune.llm})",
            f"data      {self.recipe.data.path(self.recipe.data.train_file)}  (images: {self.recipe.data.image_root_path()})",
            f"train     {self._length()}, batch {self.recipe.train.batch_size}"
            f"{' at most (auto_find_batch_size)' if self.recipe.train.auto_find_batch_size else ''}"
            f" x {self.recipe.train.gradient_accumulation_steps} accumulation, lr {self.recipe.train.learning_rate:g}",
        ]
        if self.parent:
            lines.append(f"init_from {self.recipe.init_from} (stage {self.parent['stage']})")
        if self.resume_from:
            lines.append(f"resume    {self.resume_from}")
        return "\n".join(lines)

    def _length(self) -> str:
        train = self.recipe.train
        return f"{train.max_steps} steps" if train.max_steps else f"{train.epochs:g} epoch(s)"


def plan_run(recipe: VlmRecipe) -> Plan:
    """Check everything checkable without weights; raise ConfigError with one line otherwise."""
    check_stage(recipe)
    data = recipe.data
    check_data_files(data, data.train_file, data.val_file)
    if data.cache_vision_features and recipe.tune.vision != "frozen":
        raise ConfigError(
            f"data.cache_vision_features needs a frozen vision tower, but tune.vision is '{recipe.tune.vision}'; "
            "drop data.cache_vision_features"
        )

    parent = None
    vision, llm = recipe.model.vision, recipe.model.llm
    connector = recipe.model.connector
    if recipe.init_from:
        parent = read_manifest_or_error(recipe.init_from)
        for part, mine in (("vision", vision), ("llm", llm)):
            theirs = parent["bases"][part]["source"]
            if mine is not None and mine != theirs:
                raise ConfigError(
                    f"init_from run {recipe.init_from} was trained with {part} '{theirs}' but this recipe names "
                    f"'{mine}'; drop model.{part} or point init_from at a run with that {part}"
                )
        if connector is not None and connector != parent["model"]["connector"]:
            raise ConfigError(
                f"init_from run {recipe.init_from} has connector {parent['model']['connector']} but this recipe names "
                f"{connector}; drop model.connector to continue that run's connector"
            )
        vision, llm = parent["bases"]["vision"]["source"], parent["bases"]["llm"]["source"]
        connector = parent["model"]["connector"]
        dtype_from_parent(recipe, parent)
    if vision is None:
        raise ConfigError("recipe key 'model.vision' is required (or init_from a run that has one)")
    if not parent:  # a parent run's bases are found where they are now when it is rebuilt
        for part, source in (("vision", vision), ("llm", llm)):
            check_local_base(part, source)
    connector = connector or {"type": "mlp", "depth": 2}
    checked_connector_config(connector)
    check_launch(recipe.train)
    if recipe.train.compile and (launched_with("FSDP") or launched_with("DEEPSPEED")):
        raise ConfigError("train.compile is untested under FSDP and DeepSpeed launches; set train.compile=false "
                          "or launch with DDP (recipes/accelerate/ddp.yaml)")
    if recipe.model.attn_implementation == "flex_attention" and not torch.accelerator.is_available():
        raise ConfigError("model.attn_implementation: flex_attention trains only on a GPU (torch's flex attention "
                          "has no backward pass on CPU); use sdpa here (with data.packing: true, not flat)")
    return Plan(
        recipe=recipe, vision=vision, llm=llm or DEFAULT_LLM, connector=connector,
        resume_from=resolve_resume(recipe), parent=parent,
    )


def dtype_from_parent(recipe: VlmRecipe, parent: dict[str, Any]) -> None:
    """A stage continued from a run (`init_from`, its manifest `parent`) keeps that run's model.dtype unless its
    recipe sets one: a float32 default would rebuild a bf16-trained 7B model at twice the memory. Set on the
    recipe, so the run's recipe.yaml records the dtype it trains in."""
    if "dtype" not in recipe.model.model_fields_set:
        recipe.model.dtype = parent["model"]["dtype"]


def check_data_files(data, *names: str | None) -> None:
    """The recipe's data files (None: not used) and image root exist; one-line ConfigError otherwise."""
    for name in filter(None, names):
        if not data.path(name).is_file():
            raise ConfigError(f"data file not found: {data.path(name)} (data.dir is '{data.dir}')")
    if not data.image_root_path().is_dir():
        raise ConfigError(f"image root not found: {data.image_root_path()}")


def check_launch(train) -> None:
    """What a launch (accelerate, torchrun) must agree with in the recipe's train section."""
    check_launch_precision(train)
    from vlkit.train.arguments import launched_processes

    processes = launched_processes()
    if train.auto_find_batch_size and processes > 1:
        # Each process would shrink its batch on its own: one that ran out of memory would leave the others
        # waiting in their gradient all-reduce.
        raise ConfigError(f"train.auto_find_batch_size fits one process's batch, and this launch has {processes}; "
                          "find the batch in a one-process run, then set train.batch_size and "
                          "train.auto_find_batch_size: false")


def check_launch_precision(train) -> None:
    """Under a DeepSpeed launch, the launch config's mixed precision must agree with the recipe's: transformers
    copies it into DeepSpeed's settings as TrainingArguments are made, and the two disagreeing stop the run at
    its first step. (Under DDP and FSDP the recipe simply wins: `vlkit.train.arguments.recipe_precision`.)"""
    from vlkit.train.arguments import launch_mixed_precision, resolve_bf16

    launch_config = launch_mixed_precision()
    if not launched_with("DEEPSPEED") or launch_config == "no":
        return
    if not resolve_bf16(train.bf16, on_cpu=not torch.accelerator.is_available()) and not getattr(train, "fp16", False):
        raise ConfigError(f"the DeepSpeed launch config asks for mixed_precision={launch_config} but this recipe "
                          f"trains without it (train.bf16: {train.bf16}, here off); set train.bf16: true, or launch "
                          "with a config whose mixed_precision is no")


def check_clip_recipe(recipe) -> None:
    """What `vlkit train --dry-run` checks of a CLIP recipe without loading anything: data files, folders, the
    launch's precision."""
    check_launch(recipe.train)
    data = recipe.data
    check_data_files(data, data.train_file, data.val_file, data.labels_file)
    for part in ("vision", "text"):
        check_local_base(f"{part}.pretrained", getattr(recipe.model, part).pretrained)
    check_local_base("tokenizer", recipe.model.tokenizer)


def check_local_base(part: str, source: str | None) -> None:
    """A base named by a path (absolute, ./ ../ ~, or with two slashes: a hub id has one) must be a folder;
    otherwise loading it would try the hub with it as a repo id, and fail on its name after retries."""
    if source is None:
        return
    path = Path(source).expanduser()
    if (source.startswith(("/", ".", "~")) or source.count("/") >= 2) and not path.is_dir():
        raise ConfigError(f"model.{part}: no folder {source}; give a model folder, a hub id (ORG/NAME)"
                          + (", or an embedded LLM name" if part == "llm" else ""))
    if part == "llm" and "/" not in source and source not in EMBEDDED_LLMS and not path.is_dir():
        # A name like an embedded LLM's is a typo, not one of the hub's few ids without an owner: offline,
        # asking the hub for it would retry for a minute before failing.
        close = difflib.get_close_matches(source, EMBEDDED_LLMS, n=1, cutoff=0.6)
        if close:
            raise ConfigError(f"model.llm: '{source}' is not an embedded LLM; did you mean '{close[0]}'?")


def read_manifest_or_error(folder: str) -> dict[str, Any]:
    try:
        return read_manifest(folder)
    except Exception as error:
        raise ConfigError(f"init_from: {error}") from None


def resolve_resume(recipe: VlmRecipe) -> str | None:
    """Check the output dir's state against resume/overwrite; return the checkpoint to resume from."""
    checkpoint = checkpoint_to_resume(Path(recipe.output_dir), recipe.resume, recipe.overwrite)
    return check_parent_unchanged(checkpoint) if checkpoint else None


def check_parent_unchanged(checkpoint: str) -> str:
    """The checkpoint, unless the run it continues (`init_from`) was retrained or removed since it started."""
    from vlkit.run_folder import RunManifest

    manifest = RunManifest.read(checkpoint)
    if manifest.init_from_changed():
        raise ConfigError(
            f"the init_from run {manifest.init_from.source} holds other trained weights than when {checkpoint} "
            "was saved (or is gone); resuming would mix two runs: set overwrite=true to start over"
        )
    return checkpoint


def model_spec(plan: Plan) -> dict[str, Any]:
    """How the model is built: the parent run's choices when continuing one, else this recipe's."""
    return plan.parent["model"] if plan.parent else plan.recipe.model.model_dump()


def build_model(plan: Plan):
    """(model, processor) for the stage: from the bases, or continuing `init_from` (rebuilt with its adapters).

    Continuing a run finds its bases where they are now (the runs tree may have moved) and records
    those paths in the plan, so this run's manifest points at them too.
    """
    from vlkit.build import build_vlm
    from vlkit.run_folder import RunManifest, quantization_config, rebuild

    recipe = plan.recipe
    dtype = getattr(torch, recipe.model.dtype)
    quantize = recipe.tune.llm == "qlora"
    if plan.parent:
        parent = RunManifest.from_json(plan.parent, recipe.init_from)
        plan.vision, plan.llm = parent.locate("vision"), parent.locate("llm")  # also checks their hashes
        # The parent's adapters and weights, on the base quantized as this stage trains it.
        return rebuild(parent, quantize=quantize, dtype=dtype, attn_implementation=recipe.model.attn_implementation)
    spec = model_spec(plan)
    return build_vlm(
        vision=plan.vision, llm=plan.llm, connector=plan.connector,
        vision_feature_layer=spec["vision_feature_layer"],
        vision_feature_select_strategy=spec["vision_feature_select_strategy"],
        dtype=dtype, llm_quantization_config=quantization_config(dtype) if quantize else None,
        attn_implementation=recipe.model.attn_implementation, system_prompt=spec.get("system_prompt"),
    )


def prepare_output_dir(recipe: VlmRecipe, resume_from: str | None):
    """Around the stage's set-up: its output dir with recipe.yaml; a run that overwrite=true replaces is moved
    aside until the set-up succeeded (`vlkit.train.output_dir`)."""
    return claimed_output_dir(Path(recipe.output_dir), dump_recipe(recipe), recipe.overwrite and not resume_from)


def load_datasets(data, processor):
    """(train set, val set or None) of a stage. Rank 0 goes first: it writes the `datasets` caches (parsed
    file, encoded texts) that the other ranks then read, instead of every rank writing the same files at once."""
    from accelerate import PartialState

    from vlkit.data.dataset import ConversationDataset

    options = {"max_length": data.max_length, "on_bad_sample": data.on_bad_sample,
               "allow_images_outside_root": data.allow_images_outside_root, "format": data.format,
               # Items carry decoded images; the collator runs the image processor once per batch.
               "defer_images": True}
    with PartialState().main_process_first():
        train_set = ConversationDataset.from_file(data.path(data.train_file), processor, data.image_root_path(), **options)
        if data.max_train_samples:
            train_set.samples = train_set.samples.select(range(min(data.max_train_samples, len(train_set.samples))))
        val_set = None
        if data.val_file:
            val_set = ConversationDataset.from_file(data.path(data.val_file), processor, data.image_root_path(), **options)
            if data.max_val_samples:
                val_set.samples = val_set.samples.select(range(min(data.max_val_samples, len(val_set.samples))))
    return train_set, val_set


def prepared_model(recipe: VlmRecipe, plan: Plan):
    """(model, processor) of the stage with its adapters and freezing applied, the trainable table logged."""
    from vlkit.train.stages import (
        apply_adapters,
        connector_weights_in_float32,
        set_trainable,
        trainable_table,
    )

    model, processor = build_model(plan)
    apply_adapters(model, recipe.tune)
    set_trainable(model, recipe.tune)
    # Not under FSDP, which shards parameters of one dtype per group, nor DeepSpeed, which casts the model to its
    # own precision (keeping float32 master weights when that is bf16 or fp16).
    if not (launched_with("FSDP") or launched_with("DEEPSPEED")) and connector_weights_in_float32(model, recipe.init_from):
        logger.info("the connector trains in float32 (AdamW would round small updates of bf16 weights away)")
    print(f"trainable parameters (stage {recipe.stage}):\n{trainable_table(model)}", flush=True)
    return model, processor


def stage_arguments(recipe: VlmRecipe, output: Path, has_eval: bool, model):
    """The stage's TrainingArguments (the builder every stage shares, plus the VLM stages' own)."""
    from vlkit.train.arguments import training_arguments

    train = recipe.train
    sharded_on_cpu = shard_cpu_ranks()
    return training_arguments(
        train,
        output / "checkpoints",
        per_device_eval_batch_size=train.batch_size,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=train.eval_steps,
        data_seed=train.seed,
        activation_checkpointing=train.gradient_checkpointing,  # the v5 name; the old one warns
        save_only_model=False,
        accelerator_config={"use_configured_state": True} if sharded_on_cpu else None,
        ddp_find_unused_parameters=False if every_trainable_weight_is_used(recipe.tune, model) else None,
    )


def every_trainable_weight_is_used(tune, model) -> bool:
    """Whether every step uses every trainable weight, so DDP need not search the graph for unused ones each
    step: only LoRA on the LLM trains (connector and tower weights go unused in a batch without images), and
    the LLM has no experts to route tokens to."""
    # LoRA only: a fully trained LLM may hold weights its forward skips when given inputs_embeds, as vlkit gives
    # it (Gemma 3n's per-layer embeddings, say).
    if tune.llm not in ("lora", "qlora") or tune.connector != "frozen" or tune.vision != "frozen":
        return False
    # A mixture-of-experts LLM: an expert no token of the batch was routed to gets no gradient.
    return not any("expert" in name for name, _ in model.language_model.named_modules())


def part_learning_rates(train) -> dict[str, float]:
    return {
        "connector": train.learning_rate,
        "language_model": train.llm_learning_rate or train.learning_rate,
        "vision_tower": train.vision_learning_rate or train.learning_rate,
    }


def cache_features_if_asked(recipe: VlmRecipe, model, processor, datasets_: list, args) -> None:
    """The frozen tower's features computed once (each rank its share) and stored for the datasets."""
    from accelerate import PartialState

    from vlkit import features
    from vlkit.llm import vlkit_home

    if not features.caches_vision_features(recipe):
        return
    bytes_per_image = features.feature_bytes_per_image(model, processor.image_processor)
    needed_and_free = torch.zeros(2, dtype=torch.int64)

    def fits(images_to_compute: int) -> bool:
        needed_and_free[:] = rank_zero_view(torch.tensor([images_to_compute * bytes_per_image,
                                                              features.free_bytes_for_features()]))
        return bool(needed_and_free[0] <= FEATURE_CACHE_SHARE_OF_FREE_DISK * needed_and_free[1])

    try:
        cached = features.cache_features_for(model, processor.image_processor, datasets_, device=args.device,
                                             shard=(args.process_index, args.world_size), fits=fits)
    except features.CacheTooLarge as error:
        needed, free = needed_and_free.tolist()
        size = (f"{needed / 2**30:.1f} GiB for the {error.images} images not cached yet, {free / 2**30:.1f} GiB free "
                f"under {vlkit_home()}")
        if recipe.data.cache_vision_features is None:  # the align default: train from pixels instead
            logger.warning("vision features not cached (%s); the tower runs every step. Set VLKIT_HOME to a larger "
                           "disk, or data.cache_vision_features: false to silence this", size)
            return
        raise ConfigError(f"data.cache_vision_features: {size}; set VLKIT_HOME to a larger disk or "
                          "data.cache_vision_features: false") from None
    PartialState().wait_for_everyone()  # features computed by every rank are on disk before any is read
    if args.process_index == 0:
        print(cached.summary(), flush=True)


def rank_zero_view(values: torch.Tensor) -> torch.Tensor:
    """The first rank's `values` on every rank, once every rank got here: one decision for all where each rank
    would measure its own (the disk's free space changes as ranks write; ranks that cached would wait for ranks
    that did not)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    from accelerate import PartialState
    from accelerate.utils import broadcast

    values = broadcast(values.to(PartialState().device), from_process=0).cpu()
    # A broadcast need not hold its sender: no rank writes features before every rank listed the missing ones
    # (each computes its share of that list, which must be the same list on every rank).
    every_rank_ready()
    return values


def write_summary(recipe: VlmRecipe, plan: Plan, trainer, datasets_: tuple, metrics: dict,
                  started: float) -> None:
    """Rank 0: loss.png and run_summary.json of the finished stage (processor/ is written at its set-up)."""
    from vlkit.train.plots import plot_loss
    from vlkit.train.trainer import samples_per_step

    (train_set, val_set), output, args = datasets_, Path(recipe.output_dir), trainer.args
    history_log = trainer.state.log_history
    plot_loss(history_log, output / "loss.png", title=f"{recipe.stage}: {recipe.output_dir}")
    summary = {
        "stage": recipe.stage,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "samples": trainer.state.global_step * samples_per_step(args, trainer.state),
        "batch_size": trainer.state.train_batch_size,  # per process; less than the recipe's where auto-fitted
        "train_samples_available": len(train_set),
        "val_samples": len(val_set) if val_set is not None else 0,
        "skipped_samples": train_set.num_skipped,
        "skipped_by_reason": train_set.skipped,
        "skipped_ids": train_set.skipped_ids,
        "wall_time_s": round(time.time() - started, 1),
        "peak_memory_gib": peak_memory_gib(),
        "resumed_from": plan.resume_from,
        "distributed": {"type": trainer.accelerator.distributed_type.value, "processes": args.world_size},
        "final_metrics": metrics,
        "log_history": history_log,
    }
    atomic_write_text(output / SUMMARY, json.dumps(summary, indent=2, default=str))
    if train_set.num_skipped:
        logger.warning("skipped %d bad sample(s): %s", train_set.num_skipped, train_set.summary())
    print(f"run finished: {output}  ({summary['steps']} steps, {summary['wall_time_s']} s, "
          f"final train loss {metrics.get('train_loss', float('nan')):.4f}, skipped {summary['skipped_samples']}, "
          f"{memory_phrase(summary['peak_memory_gib'])})")


def compile_if_asked(recipe: VlmRecipe, model) -> None:
    """`train.compile`: the decoder layers compiled in place, after the model's one-time probes (labels-only
    loss, last layer, packing): each probe's call differs from a training step's (no grad, other arguments),
    and run through compiled layers each would compile them once more."""
    if not recipe.train.compile:
        return
    from vlkit.train.compile import compile_decoder_layers

    # The shared prefix reaches the decoder as a key/value cache (frozen LLM only).
    compile_decoder_layers(model, around_cache=recipe.data.share_prefix and recipe.tune.llm == "frozen")


def set_loss_average(model: Any, loss_average: str) -> None:
    """Turn on labels-only logits where they give the LLM's own loss, and weight the loss per turn
    (train.loss_average) where asked: only vlkit's labels-only loss sees turns."""
    labels_only = model.use_loss_at_labels()
    if loss_average == "token":
        return
    if not labels_only:
        raise ConfigError(f"train.loss_average: {loss_average} needs vlkit's labels-only loss, which "
                          "this LLM does not allow (it changes its logits after the head); use train.loss_average: token")
    model.loss_turn_power = TURN_POWERS[loss_average]


def shares_prefix(recipe: VlmRecipe, model, pack: bool | str) -> bool:
    """Whether the collator may pass the shared prompt prefix once (`data.share_prefix`): only while the
    LLM is frozen (the model shares it only then; otherwise packing serves better), and in front of a
    flat row only where the attention sees the prefix from every sample (per-sample sdpa)."""
    from vlkit.compat import attention_implementation
    from vlkit.per_sample_sdpa import PER_SAMPLE_SDPA

    if not recipe.data.share_prefix or recipe.tune.llm != "frozen":
        return False
    return pack != "flat" or attention_implementation(model.language_model.config) == PER_SAMPLE_SDPA


def memory_savers(recipe: VlmRecipe) -> str:
    """The recipe keys, not set yet, that would make a step of this stage take less memory."""
    savers = []
    if recipe.model.dtype == "float32":
        savers.append("model.dtype: bfloat16")
    if recipe.tune.llm in ("lora", "full"):
        savers.append("tune.llm: qlora")
    if not recipe.train.gradient_checkpointing:
        savers.append("train.gradient_checkpointing: true")
    return ", ".join(savers) or "a GPU with more memory"


def train_vlm(recipe: VlmRecipe, plan: Plan | None = None) -> Path:
    """Run one align/instruct stage; return the run dir."""
    from vlkit.train.trainer import trained_within_memory

    plan = plan or plan_run(recipe)
    if recipe.stage == "align" and not plan.parent and plan.connector.get("type") == "visual_words":
        return train_words_stage(recipe, plan)
    if recipe.data.hue_rotated_copies:
        raise ConfigError("data.hue_rotated_copies: only the align stage of a visual_words connector reads it (its "
                          "reader trains on the copies); remove it from this recipe")
    started = time.time()
    reset_peak_memory()
    with prepare_output_dir(recipe, plan.resume_from) as output:
        trainer, train_set, val_set = set_up_stage(recipe, plan, output)
    with trained_within_memory(trainer, memory_savers(recipe)):
        metrics = dict(trainer.train(resume_from_checkpoint=plan.resume_from).metrics)
    if val_set is not None:
        metrics.update(trainer.evaluate(val_set))
    trainer.save_model(str(output))  # every rank: under FSDP the trained weights are gathered from all
    if trainer.is_world_process_zero():
        write_summary(recipe, plan, trainer, (train_set, val_set), metrics, started)
    trainer.accelerator.wait_for_everyone()
    return output


def set_up_stage(recipe: VlmRecipe, plan: Plan, output: Path):
    """(Trainer, train set, val set or None) of a Trainer stage, ready to train."""
    from accelerate import PartialState
    from transformers import set_seed

    from vlkit.data.collate import VlkitCollator
    from vlkit.data.packing import collator_packing
    from vlkit.train.checkpoint import build_manifest
    from vlkit.train.profile import profile_callbacks
    from vlkit.train.trainer import ThroughputCallback, VlkitTrainer

    set_seed(recipe.train.seed)  # the connector's initial weights are part of the run
    model, processor = prepared_model(recipe, plan)
    history = plan.parent["stages"] if plan.parent else []
    manifest = build_manifest(recipe, model, {"vision": plan.vision, "llm": plan.llm}, history,
                              system_prompt=model_spec(plan).get("system_prompt"))
    train = recipe.train
    has_eval = recipe.data.val_file is not None and train.eval_steps is not None
    # The arguments first: on CPU, FSDP and DeepSpeed need accelerate's shared state relabelled
    # (shard_cpu_ranks) before anything creates it, and load_datasets' rank-0-first does.
    args = stage_arguments(recipe, output, has_eval, model)
    name_fsdp_blocks(model)
    PartialState().wait_for_everyone()  # rank 0 has made the output dir (an overwritten run moved aside)
    if args.process_index == 0:  # now: a checkpoint of a run cut short has it too (vlkit data validate --model)
        processor.save_pretrained(output / "processor")
    train_set, val_set = load_datasets(recipe.data, processor)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(output / "logs"))
    cache_features_if_asked(recipe, model, processor, [d for d in (train_set, val_set) if d is not None], args)
    place_before_probes(model, args.device)
    pack = collator_packing(recipe.data.packing, model, on_cpu=args.device.type == "cpu", compiled=recipe.train.compile)
    set_loss_average(model, recipe.train.loss_average)
    compile_if_asked(recipe, model)
    trainer = VlkitTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=val_set if has_eval else None,
        data_collator=VlkitCollator(
            processor.tokenizer.pad_token_id, pack=pack, processor=processor,
            share_prefix_before=processor.image_token_id if shares_prefix(recipe, model, pack) else None,
        ),
        manifest=manifest, part_learning_rates=part_learning_rates(train),
        callbacks=[ThroughputCallback(),
                   *profile_callbacks(train, output)],
    )
    return trainer, train_set, val_set


def train_words_stage(recipe: VlmRecipe, plan: Plan) -> Path:
    """The align stage of a visual_words connector: its reader trained on the words files, outside the
    LLM (vlkit.train.words); the run dir written as the other stages write theirs."""
    from transformers import set_seed

    from vlkit.llm import load_tokenizer
    from vlkit.train.checkpoint import build_manifest, save_trained
    from vlkit.train.plots import plot_loss
    from vlkit.train.profile import StepProfiler
    from vlkit.train.words import fit_reader, read_words

    started = time.time()
    reset_peak_memory()
    if recipe.train.compile:
        logger.warning("train.compile: the visual_words reader trains outside the LLM; nothing is compiled")
    if recipe.train.auto_find_batch_size:
        logger.warning("train.auto_find_batch_size: the visual_words reader trains in a loop of its own, at "
                       "train.batch_size")
    rows, val_rows, groups = read_words(recipe, load_tokenizer(plan.llm))
    plan.connector = {**plan.connector, "groups": groups}
    set_seed(recipe.train.seed)
    with prepare_output_dir(recipe, None) as output:
        model, processor = prepared_model(recipe, plan)  # only the connector trains (and is saved)
    profiler = StepProfiler(recipe.train.profile_step, output) if recipe.train.profile_step else None
    # Only the tower and the reader run here: they go to the accelerator, if there is one (the LLM stays).
    # check_available: a CUDA build of torch on a machine without a GPU names cuda but cannot use it.
    device = torch.accelerator.current_accelerator(check_available=True) or torch.device("cpu")
    model.vision_tower.to(device)
    model.connector.to(device)
    history, metrics = fit_reader(model, processor.image_processor, recipe.train, rows, val_rows,
                                  recipe.data.hue_rotated_copies, recipe.data.colour_words, profiler)
    model.vision_tower.cpu()
    model.connector.cpu()
    manifest = build_manifest(recipe, model, {"vision": plan.vision, "llm": plan.llm}, [],
                              system_prompt=model_spec(plan).get("system_prompt"))
    save_trained(model, output, manifest)
    processor.save_pretrained(output / "processor")
    plot_loss(history, output / "loss.png", title=f"{recipe.stage} (visual_words reader): {recipe.output_dir}")
    connector = model.connector
    summary = {
        "stage": recipe.stage, "steps": history[-1]["step"], "samples": history[-1]["step"] * recipe.train.batch_size,
        "train_samples_available": len(rows), "val_samples": len(val_rows),
        "layout": {"slots": len(groups), "slots_with_a_choice": sum(len(group) > 1 for group in groups),
                   "image_tokens": connector.num_tokens(connector.num_patches)},
        "wall_time_s": round(time.time() - started, 1), "peak_memory_gib": peak_memory_gib(),
        "final_metrics": metrics, "log_history": history,
    }
    atomic_write_text(output / SUMMARY, json.dumps(summary, indent=2))
    validation = (f"val: slots right {metrics['eval_slot_accuracy']:.3f}, images with every slot right "
                  f"{metrics['eval_all_slots_right']:.3f}" if "eval_slot_accuracy" in metrics else "no val file")
    print(f"run finished: {output}  ({summary['steps']} steps, {summary['wall_time_s']} s, final train loss "
          f"{metrics['train_loss']:.4f}; {validation}; {memory_phrase(summary['peak_memory_gib'])})")
    return output


def join_cpu_ranks_without_cuda() -> None:
    """Make ranks started without CUDA (LOCAL_RANK set) form a CPU (gloo) process group.

    `accelerate launch` starts several CPU processes only through its torchrun-style launcher (its
    MULTI_CPU launcher needs mpirun), and that launcher leaves ACCELERATE_USE_CPU unset; without
    it, each rank would train alone as rank 0 of 1.
    """
    if os.environ.get("LOCAL_RANK") is not None and not torch.cuda.is_available() and not launched_with("DEEPSPEED"):
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")


def use_the_ranks_gpu() -> None:
    """Under a launcher, make this rank's GPU (LOCAL_RANK) the current one before anything loads: a 4-bit LLM is
    placed on the current GPU, which is otherwise GPU 0 on every rank until the Trainer sets the device."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and torch.cuda.is_available():
        torch.cuda.set_device(int(local_rank))


def place_before_probes(model, device: torch.device) -> None:
    """Move the model to the accelerator it trains on before its one-time probes (labels-only loss, last
    layer, packing), as the Trainer would next: on the CPU they cost a 7B forward each, and an LLM with
    flex attention compiles the kernel for the CPU once per probe shape. Under FSDP and DeepSpeed, which
    place the model themselves, it stays where it loaded."""
    if device.type != "cpu" and not launched_with("FSDP") and not launched_with("DEEPSPEED"):
        model.to(device)


def launched_with(kind: str) -> bool:
    """Whether `accelerate launch` asked for FSDP or DEEPSPEED (it says so in the environment)."""
    return os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"


def name_fsdp_blocks(model) -> None:
    """Under an FSDP launch, name the block classes its transformer-based wrap shards one by one.

    Unnamed, accelerate takes every class in the model's no-split list and stops at one the model
    lacks; a composite model inherits its parts' lists, and a CLIP vision tower's names
    CLIPTextEmbeddings. Only classes present are named; a launch config that names its own
    (`fsdp_transformer_layer_cls_to_wrap`) wins.
    """
    if not launched_with("FSDP"):
        return
    from vlkit.compat import no_split_module_names

    present = {type(module).__name__ for module in model.modules()}
    blocks = sorted(name for name in no_split_module_names(model) if name in present)
    if blocks:
        os.environ.setdefault("FSDP_TRANSFORMER_CLS_TO_WRAP", ",".join(blocks))


def shard_cpu_ranks() -> bool:
    """Under an FSDP or DeepSpeed launch on CPU ranks, keep the sharding the config asked for; True if so.

    accelerate 1.15 drops both on CPU ranks without a word, and they would train plain data parallel:
    AcceleratorState turns only accelerator process groups (MULTI_GPU/NPU/XPU/...) into FSDP, and takes
    DeepSpeed only when not told to use the CPU. torch's FSDP2 and DeepSpeed's CPU accelerator both run
    on a gloo group. accelerate has no public switch for this, so the gloo group is made here; for FSDP
    it is labelled MULTI_GPU so the Accelerator the Trainer creates takes its FSDP branch (the device
    stays the CPU), and for DeepSpeed ACCELERATE_USE_CPU stays unset (join_cpu_ranks_without_cuda). The
    caller must tell the Trainer to keep this state (`accelerator_config={"use_configured_state": True}`).
    tests/test_distributed_launch.py checks each run was sharded (`distributed` in run_summary.json).
    """
    if os.environ.get("LOCAL_RANK") is None or torch.cuda.is_available():
        return False
    if not (launched_with("FSDP") or launched_with("DEEPSPEED")):
        return False
    from accelerate import PartialState

    from vlkit.compat import treat_cpu_group_as_accelerator_group

    if launched_with("FSDP"):
        treat_cpu_group_as_accelerator_group()
    else:  # DeepSpeed: AcceleratorState takes its DeepSpeed branch as long as ACCELERATE_USE_CPU is unset
        PartialState(cpu=True)  # the gloo group
    return True


def run(args) -> int:
    """CLI entry: `vlkit train` (also under `accelerate launch -m vlkit train`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    join_cpu_ranks_without_cuda()
    use_the_ranks_gpu()
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.stage == "clip":
        from vlkit.train.clip import checkpoint_to_resume_clip, train_clip

        check_clip_recipe(recipe)
        resume_from = checkpoint_to_resume_clip(recipe)
        if args.dry_run:
            resume_line = f"\nresume    {resume_from}" if resume_from else ""
            print(f"stage clip -> {recipe.output_dir}{resume_line}\nrecipe is valid; nothing loaded (dry run)")
            return 0
        train_clip(recipe)
        return 0
    plan = plan_run(recipe)
    if args.dry_run:
        print(plan.describe())
        table = STAGE_TABLE[recipe.stage]
        print("stage table: " + ", ".join(f"{part}: {'/'.join(modes)}" for part, modes in table.items()))
        print("recipe is valid; nothing loaded (dry run)")
        return 0
    train_vlm(recipe, plan)
    return 0
