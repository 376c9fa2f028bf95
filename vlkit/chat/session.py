"""A chat session: the conversation with its images, the generation settings, fitting the context.

Owns the state that the REPL shows and the commands edit:

- turns: user turns carry their images (`<image>` markers in the content, one per image, where the
  user put them or before the text); every reply re-encodes the whole conversation still in
  context, with all its images, so images may join at any turn;
- images attached with `/image` wait in `pending` until the next message;
- before each reply the prompt (image tokens included) is measured against the LLM's context
  minus the reply's budget, and the oldest user/assistant exchanges are dropped, with their
  images, until it fits; `context_start` says how many turns were dropped;
- a reply stopped with Ctrl-C is kept (marked `interrupted`): the user saw it, and the next
  turn may refer to it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlkit.chat.stream import stream_generate
from vlkit.data.images import load_image
from vlkit.errors import VlkitError, first_line


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


class ChatError(VlkitError):
    """Something a chat user asked for cannot be done (bad command, message too long, unwritable file)."""


@dataclass
class AttachedImage:
    path: str  # as the user typed it
    resolved: str  # absolute, for transcripts
    image: Image.Image = field(repr=False)


def load_attachments(paths: list[str]) -> tuple[list[AttachedImage], list[str]]:
    """Decode each image now (so a bad one is reported at once); (loaded, one error line per failure)."""
    attached, errors = [], []
    for path in paths:
        try:
            image = load_image(Path(path).expanduser())
        except VlkitError as error:
            errors.append(str(error))
            continue
        attached.append(AttachedImage(path, str(Path(path).expanduser().resolve()), image))
    return attached, errors


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    content: str  # as the model sees it: one `<image>` marker per image in user turns
    images: list[AttachedImage] = field(default_factory=list)
    interrupted: bool = False


@dataclass
class Settings:
    """Generation settings (`/set NAME VALUE`). temperature 0 means greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0
    verbose: bool = False


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("on", "true", "yes", "1"):
        return True
    if lowered in ("off", "false", "no", "0"):
        return False
    raise ValueError("expected on or off")


def checked(kind: type, low: float | None, high: float | None, low_open: bool = False) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise ValueError("expected an integer" if kind is int else "expected a number") from None
        if low is not None and (value < low or (low_open and value == low)):
            raise ValueError(f"must be {'>' if low_open else '>='} {low}")
        if high is not None and value > high:
            raise ValueError(f"must be <= {high}")
        return value

    return parse


# name -> parser of the value typed after `/set name`
SETTING_PARSERS: dict[str, Callable[[str], Any]] = {
    "temperature": checked(float, 0.0, None),
    "top_p": checked(float, 0.0, 1.0, low_open=True),
    "max_new_tokens": checked(int, 1, None),
    "repetition_penalty": checked(float, 0.0, None, low_open=True),
    "verbose": parse_bool,
}


@dataclass
class Reply:
    """One answer and the figures about it."""

    text: str
    finish_reason: str  # "stop" | "length" | "interrupted"
    prompt_tokens: int
    image_tokens: int
    images_in_prompt: int
    new_tokens: int
    first_token_seconds: float | None
    seconds: float
    dropped_exchanges: int = 0

    def summary(self) -> str:
        """The verbose line: prompt size, images, time to first token, speed."""
        rate = self.new_tokens / self.seconds if self.seconds > 0 else 0.0
        first = f"{self.first_token_seconds:.2f} s" if self.first_token_seconds is not None else "-"
        return (f"prompt {plural(self.prompt_tokens, 'token')} ({plural(self.images_in_prompt, 'image')}, "
                f"{plural(self.image_tokens, 'image token')}) | first token {first} | "
                f"{plural(self.new_tokens, 'token')} in {self.seconds:.2f} s ({rate:.1f} tok/s)"
                f" | {self.finish_reason}")


class ChatSession:
    """A conversation with one loaded model (`vlkit.loading.LoadedModel`)."""

    def __init__(self, loaded, system: str | None = None, settings: Settings | None = None) -> None:
        self.loaded = loaded
        self.system = system
        self.settings = settings or Settings()
        self.turns: list[Turn] = []
        self.context_start = 0  # turns before this index were dropped to fit the context
        self.pending: list[AttachedImage] = []

    # --- images ---------------------------------------------------------------------------------------
    def attach(self, paths: list[str]) -> tuple[list[AttachedImage], list[str]]:
        """Load images for the next message; returns (attached, one error line per image that failed)."""
        attached, errors = load_attachments(paths)
        self.pending.extend(attached)
        return attached, errors

    def context_turns(self) -> list[Turn]:
        return self.turns[self.context_start :]

    def images_in_context(self) -> list[AttachedImage]:
        return [image for turn in self.context_turns() for image in turn.images]

    def reset(self) -> None:
        """Forget the conversation and the pending images; keep the system prompt and settings."""
        self.turns, self.context_start, self.pending = [], 0, []

    # --- prompts --------------------------------------------------------------------------------------
    def messages(self, turns: list[Turn]) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": turn.role, "content": turn.content} for turn in turns]

    def user_turn(self, text: str) -> Turn:
        """The next user turn: pending images placed at the user's `<image>` markers, else before the text."""
        marker = self.loaded.image_token
        markers, images = text.count(marker), list(self.pending)
        if markers == 0:
            content = f"{marker}\n" * len(images) + text
        elif markers == len(images):
            content = text
        else:
            attach = "/image PATH attaches one" if not images else "put one marker per image, or none"
            raise ChatError(f"your message has {markers} {marker} marker(s) but {len(images)} image(s) are attached; {attach}")
        return Turn("user", content, images)

    def fit_context(self, user: Turn) -> tuple[int, int, int]:
        """Drop the oldest exchanges until the prompt leaves room for the reply.

        Returns (new context_start, exchanges dropped, prompt tokens). The reply keeps
        min(max_new_tokens, context / 2) tokens of room; a message that does not fit even alone
        is a ChatError.
        """
        limit = self.loaded.context_length
        start = self.context_start
        tokens = self.loaded.count_prompt_tokens(self.messages([*self.turns[start:], user]))
        if limit is None:
            return start, 0, tokens
        budget = limit - min(self.settings.max_new_tokens, limit // 2)
        dropped = 0
        while tokens > budget and start < len(self.turns):
            start = min(start + 2, len(self.turns))  # one user/assistant exchange, with its images
            dropped += 1
            tokens = self.loaded.count_prompt_tokens(self.messages([*self.turns[start:], user]))
        if tokens > budget:
            raise ChatError(
                f"this message is {tokens} tokens with its images, more than the {budget} the context leaves "
                f"({limit} minus room for the reply); shorten it, attach fewer images, or /set max_new_tokens lower"
            )
        return start, dropped, tokens

    def generate_kwargs(self, prompt_tokens: int) -> dict[str, Any]:
        settings, loaded = self.settings, self.loaded
        max_new = settings.max_new_tokens
        if loaded.context_length is not None:
            max_new = max(1, min(max_new, loaded.context_length - prompt_tokens))
        eos = loaded.end_of_turn_ids()
        pad = loaded.tokenizer.pad_token_id
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "eos_token_id": eos,
                                  "pad_token_id": pad if pad is not None else (eos[0] if eos else None)}
        if settings.temperature > 0:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
        else:
            kwargs.update(do_sample=False)
        if settings.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = settings.repetition_penalty
        return kwargs

    # --- one exchange ---------------------------------------------------------------------------------
    def send(
        self,
        text: str,
        on_text: Callable[[str], None] | None = None,
        on_notice: Callable[[str], None] | None = None,
        catch_interrupt: bool = True,
    ) -> Reply:
        """Add a user message (with the pending images), generate the reply, and keep both.

        On any error the conversation and the pending images are left as they were.
        """
        user = self.user_turn(text)
        start, dropped, _ = self.fit_context(user)
        if dropped:
            images = sum(len(turn.images) for turn in self.turns[self.context_start : start])
            if on_notice is not None:
                on_notice(
                    f"context full: dropped the oldest {plural(dropped, 'exchange')} ({plural(images, 'image')}) to fit "
                    f"{self.loaded.context_length} tokens"
                )
        turns = [*self.turns[start:], user]
        images = [[attached.image for turn in turns for attached in turn.images]]
        inputs = self.loaded.prompt_inputs([self.messages(turns)], images)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        image_tokens = int((inputs["input_ids"] == self.loaded.image_token_id).sum())
        generate_kwargs = self.generate_kwargs(prompt_tokens)
        generated = stream_generate(self.loaded.model, inputs, self.loaded.tokenizer, generate_kwargs,
                                    on_text=on_text, catch_interrupt=catch_interrupt)
        reply_text = self.loaded.decode(generated.new_ids).strip()
        new_tokens = int(generated.new_ids.numel())
        if generated.interrupted:
            finish = "interrupted"
        elif new_tokens >= generate_kwargs["max_new_tokens"]:
            finish = "length"
        else:
            finish = "stop"
        self.context_start = start
        self.turns += [user, Turn("assistant", reply_text, interrupted=generated.interrupted)]
        self.pending = []
        return Reply(
            text=reply_text, finish_reason=finish, prompt_tokens=prompt_tokens, image_tokens=image_tokens,
            images_in_prompt=len(images[0]), new_tokens=new_tokens,
            first_token_seconds=generated.first_token_seconds, seconds=generated.seconds, dropped_exchanges=dropped,
        )

    # --- transcripts ----------------------------------------------------------------------------------
    def transcript(self) -> dict[str, Any]:
        """Everything needed to read (or replay) the conversation; turns dropped from the context included."""
        turns = []
        for turn in self.turns:
            entry: dict[str, Any] = {"role": turn.role, "content": turn.content}
            if turn.role == "user":
                entry["images"] = [image.resolved for image in turn.images]
            if turn.interrupted:
                entry["interrupted"] = True
            turns.append(entry)
        return {
            "model": self.loaded.source,
            "model_kind": self.loaded.kind,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "system": self.system,
            "settings": dataclasses.asdict(self.settings),
            "image_token": self.loaded.image_token,
            "dropped_from_context": self.context_start,
            "turns": turns,
        }

    def save(self, path: str) -> Path:
        target = Path(path).expanduser()
        try:
            target.write_text(json.dumps(self.transcript(), indent=2) + "\n")
        except OSError as error:
            raise ChatError(f"cannot write {target}: {first_line(error)}") from None
        return target
