"""`vlkit train`, except that every rank SIGKILLs itself at the end of step KILL_AT_STEP (environment).

A kill at a known point instead of a race with a watcher: the run has saved its checkpoints up to that
step and trained one step more, then dies as a killed process does, with nothing flushed or cleaned.
Each rank first prints KILL_MARKER to stderr. Under a launcher the ranks do not die at the same instant:
a rank still inside a collective when its peer dies fails with a gloo error (exit 1), and the launcher
may report that failure rather than the SIGKILL, so tests look for the marker in the ranks' logs.
Launched as `accelerate launch --config_file ... tests/train_killed_at_step.py train RECIPE.yaml`.
"""

from __future__ import annotations

import os
import signal
import sys

from transformers import TrainerCallback

import vlkit.train.trainer as trainer_module
from vlkit.cli import main

KILL_MARKER = "train_killed_at_step: SIGKILL at step"


class KillAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step == int(os.environ["KILL_AT_STEP"]):
            print(f"{KILL_MARKER} {state.global_step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


class KilledTrainer(trainer_module.VlkitTrainer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(KillAtStep())


if __name__ == "__main__":
    trainer_module.VlkitTrainer = KilledTrainer  # train_vlm imports the class from the module at call time
    sys.exit(main())
