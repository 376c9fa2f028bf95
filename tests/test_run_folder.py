"""The run folder format (vlkit.run_folder): one rebuild, one 4-bit config, run folders that survive a move.

One tiny project is trained once for the module, from its own working directory, the way a user
does: `runs/clip` (a vision tower named by a relative path), `runs/align`, then a QLoRA instruct
run `runs/qlora` continuing it. The model at the end of training is kept to compare reloads with.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import random_image
from train_helpers import align_recipe, write_recipe

from vlkit.errors import ConfigError, ModelLoadError
from vlkit.recipe import load_recipe
from vlkit.run_folder import Location, RunManifest, load_run, quantization_config, rebuild

PROMPT = "<image>\nWhat colour is the shape?"


@dataclass
class Project:
    root: Path  # the working directory it was trained in
    run: Path  # root / runs / qlora
    model: torch.nn.Module  # the model at the end of training
    inputs: dict
    logits: torch.Tensor


def logits_of(model, processor) -> tuple[dict, torch.Tensor]:
    """The logits of one prompt, with bitsandbytes' 4-bit layers on the kernel training uses (set_trainable
    keeps them there): on AVX512-BF16 CPUs an eval forward would otherwise move them to an inference kernel
    that rounds the block scales to bf16 (logits ~3e-3 apart), and the comparisons would see the kernel."""
    for layer in four_bit_layers(model):
        layer.support_avx512bf16_for_cpu = False
    inputs = processor.prompt_inputs([[{"role": "user", "content": PROMPT}]], [[random_image(7)]])
    with torch.no_grad():
        return inputs, model(**inputs).logits


def assert_same_logits(project: Project, model, processor) -> None:
    inputs, logits = logits_of(model, processor)
    assert torch.equal(inputs["input_ids"], project.inputs["input_ids"])
    difference = (logits - project.logits).abs().max().item()
    assert difference < 1e-4, difference


@pytest.fixture(scope="module")
def project(tmp_path_factory, shapes_dir, tiny_vision_dir, tiny_llm_dir) -> Project:
    import vlkit.train.run as train_run

    root = tmp_path_factory.mktemp("project")
    shutil.copytree(tiny_vision_dir, root / "runs" / "clip")
    built = []

    def keep_model(plan):  # the object train_vlm trains in place
        built.append(build_model(plan))
        return built[-1]

    build_model = train_run.build_model
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(train_run, "build_model", keep_model)
        align = align_recipe("runs/align", "runs/clip", tiny_llm_dir, shapes_dir, max_steps=2)
        train_run.train_vlm(load_recipe(write_recipe(root / "align.yaml", align)))
        qlora = {
            "stage": "instruct", "output_dir": "runs/qlora", "init_from": "runs/align",
            "tune": {"llm": "qlora", "lora_r": 4, "lora_alpha": 8},
            "data": {"dir": shapes_dir, "train_file": "instruct_train.json", "max_length": 320},
            "train": {"batch_size": 2, "max_steps": 2, "save_steps": 2, "logging_steps": 1, "report_to": []},
        }
        train_run.train_vlm(load_recipe(write_recipe(root / "qlora.yaml", qlora)))
    model, processor = built[-1]
    model.eval()
    inputs, logits = logits_of(model, processor)
    return Project(root=root, run=root / "runs" / "qlora", model=model, inputs=inputs, logits=logits)


@pytest.fixture(scope="module")
def reloaded(project):
    return load_run(project.run)


def four_bit_layers(model) -> list:
    from bitsandbytes.nn import Linear4bit

    return [module for module in model.language_model.modules() if isinstance(module, Linear4bit)]


def test_the_manifest_records_local_bases_absolute_and_relative_with_a_hash(project, tiny_llm_dir):
    manifest = json.loads((project.run / "manifest.json").read_text())
    vision = manifest["bases"]["vision"]
    assert vision["source"] == "runs/clip" and vision["sha256"]
    assert Path(vision["absolute"]).resolve() == (project.root / "runs" / "clip").resolve()
    assert vision["relative"] == "../clip"
    assert manifest["bases"]["llm"]["absolute"] == str(Path(tiny_llm_dir).absolute())
    assert manifest["init_from"]["relative"] == "../align" and manifest["init_from"]["sha256"]
    checkpoint = json.loads((project.run / "checkpoints" / "checkpoint-2" / "manifest.json").read_text())
    assert checkpoint["bases"]["vision"]["relative"] == "../clip"  # relative to the run dir, not the checkpoint


def test_qlora_reloads_give_the_logits_of_the_trained_model(project, reloaded, tmp_path):
    from vlkit.export import export_run
    from vlkit.loading import load_any

    assert_same_logits(project, *reloaded)
    loaded = load_any(str(project.run), device="cpu")  # what vlkit chat and vlkit eval call
    assert loaded.kind == "run" and four_bit_layers(loaded.model)
    with torch.no_grad():  # as chat runs it: bitsandbytes' own choice of kernel (its bf16 one on AVX512-BF16 CPUs)
        chat_logits = loaded.model(**project.inputs).logits
    assert (chat_logits - project.logits).abs().max().item() < 0.02  # that kernel's rounding, bounded
    assert_same_logits(project, *load_run(project.run))
    # The export merges LoRA into the 4-bit base dequantized: no 4-bit layer left, and the logits of the
    # 4-bit model as training computes them (bitsandbytes' dequantize-then-matmul path).
    assert export_run(project.run, tmp_path / "export", format="vlkit") == "vlkit"
    exported = load_any(str(tmp_path / "export"), device="cpu")
    assert not four_bit_layers(exported.model)
    _, exported_logits = logits_of(exported.model, exported.processor)
    difference = (exported_logits - project.logits).abs().max().item()
    assert difference < 1e-4, difference
    assert "merged into that base dequantized" in (tmp_path / "export" / "README.md").read_text()


def test_training_and_reload_use_the_same_4bit_config(project, reloaded):
    expected = quantization_config(torch.float32)
    assert expected.bnb_4bit_quant_type == "nf4" and expected.bnb_4bit_use_double_quant
    trained, again = four_bit_layers(project.model), four_bit_layers(reloaded[0])
    assert trained and len(trained) == len(again)
    for before, after in zip(trained, again, strict=True):
        saved, resaved = before.state_dict(), after.state_dict()
        assert "weight.quant_state.bitsandbytes__nf4" in saved and "weight.nested_absmax" in saved  # nested: double
        assert saved.keys() == resaved.keys()
        for key in saved:
            assert torch.equal(saved[key], resaved[key]), key  # the very same 4-bit weights and statistics
    for model in (project.model, reloaded[0]):
        config = model.language_model.config.quantization_config
        config = config.to_dict() if hasattr(config, "to_dict") else config
        assert config["bnb_4bit_quant_type"] == "nf4" and config["bnb_4bit_use_double_quant"] is True


def test_a_moved_runs_tree_loads_from_another_cwd(project, tmp_path, monkeypatch):
    from vlkit.loading import load_any

    moved = tmp_path / "elsewhere" / "runs"
    moved.parent.mkdir()
    shutil.move(project.root / "runs", moved)
    try:
        work = tmp_path / "somewhere-else"
        work.mkdir()
        monkeypatch.chdir(work)  # neither the recorded "runs/clip" nor the absolute path exists now
        run = moved / "qlora"
        assert RunManifest.read(run).locate("vision") == str(moved / "clip")
        loaded = load_any(str(run), device="cpu")
        assert_same_logits(project, loaded.model, loaded.processor)
        assert_same_logits(project, *load_run(run / "checkpoints" / "checkpoint-2"))  # a checkpoint finds them too

        tower = moved / "clip"
        tower.rename(tmp_path / "clip-aside")
        try:
            with pytest.raises(ModelLoadError) as missing:
                load_run(run)
            message = str(missing.value)
            assert "\n" not in message and "cannot find the vision tower of run" in message
            assert str(tower) in message and str(project.root / "runs" / "clip") in message

            shutil.copytree(tmp_path / "clip-aside", tower)  # same tower, one weight changed
            from safetensors.torch import load_file, save_file

            weights = load_file(tower / "model.safetensors")
            first = next(iter(weights))
            weights[first] = weights[first] + 1
            save_file(weights, tower / "model.safetensors", metadata={"format": "pt"})
            with pytest.raises(ConfigError, match="the vision base .* changed since run .* was saved"):
                load_run(run)
        finally:
            shutil.rmtree(tower, ignore_errors=True)
            (tmp_path / "clip-aside").rename(tower)
    finally:
        shutil.move(moved, project.root / "runs")


def test_an_old_manifest_without_locations_still_loads(project, tmp_path):
    old = tmp_path / "old-run"
    old.mkdir()
    shutil.copy(project.run / "trainable.safetensors", old)
    manifest = json.loads((project.run / "manifest.json").read_text())
    for name, base in manifest["bases"].items():  # as vlkit wrote them before: source and hash only
        manifest["bases"][name] = {"source": base["absolute"], "sha256": base["sha256"]}
    del manifest["init_from"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert_same_logits(project, *rebuild(old))


def test_hub_ids_and_embedded_names_pass_through(tmp_path):
    for source in ("smollm2-135m-instruct", "openai/clip-vit-large-patch14-336"):
        location = Location.record(source, tmp_path / "run", sha256=None)
        assert location.to_json() == {"source": source, "sha256": None}
        assert location.find(tmp_path / "elsewhere", "LLM of run x") == source

