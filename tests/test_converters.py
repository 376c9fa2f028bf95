"""Converters: COCO captions -> CLIP JSONL / LLaVA align JSON, ShareGPT <-> LLaVA; outputs load in vlkit."""

from __future__ import annotations

import json

import pytest
from data_helpers import FakeProcessor, write_json, write_png

from data_tools import convert
from vlkit.clip.data import ClipPairDataset
from vlkit.data import ConversationDataset, load_clip_pairs, load_conversations


@pytest.fixture(autouse=True)
def data_hf_cache(monkeypatch, tmp_path_factory):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "data_hf_cache")


@pytest.fixture
def data_coco(tmp_path):
    write_png(tmp_path / "train2017" / "000000000009.jpg", (255, 0, 0))
    write_png(tmp_path / "train2017" / "000000000025.jpg", (0, 0, 255))
    coco = {
        "info": {}, "licenses": [],
        "images": [{"id": 9, "file_name": "000000000009.jpg", "height": 16, "width": 16},
                   {"id": 25, "file_name": "000000000025.jpg", "height": 16, "width": 16},
                   {"id": 30, "file_name": "no_captions.jpg", "height": 16, "width": 16}],
        "annotations": [{"id": 101, "image_id": 9, "caption": "A red square. "},
                        {"id": 102, "image_id": 9, "caption": "Something red."},
                        {"id": 201, "image_id": 25, "caption": "A blue square."},
                        {"id": 202, "image_id": 25, "caption": "   "}],
    }
    return write_json(tmp_path / "captions_train2017.json", coco)


def test_coco_to_clip_jsonl(data_coco, tmp_path):
    out = tmp_path / "clip.jsonl"
    assert convert.main(["coco-clip", str(data_coco), str(out), "--image-prefix", "train2017"]) == 0
    pairs = load_clip_pairs(out)
    assert pairs["id"] == ["101", "102", "201"]
    assert pairs["caption"] == ["A red square.", "Something red.", "A blue square."]
    assert pairs["image"][0] == "train2017/000000000009.jpg" and pairs["image_id"] == ["9", "9", "25"]
    from transformers import CLIPImageProcessorPil

    dataset = ClipPairDataset(pairs, tmp_path, CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}, image_mean=[0, 0, 0], image_std=[1, 1, 1]))
    red, _, blue = (dataset[2]["pixel_values"][:, 0, 0] * 255).tolist()  # a JPEG: close to pure blue
    assert dataset.skipped == {} and red < 10 and blue > 240


def test_coco_to_llava_align(data_coco, tmp_path):
    out = tmp_path / "align.json"
    assert convert.coco_to_llava_align(data_coco, out, image_prefix="train2017") == 2
    samples = load_conversations(out)
    assert samples["id"] == ["9", "25"]
    assert samples[0]["messages"][0]["content"].startswith("<image>\n")
    assert samples[0]["messages"][1] == {"role": "assistant", "content": "A red square."}
    dataset = ConversationDataset(samples, FakeProcessor(), image_root=tmp_path)
    assert len(dataset) == 2 and dataset.skipped == {}
    assert convert.coco_to_llava_align(data_coco, out, image_prefix="train2017", all_captions=True) == 3


def test_sharegpt_to_llava_and_back(tmp_path):
    sharegpt = [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "<image>Compare with <image>"},
                      {"role": "assistant", "content": "Both red."}],
         "images": ["a.png", "b.png"], "source": "demo"},
        {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A cat."}],
         "images": ["c.png"]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], "images": []},
    ]
    source = write_json(tmp_path / "sharegpt.json", sharegpt)
    llava_path = tmp_path / "llava.json"
    assert convert.main(["sharegpt-to-llava", str(source), str(llava_path)]) == 0
    llava = json.loads(llava_path.read_text())
    assert llava[1]["image"] == "c.png" and llava[0]["image"] == ["a.png", "b.png"] and "image" not in llava[2]
    assert llava[1]["conversations"][0] == {"from": "human", "value": "<image>What?"}
    assert llava[0]["source"] == "demo"
    back = tmp_path / "back.json"
    assert convert.llava_to_sharegpt(llava_path, back) == 3
    direct = load_conversations(source).to_list()
    assert load_conversations(llava_path).to_list() == load_conversations(back).to_list() == direct


def test_llava_to_sharegpt_makes_the_implicit_image_explicit(tmp_path):
    llava = [{"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "Describe."},
                                                              {"from": "gpt", "value": "A dog."}]}]
    out = tmp_path / "sharegpt.json"
    convert.llava_to_sharegpt(write_json(tmp_path / "llava.json", llava), out)
    row = json.loads(out.read_text())[0]
    assert row == {"id": "x", "messages": [{"role": "user", "content": "<image>\nDescribe."},
                                           {"role": "assistant", "content": "A dog."}], "images": ["a.png"]}


def test_not_a_coco_file_is_one_line_error(tmp_path, capsys):
    bad = write_json(tmp_path / "x.json", [{"a": 1}])
    assert convert.main(["coco-clip", str(bad), str(tmp_path / "o.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("error: not a COCO captions file")
