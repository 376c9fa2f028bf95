"""The LLM's last decoder layer computing its position-wise parts only where labels are.

With labels-only logits (`VlkitForConditionalGeneration.head_loss`) the LM head reads the last decoder
layer's output at the supervised positions alone. The other positions of that layer feed no loss: their
keys and values are still needed (supervised positions attend to them), but not their query projection,
attention output projection or MLP. `last_layer_at(layer, batch_shape, where)` runs those three at the
selected positions only: a hook gathers each one's input rows and scatters its output back among zeros,
so the positions elsewhere carry values nothing reads. It saves about (1 - supervised share) / num_layers of the
LLM's work: SmolLM2 has 30 layers, and 11-20% of the bench batches' positions are supervised; a LoRA
instruct step on CPU ran 1.02x faster for it, an align step 1.015x (same process, bench/train_step.py's
batches).

`trims_last_layer(decoder, hidden_size)` checks once per model that the trimmed layer gives the full
layer's output at the selected positions (an LLM whose MLP mixes positions or returns more than a tensor
fails it and keeps the full layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from vlkit.compat import reruns_in_backward

# The parts of a decoder layer that act on each position alone (HF naming: Llama, Qwen, Mistral, Gemma, ...).
POSITION_WISE_PARTS = ("self_attn.q_proj", "self_attn.o_proj", "mlp")


def last_decoder_layer(decoder: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder's last layer (HF decoders keep them in `.layers`), or None."""
    layers = getattr(decoder, "layers", None)
    return layers[-1] if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def position_wise_parts(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of POSITION_WISE_PARTS that `layer` has (a fused qkv projection has no q_proj)."""
    parts = []
    for path in POSITION_WISE_PARTS:
        module = layer
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, torch.nn.Module):
            parts.append(module)
    return parts


def hooks_see_every_call(decoder: torch.nn.Module, layer: torch.nn.Module) -> bool:
    """Whether hooks put on `layer`'s parts for one forward see every call of them, in that forward only.

    Not where train.compile compiled the layer or a part of it (hooks added each step would recompile
    it), nor where the layer is checkpointed: the backward reruns it after the hooks are gone, through
    transformers' gradient checkpointing or torch's `checkpoint_wrapper` (FSDP's activation checkpointing).
    """
    if any(getattr(module, "_compiled_call_impl", None) is not None for module in layer.modules()):
        return False
    return not reruns_in_backward(decoder)


@contextlib.contextmanager
def last_layer_at(layer: torch.nn.Module, batch_shape: tuple[int, int],
                  where: tuple[torch.Tensor, torch.Tensor]) -> Iterator[None]:
    """Within the block, `layer`'s position-wise parts run at `where` (rows, positions) of a [B, T] batch only.

    The positions are index tensors, not a mask: gathering and scattering with them needs no read of how
    many there are, which on a GPU would make the host wait for the work queued before the layer."""

    def gather(module, args):
        if args and isinstance(args[0], torch.Tensor) and tuple(args[0].shape[:-1]) == batch_shape:
            return (args[0][where], *args[1:])
        return None

    def scatter(module, args, output):
        gathered = args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2
        if gathered and isinstance(output, torch.Tensor):
            return output.new_zeros(*batch_shape, output.shape[-1]).index_put(where, output)
        return None

    handles = []
    try:
        for part in position_wise_parts(layer):
            handles += [part.register_forward_pre_hook(gather), part.register_forward_hook(scatter)]
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def trims_last_layer(decoder: torch.nn.Module, hidden_size: int) -> bool:
    """Whether `last_layer_at` gives this decoder's own output at the selected positions (a one-time probe)."""
    layer = last_decoder_layer(decoder)
    if layer is None or not position_wise_parts(layer):
        return False
    embedding = decoder.get_input_embeddings().weight  # its dtype, not a 4-bit layer's storage type
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 8, hidden_size, generator=generator).to(embedding.device, embedding.dtype)
    selected = torch.rand(2, 8, generator=generator).to(embedding.device) < 0.4
    was_training = decoder.training
    decoder.eval()  # no dropout in the comparison
    try:
        full = decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state
        with last_layer_at(layer, tuple(selected.shape), selected.nonzero(as_tuple=True)):
            trimmed = decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state
    except Exception:  # a layer whose parts take other inputs: keep the full layer
        return False
    finally:
        decoder.train(was_training)
    tolerance = 1e-4 if full.dtype == torch.float32 else 3e-2
    return bool(torch.allclose(trimmed[selected].float(), full[selected].float(), rtol=tolerance, atol=tolerance))
