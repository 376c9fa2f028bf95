"""VlkitProcessor: image-token expansion, assistant-only labels, and refusal to guess."""

from __future__ import annotations

import pytest
from conftest import random_image

from vlkit.errors import ChatTemplateError, DataError, ImageTokenMismatchError
from vlkit.processing import IGNORE_INDEX, VlkitProcessor, content_to_text


def supervised_text(processor, encoded) -> str:
    ids = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
    return processor.tokenizer.decode(ids)


def test_labels_cover_exactly_the_assistant_turns(tiny_vlm):
    _, processor = tiny_vlm
    messages = [
        {"role": "user", "content": "<image>\nWhat colour is the circle?"},
        {"role": "assistant", "content": "It is red."},
        {"role": "user", "content": "And the square?"},
        {"role": "assistant", "content": "Blue."},
    ]
    encoded = processor.encode_conversation(messages, [random_image(0)])
    assert supervised_text(processor, encoded) == "It is red.<|im_end|>\nBlue.<|im_end|>\n"
    image_id = processor.image_token_id
    assert encoded["input_ids"].count(image_id) == processor.image_seq_length
    assert all(label == IGNORE_INDEX for t, label in zip(encoded["input_ids"], encoded["labels"]) if t == image_id)
    assert encoded["pixel_values"].shape == (1, 3, 32, 32)


def test_call_expands_each_image_marker(tiny_vlm):
    _, processor = tiny_vlm
    out = processor(text=["<image> and <image>"], images=[random_image(1), random_image(2)], return_tensors="pt")
    assert int((out["input_ids"] == processor.image_token_id).sum()) == 2 * processor.image_seq_length
    assert out["pixel_values"].shape[0] == 2


def test_chat_template_accepts_content_lists(tiny_vlm):
    _, processor = tiny_vlm
    as_list = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    as_text = [{"role": "user", "content": "<image>\nWhat is it?"}]
    rendered = processor.apply_chat_template(as_list, add_generation_prompt=True, tokenize=False)
    assert rendered == processor.tokenizer.apply_chat_template(as_text, add_generation_prompt=True, tokenize=False)
    assert content_to_text(as_list[0]["content"]) == as_text[0]["content"]


def test_image_count_mismatch_is_one_clear_error(tiny_vlm):
    model, processor = tiny_vlm
    with pytest.raises(ImageTokenMismatchError, match="2 image\\(s\\) given but the text has 1 <image> marker"):
        processor(text="<image> what?", images=[random_image(3), random_image(4)])
    with pytest.raises(ImageTokenMismatchError, match="no images were given"):
        processor(text="<image> what?")
    with pytest.raises(ImageTokenMismatchError, match="0 image\\(s\\) but 1 <image> marker"):
        processor.encode_conversation([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}])
    inputs = processor(text="<image> what?", images=[random_image(5)], return_tensors="pt")
    with pytest.raises(ImageTokenMismatchError, match="placeholder tokens but no pixel_values"):
        model(input_ids=inputs["input_ids"])


def test_truncation_never_cuts_image_tokens(tiny_vlm):
    _, processor = tiny_vlm
    messages = [{"role": "user", "content": "Look: <image>"}, {"role": "assistant", "content": "Nice."}]
    with pytest.raises(DataError, match="cut through image tokens"):
        processor.encode_conversation(messages, [random_image(6)], max_length=20)


def test_sample_without_answer_tokens_is_refused(tiny_vlm):
    _, processor = tiny_vlm
    long_question = "tell me " * 40
    messages = [{"role": "user", "content": long_question}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(DataError, match="no assistant tokens"):
        processor.encode_conversation(messages, [], max_length=30)
    with pytest.raises(DataError, match="no assistant tokens"):
        processor.encode_conversation([{"role": "user", "content": "hi"}], [])


def test_history_rewriting_template_is_refused(tiny_vlm):
    _, processor = tiny_vlm
    tokenizer = processor.tokenizer
    # This template shows only the last two turns, so earlier turns vanish as the chat grows.
    rewriting = VlkitProcessor(
        image_processor=processor.image_processor, tokenizer=tokenizer, image_seq_length=processor.image_seq_length,
        chat_template=None,
    )
    original = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% for message in messages[-2:] %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    try:
        messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
        with pytest.raises(ChatTemplateError, match="cannot be masked reliably"):
            rewriting.encode_conversation(messages)
    finally:
        tokenizer.chat_template = original


def test_system_prompt_replaces_the_default_everywhere_it_renders(tiny_vision_dir, tiny_llm_dir, tmp_path):
    from vlkit import build_vlm

    _, plain = build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir)
    _, processor = build_vlm(vision=tiny_vision_dir, llm=tiny_llm_dir, system_prompt='Answer "briefly".')
    question = [{"role": "user", "content": "<image>\nWhat colour is it?"}]
    own_system = [{"role": "system", "content": "Be verbose."}, *question]
    as_list = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]

    rendered = processor.render(question, add_generation_prompt=True)
    assert rendered.startswith('<|im_start|>system\nAnswer "briefly".<|im_end|>\n<|im_start|>user\n<image>')
    assert processor.render(own_system) == plain.render(own_system)  # a conversation's own system turn wins
    assert "Answer" not in plain.render(question)
    # The stock processor template (content lists) and a save/load round trip render the same text.
    assert processor.apply_chat_template(as_list, add_generation_prompt=True, tokenize=False) == rendered
    processor.save_pretrained(tmp_path)
    reloaded = VlkitProcessor.from_pretrained(tmp_path)
    assert reloaded.render(question, add_generation_prompt=True) == rendered
    # Training labels still cover exactly the assistant turn after the injected system turn.
    encoded = processor.encode_conversation([*question, {"role": "assistant", "content": "red"}], [random_image(0)])
    assert supervised_text(processor, encoded) == "red<|im_end|>\n"
