"""LLaVA-1.5-7B-shaped instruct step on one GPU: vlkit versus stock Llava, steps/s and MFU.

    python bench/gpu.py                 # CLIP ViT-L/14-336 + Llama-2-7B configs, random weights, bf16, cuda
    python bench/gpu.py --qlora         # also the QLoRA step and its peak GPU memory (saves the 7B LLM: ~13.5 GB of disk)
    python bench/gpu.py --toy --no-append        # the same code at toy size on CPU (tests)

Random weights (the speed of a model does not depend on its values), built from configs:
the vision tower is CLIP ViT-L/14 at 336 px (576 patches, feature layer -2), the LLM Llama-2-7B
(vocab 32064 with the image token, as llava-1.5-7b-hf), an mlp connector, LoRA r=128 alpha=256
dropout 0.05 on every linear layer of the LLM (recipes/llava-1.5-7b/instruct.yaml). The batch:
`--batch-size` samples of 576 image tokens + a prompt + an answer of varied length, answers
supervised. One step = zero_grad, forward(labels), backward, AdamW (connector + LoRA):

- vlkit: packed batch, LM head at labelled positions only, frozen weights build no gradients;
- vlkit-fp32-lora: vlkit with the LoRA weights in float32 under bf16 autocast, as `vlkit train` runs a
  bf16 model (peft keeps adapters in float32; the Trainer's `bf16` is autocast). Against vlkit (LoRA
  weights in bf16, no autocast) it measures the "LoRA in bf16" lever. (Toy size: float32 both.)
- vlkit-flat: vlkit with `data.packing: flat` and flex attention (`model.attn_implementation:
  flex_attention`): the batch in one row, no pad token, each sample's causal block only. Against vlkit
  it measures the padding-free lever. (At toy size on CPU the LLM uses eager attention: flex attention
  has no backward there.)
- vlkit-flat-sdpa: the same one-row batch with sdpa run per sample (`vlkit.per_sample_sdpa`: the
  samples laid out as rows for one causal sdpa call per layer, the rest of each layer on real tokens
  only), what CPU training uses; against vlkit-flat it shows what a variable-length kernel adds.
- vlkit-compiled: vlkit with `train.compile` (the LLM's decoder layers compiled in place,
  vlkit/train/compile.py); the variants above and the stock ones run eager;
- vlkit-compiled-flat: both levers, vlkit-flat with the decoder layers compiled;
- llava-frozen: stock `LlavaForConditionalGeneration` sharing the same weight tensors, LoRA via
  peft, padded batch, tower and LLM frozen by hand;
- llava-plain: the same with the tower left trainable as loaded (a plain loop).
- vlkit-liger (a GPU, or CPU under TRITON_INTERPRET=1; needs `pip install liger-kernel`): vlkit with
  Liger Kernel's fused RMSNorm, SwiGLU and rotary kernels patched into the LLM (its fused linear
  cross-entropy is left out: vlkit's head already runs at labelled positions only). Its loss is checked
  first against vlkit's at the same weights (the variants timed before it took optimizer steps), and
  Liger's patches (transformers' Llama module, the LLM's modules) are undone after its steps. Against
  vlkit it measures the fused-kernel lever. Timed after vlkit-flat, before the layers are compiled.
The variants are timed in the order vlkit, vlkit-fp32-lora, vlkit-flat, vlkit-flat-sdpa, vlkit-liger, vlkit-compiled,
vlkit-compiled-flat, llava-frozen, llava-plain, so the layers are compiled only after the eager vlkit
variants ran.
- vlkit-qlora (with `--qlora`, after the others, which are freed first): the LLM saved and loaded
  back in 4-bit with vlkit's one quantization config (NF4, double quantization;
  `vlkit.run_folder.quantization_config`), LoRA as above on top (`tune.llm: qlora`). Its row gives
  the peak GPU memory of its own steps: whether a 24 GB card fits the recipe.

MFU = the FLOPs the step must do (`parts.train_step_flops`) / step time / the best bf16 matmul rate
measured in this process. Goals on an H100/H200: MFU >= 50% and >= 1.3x stock Llava (both stock
variants are given a verdict). A variant that fails prints its error in its row; the others still run.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import gc
import os
import shutil
import statistics
import sys
import tempfile
import weakref

import torch
from common import (
    add_run_options,
    interleaved,
    markdown_table,
    matmul_peak,
    median_ratio,
    publish,
    start,
    verdict,
)
from parts import llava_twin, lora_on_llava, train_step_flops, trainable

MFU_GOAL = 0.50
SPEEDUP_GOAL = 1.3
IMAGE_TOKEN_ID = 32000

VISION_7B = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"}
TEXT_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
VISION_TOY = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8, "projection_dim": 32, "hidden_act": "quick_gelu"}
TEXT_TOY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 4, "vocab_size": 32064, "max_position_embeddings": 4096}
LORA = {"r": 128, "alpha": 256.0, "dropout": 0.05}
LORA_TOY = {"r": 4, "alpha": 8.0, "dropout": 0.05}


def build_model(toy: bool, device: torch.device, dtype: torch.dtype):
    """A VlkitForConditionalGeneration from configs, random weights, on `device` in `dtype`."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from vlkit.modeling import VlkitConfig, VlkitForConditionalGeneration

    vision_config = CLIPVisionConfig(**(VISION_TOY if toy else VISION_7B), attn_implementation="sdpa")
    text_config = LlamaConfig(**(TEXT_TOY if toy else TEXT_7B), attn_implementation="sdpa")
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = VlkitConfig(vision_config=vision_config, text_config=text_config,
                         connector_config={"type": "mlp", "depth": 2}, image_token_id=IMAGE_TOKEN_ID,
                         image_seq_length=patches, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         vision_num_prefix_tokens=1)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a 7B model is not built in fp32 first
    try:
        with device:
            tower = CLIPVisionModel(vision_config)
            llm = LlamaForCausalLM(text_config)
            model = VlkitForConditionalGeneration(config, vision_tower=tower, language_model=llm)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to(device=device, dtype=dtype)
    model.use_loss_at_labels()  # as vlkit's training does
    return model


def qlora_model(config, tower: torch.nn.Module, llm_folder: str, lora: dict, device: torch.device,
                dtype: torch.dtype):
    """The VLM with its LLM loaded from `llm_folder` in 4-bit, as a `tune.llm: qlora` stage loads it (vlkit's
    one quantization config), the tower shared, a new connector, and LoRA through `apply_adapters`."""
    from transformers import AutoModelForCausalLM

    from vlkit.config import TuneSection
    from vlkit.modeling import VlkitForConditionalGeneration
    from vlkit.run_folder import quantization_config
    from vlkit.train.stages import apply_adapters, set_trainable

    llm = AutoModelForCausalLM.from_pretrained(llm_folder, dtype=dtype, quantization_config=quantization_config(dtype),
                                               device_map={"": device})
    model = VlkitForConditionalGeneration(config, vision_tower=tower, language_model=llm)
    model.connector.to(device=device, dtype=dtype)
    tune = TuneSection(llm="qlora", lora_r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"])
    apply_adapters(model, tune)
    set_trainable(model, tune)
    model.use_loss_at_labels()  # after set_trainable, as the stage runs it (its eval forward must not repack 4-bit weights)
    return model  # LoRA weights in float32, as peft makes them: the step runs under autocast, as the Trainer's


def samples(model, batch_size: int, toy: bool, generator: torch.Generator) -> list[dict]:
    """LLaVA-instruct-like token sequences: system/user prompt, image tokens, question, answer (supervised)."""
    config = model.config
    items = []
    for _ in range(batch_size):
        prompt = int(torch.randint(8, 16, (), generator=generator)) if toy else int(torch.randint(30, 60, (), generator=generator))
        answer = int(torch.randint(4, 24, (), generator=generator)) if toy else int(torch.randint(40, 500, (), generator=generator))
        text = torch.randint(0, IMAGE_TOKEN_ID, (prompt + answer,), generator=generator)
        ids = torch.cat([text[:prompt], torch.full((config.image_seq_length,), IMAGE_TOKEN_ID), text[prompt:]])
        labels = torch.full_like(ids, -100)
        labels[-answer:] = ids[-answer:]
        size = config.vision_config.image_size
        items.append({"input_ids": ids, "labels": labels, "pixel_values": torch.randn(1, 3, size, size, generator=generator)})
    return items


@contextlib.contextmanager
def llm_attention(module, implementation: str | None):
    """Within the block, the LLM's attention runs `implementation` (None: as loaded)."""
    from vlkit.compat import attention_implementation, set_attention_implementation

    if implementation is None:
        yield
        return
    config = module.language_model.config
    before = attention_implementation(config)
    set_attention_implementation(config, implementation)
    try:
        yield
    finally:
        set_attention_implementation(config, before)


@contextlib.contextmanager
def lora_weights_in(model, dtype: torch.dtype):
    """Within the block the LoRA weights are `dtype` (the same values, rounded back afterwards)."""
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    before = lora[0].dtype
    for parameter in lora:
        parameter.data = parameter.data.to(dtype)
    try:
        yield
    finally:
        for parameter in lora:
            parameter.data = parameter.data.to(before)


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants",
                        default="vlkit,vlkit-fp32-lora,vlkit-flat,vlkit-flat-sdpa,vlkit-liger,vlkit-compiled,vlkit-compiled-flat,"
                                "llava-frozen,llava-plain")
    parser.add_argument("--qlora", action="store_true", help="also time vlkit-qlora and report its peak memory")
    parser.add_argument("--toy", action="store_true", help="toy-size configs on CPU in float32 (tests)")
    add_run_options(parser)
    args = parser.parse_args(argv)
    start(args)
    from vlkit.config import TuneSection
    from vlkit.data import VlkitCollator
    from vlkit.per_sample_sdpa import PER_SAMPLE_SDPA
    from vlkit.train.stages import apply_adapters, set_trainable

    if args.toy:
        device, dtype, args.rounds = torch.device("cpu"), torch.float32, 1
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        raise SystemExit("no GPU: bench/gpu.py measures a 7B model on a GPU; use --toy to check it on CPU")
    names = [n for n in args.variants.split(",") if n]
    notes = []
    if device.type != "cuda" and "vlkit-liger" in names and os.environ.get("TRITON_INTERPRET") != "1":
        names.remove("vlkit-liger")  # Triton's interpreter runs them on CPU, slowly (docs/performance.md)
        notes.append("- vlkit-liger: not run (Liger Kernel's kernels are Triton: a GPU, or TRITON_INTERPRET=1)")
    lora = LORA_TOY if args.toy else LORA
    model = build_model(args.toy, device, dtype)
    llm_folder = tempfile.mkdtemp() if args.qlora else None
    if llm_folder:  # the base a qlora stage would load in 4-bit, before LoRA wraps it
        atexit.register(shutil.rmtree, llm_folder, ignore_errors=True)  # 13.5 GB at 7B, even if a step fails
        model.language_model.save_pretrained(llm_folder)
    twins = {name: llava_twin(model) for name in names if name.startswith("llava")}
    tune = TuneSection(llm="lora", lora_r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"])
    apply_adapters(model, tune)
    set_trainable(model, tune)
    model.to(device=device, dtype=dtype)  # the LoRA weights too
    for name, llava in twins.items():
        llava.train().requires_grad_(False)
        llava.model.multi_modal_projector.requires_grad_(True)
        llava.model.vision_tower.requires_grad_(name == "llava-plain")
        lora_on_llava(llava, lora["r"], lora["alpha"], lora["dropout"])
        llava.to(device=device, dtype=dtype)
    items = samples(model, args.batch_size, args.toy, torch.Generator().manual_seed(0))
    padded = to_device(VlkitCollator(0)(items), device, dtype)
    packed = to_device(VlkitCollator(0, pack=True)(items), device, dtype)
    flat = to_device(VlkitCollator(0, pack="flat")(items), device, dtype)
    flat_attention = "eager" if device.type == "cpu" else "flex_attention"  # flex has no backward on CPU

    def step_of(module, batch, params=None, compiled=False, autocast=False, attention=None):
        """One timed step: AdamW on `params` (default: the module's trainable weights)."""
        optimizer = torch.optim.AdamW(params if params is not None else trainable(module))

        def step():
            with contextlib.nullcontext() if compiled else torch.compiler.set_stance("force_eager"), \
                    torch.autocast(device.type, dtype=dtype, enabled=autocast), llm_attention(module, attention):
                optimizer.zero_grad(set_to_none=True)
                module(**batch).loss.backward()
                optimizer.step()
        return step

    # Same weights, same samples: the same loss on every side (checked before timing).
    losses = {}
    checked = [("vlkit", model, packed, None), *((n, t, padded, None) for n, t in twins.items())]
    if "vlkit-flat" in names or "vlkit-compiled-flat" in names:
        checked.append(("vlkit-flat", model, flat, flat_attention))
    if "vlkit-flat-sdpa" in names:
        checked.append(("vlkit-flat-sdpa", model, flat, PER_SAMPLE_SDPA))
    for name, module, batch, attention in checked:
        module.eval()
        with torch.no_grad(), llm_attention(module, attention):
            losses[name] = float(module(**batch).loss)
        module.train()
    model.vision_tower.eval()  # frozen parts stay in eval mode, as `set_trainable` left them
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    if any(abs(loss - losses["vlkit"]) > tolerance * max(1.0, abs(losses["vlkit"])) for loss in losses.values()):
        raise SystemExit(f"benchmark invalid: losses differ {losses}")

    steps, settings = {}, {}
    if "vlkit" in names:
        steps["vlkit"] = step_of(model, packed)
    if "vlkit-fp32-lora" in names:
        steps["vlkit-fp32-lora"] = step_of(model, packed, autocast=dtype != torch.float32)
        settings["vlkit-fp32-lora"] = lambda: lora_weights_in(model, torch.float32)
    if "vlkit-flat" in names:  # timed before the layers are compiled; the flex kernel is compiled by transformers
        steps["vlkit-flat"] = step_of(model, flat, compiled=True, attention=flat_attention)
    if "vlkit-flat-sdpa" in names:
        steps["vlkit-flat-sdpa"] = step_of(model, flat, attention=PER_SAMPLE_SDPA)

    @contextlib.contextmanager
    def liger_kernels_on():
        """Liger's RMSNorm, SwiGLU and rotary kernels in the LLM while its variant is timed; the loss must stay
        vlkit's at the same weights (measured here: the variants timed before took optimizer steps). Liger
        patches transformers' Llama module for the whole process and the LLM's modules in place: both are put
        back after, so the variants timed later (compiled, stock, QLoRA) run without it."""
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        from transformers.models.llama import modeling_llama

        process_wide = {name: getattr(modeling_llama, name) for name in ("apply_rotary_pos_emb", "LlamaRMSNorm",
                                                                          "LlamaMLP")}
        in_place = {module: dict(module.__dict__) for module in model.language_model.modules()}

        def undo() -> None:
            for name, value in process_wide.items():
                setattr(modeling_llama, name, value)
            for module, attributes in in_place.items():
                module.__dict__.clear()
                module.__dict__.update(attributes)

        def loss_with(**kernels) -> float:
            if any(kernels.values()):
                apply_liger_kernel_to_llama(**kernels, cross_entropy=False, fused_linear_cross_entropy=False,
                                            model=model.language_model.get_base_model())
            model.eval()
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                loss = float(model(**packed).loss)
            model.train()
            model.vision_tower.eval()
            return loss

        kernels = ("rope", "rms_norm", "swiglu")
        without = loss_with(**dict.fromkeys(kernels, False))

        def off(loss: float) -> bool:
            return abs(loss - without) > tolerance * max(1.0, abs(without))

        try:
            loss = loss_with(**dict.fromkeys(kernels, True))
            if off(loss):  # which kernel changes it: each alone, so the next run knows where to look
                alone = {}
                for kernel in kernels:
                    undo()
                    alone[kernel] = loss_with(**{k: k == kernel for k in kernels})
                raise ValueError(f"with Liger kernels the loss is {loss:.6f}, vlkit's {without:.6f}; "
                                 + ", ".join(f"{k} alone {v:.6f}" for k, v in alone.items()))
            yield
        finally:
            undo()

    if "vlkit-liger" in names:  # before the layers are compiled: eager, with the last layer trimmed as vlkit's
        steps["vlkit-liger"] = step_of(model, packed)
        settings["vlkit-liger"] = liger_kernels_on

    @functools.cache
    def layers_compiled() -> contextlib.nullcontext:
        """The LLM's decoder layers compiled in place, once, when the first compiled variant is timed."""
        from vlkit.train.compile import compile_decoder_layers

        compile_decoder_layers(model, around_cache=False)  # LoRA trains the LLM: no shared prefix, no cache
        return contextlib.nullcontext()

    if "vlkit-compiled" in names:
        steps["vlkit-compiled"] = step_of(model, packed, compiled=True)
        settings["vlkit-compiled"] = layers_compiled
    if "vlkit-compiled-flat" in names:
        steps["vlkit-compiled-flat"] = step_of(model, flat, compiled=True, attention=flat_attention)
        settings["vlkit-compiled-flat"] = layers_compiled
    for name, llava in twins.items():
        steps[name] = step_of(llava, padded, [p for n, p in llava.named_parameters()
                                              if "lora_" in n or "multi_modal_projector" in n])
    peak = matmul_peak(dtype, device, n=512 if args.toy else 8192)
    lengths = [len(item["input_ids"]) for item in items]
    flops = sum(train_step_flops(model, lengths, int((padded["labels"][:, 1:] != -100).sum()), len(items),
                                 tower_runs=True).values())
    rows, times = [], {}
    # One at a time, in the order above (the compiled variants after the eager ones): a 7B step may run out of
    # memory on its own.
    for name in list(steps):
        step = steps.pop(name)  # timed once: its AdamW state goes with it, not held while the others run
        try:
            with settings.get(name, contextlib.nullcontext)():
                times.update(interleaved({name: step}, rounds=args.rounds))
        except torch.OutOfMemoryError:
            rows.append([name, "out of memory", "", "", ""])
        except Exception as error:  # noqa: BLE001 - one variant's failure must not cost the others' figures
            rows.append([name, f"failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}", "", "", ""])
        step = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if llm_folder:
        config, tower = model.config, model.vision_tower
        full_precision = [weakref.ref(module) for module in (model, *twins.values())]
        # The bf16 LLM leaves the GPU, so that the peak below is the QLoRA step's own: every name that holds
        # a model, its step (optimizer state) or a closure over it goes.
        model = twins = steps = settings = llava = checked = module = step = None
        gc.collect()
        if any(alive() is not None for alive in full_precision):
            raise SystemExit("benchmark invalid: the full-precision models outlive their steps, so the QLoRA "
                             "step's peak memory would count them")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        quantized = qlora_model(config, tower, llm_folder, lora, device, dtype)
        shutil.rmtree(llm_folder, ignore_errors=True)
        step = step_of(quantized, packed, autocast=dtype != torch.float32)
        peak_rss: dict[str, float] = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            times.update(interleaved({"vlkit-qlora": step}, rounds=args.rounds, peak_rss=peak_rss))
            memory = (f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda"
                      else f"peak RSS {peak_rss['vlkit-qlora'] / 1024:.2f} GiB (CPU)")
            notes.append(f"- vlkit-qlora (4-bit NF4 LLM, LoRA r={lora['r']}, batch {args.batch_size}): {memory}, "
                         "tower, connector, LoRA, AdamW state and activations included")
        except torch.OutOfMemoryError:
            rows.append(["vlkit-qlora", "out of memory", "", "", ""])
    reference = times.get("vlkit")
    for name, series in times.items():
        seconds = statistics.median(series)
        speedup = "1.00 (ref.)" if name == "vlkit" else f"{median_ratio(series, reference):.2f}x" if reference else "-"
        rows.append([name, f"{seconds:.3f}", f"{args.batch_size / seconds:.2f}", speedup,
                     f"{100 * flops / seconds / peak:.1f}%"])
    table = markdown_table(["variant", "s/step", "samples/s", "vlkit speed-up", "MFU"], rows)
    size = "toy" if args.toy else "LLaVA-1.5-7B-shaped"
    lines = [f"{size}, {dtype}, batch {args.batch_size} ({sum(lengths)} tokens, padded {padded['input_ids'].numel()}, "
             f"packed {packed['input_ids'].numel()}, flat {flat['input_ids'].numel()}), matmul peak {peak / 1e12:.2f} TFLOP/s, {flops / 1e12:.2f} TFLOP/step."]
    for name in ("vlkit", "vlkit-fp32-lora", "vlkit-flat", "vlkit-flat-sdpa", "vlkit-compiled", "vlkit-compiled-flat",
                 "vlkit-liger"):
        if name in times:
            mfu = 100 * flops / statistics.median(times[name]) / peak
            lines.append(f"- instruct MFU ({name}): {verdict(mfu, 100 * MFU_GOAL, '%')}")
            for stock in (n for n in ("llava-frozen", "llava-plain") if n in times):
                lines.append(f"- {name} vs {stock}: {verdict(median_ratio(times[stock], times[name]), SPEEDUP_GOAL)}")
    body = "\n".join([lines[0], "", table, "", *lines[1:], *notes])
    publish(f"GPU instruct step ({size}): vlkit vs stock Llava", body, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
