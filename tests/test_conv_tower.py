"""Convolutional vision towers (HF ResNet, ConvNext) in every stage: CLIP training, the VLM, export."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMAGE_SIZE, random_image, save_image_processor
from test_clip_train import TINY_TEXT, write_pairs
from test_export import assert_one_error_line, assert_parity, cli, run_isolated, save_run
from transformers import (
    AutoModelForImageTextToText,
    ConvNextConfig,
    ConvNextModel,
    ResNetConfig,
    ResNetModel,
    VisionTextDualEncoderModel,
)

from vlkit import build_vlm
from vlkit.clip.evaluate import is_clip_folder
from vlkit.clip.recipe import parse_clip_recipe
from vlkit.errors import ConfigError
from vlkit.export import export_run
from vlkit.feature_maps import as_tokens, feature_width
from vlkit.features import tower_features
from vlkit.train.clip import train_clip
from vlkit.vision import load_vision_tower, num_feature_tokens

TINY_RESNET = {"embedding_size": 8, "hidden_sizes": [8, 16, 24], "depths": [1, 1, 1], "layer_type": "basic"}


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny_resnet")
    torch.manual_seed(6)
    ResNetModel(ResNetConfig(**TINY_RESNET)).save_pretrained(folder)
    save_image_processor(folder)
    return str(folder)


@pytest.fixture(scope="module")
def convnext_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny_convnext")
    torch.manual_seed(7)
    ConvNextModel(ConvNextConfig(num_stages=3, hidden_sizes=[8, 16, 24], depths=[1, 1, 1])).save_pretrained(folder)
    save_image_processor(folder)
    return str(folder)


def test_feature_map_helpers():
    config = ResNetConfig(**TINY_RESNET)
    assert [feature_width(config, layer) for layer in (0, 1, -2, -1)] == [8, 8, 16, 24]  # stem, then stages
    assert feature_width(ConvNextConfig(num_stages=3, hidden_sizes=[8, 16, 24], depths=[1, 1, 1]), 0) == 8
    feature_map = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)  # [B, C, h, w]
    tokens = as_tokens(feature_map)
    assert tokens.shape == (2, 4, 3)
    assert torch.equal(tokens[1, 2], feature_map[1, :, 1, 0])  # token 2 = row 1, column 0
    sequence = torch.randn(2, 5, 3)
    assert as_tokens(sequence) is sequence


@pytest.mark.parametrize("tower, layer, side, width", [
    ("resnet", -1, 2, 24), ("resnet", -2, 4, 16), ("convnext", -2, 4, 16), ("convnext", 0, 8, 8)])
def test_vlm_reads_the_chosen_feature_map_as_tokens(tower, layer, side, width, resnet_dir, convnext_dir, tiny_llm_dir):
    folder = {"resnet": resnet_dir, "convnext": convnext_dir}[tower]
    torch.manual_seed(0)
    model, processor = build_vlm(vision=folder, llm=tiny_llm_dir, connector={"type": "mlp", "depth": 2},
                                 vision_feature_layer=layer)
    # 32 px images: 8 x 8 after the stem (stride 4) and the first stage, then half as many per stage.
    assert processor.image_seq_length == side * side and model.config.vision_num_prefix_tokens == 0
    assert model.connector.vision_hidden_size == width
    inputs = processor.prompt_inputs([[{"role": "user", "content": "<image>\nWhat shape?"}]], [[random_image(1)]])
    with torch.no_grad():
        expected = model.vision_tower(pixel_values=inputs["pixel_values"], output_hidden_states=True)
        expected = expected.hidden_states[layer].flatten(2).transpose(1, 2)
        # The model feeds a CNN channels-last pixels (vlkit.feature_maps.tower_input): the same map, up to
        # the order oneDNN sums in.
        features = model.get_vision_features(inputs["pixel_values"])
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
        # The feature cache (vlkit.features) stores what the model would compute.
        cached = tower_features(model.vision_tower, inputs["pixel_values"], layer, "default", 0)
        assert torch.equal(cached, features)
        output = model(**inputs)
    assert output.image_hidden_states.shape == (1, side * side, model.config.text_config.hidden_size)
    assert torch.isfinite(output.logits).all()


def test_num_feature_tokens_measures_the_map(resnet_dir):
    tower, image_processor = load_vision_tower(resnet_dir)
    assert [num_feature_tokens(tower, image_processor, layer) for layer in (0, -2, -1)] == [64, 16, 4]


def test_cnn_model_saves_loads_and_exports_as_vlkit_only(resnet_dir, tiny_llm_dir, tmp_path, capsys):
    run = save_run(tmp_path / "resnet-run", resnet_dir, tiny_llm_dir, {"type": "mlp", "depth": 2},
                   {"llm": "frozen"}, stage="align")
    assert cli(str(run), str(tmp_path / "llava"), "--format", "llava") == 2
    assert_one_error_line(capsys.readouterr().err, "the vision tower (resnet) is convolutional")
    assert not (tmp_path / "llava").exists()

    out = tmp_path / "vlkit"
    assert export_run(run, out) == "vlkit"  # auto picks the format that can hold it
    assert (out / "vlkit_feature_maps.py").is_file()
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model.vision_tower) is ResNetModel
    image = tmp_path / "image.png"
    random_image(3).save(image)
    # Stock transformers, vlkit not importable: the shipped code reads the feature map like vlkit does.
    got, info = run_isolated([(out, "vlkit")], str(image), tmp_path / "isolated")[0]
    assert_parity(run, got, info, str(image))


@pytest.fixture(scope="module")
def resnet_clip_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("cnn_clip_pairs")
    write_pairs(data)
    recipe = {
        "stage": "clip", "output_dir": str(tmp_path_factory.mktemp("cnn_clip") / "run"),
        "data": {"dir": str(data), "train_file": "pairs.jsonl", "val_file": "pairs.jsonl"},
        "model": {"projection_dim": 16, "vision": {"config": {"model_type": "resnet", "image_size": IMAGE_SIZE,
                                                              **TINY_RESNET}},
                  "text": {"config": TINY_TEXT}},
        "train": {"batch_size": 8, "max_steps": 3, "learning_rate": 1e-3, "logging_steps": 1, "eval_batch_size": 16},
    }
    return train_clip(parse_clip_recipe(recipe))


def test_clip_stage_trains_a_resnet_tower_that_the_vlm_reads(resnet_clip_run, tiny_llm_dir):
    assert is_clip_folder(resnet_clip_run)
    config = json.loads((resnet_clip_run / "config.json").read_text())
    assert config["model_type"] == "vision-text-dual-encoder" and config["vision_config"]["model_type"] == "resnet"
    summary = json.loads((resnet_clip_run / "run_summary.json").read_text())
    assert summary["steps"] == 3 and {"top1", "i2t_R@1"} <= set(summary["final_metrics"]["val"])
    trained = VisionTextDualEncoderModel.from_pretrained(resnet_clip_run)
    assert type(trained.vision_model) is ResNetModel

    tower, image_processor = load_vision_tower(str(resnet_clip_run))
    assert type(tower) is ResNetModel
    assert torch.equal(tower.embedder.embedder.convolution.weight,
                       trained.vision_model.embedder.embedder.convolution.weight)
    model, processor = build_vlm(vision=str(resnet_clip_run), llm=tiny_llm_dir, connector="mlp")
    assert processor.image_seq_length == 16  # layer -2 of a 32 px image: 4 x 4
    inputs = processor.prompt_inputs([[{"role": "user", "content": "<image>\nWhat?"}]], [[random_image(2)]])
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("vision, message", [
    ({"model_type": "resnet", **TINY_RESNET}, "needs image_size for a resnet tower"),
    ({"model_type": "bert", "image_size": 32}, "is not a CLIP-trainable image tower"),
])
def test_bad_cnn_tower_configs_are_one_line_errors(vision, message, tmp_path):
    from vlkit.clip.model import build_clip_model, build_tokenizer

    recipe = parse_clip_recipe({
        "stage": "clip", "output_dir": str(tmp_path / "run"), "data": {"train_file": "pairs.jsonl"},
        "model": {"vision": {"config": vision}, "text": {"config": TINY_TEXT}}})
    with pytest.raises(ConfigError, match=message):
        build_clip_model(recipe, build_tokenizer(recipe, ["a red circle."]))


def test_instruct_trains_a_cnn_tower_in_full(tmp_path, resnet_dir, tiny_llm_dir, shapes_dir):
    from safetensors.torch import load_file

    from vlkit.recipe import load_recipe
    from vlkit.train.checkpoint import load_run
    from vlkit.train.run import plan_run, train_vlm

    tree = {
        "stage": "instruct", "output_dir": str(tmp_path / "run"),
        "model": {"vision": resnet_dir, "llm": tiny_llm_dir, "vision_feature_layer": -1},
        "tune": {"llm": "lora", "vision": "full", "lora_r": 4, "lora_alpha": 8},
        "data": {"dir": shapes_dir, "train_file": "instruct_train.json", "max_length": 320},
        "train": {"batch_size": 2, "max_steps": 3, "logging_steps": 1, "report_to": [], "vision_learning_rate": 1e-2},
    }
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(tree))
    run_dir = train_vlm(load_recipe(path))
    saved = load_file(run_dir / "trainable.safetensors")
    base = ResNetModel.from_pretrained(resnet_dir).state_dict()
    tower = {name.removeprefix("vision_tower."): t for name, t in saved.items() if name.startswith("vision_tower.")}
    # Every tower weight is saved, and training changed them; BatchNorm statistics (buffers) stay the base's.
    assert tower.keys() == {name for name, _ in ResNetModel.from_pretrained(resnet_dir).named_parameters()}
    assert any(not torch.equal(tower[name], base[name]) for name in tower)
    model, _ = load_run(run_dir)
    reloaded = model.vision_tower.state_dict()
    assert all(torch.equal(reloaded[name], tensor) for name, tensor in tower.items())
    assert all(torch.equal(reloaded[name], base[name]) for name in base if "running_" in name)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"][-1]["vision"] == "full"
    # Stored features would not follow a tower that trains.
    tree["data"]["cache_vision_features"] = True
    path.write_text(json.dumps(tree))
    with pytest.raises(ConfigError, match="cache_vision_features needs a frozen vision tower"):
        plan_run(load_recipe(path))
