"""Safe image loading: path resolution inside an image root and decoding to RGB.

Every image vlkit reads (training, validation, chat, eval) goes through `load_image`, so the
same rules hold everywhere: paths may not escape the root unless allowed, Pillow's
decompression-bomb guard stays on, and odd modes (RGBA, palette, 16-bit, CMYK, greyscale,
animated) come out as 8-bit RGB of the first frame.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlkit.errors import ImageError


@functools.lru_cache(maxsize=64)
def _absolute_root(root: str) -> Path:
    """A data set's image root as an absolute path, found once."""
    return Path(os.path.abspath(root))


def resolve_image_path(path: str | os.PathLike, root: str | os.PathLike | None, allow_outside_root: bool = False) -> Path:
    """Resolve `path` against `root`, refusing paths that escape the root unless allowed.

    Escaping is judged on the path as written ("..", an absolute path elsewhere), not where links lead: a
    link the user placed under the root (an `images/` folder linked from a larger disk) stays inside it.
    """
    candidate = Path(path)
    if root is None:
        return candidate
    root_path = _absolute_root(str(root))
    resolved = Path(os.path.normpath(root_path / candidate))  # an absolute candidate replaces the root
    if not allow_outside_root and not resolved.is_relative_to(root_path):
        raise ImageError(
            f"image path '{path}' escapes the image root '{root}'; keep images under the root "
            "or set data.allow_images_outside_root: true in the recipe"
        )
    return resolved


def image_problem(
    path: str | os.PathLike, root: str | os.PathLike | None = None, allow_outside_root: bool = False
) -> tuple[str, str] | None:
    """Cheap checks without decoding: (reason, message) for a path that escapes the root, a missing
    file or an empty file; None when the file may be decoded. Reasons are keys of
    `vlkit.data.checks.REASONS`."""
    try:
        resolved = resolve_image_path(path, root, allow_outside_root)
    except ImageError as error:
        return "image_outside_root", str(error)
    try:
        size = resolved.stat().st_size if resolved.is_file() else None
    except OSError:
        size = None
    if size is None:
        return "missing_image", f"image not found: {resolved}"
    if size == 0:
        return "empty_image", f"image is an empty file: {resolved}"
    return None


def _wide_to_8bit(array: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit and float greyscale pixels as 0..255, keeping brightness instead of clipping to white.

    The scale comes from the value range the mode implies (a 16-bit white stays white, a flat image
    stays flat); only values outside any known range are stretched to their min..max.
    """
    low, high = float(array.min()), float(array.max())
    if mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = array * 255.0
    elif low >= 0.0 and high <= 255.0 and not mode.startswith("I;16"):
        scaled = array
    elif low >= 0.0 and high <= 65535.0:
        scaled = array / 257.0
    else:
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow image (first frame, any mode) to 8-bit RGB."""
    if getattr(image, "is_animated", False):
        image.seek(0)
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = Image.fromarray(_wide_to_8bit(np.asarray(image, dtype=np.float64), image.mode), mode="L")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(
    path: str | os.PathLike, root: str | os.PathLike | None = None, allow_outside_root: bool = False
) -> Image.Image:
    """Open and decode an image file as RGB, raising `ImageError` with the reason on failure."""
    resolved = resolve_image_path(path, root, allow_outside_root)
    if not resolved.is_file():
        raise ImageError(f"image not found: {resolved}")
    if resolved.stat().st_size == 0:
        raise ImageError(f"image is an empty file: {resolved}")
    try:
        with Image.open(resolved) as image:
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as error:
        raise ImageError(f"image is too large to decode safely: {resolved} ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"image does not decode: {resolved} ({type(error).__name__}: {error})") from None
