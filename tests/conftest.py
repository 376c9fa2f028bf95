"""Shared fixtures: tiny random vision towers and LLMs saved into tmp folders.

They go through `save_pretrained` so that tests exercise the real loading code. The tokenizer
is a small byte-level BPE trained here, with a ChatML chat template like SmolLM2's.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)

# One torch thread in the test process and, through the environment, in every process a test starts: on a
# small machine shared with other work a second thread makes each op wait at a barrier for a preempted
# sibling (bench/common.py measured 4.1 s against 18 s), and the toy models gain nothing from it. A thread
# count the caller set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The caches a run writes (vlkit's feature store and converted models, datasets' processed files, compiled
# kernels) go to one temporary folder per test session, for the processes the tests start too: a run never
# reads what an earlier one, on other code, left in $HOME, and two runs at once share nothing. Set here,
# before the test modules import `datasets`, which reads its cache folder once at import.
SESSION_CACHES = Path(tempfile.mkdtemp(prefix="vlkit-tests-"))
atexit.register(shutil.rmtree, SESSION_CACHES, ignore_errors=True)
for variable, folder in (("VLKIT_HOME", "vlkit"), ("HF_DATASETS_CACHE", "datasets"),
                         ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
    os.environ[variable] = str(SESSION_CACHES / folder)

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "a red circle on the left and a blue square on the right",
    "what colour is the shape? the shape is green. how many shapes are there? there are two shapes.",
    "You are a helpful assistant. Describe the image. What is this? It is a cat, a dog, a rocket.",
    "yes no one two three top bottom centre left right small large star cross triangle purple orange",
] * 20

IMAGE_SIZE = 32
# Subprocess and terminal waits only guard against a hang: no test depends on how long its work takes,
# so the guard is far above any run seen on a loaded 2-core machine.
HANG_GUARD_S = 900
PATCH_SIZE = 8  # 4x4 = 16 patches


def make_tokenizer() -> PreTrainedTokenizerFast:
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )


def tiny_clip_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE, projection_dim=32,
    )


def save_image_processor(folder, size: int = IMAGE_SIZE) -> None:
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llm")
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    LlamaForCausalLM(tiny_llama_config(len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_vision_dir(tmp_path_factory):
    """A CLIPVisionModel folder with its image processor."""
    folder = tmp_path_factory.mktemp("tiny_clip_vision")
    torch.manual_seed(1)
    CLIPVisionModel(tiny_clip_vision_config()).save_pretrained(folder)
    save_image_processor(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A two-tower CLIPModel folder (no image processor: vlkit must make a default)."""
    folder = tmp_path_factory.mktemp("tiny_clip_full")
    torch.manual_seed(2)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 100, "max_position_embeddings": 16}
    config = CLIPConfig(text_config=text, vision_config=tiny_clip_vision_config().to_dict(), projection_dim=32)
    CLIPModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_siglip")
    torch.manual_seed(3)
    config = SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    SiglipVisionModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_dinov2")
    torch.manual_seed(4)
    config = Dinov2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    Dinov2Model(config).save_pretrained(folder)
    save_image_processor(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_vlm(tiny_vision_dir, tiny_llm_dir):
    """(model, processor) built by build_vlm from the tiny CLIP tower and tiny Llama, mlp connector."""
    from vlkit import build_vlm

    torch.manual_seed(5)
    return build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, connector={"type": "mlp", "depth": 2})


def random_image(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size + 3, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small generated shapes world (24 train, 8 val/test/heldout images)."""
    from data_tools.shapes import generate

    folder = tmp_path_factory.mktemp("shapes")
    generate(folder, n_train=24, n_val=8, n_test=8, seed=0, workers=1, progress=False)
    return str(folder)
