"""Streaming generation that Ctrl-C can stop: `model.generate` in a thread, text through a queue.

Owns the thread, the `TextIteratorStreamer` and the stop flag. KeyboardInterrupt only ever reaches
the main thread, so the main thread catches it while it waits for text, sets a flag that a
`StoppingCriteria` checks after every token, and keeps reading until `generate` returns: the
tokens made so far are kept, and the model is never left running in the background.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer


class StopFlag(StoppingCriteria):
    """Stops generation once `event` is set; records when the first new token arrived."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.first_token_at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()  # called right after each new token
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class Generated:
    """The new token ids of one reply and how it went."""

    new_ids: torch.Tensor  # [T_new]
    interrupted: bool
    seconds: float  # from the call to the last token
    first_token_seconds: float | None  # time to first token (prefill included)


def stream_generate(
    model,
    inputs: dict[str, torch.Tensor],
    tokenizer,
    generate_kwargs: dict[str, Any],
    on_text: Callable[[str], None] | None = None,
    catch_interrupt: bool = True,
) -> Generated:
    """Generate one reply for a single prompt, calling `on_text` with each printable piece.

    catch_interrupt: Ctrl-C stops the reply and returns what was made (interactive use); when
    False the KeyboardInterrupt propagates after generation has been told to stop.
    """
    stop = threading.Event()
    flag = StopFlag(stop)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["output"] = model.generate(
                **inputs, **generate_kwargs, streamer=streamer, stopping_criteria=StoppingCriteriaList([flag])
            )
        except BaseException as error:  # handed to the main thread below
            result["error"] = error
            streamer.end()  # wake the reader

    started = time.perf_counter()
    worker = threading.Thread(target=work, name="vlkit-generate", daemon=True)
    worker.start()
    interrupted = False
    while True:
        try:
            try:
                piece = streamer.text_queue.get(timeout=0.1)
            except queue.Empty:
                if not worker.is_alive() and streamer.text_queue.empty():
                    break
                continue
            if piece is streamer.stop_signal:
                break
            if on_text is not None and piece:
                on_text(piece)
        except KeyboardInterrupt:
            stop.set()
            interrupted = True
            if not catch_interrupt:
                raise
    worker.join()
    if "error" in result:
        raise result["error"]
    prompt_length = inputs["input_ids"].shape[1]
    return Generated(
        new_ids=result["output"][0, prompt_length:].cpu(),
        interrupted=interrupted,
        seconds=time.perf_counter() - started,
        first_token_seconds=None if flag.first_token_at is None else flag.first_token_at - started,
    )
