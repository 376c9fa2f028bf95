"""User-facing errors: one line that says what is wrong and what to do.

Everything a user can cause (a bad recipe key, a missing file, a corrupt image, an `<image>`
count mismatch, a connector that does not fit the LLM) raises a `VlkitError` subclass. The CLI
prints `str(error)` and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations


class VlkitError(Exception):
    """Base class of every error a user can cause and fix."""

    exit_code = 2


class ConfigError(VlkitError):
    """A recipe, connector or model configuration is invalid."""


class ModelLoadError(VlkitError):
    """A vision tower, LLM or vlkit model could not be located or loaded."""


class ImageError(VlkitError):
    """An image is missing, does not decode, or lies outside the image root."""


class ImageTokenMismatchError(VlkitError, ValueError):
    """The number of images differs from the number of `<image>` markers."""


class DataError(VlkitError):
    """A data file or sample is unusable (bad format, over-long, nothing to learn from)."""


class OutOfMemoryError(VlkitError):
    """A training step or a batch of answers did not fit in the accelerator's (or the host's) memory."""


class ChatTemplateError(VlkitError):
    """A chat template cannot be used to mask assistant turns reliably."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an error is running out of memory (CUDA, XPU, MPS or CPU), by accelerate's test."""
    from accelerate.utils.memory import should_reduce_batch_size

    return should_reduce_batch_size(error)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, for wrapping library errors in one-line ones."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
