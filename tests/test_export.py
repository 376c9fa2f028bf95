"""`vlkit export`: llava and vlkit (remote code) folders that load and agree with vlkit where vlkit is not importable.

The parity checks run the exported folder in a fresh `python -I -S` process that adds
site-packages by hand, so vlkit's editable-install hook never runs; the script asserts that
`vlkit` cannot be found before it imports transformers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import HANG_GUARD_S, random_image
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from vlkit import VlkitForConditionalGeneration, VlkitProcessor
from vlkit.cli import main as cli_main
from vlkit.config import VlmRecipe, dump_recipe
from vlkit.export import export_run
from vlkit.export.card import hub_id
from vlkit.train.checkpoint import build_manifest, load_run, save_trained
from vlkit.train.stages import apply_adapters, set_trainable

PROMPT = "What colour is the shape?"
TINY_QFORMER = {"type": "qformer", "num_queries": 4, "hidden_size": 32, "depth": 2, "num_heads": 4}

# Runs in the isolated process: for each (folder, format, result) job, load the folder with stock
# transformers only, answer one prompt, save the results.
ISOLATED_CHECK = r'''
import importlib.util, json, sys
site_packages, image_path, prompt, jobs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
sys.path.append(site_packages)
assert importlib.util.find_spec("vlkit") is None, "vlkit is importable in the isolated process"
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration, pipeline

for folder, fmt, result in jobs:
    remote = fmt == "vlkit"
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=remote).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=remote)
    if fmt == "llava":
        assert type(LlavaForConditionalGeneration.from_pretrained(folder)) is type(model)
    content = [{"type": "image", "image": Image.open(image_path)}, {"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    save_file({"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"], "logits": logits,
               "generated": generated}, result + ".safetensors")
    # transformers' own entry point for chat with images, as a Hub user calls it
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=remote)
    reply = pipe(text=messages, max_new_tokens=8, do_sample=False)[0]["generated_text"][-1]["content"]
    new_tokens = processor.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    vlkit_modules = sorted(name for name in sys.modules if name == "vlkit" or name.startswith("vlkit."))
    with open(result + ".json", "w") as file:
        json.dump({"model_class": type(model).__name__, "model_module": type(model).__module__,
                   "processor_class": type(processor).__name__, "text": text, "vlkit_modules": vlkit_modules,
                   "pipeline_reply": reply, "generated_text": new_tokens}, file)
'''


# --- runs saved directly (no Trainer): build, perturb what a stage trains, save ----------------------------
def save_run(folder: Path, vision: str, llm: str, connector: dict, tune: dict, stage: str = "instruct"):
    recipe = VlmRecipe.model_validate({
        "stage": stage, "output_dir": str(folder),
        "model": {"vision": vision, "llm": llm, "connector": connector},
        "tune": tune, "data": {"dir": "/data/shapes", "train_file": "instruct_train.json"},
        "train": {"max_steps": 2, "seed": 0},
    })
    from vlkit import build_vlm

    quantization = None
    if tune["llm"] == "qlora":
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    torch.manual_seed(0)
    model, _ = build_vlm(vision=vision, llm=llm, connector=connector, llm_quantization_config=quantization)
    apply_adapters(model, recipe.tune)
    set_trainable(model, recipe.tune)
    with torch.no_grad():  # LoRA B starts at zero: move every trained weight so merging has an effect
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(dump_recipe(recipe))
    save_trained(model, folder, build_manifest(recipe, model, {"vision": vision, "llm": llm}, []))
    summary = {"stage": stage, "steps": 2, "samples": 8, "wall_time_s": 1.5,
               "final_metrics": {"train_loss": 2.3456, "eval_loss": 2.5}}
    (folder / "run_summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_vision_dir, tiny_llm_dir):
    folder = save_run(tmp_path_factory.mktemp("export") / "lora-run", tiny_vision_dir, tiny_llm_dir,
                      {"type": "mlp", "depth": 2}, {"llm": "lora", "vision": "lora", "lora_r": 4, "lora_alpha": 8})
    (folder / "eval").mkdir()
    (folder / "eval" / "eval.json").write_text(json.dumps({
        "model": str(folder), "data": "instruct_test.json", "questions": 12, "images": 4,
        "by_type": {"colour": {"n": 12, "accuracy": 0.75}}, "overall_accuracy": 0.75}))
    return folder


@pytest.fixture(scope="module")
def qformer_run(tmp_path_factory, tiny_vision_dir, tiny_llm_dir):
    return save_run(tmp_path_factory.mktemp("export") / "qformer-run", tiny_vision_dir, tiny_llm_dir, TINY_QFORMER,
                    {"llm": "frozen"}, stage="align")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("image") / "shape.png"
    random_image(7).save(path)
    return str(path)


@pytest.fixture(scope="module")
def exports(lora_run, qformer_run, image_file, tmp_path_factory) -> dict[str, tuple[Path, dict, dict]]:
    """The LoRA run as llava, the Q-Former run as vlkit (auto, sharded), both run in one process without vlkit."""
    work = tmp_path_factory.mktemp("exports")
    llava, remote = work / "llava", work / "qformer"
    assert export_run(lora_run, llava, format="llava") == "llava"
    assert export_run(qformer_run, remote, max_shard_size="300KB") == "vlkit"  # a Q-Former has no Llava counterpart
    started = time.time()
    results = run_isolated([(llava, "llava"), (remote, "vlkit")], image_file, work / "isolated")
    print(f"\nisolated process (both exports): {time.time() - started:.1f} s")
    return {"llava": (llava, *results[0]), "vlkit": (remote, *results[1])}


# --- helpers -------------------------------------------------------------------------------------------------
def run_isolated(jobs: list[tuple[Path, str]], image: str, work: Path) -> list[tuple[dict, dict]]:
    """Load and run exports in one fresh process where vlkit cannot be imported; (tensors, facts) per job."""
    work.mkdir(parents=True, exist_ok=True)
    script = work / "check.py"
    script.write_text(ISOLATED_CHECK)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(work / "hf_modules"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    spec = [(str(folder), fmt, str(work / f"result-{index}")) for index, (folder, fmt) in enumerate(jobs)]
    # -I: no PYTHONPATH, no user site, no script dir on sys.path; -S: no site, so no .pth (editable vlkit) hooks.
    completed = subprocess.run(
        [sys.executable, "-I", "-S", str(script), sysconfig.get_paths()["purelib"], image, PROMPT, json.dumps(spec)],
        cwd=work, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [(load_file(f"{result}.safetensors"), json.loads(Path(f"{result}.json").read_text())) for *_, result in spec]


def vlkit_reference(run: Path, image: str):
    """vlkit's own model (LoRA unmerged) on the same image + prompt, drawn under the export's seed."""
    torch.manual_seed(0)  # the export draws the unsaved <image> embedding row under the run's seed (0)
    model, processor = load_run(run)
    conversation = [{"role": "user", "content": f"<image>\n{PROMPT}"}]
    inputs = processor.prompt_inputs([conversation], [[Image.open(image)]])
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    return inputs, logits, generated, processor.render(conversation, add_generation_prompt=True)


def assert_parity(run: Path, got: dict, info: dict, image: str) -> float:
    inputs, logits, generated, text = vlkit_reference(run, image)
    assert info["vlkit_modules"] == []
    assert info["text"] == text  # the chat template puts <image> where training put it
    assert info["pipeline_reply"] == info["generated_text"]  # pipeline("image-text-to-text") answers as generate
    assert torch.equal(got["input_ids"], inputs["input_ids"])
    assert torch.equal(got["pixel_values"], inputs["pixel_values"])
    difference = (got["logits"] - logits).abs().max().item()
    assert difference < 1e-4, difference
    assert torch.equal(got["generated"], generated)
    return difference


def assert_one_error_line(stderr: str, message: str) -> None:
    """The CLI printed one `error: ...` line with the message (library progress bars aside), no traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr


def cli(*args: str) -> int:
    return cli_main(["export", *args])


# --- the done-when checks ------------------------------------------------------------------------------------
def test_llava_export_runs_in_stock_transformers_like_vlkit(exports, lora_run, image_file, tmp_path, tiny_vision_dir,
                                                          tiny_llm_dir):
    out, got, info = exports["llava"]
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                 "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md", "model.safetensors"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaForConditionalGeneration"]
    assert {"vision_config", "text_config", "image_token_index", "projector_hidden_act", "vision_feature_layer",
            "vision_feature_select_strategy"} <= set(config)
    assert tiny_vision_dir not in (out / "config.json").read_text() and tiny_llm_dir not in (out / "config.json").read_text()
    with safe_open(str(out / "model.safetensors"), framework="pt") as weights:
        names = set(weights.keys())
    # Exactly the names stock transformers writes for a Llava model of this config; no LoRA left.
    stock = tmp_path / "stock"
    LlavaForConditionalGeneration(LlavaConfig.from_pretrained(out)).save_pretrained(stock)
    with safe_open(str(stock / "model.safetensors"), framework="pt") as weights:
        assert names == set(weights.keys())
    assert not any("lora_" in name or name.startswith("connector.") for name in names)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bad_words_ids"] == [[config["image_token_index"]]]
    assert generation["pad_token_id"] is not None and generation["eos_token_id"] is not None

    assert info["model_class"] == "LlavaForConditionalGeneration" and info["processor_class"] == "LlavaProcessor"
    difference = assert_parity(lora_run, got, info, image_file)
    print(f"llava vs vlkit (LoRA on LLM and vision tower, merged): max |logit difference| {difference:.2e}, "
          "greedy tokens equal")


def test_qformer_exports_as_remote_code_that_runs_without_vlkit(exports, qformer_run, image_file):
    out, got, info = exports["vlkit"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "vlkit"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_vlkit.VlkitForConditionalGeneration"
    assert json.loads((out / "processor_config.json").read_text())["auto_map"]["AutoProcessor"].startswith("processing_")
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(out.glob("model-*.safetensors"))) > 1
    code = {path.name: path.read_text() for path in out.glob("*.py")}
    assert "vlkit_connector_qformer.py" in code and "vlkit_connector_resampler.py" not in code  # only what it uses
    for name, text in code.items():
        assert not re.search(r"^\s*(from|import)\s+vlkit\b", text, flags=re.MULTILINE), name
        assert ".register(" not in text.replace("def register_connector", ""), name  # vlkit's Auto registrations
    assert info["model_module"].startswith("transformers_modules.") and info["processor_class"] == "VlkitProcessor"
    difference = assert_parity(qformer_run, got, info, image_file)
    print(f"vlkit-format qformer vs vlkit: max |logit difference| {difference:.2e}, greedy tokens equal")
    # Where vlkit is imported, its own registered classes load the folder (no remote code needed).
    processor = AutoProcessor.from_pretrained(out)
    assert type(AutoModelForImageTextToText.from_pretrained(out)) is VlkitForConditionalGeneration
    assert type(processor) is VlkitProcessor and processor.image_seq_length == TINY_QFORMER["num_queries"]


@pytest.mark.parametrize("fmt", ["llava", "vlkit"])
def test_vlkit_loader_reads_exports_like_the_run(fmt, exports, lora_run, qformer_run, image_file):
    """`load_any` (behind vlkit chat / eval) answers from an exported folder as from the run it came from."""
    loading = pytest.importorskip("vlkit.loading")
    out, _, _ = exports[fmt]
    loaded = loading.load_any(str(out), device="cpu", dtype="float32")
    assert loaded.kind == fmt
    inputs, logits, generated, _ = vlkit_reference(lora_run if fmt == "llava" else qformer_run, image_file)
    mine = loaded.prompt_inputs([[{"role": "user", "content": f"<image>\n{PROMPT}"}]], [[Image.open(image_file)]])
    assert torch.equal(mine["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        assert (loaded.model(**mine).logits - logits).abs().max().item() < 1e-4
        assert torch.equal(loaded.model.generate(**mine, do_sample=False, max_new_tokens=8), generated)


# --- format choice, dtype, model card ---------------------------------------------------------------------
def test_auto_picks_llava_and_writes_the_dtype_and_a_model_card(lora_run, tmp_path, capsys):
    out = tmp_path / "auto"
    assert cli(str(lora_run), str(out), "--dtype", "bfloat16") == 0
    printed = capsys.readouterr().out
    assert "format llava, bfloat16" in printed and "trust_remote_code" not in printed
    assert {tensor.dtype for tensor in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert {"vlkit", "connector-mlp", "llava"} <= set(card.data.tags)
    assert card.data.base_model is None  # local folders are not Hub ids
    text = card.text
    assert "Stage `instruct` (LLM: lora)" in text and "/data/shapes/instruct_train.json" in text
    assert "train_loss 2.3456" in text and "| colour | 12 | 0.750 |" in text
    assert "LoRA weights merged into: language_model" in text and "AutoModelForImageTextToText" in text
    assert "| LoRA, merged |" in text


def test_hub_ids_in_card_metadata():
    assert hub_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("openai/clip-vit-large-patch14-336") == "openai/clip-vit-large-patch14-336"
    assert hub_id("/tmp/some/folder") is None


def test_qlora_run_merges_into_the_dequantized_4bit_base(tmp_path, tiny_vision_dir, tiny_llm_dir):
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    run = save_run(tmp_path / "qlora-run", tiny_vision_dir, tiny_llm_dir, {"type": "mlp", "depth": 2},
                   {"llm": "qlora", "lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["q_proj"]})
    out = tmp_path / "out"
    assert export_run(run, out, format="llava") == "llava"
    trained = load_file(run / "trainable.safetensors")
    prefix = "language_model.base_model.model.model.layers.0.self_attn.q_proj"
    lora_a, lora_b = trained[f"{prefix}.lora_A.default.weight"], trained[f"{prefix}.lora_B.default.weight"]
    base = load_file(Path(tiny_llm_dir) / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    exported = LlavaForConditionalGeneration.from_pretrained(out)
    merged = exported.model.language_model.layers[0].self_attn.q_proj.weight.detach()
    assert merged.dtype == torch.float32 and not any("lora_" in name for name in exported.state_dict())
    packed, state = quantize_4bit(base, quant_type="nf4", compress_statistics=True)  # as QLoRA quantized it
    trained_on = dequantize_4bit(packed, state)
    assert (trained_on - base).abs().max() > 1e-3  # the 4-bit rounding the adapters trained with is visible
    assert torch.allclose(merged, trained_on + (8 / 4) * lora_b @ lora_a, atol=1e-6)  # NF4 base + scaled LoRA
    assert "merged into that base dequantized" in (out / "README.md").read_text()


def test_full_strategy_keeps_the_cls_token_in_both_formats(tiny_vision_dir, tiny_llm_dir):
    from vlkit import build_vlm
    from vlkit.export.llava import llava_blocker, llava_image_seq_length

    model, processor = build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, connector={"type": "mlp", "depth": 2},
                                 vision_feature_select_strategy="full")
    assert llava_blocker(model, processor) is None
    assert llava_image_seq_length(model.config, processor.image_processor) == model.config.image_seq_length == 17


@pytest.mark.parametrize("connector", [
    {"type": "linear"}, {"type": "mlp", "depth": 3}, TINY_QFORMER,
    {"type": "resampler", "num_latents": 4, "depth": 1, "hidden_size": 32, "num_heads": 2},
    {"type": "pixel_shuffle", "scale_factor": 2},
])
def test_remote_code_ships_every_connector(connector, tmp_path, monkeypatch):
    """The generated files import on their own (as a package of their own) and build the same connector."""
    import importlib

    from vlkit.connectors import build_connector
    from vlkit.export.remote_code import write_remote_code

    package = f"shipped_{connector['type']}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    files = write_remote_code(tmp_path / package, connector["type"])
    assert len([name for name in files if name.startswith("vlkit_connector_") and name not in (
        "vlkit_connector_base.py", "vlkit_connector_registry.py")]) == 1
    monkeypatch.syspath_prepend(str(tmp_path))
    modeling = importlib.import_module(f"{package}.modeling_vlkit")
    importlib.import_module(f"{package}.processing_vlkit")
    shipped = modeling.build_connector(connector, 48, 64)
    assert type(shipped).__module__.startswith(package)
    own = build_connector(connector, 48, 64)
    assert {k: v.shape for k, v in shipped.state_dict().items()} == {k: v.shape for k, v in own.state_dict().items()}
    # Its own registry, holding just this connector; vlkit's registry is untouched.
    assert set(modeling.build_connector.__globals__["CONNECTORS"]) == {connector["type"]}


# --- push -----------------------------------------------------------------------------------------------------
def test_push_to_hub_uploads_the_exported_folder(qformer_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []
    out = tmp_path / "pushed"

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        assert (Path(kwargs["folder_path"]) / "README.md").is_file()  # the finished folder, card included

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert cli(str(qformer_run), str(out), "--push-to-hub", "someone/tiny-vlm", "--private") == 0
    printed = capsys.readouterr().out
    assert "trust_remote_code=True" in printed and "uploaded to https://huggingface.co/someone/tiny-vlm" in printed
    assert [call[:2] for call in calls] == [("create_repo", "someone/tiny-vlm"), ("upload_folder", "someone/tiny-vlm")]
    assert calls[0][2]["private"] is True
    assert Path(calls[1][2]["folder_path"]) == out and calls[1][2].get("repo_type", "model") == "model"
    assert 'from_pretrained("someone/tiny-vlm", trust_remote_code=True)' in (out / "README.md").read_text()

    def offline(self, repo_id, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    assert cli(str(qformer_run), str(out), "--overwrite", "--push-to-hub", "someone/tiny-vlm") == 2
    assert_one_error_line(capsys.readouterr().err, f"no route to host); the export is complete in {out}")
    assert (out / "config.json").is_file()


# --- bad input: one line each, exit code 2, nothing written ---------------------------------------------------
def test_bad_input_is_one_line_each(lora_run, qformer_run, tmp_path, capsys, monkeypatch, tiny_llm_dir):
    unfinished = tmp_path / "unfinished"
    checkpoint = unfinished / "checkpoints" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    monkeypatch.chdir(checkpoint.parent)  # "." and tmp_path hold the current folder: never replaced
    (checkpoint / "manifest.json").write_text(yaml.safe_dump({"format": "vlkit-run/1"}))
    (checkpoint / "trainer_state.json").write_text("{}")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    (full / "config.json").write_text("{}")
    (full / "README.md").write_text("---\ntags: [vlkit\n---\n")  # a card whose YAML is broken: not an export
    cases = [
        ((str(unfinished), str(tmp_path / "a")), f"export its newest checkpoint instead: {checkpoint}"),
        ((str(tmp_path / "nothing"), str(tmp_path / "b")), "does not exist"),
        ((str(full), str(tmp_path / "b")), "is not a finished vlkit run or checkpoint"),
        ((str(lora_run), str(tmp_path / "c"), "--format", "onnx"), "unknown export format 'onnx'"),
        ((str(lora_run), str(tmp_path / "c"), "--dtype", "int8"), "unknown export dtype 'int8'"),
        ((str(qformer_run), str(tmp_path / "d"), "--format", "llava"), "--format llava does not apply: "),
        ((str(lora_run), str(full)), "exists and is not empty; pass --overwrite"),
        ((str(lora_run), str(full), "--overwrite"), "is not an earlier vlkit export (a model folder whose README.md"),
        ((str(lora_run), str(tiny_llm_dir), "--overwrite"), "is not an earlier vlkit export"),  # a base model's folder
        ((str(lora_run), str(lora_run), "--overwrite"), "overlaps the run"),
        ((str(lora_run), str(tmp_path)), "is the current folder or holds it"),
        ((str(lora_run), ".", "--overwrite"), "is the current folder or holds it"),
        ((str(lora_run), str(lora_run / "export")), "overlaps the run"),
        ((str(lora_run), str(tmp_path / "e"), "--push-to-hub", "not a repo id"), "not a valid Hub repo id"),
    ]
    for args, message in cases:
        assert cli(*args) == 2, args
        assert_one_error_line(capsys.readouterr().err, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "unfinished"]  # nothing half-written
    assert (full / "keep.txt").is_file()


def test_llava_refuses_a_tower_whose_prefix_it_would_drop_wrongly(tmp_path, tiny_siglip_dir, tiny_llm_dir, capsys):
    run = save_run(tmp_path / "siglip-run", tiny_siglip_dir, tiny_llm_dir, {"type": "mlp", "depth": 2},
                   {"llm": "frozen"}, stage="align")
    assert cli(str(run), str(tmp_path / "out"), "--format", "llava") == 2
    assert_one_error_line(capsys.readouterr().err, "has 0 prefix token(s) and vision_feature_select_strategy is 'default'")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_exports_and_its_card_says_which(qformer_run, tmp_path):
    import shutil

    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    for name in ("manifest.json", "trainable.safetensors"):
        shutil.copy(qformer_run / name, checkpoint / name)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    assert export_run(checkpoint, tmp_path / "out") == "vlkit"
    assert "checkpoint `checkpoint-2` (step 2) of run `run`" in (tmp_path / "out" / "README.md").read_text()


def test_overwrite_replaces_an_earlier_export(qformer_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert export_run(qformer_run, out) == "vlkit"
    (out / "stale.txt").write_text("old")
    assert export_run(qformer_run, out, overwrite=True) == "vlkit"
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    monkeypatch.chdir(tmp_path)  # "out/" names the folder, and the staging folder goes beside it, not in it
    assert export_run(qformer_run, "out/", overwrite=True) == "vlkit"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_damaged_weights_file_is_one_line(qformer_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(qformer_run, run)
    weights = run / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    assert cli(str(run), str(tmp_path / "out")) == 2
    assert_one_error_line(capsys.readouterr().err, "the file is damaged: train again, or use an earlier checkpoint")
    assert not (tmp_path / "out").exists()
