"""Checks of one normalized sample, shared by the training dataset and `vlkit data validate`.

Each check returns a reason (a key of `REASONS`) and a one-line detail, or None. The cheap ones
(`check_sample`) look at text and file metadata only; decoding images and measuring encoded
length are separate because they cost more.
"""

from __future__ import annotations

import os
from typing import Any

from vlkit.data.images import image_problem, load_image
from vlkit.errors import DataError, ImageError, ImageTokenMismatchError
from vlkit.modeling import IGNORE_INDEX, IMAGE_TOKEN

KNOWN_ROLES = ("system", "user", "assistant")

# reason -> what it means; the order is the order of reports.
REASONS: dict[str, str] = {
    "missing_image": "image file not found",
    "empty_image": "image file is empty (0 bytes)",
    "corrupt_image": "image does not decode",
    "image_outside_root": "image path escapes the image root",
    "image_token_mismatch": "number of images differs from the number of <image> markers",
    "empty_conversation": "no turns, or only empty turns",
    "no_assistant_turn": "no non-empty assistant turn to learn from",
    "bad_role": "a turn has a role other than system, user or assistant",
    "empty_caption": "caption is empty",
    "too_long": "longer than the maximum length and cannot be truncated without cutting image tokens "
    "or every answer",
    "unusable": "the processor rejected the sample",
}

Problem = tuple[str, str]  # (reason, detail)


def check_images(
    paths: list[str], image_root: str | os.PathLike | None, allow_outside_root: bool = False
) -> Problem | None:
    """The first path that escapes the root, is missing or is an empty file."""
    for path in paths:
        if not path:
            return "missing_image", "empty image path"
        problem = image_problem(path, image_root, allow_outside_root)
        if problem is not None:
            return problem
    return None


def check_messages(messages: list[dict[str, str]], n_images: int) -> Problem | None:
    """Text-only checks of a conversation: roles, emptiness, `<image>` count."""
    if not messages or not any(m["content"].strip() for m in messages):
        return "empty_conversation", "the conversation has no text"
    bad_roles = sorted({m["role"] for m in messages if m["role"] not in KNOWN_ROLES})
    if bad_roles:
        return "bad_role", f"unknown role(s) {bad_roles}; use system, user (human) or assistant (gpt)"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "no_assistant_turn", "no assistant turn with text"
    markers = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if markers != n_images:
        return "image_token_mismatch", f"{n_images} image(s) but {markers} {IMAGE_TOKEN} marker(s)"
    return None


def check_caption(caption: str | list[str] | None) -> Problem | None:
    """A caption (or a list of captions, of which at least one must have text)."""
    captions = caption if isinstance(caption, list) else [caption]
    if not any((c or "").strip() for c in captions):
        return "empty_caption", "the caption is empty"
    return None


def check_sample(
    sample: dict[str, Any], image_root: str | os.PathLike | None, allow_outside_root: bool = False
) -> Problem | None:
    """Cheap checks of a normalized conversation sample (no decoding, no tokenizing)."""
    return check_messages(sample["messages"], len(sample["images"])) or check_images(
        sample["images"], image_root, allow_outside_root
    )


def decode_problem(path: str, image_root: str | os.PathLike | None, allow_outside_root: bool = False) -> Problem | None:
    """Decode one image fully; the reason it cannot be used, or None."""
    problem = image_problem(path, image_root, allow_outside_root)
    if problem is not None:
        return problem
    try:
        load_image(path, image_root, allow_outside_root)
    except ImageError as error:
        return "corrupt_image", str(error)
    return None


def encode_text_or_problem(
    processor: Any, messages: list[dict[str, str]], n_images: int, max_length: int | None
) -> tuple[dict[str, list[int]] | None, Problem | None]:
    """`processor.encode_text` of a sample at `max_length`, or why it is unusable (images add a fixed
    number of tokens each, so the text alone decides)."""
    try:
        encoded = processor.encode_text(messages, n_images, max_length=max_length)
    except ImageTokenMismatchError as error:
        return None, ("image_token_mismatch", str(error))
    except DataError as error:
        if max_length is None:
            return None, ("unusable", str(error))
        try:
            length = len(processor.encode_text(messages, n_images)["input_ids"])
        except DataError:
            return None, ("unusable", str(error))
        if length > max_length:
            return None, ("too_long", f"{length} tokens > max_length {max_length}: {error}")
        return None, ("unusable", str(error))
    if all(label == IGNORE_INDEX for label in encoded["labels"]):
        # Whatever the processor does, a sample with nothing to learn from never reaches the model.
        return None, ("unusable", "every label is masked")
    return encoded, None


def length_problem(processor: Any, messages: list[dict[str, str]], n_images: int, max_length: int) -> Problem | None:
    """Whether `processor.encode_text` accepts the sample at `max_length`."""
    return encode_text_or_problem(processor, messages, n_images, max_length)[1]
