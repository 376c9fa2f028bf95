"""One test per item of `vlkit.compat`: when transformers renames one, exactly one of these fails."""

from __future__ import annotations

import inspect

import torch
from conftest import tiny_llama_config
from transformers import LlamaConfig, LlamaForCausalLM

from vlkit import compat


def test_generation_hands_the_cache_under_a_known_name():
    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_llama_config(64)).eval()
    assert any(name in inspect.signature(llm.forward).parameters for name in compat.CACHE_ARGUMENT_NAMES)
    seen = []
    forward = llm.forward

    def spy(*args, **kwargs):
        seen.append(compat.cache_argument(kwargs))
        return forward(*args, **kwargs)

    llm.forward = spy
    llm.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert len(seen) == 3 and seen[1] is not None and seen[1] is seen[2]  # decoding steps reuse one cache


def test_a_decoder_names_its_cache_keyword_and_fills_a_cache_passed_under_it():
    from transformers import DynamicCache

    torch.manual_seed(0)
    decoder = LlamaForCausalLM(tiny_llama_config(64)).eval().get_decoder()
    name = compat.cache_keyword(decoder.forward)
    cache = DynamicCache(config=decoder.config)
    decoder(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **{name: cache})
    assert cache.get_seq_length() == 3


def test_mark_pretrained_keeps_loaded_weights_through_post_init():
    from conftest import tiny_clip_vision_config

    from vlkit import VlkitConfig, VlkitForConditionalGeneration

    torch.manual_seed(1)
    llm = LlamaForCausalLM(tiny_llama_config(64))
    before = {name: tensor.clone() for name, tensor in llm.state_dict().items()}
    config = VlkitConfig(vision_config=tiny_clip_vision_config(), text_config=llm.config, image_token_id=63)
    model = VlkitForConditionalGeneration(config, language_model=llm)  # post_init runs the init pass
    after = model.language_model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_attention_implementation_reads_and_sets_a_configs_kernel():
    config = LlamaConfig(**tiny_llama_config(64).to_dict(), attn_implementation="eager")
    assert compat.attention_implementation(config) == "eager"
    compat.set_attention_implementation(config, "sdpa")
    assert compat.attention_implementation(config) == "sdpa"
    assert LlamaForCausalLM(config).config._attn_implementation == "sdpa"


def test_checkpoint_folders_rotate_by_step(tmp_path):
    for step in (5, 10, 15):
        (tmp_path / f"{compat.PREFIX_CHECKPOINT_DIR}-{step}").mkdir()
    compat.rotate_checkpoints(output_dir=str(tmp_path), save_total_limit=2, use_mtime=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-15"]
    assert compat.SCHEDULER_NAME == "scheduler.pt"  # what the Trainer's resume reads back


def test_accelerate_keeps_the_distributed_type_in_its_shared_state():
    # treat_cpu_group_as_accelerator_group relabels this entry; a single process has no group to relabel.
    from accelerate import PartialState

    state = PartialState(cpu=True)
    assert PartialState._shared_state["distributed_type"] is state.distributed_type
    compat.treat_cpu_group_as_accelerator_group()
    assert PartialState().distributed_type is state.distributed_type  # NO stays NO


def test_reruns_in_backward_sees_transformers_checkpointing_and_torchs_wrapper():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = LlamaForCausalLM(tiny_llama_config(64))
    assert not compat.reruns_in_backward(model.model)
    model.activation_checkpointing_enable()
    assert compat.reruns_in_backward(model.model)
    model.activation_checkpointing_disable()
    model.model.layers[-1] = checkpoint_wrapper(model.model.layers[-1])
    assert compat.reruns_in_backward(model.model)


def test_no_split_module_names_lists_a_models_blocks():
    llm = LlamaForCausalLM(tiny_llama_config(64))
    assert "LlamaDecoderLayer" in compat.no_split_module_names(llm)


def test_the_trainer_still_has_the_hooks_vlkit_overrides():
    from transformers import Trainer

    from vlkit.train.clip import ClipTrainer
    from vlkit.train.trainer import VlkitTrainer

    # Every vlkit class between a stage's Trainer and transformers' (the staged checkpoints are shared).
    vlkit_classes = {cls for trainer in (VlkitTrainer, ClipTrainer) for cls in trainer.__mro__
                     if issubclass(cls, Trainer) and cls is not Trainer}
    overridden = {name for cls in vlkit_classes for name in cls.__dict__ if name.startswith("_") and not name.startswith("__")}
    for name, (parameters, why) in compat.TRAINER_HOOKS.items():
        assert hasattr(Trainer, name), f"transformers.Trainer no longer has {name}, which vlkit overrides: {why}"
        assert tuple(inspect.signature(getattr(Trainer, name)).parameters)[1:] == parameters, f"{name}: {why}"
        assert name in overridden  # and vlkit overrides exactly these
    assert overridden <= set(compat.TRAINER_HOOKS)


def test_cpu_bf16_probe_answers_and_the_warning_names_the_fix(monkeypatch, tmp_path, caplog):
    import vlkit.compat
    import vlkit.train.arguments as arguments
    from vlkit.config import BaseTrainSection

    assert hasattr(torch.cpu, "_is_avx512_bf16_supported") and hasattr(torch.cpu, "_is_amx_tile_supported")
    assert isinstance(vlkit.compat.cpu_has_native_bf16(), bool)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(arguments, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="vlkit.train.arguments"):
        arguments.training_arguments(BaseTrainSection(bf16=True), tmp_path)
    assert "set train.bf16=auto or false" in caplog.text
