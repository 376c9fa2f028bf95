"""The benchmark scripts keep working: each runs at toy size on the tiny test models and writes its table.

Timings are not asserted (they are noise at this size); the tables, the goal lines, the sanity
checks the scripts make (same loss / same greedy tokens on both sides) and the docs section are.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import HANG_GUARD_S
from train_helpers import REPO


def run_bench(script: str, *args: str, out) -> str:
    result = subprocess.run(
        [sys.executable, f"bench/{script}", "--toy", "--out", str(out), *args],
        capture_output=True, text=True, cwd=REPO, timeout=HANG_GUARD_S,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture()
def docs(tmp_path):
    return tmp_path / "performance.md"


def test_train_step_bench(tiny_llm_dir, tiny_vision_dir, shapes_dir, docs):
    out = run_bench("train_step.py", "--llm", tiny_llm_dir, "--vision", tiny_vision_dir, "--data", shapes_dir, out=docs)
    for row in ("| align    | vlkit", "| align    | llava-plain", "| instruct | llava-frozen"):
        assert row in out
    assert "align: vlkit vs plain Llava loop" in out and "instruct MFU (vlkit)" in out and "goal >= 2x" in out
    text = docs.read_text()
    assert text.startswith("\n## Training step: vlkit vs stock Llava") and "Machine: " in text and "torch " in text


def test_generate_bench(tiny_llm_dir, tiny_vision_dir, docs):
    out = run_bench("generate.py", "--llm", tiny_llm_dir, "--vision", tiny_vision_dir, "--no-append", out=docs)
    assert "| first token " in out and "| decode, 4 prompts" in out and "time to first token:" in out
    assert "greedy outputs identical (1 and 4 prompts, 8 tokens): yes" in out
    assert not docs.exists()  # --no-append


def test_clip_bench(shapes_dir, docs):
    out = run_bench("clip.py", "--data", shapes_dir, out=docs)
    assert "| with data " in out and "| model only " in out and "CLIP stage, with data:" in out
    assert "## CLIP stage: vlkit vs plain CLIPModel loop" in docs.read_text()


def test_gpu_bench_at_toy_size(docs):
    out = run_bench("gpu.py", "--no-append", out=docs)
    for variant in ("vlkit", "llava-frozen", "llava-plain"):
        assert f"| {variant}" in out
    assert "instruct MFU (vlkit)" in out and "toy, torch.float32" in out


def test_connector_bakeoff_at_toy_size(tiny_llm_dir, tiny_vision_dir, shapes_dir, tmp_path):
    page = tmp_path / "connectors.md"
    run_bench("connectors.py", "--llm", tiny_llm_dir, "--vision", tiny_vision_dir, "--data", shapes_dir, out=page)
    text = page.read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| connector")}
    # The tiny tower has 4x4 patches: one token per patch, 2x2 folded, and half as many queries/latents.
    assert rows == {"linear": "16", "mlp": "16", "pixel_shuffle": "4", "qformer": "8", "resampler": "8"}
    assert "Best mean accuracy:" in text and "Machine: " in text
    assert page.with_suffix(".png").stat().st_size > 0


def test_data_bench(tiny_llm_dir, tiny_vision_dir, shapes_dir, docs):
    out = run_bench("data.py", "--llm", tiny_llm_dir, "--vision", tiny_vision_dir, "--data", shapes_dir, out=docs)
    assert "| align    |" in out and "| instruct |" in out and "instruct data path per core:" in out
    assert "## Data path: dataset + collator" in docs.read_text()
