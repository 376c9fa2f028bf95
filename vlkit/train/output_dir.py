"""A stage's output dir: what `resume` and `overwrite` find there, the folder claimed before training, and a
run that `overwrite=true` replaces kept until the new one is ready to train.

`checkpoint_to_resume` is every stage's reading of the folder: a finished run is replaced only with
`overwrite=true`, an interrupted one continues with `resume=true` (its newest complete checkpoint) or
starts over with `overwrite=true`.

`claimed_output_dir` wraps a stage's set-up (model, data, Trainer): it makes the folder and writes the
resolved recipe. With overwrite, the run already there is moved aside (`.NAME.replaced` beside it), not
deleted; it is deleted once every rank's set-up succeeded, or put back when the set-up fails, so a recipe
that never trained costs no finished run. A run moved aside by an overwrite killed during its set-up stays
until the user moves it back or deletes it: every later run in that folder stops with an error that says so.
Under a launcher only the first rank touches the folders.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from vlkit.compat import PREFIX_CHECKPOINT_DIR
from vlkit.errors import ConfigError
from vlkit.run_folder import MANIFEST, atomic_write_text, latest_checkpoint

logger = logging.getLogger(__name__)


def first_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


SUMMARY = "run_summary.json"  # written last: a run dir with it holds a finished run


def checkpoint_to_resume(output: Path, resume: bool | str, overwrite: bool,
                         marks: tuple[str, ...] = (MANIFEST, "trainer_state.json")) -> str | None:
    """The checkpoint a run continues from (None: it starts afresh), after checking `output` against `resume`
    and `overwrite`. A checkpoint is complete when it holds every file in `marks`."""
    checkpoints = output / "checkpoints"
    # Any checkpoint folder marks a run that trained here, complete or not (or saved by an older vlkit).
    trained_here = checkpoints.is_dir() and any(checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*"))
    if resume:
        if isinstance(resume, str) and resume.lower() not in ("true", "latest"):
            if not all((Path(resume) / mark).is_file() for mark in marks):
                raise ConfigError(f"resume checkpoint not found or incomplete: {resume}")
            checkpoint = resume
        else:
            checkpoint = latest_checkpoint(checkpoints, marks)
        if checkpoint is None:
            start_over = "set overwrite=true to start over" if trained_here else "drop resume to start over"
            raise ConfigError(f"resume=true but {checkpoints} holds no complete checkpoint; {start_over}")
        if (output / SUMMARY).is_file():
            logger.warning("%s holds a finished run: resuming from %s trains its last steps again and replaces "
                           "its final weights", output, checkpoint)
        return checkpoint
    if (output / SUMMARY).is_file() and not overwrite:
        raise ConfigError(f"{output} holds a finished run; set overwrite=true to replace it or choose another output_dir")
    if trained_here and not overwrite:
        raise ConfigError(
            f"{output} holds an unfinished run; set resume=true to continue it or overwrite=true to start over"
        )
    return None


def replaced_run(output: Path) -> Path:
    """Where `overwrite=true` keeps the run it replaces until the new one is ready to train."""
    return output.parent / f".{output.name}.replaced"


def every_rank_ready() -> None:
    """Under a launcher, wait until every rank got here (each rank's set-up may still fail before then)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState().wait_for_everyone()


@contextlib.contextmanager
def claimed_output_dir(output: Path, recipe_text: str, replace: bool) -> Iterator[Path]:
    """Around a stage's set-up: make `output` with its recipe.yaml; `replace`: move the run there aside first,
    delete it once every rank's set-up succeeded, or put it back if the first rank's set-up fails. When another
    rank fails, the launcher stops the first one where it waits: the run stays aside, and the next run there
    says where it is."""
    moved = first_rank() and claim(output, recipe_text, replace)
    try:
        yield output
        every_rank_ready()
    except BaseException:
        if moved:
            shutil.rmtree(output, ignore_errors=True)
            replaced_run(output).rename(output)
            logger.warning("the run in %s is back: the new run failed before it trained", output)
        raise
    if moved:
        shutil.rmtree(replaced_run(output))


def claim(output: Path, recipe_text: str, replace: bool) -> bool:
    """Make `output` with its recipe.yaml (first rank only); whether a run there was moved aside to be replaced."""
    aside = replaced_run(output)
    if aside.exists():  # left by an overwrite that was killed during its set-up: never deleted unasked
        raise ConfigError(f"{aside} holds the run an interrupted overwrite=true moved aside; move it back to "
                          f"{output} or delete it, then run again")
    moved = replace and output.exists()
    if moved:
        output.rename(aside)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "recipe.yaml", recipe_text)
    return moved
