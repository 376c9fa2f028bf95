"""Training-time image augmentation for CLIP, on float tensors [3, H, W] in [0, 1].

Written by hand because torchvision (which has these transforms) is not a vlkit dependency;
the three transforms follow torchvision's definitions (RandomResizedCrop's area/ratio sampling,
ColorJitter's brightness/contrast/saturation blends). Greyscale and hue rotation take an image's colours
away, so they come with a caption that names none (`Augment.caption_column`). Everything is off unless the recipe turns
it on (see `AugmentSection`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vlkit.clip.recipe import AugmentSection

_GREY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma, as PIL and torchvision use


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high))


def random_resized_crop(image: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float]) -> torch.Tensor:
    """Crop a random area fraction in `scale` with aspect ratio in `ratio`; resize back to the input size."""
    _, height, width = image.shape
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(*scale)
        aspect = math.exp(_uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, ()))
            left = int(torch.randint(0, width - crop_w + 1, ()))
            break
    else:  # fall back to the whole image, as torchvision does for impossible draws
        top, left, crop_h, crop_w = 0, 0, height, width
    crop = image[:, top : top + crop_h, left : left + crop_w]
    resized = F.interpolate(crop[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return resized[0].clamp_(0.0, 1.0)


def _luma(image: torch.Tensor) -> torch.Tensor:
    return (image * _GREY.to(image)[:, None, None]).sum(0, keepdim=True)  # [1, H, W]


def hue_rotation_matrix(angle: float) -> torch.Tensor:
    """[3, 3] rotation by `angle` radians about the grey axis (1, 1, 1): greys stay grey, and every
    colour keeps its distance from grey while its hue turns (Rodrigues' formula)."""
    axis = torch.full((3,), 1 / math.sqrt(3))
    cross = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return torch.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def hue_rotate(image: torch.Tensor, angle: float) -> torch.Tensor:
    """A [3, H, W] image in [0, 1] with its hue turned by `angle` radians."""
    return torch.einsum("ij,jhw->ihw", hue_rotation_matrix(angle).to(image), image).clamp(0.0, 1.0)


def color_jitter(image: torch.Tensor, brightness: float, contrast: float, saturation: float) -> torch.Tensor:
    """Random brightness, contrast and saturation factors in [1 - s, 1 + s], applied in random order."""
    blends = {
        "brightness": (brightness, lambda x: torch.zeros_like(x)),
        "contrast": (contrast, lambda x: _luma(x).mean().expand_as(x)),
        "saturation": (saturation, lambda x: _luma(x).expand_as(x)),
    }
    active = [(strength, target) for strength, target in blends.values() if strength > 0]
    for index in torch.randperm(len(active)).tolist():
        strength, target = active[index]
        factor = _uniform(max(0.0, 1 - strength), 1 + strength)
        # torchvision's blend: factor * image + (1 - factor) * target (black / mean grey / greyscale)
        image = (factor * image + (1 - factor) * target(image)).clamp(0.0, 1.0)
    return image


class Augment:
    """Callable applying the recipe's augmentations to one image tensor [3, H, W] in [0, 1]."""

    def __init__(self, section: AugmentSection) -> None:
        self.section = section

    @property
    def enabled(self) -> bool:
        s = self.section
        return (s.random_resized_crop or s.color_jitter or s.horizontal_flip or s.grayscale > 0 or s.hue_rotation > 0
                or s.caption_swap > 0)

    def draw_recolour(self) -> str | None:
        """How the next image loses its colours, drawn before its caption is chosen: "grayscale", "hue"
        (hue turned at random) or None (kept)."""
        s = self.section
        if s.grayscale > 0 and bool(torch.rand(()) < s.grayscale):
            return "grayscale"
        if s.hue_rotation > 0 and bool(torch.rand(()) < s.hue_rotation):
            return "hue"
        return None

    def caption_column(self, recolour: str | None) -> str | None:
        """The column the next caption comes from, None for the usual one: the colourless column for a
        recoloured image, else `caption_swap_column` for a `caption_swap` share of the images."""
        s = self.section
        if recolour and s.colourless_caption_column:
            return s.colourless_caption_column
        if not recolour and s.caption_swap > 0 and bool(torch.rand(()) < s.caption_swap):
            return s.caption_swap_column
        return None

    def __call__(self, image: torch.Tensor, recolour: str | None = None) -> torch.Tensor:
        s = self.section
        if recolour == "grayscale":
            image = _luma(image).expand_as(image).clone()
        elif recolour == "hue":
            image = hue_rotate(image, _uniform(0.0, 2 * math.pi))
        if s.random_resized_crop:
            image = random_resized_crop(image, s.crop_scale, s.crop_ratio)
        if s.horizontal_flip and bool(torch.rand(()) < 0.5):
            image = image.flip(-1)
        if s.color_jitter:
            image = color_jitter(image, s.brightness, s.contrast, s.saturation)
        return image
