"""Connector zoo: every registered connector on tiny sizes.

Forward/backward, token counts, safetensors save/load, padded-patch masks, YAML selection,
parameter-count logging, and the connector-specific parts (Q-Former init from a BLIP-2 folder,
resampler positions, pixel-shuffle layout and grid errors).
"""

from __future__ import annotations

import logging

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from vlkit.connectors import CONNECTORS, build_connector
from vlkit.connectors.pixel_shuffle import PixelShuffleConnector
from vlkit.connectors.qformer import QFormerConnector
from vlkit.connectors.registry import count_trainable_parameters, log_connector_summary
from vlkit.connectors.resampler import ResamplerConnector, patch_position_table
from vlkit.errors import ConfigError, ModelLoadError

VISION, TEXT = 24, 32  # tiny Dv, Dt

TINY = {
    "linear": {"type": "linear"},
    "mlp": {"type": "mlp", "depth": 2},
    "qformer": {
        "type": "qformer",
        "num_queries": 6,
        "hidden_size": 32,
        "depth": 2,
        "num_heads": 4,
        "intermediate_size": 64,
        "cross_attention_frequency": 1,
    },
    "resampler": {"type": "resampler", "num_latents": 5, "depth": 2, "hidden_size": 32, "num_heads": 4},
    "pixel_shuffle": {"type": "pixel_shuffle", "scale_factor": 2},
    "pixel_shuffle_mlp": {"type": "pixel_shuffle", "scale_factor": 2, "projection": "mlp"},
    "pixel_shuffle_3_per_block": {"type": "pixel_shuffle", "scale_factor": 2, "projection": "mlp", "tokens_per_group": 3},
    # A fixed word, then a choice of three (one two tokens long, one empty), then of two.
    "visual_words": {"type": "visual_words", "groups": [[[7]], [[2], [3, 4], []], [[5], [6]]], "num_patches": 16,
                     "hidden": 16},
}
FIXED_OUTPUT = ["qformer", "resampler"]
PER_PATCH = ["linear", "mlp"]


def tiny(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    connector = build_connector({**TINY[name], **overrides}, VISION, TEXT).eval()
    connector.use_llm_embeddings(torch.randn(10, TEXT))  # as build_vlm does (visual_words copies rows)
    return connector


def test_every_registered_connector_is_covered():
    assert {config["type"] for config in TINY.values()} == set(CONNECTORS)


@pytest.mark.parametrize("name", list(TINY))
def test_forward_backward(name):
    connector = tiny(name).train()
    features = torch.randn(2, 16, VISION, requires_grad=True)  # a 4 x 4 grid
    tokens = connector(features)
    assert tokens.shape == (2, connector.num_tokens(16), TEXT)
    tokens.square().mean().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    for param_name, param in connector.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
    assert sum(p.grad.abs().sum() for p in connector.parameters()) > 0


@pytest.mark.parametrize(
    "name, overrides, num_patches, expected",
    [
        ("linear", {}, 16, 16),
        ("mlp", {}, 17, 17),
        ("qformer", {"num_queries": 3}, 16, 3),
        ("qformer", {"num_queries": 7}, 17, 7),  # CLS kept: any N
        ("resampler", {"num_latents": 4}, 16, 4),
        ("resampler", {"num_latents": 9}, 37, 9),  # CLS + 6 x 6
        ("resampler", {"num_latents": 9}, 12, 9),  # not square
        ("pixel_shuffle", {"scale_factor": 2}, 64, 16),
        ("pixel_shuffle", {"scale_factor": 4}, 64, 4),
        ("pixel_shuffle", {"scale_factor": 3}, 36, 4),
        ("pixel_shuffle", {"scale_factor": 3, "tokens_per_group": 4}, 9, 4),
        ("pixel_shuffle", {"scale_factor": 2, "tokens_per_group": 3}, 16, 12),
        ("visual_words", {}, 16, 4),
        ("visual_words", {"num_patches": 9}, 9, 4),
    ],
)
def test_token_counts_follow_config(name, overrides, num_patches, expected):
    connector = tiny(name, **overrides)
    assert connector.num_tokens(num_patches) == expected
    with torch.no_grad():
        tokens = connector(torch.randn(2, num_patches, VISION))
    assert tokens.shape == (2, expected, TEXT)


@pytest.mark.parametrize("name", list(TINY))
def test_safetensors_save_load_gives_identical_outputs(name, tmp_path):
    connector = tiny(name, seed=0)
    save_file(connector.state_dict(), str(tmp_path / "connector.safetensors"))
    fresh = tiny(name, seed=1)  # different random init
    features = torch.randn(2, 16, VISION)
    with torch.no_grad():
        assert not torch.equal(fresh(features), connector(features))
        fresh.load_state_dict(load_file(str(tmp_path / "connector.safetensors")), strict=True)
        assert torch.equal(fresh(features), connector(features))


def padded_batch(real_counts: list[int], num_patches: int, seed: int = 0):
    """Clean features, a copy with junk (huge values, inf, NaN) in padding, and the mask [B, N]."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(len(real_counts), num_patches, VISION, generator=generator)
    mask = torch.arange(num_patches).unsqueeze(0) < torch.tensor(real_counts).unsqueeze(1)
    junk = features.clone()
    junk[~mask] = 1e4 * torch.randn(int((~mask).sum()), VISION, generator=generator)
    padding = (~mask).nonzero()
    junk[padding[0, 0], padding[0, 1], 0] = float("inf")
    junk[padding[-1, 0], padding[-1, 1], 1] = float("nan")
    return features, junk, mask


@pytest.mark.parametrize("name", FIXED_OUTPUT)
def test_fixed_output_connectors_ignore_padding(name):
    # 16 real of 20 (a 4 x 4 grid), 9 real of 20 (3 x 3), 12 real of 20 (not square)
    real_counts = [16, 9, 12]
    connector = tiny(name)
    features, junk, mask = padded_batch(real_counts, 20)
    with torch.no_grad():
        padded = connector(junk, mask)
        assert torch.isfinite(padded).all()
        for row, count in enumerate(real_counts):
            alone = connector(features[row : row + 1, :count])  # the unpadded sample, no mask
            torch.testing.assert_close(padded[row : row + 1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PER_PATCH)
def test_per_patch_connectors_keep_real_tokens(name):
    connector = tiny(name)
    features, junk, mask = padded_batch([16, 11], 16)
    with torch.no_grad():
        padded, clean = connector(junk, mask), connector(features)
    assert torch.equal(padded[mask], clean[mask])


@pytest.mark.parametrize("name", ["pixel_shuffle", "pixel_shuffle_mlp"])
def test_pixel_shuffle_zeroes_padding_before_folding(name):
    connector = tiny(name)
    # 4 x 4 grid; sample 1 lacks its last row, so folded tokens 2, 3 (bottom 2 x 2 blocks) hold padding
    features, junk, mask = padded_batch([16, 12], 16)
    zeroed = features.masked_fill(~mask.unsqueeze(-1), 0.0)
    with torch.no_grad():
        padded = connector(junk, mask)
        assert torch.equal(padded, connector(zeroed, mask))  # the junk does not matter at all
        clean = connector(features)
    assert torch.equal(padded[0], clean[0])
    assert torch.equal(padded[1, :2], clean[1, :2])  # tokens made of real patches only are unaffected
    assert not torch.allclose(padded[1, 2:], clean[1, 2:])


def test_pixel_shuffle_matches_idefics3_layout():
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    connector = tiny("pixel_shuffle", scale_factor=3)
    features = torch.randn(2, 36, VISION)
    # Idefics3Connector.pixel_shuffle does not use `self`; same fold => Idefics3 projection weights fit.
    folded = Idefics3Connector.pixel_shuffle(None, features, scale_factor=3)
    with torch.no_grad():
        torch.testing.assert_close(connector(features), connector.proj(folded), rtol=0, atol=0)


@pytest.mark.parametrize("projection", ["linear", "mlp"])
def test_pixel_shuffle_tokens_per_group_come_from_their_own_block(projection):
    connector = tiny("pixel_shuffle", projection=projection, tokens_per_group=3)
    features = torch.randn(1, 16, VISION)  # a 4 x 4 grid: blocks 0-3 of 2 x 2 patches
    changed = features.clone()
    changed[0, 0] += 1.0  # patch 0 lies in block 0 only
    with torch.no_grad():
        before, after = connector(features), connector(changed)
    assert before.shape == (1, 4 * 3, TEXT)
    differs = (before - after).abs().amax(dim=-1)[0] > 0
    assert differs.tolist() == [True] * 3 + [False] * 9  # block 0's three tokens, in a row
    assert torch.unique(before[0, :3], dim=0).shape[0] == 3  # three different tokens, not one repeated


@pytest.mark.parametrize("num_patches, scale_factor", [(577, 2), (20, 2), (36, 4)])
def test_pixel_shuffle_rejects_grids_it_cannot_fold(num_patches, scale_factor):
    connector = tiny("pixel_shuffle", scale_factor=scale_factor)
    for call in (lambda: connector.num_tokens(num_patches), lambda: connector(torch.randn(1, num_patches, VISION))):
        with pytest.raises(ConfigError, match="vision_feature_select_strategy: default") as error:
            call()
        assert "\n" not in str(error.value) and f"got {num_patches} patches" in str(error.value)


def test_resampler_position_table():
    dim = 16
    grid = patch_position_table(16, dim)  # 4 x 4
    assert grid.shape == (16, dim) and torch.unique(grid, dim=0).shape[0] == 16  # every patch distinct
    # same row => same row half; same column => same column half
    assert torch.equal(grid[1, : dim // 2], grid[2, : dim // 2]) and torch.equal(grid[1, dim // 2 :], grid[5, dim // 2 :])
    with_cls = patch_position_table(17, dim)  # CLS first, as HF vision towers emit it
    assert torch.equal(with_cls[0], torch.zeros(dim)) and torch.equal(with_cls[1:], grid)
    with_registers = patch_position_table(1 + 4 + 64, dim)  # DINOv2: CLS + 4 registers + 8 x 8
    assert with_registers[:5].abs().sum() == 0 and torch.equal(with_registers[5:], patch_position_table(64, dim))
    flat = patch_position_table(20, dim)  # a 4 x 5 grid: 1D fallback, still distinct per patch
    assert torch.unique(flat, dim=0).shape[0] == 20 and flat[0].abs().sum() > 0


@pytest.mark.parametrize("position_embedding, order_matters", [("sincos", True), ("none", False)])
def test_resampler_sees_patch_positions(position_embedding, order_matters):
    connector = tiny("resampler", position_embedding=position_embedding)
    features = torch.randn(1, 16, VISION)
    shuffled = features[:, torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        same = torch.allclose(connector(features), connector(shuffled), atol=1e-5)
    assert same != order_matters


def test_resampler_latents_are_distinct():
    # Idefics2 initialises all latents to ones; identical latents would never diverge.
    latents = tiny("resampler").perceiver.latents
    assert torch.unique(latents, dim=0).shape[0] == latents.shape[0]


@pytest.mark.parametrize(
    "text, cls, num_tokens",
    [
        ("connector: {type: resampler, num_latents: 16}", ResamplerConnector, 16),
        ("connector: {type: qformer, num_queries: 8, depth: 2, hidden_size: 64, num_heads: 4}", QFormerConnector, 8),
        ("connector: {type: pixel_shuffle, scale_factor: 3}", PixelShuffleConnector, 64),
        ("connector: {type: mlp, depth: 2}", CONNECTORS["mlp"], 576),
        ("connector: {type: linear}", CONNECTORS["linear"], 576),
    ],
)
def test_selectable_from_yaml(text, cls, num_tokens):
    connector = build_connector(yaml.safe_load(text)["connector"], VISION, TEXT)
    assert type(connector) is cls
    assert connector.num_tokens(576) == num_tokens


def test_bad_options_raise_config_errors():
    with pytest.raises(ConfigError, match="did you mean|Did you mean 'qformer'"):
        build_connector({"type": "qfromer"}, VISION, TEXT)
    with pytest.raises(ConfigError, match="num_latents"):
        build_connector({"type": "qformer", "num_latents": 8}, VISION, TEXT)
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        build_connector({"type": "qformer", "hidden_size": 30, "num_heads": 4, "depth": 1}, VISION, TEXT)
    with pytest.raises(ConfigError, match="position_embedding"):
        build_connector({"type": "resampler", "position_embedding": "rope"}, VISION, TEXT)
    with pytest.raises(ConfigError, match="projection"):
        build_connector({"type": "pixel_shuffle", "projection": "conv"}, VISION, TEXT)
    with pytest.raises(ConfigError, match="tokens_per_group must be >= 1"):
        build_connector({"type": "pixel_shuffle", "tokens_per_group": 0}, VISION, TEXT)


def test_parameter_count_is_logged(caplog):
    connector = tiny("resampler")
    connector.output_proj.requires_grad_(False)  # frozen params are not counted
    expected = sum(p.numel() for p in connector.parameters()) - sum(
        p.numel() for p in connector.output_proj.parameters()
    )
    assert count_trainable_parameters(connector) == expected
    with caplog.at_level(logging.INFO, logger="vlkit.connectors.registry"):
        line = log_connector_summary(connector, 576)
    assert line == f"connector resampler: 5 tokens for 576 patches, {expected:,} trainable params"
    assert line in caplog.messages


# ---------------------------------------------------------------------------------------------
# Q-Former initialised from a BLIP-2 checkpoint folder


@pytest.fixture(scope="module")
def blip2_folder(tmp_path_factory):
    """A tiny random Blip2ForConditionalGeneration saved with save_pretrained (safetensors)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    torch.manual_seed(0)
    config = Blip2Config(
        vision_config={
            "hidden_size": VISION,
            "intermediate_size": 48,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        qformer_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "cross_attention_frequency": 1,
        },
        text_config={
            "model_type": "opt",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "ffn_dim": 64,
            "vocab_size": 100,
            "word_embed_proj_dim": 32,
        },
        num_query_tokens=6,
    )
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_()  # BLIP-2 initialises them to zeros; make the copy checkable
    folder = tmp_path_factory.mktemp("blip2")
    model.save_pretrained(folder)
    reference = {"query_tokens": model.query_tokens.detach().clone()}
    reference.update({f"qformer.{k}": v.detach().clone() for k, v in model.qformer.state_dict().items()})
    return folder, reference


def test_qformer_init_from_blip2_copies_weights(blip2_folder):
    folder, reference = blip2_folder
    torch.manual_seed(1)
    connector = build_connector({"type": "qformer", "init_from": str(folder)}, VISION, TEXT)
    # shape comes from the checkpoint's config.json
    assert connector.num_tokens(16) == 6 and len(connector.qformer.encoder.layer) == 2
    ours = {"query_tokens": connector.query_tokens, **{f"qformer.{k}": v for k, v in connector.qformer.state_dict().items()}}
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name
    assert connector(torch.randn(1, 16, VISION)).shape == (1, 6, TEXT)


def test_qformer_init_from_other_vision_width_keeps_fresh_cross_attention(blip2_folder, caplog):
    folder, reference = blip2_folder
    with caplog.at_level(logging.WARNING):
        connector = build_connector({"type": "qformer", "init_from": str(folder)}, 16, TEXT)
    assert "keep their fresh init" in caplog.text
    ours = connector.qformer.state_dict()
    key = "encoder.layer.0.crossattention.attention.key.weight"
    assert ours[key].shape == (32, 16)  # reads 16-wide features
    assert torch.equal(ours["encoder.layer.0.attention.attention.query.weight"], reference["qformer.encoder.layer.0.attention.attention.query.weight"])
    assert torch.equal(connector.query_tokens, reference["query_tokens"])


def test_qformer_resolved_config_rebuilds_without_the_checkpoint(blip2_folder):
    folder, _ = blip2_folder
    connector = build_connector({"type": "qformer", "init_from": str(folder)}, VISION, TEXT).eval()
    assert "init_from" not in connector.resolved_config
    rebuilt = build_connector(connector.resolved_config, VISION, TEXT).eval()
    rebuilt.load_state_dict(connector.state_dict(), strict=True)
    features = torch.randn(2, 16, VISION)
    with torch.no_grad():
        assert torch.equal(rebuilt(features), connector(features))


def test_qformer_init_from_errors(blip2_folder, tmp_path):
    folder, _ = blip2_folder
    with pytest.raises(ConfigError, match="depth=3 differs from the init_from checkpoint"):
        build_connector({"type": "qformer", "init_from": str(folder), "depth": 3}, VISION, TEXT)
    with pytest.raises(ModelLoadError, match="config.json not found"):
        build_connector({"type": "qformer", "init_from": str(tmp_path)}, VISION, TEXT)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle is never loaded")
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        build_connector({"type": "qformer", "init_from": str(tmp_path)}, VISION, TEXT)


# ---------------------------------------------------------------------------------------------
# Whole tiny VLMs through build_vlm (tiny CLIP tower: 48 wide, 4 x 4 patches; tiny Llama: 64 wide)

VLM_CONNECTORS = {
    "qformer": ({"type": "qformer", "num_queries": 8, "hidden_size": 32, "depth": 2, "num_heads": 4,
                 "intermediate_size": 64}, 8),
    "resampler": ({"type": "resampler", "num_latents": 6, "depth": 1, "hidden_size": 32, "num_heads": 4}, 6),
    "pixel_shuffle": ({"type": "pixel_shuffle", "scale_factor": 2, "projection": "mlp"}, 4),
}


def vlm_conversation(images: int) -> list[dict]:
    return [
        {"role": "user", "content": "<image>\n" * images + "What colour is the shape?"},
        {"role": "assistant", "content": "It is red."},
    ]


@pytest.mark.parametrize("name", list(VLM_CONNECTORS))
def test_connector_in_a_whole_vlm(name, tiny_vision_dir, tiny_llm_dir, tmp_path):
    from conftest import random_image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlkit import build_vlm

    connector_config, expected_tokens = VLM_CONNECTORS[name]
    torch.manual_seed(0)
    model, processor = build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, connector=connector_config)
    assert type(model.connector) is CONNECTORS[name]
    assert model.connector.num_tokens(16) == expected_tokens
    assert model.config.image_seq_length == processor.image_seq_length == expected_tokens

    # training path: each <image> becomes exactly num_tokens placeholders
    encoded = processor.encode_conversation(vlm_conversation(2), [random_image(0), random_image(1)])
    assert encoded["input_ids"].count(processor.image_token_id) == 2 * expected_tokens
    model.train()
    output = model(
        input_ids=torch.tensor([encoded["input_ids"]]),
        labels=torch.tensor([encoded["labels"]]),
        pixel_values=encoded["pixel_values"],
    )
    assert output.image_hidden_states.shape == (2, expected_tokens, model.config.text_config.hidden_size)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert all(p.grad is not None for p in model.connector.parameters())
    assert sum(p.grad.abs().sum() for p in model.connector.parameters()) > 0
    model.zero_grad()
    model.eval()

    # inference path (stock processor __call__) and save_pretrained -> from_pretrained
    inputs = processor.prompt_inputs([vlm_conversation(1)[:1]], [[random_image(2)]])
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == expected_tokens
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded.connector) is CONNECTORS[name]
    assert reloaded_processor.image_seq_length == expected_tokens
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


def test_pixel_shuffle_vlm_with_cls_kept_says_what_to_change(tiny_vision_dir, tiny_llm_dir):
    from vlkit import build_vlm

    with pytest.raises(ConfigError, match="17 patches; drop the CLS token"):
        build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, connector={"type": "pixel_shuffle"},
                  vision_feature_select_strategy="full")


@pytest.mark.parametrize("strategy, patches", [("default", 16), ("full", 17)])
def test_resampler_vlm_token_count_is_fixed(tiny_vision_dir, tiny_llm_dir, strategy, patches):
    from vlkit import build_vlm

    model, processor = build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, vision_feature_select_strategy=strategy,
                                 connector={"type": "resampler", "num_latents": 3, "depth": 1, "hidden_size": 32})
    assert processor.image_seq_length == model.connector.num_tokens(patches) == 3


def test_qformer_init_from_vlm_loads_without_the_blip2_folder(blip2_folder, tiny_vision_dir, tiny_llm_dir, tmp_path):
    import shutil

    from conftest import random_image
    from transformers import AutoModelForImageTextToText

    from vlkit import build_vlm

    folder, reference = blip2_folder
    blip2_copy = tmp_path / "blip2"
    shutil.copytree(folder, blip2_copy)
    model, processor = build_vlm(
        vision=tiny_vision_dir, llm=tiny_llm_dir, connector={"type": "qformer", "init_from": str(blip2_copy)}
    )
    assert torch.equal(model.connector.query_tokens, reference["query_tokens"])
    model.eval().save_pretrained(tmp_path / "vlm")
    shutil.rmtree(blip2_copy)  # a saved model must not need the folder it was initialised from
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "vlm")
    inputs = processor.prompt_inputs([vlm_conversation(1)[:1]], [[random_image(3)]])
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
