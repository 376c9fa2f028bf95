"""VlkitForConditionalGeneration: save/load, mixed batches, batched generation, vision towers."""

from __future__ import annotations

import pytest
import torch
from conftest import random_image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlkit import VlkitForConditionalGeneration, build_vlm


def conversation(question: str, answer: str | None = None, images: int = 1) -> list[dict]:
    messages = [{"role": "user", "content": "<image>\n" * images + question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def collate(processor, samples):
    """Right-pad encoded samples into a batch (the training layout)."""
    encoded = [processor.encode_conversation(messages, images) for messages, images in samples]
    length = max(len(e["input_ids"]) for e in encoded)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.tensor([e["input_ids"] + [pad] * (length - len(e["input_ids"])) for e in encoded])
    labels = torch.tensor([e["labels"] + [-100] * (length - len(e["labels"])) for e in encoded])
    attention_mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"])) for e in encoded])
    pixels = [e["pixel_values"] for e in encoded if e["pixel_values"] is not None]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": torch.cat(pixels) if pixels else None}


def test_save_load_round_trip_gives_identical_logits(tiny_vlm, tmp_path):
    model, processor = tiny_vlm
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, VlkitForConditionalGeneration)
    assert reloaded_processor.image_seq_length == processor.image_seq_length
    inputs = reloaded_processor.prompt_inputs([conversation("What colour is it?")], [[random_image(0)]])
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = reloaded(**inputs).logits
    assert torch.equal(expected, actual)


def test_mixed_batch_forward_and_backward(tiny_vlm):
    model, processor = tiny_vlm
    batch = collate(processor, [
        (conversation("Compare them.", "Both are red.", images=2), [random_image(1), random_image(2)]),
        (conversation("What shape?", "A star.", images=1), [random_image(3)]),
        (conversation("Say hi.", "Hi!", images=0), []),
    ])
    assert batch["pixel_values"].shape[0] == 3
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 3 * model.config.image_seq_length
    model.zero_grad()
    output = model(**batch)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    connector_grad = sum(p.grad.abs().sum() for p in model.connector.parameters())
    assert connector_grad > 0
    # The image features reach the loss: changing one image changes it.
    altered = dict(batch, pixel_values=batch["pixel_values"].clone())
    altered["pixel_values"][0] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(**altered).loss, output.loss.detach())
    model.zero_grad()


def test_image_features_land_on_placeholders_only(tiny_vlm):
    model, processor = tiny_vlm
    batch = collate(processor, [(conversation("Hi?", "Yes."), [random_image(4)]), (conversation("Yo?", "No.", 0), [])])
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"]).logits
        other = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"] * 0).logits
    # The text-only sample (row 1) does not see the other sample's image.
    assert torch.allclose(plain[1], other[1], atol=1e-6)
    assert not torch.allclose(plain[0], other[0], atol=1e-4)


def test_batched_generation_left_pads_and_matches_single(tiny_vlm):
    model, processor = tiny_vlm
    conversations = [conversation("What colour is the big shape here?"), conversation("Hi", images=0)]
    images = [[random_image(5)], []]
    batch = processor.prompt_inputs(conversations, images)
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1  # left padding
    settings = {"max_new_tokens": 6, "do_sample": False, "min_new_tokens": 6}
    with torch.no_grad():
        batched = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1]:]
        for row, (conv, imgs) in enumerate(zip(conversations, images)):
            single = processor.prompt_inputs([conv], [imgs])
            alone = model.generate(**single, **settings)[:, single["input_ids"].shape[1]:]
            assert torch.equal(alone[0], batched[row])
        no_cache = model.generate(**batch, **settings, use_cache=False)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(no_cache, batched)
    assert not (batched == model.config.image_token_id).any()


@pytest.mark.parametrize("tower, prefix", [
    ("tiny_vision_dir", 1), ("tiny_clip_dir", 1), ("tiny_siglip_dir", 0), ("tiny_dinov2_dir", 1),
])
def test_vision_towers(request, tiny_llm_dir, tower, prefix):
    folder = request.getfixturevalue(tower)
    model, processor = build_vlm(vision=folder, llm=tiny_llm_dir, connector="linear")
    assert model.config.vision_num_prefix_tokens == prefix
    assert model.config.image_seq_length == 16  # 32 px / 8 px patches, prefix tokens dropped
    inputs = processor.prompt_inputs([conversation("What?")], [[random_image(6)]])
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_feature_layer_and_full_strategy(tiny_vision_dir, tiny_llm_dir):
    model, processor = build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, connector="linear",
                                 vision_feature_layer=-1, vision_feature_select_strategy="full")
    assert model.config.image_seq_length == 17  # CLS kept
    pixel_values = processor.image_processor([random_image(7)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.get_vision_features(pixel_values)
        last = model.vision_tower(pixel_values=pixel_values).last_hidden_state
    assert torch.equal(features, last)


def test_clip_two_tower_folder_gets_default_processor(tiny_clip_dir, tiny_llm_dir):
    _, processor = build_vlm(vision=tiny_clip_dir, llm=tiny_llm_dir)
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}


def test_logits_at_labels_only_matches_the_full_loss_and_gradients(tiny_vlm):
    model, processor = tiny_vlm
    batch = collate(processor, [
        (conversation("Compare.", "Both red.", images=2), [random_image(11), random_image(12)]),
        (conversation("Say hi.", "Hi there!", images=0), []),
    ])

    def loss_and_grads(fast: bool, **kwargs):
        model.logits_at_labels_only = fast
        model.zero_grad()
        loss = model(**batch, **kwargs).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.connector.parameters()]

    try:
        for kwargs in ({}, {"num_items_in_batch": torch.tensor(37)}):
            full_loss, full_grads = loss_and_grads(False, **kwargs)
            fast_loss, fast_grads = loss_and_grads(True, **kwargs)
            assert torch.allclose(full_loss, fast_loss, atol=1e-6)
            for a, b in zip(full_grads, fast_grads):
                assert torch.allclose(a, b, atol=1e-6)
    finally:
        model.logits_at_labels_only = False
        model.zero_grad()


def test_turn_weights_give_every_answer_turn_the_same_total():
    from vlkit.modeling import turn_weights

    supervised = torch.tensor([[False, True, True, False, True], [True, False, False, True, True]])
    # Row 1 starts a new turn although row 0 ends with a supervised position.
    assert turn_weights(supervised).tolist() == [0.5, 0.5, 1.0, 1.0, 0.5, 0.5]
    # Square averaging: a turn of n tokens weighs sqrt(n) in all.
    four = torch.tensor([[True, True, True, True, False, True]])
    assert turn_weights(four, power=0.5).tolist() == [0.5, 0.5, 0.5, 0.5, 1.0]


def test_the_turn_average_weighs_a_one_word_reply_like_a_long_one(tiny_vlm):
    model, processor = tiny_vlm
    batch = collate(processor, [
        (conversation("Describe.", "A large red circle at the top and a small blue star.", images=1), [random_image(5)]),
        (conversation("Colour?", "red", images=1), [random_image(6)]),
    ])
    model.logits_at_labels_only = True
    try:
        with torch.no_grad():
            token_mean = model(**batch).loss
            model.loss_turn_power = 1.0
            turn_mean = model(**batch).loss
            model.loss_turn_power = 0.5
            square_mean = model(**batch).loss
            # The same figures from the full logits: the mean of each turn's own mean, and the mean
            # weighted by the square root of each turn's length.
            model.logits_at_labels_only, model.loss_turn_power = False, None
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        per_turn = [torch.nn.functional.cross_entropy(logits[row][targets[row] != -100], targets[row][targets[row] != -100])
                    for row in range(2)]  # one answer turn per row
        assert torch.allclose(turn_mean, torch.stack(per_turn).mean(), atol=1e-5)
        assert not torch.allclose(turn_mean, token_mean, atol=1e-3)  # the long reply no longer dominates
        lengths = torch.tensor([float((targets[row] != -100).sum()) for row in range(2)]).sqrt()
        assert torch.allclose(square_mean, (torch.stack(per_turn) * lengths).sum() / lengths.sum(), atol=1e-5)
    finally:
        model.logits_at_labels_only, model.loss_turn_power = False, None


def vlm_on(text_config) -> VlkitForConditionalGeneration:
    """A random VLM around any causal LM config (tiny CLIP tower, mlp connector)."""
    from conftest import tiny_clip_vision_config

    from vlkit import VlkitConfig

    torch.manual_seed(3)
    config = VlkitConfig(vision_config=tiny_clip_vision_config(), text_config=text_config,
                         image_token_id=text_config.vocab_size - 1, image_seq_length=16)
    return VlkitForConditionalGeneration(config)


TINY_LLM = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16)


@pytest.mark.parametrize("llm, after_the_head, labels_only", [
    ("llama", {}, True),
    ("gemma2", {"final_logit_softcapping": 30.0}, False),  # soft-caps its logits
    ("gemma2", {"final_logit_softcapping": None}, True),
    ("cohere", {"logit_scale": 0.0625}, False),  # scales its logits
    ("cohere", {"logit_scale": 1.0}, True),
])
def test_labels_only_logits_are_used_only_where_they_give_the_llms_own_loss(llm, after_the_head, labels_only):
    from transformers import CONFIG_MAPPING

    model = vlm_on(CONFIG_MAPPING[llm](**TINY_LLM, **after_the_head))
    assert model.logits_at_labels_only is False  # off until training asks for it
    assert model.use_loss_at_labels() is labels_only
    assert model.logits_at_labels_only is labels_only
    # Whatever the probe chose, the training loss is the LLM's own.
    input_ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[:, :4] = -100
    own = model.language_model(input_ids=input_ids, labels=labels).loss
    assert torch.allclose(model(input_ids=input_ids, labels=labels).loss, own, atol=1e-5)


def test_the_labels_only_switch_stays_out_of_saved_configs(tiny_vlm, tmp_path):
    import json

    model, _ = tiny_vlm
    assert model.use_loss_at_labels()
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.logits_at_labels_only = False
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "logits_at_labels_only" not in json.dumps(saved)
    # Folders written by earlier vlkit versions carried it in config.json; they still load, without it.
    saved["logits_at_labels_only"] = True
    (tmp_path / "config.json").write_text(json.dumps(saved))
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert reloaded.logits_at_labels_only is False and not hasattr(reloaded.config, "logits_at_labels_only")


def test_rebuilding_gives_identical_models(tiny_vision_dir, tiny_llm_dir):
    # Run dirs store only trained weights, so everything else must be rebuilt identically.
    first, _ = build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, connector="linear")
    second, _ = build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, connector="linear")
    first_state, second_state = first.state_dict(), second.state_dict()
    for name, tensor in first_state.items():
        if not name.startswith("connector."):
            assert torch.equal(tensor, second_state[name]), name
