"""`vlkit train`, except that every rank but 0 writes its per-rank checkpoint file (its RNG state) late.

Each rank writes files of its own into a checkpoint folder, which rank 0 then renames from staging into
place. Here a rank other than 0 writes only once rank 0 has finished its whole part of the save (its
trainer_state.json is there) and then either renamed the folder already (the bug: this rank then finds
its folder gone, "Parent directory ... does not exist", and exits 1) or has not done so within
LATE_WAIT_S (it is waiting for this rank, as it must). So a missing barrier fails the run, and with the
barrier the run passes whatever the timing.
Launched as `accelerate launch --config_file ... tests/train_slow_rank_save.py train RECIPE.yaml`.
"""

from __future__ import annotations

import os
import sys
import time

from transformers import Trainer

from vlkit.cli import main

LATE_MARKER = "train_slow_rank_save: rank {rank} wrote its RNG state after rank 0 finished its own save"
LATE_WAIT_S = 5.0


def late_rng_state(original):
    def save(self, output_dir: str) -> None:
        rank = self.args.process_index
        if rank != 0:
            state_file = os.path.join(output_dir, "trainer_state.json")
            while not os.path.exists(state_file) and os.path.isdir(output_dir):
                time.sleep(0.01)
            waited_until = time.time() + LATE_WAIT_S
            while os.path.isdir(output_dir) and time.time() < waited_until:
                time.sleep(0.01)
        original(self, output_dir)
        if rank != 0:
            print(LATE_MARKER.format(rank=rank), file=sys.stderr, flush=True)

    return save


if __name__ == "__main__":
    Trainer._save_rng_state = late_rng_state(Trainer._save_rng_state)
    sys.exit(main())
