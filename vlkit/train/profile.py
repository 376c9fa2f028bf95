"""One training step under torch.profiler, for `train.profile_step: N`: where a step's time goes.

The run folder gets `profile.txt` (the step's wall time, how much of it the GPU was busy, and the
operators that took the most time) and `profile_trace.json` (the timeline: open it in Perfetto or
chrome://tracing). The window is one step as the training loop runs it: fetching its batch, forward,
backward, the optimizer, and the logging of the step before. So wall time the GPU was not busy is
time it waited for Python, the data or the host.

`StepProfiler` does the work; `ProfileStepCallback` drives it from a transformers Trainer, and loops
of their own (the visual_words reader) call `step_ended(step)` after each step.

Every stage also records its peak memory in run_summary.json (`peak_memory_gib`), profiled or not: what
a larger batch size must fit (`reset_peak_memory` at the stage's start, `peak_memory_gib` at its end).
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

PROFILE_TABLE = "profile.txt"
PROFILE_TRACE = "profile_trace.json"
TOP_OPERATORS = 25


class StepProfiler:
    """Profiles step `step` (1-based) between the end of step `step - 1` (or `start()`) and its own end."""

    def __init__(self, step: int, output_dir: str | Path, write: bool = True) -> None:
        self.step = step
        self.output_dir = Path(output_dir)
        self.write = write  # False on the ranks other than the first: each profiles, one writes
        self.profiler: torch.profiler.profile | None = None
        self.started = 0.0
        self.done = False

    def start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            # The step before may still be running on the GPU (nothing after its optimizer step waits for
            # it); its tail would count as this step's wall time.
            torch.cuda.synchronize()
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self.profiler.__enter__()
        self.started = time.perf_counter()

    def step_ended(self, step: int) -> Path | None:
        """Call after every step; starts before the profiled step and writes after it (returns its path)."""
        if step == self.step - 1 and self.profiler is None and not self.done:
            self.start()
        elif step == self.step and self.profiler is not None:
            return self.stop()
        return None

    def abandon(self) -> None:
        """Close a window the run ended inside (it stopped before the profiled step ended)."""
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None

    def stop(self) -> Path | None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels belong to its window
        wall = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        profiler, self.profiler, self.done = self.profiler, None, True
        if not self.write:
            return None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        table = self.output_dir / PROFILE_TABLE
        table.write_text(profile_report(profiler, self.step, wall))
        profiler.export_chrome_trace(str(self.output_dir / PROFILE_TRACE))
        logger.warning("profile of step %d: %s (timeline: %s)", self.step, table, PROFILE_TRACE)
        return table


def profile_report(profiler: torch.profiler.profile, step: int, wall_s: float) -> str:
    """The summary `profile.txt` holds: wall time, device busy share, the top operators."""
    averages = profiler.key_averages()
    on_device = torch.cuda.is_available()
    lines = [f"step {step}: {wall_s:.3f} s wall"]
    if on_device:
        busy_s = device_busy_s(averages)
        lines[0] += f"; the GPU busy {busy_s:.3f} s ({100 * busy_s / wall_s:.0f}% of it)"
        sort_by = "self_device_time_total"
    else:
        cpu_s = sum(event.self_cpu_time_total for event in averages) / 1e6
        lines[0] += f"; operators {cpu_s:.3f} s on the CPU (no GPU)"
        sort_by = "self_cpu_time_total"
    lines += ["", f"operators by {sort_by.replace('_', ' ')}:", averages.table(sort_by=sort_by, row_limit=TOP_OPERATORS)]
    return "\n".join(lines) + "\n"


def device_busy_s(events) -> float:
    """Seconds the device ran kernels and copies: the device's own events only, as torch's table footer counts
    them. An operator's row (a CPU event) also carries its kernels' device time: counting both doubled it."""
    from torch.autograd import DeviceType

    devices = (DeviceType.CUDA, DeviceType.PrivateUse1, DeviceType.XPU, DeviceType.MTIA)
    return sum(event.self_device_time_total for event in events
               if event.device_type in devices and not event.is_user_annotation) / 1e6


class ProfileStepCallback(TrainerCallback):
    """`StepProfiler` driven by a Trainer: every rank profiles the step, the first one writes."""

    def __init__(self, step: int, output_dir: str | Path) -> None:
        self.profiler = StepProfiler(step, output_dir)

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.profiler.write = state.is_world_process_zero
        self.profiler.step_ended(state.global_step)  # step 1, or the step after a resumed checkpoint

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.profiler.step_ended(state.global_step)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.profiler.abandon()
        if not self.profiler.done and self.profiler.write:
            logger.warning("train.profile_step=%d: the run ended at step %d, before it; nothing was profiled",
                           self.profiler.step, state.global_step)


def profile_callbacks(train, output_dir: str | Path) -> list[TrainerCallback]:
    """The Trainer callbacks for a recipe's `train` section: a `ProfileStepCallback` if it asks for one."""
    return [ProfileStepCallback(train.profile_step, output_dir)] if train.profile_step else []


def reset_peak_memory() -> None:
    """Count the accelerator's peak memory from here (a stage that follows another in the same process)."""
    if torch.accelerator.is_available():
        torch.accelerator.reset_peak_memory_stats()


def peak_memory_gib() -> dict[str, float | None]:
    """`accelerator`: the most tensor memory allocated on this process's accelerator since `reset_peak_memory`
    (None without one); `host_rss`: this process's peak resident memory since it started."""
    accelerator = torch.accelerator.max_memory_allocated() / 2**30 if torch.accelerator.is_available() else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_gib = rss / 2**30 if sys.platform == "darwin" else rss / 2**20
    return {"accelerator": None if accelerator is None else round(accelerator, 2), "host_rss": round(rss_gib, 2)}


def memory_phrase(peak: dict[str, float | None]) -> str:
    """The peak memory for a run's last line: the accelerator's where there is one, else the host's."""
    if peak["accelerator"] is not None:
        return f"peak accelerator memory {peak['accelerator']:.2f} GiB"
    return f"peak host memory {peak['host_rss']:.2f} GiB"
