"""`train.profile_step`: one step under torch.profiler, written to the run folder (vlkit/train/profile.py)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import torch

from vlkit.train.profile import PROFILE_TABLE, PROFILE_TRACE, ProfileStepCallback, StepProfiler


def work(step: int) -> None:
    """Step k multiplies k times, so the profiled window's calls tell which steps it covered."""
    x = torch.randn(16, 16)
    for _ in range(step):
        x = x @ x


def test_the_profile_covers_exactly_its_step(tmp_path):
    profiler = StepProfiler(3, tmp_path)
    profiler.step_ended(0)
    for step in range(1, 6):
        work(step)
        written = profiler.step_ended(step)
        assert (written is not None) == (step == 3)
    table = (tmp_path / PROFILE_TABLE).read_text()
    assert table.startswith("step 3: ") and "s wall" in table and "aten::mm" in table
    events = json.loads((tmp_path / PROFILE_TRACE).read_text())["traceEvents"]
    assert sum(event.get("name") == "aten::mm" for event in events) == 3  # step 3's calls, no other step's


def test_the_window_opens_after_the_gpu_finished_the_step_before(tmp_path, monkeypatch):
    """On a GPU the previous step's kernels may still be queued when the window opens; they are waited for
    first, or their tail would count as the profiled step's wall time."""
    order = []

    class Recorded:
        def __init__(self, **kwargs):
            order.append("profiler made")

        def __enter__(self):
            order.append("profiler entered")

        def __exit__(self, *exc):
            order.append("profiler left")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: order.append("gpu waited for"))
    monkeypatch.setattr(torch.profiler, "profile", Recorded)
    profiler = StepProfiler(2, tmp_path)
    profiler.step_ended(1)
    assert order == ["gpu waited for", "profiler made", "profiler entered"]
    profiler.abandon()


def test_the_callback_profiles_from_a_resumed_step_and_writes_on_the_first_rank_only(tmp_path):
    state = SimpleNamespace(global_step=4, is_world_process_zero=True)  # resumed at a checkpoint of step 4
    callback = ProfileStepCallback(5, tmp_path / "rank0")
    callback.on_train_begin(None, state, None)
    work(5)
    state.global_step = 5
    callback.on_step_end(None, state, None)
    assert (tmp_path / "rank0" / PROFILE_TABLE).read_text().startswith("step 5: ")

    other_rank = SimpleNamespace(global_step=4, is_world_process_zero=False)
    callback = ProfileStepCallback(5, tmp_path / "rank1")
    callback.on_train_begin(None, other_rank, None)
    other_rank.global_step = 5
    callback.on_step_end(None, other_rank, None)
    assert callback.profiler.done and not (tmp_path / "rank1").exists()


def test_a_run_that_ends_before_the_step_says_so(tmp_path, caplog):
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    callback = ProfileStepCallback(9, tmp_path)
    callback.on_train_begin(None, state, None)
    for step in (1, 2, 3, 4, 5, 6, 7, 8):  # the window opens after step 8, and the run ends there
        state.global_step = step
        callback.on_step_end(None, state, None)
    assert callback.profiler.profiler is not None
    with caplog.at_level(logging.WARNING, logger="vlkit.train.profile"):
        callback.on_train_end(None, state, None)
    assert "train.profile_step=9: the run ended at step 8" in caplog.text
    assert callback.profiler.profiler is None and not (tmp_path / PROFILE_TABLE).exists()


def test_the_gpu_busy_time_counts_each_kernel_once():
    """An operator's row carries its kernels' device time as well as the kernels' own rows: only the device's
    events count (on an H200 the sum over every row had reported twice the device time)."""
    from torch.autograd import DeviceType

    from vlkit.train.profile import device_busy_s

    def event(device_type, microseconds, annotation=False):
        return SimpleNamespace(device_type=device_type, self_device_time_total=microseconds,
                               is_user_annotation=annotation)

    events = [event(DeviceType.CPU, 300.0),  # aten::mm, its kernel's time attributed to it
              event(DeviceType.CUDA, 300.0),  # the kernel itself
              event(DeviceType.CUDA, 200.0),  # a copy
              event(DeviceType.CUDA, 500.0, annotation=True)]  # a user range spanning the others
    assert device_busy_s(events) == 0.0005
