"""CLIP stage (stage 0) samples/s: vlkit's training step versus a plain loop over `CLIPModel(return_loss=True)`.

    python bench/clip.py                      # the tiny CLIP recipe's model on the shapes world; appends to docs
    python bench/clip.py --data DIR --toy --no-append                      # quick (tests)

Both sides train the same `CLIPModel` (same config, same initial weights) on the same image-caption
pairs of the shapes world with AdamW, batch `--batch-size`:

- vlkit: what `vlkit train recipes/tiny/clip.yaml` runs per step: `ClipPairDataset` (decoded,
  resized images kept in memory after the first epoch) + `ClipCollator`, `ContrastiveModel`
  (the local-loss InfoNCE), AdamW, the logit-scale clamp;
- plain: per step, open the batch's image files, `CLIPImageProcessor` + tokenizer, then
  `CLIPModel(..., return_loss=True).loss.backward()`, AdamW.

Two rows: "with data" (each step also fetches its batch, epochs >= 2), and "model only" (both
sides get the same prepared tensors). Speed-ups are medians of per-round ratios. Peak RSS: see
bench/common.py (the two models are separate copies; both count in every row).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from common import (
    REPO,
    add_run_options,
    interleaved,
    markdown_table,
    median_ratio,
    publish,
    start,
    verdict,
)

from vlkit.feature_maps import CONVOLUTIONAL_TOWERS

GOAL = 1.0
# recipes/tiny/clip.yaml's model and loss, used when that file is absent.
TINY_CLIP = {
    "model": {"projection_dim": 128, "max_text_length": 40,
              "vision": {"config": {"image_size": 64, "patch_size": 8, "hidden_size": 128, "intermediate_size": 512,
                                    "num_hidden_layers": 4, "num_attention_heads": 4}},
              "text": {"config": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3,
                                  "num_attention_heads": 4}}},
    "loss": {"type": "clip", "gather_with_grad": True},
}


def clip_recipe(data_dir: Path):
    from vlkit.clip.recipe import parse_clip_recipe

    path = REPO / "recipes/tiny/clip.yaml"
    tree = yaml.safe_load(path.read_text()) if path.is_file() else {"stage": "clip", "output_dir": "unused", **TINY_CLIP}
    if tree["model"]["vision"].get("config", {}).get("model_type") in CONVOLUTIONAL_TOWERS:
        # The reference is stock transformers' forward, which cannot project a CNN's pooled map
        # [B, C, 1, 1]; vlkit's side would run alone. Both sides run the former tiny ViT instead.
        tree["model"] = TINY_CLIP["model"]
    tree["data"] = {"dir": str(data_dir), "train_file": "clip_train.jsonl"}
    tree.setdefault("augment", {}).update(random_resized_crop=False, color_jitter=False, horizontal_flip=False)
    return parse_clip_recipe(tree)


def shapes_pairs(workdir: Path, n: int, data: str | None) -> Path:
    folder = Path(data) if data else REPO / "data" / "shapes"
    if (folder / "clip_train.jsonl").is_file():
        return folder
    from data_tools.shapes import generate

    folder = workdir / "shapes"
    generate(folder, n_train=max(n, 16), n_val=4, n_test=4, seed=0, workers=1, progress=False)
    return folder


class Sides:
    def __init__(self, args, workdir: Path) -> None:
        from vlkit.clip.augment import Augment
        from vlkit.clip.data import ClipCollator, ClipPairDataset, captions_of, load_pairs
        from vlkit.clip.model import (
            ContrastiveModel,
            build_clip_model,
            build_image_processor,
            build_tokenizer,
        )

        data = shapes_pairs(workdir, args.batch_size * args.batches, args.data)
        recipe = clip_recipe(data)
        rows = load_pairs(data / "clip_train.jsonl")[: args.batch_size * args.batches]
        self.rows, self.data, self.batch_size = rows, data, args.batch_size
        torch.manual_seed(0)
        self.tokenizer = build_tokenizer(recipe, [c for row in rows for c in captions_of(row, "caption")])
        clip = build_clip_model(recipe, self.tokenizer)
        self.image_processor = build_image_processor(recipe, clip.config.vision_config)
        self.max_length = clip.config.text_config.max_position_embeddings
        self.plain_model = copy.deepcopy(clip).train()  # same initial weights
        self.vlkit_model = ContrastiveModel(clip, recipe.loss.type, recipe.loss.gather_with_grad).train()
        self.vlkit_optimizer = torch.optim.AdamW(self.vlkit_model.parameters(), lr=1e-4)
        self.plain_optimizer = torch.optim.AdamW(self.plain_model.parameters(), lr=1e-4)
        self.dataset = ClipPairDataset(rows, data, self.image_processor, Augment(recipe.augment), cache_images=True)
        self.collator = ClipCollator(self.tokenizer, self.max_length)
        self.logit_scale_max = recipe.loss.logit_scale_max
        self.step_index = {"vlkit": 0, "plain": 0}
        self.fixed = self.collator([self.dataset[i] for i in range(self.batch_size)])
        for index in range(len(self.dataset)):  # epoch 1 fills the image cache; the steps timed are later epochs'
            self.dataset[index]
        self.sources = (f"CLIP: vision {recipe.model.vision.config}, text {recipe.model.text.config}, "
                        f"batch {self.batch_size}, {len(rows)} pairs")

    def _indices(self, side: str) -> range:
        start = (self.step_index[side] % (len(self.rows) // self.batch_size)) * self.batch_size
        self.step_index[side] += 1
        return range(start, start + self.batch_size)

    def vlkit_batch(self) -> dict:
        return self.collator([self.dataset[i] for i in self._indices("vlkit")])

    def plain_batch(self) -> dict:
        from PIL import Image

        images, captions = [], []
        for index in self._indices("plain"):
            row = self.rows[index]
            with Image.open(self.data / row["image"]) as image:
                images.append(image.convert("RGB"))
            caption = row["caption"]
            captions.append(caption if isinstance(caption, str) else caption[0])
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        text = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"pixel_values": pixels, "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}

    def vlkit_step(self, batch: dict | None = None) -> None:
        from vlkit.clip.loss import clamp_logit_scale

        batch = batch or self.vlkit_batch()
        self.vlkit_optimizer.zero_grad(set_to_none=True)
        self.vlkit_model(**batch).loss.backward()
        self.vlkit_optimizer.step()
        clamp_logit_scale(self.vlkit_model.clip.logit_scale, self.logit_scale_max)

    def plain_step(self, batch: dict | None = None) -> None:
        batch = batch or self.plain_batch()
        self.plain_optimizer.zero_grad(set_to_none=True)
        self.plain_model(**batch, return_loss=True).loss.backward()
        self.plain_optimizer.step()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="a shapes world folder (default: data/shapes, or generated)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--toy", action="store_true", help="quick settings for tests")
    add_run_options(parser)
    args = parser.parse_args(argv)
    start(args)
    if args.toy:
        args.rounds, args.batch_size, args.batches = 1, min(args.batch_size, 8), 2
    with tempfile.TemporaryDirectory() as tmp:
        sides = Sides(args, Path(tmp))
        with torch.no_grad():  # same weights, same batch: same loss
            vlkit_loss = float(sides.vlkit_model(**sides.fixed).loss)
            plain_loss = float(sides.plain_model(**sides.fixed, return_loss=True).loss)
        if abs(vlkit_loss - plain_loss) > 1e-4 * max(1.0, abs(plain_loss)):
            raise SystemExit(f"benchmark invalid: vlkit loss {vlkit_loss} != CLIPModel loss {plain_loss}")
        peak_rss: dict[str, float] = {}
        times = interleaved({
            "vlkit, with data": sides.vlkit_step,
            "plain, with data": sides.plain_step,
            "vlkit, model only": lambda: sides.vlkit_step(sides.fixed),
            "plain, model only": lambda: sides.plain_step(sides.fixed),
        }, rounds=args.rounds, peak_rss=peak_rss)
        rss = {side: peak_rss[f"{side}, with data"] for side in ("vlkit", "plain")}
    rows, ratios = [], {}
    for what in ("with data", "model only"):
        vlkit, plain = times[f"vlkit, {what}"], times[f"plain, {what}"]
        ratios[what] = median_ratio(plain, vlkit)
        rows.append([what, f"{args.batch_size / statistics.median(vlkit):.1f}",
                     f"{args.batch_size / statistics.median(plain):.1f}", f"{ratios[what]:.2f}x"])
    rows.append(["peak RSS MiB (with data)", *(f"{rss[s]:.0f}" for s in ("vlkit", "plain")), ""])
    table = markdown_table(["step", "vlkit samples/s", "plain CLIPModel samples/s", "vlkit speed-up"], rows)
    lines = [f"- CLIP stage, with data: {verdict(ratios['with data'], GOAL)}",
             f"- model step alone (same tensors): {ratios['model only']:.2f}x"]
    body = f"{sides.sources}; {args.rounds} interleaved rounds.\n\n{table}\n\n" + "\n".join(lines)
    publish("CLIP stage: vlkit vs plain CLIPModel loop", body, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
