"""Pre-compute a frozen vision tower's features for a data set, into vlkit's feature store.

    python -m data_tools.precompute_features data/shapes/align_train.json --images data/shapes \\
        --vision runs/tiny-clip [--feature-layer -2] [--strategy default] [--dtype float32]

The store is `$VLKIT_HOME/features/<tower key>/` (see `vlkit.features`); a later `vlkit train` with
the same tower, feature layer, selection and dtype finds the features there and computes none.
Images that are missing or do not decode are counted and left out (training skips those samples).
"""

from __future__ import annotations

import argparse
import sys

import torch

from vlkit.data.images import resolve_image_path
from vlkit.errors import VlkitError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.precompute_features", description=__doc__.split("\n")[0])
    parser.add_argument("data", help="conversation file (LLaVA or ShareGPT JSON/JSONL)")
    parser.add_argument("--images", required=True, help="image root the data's paths are relative to")
    parser.add_argument("--vision", required=True, help="vision tower folder or hub id (the recipe's model.vision)")
    parser.add_argument("--feature-layer", type=int, default=-2, help="model.vision_feature_layer (default -2)")
    parser.add_argument("--strategy", choices=("default", "full"), default="default",
                        help="model.vision_feature_select_strategy (default: drop CLS/register tokens)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="model.dtype of the recipe (features are keyed by it)")
    parser.add_argument("--format", choices=("auto", "llava", "sharegpt"), default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--allow-images-outside-root", action="store_true")
    args = parser.parse_args(argv)

    from vlkit.data.formats import load_conversations
    from vlkit.features import FeatureStore, precompute_features, tower_key
    from vlkit.vision import load_vision_tower, num_prefix_tokens

    try:
        samples = load_conversations(args.data, format=args.format)
        paths = set()
        for batch in samples.select_columns(["images"]).iter(batch_size=4096):
            for sample_paths in batch["images"]:
                for path in sample_paths:
                    try:
                        paths.add(str(resolve_image_path(path, args.images, args.allow_images_outside_root)))
                    except VlkitError as error:
                        print(f"skipping {path}: {error}", file=sys.stderr)
        tower, image_processor = load_vision_tower(args.vision, dtype=getattr(torch, args.dtype))
        tower.eval()  # frozen, as in training
        settings = (args.feature_layer, args.strategy, num_prefix_tokens(tower.config))
        store = FeatureStore.for_tower(tower_key(tower, image_processor, *settings))
        cached = precompute_features(store, sorted(paths), tower, image_processor, *settings,
                                     batch_size=args.batch_size, device=args.device)
    except VlkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(cached.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
