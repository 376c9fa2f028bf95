"""Loaders for LLaVA JSON, ShareGPT (LLaMA-Factory) and CLIP pairs, and the collator, on real files."""

from __future__ import annotations

import pytest
import torch
from data_helpers import FakeProcessor, llava_sample, write_json, write_png

from vlkit.data import (
    ConversationDataset,
    VlkitCollator,
    detect_format,
    load_clip_pairs,
    load_conversations,
)
from vlkit.errors import DataError


@pytest.fixture(autouse=True)
def data_hf_cache(monkeypatch, tmp_path_factory):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "data_hf_cache")


def test_llava_marker_at_start_end_absent_and_text_only(tmp_path):
    rows = [
        llava_sample("start", "a.png", "<image>\nWhat colour?"),
        llava_sample("end", "a.png", "What colour?\n<image>"),
        llava_sample("absent", "a.png", "What colour?"),
        llava_sample("text", None, "Say hi.", "hi"),
        {"id": 17, "image": "b.png", "conversations": [
            {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi <image>"},
            {"from": "gpt", "value": "red"}, {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}],
         "qa": [{"type": "colour", "answer": "red"}, {"type": "existence", "answer": "yes"}]},
    ]
    samples = load_conversations(write_json(tmp_path / "llava.json", rows))
    assert samples.column_names[:3] == ["id", "images", "messages"] and "qa" in samples.column_names
    by_id = {s["id"]: s for s in samples}
    assert by_id["start"]["messages"][0] == {"role": "user", "content": "<image>\nWhat colour?"}
    assert by_id["end"]["messages"][0]["content"] == "What colour?\n<image>"
    assert by_id["absent"]["messages"][0]["content"] == "<image>\nWhat colour?"  # LLaVA's convention
    assert by_id["text"]["images"] == [] and "<image>" not in by_id["text"]["messages"][0]["content"]
    assert [m["role"] for m in by_id["17"]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert by_id["17"]["qa"][1] == {"type": "existence", "answer": "yes"}
    assert by_id["start"]["images"] == ["a.png"]


def test_llava_mixed_image_types_and_missing_ids(tmp_path):
    rows = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        {"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image><image>"},
                                                         {"from": "gpt", "value": "y"}]},
    ]
    samples = load_conversations(write_json(tmp_path / "mixed.json", rows), format="llava")
    assert samples["id"] == ["0", "1"]
    assert samples["images"] == [["a.png"], ["a.png", "b.png"]]


def test_sharegpt_as_llama_factory_writes_it(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "<image>Compare with <image>."},
                      {"role": "assistant", "content": "Same."}],
         "images": ["imgs/1.png", "imgs/2.png"]},
        {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"},
                      {"role": "assistant", "content": "hi"}], "images": []},
    ]
    path = write_json(tmp_path / "mllm_demo.json", rows)
    assert detect_format(path) == "sharegpt"
    samples = load_conversations(path)
    assert samples[0]["images"] == ["imgs/1.png", "imgs/2.png"]
    assert samples[0]["messages"][0]["content"].count("<image>") == 2
    assert samples[1]["images"] == [] and samples[1]["messages"][0]["role"] == "system"
    # LLaMA-Factory's other ShareGPT flavour: conversations/from/value with an images list.
    flavour = [{"conversations": [{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "yo"}],
                "images": ["x.png"]}]
    other = load_conversations(write_json(tmp_path / "sharegpt2.json", flavour))
    assert other[0]["messages"] == [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}]
    assert other[0]["images"] == ["x.png"]


def test_clip_pairs_jsonl_and_csv_with_configurable_columns(tmp_path):
    jsonl = write_json(tmp_path / "pairs.jsonl", [{"image": "a.png", "caption": "a red circle", "label": "red circle"},
                                                   {"image": "b.png", "caption": "a blue star", "label": None}])
    pairs = load_clip_pairs(jsonl)
    assert pairs["id"] == ["0", "1"] and pairs["caption"] == ["a red circle", "a blue star"]
    assert pairs["label"] == ["red circle", None]
    assert detect_format(jsonl) == "clip"
    csv = tmp_path / "pairs.csv"
    csv.write_text("filepath,title,id\nimgs/a.png,\"a cat, sleeping\",7\nimgs/b.png,a dog,8\n")
    pairs = load_clip_pairs(csv, image_column="filepath", caption_column="title")
    assert pairs["image"] == ["imgs/a.png", "imgs/b.png"]
    assert pairs["caption"] == ["a cat, sleeping", "a dog"] and pairs["id"] == ["7", "8"]
    assert pairs["filepath"] == pairs["image"]  # the file's own columns stay, under their own names
    with pytest.raises(DataError, match="caption_column"):
        load_clip_pairs(csv, image_column="filepath")


def test_clip_pairs_with_several_captions_per_image(tmp_path):
    rows = [{"file": "a.png", "captions": ["a red circle", "a round red shape"]}, {"file": "b.png", "captions": []}]
    pairs = load_clip_pairs(write_json(tmp_path / "multi.jsonl", rows), image_column="file", caption_column="captions")
    assert pairs["caption"] == [["a red circle", "a round red shape"], []]
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png")
    from transformers import CLIPImageProcessorPil

    from vlkit.clip.data import ClipPairDataset

    dataset = ClipPairDataset(pairs, tmp_path, CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}, image_mean=[0, 0, 0], image_std=[1, 1, 1]))
    assert dataset.skipped == {"empty_caption": 1} and dataset[0]["caption"] in ("a red circle", "a round red shape")


def test_unreadable_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_conversations(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1, "conversations": [')
    with pytest.raises(DataError, match="cannot read"):
        load_conversations(broken, format="llava")
    pairs = write_json(tmp_path / "pairs.jsonl", [{"image": "a.png", "caption": "c"}])
    with pytest.raises(DataError, match="conversations"):
        load_conversations(pairs, format="llava")
    for name, text in (("empty.json", "[ ]\n"), ("blank.jsonl", "\n\n"), ("object.json", "{}")):  # no samples, not a syntax error
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=f"{name} holds no samples"):
            load_conversations(tmp_path / name)


def test_loading_is_cached_by_datasets(tmp_path):
    path = write_json(tmp_path / "llava.json", [llava_sample(str(i), "a.png") for i in range(5)])
    first = load_conversations(path)
    second = load_conversations(path)
    assert first.cache_files and first.cache_files == second.cache_files
    assert first.to_list() == second.to_list()


def test_collator_pads_and_concatenates_images():
    collate = VlkitCollator(pad_token_id=0)
    items = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "pixel_values": torch.ones(2, 3, 4, 4)},
        {"input_ids": [5], "labels": [5], "pixel_values": None},  # text-only
        {"input_ids": [8, 9], "labels": [-100, 9], "pixel_values": torch.zeros(1, 3, 4, 4)},
    ]
    batch = collate(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0], [8, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["pixel_values"].shape == (3, 3, 4, 4) and batch["pixel_values"][2].sum() == 0
    left = VlkitCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)(items[:2])
    assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 5]]
    assert "pixel_values" not in VlkitCollator(0)([items[1]])


def test_dataset_and_collator_on_a_real_file(tmp_path):
    write_png(tmp_path / "imgs" / "red.png", (255, 0, 0))
    write_png(tmp_path / "imgs" / "blue.png", (0, 0, 255))
    rows = [llava_sample("r", "imgs/red.png"), llava_sample("t", None, "Hi", "hello there"),
            {"id": "two", "messages": [{"role": "user", "content": "<image> vs <image>"},
                                       {"role": "assistant", "content": "red blue"}],
             "images": ["imgs/red.png", "imgs/blue.png"]}]
    dataset = ConversationDataset(load_conversations(write_json(tmp_path / "d.json", rows), format="llava"),
                                  FakeProcessor(), image_root=tmp_path)
    batch = VlkitCollator(0)([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 1, 1)
    assert batch["pixel_values"][:, :, 0, 0].tolist() == [[255, 0, 0], [255, 0, 0], [0, 0, 255]]
    assert int((batch["input_ids"] == FakeProcessor.image_token_id).sum()) == 3 * FakeProcessor.image_seq_length


def test_images_processed_per_batch_equal_the_per_image_path(tmp_path, tiny_vlm, monkeypatch):
    """defer_images + one processor call in the collator == pixel_values per sample, packed or padded."""
    import pickle

    from conftest import random_image

    _, processor = tiny_vlm
    for seed, size in enumerate((20, 40, 57, 33)):  # sizes that resize and crop differently
        random_image(seed, size).save(tmp_path / f"{seed}.png")

    def sample(sample_id: str, images: list[int], answer: str) -> dict:
        return {"id": sample_id, "images": [f"{i}.png" for i in images],
                "messages": [{"role": "user", "content": "<image>\n" * len(images) + "What is shown?"},
                             {"role": "assistant", "content": answer}]}

    samples = [sample("one", [0], "red"), sample("text", [], "a long answer with many words " * 3),
               sample("two", [1, 2], "blue and green"), sample("short", [], "hi"),
               sample("three", [3, 0, 2], "many shapes here")]
    per_image = ConversationDataset(samples, processor, tmp_path)
    deferred = ConversationDataset(samples, processor, tmp_path, defer_images=True)
    items = [deferred[i] for i in range(len(deferred))]
    assert items[0]["pixel_values"] is None and len(items[0]["images"]) == 1 and "images" not in items[1]
    assert pickle.loads(pickle.dumps(items[4]))["images"][2].tobytes() == items[4]["images"][2].tobytes()  # workers
    with pytest.raises(ValueError, match="processor"):
        VlkitCollator(0)(items)

    calls = []
    encode_images = processor.encode_images
    monkeypatch.setattr(processor, "encode_images", lambda images: calls.append(len(images)) or encode_images(images))
    pad = processor.tokenizer.pad_token_id
    batches = {}
    for pack in (False, True):
        expected = VlkitCollator(pad, pack=pack)([per_image[i] for i in range(len(per_image))])
        calls.clear()
        batches[pack] = batch = VlkitCollator(pad, pack=pack, processor=processor)(items)
        assert calls == [6]  # every image of the batch in one call
        assert batch.keys() == expected.keys() and batch["pixel_values"].shape[0] == 6
        assert torch.allclose(batch["pixel_values"], expected["pixel_values"], atol=1e-6)
        for key in batch.keys() - {"pixel_values", "use_cache"}:
            assert torch.equal(batch[key], expected[key]), key
    assert not torch.allclose(batches[True]["pixel_values"], batches[False]["pixel_values"])  # packing reordered
