"""A stage's output dir: what `resume` and `overwrite` find there, the folder claimed before training, and a
run that `overwrite=true` replaces kept until the new one is ready to train.

`checkpoint_to_resume` is every stage's reading of the folder: a finished run is replaced only with
`overwrite=true`, an interrupted one continues with `resume=true` (its newest complete checkpoint) or
starts over with `overwrite=true`.

`claim_output_dir` makes the folder and writes the resolved recipe. With overwrite, the run already there is
moved aside (`.NAME.replaced` beside it), not deleted; `old_run_kept_until_ready` wraps the stage's set-up
(model, data, Trainer) and deletes it when the set-up succeeds, or puts it back when it fails, so a recipe
that never trained costs no finished run. Under a launcher only the first rank touches the folders.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

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
    if resume:
        if isinstance(resume, str) and resume.lower() not in ("true", "latest"):
            if not all((Path(resume) / mark).is_file() for mark in marks):
                raise ConfigError(f"resume checkpoint not found or incomplete: {resume}")
            return resume
        latest = latest_checkpoint(checkpoints, marks)
        if latest is None:
            raise ConfigError(f"resume=true but {checkpoints} holds no complete checkpoint; drop resume to start over")
        return latest
    if (output / SUMMARY).is_file() and not overwrite:
        raise ConfigError(f"{output} holds a finished run; set overwrite=true to replace it or choose another output_dir")
    if latest_checkpoint(checkpoints, marks) and not overwrite:
        raise ConfigError(
            f"{output} holds an unfinished run; set resume=true to continue it or overwrite=true to start over"
        )
    return None


def replaced_run(output: Path) -> Path:
    """Where `overwrite=true` keeps the run it replaces until the new one is ready to train."""
    return output.parent / f".{output.name}.replaced"


def claim_output_dir(output: Path, recipe_text: str, replace: bool) -> Path:
    """Make `output` with its recipe.yaml; `replace`: move the run there aside first."""
    if not first_rank():
        return output  # the stages' ranks meet before any other write
    if replace and output.exists():
        aside = replaced_run(output)
        if aside.exists():
            raise ConfigError(f"{aside} holds the run an interrupted overwrite=true moved aside; move it back to "
                              f"{output} or delete it, then run again")
        output.rename(aside)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "recipe.yaml", recipe_text)
    return output


@contextlib.contextmanager
def old_run_kept_until_ready(output: Path) -> Iterator[None]:
    """Around a stage's set-up: the run moved aside is deleted when the set-up succeeds, put back when it fails."""
    aside = replaced_run(output)
    try:
        yield
    except BaseException:
        if first_rank() and aside.is_dir():
            shutil.rmtree(output, ignore_errors=True)
            aside.rename(output)
            logger.warning("the run in %s is back: the new run failed before it trained", output)
        raise
    if first_rank() and aside.is_dir():
        shutil.rmtree(aside)
