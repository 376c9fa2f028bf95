"""Stage 0 end to end on ~32 generated images: recipe -> train_clip -> HF CLIP folder -> eval -> build_vlm."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import AutoProcessor, CLIPModel

from vlkit.clip.augment import Augment, color_jitter, hue_rotate, random_resized_crop
from vlkit.clip.evaluate import evaluate_clip, is_clip_folder, retrieval, zero_shot
from vlkit.clip.recipe import AugmentSection, load_clip_recipe, parse_clip_recipe
from vlkit.errors import ConfigError, DataError
from vlkit.train.clip import train_clip

COLOURS = {"red": (220, 35, 35), "green": (40, 165, 60), "blue": (40, 85, 225), "yellow": (240, 220, 30)}
SHAPES = ["circle", "square"]
TINY_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def write_pairs(folder: Path, n: int = 32, seed: int = 0) -> Path:
    """A mini shapes world: one coloured shape per image, caption and label, + zero-shot labels."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2]
        image = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(90, 160, 3)))
        box = [int(v) for v in (rng.integers(2, 8), rng.integers(2, 8), rng.integers(22, 30), rng.integers(22, 30))]
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        image.save(folder / "images" / f"{i:03d}.png")
        rows.append({"id": str(i), "image": f"images/{i:03d}.png", "caption": f"a {colour} {shape} in the middle.",
                     "label": f"{colour} {shape}", "labels": [f"{colour} {shape}"]})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    classes = [f"{c} {s}" for s in SHAPES for c in COLOURS]
    (folder / "zeroshot_labels.json").write_text(json.dumps(
        {"classes": classes, "templates": ["a photo of a {}.", "a {}."], "heldout_classes": ["yellow square"]}))
    return folder / "pairs.jsonl"


def recipe_dict(data_dir: Path, out: Path, **model_overrides) -> dict:
    return {
        "stage": "clip",
        "output_dir": str(out),
        "data": {"dir": str(data_dir), "train_file": "pairs.jsonl", "val_file": "pairs.jsonl"},
        "model": {"projection_dim": 16, "vision": {"config": TINY_VISION}, "text": {"config": TINY_TEXT},
                  **model_overrides},
        "train": {"batch_size": 8, "max_steps": 3, "learning_rate": 1e-3, "logging_steps": 1, "eval_batch_size": 16},
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clip_pairs")
    write_pairs(folder)
    return folder


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clip_run") / "run"
    recipe = recipe_dict(data_dir, out)
    recipe["train"]["profile_step"] = 2
    return train_clip(parse_clip_recipe(recipe))


def test_train_clip_writes_a_loadable_hf_clip_folder(trained):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "recipe.yaml", "run_summary.json", "loss.png", "profile_trace.json"):
        assert (trained / name).is_file(), name
    assert (trained / "profile.txt").read_text().startswith("step 2: ")  # train.profile_step
    assert is_clip_folder(trained)
    summary = json.loads((trained / "run_summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples"] == 24
    assert summary["peak_memory_gib"]["host_rss"] > 0.05
    assert math.isfinite(summary["final_metrics"]["train_loss"])
    assert {"top1", "top5", "i2t_R@1", "t2i_mean_rank"} <= set(summary["final_metrics"]["val"])

    model = CLIPModel.from_pretrained(trained)
    saved = load_file(trained / "model.safetensors")
    assert torch.equal(model.logit_scale.detach(), saved["logit_scale"])
    assert float(model.logit_scale.detach().exp()) <= 100.0 + 1e-4
    processor = AutoProcessor.from_pretrained(trained)
    inputs = processor(text=["a red circle in the middle."], images=[Image.new("RGB", (32, 32), "red")],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model(**inputs)
    assert output.logits_per_image.shape == (1, 1)
    # The tokenizer ends every caption with eos, where CLIP's text tower pools.
    assert inputs["input_ids"][0, -1] == model.config.text_config.eos_token_id


def test_training_changes_the_towers(trained, data_dir, tmp_path):
    # Same recipe, 0 -> 3 steps: every tower moved (the loss reached both).
    untrained = parse_clip_recipe(recipe_dict(data_dir, tmp_path / "r0"))
    from vlkit.clip.model import build_clip_model, build_tokenizer

    torch.manual_seed(0)
    from transformers import set_seed

    set_seed(untrained.train.seed)
    rows = [json.loads(line) for line in (data_dir / "pairs.jsonl").read_text().splitlines()]
    labels = json.loads((data_dir / "zeroshot_labels.json").read_text())
    tokenizer = build_tokenizer(untrained, [r["caption"] for r in rows], labels["classes"])
    initial = build_clip_model(untrained, tokenizer)
    final = CLIPModel.from_pretrained(trained)
    assert not torch.equal(initial.visual_projection.weight, final.visual_projection.weight)
    assert not torch.equal(initial.text_projection.weight, final.text_projection.weight)


def test_evaluate_writes_json_and_png_with_all_keys(trained, data_dir, tmp_path):
    metrics = evaluate_clip(trained, data_dir / "pairs.jsonl", data_dir, tmp_path / "eval", batch_size=16)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["zero_shot"]["top1"] == metrics["zero_shot"]["top1"]
    assert {"top1", "top5", "per_class_top1", "heldout_classes_top1"} <= set(written["zero_shot"])
    assert 0.0 <= written["zero_shot"]["top1"] <= written["zero_shot"]["top5"] <= 1.0
    for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "i2t_mean_rank", "t2i_R@1", "t2i_R@5", "t2i_R@10", "t2i_mean_rank"):
        assert key in written["retrieval"], key
    assert written["retrieval"]["num_texts"] == 8  # 32 rows, 8 distinct captions
    png = tmp_path / "eval" / "confusion_matrix.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_cli_entry_point(trained, data_dir, tmp_path, capsys):
    from vlkit.clip.evaluate import run

    args = argparse.Namespace(model=str(trained), data=str(data_dir / "pairs.jsonl"), images=str(data_dir),
                              out=str(tmp_path / "cli"), labels=None, batch_size=16, max_samples=10)
    assert run(args) == 0
    assert "zero-shot top-1" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["num_images"] == 10


def test_clip_folder_is_the_vision_of_build_vlm(trained, tiny_llm_dir):
    from vlkit import build_vlm

    model, processor = build_vlm(vision=str(trained), llm=tiny_llm_dir, connector={"type": "mlp"})
    clip = CLIPModel.from_pretrained(trained)
    tower = model.vision_tower
    clip_weights = clip.vision_model.state_dict()
    tower_weights = {k.split("vision_model.", 1)[-1]: v for k, v in tower.state_dict().items()}
    assert clip_weights.keys() <= tower_weights.keys()
    assert all(torch.equal(clip_weights[k], tower_weights[k]) for k in clip_weights)
    assert processor.image_processor.crop_size["height"] == 32  # the CLIP folder's processor came along
    messages = [{"role": "user", "content": "<image>\nWhat colour?"}]
    inputs = processor.prompt_inputs([messages], [[Image.new("RGB", (32, 32), "blue")]])
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_lit_locks_the_pretrained_vision_tower(trained, data_dir, tmp_path):
    recipe = recipe_dict(data_dir, tmp_path / "lit", lock="vision")
    recipe["model"]["vision"] = {"pretrained": str(trained)}
    recipe["model"]["text"] = {"config": TINY_TEXT}
    recipe["data"]["val_file"] = None
    recipe["train"]["max_steps"] = 2
    out = train_clip(parse_clip_recipe(recipe))
    before, after = CLIPModel.from_pretrained(trained), CLIPModel.from_pretrained(out)
    for name, weight in before.vision_model.state_dict().items():
        assert torch.equal(weight, after.vision_model.state_dict()[name]), name
    assert torch.equal(before.visual_projection.weight, after.visual_projection.weight)
    assert not torch.equal(before.text_projection.weight, after.text_projection.weight)


def test_recipe_errors_are_one_line_config_errors(data_dir, tmp_path):
    good = recipe_dict(data_dir, tmp_path / "x")
    with pytest.raises(ConfigError, match="did you mean 'train.batch_size'"):
        parse_clip_recipe({**good, "train": {"batch_sise": 4}})
    with pytest.raises(ConfigError, match="lock: vision freezes a pretrained tower"):
        parse_clip_recipe(recipe_dict(data_dir, tmp_path / "x", lock="vision"))
    both = recipe_dict(data_dir, tmp_path / "x")
    both["model"]["text"]["pretrained"] = "somewhere"
    with pytest.raises(ConfigError, match="exactly one of"):
        parse_clip_recipe(both)


def test_recipe_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stage: clip\noutput_dir: out\ndata: {train_file: t.jsonl}\n"
                    "model: {vision: {config: {}}, text: {config: {}}}\n")
    recipe = load_clip_recipe(path, ["train.max_steps=7", "loss.type=siglip", "augment.color_jitter=true"])
    assert recipe.train.max_steps == 7 and recipe.loss.type == "siglip" and recipe.augment.color_jitter
    assert math.isclose(math.exp(recipe.logit_scale_init()), 10.0)  # SigLIP's default start
    assert math.isclose(math.exp(load_clip_recipe(path).logit_scale_init()), 1 / 0.07)


def test_augmentation_is_off_by_default_and_shape_preserving():
    image = torch.rand(3, 32, 32)
    assert not Augment(AugmentSection()).enabled
    torch.manual_seed(0)
    cropped = random_resized_crop(image, (0.3, 0.5), (0.75, 1.33))
    assert cropped.shape == image.shape and not torch.allclose(cropped, image)
    jittered = color_jitter(image, 0.5, 0.5, 0.5)
    assert jittered.shape == image.shape and 0 <= float(jittered.min()) and float(jittered.max()) <= 1
    grey = color_jitter(image, 0.0, 0.0, 0.0)
    assert torch.equal(grey, image)


def pairs_with_colourless_captions(tmp_path):
    """(pairs file whose rows also carry a `shapes` caption without colours, its rows, a 32 px processor)."""
    from transformers import CLIPImageProcessor

    pairs_file = write_pairs(tmp_path)
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    for row in rows:
        row["shapes"] = "a " + row["label"].split()[1]
    pairs_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return pairs_file, rows, CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def test_greyscale_images_get_the_colourless_caption(tmp_path):
    from vlkit.clip.data import ClipPairDataset, read_pairs

    pairs_file, rows, processor = pairs_with_colourless_captions(tmp_path)
    section = AugmentSection(grayscale=0.5, grayscale_caption_column="shapes")
    dataset = ClipPairDataset(read_pairs(pairs_file), tmp_path, processor, Augment(section))
    torch.manual_seed(0)
    items = [dataset[index % 8] for index in range(64)]
    mean, std = torch.tensor(processor.image_mean)[:, None, None], torch.tensor(processor.image_std)[:, None, None]
    greys = 0
    for item in items:
        pixels = item["pixel_values"] * std + mean
        grey = torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[1], pixels[2], atol=1e-5)
        greys += grey
        row = rows[int(item["id"])]
        assert item["caption"] == (row["shapes"] if grey else row["caption"])
    assert 16 < greys < 48  # about half
    with pytest.raises(DataError, match="has no column 'nope'"):
        recipe = recipe_dict(tmp_path, tmp_path / "run")
        recipe["data"]["train_file"] = "pairs.jsonl"
        recipe["augment"] = {"grayscale": 0.5, "grayscale_caption_column": "nope"}
        train_clip(parse_clip_recipe(recipe))


def test_hue_rotation_turns_colours_round_the_grey_axis():
    torch.manual_seed(0)
    image = torch.rand(3, 5, 5) * 0.5 + 0.25  # inside the cube whatever the angle: nothing is clamped
    # A third of a turn takes red to green, green to blue and blue to red.
    assert torch.allclose(hue_rotate(image, 2 * math.pi / 3), image[[2, 0, 1]], atol=1e-6)
    assert torch.allclose(hue_rotate(image, 0.0), image, atol=1e-6)
    turned = hue_rotate(image, 1.0)
    assert not torch.allclose(turned, image, atol=1e-2)
    assert torch.allclose(turned.mean(0), image.mean(0), atol=1e-6)  # the grey level of every pixel is kept
    grey = torch.rand(1, 5, 5).expand(3, -1, -1)
    assert torch.allclose(hue_rotate(grey, 1.0), grey, atol=1e-6)


def augmented_draws(tmp_path, section: AugmentSection, draws: int) -> list[tuple[dict, dict, torch.Tensor]]:
    """(item, its pairs row, the item's pixels without augmentation) for `draws` draws over 8 pairs."""
    from vlkit.clip.data import ClipPairDataset, read_pairs

    pairs_file, rows, processor = pairs_with_colourless_captions(tmp_path)
    plain = ClipPairDataset(read_pairs(pairs_file), tmp_path, processor)
    dataset = ClipPairDataset(read_pairs(pairs_file), tmp_path, processor, Augment(section))
    torch.manual_seed(0)
    items = [dataset[index % 8] for index in range(draws)]
    return [(item, rows[int(item["id"])], plain[index % 8]["pixel_values"]) for index, item in enumerate(items)]


def test_hue_rotated_images_get_the_colourless_caption(tmp_path):
    section = AugmentSection(hue_rotation=0.5, colourless_caption_column="shapes")
    turned = 0
    for item, row, plain in augmented_draws(tmp_path, section, 64):
        kept = torch.allclose(item["pixel_values"], plain, atol=1e-5)
        turned += not kept
        assert item["caption"] == (row["caption"] if kept else row["shapes"])
    assert 16 < turned < 48  # about half


def test_caption_swap_draws_the_other_column_and_keeps_the_image(tmp_path):
    section = AugmentSection(caption_swap=0.25, caption_swap_column="shapes")
    swapped = 0
    for item, row, plain in augmented_draws(tmp_path, section, 160):
        assert torch.equal(item["pixel_values"], plain)  # the image is untouched
        assert item["caption"] in (row["caption"], row["shapes"])
        swapped += item["caption"] == row["shapes"]
    assert 20 < swapped < 60  # about a quarter of 160
    with pytest.raises(ConfigError, match="set augment.caption_swap_column"):
        parse_clip_recipe({**recipe_dict(tmp_path, tmp_path / "run"), "augment": {"caption_swap": 0.3}})
    with pytest.raises(DataError, match="caption_swap_column: pairs.jsonl has no column 'nope'"):
        recipe = recipe_dict(tmp_path, tmp_path / "run")
        recipe["data"]["train_file"] = "pairs.jsonl"
        recipe["augment"] = {"caption_swap": 0.5, "caption_swap_column": "nope"}
        train_clip(parse_clip_recipe(recipe))


def test_retrieval_and_zero_shot_metrics_on_known_embeddings():
    eye = torch.eye(4)
    positives = torch.eye(4, dtype=torch.bool)
    perfect = retrieval(eye, eye, positives)
    assert perfect["i2t_R@1"] == 1.0 and perfect["t2i_mean_rank"] == 1.0
    # Swapped texts: each image ranks its own caption second.
    shifted = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    swapped = retrieval(shifted, texts, torch.eye(2, dtype=torch.bool))
    assert swapped["i2t_R@1"] == 0.0 and swapped["i2t_mean_rank"] == 2.0
    result = zero_shot(eye[:3], eye, torch.tensor([0, 1, 3]))
    assert math.isclose(result["top1"], 2 / 3, rel_tol=1e-6) and result["top5"] == 1.0
    assert int(result["confusion"][2, 1]) == 0 and int(result["confusion"][3, 2]) == 1


def test_zero_shot_prompts_per_class_replace_the_templates(trained):
    from transformers import AutoTokenizer

    from vlkit.clip.evaluate import class_embeddings, class_prompts, embed_texts

    spec = {"classes": ["red circle", "orange star"], "templates": ["a photo of a {}.", "a {}."],
            "prompts": {"orange star": ["an orange star"]}}
    assert class_prompts(spec) == [["a photo of a red circle.", "a red circle."], ["an orange star"]]
    assert class_prompts({"classes": ["red circle"]}) == [["red circle"]]
    model, tokenizer = CLIPModel.from_pretrained(trained).eval(), AutoTokenizer.from_pretrained(trained)
    ensembled = class_embeddings(model, tokenizer, spec["classes"], prompts=class_prompts(spec))
    texts = embed_texts(model, tokenizer, ["a photo of a red circle.", "a red circle.", "an orange star"])
    assert torch.allclose(ensembled[0], torch.nn.functional.normalize(texts[:2].mean(0), dim=0), atol=1e-5)
    assert torch.allclose(ensembled[1], texts[2], atol=1e-5)
    # Without prompts, the templates fill every class (the former behaviour).
    assert torch.allclose(class_embeddings(model, tokenizer, spec["classes"][:1], spec["templates"]), ensembled[:1], atol=1e-5)


def test_shipped_tiny_recipe_is_valid_and_no_augmentation_changes_what_a_caption_says():
    recipe = load_clip_recipe(Path(__file__).parents[1] / "recipes" / "tiny" / "clip.yaml")
    assert recipe.stage == "clip" and recipe.loss.type == "clip" and recipe.loss.gather_with_grad
    augment = recipe.augment
    # Colour is the label and positions are in the captions: no crops, jitter or flips; an image whose
    # hue is turned is paired with a caption that names no colour.
    assert not (augment.random_resized_crop or augment.color_jitter or augment.horizontal_flip)
    assert augment.hue_rotation > 0 and augment.colourless_caption_column == "shapes"
    # The shapes world's 64 px read at 65: an odd size samples both image edges alike
    # (tests/test_tiny_tower_geometry.py).
    assert recipe.model.vision.config["image_size"] == 65
    # A convolutional tower and colour + shape captions: the two levers that taught the tower shape.
    assert recipe.model.vision.config["model_type"] == "resnet" and recipe.data.caption_column == "objects"


def test_a_finished_clip_run_is_replaced_only_with_overwrite(trained, data_dir, tmp_path, capsys):
    """Align and instruct runs check the weights of the tower they were built on: training a CLIP run over a
    finished one needs overwrite=true, and an overwrite whose set-up fails puts the old run back."""
    import shutil

    from vlkit.cli import main as cli_main
    from vlkit.train.output_dir import replaced_run

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    recipe = recipe_dict(data_dir, run)
    with pytest.raises(ConfigError, match="holds a finished run; set overwrite=true"):
        train_clip(parse_clip_recipe(recipe))
    path = tmp_path / "clip.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli_main(["train", str(path), "--dry-run"]) == 2  # the dry run says so too, before anything loads
    assert "holds a finished run" in capsys.readouterr().err
    weights = (run / "model.safetensors").read_bytes()
    with pytest.raises(DataError):  # a data file that cannot be read: the set-up fails, the run comes back
        train_clip(parse_clip_recipe({**recipe, "overwrite": True,
                                      "data": {**recipe["data"], "train_file": "zeroshot_labels.json"}}))
    assert (run / "model.safetensors").read_bytes() == weights and not replaced_run(run).exists()
    recipe["train"]["max_steps"] = 1
    train_clip(parse_clip_recipe({**recipe, "overwrite": True}))
    assert (run / "model.safetensors").read_bytes() != weights and not replaced_run(run).exists()
    # An overwrite killed during its set-up leaves the old run aside and recipe.yaml in its place: no later run
    # there, with or without overwrite, deletes what was set aside.
    killed = tmp_path / "killed_overwrite"
    killed.mkdir()
    (killed / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    shutil.copytree(trained, replaced_run(killed))
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="holds the run an interrupted overwrite=true moved aside"):
            train_clip(parse_clip_recipe({**recipe, "output_dir": str(killed), "overwrite": overwrite}))
    assert (replaced_run(killed) / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()


def test_an_interrupted_clip_run_resumes_to_the_weights_of_an_uninterrupted_one(data_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    """A run cut off after its checkpoint at step 2 (what a kill then leaves: the checkpoint and recipe.yaml)
    continues with resume=true to the weights, step count and tokenizer of the run that was never stopped.
    Without augmentation: the batch the loader had fetched ahead when the checkpoint was saved drew its
    augmentation before the RNG states were saved, so an augmented run resumes with other draws (docs/clip.md)."""
    import shutil

    from vlkit.cli import main as cli_main

    recipe = recipe_dict(data_dir, tmp_path / "straight")
    del recipe["data"]["val_file"]
    recipe["train"].update(max_steps=4, save_steps=2, save_total_limit=None)
    straight = train_clip(parse_clip_recipe(recipe))
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-2", killed / "checkpoints" / "checkpoint-2")
    shutil.copy(straight / "recipe.yaml", killed / "recipe.yaml")
    recipe["output_dir"] = str(killed)
    with pytest.raises(ConfigError, match="holds an unfinished run; set resume=true to continue it or overwrite=true"):
        train_clip(parse_clip_recipe(recipe))
    path = tmp_path / "clip.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli_main(["train", str(path), "resume=true", "--dry-run"]) == 0
    assert f"resume    {killed / 'checkpoints' / 'checkpoint-2'}" in capsys.readouterr().out

    from vlkit.clip.model import ContrastiveModel

    forward, batches = ContrastiveModel.forward, []
    monkeypatch.setattr(ContrastiveModel, "forward", lambda self, *a, **k: batches.append(1) or forward(self, *a, **k))
    resumed = train_clip(parse_clip_recipe({**recipe, "resume": True}))
    assert len(batches) == 2  # steps 3 and 4 only: steps 1 and 2 came from the checkpoint
    expected, got = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == got.keys()
    assert max((expected[name] - got[name]).abs().max().item() for name in expected) < 1e-6
    summary = json.loads((resumed / "run_summary.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_from"] == str(killed / "checkpoints" / "checkpoint-2")
    assert (resumed / "tokenizer.json").read_text() == (straight / "tokenizer.json").read_text()
    with pytest.raises(ConfigError, match="holds no complete checkpoint; drop resume to start over"):
        train_clip(parse_clip_recipe({**recipe, "output_dir": str(tmp_path / "empty"), "resume": True}))
    # A checkpoint folder without every file (cut short, or saved before CLIP checkpoints held the tokenizer)
    # still marks a run that trained there: it is neither trained over nor resumed.
    older = tmp_path / "older"
    shutil.copytree(straight / "checkpoints" / "checkpoint-2", older / "checkpoints" / "checkpoint-2")
    (older / "checkpoints" / "checkpoint-2" / "tokenizer_config.json").unlink()
    with pytest.raises(ConfigError, match="holds an unfinished run; set resume=true"):
        train_clip(parse_clip_recipe({**recipe, "output_dir": str(older)}))
    with pytest.raises(ConfigError, match="holds no complete checkpoint; set overwrite=true to start over"):
        train_clip(parse_clip_recipe({**recipe, "output_dir": str(older), "resume": True}))


def test_the_clip_dry_run_checks_data_files_and_folders(data_dir, tmp_path, capsys):
    from vlkit.cli import main as cli_main

    path = tmp_path / "clip.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(data_dir, tmp_path / "run")))
    assert cli_main(["train", str(path), "--dry-run"]) == 0
    for override, message in (("data.train_file=nope.jsonl", "data file not found: "),
                              ("data.labels_file=nope.json", "data file not found: "),
                              ("data.image_root=/nope", "image root not found: /nope"),
                              ("model.tokenizer=/nope/tok", "model.tokenizer: no folder /nope/tok")):
        capsys.readouterr()
        assert cli_main(["train", str(path), override, "--dry-run"]) == 2, override
        assert message in capsys.readouterr().err, override
