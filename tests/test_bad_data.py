"""What bad data gets during training: skipped and counted (or an error naming it), never a crash."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import (
    FakeProcessor,
    llava_sample,
    write_cmyk_jpeg,
    write_json,
    write_png,
    write_truncated_png,
)
from PIL import Image

from vlkit.clip.data import ClipPairDataset
from vlkit.data import ConversationDataset, VlkitCollator, load_conversations, load_image
from vlkit.errors import DataError, ImageError


@pytest.fixture(autouse=True)
def data_hf_cache(monkeypatch, tmp_path_factory):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "data_hf_cache")


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "root"
    for name, colour in (("good0", (255, 0, 0)), ("good1", (0, 255, 0)), ("good2", (0, 0, 255))):
        write_png(root / f"{name}.png", colour)
    return root


def _dataset(root, samples, **kwargs):
    return ConversationDataset(
        load_conversations(write_json(root.parent / "data.json", samples), format="llava"), FakeProcessor(), root,
        **kwargs,
    )


def _colour(item):
    return item["pixel_values"][0, :, 0, 0].tolist()


def test_truncated_png_is_skipped_at_load_time_and_replaced_deterministically(data_root):
    write_truncated_png(data_root / "truncated.png")
    dataset = _dataset(data_root, [llava_sample("a", "good0.png"), llava_sample("bad", "truncated.png"),
                                   llava_sample("c", "good2.png")])
    assert len(dataset) == 3  # the file exists and is not empty: only decoding finds it
    item = dataset[1]
    assert item["id"] == "c" and _colour(item) == [0, 0, 255]  # the next good sample, every time
    assert dataset[1]["id"] == "c"
    assert dataset.skipped == {"corrupt_image": 1}
    assert dataset.skipped_ids == {"corrupt_image": ["bad"]}
    assert "corrupt_image=1 (ids: bad)" in dataset.summary()


def test_zero_byte_missing_and_escaping_paths_are_dropped_up_front(data_root, tmp_path):
    (data_root / "empty.png").write_bytes(b"")
    outside = write_png(tmp_path / "outside.png")
    samples = [
        llava_sample("ok", "good0.png"),
        llava_sample("zero", "empty.png"),
        llava_sample("missing", "nope/never.png"),
        llava_sample("dotdot", "../outside.png"),
        llava_sample("absolute", str(outside)),
    ]
    elsewhere = tmp_path / "big_disk"
    write_png(elsewhere / "linked.png")
    (data_root / "linked").symlink_to(elsewhere)  # a folder linked in under the root: the user's own layout
    samples.append(llava_sample("via-link", "linked/linked.png"))
    dataset = _dataset(data_root, samples)
    assert sorted(dataset.samples["id"]) == ["ok", "via-link"]
    assert dataset.skipped == {"missing_image": 1, "empty_image": 1, "image_outside_root": 2}
    assert dataset.skipped_ids["image_outside_root"] == ["dotdot", "absolute"]
    allowed = _dataset(data_root, samples, allow_images_outside_root=True)
    assert sorted(allowed.samples["id"]) == ["absolute", "dotdot", "ok", "via-link"]
    assert _colour(allowed[1]) == [200, 30, 30]


def test_image_marker_mismatch_empty_and_unusable_conversations(data_root):
    samples = [
        llava_sample("two_markers", "good0.png", "<image> and <image>"),
        llava_sample("marker_no_image", None, "<image> what?"),
        {"id": "empty", "conversations": []},
        llava_sample("no_answer", "good0.png", answer="  "),
        {"id": "tool", "conversations": [{"from": "observation", "value": "x"}, {"from": "gpt", "value": "y"}]},
        llava_sample("fine", "good1.png"),
    ]
    dataset = _dataset(data_root, samples)
    assert dataset.samples["id"] == ["fine"]
    assert dataset.skipped == {"image_token_mismatch": 2, "empty_conversation": 1, "no_assistant_turn": 1,
                               "bad_role": 1}


def test_over_long_sample_is_dropped_only_when_truncation_would_cut_image_tokens(data_root):
    long_answer = " ".join(["word"] * 30)
    samples = [
        llava_sample("image_at_end", "good0.png", "describe " * 20 + "<image>", "short"),
        llava_sample("text_only_long", None, "hi", long_answer),  # truncated, still has labels
        llava_sample("answer_cut_away", None, "question " * 30, "answer"),
        llava_sample("fits", "good1.png"),
    ]
    dataset = _dataset(data_root, samples, max_length=16)
    assert sorted(dataset.samples["id"]) == ["fits", "text_only_long"]
    assert dataset.skipped == {"too_long": 2}
    assert all(len(dataset[i]["input_ids"]) <= 16 for i in range(len(dataset)))
    with pytest.raises(DataError, match="'image_at_end'.*too_long"):
        _dataset(data_root, samples, max_length=16, on_bad_sample="error")


def test_error_mode_names_the_sample_and_reason(data_root):
    with pytest.raises(DataError, match="sample 'gone' is unusable \\(missing_image\\)"):
        _dataset(data_root, [llava_sample("ok", "good0.png"), llava_sample("gone", "gone.png")], on_bad_sample="error")
    write_truncated_png(data_root / "truncated.png")
    dataset = _dataset(data_root, [llava_sample("ok", "good0.png"), llava_sample("broken", "truncated.png")],
                       on_bad_sample="error")
    assert dataset[0]["id"] == "ok"
    with pytest.raises(DataError, match="sample 'broken' is unusable \\(corrupt_image\\).*truncated"):
        dataset[1]


def test_never_yields_a_sample_whose_labels_are_all_masked(data_root):
    class MasksEverything(FakeProcessor):
        def encode_text(self, messages, num_images, max_length=None):
            encoded = super().encode_text(messages, num_images, max_length)
            if "mask me" in messages[0]["content"]:
                encoded["labels"] = [-100] * len(encoded["labels"])
            return encoded

    samples = [llava_sample("masked", "good0.png", "<image> mask me"), llava_sample("ok", "good1.png")]
    dataset = ConversationDataset(load_conversations(write_json(data_root.parent / "m.json", samples)),
                                  MasksEverything(), data_root)
    items = [dataset[i] for i in range(len(dataset))]
    assert [item["id"] for item in items] == ["ok"]  # dropped up front, with the text encoding
    assert all((item["labels"] != -100).any() for item in items)
    assert dataset.skipped == {"unusable": 1} and dataset.skipped_ids == {"unusable": ["masked"]}


def test_all_bad_is_an_error_not_an_empty_epoch(data_root):
    with pytest.raises(DataError, match="no usable samples.*missing_image=2"):
        _dataset(data_root, [llava_sample("a", "x.png"), llava_sample("b", "y.png")])
    (data_root / "junk.png").write_bytes(b"not an image at all")
    dataset = _dataset(data_root, [llava_sample("junk", "junk.png")])
    with pytest.raises(DataError, match="unusable.*corrupt_image.*vlkit data validate"):
        dataset[0]


def test_counts_from_dataloader_workers_reach_the_main_process(data_root):
    write_truncated_png(data_root / "t1.png")
    (data_root / "t2.png").write_bytes(b"GIF89a garbage")
    samples = [llava_sample(f"ok{i}", f"good{i % 3}.png") for i in range(6)]
    samples[2], samples[4] = llava_sample("bad1", "t1.png"), llava_sample("bad2", "t2.png")
    dataset = _dataset(data_root, samples)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=VlkitCollator(0))
    batches = list(loader)
    assert sum(len(b["input_ids"]) for b in batches) == 6
    assert dataset.skipped == {"corrupt_image": 2}
    assert dataset.skipped_ids == {"corrupt_image": ["bad1", "bad2"]}


@pytest.mark.parametrize(
    "name, make",
    [
        ("rgba.png", lambda p: Image.new("RGBA", (8, 8), (255, 0, 0, 255)).save(p)),
        ("palette.png", lambda p: Image.new("RGB", (8, 8), (255, 0, 0)).convert("P").save(p)),
        ("grey.png", lambda p: Image.new("L", (8, 8), 76).save(p)),
        ("sixteen.png", lambda p: Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(p)),
        ("cmyk.jpg", lambda p: write_cmyk_jpeg(p, size=8)),
        ("animated.gif", lambda p: Image.new("RGB", (8, 8), (255, 0, 0)).save(
            p, save_all=True, append_images=[Image.new("RGB", (8, 8), (0, 0, 255))])),
    ],
)
def test_odd_image_modes_decode_to_rgb(tmp_path, name, make):
    make(tmp_path / name)
    image = load_image(name, tmp_path)
    assert image.mode == "RGB" and image.size == (8, 8)
    red, green, blue = np.asarray(image, dtype=int).reshape(-1, 3).mean(axis=0)
    if name == "grey.png":
        assert red == green == blue == 76
    elif name == "sixteen.png":
        assert red == green == blue == 255  # 16-bit white stays white (scaled by bit depth, not stretched)
    else:
        assert red > 200 and green < 40 and blue < 40  # CMYK red stays red; the GIF's first frame


def test_cmyk_jpeg_trains_like_any_image(data_root):
    write_cmyk_jpeg(data_root / "cmyk.jpg")
    dataset = _dataset(data_root, [llava_sample("cmyk", "cmyk.jpg")])
    red, green, blue = _colour(dataset[0])
    assert dataset.skipped == {} and red > 200 and green < 40 and blue < 40


def test_decompression_bomb_guard_is_on(tmp_path, monkeypatch):
    write_png(tmp_path / "big.png", size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # the file is > 2x the limit: refused
    with pytest.raises(ImageError, match="too large"):
        load_image("big.png", tmp_path)


def test_caption_pairs_skip_the_same_way(data_root):
    write_truncated_png(data_root / "t.png")
    pairs = [{"id": "a", "image": "good0.png", "caption": "red"}, {"id": "b", "image": "t.png", "caption": "x"},
             {"id": "c", "image": "good1.png", "caption": ""}, {"id": "d", "image": "../../etc/passwd", "caption": "y"}]
    from transformers import CLIPImageProcessorPil

    dataset = ClipPairDataset(pairs, data_root, CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}, image_mean=[0, 0, 0], image_std=[1, 1, 1]))
    assert dataset.samples["id"] == ["a", "b"]
    assert [dataset[i]["id"] for i in range(2)] == ["a", "a"]
    assert dataset.skipped == {"corrupt_image": 1, "image_outside_root": 1, "empty_caption": 1}


def test_real_processor_drops_what_would_cut_image_tokens(data_root, tiny_vlm):
    model, processor = tiny_vlm
    samples = [
        llava_sample("fits", "good0.png", "<image>\nWhat colour is the shape?", "red"),
        llava_sample("image_at_end", "good1.png", "describe this please " * 40 + "<image>", "green"),
        llava_sample("missing", "missing.png"),
    ]
    conversations = load_conversations(write_json(data_root.parent / "real.json", samples))
    dataset = ConversationDataset(conversations, processor, data_root, max_length=96)
    assert dataset.samples["id"] == ["fits"]
    assert dataset.skipped == {"missing_image": 1, "too_long": 1}
    batch = VlkitCollator(processor.tokenizer.pad_token_id)([dataset[0], dataset[0]])
    assert batch["pixel_values"].shape[0] == 2
    assert torch.isfinite(model(**batch).loss)
