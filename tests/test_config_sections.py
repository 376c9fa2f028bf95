"""One recipe machinery: the keys every stage shares mean the same thing in the clip and VLM schemas,
and one builder turns them into the same `TrainingArguments`."""

from __future__ import annotations

import pytest
import torch

from vlkit.clip.recipe import ClipRecipe, parse_clip_recipe
from vlkit.config import BaseDataSection, BaseTrainSection, VlmRecipe, validate_tree
from vlkit.errors import ConfigError
from vlkit.train.arguments import training_arguments

CLIP = {"stage": "clip", "output_dir": "out", "data": {"train_file": "pairs.jsonl"},
        "model": {"vision": {"config": {}}, "text": {"config": {}}}}
VLM = {"stage": "align", "output_dir": "out", "data": {"train_file": "align.json"}}


def vlm(train: dict) -> VlmRecipe:
    return validate_tree({**VLM, "train": train}, VlmRecipe)


def clip(train: dict) -> ClipRecipe:
    return parse_clip_recipe({**CLIP, "train": train})


def test_every_stage_has_the_shared_keys():
    for schema in (ClipRecipe, VlmRecipe):
        data, train = schema.model_fields["data"].annotation, schema.model_fields["train"].annotation
        assert issubclass(data, BaseDataSection) and issubclass(train, BaseTrainSection)
    assert clip({}).train.warmup_ratio == 0.0 and vlm({}).train.warmup_ratio == 0.03  # each stage's default
    assert parse_clip_recipe({**CLIP, "data": {"train_file": "p", "on_bad_sample": "error"}}).data.on_bad_sample == "error"


@pytest.mark.parametrize("make", [clip, vlm], ids=["clip", "vlm"])
def test_warmup_names_mean_the_same_in_every_stage(make, tmp_path):
    steps = training_arguments(make({"warmup_steps": 50}).train, tmp_path)
    ratio = training_arguments(make({"warmup_ratio": 0.1}).train, tmp_path)
    assert steps.get_warmup_steps(1000) == 50 and ratio.get_warmup_steps(1000) == 100
    with pytest.raises(ConfigError, match="train.warmup_steps.*use train.warmup_ratio"):
        make({"warmup_steps": 0.1})  # a fraction is warmup_ratio's job
    with pytest.raises(ConfigError, match="both set"):
        make({"warmup_steps": 10, "warmup_ratio": 0.1})
    assert make({"warmup_steps": 10, "warmup_ratio": 0}).train.warmup() == 10
    with pytest.raises(ConfigError, match="warmup_ratio"):
        make({"warmup_ratio": 1.0})  # transformers would read 1.0 as one step


def test_builder_takes_the_shared_keys_and_the_stage_specific_ones(tmp_path):
    train = clip({"batch_size": 4, "learning_rate": 0.01, "max_steps": 7, "max_grad_norm": None}).train
    args = training_arguments(train, tmp_path / "checkpoints", adam_beta2=train.adam_beta2, logging_first_step=True)
    assert args.output_dir == str(tmp_path / "checkpoints")
    assert (args.per_device_train_batch_size, args.learning_rate, args.max_steps) == (4, 0.01, 7)
    assert args.max_grad_norm == 0.0 and args.adam_beta2 == 0.98 and args.logging_first_step
    assert args.report_to == [] and args.save_strategy == "no" and not args.remove_unused_columns
    assert not args.logging_nan_inf_filter  # it reads each step's loss on the host: a GPU wait per step
    split = training_arguments(train, tmp_path, accelerator_config={"split_batches": True})
    assert split.accelerator_config.split_batches  # a stage's keys join the shared ones
    assert split.accelerator_config.non_blocking == args.accelerator_config.non_blocking == torch.cuda.is_available()


@pytest.mark.parametrize(("requested", "cuda", "gpus", "cores", "expected"), [
    (None, False, 0, 2, 0),  # CPU training: workers would take the training's own cores
    (None, True, 1, 16, 4),
    (None, True, 8, 16, 1),
    (None, True, 1, 2, 1),
    (3, False, 0, 2, 3),  # what the recipe says wins
])
def test_dataloader_workers_default_to_image_work_in_workers_on_a_gpu(monkeypatch, requested, cuda, gpus, cores,
                                                                       expected):
    import os

    import torch

    from vlkit.train.arguments import dataloader_workers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert dataloader_workers(requested) == expected


@pytest.mark.parametrize("make", [clip, vlm], ids=["clip", "vlm"])
def test_bf16_without_an_accelerator_is_cpu_autocast(make, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = training_arguments(make({"bf16": True}).train, tmp_path)  # transformers refuses bf16 here without use_cpu
    assert args.bf16 and args.use_cpu
    assert not training_arguments(vlm({}).train, tmp_path).use_cpu  # fp32: the device is left to accelerate


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_is_bf16_only_where_the_cpu_computes_it(native, tmp_path, monkeypatch):
    import torch

    import vlkit.train.arguments as arguments

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(arguments, "cpu_has_native_bf16", lambda unknown=True: native)
    recipe = vlm({"bf16": "auto"})
    assert recipe.train.bf16 == "auto"
    args = training_arguments(recipe.train, tmp_path)
    assert args.bf16 is native and args.use_cpu is native  # an emulating CPU trains in float32


def test_bf16_accepts_only_booleans_and_auto():
    from vlkit.errors import ConfigError

    with pytest.raises(ConfigError, match="bf16"):
        vlm({"bf16": "fast"})


@pytest.mark.parametrize(("native", "emulated", "expected"), [(True, True, True), (False, True, False)],
                         ids=["ampere", "before-ampere"])
def test_bf16_auto_on_a_gpu_is_bf16_only_where_it_computes_it(native, emulated, expected, monkeypatch):
    """torch counts a GPU that emulates bf16 (V100, T4) as supporting it; `auto` asks for native bf16 only."""
    import vlkit.train.arguments as arguments

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or
                        (emulated and including_emulation))
    assert arguments.resolve_bf16("auto", on_cpu=False) is expected
    assert arguments.resolve_bf16(True, on_cpu=False)  # asked for: as asked


def test_the_recipe_decides_mixed_precision_over_the_launch_config(tmp_path, monkeypatch, caplog):
    """An accelerate config's `mixed_precision: bf16` (exported as ACCELERATE_MIXED_PRECISION) does not put a
    recipe whose train.bf16 is off under bf16 autocast; a recipe that asks for bf16 gets it."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with caplog.at_level("WARNING", logger="vlkit.train.arguments"):
        off = training_arguments(vlm({"bf16": False}).train, tmp_path)
    assert off.mixed_precision == "no" and not off.bf16
    assert "launch config asks for mixed_precision=bf16 but the recipe's train.bf16 is off" in caplog.text
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("vlkit.train.arguments.cpu_has_native_bf16", lambda unknown=True: True)
    assert training_arguments(vlm({"bf16": True}).train, tmp_path).mixed_precision == "bf16"


def test_a_plain_run_on_several_gpus_trains_on_one_not_data_parallel(tmp_path, monkeypatch, caplog):
    """Without a launcher the Trainer wraps the model in nn.DataParallel over every GPU it sees (n_gpu > 1) and
    multiplies the batch by their count; vlkit keeps one GPU and says how to use all of them."""
    from transformers.training_args import ParallelMode

    from vlkit.train.arguments import one_gpu_without_a_launcher

    args = training_arguments(vlm({"batch_size": 4}).train, tmp_path)
    args._n_gpu = 4  # as TrainingArguments finds on a machine with 4 GPUs and no launcher
    assert args.parallel_mode == ParallelMode.NOT_DISTRIBUTED and args.train_batch_size == 16
    with caplog.at_level("WARNING", logger="vlkit.train.arguments"):
        one_gpu_without_a_launcher(args)
    assert args.n_gpu == 1 and args.parallel_mode == ParallelMode.NOT_PARALLEL and args.train_batch_size == 4
    assert "4 GPUs and no launcher" in caplog.text and "--num_processes 4" in caplog.text


def test_clip_fp16_refuses_bf16_by_the_keys_names():
    """transformers refuses fp16 and bf16 together with its own message, at training start; the recipe says it
    first, naming train.bf16 (whose `auto` would be on wherever the GPU computes bf16)."""
    for bf16 in (True, "auto"):
        with pytest.raises(ConfigError, match=r"fp16 and bf16 .* set train.bf16: false to train in fp16"):
            clip({"fp16": True, "bf16": bf16})
    assert clip({"fp16": True}).train.fp16  # bf16's default is off


def test_a_deepspeed_launch_whose_precision_the_recipe_turns_off_is_refused_before_loading(monkeypatch):
    """Under DeepSpeed the launch config's mixed precision becomes DeepSpeed's own setting while TrainingArguments
    are made; a recipe training without it would stop at its first step, after loading. The dry run's checks
    refuse it; a recipe that asks for bf16, a launch without mixed precision, or DDP pass."""
    from vlkit.train.run import check_clip_recipe, check_launch_precision

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr("vlkit.train.arguments.cpu_has_native_bf16", lambda unknown=True: False)
    message = r"DeepSpeed launch config asks for mixed_precision=bf16 but this recipe trains without it"
    for train in ({"bf16": False}, {"bf16": "auto"}):  # auto: off where bf16 is not native (here)
        with pytest.raises(ConfigError, match=message):
            check_launch_precision(vlm(train).train)
    with pytest.raises(ConfigError, match=message):
        check_clip_recipe(clip({}))  # before its data files are looked for
    check_launch_precision(vlm({"bf16": True}).train)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    check_launch_precision(vlm({}).train)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    check_launch_precision(vlm({}).train)  # DDP/FSDP: the recipe wins (recipe_precision)
