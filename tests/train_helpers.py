"""Helpers for training tests: write recipes that point at the tiny fixtures, run `vlkit train`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]


def write_recipe(path: Path, tree: dict) -> str:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(path)


def align_recipe(output_dir, vision, llm, shapes, **train) -> dict:
    return {
        "stage": "align",
        "output_dir": str(output_dir),
        "model": {"vision": vision, "llm": llm, "connector": {"type": "mlp", "depth": 2}},
        "data": {"dir": shapes, "train_file": "align_train.json", "max_length": 256},
        "train": {"batch_size": 4, "max_steps": 4, "logging_steps": 1, "learning_rate": 1e-3, "report_to": [],
                  "warmup_ratio": 0.0, **train},
    }


def run_cli(*args: str, env: dict | None = None, timeout: int = HANG_GUARD_S) -> subprocess.CompletedProcess:
    """Run the vlkit CLI in a fresh process (as a user would)."""
    return finish(start_cli(*args, env=env), timeout)


def start_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    """Start the vlkit CLI in a fresh process and return at once; `finish` waits for it.

    Its seconds of torch start-up then overlap the test's other work.
    """
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "vlkit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full_env, cwd=REPO)


def finish(process: subprocess.Popen, timeout: int = HANG_GUARD_S) -> subprocess.CompletedProcess:
    """Wait for a started process (killed past the hang guard, as subprocess.run does) and collect its output."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def free_port() -> int:
    """A TCP port nothing listens on now, for a launcher's rendezvous."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
