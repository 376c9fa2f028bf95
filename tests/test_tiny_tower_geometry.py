"""The shipped tiny recipes' tower geometry: its last feature map samples the image symmetrically, and
the align connectors read that map whole.

HF's ResNet downsamples 5 times with stride-2 convolutions; on an even input each one drops the last
row and column from its sampling grid, so the cells of the last map look up and to the left (at 64 px
the 2 x 2 map's cells centre at 0.36 and 0.48 of the width, not 0.25 and 0.75), and the shapes world's
right and bottom shapes sit at the edge of every cell. An input of 2^5 k + 1 pixels samples both
edges alike.
"""

from __future__ import annotations

import torch
from train_helpers import REPO
from transformers import AutoConfig, AutoModel

from vlkit.clip.recipe import load_clip_recipe
from vlkit.recipe import load_recipe


def cell_centres(model: torch.nn.Module, image_size: int, layer: int = -1) -> list[float]:
    """Effective receptive-field centre of each diagonal cell of a hidden state, as a fraction of the width:
    the centroid of |d cell / d pixels| over random inputs."""
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, image_size, image_size, requires_grad=True)
    hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
    columns = torch.arange(image_size, dtype=torch.float32)
    centres = []
    for cell in range(hidden.shape[-1]):
        (grad,) = torch.autograd.grad(hidden[:, :, cell, cell].abs().sum(), pixels, retain_graph=True)
        weight = grad.abs().sum((0, 1, 2))  # per column
        centres.append(float((weight * columns).sum() / weight.sum()) / (image_size - 1))
    return centres


def shipped_tower(image_size: int | None = None) -> tuple[torch.nn.Module, int]:
    settings = dict(load_clip_recipe(REPO / "recipes" / "tiny" / "clip.yaml").model.vision.config)
    size = image_size or settings.pop("image_size")
    settings.pop("image_size", None)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)  # the same random tower whichever tests ran before
    return AutoModel.from_config(config).eval(), size


def test_the_tiny_towers_last_map_samples_both_edges_alike():
    model, size = shipped_tower()
    centres = cell_centres(model, size)
    assert abs(centres[0] + centres[-1] - 1.0) < 0.03, centres  # mirror images about the centre
    even_model, _ = shipped_tower(64)
    skewed = cell_centres(even_model, 64)
    assert abs(skewed[0] + skewed[-1] - 1.0) > 0.1, skewed  # what an even input does (the former 64 px)


def test_the_align_connectors_read_the_maps_their_comments_name():
    model, size = shipped_tower()
    with torch.no_grad():
        maps = model(pixel_values=torch.zeros(1, 3, size, size), output_hidden_states=True).hidden_states
    captions = load_recipe(REPO / "recipes" / "tiny" / "align_captions.yaml")
    connector = captions.model.connector
    side = maps[captions.model.vision_feature_layer].shape[-1]
    assert connector["type"] == "pixel_shuffle" and side == connector["scale_factor"] == 3  # one token per image
    # The demo's visual_words reader is an MLP over every patch of the finer 9 x 9 map two stages before it.
    words = load_recipe(REPO / "recipes" / "tiny" / "align.yaml")
    assert words.model.connector == {"type": "visual_words"}
    assert maps[words.model.vision_feature_layer].shape[-2:] == (9, 9)
