"""The one place vlkit touches transformers' and accelerate's internals, or names that moved between releases.

Everything else in vlkit uses transformers' public API. What is here has no public form (or had
another name in a release `pyproject.toml` allows); `tests/test_compat.py` holds one small test
per item, so the next upstream rename breaks one clearly named test instead of the whole suite.
"""

from __future__ import annotations

from typing import Any

import torch

# The key/value cache's keyword: `past_key_values` until transformers 5.23, `cache` from 5.24. vlkit
# never names it in a call; it passes whatever generation hands it through untouched.
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")


def cache_argument(kwargs: dict[str, Any]) -> Any | None:
    """The cache a caller passed, under whichever name the installed transformers uses (None if none)."""
    for name in CACHE_ARGUMENT_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_keyword(forward: Any) -> str:
    """The name under which this decoder's `forward` takes a key/value cache."""
    import inspect

    parameters = inspect.signature(forward).parameters
    return next(name for name in CACHE_ARGUMENT_NAMES if name in parameters)


def cpu_has_native_bf16(unknown: bool = True) -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX); torch has only private probes.

    Where the probes are gone, `unknown` is the answer: the warning assumes yes (it stays quiet);
    `train.bf16: auto` assumes no (float32 is never the slow choice).
    """
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [probe for probe in probes if probe is not None]
    return any(probe() for probe in probes) if probes else unknown


def __getattr__(name: str) -> Any:
    """`PREFIX_CHECKPOINT_DIR`, `rotate_checkpoints` and `SCHEDULER_NAME`: the Trainer's checkpoint folders.

    Loaded on first use: `transformers.trainer_utils` imports peft and bitsandbytes, which the model
    code (shipped inside exports too) does not need.
    """
    if name in ("PREFIX_CHECKPOINT_DIR", "rotate_checkpoints"):
        from transformers import trainer_utils

        return getattr(trainer_utils, name)
    if name == "SCHEDULER_NAME":  # the file name of the scheduler state in a Trainer checkpoint
        from transformers import trainer

        return trainer.SCHEDULER_NAME
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def mark_pretrained(module: torch.nn.Module) -> None:
    """Tell `PreTrainedModel.post_init` that every submodule already holds loaded weights.

    transformers skips its weight initialisation for modules flagged `_is_hf_initialized`; there is
    no public switch for "these parts came from `from_pretrained`, keep them".
    """
    for submodule in module.modules():
        submodule._is_hf_initialized = True


def attention_implementation(config) -> str | None:
    """The attention implementation a (sub-)config was loaded with ("sdpa", "eager", ...)."""
    return config._attn_implementation


def set_attention_implementation(config, value: str) -> None:
    """Set a config's attention implementation in place (a model built from it uses that kernel)."""
    config._attn_implementation = value


def treat_cpu_group_as_accelerator_group() -> None:
    """Make accelerate shard with FSDP on a CPU (gloo) process group.

    accelerate turns only accelerator process groups (MULTI_GPU, MULTI_XPU, ...) into FSDP and would
    train a CPU group plain data parallel, without a word. No public switch exists, so the shared
    state's type is relabelled MULTI_GPU (the device stays the CPU); the Trainer must then keep that
    state (`accelerator_config={"use_configured_state": True}`).
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)  # the gloo group
    if state.distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def reruns_in_backward(decoder: torch.nn.Module) -> bool:
    """Whether the decoder or one of its layers runs its forward again in the backward (activation
    checkpointing): transformers' `gradient_checkpointing` flag, or torch's `checkpoint_wrapper` around it
    (FSDP's activation checkpointing), which neither sets the flag nor shows it through the wrapper."""
    return any(getattr(module, "gradient_checkpointing", False) or hasattr(module, "_checkpoint_wrapped_module")
               for module in (decoder, *getattr(decoder, "layers", ())))


def no_split_module_names(model: torch.nn.Module) -> list[str]:
    """Class names of the blocks a model must not be split inside (what FSDP wraps one by one)."""
    return list(getattr(model, "_no_split_modules", None) or [])


# The Trainer's private hooks `vlkit.train.trainer.VlkitTrainer` overrides, each for something the Trainer
# has no public hook for. Name -> (the parameters the override relies on, why it exists); a test checks
# the Trainer still has each with those parameters and quotes the reason when one is gone.
TRAINER_HOOKS = {
    "_save_checkpoint": (("model", "trial"), "a checkpoint is written into a staging folder and renamed into "
                         "place, so a kill mid-save never leaves a checkpoint that looks complete"),
    "_load_from_checkpoint": (("resume_from_checkpoint", "model"), "resuming loads only the trained weights "
                              "(trainable.safetensors) after checking the frozen bases are unchanged"),
    "_save_optimizer_and_scheduler": (("output_dir",), "under FSDP the Trainer would also write the whole "
                                      "model (bases included, gigabytes); vlkit saves only the optimizer shards"),
}
