"""Training stages end to end on tiny models: align -> instruct, QLoRA, kill-and-resume, 2 processes, a batch fitted
to memory and a step out of memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD_S
from safetensors.torch import load_file
from train_helpers import REPO, align_recipe, finish, free_port, start_cli, write_recipe

from vlkit.cli import main as cli_main
from vlkit.errors import ConfigError
from vlkit.recipe import load_recipe
from vlkit.train.checkpoint import load_run
from vlkit.train.run import train_vlm


def assert_peak_memory(summary: dict) -> None:
    """run_summary.json's peak memory: the host's always, the accelerator's where there is one."""
    peak = summary["peak_memory_gib"]
    assert 0.05 < peak["host_rss"] < 64  # a Python process with torch loaded, on a machine of this size
    assert (peak["accelerator"] is None) == (not torch.accelerator.is_available())


def test_align_then_instruct_end_to_end(tmp_path, shapes_dir, tiny_vision_dir, tiny_llm_dir):
    align = align_recipe(tmp_path / "align", tiny_vision_dir, tiny_llm_dir, shapes_dir, max_steps=5, save_steps=2)
    align["data"].update(val_file="align_val.json", max_val_samples=3)
    align["model"]["system_prompt"] = "Answer briefly."
    align_dir = train_vlm(load_recipe(write_recipe(tmp_path / "align.yaml", align)))
    for name in ("recipe.yaml", "manifest.json", "trainable.safetensors", "run_summary.json", "loss.png",
                 "processor/processor_config.json"):
        assert (align_dir / name).is_file(), name
    saved = load_file(align_dir / "trainable.safetensors")
    assert saved and all(name.startswith("connector.") for name in saved)
    summary = json.loads((align_dir / "run_summary.json").read_text())
    assert summary["steps"] == 5 and summary["skipped_samples"] == 0 and "eval_loss" in summary["final_metrics"]
    assert summary["val_samples"] == 3  # data.max_val_samples keeps the end-of-run loss cheap
    rates = [entry.get("samples_per_s") for entry in summary["log_history"] if "loss" in entry]
    assert len(rates) == 5 and all(rate > 0 for rate in rates)  # every logged step's throughput is kept
    assert_peak_memory(summary)
    assert sorted(p.name for p in (align_dir / "checkpoints").iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-4", "checkpoint-5"]  # rotation keeps the last two; the final step is saved too
    # A checkpoint is megabytes-small: the trained weights, not the bases.
    base_bytes = sum(p.stat().st_size for p in Path(tiny_llm_dir).glob("*.safetensors"))
    assert (align_dir / "checkpoints/checkpoint-4/trainable.safetensors").stat().st_size < base_bytes / 5

    instruct = {
        "stage": "instruct", "output_dir": str(tmp_path / "instruct"), "init_from": str(align_dir),
        "tune": {"llm": "lora", "lora_r": 4, "lora_alpha": 8},
        "data": {"dir": shapes_dir, "train_file": "instruct_train.json", "max_length": 320},
        "train": {"batch_size": 4, "max_steps": 3, "logging_steps": 1, "report_to": [], "llm_learning_rate": 5e-4,
                  "profile_step": 2},
    }
    instruct_dir = train_vlm(load_recipe(write_recipe(tmp_path / "instruct.yaml", instruct)))
    profile = (instruct_dir / "profile.txt").read_text()  # train.profile_step: where step 2's time went
    assert profile.startswith("step 2: ") and "aten::mm" in profile and (instruct_dir / "profile_trace.json").is_file()
    saved = load_file(instruct_dir / "trainable.safetensors")
    assert any("lora_" in name for name in saved) and any(name.startswith("connector.") for name in saved)
    assert all(name.startswith("connector.") or "lora_" in name for name in saved)
    # The instruct run started from the align run's connector, then trained it further.
    align_connector = load_file(align_dir / "trainable.safetensors")
    assert not torch.equal(align_connector["connector.layers.0.weight"], saved["connector.layers.0.weight"])

    model, processor = load_run(instruct_dir)
    for name, parameter in model.named_parameters():
        if name in saved:
            assert torch.equal(parameter.detach(), saved[name]), name
    manifest = json.loads((instruct_dir / "manifest.json").read_text())
    assert [s["stage"] for s in manifest["stages"]] == ["align", "instruct"]
    # The align recipe's system prompt carries into the instruct run and into its rebuilt processor.
    assert manifest["model"]["system_prompt"] == "Answer briefly."
    assert "Answer briefly." in processor.render([{"role": "user", "content": "Hi"}])
    assert manifest["bases"]["llm"]["sha256"]

    # A stage continued from a run takes its dtype unless the recipe sets one (a float32 default would build
    # a bf16-trained 7B model at twice the memory).
    from vlkit.train.run import plan_run

    align_manifest = json.loads((align_dir / "manifest.json").read_text())
    align_manifest["model"]["dtype"] = "bfloat16"
    (align_dir / "manifest.json").write_text(json.dumps(align_manifest))
    instruct_path = write_recipe(tmp_path / "instruct.yaml", {**instruct, "output_dir": str(tmp_path / "next")})
    assert plan_run(load_recipe(instruct_path)).recipe.model.dtype == "bfloat16"
    assert plan_run(load_recipe(instruct_path, ["model.dtype=float32"])).recipe.model.dtype == "float32"


def test_resume_on_changed_base_is_an_error(tmp_path, shapes_dir, tiny_vision_dir, tiny_llm_dir):
    import shutil

    llm_copy = tmp_path / "llm"
    shutil.copytree(tiny_llm_dir, llm_copy)
    tree = align_recipe(tmp_path / "run", tiny_vision_dir, str(llm_copy), shapes_dir, max_steps=2, save_steps=2)
    path = write_recipe(tmp_path / "r.yaml", tree)
    train_vlm(load_recipe(path))
    (tmp_path / "run" / "run_summary.json").unlink()  # make it an unfinished run
    from safetensors.torch import load_file as load
    from safetensors.torch import save_file

    weights = load(llm_copy / "model.safetensors")
    first = next(iter(weights))
    weights[first] = weights[first] + 1
    save_file(weights, llm_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="changed since checkpoint .* was saved"):
        train_vlm(load_recipe(path, ["resume=true"]))


def test_resume_after_the_init_from_run_was_retrained_is_an_error(tmp_path, shapes_dir, tiny_vision_dir, tiny_llm_dir):
    align = align_recipe(tmp_path / "align", tiny_vision_dir, tiny_llm_dir, shapes_dir, max_steps=1)
    align_path = write_recipe(tmp_path / "align.yaml", align)
    train_vlm(load_recipe(align_path))
    instruct = {
        "stage": "instruct", "output_dir": str(tmp_path / "instruct"), "init_from": str(tmp_path / "align"),
        "tune": {"llm": "lora", "lora_r": 2, "lora_alpha": 4},
        "data": {"dir": shapes_dir, "train_file": "instruct_train.json", "max_length": 320},
        "train": {"batch_size": 2, "max_steps": 2, "save_steps": 2, "logging_steps": 1, "report_to": []},
    }
    instruct_path = write_recipe(tmp_path / "instruct.yaml", instruct)
    train_vlm(load_recipe(instruct_path))
    (tmp_path / "instruct" / "run_summary.json").unlink()  # make it an unfinished run
    train_vlm(load_recipe(align_path, ["overwrite=true", "train.seed=1"]))  # the parent trains again
    with pytest.raises(ConfigError, match="init_from run .* holds other trained weights"):
        train_vlm(load_recipe(instruct_path, ["resume=true"]))


def test_qlora_instruct_runs_on_cpu(tmp_path, shapes_dir, tiny_vision_dir, tiny_llm_dir):
    tree = {
        "stage": "instruct", "output_dir": str(tmp_path / "qlora"),
        "model": {"vision": tiny_vision_dir, "llm": tiny_llm_dir},
        "tune": {"llm": "qlora", "lora_r": 4, "lora_alpha": 8},
        "data": {"dir": shapes_dir, "train_file": "instruct_train.json", "max_length": 320},
        "train": {"batch_size": 2, "max_steps": 2, "logging_steps": 1, "report_to": []},
    }
    run_dir = train_vlm(load_recipe(write_recipe(tmp_path / "q.yaml", tree)))
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_metrics"]["train_loss"] > 0
    model, _ = load_run(run_dir)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.language_model.modules())


def test_qlora_gradients_survive_the_stage_probes(tiny_vision_dir, tiny_llm_dir):
    """The stage's one-time probes run the 4-bit LLM in eval mode without grad. On a CPU with AVX512-BF16
    bitsandbytes then repacks each 4-bit weight for a kernel without a backward, and the LoRA weights
    below a layer got gradients without the path through it (bitsandbytes 0.50 + peft on a tiny Llama: after
    one eval forward, layer 0's q_proj lora_A gradient norm was 0.00037 instead of 0.00124). The LoRA
    gradients after the probes must be those before them."""
    from vlkit import build_vlm
    from vlkit.config import TuneSection
    from vlkit.run_folder import quantization_config
    from vlkit.train.stages import apply_adapters, set_trainable

    torch.manual_seed(0)
    model, _ = build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, connector={"type": "mlp", "depth": 2},
                         llm_quantization_config=quantization_config(torch.float32))
    tune = TuneSection(llm="qlora", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    apply_adapters(model, tune)
    set_trainable(model, tune)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)  # so that lora_A gets a gradient too
    input_ids = torch.randint(3, model.get_input_embeddings().num_embeddings, (2, 12), generator=torch.Generator().manual_seed(1))

    def lora_gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if "lora_" in name and p.grad is not None}

    before = lora_gradients()
    model.use_loss_at_labels()  # the probes, as the stage runs them before its first step
    after = lora_gradients()
    assert before and before.keys() == after.keys()
    for name in before:
        assert torch.allclose(after[name], before[name], rtol=1e-4, atol=1e-7), name


def test_killed_run_resumes_to_the_same_weights(tmp_path, shapes_dir, tiny_vision_dir, tiny_llm_dir):
    steps = 30
    tree = align_recipe(tmp_path / "killed", tiny_vision_dir, tiny_llm_dir, shapes_dir, max_steps=steps, save_steps=5,
                        logging_steps=5)
    killed = write_recipe(tmp_path / "killed.yaml", tree)
    # Killed at the end of step 7, two steps after its first checkpoint: a kill at a known point, not a race
    # between a watcher and the run (which saves its next checkpoints within half a second on these cores).
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "KILL_AT_STEP": "7"}
    process = subprocess.run([sys.executable, str(REPO / "tests" / "train_killed_at_step.py"), "train", killed],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoints" / "checkpoint-5" / "manifest.json").exists()
    assert not (tmp_path / "killed" / "run_summary.json").exists()

    resumed = start_cli("train", killed, "resume=true")
    # The uninterrupted run trains here meanwhile, with the thread count the processes inherit (conftest.py).
    tree["output_dir"] = str(tmp_path / "straight")
    assert cli_main(["train", write_recipe(tmp_path / "straight.yaml", tree)]) == 0
    resumed = finish(resumed)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((tmp_path / "killed" / "run_summary.json").read_text())
    assert summary["resumed_from"] and summary["steps"] == steps

    a = load_file(tmp_path / "killed" / "trainable.safetensors")
    b = load_file(tmp_path / "straight" / "trainable.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    # and training did move the weights
    untrained = load_file(tmp_path / "killed" / "checkpoints" / f"checkpoint-{steps}" / "trainable.safetensors")
    assert torch.equal(untrained["connector.layers.0.weight"], a["connector.layers.0.weight"])


# train.compile under DDP too; and LoRA alone trains (connector frozen): DDP skips its search for unused weights.
@pytest.mark.parametrize("stage,compiled", [("align", False), ("align", True), ("instruct", False)])
def test_two_processes_match_one_with_double_batch(tmp_path, shapes_dir, tiny_vision_dir, tiny_llm_dir, stage,
                                                   compiled):
    def losses(run_dir: Path) -> list[float]:
        history = json.loads((run_dir / "run_summary.json").read_text())["log_history"]
        return [entry["loss"] for entry in history if "loss" in entry]

    one = align_recipe(tmp_path / "one", tiny_vision_dir, tiny_llm_dir, shapes_dir, max_steps=4, batch_size=4,
                       compile=compiled)
    two = align_recipe(tmp_path / "two", tiny_vision_dir, tiny_llm_dir, shapes_dir, max_steps=4, batch_size=2,
                       compile=compiled)
    if stage == "instruct":
        for tree in (one, two):
            tree["stage"] = "instruct"
            tree["tune"] = {"llm": "lora", "connector": "frozen", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
            tree["data"]["train_file"] = "instruct_train.json"
    # The README's command, as a user types it: no environment variables of ours.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    accelerate = Path(sys.executable).with_name("accelerate")
    launched = subprocess.Popen([str(accelerate), "launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml",
                                 "--main_process_port", str(free_port()), "-m", "vlkit", "train",
                                 write_recipe(tmp_path / "two.yaml", two)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The 1-process run trains here while the launch starts up: it needs no fresh process of its own.
    assert cli_main(["train", write_recipe(tmp_path / "one.yaml", one)]) == 0
    result = finish(launched)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("regions compiled") == (2 if compiled else 0)  # each rank compiled its layers
    # Where only LoRA trains DDP is told every weight is used. Align leaves DDP to search each step, which warns
    # that it found none unused: that half keeps the instruct half from passing on a changed warning text.
    assert ("find_unused_parameters=True" in result.stderr) == (stage == "align"), result.stderr[-2000:]
    summary = json.loads((tmp_path / "two" / "run_summary.json").read_text())
    assert summary["samples"] == 4 * 2 * 2  # 4 steps x batch 2 x 2 ranks: both ranks trained
    single, double = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(single) == len(double) == 4
    for a, b in zip(single, double):
        assert abs(a - b) < 1e-5, (single, double)
    a = load_file(tmp_path / "one" / "trainable.safetensors")
    b = load_file(tmp_path / "two" / "trainable.safetensors")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_a_late_rank_finds_its_checkpoint_folder(tmp_path, shapes_dir, tiny_vision_dir, tiny_llm_dir):
    """Rank 1 writes its checkpoint file only after rank 0 finished its own: the staging folder must still
    be there (rank 0 renames it only when every rank is done). Without that barrier this run exits 1."""
    from train_slow_rank_save import LATE_MARKER

    tree = align_recipe(tmp_path / "run", tiny_vision_dir, tiny_llm_dir, shapes_dir, max_steps=4, batch_size=2,
                        save_steps=2)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run([str(accelerate), "launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml",
                             "--main_process_port", str(free_port()), str(REPO / "tests" / "train_slow_rank_save.py"),
                             "train", write_recipe(tmp_path / "run.yaml", tree)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert LATE_MARKER.format(rank=1) in result.stderr
    for step in (2, 4):
        folder = tmp_path / "run" / "checkpoints" / f"checkpoint-{step}"
        assert (folder / "rng_state_0.pth").is_file() and (folder / "rng_state_1.pth").is_file(), step


@pytest.mark.parametrize(("device", "launch", "moved"), [
    ("cuda:1", None, True),  # one process per GPU (DDP, or none): the Trainer would move it next anyway
    ("cpu", None, False),
    ("cuda:0", "FSDP", False),  # FSDP and DeepSpeed place the model themselves
    ("cuda:0", "DEEPSPEED", False),
])
def test_the_probes_run_where_the_model_trains(monkeypatch, device, launch, moved):
    """The one-time probes (labels-only loss, last layer, packing) run on the accelerator the model trains on,
    not on the CPU it loaded on: a 7B forward there, and a flex-attention kernel compiled for the CPU."""
    from vlkit.train.run import place_before_probes

    for kind in ("FSDP", "DEEPSPEED"):
        monkeypatch.setenv(f"ACCELERATE_USE_{kind}", str(kind == launch).lower())
    calls = []
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(model, "to", lambda *args, **kwargs: calls.append(args))
    place_before_probes(model, torch.device(device))
    assert calls == ([(torch.device(device),)] if moved else [])


def test_an_overwrite_that_fails_before_training_keeps_the_finished_run(tmp_path, shapes_dir, tiny_vision_dir,
                                                                        tiny_llm_dir):
    """overwrite=true moves the finished run aside and deletes it only once the new run is ready to train: a
    data file that cannot be read puts it back, whole."""
    path = write_recipe(tmp_path / "align.yaml", align_recipe(tmp_path / "run", tiny_vision_dir, tiny_llm_dir,
                                                              shapes_dir, max_steps=1))
    run_dir = train_vlm(load_recipe(path))
    before = {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(Exception, match="empty.json"):
        train_vlm(load_recipe(path, ["overwrite=true", f"data.dir={tmp_path}", "data.train_file=empty.json",
                                     f"data.image_root={shapes_dir}"]))
    after = {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["align.yaml", "empty.json", "run"]  # nothing left aside
    train_vlm(load_recipe(path, ["overwrite=true", "train.seed=1"]))  # a set-up that succeeds replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["align.yaml", "empty.json", "run"]
    assert (run_dir / "trainable.safetensors").read_bytes() != before[Path("trainable.safetensors")]


def test_a_launched_rank_makes_its_own_gpu_current_before_loading(monkeypatch):
    """A 4-bit LLM loads onto the current GPU: without this every rank of a launch would load onto GPU 0."""
    from vlkit.train import run as run_module

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    run_module.use_the_ranks_gpu()
    monkeypatch.delenv("LOCAL_RANK")
    run_module.use_the_ranks_gpu()  # no launcher: the device is left alone
    assert chosen == [3]


def test_a_bf16_run_trains_its_connector_in_float32_and_loads_back_in_bf16(tmp_path, shapes_dir, tiny_vision_dir,
                                                                           tiny_llm_dir):
    """model.dtype: bfloat16 (the LLaVA recipes'): the connector trains and is saved in float32, the run loads back
    in bf16 with those weights, and an instruct stage continued from it is bf16 too without saying so, its
    connector starting from the float32 weights saved (not from the bf16 rebuild's rounding of them)."""
    align = align_recipe(tmp_path / "align", tiny_vision_dir, tiny_llm_dir, shapes_dir, max_steps=2)
    align["model"]["dtype"] = "bfloat16"
    align_dir = train_vlm(load_recipe(write_recipe(tmp_path / "align.yaml", align)))
    saved = load_file(align_dir / "trainable.safetensors")
    assert saved and {tensor.dtype for tensor in saved.values()} == {torch.float32}
    model, _ = load_run(align_dir)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for name, parameter in model.named_parameters():
        if name in saved:
            assert torch.equal(parameter.detach(), saved[name].to(torch.bfloat16)), name
    instruct = {
        "stage": "instruct", "output_dir": str(tmp_path / "instruct"), "init_from": str(align_dir),
        "tune": {"llm": "lora", "lora_r": 4, "lora_alpha": 8},
        "data": {"dir": shapes_dir, "train_file": "instruct_train.json", "max_length": 320},
        "train": {"batch_size": 2, "max_steps": 2, "report_to": []},
    }
    instruct_recipe = load_recipe(write_recipe(tmp_path / "instruct.yaml", instruct))
    from vlkit.train.run import plan_run, prepared_model

    continued, _ = prepared_model(instruct_recipe, plan_run(instruct_recipe))  # starts from the float32 connector saved
    for name, parameter in continued.named_parameters():
        if name in saved:
            assert parameter.dtype == torch.float32 and torch.equal(parameter.detach(), saved[name]), name
    instruct_dir = train_vlm(load_recipe(write_recipe(tmp_path / "instruct.yaml", instruct)))
    assert json.loads((instruct_dir / "manifest.json").read_text())["model"]["dtype"] == "bfloat16"
    model, _ = load_run(instruct_dir)
    assert next(model.language_model.parameters()).dtype == torch.bfloat16


def connector_out_of_memory_above(monkeypatch, images: int) -> list[int]:
    """Training steps whose batch has more than `images` images run out of memory in the connector's forward, as
    CPU torch says it; returns the list of image counts the steps tried (the one-time probes are not counted)."""
    from vlkit.connectors.mlp import MLPConnector

    forward = MLPConnector.forward
    tried = []

    def out_of_memory_above(self, features, *args, **kwargs):
        if torch.is_grad_enabled() and self.training:
            tried.append(features.shape[0])
            if features.shape[0] > images:
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: "
                                   "you tried to allocate 1099511627776 bytes.")
        return forward(self, features, *args, **kwargs)

    monkeypatch.setattr(MLPConnector, "forward", out_of_memory_above)
    return tried


def test_auto_find_batch_size_trains_at_the_batch_that_fits(tmp_path, shapes_dir, tiny_vision_dir, tiny_llm_dir,
                                                            monkeypatch, caplog):
    """train.auto_find_batch_size: a step that runs out of memory mid-forward starts the stage over at 0.9x the
    batch (transformers' search: 4, 3, 2); the run trains at the batch that fits, its summary and throughput
    count that batch, and the log says which one to set."""
    from vlkit.train.run import plan_run

    tried = connector_out_of_memory_above(monkeypatch, images=2)
    instruct = {
        "stage": "instruct", "output_dir": str(tmp_path / "instruct"),
        "model": {"vision": tiny_vision_dir, "llm": tiny_llm_dir},
        "tune": {"llm": "lora", "lora_r": 4, "lora_alpha": 8},
        "data": {"dir": shapes_dir, "train_file": "instruct_train.json", "max_length": 320},
        "train": {"batch_size": 4, "auto_find_batch_size": True, "max_steps": 3, "logging_steps": 1, "save_steps": 2,
                  "report_to": [], "loss_average": "square"},
    }
    with caplog.at_level("WARNING"):
        run_dir = train_vlm(load_recipe(write_recipe(tmp_path / "instruct.yaml", instruct)))
    assert tried[:2] == [4, 3] and set(tried[2:]) == {2}
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["batch_size"] == 2 and summary["steps"] == 3 and summary["samples"] == 6
    assert [entry["step"] for entry in summary["log_history"] if "loss" in entry] == [1, 2, 3]
    assert all(entry["samples_per_s"] > 0 for entry in summary["log_history"] if "loss" in entry)
    assert "batch 4 ran out of memory; trained at batch 2" in caplog.text
    # The checkpoint's trainer state keeps the batch found: transformers resumes an auto-fitted run at it.
    state = json.loads((run_dir / "checkpoints/checkpoint-2/trainer_state.json").read_text())
    assert state["train_batch_size"] == 2
    assert any("lora_" in name for name in load_file(run_dir / "trainable.safetensors"))

    recipe_path = write_recipe(tmp_path / "instruct.yaml", instruct)
    assert "batch 4 at most (auto_find_batch_size) x 1 accumulation" in plan_run(
        load_recipe(recipe_path, ["overwrite=true"])).describe()  # what --dry-run prints
    # One process only: under a launch, each would shrink its batch on its own.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="fits one process's batch, and this launch has 2"):
        plan_run(load_recipe(recipe_path))


@pytest.mark.parametrize("auto_find", [False, True])
def test_a_step_out_of_memory_ends_the_run_with_one_line(tmp_path, shapes_dir, tiny_vision_dir, tiny_llm_dir,
                                                         monkeypatch, capsys, auto_find):
    """Out of memory in a training step: one line saying what to change, not a traceback; with
    auto_find_batch_size, once every batch down to 1 failed."""
    tried = connector_out_of_memory_above(monkeypatch, images=0)
    align = align_recipe(tmp_path / "align", tiny_vision_dir, tiny_llm_dir, shapes_dir, max_steps=2,
                         auto_find_batch_size=auto_find)
    assert cli_main(["train", write_recipe(tmp_path / "align.yaml", align)]) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    if auto_find:
        assert tried == [4, 3, 2, 1]
        assert errors[0] == ("error: out of memory at every batch size train.auto_find_batch_size tried, down to 1 "
                             "(from train.batch_size=4): the model does not fit; try model.dtype: bfloat16, "
                             "train.gradient_checkpointing: true")  # the keys this align recipe has not set
    else:
        assert tried == [4]
        assert errors[0].startswith("error: out of memory in a training step at train.batch_size=4: lower it")
        assert "set train.auto_find_batch_size: true" in errors[0] and "DefaultCPUAllocator" in errors[0]
