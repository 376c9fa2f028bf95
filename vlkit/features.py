"""Frozen vision features, computed once per image and kept on disk.

A frozen tower maps an image to the same features in every epoch and every run, so a stage whose
tower is frozen computes each image's features once, before training, and the model then skips
the tower (`VlkitForConditionalGeneration.forward(vision_features=...)`). Layout:

    $VLKIT_HOME/features/<tower key>/<h[:2]>/<h>.safetensors     {"features": [N, Dv]}, h = image hash

The image hash is sha256 of the file's bytes. The tower key is sha256 of the tower's weights (as
loaded, so LoRA-merged or fine-tuned towers get their own key), their dtype, the feature layer and
selection, the image processor's settings and the version of vlkit's feature code (`FEATURES_FORMAT`):
whatever changes the features changes a key.
Files are written to a temporary name and renamed, so several ranks or runs may fill one store at
once; safetensors reads are memory-mapped. `python -m data_tools.precompute_features` fills a store
ahead of training; `vlkit train` fills it for its own data set when `data.cache_vision_features`.

    store = FeatureStore.for_tower(tower_key(tower, image_processor, -2, "default", 1))
    cached = precompute_features(store, paths, tower, image_processor, -2, "default", 1)
    features = cached.lookup(paths[:2])                                   # [2, N, Dv]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vlkit.data.images import load_image
from vlkit.errors import ImageError
from vlkit.feature_maps import as_tokens, tower_input
from vlkit.llm import vlkit_home

logger = logging.getLogger(__name__)

FEATURES_KEY = "features"
# Part of every tower key: raise it when the code that turns pixels into stored features changes (the
# selection, `tower_input`, `as_tokens`), so a store filled by the old code is not read as the new one's.
FEATURES_FORMAT = 1


def image_hash(path: str | os.PathLike) -> str:
    """sha256 of an image file's bytes: the same picture under two names is computed once."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tower_key(
    tower: torch.nn.Module, image_processor, feature_layer: int, select_strategy: str, num_prefix_tokens: int
) -> str:
    """A short hash of everything besides the image that decides the features."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # reshape(-1): a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    settings = {
        "format": FEATURES_FORMAT,
        "feature_layer": feature_layer,
        "select_strategy": select_strategy,
        "num_prefix_tokens": num_prefix_tokens if select_strategy == "default" else 0,
        "image_processor": image_processor.to_dict() if image_processor is not None else None,
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def tower_features(
    tower: torch.nn.Module, pixel_values: torch.Tensor, feature_layer: int, select_strategy: str, num_prefix_tokens: int
) -> torch.Tensor:
    """The tower's patch features [I, N, Dv], selected exactly as `VlkitForConditionalGeneration.get_vision_features`."""
    pixels = tower_input(pixel_values, tower.config, next(tower.parameters()).dtype)
    hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]
    hidden = as_tokens(hidden)  # a CNN's feature map [I, C, h, w] -> h*w tokens
    return hidden[:, num_prefix_tokens:] if select_strategy == "default" else hidden


class FeatureStore:
    """One tower's features, one safetensors file per image, keyed by the image's content hash."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @classmethod
    def for_tower(cls, key: str, home: str | os.PathLike | None = None) -> FeatureStore:
        return cls((Path(home) if home is not None else vlkit_home()) / "features" / key)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.safetensors"

    def __contains__(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def load(self, digest: str) -> torch.Tensor:
        return load_file(self.path(digest))[FEATURES_KEY]

    def save(self, digest: str, features: torch.Tensor) -> None:
        target = self.path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(handle)
        save_file({FEATURES_KEY: features.detach().contiguous().cpu()}, staging)
        os.replace(staging, target)  # atomic: readers never see a torn file

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.safetensors")) if self.root.is_dir() else 0


class CacheTooLarge(Exception):
    """The features still to compute would not fit the disk; nothing was written."""

    def __init__(self, images: int) -> None:
        super().__init__(f"{images} images' features do not fit the disk")
        self.images = images


class MissingFeatures(Exception):
    """An image has no stored features; `reason` is a key of `vlkit.data.checks.REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class CachedFeatures:
    """What a dataset needs to swap images for stored features: the store and path -> image hash."""

    store: FeatureStore
    hashes: dict[str, str] = field(default_factory=dict)  # resolved image path -> image hash
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # resolved path -> (reason, detail)
    computed: int = 0
    reused: int = 0

    def lookup(self, paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """Stored features of resolved image paths, stacked: [len(paths), N, Dv]."""
        tensors = []
        for path in map(str, paths):
            if path in self.failed:
                raise MissingFeatures(*self.failed[path])
            digest = self.hashes.get(path)
            if digest is None or digest not in self.store:
                raise MissingFeatures("corrupt_image", f"no stored features for {path} (it did not decode when they were computed)")
            tensors.append(self.store.load(digest))
        return torch.stack(tensors)

    def summary(self) -> str:
        return (f"vision features: {self.computed} computed, {self.reused} reused from {self.store.root}"
                + (f", {len(self.failed)} image(s) failed" if self.failed else ""))


def _hash_all(paths: Iterable[str], result: CachedFeatures, progress: bool) -> None:
    unique = sorted(set(map(str, paths)))
    for path in tqdm(unique, desc="hashing images", unit="image", disable=not progress or len(unique) < 10_000):
        try:
            result.hashes[path] = image_hash(path)
        except OSError as error:
            result.failed[path] = ("missing_image", f"cannot read {path}: {error}")


@torch.no_grad()
def precompute_features(
    store: FeatureStore,
    paths: Iterable[str | os.PathLike],
    tower: torch.nn.Module,
    image_processor,
    feature_layer: int,
    select_strategy: str,
    num_prefix_tokens: int,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    fits: Callable[[int], bool] | None = None,
) -> CachedFeatures:
    """Compute and store the features of every image not stored yet; return the path -> hash map.

    `paths` are resolved image files. `shard=(rank, world)`: each rank computes every world-th
    missing image (the caller waits for all ranks before reading). Images that do not decode are
    reported in `.failed`, not raised. `fits(n)`: asked (on every rank) once the images are hashed,
    whether the features of the n images not stored yet may be written; if not, `CacheTooLarge` is raised
    before anything is computed.
    """
    result = CachedFeatures(store)
    _hash_all((str(p) for p in paths), result, progress)
    by_hash: dict[str, str] = {}
    for path, digest in result.hashes.items():
        by_hash.setdefault(digest, path)
    missing = sorted(digest for digest in by_hash if digest not in store)
    result.reused = len(by_hash) - len(missing)
    if fits is not None and not fits(len(missing)):
        raise CacheTooLarge(len(missing))
    rank, world = shard
    mine = missing[rank::world]
    if device is not None:
        tower.to(device)
    device = next(tower.parameters()).device
    bar = tqdm(total=len(mine), desc="computing vision features", unit="image", disable=not progress or len(mine) < 64)
    for start in range(0, len(mine), batch_size):
        digests, images = [], []
        for digest in mine[start : start + batch_size]:
            path = by_hash[digest]
            try:
                images.append(load_image(path))
                digests.append(digest)
            except ImageError as error:
                result.failed[path] = ("corrupt_image", str(error))
        if images:
            pixel_values = image_processor(images, return_tensors="pt")["pixel_values"].to(device)
            features = tower_features(tower, pixel_values, feature_layer, select_strategy, num_prefix_tokens)
            for digest, one in zip(digests, features):
                store.save(digest, one.clone())  # clone: save only this image's rows, not the batch's storage
            result.computed += len(digests)
        bar.update(min(batch_size, len(mine) - start))
    bar.close()
    # Another name for an image that failed fails the same way.
    failed_by_hash = {result.hashes[p]: problem for p, problem in result.failed.items() if p in result.hashes}
    for path, digest in result.hashes.items():
        if digest in failed_by_hash:
            result.failed.setdefault(path, failed_by_hash[digest])
    logger.debug(result.summary())  # the stage prints it once, on the first rank
    return result


def precompute_for_model(model, image_processor, paths: Iterable[str | os.PathLike],
                         home: str | os.PathLike | None = None, **kwargs) -> CachedFeatures:
    """`precompute_features` with the tower, feature layer and selection of a `VlkitForConditionalGeneration`."""
    config = model.config
    settings = (config.vision_feature_layer, config.vision_feature_select_strategy, config.vision_num_prefix_tokens)
    store = FeatureStore.for_tower(tower_key(model.vision_tower, image_processor, *settings), home)
    return precompute_features(store, paths, model.vision_tower, image_processor, *settings, **kwargs)


def image_paths_of(datasets: Sequence) -> list[str]:
    """Every distinct image file the `ConversationDataset`s use, sorted."""
    from vlkit.data.images import resolve_image_path

    paths = set()
    for dataset in datasets:
        for batch in dataset.samples.select_columns(["images"]).iter(batch_size=4096):
            for sample_paths in batch["images"]:
                paths.update(
                    str(resolve_image_path(p, dataset.image_root, dataset.allow_images_outside_root)) for p in sample_paths
                )
    return sorted(paths)


def feature_bytes_per_image(model, image_processor) -> int:
    """The size of one image's stored features: tokens x width x the tower's element size."""
    from vlkit.feature_maps import feature_width
    from vlkit.vision import num_feature_tokens

    config, tower = model.config, model.vision_tower
    tokens = num_feature_tokens(tower, image_processor, config.vision_feature_layer)
    if config.vision_feature_select_strategy == "full":
        tokens += config.vision_num_prefix_tokens
    width = feature_width(tower.config, config.vision_feature_layer)
    return tokens * width * next(tower.parameters()).dtype.itemsize


def free_bytes_for_features(home: str | os.PathLike | None = None) -> int:
    """Free space on the disk the feature store is on (its nearest existing folder)."""
    folder = (Path(home) if home is not None else vlkit_home()) / "features"
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def cache_features_for(model, image_processor, datasets: Sequence, device=None, shard: tuple[int, int] = (0, 1),
                       **kwargs) -> CachedFeatures:
    """Store the features of every image the `ConversationDataset`s use; they then yield features, not pixels.

    With several ranks (`shard`), every rank must wait for all of them after this returns and before
    reading items.
    """
    cached = precompute_for_model(model, image_processor, image_paths_of(datasets), device=device, shard=shard, **kwargs)
    for dataset in datasets:
        dataset.vision_features = cached
    return cached


def caches_vision_features(recipe) -> bool:
    """A recipe's `data.cache_vision_features`, resolved: unset means on for align (its tower is frozen)."""
    setting = recipe.data.cache_vision_features
    return (recipe.stage == "align" and recipe.tune.vision == "frozen") if setting is None else setting
