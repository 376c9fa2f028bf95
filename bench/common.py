"""Shared by the benchmarks: the machine, interleaved timing, matmul peak, peak RSS, the docs section.

Every benchmark compares vlkit with a reference measured in the same process, interleaved round
by round (A, B, A, B, ...), so that load from other processes on a shared machine hits both sides
alike; it reports the median of per-round ratios. Peak RSS is the process's high-water mark during
each variant's own calls (restarted before every call with Linux's clear_refs, after returning
freed heap to the OS): the weights, shared by all variants, count in every row; the differences
between rows are each variant's own gradients, optimizer state and activations.

The CPU benchmarks run one torch thread by default (`--threads N` to change; the matmul peak is
measured with the same setting). On a 2-core machine shared with other processes, a second thread
makes every op wait at a barrier for a preempted sibling: one SmolLM2 align step took 4.1 s on
one thread and 18 s on two, and the 1-thread matmul peak was higher (86 vs 57 GFLOP/s).
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "performance.md"


def machine() -> str:
    """CPU model, cores, memory, GPU (if any), torch and transformers versions, in one line."""
    import transformers

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = ""
    try:
        kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")))
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {cores} cores ({torch.get_num_threads()} torch threads){memory}{gpu}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def dispatched_operators(fn: Callable[[], object]) -> int:
    """How many aten operators one call of `fn` dispatches. On a GPU the host queues them one by one (Python,
    the dispatcher, a kernel launch each), so where the kernels are short a step takes as long as this work,
    whatever the batch: the tiny instruct stage on an H200 was busy 15-44% of its steps (docs/performance.md)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                between: Callable[[], None] | None = None,
                peak_rss: dict[str, float] | None = None, settle: int = 0) -> dict[str, list[float]]:
    """Seconds per call of each variant, one call each per round, variants alternating.

    With `peak_rss`, each variant's highest peak RSS (MiB) during its own calls is stored there.
    `settle`: untimed calls of a variant right before its timed one. A training loop repeats one
    step, so the memory allocator is in that step's steady state; right after another variant's
    step it is not (a stock Llava align step measured 1.3x slower right after a compiled vlkit step
    than after its own).
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(warmup + rounds):
        for name, fn in variants.items():
            if peak_rss is not None:
                reset_peak_rss()
            for _ in range(settle if round_index >= warmup else 0):
                fn()
            seconds = timed(fn)
            if peak_rss is not None:
                peak_rss[name] = max(peak_rss.get(name, 0.0), rss_mb())
            if round_index >= warmup:
                times[name].append(seconds)
        if between is not None and round_index >= warmup:
            between()
    return times


def median_ratio(slow: list[float], fast: list[float]) -> float:
    """Median over rounds of slow/fast: how many times faster `fast` is."""
    return statistics.median(s / f for s, f in zip(slow, fast))


def matmul_peak(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", n: int = 2048,
                repeats: int = 3) -> float:
    """The best FLOP/s of an n x n x n matmul: the denominator of model FLOPs utilisation."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)  # warm-up (thread pool, kernels)
    best = min(timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best


def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident set size, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Return freed heap to the OS, then restart the peak RSS from the current RSS (Linux clear_refs)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def ratio_spread(slow: list[float], fast: list[float]) -> str:
    """The lowest and highest per-round ratio: how far one round's speed-up strays from the median."""
    ratios = [s / f for s, f in zip(slow, fast)]
    return f"rounds {min(ratios):.2f}-{max(ratios):.2f}x"


def verdict(measured: float, goal: float, unit: str = "x") -> str:
    return f"{measured:.2f}{unit} vs goal >= {goal:g}{unit}: {'met' if measured >= goal else 'NOT met'}"


def append_section(title: str, body: str, command: str, path: Path = DOCS) -> None:
    """Append a dated section with the machine and the command that produced it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = f"\n## {title} ({stamp})\n\nMachine: {machine()}\n\nCommand: `{command}`\n\n{body.rstrip()}\n"
    with open(path, "a", encoding="utf-8") as file:
        file.write(text)


def add_run_options(parser) -> None:
    """The options every side-by-side benchmark shares: threads, where its section goes."""
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see bench/common.py)")
    parser.add_argument("--out", default=str(DOCS), help="the markdown file a section is appended to")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append a section")


def start(args) -> None:
    """Apply the shared options before any model loads."""
    from vlkit.cli import quiet_library_noise

    torch.set_num_threads(args.threads)
    quiet_library_noise()  # load reports and optional-kernel notices need no action here


def publish(title: str, body: str, args) -> None:
    """Print the benchmark's table and goal lines; append them as a dated section unless --no-append."""
    print(body)
    if not args.no_append:
        append_section(title, body, command_line(), Path(args.out))


def command_line() -> str:
    return " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]])
