"""Bad CLIP pairs get what bad samples get in every stage: skipped and counted by reason in
run_summary.json (or, with `data.on_bad_sample: error`, a one-line DataError naming the pair)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from data_helpers import write_png, write_truncated_png
from test_clip_train import recipe_dict, write_pairs
from transformers import CLIPImageProcessorPil

from vlkit.clip.data import ClipPairDataset, read_pairs
from vlkit.clip.recipe import parse_clip_recipe
from vlkit.errors import DataError
from vlkit.train.clip import train_clip

BAD = {"corrupt": "images/corrupt.png", "empty": "images/empty.png", "outside": "../outside.png"}


@pytest.fixture(autouse=True)
def data_hf_cache(monkeypatch, tmp_path_factory):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "data_hf_cache")


@pytest.fixture
def bad_pairs_dir(tmp_path) -> Path:
    """15 good pairs + a corrupt image, an empty image file and a path outside the image root."""
    folder = tmp_path / "pairs"
    pairs_file = write_pairs(folder, n=15)
    write_truncated_png(folder / BAD["corrupt"])
    (folder / BAD["empty"]).write_bytes(b"")
    write_png(tmp_path / "outside.png")  # exists, but outside the root: refused for that, not as missing
    with open(pairs_file, "a") as handle:
        for name, image in BAD.items():
            handle.write(json.dumps({"id": name, "image": image, "caption": f"a {name} image."}) + "\n")
    return folder


def clip_recipe(data_dir: Path, out: Path, **data):
    recipe = recipe_dict(data_dir, out)
    recipe["data"].update(val_file=None, **data)
    recipe["train"].update(max_steps=2)  # batch 8: 16 usable pairs after the up-front drop, all loaded
    return parse_clip_recipe(recipe)


def test_training_skips_bad_pairs_and_counts_them_by_reason(bad_pairs_dir, tmp_path):
    run_dir = train_clip(clip_recipe(bad_pairs_dir, tmp_path / "run"))
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["final_metrics"]["train_loss"])
    assert summary["skipped_samples"] == 3
    assert summary["skipped_by_reason"] == {"empty_image": 1, "corrupt_image": 1, "image_outside_root": 1}
    assert summary["skipped_ids"] == {"empty_image": ["empty"], "corrupt_image": ["corrupt"],
                                      "image_outside_root": ["outside"]}
    assert summary["train_samples_available"] == 16  # the corrupt one is found only when it is decoded
    assert any("loss" in entry for entry in summary["log_history"])


def test_on_bad_sample_error_stops_with_one_line(bad_pairs_dir, tmp_path):
    with pytest.raises(DataError) as error:
        train_clip(clip_recipe(bad_pairs_dir, tmp_path / "run", on_bad_sample="error"))
    message = str(error.value)
    assert "\n" not in message and message.startswith("sample 'empty' is unusable (empty_image)")
    assert not (tmp_path / "run" / "run_summary.json").exists()


def test_a_pair_that_does_not_decode_stops_at_load_time_in_error_mode(bad_pairs_dir):
    processor = CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    pairs = read_pairs(bad_pairs_dir / "pairs.jsonl").filter(lambda row: row["id"] in ("0", "corrupt"))
    dataset = ClipPairDataset(pairs, bad_pairs_dir, processor, on_bad_sample="error")
    assert dataset[0]["pixel_values"].shape == (3, 8, 8)
    with pytest.raises(DataError, match="sample 'corrupt' is unusable \\(corrupt_image\\)"):
        dataset[1]


def test_max_train_samples_takes_the_first_usable_pairs_as_in_the_vlm_stages(bad_pairs_dir, tmp_path):
    from vlkit.train.clip import build_parts

    lines = (bad_pairs_dir / "pairs.jsonl").read_text().splitlines()
    (bad_pairs_dir / "bad_first.jsonl").write_text("\n".join(lines[-3:] + lines[:-3]) + "\n")
    recipe = clip_recipe(bad_pairs_dir, tmp_path / "run", train_file="bad_first.jsonl", max_train_samples=8)
    train_set = build_parts(recipe).train_set
    # empty and outside are dropped up front; the corrupt one is found only when it is decoded.
    assert train_set.samples["id"] == ["corrupt", *map(str, range(7))]
    assert train_set.skipped == {"empty_image": 1, "image_outside_root": 1}
