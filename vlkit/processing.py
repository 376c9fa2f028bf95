"""VlkitProcessor: image processor + tokenizer + chat template, and training labels.

Inference goes through the stock `ProcessorMixin.__call__`: each `<image>` in the text becomes
`image_seq_length` placeholder tokens and the images become `pixel_values`. Training goes
through `encode_conversation`, which renders a conversation with the LLM's own chat template
and supervises exactly the assistant turns. It finds them by rendering each prefix of the
conversation; a template whose prefixes are not prefixes of the whole (one that rewrites
earlier turns) cannot be masked reliably, and raises `ChatTemplateError` rather than guess.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from transformers import AutoProcessor, ProcessorMixin

from vlkit.errors import ChatTemplateError, DataError, ImageTokenMismatchError
from vlkit.modeling import IGNORE_INDEX, IMAGE_TOKEN, VlkitConfig

# Prepended to the LLM's template so that HF-style content lists
# ([{"type": "image"}, {"type": "text", "text": ...}]) render as text with "<image>\n" markers,
# the same text `content_to_text` produces in Python. Works in any Jinja chat template.
MULTIMODAL_TEMPLATE_PREFIX = (
    "{%- set vlkit_ns = namespace(items=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set vlkit_ns.items = vlkit_ns.items + [message] -%}"
    "{%- else -%}"
    "{%- set vlkit_text = namespace(value='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set vlkit_text.value = vlkit_text.value + '__IMAGE__\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set vlkit_text.value = vlkit_text.value + part['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set vlkit_ns.items = vlkit_ns.items + [{'role': message['role'], 'content': vlkit_text.value}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = vlkit_ns.items -%}"
)


def multimodal_chat_template(text_template: str, image_token: str = IMAGE_TOKEN) -> str:
    """Wrap an LLM chat template so it also accepts HF-style multimodal content lists."""
    if text_template.startswith(MULTIMODAL_TEMPLATE_PREFIX[:40]):
        return text_template
    return MULTIMODAL_TEMPLATE_PREFIX.replace("__IMAGE__", image_token) + text_template


def system_prompt_template(text_template: str, system_prompt: str) -> str:
    """Wrap an LLM chat template so a conversation without a system turn gets `system_prompt`.

    Kept in the template (not in Python) so training, `vlkit chat`, `vlkit eval` and stock
    `transformers` loading an export all render the same prompt.
    """
    literal = json.dumps(system_prompt)  # a JSON string is a valid Jinja string literal
    prefix = (
        "{%- if messages and messages[0]['role'] != 'system' -%}"
        f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages -%}}"
        "{%- endif -%}"
    )
    return prefix + text_template


def content_to_text(content: str | list[dict[str, Any]], image_token: str = IMAGE_TOKEN) -> str:
    """Message content as text: content lists become text with `<image>\\n` markers."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") == "image":
            parts.append(f"{image_token}\n")
        elif part.get("type") == "text":
            parts.append(part["text"])
    return "".join(parts)


class VlkitProcessor(ProcessorMixin):
    """Image processor + tokenizer of a vlkit model.

    image_seq_length: placeholder tokens per image (the connector's `num_tokens`).
    image_token: the placeholder string, a special token of the tokenizer.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_seq_length: int = 1,
        image_token: str = IMAGE_TOKEN,
        chat_template: str | None = None,
        **kwargs,
    ) -> None:
        self.image_seq_length = int(image_seq_length)
        self.image_token = image_token
        if chat_template is None and tokenizer is not None and tokenizer.chat_template:
            chat_template = multimodal_chat_template(tokenizer.chat_template, image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    # --- inference: the stock ProcessorMixin.__call__ uses these ------------------------------------
    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.image_seq_length

    def validate_inputs(self, images=None, text=None, **kwargs) -> None:
        if text is not None and images is not None:
            texts = [text] if isinstance(text, str) else text
            image_list = images if isinstance(images, (list, tuple)) else [images]
            flat = [image for item in image_list for image in (item if isinstance(item, (list, tuple)) else [item])]
            markers = sum(t.count(self.image_token) for t in texts)
            if markers != len(flat):
                raise ImageTokenMismatchError(
                    f"{len(flat)} image(s) given but the text has {markers} {self.image_token} marker(s); "
                    f"put one {self.image_token} where each image belongs"
                )
        elif text is not None:
            texts = [text] if isinstance(text, str) else text
            markers = sum(t.count(self.image_token) for t in texts)
            if markers:
                raise ImageTokenMismatchError(
                    f"the text has {markers} {self.image_token} marker(s) but no images were given"
                )
        super().validate_inputs(images=images, text=text, **kwargs)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The conversation as the LLM's chat template writes it, with `<image>` markers unexpanded."""
        normalized = [
            {"role": m["role"], "content": content_to_text(m["content"], self.image_token)} for m in messages
        ]
        return self.tokenizer.apply_chat_template(
            normalized, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # --- training ---------------------------------------------------------------------------------
    def assistant_spans(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """Render the conversation and return (text, character spans of each assistant turn)."""
        full = self.render(messages)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:index], add_generation_prompt=True) if index else ""
            through = self.render(messages[: index + 1])
            if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
                raise ChatTemplateError(
                    "the LLM's chat template renders earlier turns differently once later turns are added, so "
                    "assistant turns cannot be masked reliably; use a template without history rewriting"
                )
            if len(through) > len(before):
                spans.append((len(before), len(through)))
        return full, spans

    def encode_text(
        self, messages: list[dict[str, Any]], num_images: int, max_length: int | None = None
    ) -> dict[str, list[int]]:
        """The text half of a training sample: input_ids (image placeholders expanded) and labels
        (assistant turns only). It needs no image, only how many, so datasets compute it once and cache it."""
        text, spans = self.assistant_spans(messages)
        markers = text.count(self.image_token)
        if markers != num_images:
            raise ImageTokenMismatchError(
                f"{num_images} image(s) but {markers} {self.image_token} marker(s) in the conversation"
            )
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids: list[int] = []
        labels: list[int] = []
        span_index = 0
        for token_id, (start, _end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
            if token_id == self.image_token_id:
                input_ids += [token_id] * self.image_seq_length
                labels += [IGNORE_INDEX] * self.image_seq_length
                continue
            while span_index < len(spans) and start >= spans[span_index][1]:
                span_index += 1
            supervised = span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]
            input_ids.append(token_id)
            labels.append(token_id if supervised else IGNORE_INDEX)
        if max_length is not None and len(input_ids) > max_length:
            if self.image_token_id in input_ids[max_length:]:
                raise DataError(
                    f"sample is {len(input_ids)} tokens; truncating to max_length={max_length} would cut through "
                    "image tokens"
                )
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError("sample has no assistant tokens left to learn from (empty answer or truncated away)")
        return {"input_ids": input_ids, "labels": labels}

    def encode_images(self, images: list) -> torch.Tensor | None:
        """The image half of a training sample: pixel_values [I, 3, H, W], or None without images."""
        return self.image_processor(list(images), return_tensors="pt")["pixel_values"] if images else None

    def encode_conversation(
        self, messages: list[dict[str, Any]], images: list | None = None, max_length: int | None = None
    ) -> dict[str, Any]:
        """Tokenize a conversation for training: input_ids, labels (assistant turns only), pixel_values."""
        images = list(images or [])
        encoded: dict[str, Any] = self.encode_text(messages, len(images), max_length)
        encoded["pixel_values"] = self.encode_images(images)
        return encoded

    def prompt_inputs(
        self, conversations: list[list[dict[str, Any]]], images: list[list] | None = None
    ) -> dict[str, torch.Tensor]:
        """Left-padded generation inputs for a batch of conversations (each ending with a user turn)."""
        texts = [self.render(conversation, add_generation_prompt=True) for conversation in conversations]
        flat_images = [image for group in (images or []) for image in group] or None
        padding_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # generation continues every row from its last token
        try:
            return self(text=texts, images=flat_images, padding=True, add_special_tokens=False, return_tensors="pt")
        finally:
            self.tokenizer.padding_side = padding_side


AutoProcessor.register(VlkitConfig, VlkitProcessor, exist_ok=True)
