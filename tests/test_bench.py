"""The benchmark scripts keep working: each runs at toy size on the tiny test models and writes its table.

Timings are not asserted (they are noise at this size); the tables, the goal lines, the sanity
checks the scripts make (same loss / same greedy tokens on both sides) and the docs section are.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import HANG_GUARD_S
from train_helpers import REPO, finish

# The script each test runs. The runs do not depend on one another: the `benches` fixture starts those of the
# selected tests at once, each a process of its own as `python bench/...` is, and each test waits for its own.
SCRIPTS = {
    "test_train_step_bench": "train_step.py",
    "test_generate_bench": "generate.py",
    "test_clip_bench": "clip.py",
    "test_gpu_bench_at_toy_size": "gpu.py",
    "test_connector_bakeoff_at_toy_size": "connectors.py",
    "test_data_bench": "data.py",
    "test_recipes_bench_at_toy_size": "recipes.py",
    "test_attention_forms_bench": "attention.py",
}


@pytest.fixture(scope="module")
def benches(request, tmp_path_factory, tiny_llm_dir, tiny_vision_dir, shapes_dir):
    """script -> (its process, the --out file it was given), for the scripts of the selected tests."""
    models = ["--llm", tiny_llm_dir, "--vision", tiny_vision_dir]
    arguments = {
        "train_step.py": [*models, "--data", shapes_dir],
        "generate.py": [*models, "--no-append"],
        "clip.py": ["--data", shapes_dir],
        "gpu.py": ["--no-append", "--qlora"],
        "connectors.py": [*models, "--data", shapes_dir],
        "data.py": [*models, "--data", shapes_dir],
        # The CLIP stage trains the tower; the instruct stage compiles its LLM's layers.
        "recipes.py": ["--llm", tiny_llm_dir, "--data", shapes_dir, "--compile"],
        "attention.py": [],
    }
    selected = {SCRIPTS[item.name] for item in request.session.items
                if item.module.__name__ == __name__ and item.name in SCRIPTS}
    # One torch thread each (the benchmarks' own default): the runs share the cores without waiting on each other.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    started = {}
    for script in sorted(selected, key=list(arguments).index):
        out = tmp_path_factory.mktemp(script.removesuffix(".py")) / (
            "connectors.md" if script == "connectors.py" else "performance.md")
        started[script] = (subprocess.Popen([sys.executable, f"bench/{script}", "--toy", "--out", str(out), *arguments[script]],
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env), out)
    yield started
    for process, _ in started.values():  # those a failed test did not wait for
        if process.poll() is None:
            process.kill()
            process.communicate()


def run_bench(benches, script: str):
    """The script's stdout once it has exited 0, and its --out file."""
    process, out = benches[script]
    result = finish(process, HANG_GUARD_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, out


def test_train_step_bench(benches):
    out, docs = run_bench(benches, "train_step.py")
    for row in ("| align    | vlkit", "| align    | llava-plain", "| instruct | llava-frozen"):
        assert row in out
    assert "align: vlkit vs plain Llava loop" in out and "instruct MFU (vlkit)" in out and "goal >= 2x" in out
    assert out.count("rounds ") >= 4  # each stage's verdicts give the per-round spread
    assert "| instruct | vlkit-compiled" in out and "instruct: train.compile vs eager: " in out
    # The host's work per step (what bounds a GPU step of small kernels): counted for the eager variants.
    operators = {line.split("|")[2].strip(): line.split("|")[-2].strip()
                 for line in out.splitlines() if line.startswith("| instruct ")}
    assert int(operators["vlkit"].replace(",", "")) > 100 and int(operators["llava-plain"].replace(",", "")) > 100
    assert operators["vlkit-compiled"] == "-"
    text = docs.read_text()
    assert text.startswith("\n## Training step: vlkit vs stock Llava") and "Machine: " in text and "torch " in text


def test_generate_bench(benches):
    out, docs = run_bench(benches, "generate.py")
    assert "| first token " in out and "| decode, 4 prompts" in out and "time to first token:" in out
    assert "greedy outputs identical (1 and 4 prompts, 8 tokens): yes" in out
    assert not docs.exists()  # --no-append


def test_clip_bench(benches):
    out, docs = run_bench(benches, "clip.py")
    assert "| with data " in out and "| model only " in out and "CLIP stage, with data:" in out
    assert "## CLIP stage: vlkit vs plain CLIPModel loop" in docs.read_text()


def test_gpu_bench_at_toy_size(benches):
    out, docs = run_bench(benches, "gpu.py")
    for variant in ("vlkit ", "vlkit-fp32-lora ", "vlkit-flat ", "vlkit-flat-sdpa ", "vlkit-compiled ", "vlkit-compiled-flat ",
                    "llava-frozen", "llava-plain"):
        assert f"| {variant}" in out
    assert "failed:" not in out and "out of memory" not in out  # the script reports a failing variant in its row
    assert "instruct MFU (vlkit)" in out and "instruct MFU (vlkit-compiled)" in out and "toy, torch.float32" in out
    assert "- vlkit-compiled-flat vs llava-frozen: " in out and "- vlkit vs llava-plain: " in out
    assert "| vlkit-qlora" in out and "vlkit-qlora (4-bit NF4 LLM, LoRA r=4, batch 4): peak RSS " in out
    assert "- vlkit-liger: not run (Liger Kernel's kernels are Triton: a GPU, or TRITON_INTERPRET=1)" in out


def test_connector_bakeoff_at_toy_size(benches):
    _, page = run_bench(benches, "connectors.py")
    text = page.read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| connector")}
    # The tiny tower has 4x4 patches: one token per patch, 2x2 folded, and half as many queries/latents.
    assert rows == {"linear": "16", "mlp": "16", "pixel_shuffle": "4", "qformer": "8", "resampler": "8"}
    assert "Best mean accuracy:" in text and "Machine: " in text
    assert page.with_suffix(".png").stat().st_size > 0


def test_data_bench(benches):
    out, docs = run_bench(benches, "data.py")
    assert "| align    |" in out and "| instruct |" in out and "instruct data path per core:" in out
    assert "## Data path: dataset + collator" in docs.read_text()


def test_attention_forms_bench(benches):
    """Both forms of per-sample sdpa on one layer, by sample length: the table says which form the module picks."""
    out, docs = run_bench(benches, "attention.py")
    forms_table = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and line.count("|") == 9]
    picked = {cells[0].strip(): cells[-1].strip() for cells in forms_table[1:]}
    assert picked == {"very short": "rows", "mixed": "calls"}  # 6 tokens on average; 180
    assert "calls speed-up" in out and "## Per-sample sdpa: calls per sample vs padded rows" in docs.read_text()
    assert "| mixed   | 1       |" in out and "float32 speed-up" in out  # the attention's dtype under CPU autocast


def test_recipes_bench_at_toy_size(benches):
    out, docs = run_bench(benches, "recipes.py")
    for stage in ("clip", "align", "instruct"):
        assert f"| {stage} " in out and f"**{stage}**" in out
    assert out.count("profile.txt") == 3 and out.count("s wall; operators") == 3  # a profile of every stage
    rows = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in out.splitlines() if line.startswith("| ")}
    assert float(rows["clip"]) > 0 and float(rows["instruct"]) > 0  # steady samples/s from the Trainer stages' logs
    memory = {line.split("|")[1].strip(): line.split("|")[6].strip() for line in out.splitlines() if line.startswith("| ")}
    assert float(memory["instruct"]) > 0 and "peak host RSS (GiB)" in out  # run_summary.json's peak memory, on CPU
    assert "aten::" in out and "## Tiny recipes at GPU size" in docs.read_text()
    assert "instruct with train.compile" in out


def test_gpu_checks_script_parses_and_names_a_bad_check(tmp_path):
    """bench/gpu_checks.sh runs on GPU machines only; here: valid bash, and an unknown check is refused."""
    script = REPO / "bench" / "gpu_checks.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    result = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True,
                            text=True, env={**os.environ, "CHECKS": "nonsense", "PYTHON": sys.executable},
                            timeout=HANG_GUARD_S)
    assert result.returncode == 2 and "unknown check 'nonsense'" in result.stdout


def test_gpu_checks_script_skips_the_checks_its_budget_cannot_hold(tmp_path):
    """BUDGET caps all the checks together: with under a minute of it left, a check is skipped and reported
    (here every one: 30 s of budget); a budget that is not whole seconds is refused before anything runs."""
    script = REPO / "bench" / "gpu_checks.sh"
    env = {**os.environ, "PYTHON": sys.executable, "CHECKS": "recipes gpu"}
    result = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True,
                            env={**env, "BUDGET": "30"}, timeout=HANG_GUARD_S)
    assert result.returncode == 1, result.stdout
    assert "== recipes: skipped" in result.stdout and "== gpu: skipped" in result.stdout
    assert "== failed: recipes gpu" in result.stdout and not list(tmp_path.glob("*.log"))
    refused = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True,
                             env={**env, "BUDGET": "9m"}, timeout=HANG_GUARD_S)
    assert refused.returncode == 2 and "BUDGET must be whole seconds, not '9m'" in refused.stdout


def test_recipes_bench_says_flat_packing_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("with a GPU --flat runs; this checks its one-line refusal without one")
    result = subprocess.run([sys.executable, "bench/recipes.py", "--toy", "--flat", "--no-append"], cwd=REPO,
                            capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        "--flat needs a GPU: torch's flex attention has no backward pass on CPU")
