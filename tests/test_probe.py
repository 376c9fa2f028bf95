"""vlkit/probe.py (and its command line bench/probe.py): linear probes of colour, shape, position and
count on a model's features."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from train_helpers import REPO

import vlkit.probe
from vlkit.errors import DataError


@pytest.fixture(scope="module")
def probe_module():
    return vlkit.probe


def test_linear_probe_separates_separable_classes_and_not_noise(probe_module):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=generator)
    centres = torch.randn(3, 20, generator=generator) * 3
    features = centres[labels] + torch.randn(300, 20, generator=generator)
    train, test = slice(0, 200), slice(200, 300)
    _, separable = probe_module.linear_probe(features[train], labels[train], features[test], labels[test], 3)
    noise = torch.randn(300, 20, generator=generator)
    _, random = probe_module.linear_probe(noise[train], labels[train], noise[test], labels[test], 3)
    assert separable >= 0.95
    assert random <= 0.6


def test_the_shapes_world_writes_probe_labels_that_match_its_captions(shapes_dir):
    for split, n in (("train", 24), ("test", 8)):
        rows = [json.loads(line) for line in (Path(shapes_dir) / f"probe_{split}.jsonl").read_text().splitlines()]
        clip = [json.loads(line) for line in (Path(shapes_dir) / f"clip_{split}.jsonl").read_text().splitlines()]
        assert len(rows) == len(clip) == n
        for row, pair in zip(rows, clip):
            assert row["image"] == pair["image"] and row["count"] == str(len(pair["labels"]))
            if pair["label"]:
                assert f"{row['colour']} {row['shape']}" == pair["label"]
                assert row["position"] in ("left", "right", "top", "bottom", "centre")
            else:
                assert row["colour"] is None and row["shape"] is None and row["position"] is None
            # Binding labels: what sits at each position is exactly the image's shapes, one per filled slot.
            at = {pos: (row[f"colour_at_{pos}"], row[f"shape_at_{pos}"]) for pos in ("left", "right", "top", "bottom", "centre")}
            filled = {pos: pair for pos, pair in at.items() if pair != (None, None)}
            assert all(None not in pair for pair in filled.values())
            assert sorted(f"{c} {s}" for c, s in filled.values()) == sorted(pair["labels"])
            if pair["label"]:
                assert list(filled) == [row["position"]]


def test_read_labels_resolves_images_and_skips_nothing_silently(probe_module, tmp_path):
    (tmp_path / "labels.jsonl").write_text('{"image": "a.png", "texture": "stripes", "count": 2}\n'
                                           '{"image": "b.png", "texture": null, "count": 1}\n')
    rows = probe_module.read_labels(tmp_path / "labels.jsonl")
    assert rows == [{"image": str(tmp_path / "a.png"), "texture": "stripes", "count": "2"},
                    {"image": str(tmp_path / "b.png"), "texture": None, "count": "1"}]
    assert probe_module.tasks_of(rows) == ["texture", "count"]
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "size": [1, 2]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: labels must be"):
        probe_module.read_labels(tmp_path / "bad.jsonl")
    (tmp_path / "noimage.jsonl").write_text('{"path": "a.png", "size": "big"}\n')
    with pytest.raises(DataError, match=r"noimage.jsonl:1: a row needs an \"image\""):
        probe_module.read_labels(tmp_path / "noimage.jsonl")


def test_probe_a_vlm_folder_end_to_end(probe_module, tiny_vlm, shapes_dir, tmp_path):
    model, processor = tiny_vlm
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "probe.json"
    assert probe_module.main([str(tmp_path / "model"), "--data", shapes_dir, "--toy", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    tasks = set(report["tasks"])
    assert {"colour", "shape", "position", "count"} <= tasks
    assert tasks - {"colour", "shape", "position", "count"} <= {f"{attribute}_at_{position}" for attribute in ("shape", "colour")
                                                             for position in ("left", "right", "top", "bottom", "centre")}
    tokens = processor.image_seq_length
    assert report["feature_shapes"] == {"tower": 16 * 48, "connector": tokens * model.config.text_config.hidden_size}
    assert report["tasks"]["count"]["n_train"] == 24  # every image has a count
    words = model.get_input_embeddings().weight.detach().norm(dim=-1).mean().item()
    stats = report["image_tokens"]
    assert stats["images"] == 16 and stats["word_norm"] == pytest.approx(words, abs=1e-3)
    assert stats["token_norm"] > 0 and -1.0 <= stats["cosine_between_images"] <= 1.0
    assert report["tasks"]["colour"]["n_train"] == report["tasks"]["shape"]["n_train"] < 24  # single-shape only
    for row in report["tasks"].values():
        for source in ("tower", "connector"):
            assert 0.0 <= row[source]["test"] <= 1.0 and 0.0 <= row[source]["train"] <= 1.0
        assert 0.0 < row["chance"] <= 1.0


def test_image_token_stats_tell_a_collapsed_connector_from_a_varied_one(probe_module):
    shared = torch.randn(1, 2, 8)
    same = probe_module.image_token_stats(3.0 * shared.repeat(5, 1, 1), word_norm=1.5)
    assert same["cosine_between_images"] == pytest.approx(1.0, abs=1e-3) and same["images"] == 5
    assert same["token_norm"] == pytest.approx(3.0 * shared.norm(dim=-1).mean().item(), rel=1e-3)
    assert same["word_norm"] == 1.5
    one_hot = torch.eye(4).unsqueeze(1)  # 4 images, 1 token each, mutually orthogonal
    assert probe_module.image_token_stats(one_hot, word_norm=1.0)["cosine_between_images"] == pytest.approx(0.0)


def test_probe_a_clip_folder_has_only_the_tower(probe_module, tiny_clip_dir, shapes_dir, tmp_path, capsys):
    assert probe_module.main([tiny_clip_dir, "--data", shapes_dir, "--toy", "--layer", "-1"]) == 0
    table = capsys.readouterr().out
    assert "tower (768 features)" in table and "connector" not in table and "| shape | " in table
    assert "Image tokens" not in table


def test_probe_errors_are_one_line(probe_module, tmp_path, tiny_clip_dir, capsys):
    assert probe_module.main([tiny_clip_dir, "--data", str(tmp_path), "--toy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "probe labels file not found" in err[0]


def test_bench_probe_is_the_packaged_command_line(tiny_clip_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_probe", REPO / "bench" / "probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main is vlkit.probe.main
    assert module.main([tiny_clip_dir, "--data", str(tmp_path), "--toy"]) == 2
    assert "probe labels file not found" in capsys.readouterr().err
