"""`train.compile`: the LLM's decoder layers compiled with torch.compile, one region per layer.

Every decoder layer has the same code, so compiling layer by layer (regional compilation) compiles
it once and reuses it for the others, instead of compiling the whole model as one graph. The
layers are compiled in place (`Module.compile`), so parameter names, checkpoints, `trainable.safetensors`
and exports are the same as without it. Shapes are dynamic: packed batches change length every step
and must not recompile.

The shared prompt prefix (`data.share_prefix`, align) passes the decoder a key/value cache, and a
compiled layer guards on its own slot in it: each layer would compile anew. While the prefix may be
shared, the parts of a layer that take no cache (the MLP, the norms) are compiled instead.

On CPU it fuses the elementwise work around the matmuls (norms, SwiGLU, rotary, LoRA's scale and
add); on a GPU it also launches fewer kernels. The first step pays the compile. The stage compiles
after the model's one-time probes and evaluates eagerly (vlkit.train.run.compile_if_asked,
VlkitTrainer.prediction_step): a no-grad call through compiled layers compiles them once more. Four
steps of the tiny instruct recipe on 2 CPU cores (batch 8) took 39.2 s compiled, 66.7 s when the probes
and the evaluation each compiled too, 27.5 s eager. `bench/train_step.py` measures the step
(vlkit-compiled); docs/performance.md.
"""

from __future__ import annotations

import inspect
import logging

import torch

from vlkit.compat import CACHE_ARGUMENT_NAMES, no_split_module_names
from vlkit.errors import ConfigError

logger = logging.getLogger(__name__)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The LLM's repeated blocks (the classes it must not be split inside), in order."""
    language_model = model.language_model
    blocks = set(no_split_module_names(language_model)) or set(no_split_module_names(model))
    return [module for module in language_model.modules() if type(module).__name__ in blocks]


def takes_cache(module: torch.nn.Module) -> bool:
    parameters = inspect.signature(module.forward).parameters
    return any(name in parameters for name in CACHE_ARGUMENT_NAMES)


def compile_decoder_layers(model: torch.nn.Module, around_cache: bool) -> list[torch.nn.Module]:
    """Compile the LLM's decoder layers in place; return the modules compiled.

    around_cache: the decoder may be given a key/value cache in training (the shared prefix), so
    compile each layer's parts that take none rather than the layer itself.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"train.compile: found no decoder layers in {type(model.language_model).__name__} "
                         "(no _no_split_modules); turn train.compile off for this LLM")
    regions = [part for layer in layers for part in layer.children() if not takes_cache(part)] if around_cache \
        else layers
    for region in regions:
        region.compile(dynamic=True)
    logger.info("train.compile: %d regions compiled (%s)", len(regions),
                "each layer's parts that take no cache" if around_cache else "whole decoder layers")
    return regions
