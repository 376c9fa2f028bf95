"""A stage's output dir: claimed before training, and a run that `overwrite=true` replaces kept until the new
one is ready to train.

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
from vlkit.run_folder import atomic_write_text

logger = logging.getLogger(__name__)


def first_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


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
