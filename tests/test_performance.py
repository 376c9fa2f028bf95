"""Equality tests for vlkit's optimised paths: each gives the loss and gradients of the plain path.

Cached vision features (vs the tower run every step), packed and differently padded batches (vs
one padded batch), the optimizer and gradient buffers of frozen parts (none at all), and
generation from precomputed features (vs pixels). Speed is measured in bench/, not here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import HANG_GUARD_S, random_image
from train_helpers import REPO, align_recipe, write_recipe
from transformers.masking_utils import find_packed_sequence_indices

from vlkit import build_vlm, per_sample_sdpa
from vlkit.compat import attention_implementation, cache_argument, cache_keyword, set_attention_implementation
from vlkit.config import TuneSection
from vlkit.data import ConversationDataset, VlkitCollator
from vlkit.data.images import load_image
from vlkit.data.packing import collator_packing, pack_rows, packing_supported, use_per_sample_sdpa
from vlkit.data.prefix import shared_prefix_length
from vlkit.errors import ConfigError
from vlkit.features import (
    FeatureStore,
    cache_features_for,
    caches_vision_features,
    image_hash,
    precompute_features,
    tower_features,
    tower_key,
)
from vlkit.modeling import packed_sample_lengths
from vlkit.per_sample_sdpa import PER_SAMPLE_SDPA
from vlkit.recipe import load_recipe
from vlkit.train.stages import apply_adapters, set_trainable

CONVERSATIONS = [
    ("<image>\nCompare these.\n<image>", "Both are red circles on the left, one small and one large, next to a "
     "blue square at the top and a green star at the bottom.", 2),
    ("<image>\nWhat shape?", "A star.", 1),
    ("Say hi.", "Hi!", 0),
    ("<image>\nWhere is the small square?", "At the top.", 1),
]


@pytest.fixture()
def vlm(tiny_vision_dir, tiny_llm_dir):
    """A fresh (model, processor) per test: these tests change what trains."""
    torch.manual_seed(7)
    model, processor = build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, connector={"type": "mlp", "depth": 2})
    set_trainable(model, TuneSection())
    assert model.use_loss_at_labels()  # as training does
    return model, processor


@pytest.fixture()
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(5):
        random_image(100 + index).save(folder / f"{index}.png")
    random_image(100).save(folder / "copy_of_0.png")  # same bytes under another name
    return folder


def samples(names=("0", "1", "2", "copy_of_0")) -> list[dict]:
    """Conversations whose images are the given files, in order."""
    names = iter(names)
    out = []
    for index, (question, answer, n_images) in enumerate(CONVERSATIONS):
        out.append({
            "id": f"s{index}",
            "images": [f"{next(names)}.png" for _ in range(n_images)],
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        })
    return out


def loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(first, second, atol=1e-6):
    (loss_a, grads_a), (loss_b, grads_b) = first, second
    assert torch.allclose(loss_a, loss_b, atol=atol), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=atol), name
        assert grads_a[name].abs().sum() > 0, name


# --- 1. frozen vision features, cached -----------------------------------------------------------------
def test_cached_features_give_the_same_loss_and_connector_grads(vlm, image_dir, tmp_path):
    model, processor = vlm
    dataset = ConversationDataset(samples(), processor, image_dir)
    collator = VlkitCollator(processor.tokenizer.pad_token_id)
    plain = collator([dataset[i] for i in range(len(dataset))])
    assert "pixel_values" in plain and "vision_features" not in plain

    cached = cache_features_for(model, processor.image_processor, [dataset], home=tmp_path, progress=False)
    assert (cached.computed, cached.reused) == (3, 0)  # 4 images, 3 distinct contents
    assert len(cached.store) == 3 and cached.store.root.parent == tmp_path / "features"
    batch = collator([dataset[i] for i in range(len(dataset))])
    assert "pixel_values" not in batch and batch["vision_features"].shape[0] == 4
    assert torch.equal(batch["input_ids"], plain["input_ids"])

    tower_calls = []
    hook = model.vision_tower.register_forward_hook(lambda *args: tower_calls.append(1))
    try:
        fast = loss_and_grads(model, batch)
        assert not tower_calls  # the tower did not run
        slow = loss_and_grads(model, plain)
        assert tower_calls
    finally:
        hook.remove()
    assert_same(slow, fast)

    again = cache_features_for(model, processor.image_processor, [dataset], home=tmp_path, progress=False)
    assert (again.computed, again.reused) == (0, 3)  # a later run computes nothing


def test_feature_store_keys_and_failures(vlm, image_dir, tmp_path, monkeypatch):
    model, processor = vlm
    tower, image_processor = model.vision_tower, processor.image_processor
    key = tower_key(tower, image_processor, -2, "default", 1)
    assert key == tower_key(tower, image_processor, -2, "default", 1)
    assert len({key, tower_key(tower, image_processor, -1, "default", 1),
                tower_key(tower, image_processor, -2, "full", 1)}) == 3
    with torch.no_grad():
        next(tower.parameters()).view(-1)[0] += 1.0  # other weights, other features
        changed = tower_key(tower, image_processor, -2, "default", 1)
        next(tower.parameters()).view(-1)[0] -= 1.0
    assert changed != key
    with monkeypatch.context() as patch:  # features stored by older feature code are not read
        patch.setattr("vlkit.features.FEATURES_FORMAT", 2)
        assert tower_key(tower, image_processor, -2, "default", 1) != key

    (image_dir / "broken.png").write_bytes(b"not a png")
    paths = [image_dir / "0.png", image_dir / "copy_of_0.png", image_dir / "broken.png", image_dir / "missing.png"]
    store = FeatureStore.for_tower(key, tmp_path)
    cached = precompute_features(store, paths, tower, image_processor, -2, "default", 1, batch_size=2, progress=False)
    assert cached.computed == 1 and image_hash(paths[0]) == image_hash(paths[1])
    assert cached.failed[str(paths[2])][0] == "corrupt_image" and cached.failed[str(paths[3])][0] == "missing_image"
    assert cached.lookup(paths[:2]).shape == (2, 16, 48)
    assert not list(store.root.rglob(".*"))  # no staging files left behind
    with torch.no_grad():
        pixel_values = image_processor([random_image(100)], return_tensors="pt")["pixel_values"]
        expected = model.get_vision_features(pixel_values)[0]
        assert torch.allclose(tower_features(tower, pixel_values, -2, "default", 1)[0], expected)
    assert torch.allclose(store.load(image_hash(paths[0])), expected, atol=1e-6)


def test_dataset_skips_a_sample_whose_image_has_no_features(vlm, image_dir, tmp_path):
    model, processor = vlm
    dataset = ConversationDataset(samples(), processor, image_dir)
    cache_features_for(model, processor.image_processor, [dataset], home=tmp_path, progress=False)
    dataset.vision_features.hashes.clear()  # as if the files were never seen
    assert [dataset[i]["id"] for i in range(4)] == ["s2"] * 4  # bad samples are replaced by the next good one
    assert dataset.skipped == {"corrupt_image": 3}


def test_precompute_features_command(vlm, image_dir, tmp_path, tiny_vision_dir):
    model, processor = vlm
    data = tmp_path / "data.json"
    data.write_text(json.dumps([
        {"id": "a", "image": "0.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                         {"from": "gpt", "value": "Yo"}]},
        {"id": "b", "image": "copy_of_0.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                                 {"from": "gpt", "value": "Yo"}]},
        {"id": "c", "image": "3.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                         {"from": "gpt", "value": "Yo"}]},
    ]))
    env = {**os.environ, "VLKIT_HOME": str(tmp_path / "home")}
    result = subprocess.run(
        [sys.executable, "-m", "data_tools.precompute_features", str(data), "--images", str(image_dir),
         "--vision", tiny_vision_dir],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr
    assert "2 computed, 0 reused" in result.stdout
    key = tower_key(model.vision_tower, processor.image_processor, -2, "default", 1)
    store = FeatureStore.for_tower(key, tmp_path / "home")
    assert len(store) == 2  # the training run's key: it will reuse these
    with torch.no_grad():
        pixel_values = processor.image_processor([random_image(103)], return_tensors="pt")["pixel_values"]
        expected = model.get_vision_features(pixel_values)[0]
    assert torch.allclose(store.load(image_hash(image_dir / "3.png")), expected, atol=1e-6)


def test_recipe_switch_defaults_and_errors(tmp_path, shapes_dir, tiny_vision_dir, tiny_llm_dir):
    from vlkit.train.run import plan_run

    tree = align_recipe(tmp_path / "out", tiny_vision_dir, tiny_llm_dir, shapes_dir)
    recipe = load_recipe(write_recipe(tmp_path / "a.yaml", tree))
    assert recipe.data.packing and caches_vision_features(recipe)
    tree["stage"] = "instruct"
    tree["tune"] = {"llm": "lora"}
    assert not caches_vision_features(load_recipe(write_recipe(tmp_path / "b.yaml", tree)))
    tree["data"]["cache_vision_features"] = True
    assert caches_vision_features(load_recipe(write_recipe(tmp_path / "c.yaml", tree)))
    tree["tune"]["vision"] = "lora"
    with pytest.raises(ConfigError, match="frozen vision tower"):
        plan_run(load_recipe(write_recipe(tmp_path / "d.yaml", tree)))


def test_flat_packing_and_flex_attention_are_refused_where_they_cannot_pay_or_run(tmp_path, shapes_dir,
                                                                                 tiny_vision_dir, tiny_llm_dir):
    from vlkit.train.run import plan_run

    tree = align_recipe(tmp_path / "out", tiny_vision_dir, tiny_llm_dir, shapes_dir)
    tree["data"]["packing"] = "flat"
    assert load_recipe(write_recipe(tmp_path / "a.yaml", tree)).data.packing == "flat"  # sdpa, run per sample
    tree["model"] = {**tree.get("model", {}), "attn_implementation": "eager"}
    with pytest.raises(ConfigError, match="flat needs model.attn_implementation: sdpa .* or flex_attention") as error:
        load_recipe(write_recipe(tmp_path / "a.yaml", tree))
    assert "got {" not in str(error.value)  # one line: the message, not the whole recipe tree
    tree["model"]["attn_implementation"] = "sdpa"
    tree.setdefault("train", {})["compile"] = True
    with pytest.raises(ConfigError, match="flat runs sdpa per sample .one row each., which train.compile does not compile"):
        load_recipe(write_recipe(tmp_path / "a.yaml", tree))
    del tree["train"]["compile"]
    tree["data"]["packing"] = "rows"
    with pytest.raises(ConfigError, match="data.packing is true, false or flat"):
        load_recipe(write_recipe(tmp_path / "a.yaml", tree))
    tree["data"]["packing"] = "flat"
    tree["model"] = {**tree.get("model", {}), "attn_implementation": "flex_attention"}
    recipe = load_recipe(write_recipe(tmp_path / "b.yaml", tree))
    assert recipe.data.packing == "flat"
    if not torch.accelerator.is_available():  # refused before the run folder is touched
        with pytest.raises(ConfigError, match="flex_attention trains only on a GPU"):
            plan_run(recipe)


# --- 2. logits only where labels are ---------------------------------------------------------------------
@pytest.mark.parametrize("loss_average", ["token", "square"])
def test_every_stage_trains_with_labels_only_logits(tiny_vision_dir, tiny_llm_dir, loss_average):
    """train_vlm's set_loss_average turns the labels-only loss on for the default token average too."""
    from vlkit.train.run import set_loss_average

    model, _ = build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, connector={"type": "mlp", "depth": 2})
    assert not model.logits_at_labels_only
    set_loss_average(model, loss_average)
    assert model.logits_at_labels_only
    assert model.loss_turn_power == (None if loss_average == "token" else 0.5)


@pytest.mark.parametrize("tune", [TuneSection(), TuneSection(llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0)],
                         ids=["align-shared-prefix", "lora-packed"])
def test_the_last_layer_runs_its_position_wise_parts_where_the_head_reads(vlm, image_dir, tune):
    """`vlkit.last_layer`: the last decoder layer's q/o projections and MLP run on the supervised positions only,
    with the full layer's loss and gradients."""
    model, processor = vlm
    assert model.trim_last_layer  # the probe found the tiny Llama's last layer position-wise
    items = tuned_items(model, processor, image_dir, tune)
    pad = processor.tokenizer.pad_token_id
    if tune.llm == "frozen":
        batch = VlkitCollator(pad, share_prefix_before=processor.image_token_id)(items)
    else:
        batch = VlkitCollator(pad, pack=True)(items)
    assert ("prefix_ids" in batch) == (tune.llm == "frozen")
    layer = model.language_model.get_decoder().layers[-1]
    rows = []
    handle = layer.mlp.register_forward_hook(lambda module, args, output: rows.append(output.shape[:-1].numel()))
    trimmed = loss_and_grads(model, batch)
    handle.remove()
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    prefix_rows = batch["prefix_ids"].shape[1] if "prefix_ids" in batch else None  # the prefix's cache: whole
    assert rows == [r for r in (prefix_rows, supervised) if r is not None]
    model.trim_last_layer = False
    assert_same(loss_and_grads(model, batch), trimmed, atol=1e-5)


def test_the_last_layer_is_trimmed_only_where_that_is_the_same_function(vlm):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model, _ = vlm
    layer = model.language_model.get_decoder().layers[-1]
    labels, decoder, cpu = torch.tensor([[-100, 5, 6]]), model.language_model.get_decoder(), torch.device("cpu")
    assert not isinstance(model.last_layer_where(labels, decoder, cpu), contextlib.nullcontext)
    own_forward = layer.mlp.forward
    layer.mlp.forward = lambda x: own_forward(x) + x.mean(dim=-2, keepdim=True)  # an MLP that mixes positions
    assert model.use_loss_at_labels() and not model.trim_last_layer
    del layer.mlp.forward
    assert model.use_loss_at_labels() and model.trim_last_layer
    model.language_model.activation_checkpointing_enable()  # the backward's rerun would not see the hooks
    assert isinstance(model.last_layer_where(labels, decoder, cpu), contextlib.nullcontext)
    model.language_model.activation_checkpointing_disable()
    decoder.layers[-1] = checkpoint_wrapper(layer)  # FSDP's activation checkpointing: the same rerun
    assert isinstance(model.last_layer_where(labels, decoder, cpu), contextlib.nullcontext)
    decoder.layers[-1] = layer
    layer.compile()  # train.compile: hooks added each step would recompile the layer
    assert isinstance(model.last_layer_where(labels, decoder, cpu), contextlib.nullcontext)


# Ops whose result size or value the host must read: on a GPU each one waits for every kernel queued before it.
HOST_READS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select", "aten::is_nonzero", "aten::equal",
              "aten::bincount", "aten::repeat_interleave", "aten::_unique2", "aten::unique_consecutive"}


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the host reads (HOST_READS, and indexing with a bool mask) of the ops run inside it, each with
    whether the first decoder layer had started then."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder_started = False
        self.reads: list[tuple[str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        indices = args[1] if name.startswith("aten::index") and len(args) > 1 else ()
        by_mask = isinstance(indices, (list, tuple)) and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices)
        if name in HOST_READS or by_mask:
            self.reads.append((name, self.decoder_started))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("turn_power", [None, 0.5], ids=["token-average", "square-average"])
def test_a_lora_training_step_reads_nothing_back_once_the_decoder_runs(vlm, image_dir, monkeypatch, turn_power):
    """On a GPU the host must queue the decoder's forward and backward without waiting on them (issue 17): the
    data-dependent reads of a packed LoRA step (where the head reads, the packed mask, the turn weights of
    `train.loss_average: turn` or `square`) come before the first decoder layer, when little work is queued;
    none after it, through the trimmed last layer, the head and the backward."""
    model, processor = vlm
    monkeypatch.setattr(model, "loss_turn_power", turn_power)
    items = tuned_items(model, processor, image_dir, TuneSection(llm="lora", lora_r=4, lora_alpha=8))
    batch = VlkitCollator(processor.tokenizer.pad_token_id, pack=True)(items)  # rows with sdpa: a GPU's layout
    assert model.logits_at_labels_only and model.trim_last_layer
    mode = HostReads()
    first_layer = model.language_model.get_decoder().layers[0]
    handle = first_layer.register_forward_pre_hook(lambda module, args: setattr(mode, "decoder_started", True))
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: mode.reads.append(("tolist", mode.decoder_started))
                        or tolist(self))
    try:
        with mode:
            model(**batch).loss.backward()
    finally:
        handle.remove()
    assert mode.reads, "the mode saw no read at all: it would not see one after the decoder either"
    assert [name for name, after in mode.reads if after] == []


# --- 2b. texts encoded once per data set -------------------------------------------------------------
def test_cached_text_encoding_gives_what_encode_conversation_gives(vlm, image_dir):
    model, processor = vlm
    dataset = ConversationDataset(samples(), processor, image_dir, max_length=256)
    for index, sample in enumerate(samples()):
        images = [load_image(name, image_dir) for name in sample["images"]]
        expected = processor.encode_conversation(sample["messages"], images, max_length=256)
        item = dataset[index]
        assert item["input_ids"].tolist() == expected["input_ids"] and item["labels"].tolist() == expected["labels"]
        if images:
            assert torch.equal(item["pixel_values"], expected["pixel_values"])
        else:
            assert item["pixel_values"] is None


def test_a_second_dataset_on_the_same_file_reuses_the_encoded_texts(tmp_path, image_dir):
    from data_helpers import FakeProcessor

    from vlkit.data import load_conversations

    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"id": s["id"], "image": s["images"][0], "conversations": [
        {"from": "human", "value": "<image>\n" + s["messages"][0]["content"].replace("<image>", "").strip()},
        {"from": "gpt", "value": s["messages"][1]["content"]}]} for s in samples() if len(s["images"]) == 1]))
    first, second = FakeProcessor(), FakeProcessor()
    ConversationDataset(load_conversations(str(path)), first, image_dir, max_length=64)
    dataset = ConversationDataset(load_conversations(str(path)), second, image_dir, max_length=64)
    assert first.calls > 0 and second.calls == 0  # datasets' cache: the map did not run again
    assert len(dataset) == first.calls and dataset[0]["input_ids"].numel() > 0


# --- 3. less padding -------------------------------------------------------------------------------------
def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([5, 3, 9, 4, 2, 9], capacity=9)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum([5, 3, 9, 4, 2, 9][i] for i in row) <= 9 for row in rows)
    assert len(rows) == 4  # 9 | 9 | 5+4 | 3+2


def tuned_items(model, processor, image_dir, tune: TuneSection) -> list[dict]:
    """The test conversations' items, with `tune` applied to the model (LoRA B non-zero, so that
    lora_A gets a gradient to compare too)."""
    apply_adapters(model, tune)
    set_trainable(model, tune)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    dataset = ConversationDataset(samples(), processor, image_dir)
    return [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_batches_give_the_same_loss_and_grads(vlm, image_dir, attn):
    model, processor = vlm
    set_attention_implementation(model.language_model.config, attn)
    items = tuned_items(model, processor, image_dir, TuneSection(llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0))
    padded = VlkitCollator(processor.tokenizer.pad_token_id)(items)
    padded_more = VlkitCollator(processor.tokenizer.pad_token_id, pad_to_multiple_of=128)(items)
    packed = VlkitCollator(processor.tokenizer.pad_token_id, pack=True)(items)
    assert padded_more["input_ids"].shape[1] > padded["input_ids"].shape[1]
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # fewer pad tokens
    assert "attention_mask" not in packed and packed["position_ids"][0, 0] == 0

    reference = loss_and_grads(model, padded)
    assert_same(reference, loss_and_grads(model, padded_more), atol=1e-5)
    assert_same(reference, loss_and_grads(model, packed), atol=1e-5)
    count = torch.tensor(int((padded["labels"][:, 1:] != -100).sum()))
    assert count == int((packed["labels"][:, 1:] != -100).sum())  # what the Trainer divides by
    assert_same(loss_and_grads(model, padded, num_items_in_batch=count),
                loss_and_grads(model, packed, num_items_in_batch=count), atol=1e-5)
    # Every sample's logits are the same wherever it sits: alone, padded into a batch, or packed.
    model.logits_at_labels_only = False
    try:
        assert_same(reference, loss_and_grads(model, packed), atol=1e-5)  # the full-logits path too
        with torch.no_grad():
            logits = model(**padded).logits
            packed_logits = model(**packed).logits
            for row, item in enumerate(items):
                alone = model(**VlkitCollator(processor.tokenizer.pad_token_id)([item])).logits[0]
                n = len(item["input_ids"])
                assert torch.allclose(alone, logits[row, :n], atol=1e-5)
                starts = (packed["position_ids"] == 0).nonzero().tolist()
                segments = [packed_logits[r, c : c + n] for r, c in starts]
                assert any(s.shape == alone.shape and torch.allclose(alone, s, atol=1e-5) for s in segments)
    finally:
        model.logits_at_labels_only = True


def test_packed_rows_of_one_sample_run_sdpa_causal_without_a_mask(vlm, image_dir, monkeypatch):
    """The padding after a row's last sample continues its positions, so rows that each hold one sample
    give transformers no restart: sdpa gets no mask (its causal kernel), and loss and grads stay the
    padded batch's. A row holding two samples still gets its block mask."""
    model, processor = vlm
    set_attention_implementation(model.language_model.config, "sdpa")
    items = tuned_items(model, processor, image_dir, TuneSection(llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0))
    pad = processor.tokenizer.pad_token_id
    longest_two = sorted(items, key=lambda item: -len(item["input_ids"]))[:2]
    one_per_row = VlkitCollator(pad, pack=True)(longest_two)
    assert one_per_row["input_ids"].shape[0] == 2  # neither fits beside the other
    assert find_packed_sequence_indices(one_per_row["position_ids"]) is None
    two_in_a_row = VlkitCollator(pad, pack=True)(items)
    assert find_packed_sequence_indices(two_in_a_row["position_ids"]) is not None

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, *args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((query.shape[-2], attn_mask is None, is_causal))
        return sdpa(query, *args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    padded = VlkitCollator(pad)(longest_two)
    assert_same(loss_and_grads(model, padded), loss_and_grads(model, one_per_row), atol=1e-5)
    length = padded["input_ids"].shape[1]
    assert one_per_row["input_ids"].shape[1] == length
    llm_calls = [(no_mask, causal) for seq, no_mask, causal in calls if seq == length]  # not the tower's
    layers = model.language_model.config.get_text_config().num_hidden_layers
    assert len(llm_calls) == 2 * layers
    assert all(not no_mask for no_mask, _ in llm_calls[:layers])  # the padded batch masks its padding
    assert all(no_mask and causal for no_mask, causal in llm_calls[layers:])


def test_flat_packing_puts_the_batch_in_one_row_with_the_padded_loss_and_grads(vlm, image_dir):
    """`pack="flat"`: one row, no pad token, each sample its own causal block (eager attention here: CPU has no
    flex attention backward), the padded batch's loss and gradients."""
    model, processor = vlm
    set_attention_implementation(model.language_model.config, "eager")
    items = tuned_items(model, processor, image_dir, TuneSection(llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0))
    pad = processor.tokenizer.pad_token_id
    total = sum(len(item["input_ids"]) for item in items)
    flat = VlkitCollator(pad, pack="flat")(items)
    assert flat["input_ids"].shape == (1, total) and "attention_mask" not in flat
    assert (flat["position_ids"][0] == 0).sum() == len(items)  # every sample restarts its positions
    flat_rounded = VlkitCollator(pad, pack="flat", pad_to_multiple_of=64)(items)
    assert flat_rounded["input_ids"].shape[1] == -(-total // 64) * 64

    padded = VlkitCollator(pad)(items)
    reference = loss_and_grads(model, padded)
    assert_same(reference, loss_and_grads(model, flat), atol=1e-5)
    assert_same(reference, loss_and_grads(model, flat_rounded), atol=1e-5)
    count = torch.tensor(int((padded["labels"][:, 1:] != -100).sum()))
    assert count == int((flat["labels"][:, 1:] != -100).sum())
    assert_same(loss_and_grads(model, padded, num_items_in_batch=count),
                loss_and_grads(model, flat, num_items_in_batch=count), atol=1e-5)
    with pytest.raises(ValueError, match="true, false or 'flat'"):
        VlkitCollator(pad, pack="rows")


def test_flex_attention_keeps_the_samples_of_a_flat_row_apart(vlm, image_dir, monkeypatch):
    """The kernel flat packing is for: transformers gives flex attention a block mask per sample, so each
    sample's logits in the one row are its logits alone (forward only: flex attention's backward needs a GPU)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, processor = vlm
    items = tuned_items(model, processor, image_dir, TuneSection(llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0))
    pad = processor.tokenizer.pad_token_id
    model.logits_at_labels_only = False
    model.eval()
    flex_calls = []
    flex = ALL_ATTENTION_FUNCTIONS["flex_attention"]

    def counted_flex(*args, **kwargs):
        flex_calls.append(type(kwargs.get("attention_mask", args[4] if len(args) > 4 else None)).__name__)
        return flex(*args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flex_attention", counted_flex)
    with torch.no_grad():
        alone = [model(**VlkitCollator(pad)([item])).logits[0] for item in items]
        set_attention_implementation(model.language_model.config, "flex_attention")
        flat = VlkitCollator(pad, pack="flat")(items)
        logits = model(**flat).logits[0]
    starts = (flat["position_ids"][0] == 0).nonzero().flatten().tolist()
    segments = [logits[start : start + len(expected)] for start, expected in zip(starts, sorted(alone, key=len, reverse=True))]
    for expected, segment in zip(sorted(alone, key=len, reverse=True), segments):
        assert torch.allclose(expected, segment, atol=1e-4)
    layers = model.language_model.config.get_text_config().num_hidden_layers
    assert flex_calls == ["BlockMask"] * layers  # flex ran, once per layer, with a block mask


def padded_references_then_per_sample_sdpa(model, processor, image_dir, tune: TuneSection):
    """The padded batch's loss and grads under sdpa (plain, and divided by its label count), then the LLM
    switched to per-sample sdpa: (items, pad id, label count, reference, counted reference)."""
    set_attention_implementation(model.language_model.config, "sdpa")
    items = tuned_items(model, processor, image_dir, tune)
    pad = processor.tokenizer.pad_token_id
    padded = VlkitCollator(pad)(items)
    count = torch.tensor(int((padded["labels"][:, 1:] != -100).sum()))
    references = loss_and_grads(model, padded), loss_and_grads(model, padded, num_items_in_batch=count)
    assert use_per_sample_sdpa(model)
    assert attention_implementation(model.language_model.config) == PER_SAMPLE_SDPA
    return items, pad, count, *references


@pytest.mark.parametrize("form", ["calls", "rows"])
def test_per_sample_sdpa_gives_a_flat_row_the_padded_loss_and_grads(vlm, image_dir, monkeypatch, form):
    """Flat packing under sdpa: the LLM switched to per-sample sdpa calls sdpa's causal kernel once per sample
    (calls), or lays the row's samples out as rows for one call per layer (rows), no mask either way, and
    gives the padded batch's loss and gradients (with trailing padding too)."""
    model, processor = vlm
    monkeypatch.setattr(per_sample_sdpa, "MEAN_LENGTH_FOR_CALLS_PER_SAMPLE", 0 if form == "calls" else 10**9)
    items, pad, count, reference, counted_reference = padded_references_then_per_sample_sdpa(
        model, processor, image_dir, TuneSection(llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0))

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, *args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((tuple(query.shape[:1] + query.shape[2:3]), attn_mask is None, is_causal))
        return sdpa(query, *args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    flat = VlkitCollator(pad, pack="flat")(items)
    assert flat["input_ids"].shape[0] == 1
    per_sample_sdpa.samples_as_rows.cache_clear()
    assert_same(reference, loss_and_grads(model, flat), atol=1e-5)
    assert all(no_mask for _, no_mask, _ in calls)  # no [T, T] mask: not the whole row at once
    # The rows' indices are built once per forward, not per layer (on a GPU each build read a length back).
    assert per_sample_sdpa.samples_as_rows.cache_info().misses == (form == "rows")
    llm_shapes = [shape for shape, _, causal in calls if causal]  # the tower's calls are not causal
    layers = model.language_model.config.get_text_config().num_hidden_layers
    if form == "calls":
        lengths = packed_sample_lengths(flat["position_ids"])
        assert len(lengths) == len(items) and llm_shapes == [(1, n) for n in lengths] * layers  # a call per sample
    else:
        assert llm_shapes == [(len(items), max(len(item["input_ids"]) for item in items))] * layers  # a row per sample
    assert_same(counted_reference, loss_and_grads(model, flat, num_items_in_batch=count), atol=1e-5)
    rounded = VlkitCollator(pad, pack="flat", pad_to_multiple_of=64)(items)
    assert rounded["input_ids"].shape[1] % 64 == 0 and rounded["input_ids"].shape[1] > flat["input_ids"].shape[1]
    assert_same(reference, loss_and_grads(model, rounded), atol=1e-5)  # the padding joins the last sample


def test_per_sample_sdpa_trains_in_float32_under_cpu_autocast(vlm, image_dir, monkeypatch):
    """Under CPU bf16 autocast, a training forward's attention runs in float32 with autocast off (sdpa's bf16
    backward is the slow part on CPU); a forward without gradients leaves it to autocast. The loss and
    gradients stay those of the padded batch under autocast, within bf16's precision."""
    model, processor = vlm
    items, pad, _, _, _ = padded_references_then_per_sample_sdpa(
        model, processor, image_dir, TuneSection(llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0))
    set_attention_implementation(model.language_model.config, "sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = loss_and_grads(model, VlkitCollator(pad)(items))
    set_attention_implementation(model.language_model.config, PER_SAMPLE_SDPA)

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, value, *args, is_causal=False, **kwargs):
        if is_causal:  # the LLM's calls (the tower's are not causal)
            calls.append(({query.dtype, key.dtype, value.dtype}, torch.is_autocast_enabled("cpu")))
        return sdpa(query, key, value, *args, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    flat = VlkitCollator(pad, pack="flat")(items)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, flat)
        assert calls and all(call == ({torch.float32}, False) for call in calls)
        calls.clear()
        with torch.no_grad():
            model(**flat)
        assert calls and all(autocast for _, autocast in calls)
    assert torch.allclose(loss, reference[0], rtol=2e-2)
    for name, grad in reference[1].items():
        assert torch.allclose(grads[name], grad, atol=2e-2 * grad.abs().max()), name


def test_per_sample_sdpa_is_sdpa_for_every_other_batch(vlm, image_dir):
    """Padded batches (a mask), one unpacked row and generation (a cache) compute what sdpa computes."""
    model, processor = vlm
    set_attention_implementation(model.language_model.config, "sdpa")
    items = tuned_items(model, processor, image_dir, TuneSection(llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0))
    pad = processor.tokenizer.pad_token_id
    padded, single = VlkitCollator(pad)(items), VlkitCollator(pad)(items[:1])
    prompts = processor.prompt_inputs([[{"role": "user", "content": "<image>\nWhat shape?"}],
                                       [{"role": "user", "content": "Say hi."}]],
                                      images=[[random_image(1)], []])
    model.eval()

    lone = processor.prompt_inputs([[{"role": "user", "content": "<image>\\nWhat shape?"}]], images=[[random_image(2)]])
    del lone["attention_mask"]  # one row, no mask: later prompt tokens attend to the cache before them

    def outputs():
        with torch.no_grad():
            generated = model.generate(**prompts, max_new_tokens=6, do_sample=False)
            lone_generated = model.generate(**lone, max_new_tokens=6, do_sample=False)
            cache = cache_argument(model(**lone, use_cache=True))  # the output names it as the forward does
            follow_up = torch.tensor([[1, 2, 3]])  # three tokens after a cached prompt
            name = cache_keyword(model.language_model.get_decoder().forward)
            continued = model(input_ids=follow_up, use_cache=True, **{name: cache}).logits
        return loss_and_grads(model, padded), loss_and_grads(model, single), generated, lone_generated, continued

    sdpa_padded, sdpa_single, *sdpa_rest = outputs()
    assert use_per_sample_sdpa(model)
    mine_padded, mine_single, *mine_rest = outputs()
    assert_same(sdpa_padded, mine_padded)
    assert_same(sdpa_single, mine_single)
    assert torch.equal(sdpa_rest[0], mine_rest[0]) and torch.equal(sdpa_rest[1], mine_rest[1])
    assert torch.allclose(sdpa_rest[2], mine_rest[2], atol=1e-5)


def test_training_on_cpu_packs_flat_with_per_sample_sdpa_unless_compiled(vlm, monkeypatch):
    import vlkit.data.packing

    model, _ = vlm
    config = model.language_model.config
    assert collator_packing(True, model, on_cpu=True, compiled=True) is True  # compiled layers keep rows
    assert collator_packing(True, model) is True  # a GPU's sdpa keeps rows (the flat row unmeasured there)
    assert attention_implementation(config) == "sdpa"
    assert collator_packing(True, model, on_cpu=True) == "flat"
    assert attention_implementation(config) == PER_SAMPLE_SDPA
    assert collator_packing(True, model, on_cpu=True) == "flat"  # asked again (the next stage): still flat
    assert collator_packing(False, model, on_cpu=True) is False

    model.language_model.set_attn_implementation("sdpa")
    monkeypatch.setattr(config, "sliding_window", 16, raising=False)  # per-sample sdpa has no window
    assert not use_per_sample_sdpa(model) and collator_packing("flat", model, on_cpu=True) is True
    assert attention_implementation(config) == "sdpa"
    monkeypatch.setattr(config, "sliding_window", None)
    monkeypatch.setattr(vlkit.data.packing, "packing_supported",
                        lambda model, warn=True: attention_implementation(model.language_model.config) == "sdpa")
    assert not use_per_sample_sdpa(model)  # its probe fails: the LLM keeps sdpa
    assert attention_implementation(config) == "sdpa"


def test_shared_prefix_stops_before_images_answers_and_the_last_token():
    ignore = -100
    ids = [torch.tensor([1, 2, 3, 9, 5, 6]), torch.tensor([1, 2, 3, 4, 7]), torch.tensor([1, 2, 3, 4, 8, 8])]
    unlabelled = [torch.full_like(x, ignore) for x in ids]
    assert shared_prefix_length(ids, unlabelled, image_token_id=None) == 3  # rows differ at index 3
    assert shared_prefix_length(ids[1:], unlabelled[1:], image_token_id=4) == 3  # the image stays in the rows
    assert shared_prefix_length(ids[1:], unlabelled[1:], image_token_id=None) == 4  # both rows end past it
    answer_at_2 = [x.clone() for x in unlabelled[1:]]
    answer_at_2[1][2] = 3  # predicted from position 1's output, which must stay in the rows
    assert shared_prefix_length(ids[1:], answer_at_2, image_token_id=None) == 1
    same = [torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3])]
    assert shared_prefix_length(same, [torch.full_like(x, ignore) for x in same], image_token_id=None) == 2


@pytest.mark.parametrize("tune", [TuneSection(), TuneSection(llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0)])
def test_a_shared_prefix_gives_the_padded_batch_loss_and_grads(vlm, image_dir, tune):
    model, processor = vlm
    items = tuned_items(model, processor, image_dir, tune)
    pad = processor.tokenizer.pad_token_id
    padded = VlkitCollator(pad)(items)
    shared = VlkitCollator(pad, share_prefix_before=processor.image_token_id)(items)
    prefix_length = shared["prefix_ids"].shape[1]
    assert prefix_length > 5 and shared["attention_mask"].shape[1] == prefix_length + shared["input_ids"].shape[1]
    assert prefix_length + shared["input_ids"].numel() < padded["input_ids"].numel()
    count = torch.tensor(int((padded["labels"][:, 1:] != -100).sum()))
    assert count == int((shared["labels"][:, 1:] != -100).sum())  # what the Trainer divides by

    reference = loss_and_grads(model, padded)
    assert_same(reference, loss_and_grads(model, shared), atol=1e-5)
    assert_same(loss_and_grads(model, padded, num_items_in_batch=count),
                loss_and_grads(model, shared, num_items_in_batch=count), atol=1e-5)
    model.logits_at_labels_only = False  # the LLM's own loss: the rows are rebuilt whole
    try:
        assert_same(reference, loss_and_grads(model, shared), atol=1e-5)
    finally:
        model.logits_at_labels_only = True
    model.language_model.activation_checkpointing_enable()  # layers run twice: the rows are rebuilt whole
    try:
        assert_same(reference, loss_and_grads(model, shared), atol=1e-5)
    finally:
        model.language_model.activation_checkpointing_disable()
    with pytest.raises(ValueError, match="same row repeated"):
        model(**{**shared, "prefix_ids": torch.cat([shared["prefix_ids"][:1], shared["prefix_ids"][1:] + 1])})


@pytest.mark.parametrize("tune", [TuneSection(), TuneSection(llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0)])
def test_a_shared_prefix_before_a_flat_row_gives_the_padded_loss_and_grads(vlm, image_dir, tune):
    """Per-sample sdpa lets every sample of a flat row see the prefix's cached keys; where the model rebuilds
    whole samples (the LLM trains, checkpointing, its own loss) the prefix goes back in front of each."""
    model, processor = vlm
    items, pad, count, reference, counted_reference = padded_references_then_per_sample_sdpa(
        model, processor, image_dir, tune)
    shared = VlkitCollator(pad, pack="flat", share_prefix_before=processor.image_token_id)(items)
    prefix_length = shared["prefix_ids"].shape[1]
    assert shared["prefix_ids"].shape[0] == 1 and shared["input_ids"].shape[0] == 1 and "attention_mask" not in shared
    assert prefix_length > 5
    assert shared["input_ids"].shape[1] == sum(len(item["input_ids"]) - prefix_length for item in items)
    assert count == int((shared["labels"][:, 1:] != -100).sum())
    assert_same(reference, loss_and_grads(model, shared), atol=1e-5)
    assert_same(counted_reference, loss_and_grads(model, shared, num_items_in_batch=count), atol=1e-5)
    model.logits_at_labels_only = False  # the LLM's own loss: each sample rebuilt whole
    try:
        assert_same(reference, loss_and_grads(model, shared), atol=1e-5)
    finally:
        model.logits_at_labels_only = True
    model.language_model.activation_checkpointing_enable()
    try:
        assert_same(reference, loss_and_grads(model, shared), atol=1e-5)
    finally:
        model.language_model.activation_checkpointing_disable()


def test_the_collator_shares_a_prefix_only_where_it_saves_token_slots(vlm, image_dir):
    _, processor = vlm
    dataset = ConversationDataset(samples(), processor, image_dir)
    items = [dataset[i] for i in range(len(dataset))]
    pad, image = processor.tokenizer.pad_token_id, processor.image_token_id
    assert "prefix_ids" not in VlkitCollator(pad, pack=True)(items)  # off unless asked
    assert "prefix_ids" not in VlkitCollator(pad, share_prefix_before=image)(items[:1])  # one sample: nothing shared
    assert "prefix_ids" not in VlkitCollator(pad, padding_side="left", share_prefix_before=image)(items)  # generation
    # These samples (116, 57, 43 and 65 tokens, 24 shared) take 464 slots padded, 392 with the prefix
    # shared and 348 packed (116 | 65 + 43 | 57): the collator takes the fewest.
    shared = VlkitCollator(pad, share_prefix_before=image)(items)
    packed = VlkitCollator(pad, pack=True, share_prefix_before=image)(items)
    assert shared["prefix_ids"].shape[1] + shared["input_ids"].numel() == 392
    assert "prefix_ids" not in packed and packed["input_ids"].numel() == 348


def test_packing_support_is_checked(vlm):
    model, _ = vlm
    assert packing_supported(model)
    forward = model.language_model.forward

    def ignores_positions(*args, position_ids=None, **kwargs):  # an LLM that cannot keep samples apart
        return forward(*args, **kwargs)

    model.language_model.forward = ignores_positions
    assert not packing_supported(model)
    assert collator_packing(True, model) is False and collator_packing("flat", model) is False


def test_packing_is_flat_under_flash_attention(vlm, monkeypatch):
    """Flash attention reads restarting positions only in a one-row batch: packed rows would mix samples there."""
    import vlkit.data.packing

    model, _ = vlm
    assert collator_packing(True, model) is True and collator_packing("flat", model) == "flat"
    assert collator_packing(False, model) is False
    monkeypatch.setattr(vlkit.data.packing, "packing_supported", lambda model: True)  # no flash-attn on this machine
    set_attention_implementation(model.language_model.config, "flash_attention_2")
    assert collator_packing(True, model) == "flat" and collator_packing("flat", model) == "flat"


# --- 4. nothing kept for frozen parts -------------------------------------------------------------------
@pytest.mark.parametrize("tune", [TuneSection(), TuneSection(llm="lora", lora_r=4, lora_alpha=8)])
def test_optimizer_and_gradients_cover_only_trainable_parameters(vlm, image_dir, tmp_path, tune):
    from transformers import TrainerCallback, TrainingArguments

    from vlkit.train.trainer import VlkitTrainer

    model, processor = vlm
    apply_adapters(model, tune)
    set_trainable(model, tune)
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) < len(names)
    seen: dict[str, set[str]] = {}

    class GradientsBeforeStep(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen["grads"] = {n for n, p in model.named_parameters() if p.grad is not None}

    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2,
                             report_to=[], save_strategy="no", learning_rate=1e-3, use_cpu=True,
                             remove_unused_columns=False)
    trainer = VlkitTrainer(model=model, args=args, train_dataset=ConversationDataset(samples(), processor, image_dir),
                           data_collator=VlkitCollator(processor.tokenizer.pad_token_id, pack=True), manifest={},
                           part_learning_rates={"connector": 1e-3, "language_model": 1e-3},
                           callbacks=[GradientsBeforeStep()])
    trainer.train()
    assert seen["grads"] == trainable  # backward built gradients for the trained weights only
    state = trainer.optimizer.state
    assert {names[id(p)] for p in state} == trainable
    for parameter, slots in state.items():
        assert slots["exp_avg"].shape == parameter.shape
    optimizer_params = {names[id(p)] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimizer_params == trainable
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_a_trained_connector_keeps_float32_weights_in_a_bf16_model(tiny_vision_dir, tiny_llm_dir, image_dir):
    """AdamW on bf16 weights rounds away every update under ~0.4% of a weight: a bf16 model's trained connector
    keeps float32 weights (the LLM and tower stay bf16), a step runs without autocast, and an update too small
    for bf16 moves it."""
    from vlkit.train.stages import connector_weights_in_float32

    torch.manual_seed(7)
    model, processor = build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, connector={"type": "mlp", "depth": 2},
                                 dtype=torch.bfloat16)
    set_trainable(model, TuneSection())
    before = {name: p.detach().clone() for name, p in model.connector.named_parameters()}
    assert all(p.dtype == torch.bfloat16 for p in before.values())
    assert connector_weights_in_float32(model) and not connector_weights_in_float32(model)
    assert all(p.dtype == torch.float32 for p in model.connector.parameters())
    assert {p.dtype for p in [*model.language_model.parameters(), *model.vision_tower.parameters()]} == {torch.bfloat16}
    model.use_loss_at_labels()
    dataset = ConversationDataset(samples(), processor, image_dir)
    batch = VlkitCollator(processor.tokenizer.pad_token_id, pack=True)([dataset[i] for i in range(len(dataset))])
    optimizer = torch.optim.AdamW(model.connector.parameters(), lr=1e-6, weight_decay=0.0)
    loss = model(**batch).loss
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    for name, parameter in model.connector.named_parameters():
        if name.endswith("weight"):
            kept = (parameter.detach() != before[name].float()).float().mean()
            in_bf16 = (parameter.detach().to(torch.bfloat16) != before[name]).float().mean()
            assert kept > 0.9 and in_bf16 < 0.1, (name, kept, in_bf16)  # float32 kept the update, bf16 would not

    frozen, _ = build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, dtype=torch.bfloat16)
    set_trainable(frozen, TuneSection(connector="frozen"))
    assert not connector_weights_in_float32(frozen)


# --- 4b. LoRA's scale on the rank side -----------------------------------------------------------------------
def test_lora_scale_on_the_rank_side_gives_peft_loss_grads_and_merge(vlm, image_dir):
    """Every LoRA linear vlkit makes computes B(A(x) * scale): peft's loss, gradients and merged weights."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear as LoraLinear

    from vlkit.lora_scale import RankSideScale, scale_on_rank_side

    model, processor = vlm
    items = tuned_items(model, processor, image_dir, TuneSection(llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0))
    linears = [m for m in model.language_model.modules() if isinstance(m, LoraLinear)]
    assert linears and all(isinstance(m.lora_variant["default"], RankSideScale) for m in linears)
    batch = VlkitCollator(processor.tokenizer.pad_token_id, pack=True)(items)
    rank_side = loss_and_grads(model, batch)
    for module in linears:
        module.lora_variant.clear()  # peft's own LoRA forward
    assert_same(loss_and_grads(model, batch), rank_side)
    assert scale_on_rank_side(model.language_model) == len(linears)

    model.eval()
    with torch.no_grad():
        unmerged = model(**batch).loss
        model.language_model = model.language_model.merge_and_unload()  # through RankSideScale.merge_unsafe
        assert torch.allclose(model(**batch).loss, unmerged, atol=1e-6)

    # An adapter with a variant of its own (DoRA) keeps it.
    dora = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"], use_dora=True))
    assert scale_on_rank_side(dora) == 0


def test_rank_side_lora_skips_peft_input_cast_under_autocast_only(vlm, image_dir):
    """Under CPU bf16 autocast the rank-side adapters take their input as it comes (peft's cast to float32 is
    undone at lora_A's matmul): the same loss and gradients as with peft's cast. Without autocast, a bf16
    input still reaches a float32 adapter cast, as peft would cast it."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear as LoraLinear

    from vlkit.lora_scale import scale_on_rank_side

    model, processor = vlm
    items = tuned_items(model, processor, image_dir, TuneSection(llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0))
    linears = [m for m in model.language_model.modules() if isinstance(m, LoraLinear)]
    assert linears and not any(m.cast_input_dtype_enabled for m in linears)
    batch = VlkitCollator(processor.tokenizer.pad_token_id, pack=True)(items)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        skipped = loss_and_grads(model, batch)
        for module in linears:
            module.cast_input_dtype_enabled = True  # peft's cast, as stock peft runs
        assert_same(loss_and_grads(model, batch), skipped, atol=0)

    layer = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"]))
    layer.base_model.model[0].base_layer.to(torch.bfloat16)  # a bf16 base with float32 adapters
    with torch.no_grad():
        layer.base_model.model[0].lora_B["default"].weight.normal_()
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    peft_output = layer(x)
    assert scale_on_rank_side(layer) == 1 and not layer.base_model.model[0].cast_input_dtype_enabled
    assert torch.allclose(layer(x).float(), peft_output.float(), atol=1e-2)


# --- 5. generation from features computed once ------------------------------------------------------------
def test_generate_from_precomputed_features_matches_pixels(vlm):
    model, processor = vlm
    conversation = [{"role": "user", "content": "<image>\nWhat colour?"}]
    inputs = processor.prompt_inputs([conversation, [{"role": "user", "content": "Hi"}]], [[random_image(9)], []])
    settings = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
    with torch.no_grad():
        expected = model.generate(**inputs, **settings)
        features = model.get_vision_features(inputs.pop("pixel_values"))  # once per conversation, e.g. in chat
        tower_calls = []
        hook = model.vision_tower.register_forward_hook(lambda *args: tower_calls.append(1))
        try:
            actual = model.generate(**inputs, vision_features=features, **settings)
        finally:
            hook.remove()
    assert torch.equal(expected, actual) and not tower_calls
    with pytest.raises(ValueError, match="not both"):
        model(**inputs, vision_features=features, pixel_values=torch.zeros(1, 3, 32, 32))


# --- the whole stage: cache + packing change nothing but speed --------------------------------------------
def test_align_run_with_cache_and_packing_matches_the_plain_run(tmp_path, shapes_dir, tiny_vision_dir, tiny_llm_dir,
                                                              monkeypatch):
    from safetensors.torch import load_file

    from vlkit.train.run import train_vlm

    monkeypatch.setenv("VLKIT_HOME", str(tmp_path / "home"))
    runs = {}
    for name, fast in (("plain", False), ("fast", True)):
        tree = align_recipe(tmp_path / name, tiny_vision_dir, tiny_llm_dir, shapes_dir, max_steps=3, batch_size=4)
        tree["data"].update(cache_vision_features=fast, packing=fast, share_prefix=fast)
        run_dir = train_vlm(load_recipe(write_recipe(tmp_path / f"{name}.yaml", tree)))
        summary = json.loads((run_dir / "run_summary.json").read_text())
        runs[name] = ([e["loss"] for e in summary["log_history"] if "loss" in e],
                      load_file(run_dir / "trainable.safetensors"))
    assert any((tmp_path / "home" / "features").rglob("*.safetensors"))
    (plain_losses, plain_weights), (fast_losses, fast_weights) = runs["plain"], runs["fast"]
    assert len(plain_losses) == 3 and torch.allclose(torch.tensor(plain_losses), torch.tensor(fast_losses), atol=1e-5)
    for name, tensor in plain_weights.items():
        assert torch.allclose(tensor, fast_weights[name], atol=1e-5), name


@pytest.mark.parametrize("tune", [TuneSection(), TuneSection(llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0)])
def test_compiled_decoder_layers_give_the_eager_loss_and_grads(vlm, image_dir, tune):
    """train.compile: the same loss and gradients as eager, on the batch layout the stage trains on
    (align: the shared prefix through a key/value cache; instruct: packed rows with LoRA)."""
    from torch._dynamo.utils import counters

    from vlkit.train.compile import compile_decoder_layers, decoder_layers, takes_cache

    model, processor = vlm
    items = tuned_items(model, processor, image_dir, tune)
    frozen = tune.llm == "frozen"
    collate = VlkitCollator(processor.tokenizer.pad_token_id, pack=not frozen,
                            share_prefix_before=processor.image_token_id if frozen else None)
    batch = collate(items)
    assert ("prefix_ids" in batch) == frozen
    names = list(model.state_dict())
    layers = decoder_layers(model)
    assert len(layers) == model.language_model.config.num_hidden_layers
    torch._dynamo.reset()  # graphs another test compiled would be reused and not counted
    regions = compile_decoder_layers(model, around_cache=frozen)
    if frozen:  # the layers' parts that take no cache: a compiled layer would recompile for each cache slot
        assert regions and not any(takes_cache(region) for region in regions)
        assert all(any(region is part for layer in layers for part in layer.children()) for region in regions)
    else:
        assert regions == layers
    assert list(model.state_dict()) == names  # compiled in place: checkpoints and exports keep their names
    with torch.compiler.set_stance("force_eager"):
        reference = loss_and_grads(model, batch)
    counters.clear()
    assert_same(reference, loss_and_grads(model, batch), atol=1e-5)
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0  # the compiled code ran, not eager
    # Shapes are dynamic: the batch 3 tokens shorter (the rows' ends are answer text) compiles nothing new.
    shorter = {key: value[:, :-3] if key in ("input_ids", "labels", "position_ids", "attention_mask") else value
               for key, value in batch.items()}
    with torch.compiler.set_stance("force_eager"):
        reference = loss_and_grads(model, shorter)
    assert_same(reference, loss_and_grads(model, shorter), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == compiled


def test_a_compiled_run_compiles_for_training_steps_only(tmp_path, shapes_dir, tiny_vision_dir, tiny_llm_dir):
    """train.compile: the model's one-time probes (labels-only loss, last layer, packing) and the evaluation
    run eager, so the layers compile for the training step alone, not for a no-grad call of each (5 graphs
    before, and each costs tens of seconds on a GPU)."""
    from torch._dynamo.utils import counters

    from vlkit.train.run import train_vlm

    torch._dynamo.reset()  # graphs an earlier test compiled would be reused and not counted
    counters.clear()
    tree = align_recipe(tmp_path / "run", tiny_vision_dir, tiny_llm_dir, shapes_dir, max_steps=3, batch_size=4,
                        compile=True, eval_steps=2)
    tree.update(stage="instruct", tune={"llm": "lora", "lora_r": 4, "lora_alpha": 8})
    tree["data"].update(train_file="instruct_train.json", val_file="instruct_val.json", max_val_samples=4)
    run_dir = train_vlm(load_recipe(write_recipe(tmp_path / "run.yaml", tree)))
    assert "eval_loss" in json.loads((run_dir / "run_summary.json").read_text())["final_metrics"]
    # One graph for the layers (two where the first layer's input needs no gradient and the others' do).
    assert 1 <= counters["stats"]["unique_graphs"] <= 2


def test_a_compiled_run_trains_as_the_eager_one(tmp_path, shapes_dir, tiny_vision_dir, tiny_llm_dir, monkeypatch):
    """train.compile through the Trainer: the same losses and weights as eager, the same names saved."""
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    from vlkit.train.checkpoint import load_run
    from vlkit.train.run import plan_run, train_vlm

    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        torch._dynamo.reset()  # graphs an earlier test compiled would be reused and not counted
        counters.clear()
        tree = align_recipe(tmp_path / name, tiny_vision_dir, tiny_llm_dir, shapes_dir, max_steps=3, batch_size=4,
                            compile=compiled)
        run_dir = train_vlm(load_recipe(write_recipe(tmp_path / f"{name}.yaml", tree)))
        summary = json.loads((run_dir / "run_summary.json").read_text())
        runs[name] = ([e["loss"] for e in summary["log_history"] if "loss" in e],
                      load_file(run_dir / "trainable.safetensors"))
        assert bool(counters["stats"]["unique_graphs"]) == compiled  # the compiled run ran compiled code
    (eager_losses, eager_weights), (compiled_losses, compiled_weights) = runs["eager"], runs["compiled"]
    assert len(eager_losses) == 3
    assert torch.allclose(torch.tensor(eager_losses), torch.tensor(compiled_losses), atol=1e-5)
    assert eager_weights.keys() == compiled_weights.keys()
    for name, tensor in eager_weights.items():
        assert torch.allclose(tensor, compiled_weights[name], atol=1e-5), name
    load_run(tmp_path / "compiled")  # loads as any run does

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    tree = align_recipe(tmp_path / "fsdp", tiny_vision_dir, tiny_llm_dir, shapes_dir, compile=True)
    with pytest.raises(ConfigError, match="train.compile is untested under FSDP"):
        plan_run(load_recipe(write_recipe(tmp_path / "fsdp.yaml", tree)))  # the dry run's checks: before loading
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    tree.update(stage="instruct", tune={"llm": "qlora"})
    with pytest.raises(ConfigError, match="4-bit layers"):
        train_vlm(load_recipe(write_recipe(tmp_path / "qlora.yaml", tree)))


def test_a_feature_cache_the_disk_cannot_hold_is_skipped_by_default_and_refused_when_asked_for(
        tmp_path, shapes_dir, tiny_vision_dir, tiny_llm_dir, monkeypatch, caplog):
    """The align stage caches the tower's features by default; at LLaVA's scale (558k images) that is hundreds
    of GiB. When the cache would not fit the free disk under $VLKIT_HOME, the default trains from pixels (and
    says so), and an explicit cache_vision_features: true stops before computing anything. Features cached
    before take no more room: a run whose images are all cached reads them however full the disk is."""
    import vlkit.features as features
    from vlkit.train.run import train_vlm

    monkeypatch.setenv("VLKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(features, "free_bytes_for_features", lambda home=None: 1000)  # a nearly full disk
    tree = align_recipe(tmp_path / "out", tiny_vision_dir, tiny_llm_dir, shapes_dir, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="vlkit.train"):
        train_vlm(load_recipe(write_recipe(tmp_path / "a.yaml", tree)))
    assert re.search(r"vision features not cached \(\d+\.\d GiB for the \d+ images not cached yet, 0\.0 GiB free "
                     "under ", caplog.text)
    assert not (tmp_path / "home" / "features").exists()
    tree["data"]["cache_vision_features"] = True
    with pytest.raises(ConfigError, match="data.cache_vision_features: .* GiB for the .* images not cached yet"):
        train_vlm(load_recipe(write_recipe(tmp_path / "b.yaml", {**tree, "output_dir": str(tmp_path / "out2")})))
    assert not (tmp_path / "home" / "features").exists()
    monkeypatch.setattr(features, "free_bytes_for_features", lambda home=None: 2**40)  # room: the cache is filled
    train_vlm(load_recipe(write_recipe(tmp_path / "c.yaml", {**tree, "output_dir": str(tmp_path / "out3")})))
    stored = len(list((tmp_path / "home" / "features").rglob("*.safetensors")))
    assert stored > 0
    monkeypatch.setattr(features, "free_bytes_for_features", lambda home=None: 1000)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlkit.train"):  # nothing left to write: the cache is used
        train_vlm(load_recipe(write_recipe(tmp_path / "d.yaml", {**tree, "output_dir": str(tmp_path / "out4")})))
    assert "not cached" not in caplog.text
    assert len(list((tmp_path / "home" / "features").rglob("*.safetensors"))) == stored
