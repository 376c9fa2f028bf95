"""Generation: time to first token and decode tokens/s, vlkit versus stock Llava on the exported model.

    python bench/generate.py                       # SmolLM2-135M + tiny CLIP tower; appends to docs/performance.md
    python bench/generate.py --llm DIR --vision DIR --toy --no-append      # tiny models (tests)

The vlkit model is exported with `vlkit export`'s Llava writer into a temporary folder and loaded
back with stock `LlavaForConditionalGeneration` + `AutoProcessor`; both get the same prompt and
image (the token ids and pixels are checked equal), greedy decoding, the KV cache, and a fixed
number of new tokens. Rows:

- first token (TTFT): `generate(max_new_tokens=1)`, one prompt;
- decode: (time of N tokens - TTFT) / (N - 1), one prompt, and a batch of 4 left-padded prompts;
- a later chat turn: vlkit reuses the image's `vision_features` computed at the first turn (the
  mechanism `vlkit chat` can use), stock Llava runs the tower again.
Speed-ups are medians of per-round ratios. Peak RSS: see bench/common.py; both models are in the
process (separate copies: the export is loaded from disk), so each row holds both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import (
    add_run_options,
    interleaved,
    markdown_table,
    median_ratio,
    publish,
    start,
    verdict,
)
from parts import default_vision

GOAL = 1.0
QUESTIONS = ["Describe the image.", "What colours do you see?", "Is there a person?", "What is in the centre?"]


def test_image():
    """A real photo when scikit-image is installed, else a generated picture."""
    from PIL import Image

    try:
        from skimage import data

        return Image.fromarray(data.astronaut())
    except ImportError:
        import numpy as np

        rng = np.random.default_rng(0)
        return Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))


def conversation(question: str, structured: bool) -> list[dict]:
    if structured:  # HF-style content list, what LlavaProcessor's chat template takes
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return [{"role": "user", "content": f"<image>\n{question}"}]


class Sides:
    """The vlkit model and its stock-Llava export, with the same inputs for each."""

    def __init__(self, args, workdir: Path, load: tuple[str, ...] = ("vlkit", "llava")) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        from vlkit import build_vlm
        from vlkit.export import generation_config_for
        from vlkit.export.llava import write_llava

        vision = args.vision or default_vision(workdir)
        torch.manual_seed(0)
        model, processor = build_vlm(vision=vision, llm=args.llm, connector={"type": "mlp", "depth": 2})
        model.eval()
        export = workdir / "export"
        write_llava(model, processor, export, generation_config_for(model, processor), "2GB")
        self.sources = f"LLM {args.llm}, vision {Path(vision).name}, mlp connector, exported with --format llava"
        self.vlkit = model if "vlkit" in load else None
        self.processor = processor
        self.llava = LlavaForConditionalGeneration.from_pretrained(export).eval() if "llava" in load else None
        self.llava_processor = AutoProcessor.from_pretrained(export)
        self.llava_processor.tokenizer.padding_side = "left"
        image = test_image()
        self.inputs = {}
        for batch in (1, 4):
            questions = QUESTIONS[:batch]
            vlkit_inputs = processor.prompt_inputs([conversation(q, False) for q in questions], [[image]] * batch)
            texts = [self.llava_processor.apply_chat_template(conversation(q, True), add_generation_prompt=True)
                     for q in questions]
            llava_inputs = self.llava_processor(text=texts, images=[image] * batch, padding=True,
                                                add_special_tokens=False, return_tensors="pt")
            if not (torch.equal(vlkit_inputs["input_ids"], llava_inputs["input_ids"])
                    and torch.allclose(vlkit_inputs["pixel_values"], llava_inputs["pixel_values"])):
                raise SystemExit("benchmark invalid: vlkit and LlavaProcessor built different inputs")
            self.inputs[batch] = (dict(vlkit_inputs), dict(llava_inputs))

    def generate(self, side: str, batch: int, new_tokens: int, features: torch.Tensor | None = None) -> torch.Tensor:
        vlkit_inputs, llava_inputs = self.inputs[batch]
        settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        with torch.inference_mode():
            if side == "llava":
                return self.llava.generate(**llava_inputs, **settings)
            if features is not None:
                inputs = {k: v for k, v in vlkit_inputs.items() if k != "pixel_values"}
                return self.vlkit.generate(**inputs, vision_features=features, **settings)
            return self.vlkit.generate(**vlkit_inputs, **settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--vision", default=None, help="default: runs/tiny-clip, runs/demo/clip, or a random tiny tower")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--toy", action="store_true", help="quick settings for tests (2 rounds, 8 tokens)")
    add_run_options(parser)
    args = parser.parse_args(argv)
    start(args)
    if args.toy:
        args.rounds, args.new_tokens = 1, min(args.new_tokens, 8)
    n = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        sides = Sides(args, Path(tmp))
        same = all(torch.equal(sides.generate("vlkit", b, n), sides.generate("llava", b, n)) for b in (1, 4))
        with torch.inference_mode():
            features = sides.vlkit.get_vision_features(sides.inputs[1][0]["pixel_values"])  # the first chat turn's
        jobs = {}
        for side in ("vlkit", "llava"):
            jobs[("first token", side)] = lambda side=side: sides.generate(side, 1, 1)
            jobs[("later turn, first token", side)] = lambda side=side: sides.generate(
                side, 1, 1, features if side == "vlkit" else None)
            jobs[("decode, 1 prompt", side)] = lambda side=side: sides.generate(side, 1, n)
            jobs[("first token, 4 prompts", side)] = lambda side=side: sides.generate(side, 4, 1)
            jobs[("decode, 4 prompts", side)] = lambda side=side: sides.generate(side, 4, n)
        peak_rss: dict[tuple[str, str], float] = {}
        times = interleaved(jobs, rounds=args.rounds, peak_rss=peak_rss)

        def per_token(name: str, side: str, batch: int) -> list[float]:
            """Seconds per generated token after the first: (N tokens - first token) / (N - 1) / batch."""
            prefill = times[("first token" if batch == 1 else "first token, 4 prompts", side)]
            return [(total - first) / (n - 1) / batch for total, first in zip(times[(name, side)], prefill)]

        rss = {side: peak_rss[("decode, 4 prompts", side)] for side in ("vlkit", "llava")}
    rows, ratios = [], {}
    for name, batch in (("first token", 0), ("later turn, first token", 0), ("first token, 4 prompts", 0),
                        ("decode, 1 prompt", 1), ("decode, 4 prompts", 4)):
        if batch:
            series = {side: per_token(name, side, batch) for side in ("vlkit", "llava")}
            shown = {side: f"{1 / statistics.median(s):.1f} tokens/s" for side, s in series.items()}
        else:
            series = {side: times[(name, side)] for side in ("vlkit", "llava")}
            shown = {side: f"{1000 * statistics.median(s):.1f} ms" for side, s in series.items()}
        ratios[name] = median_ratio(series["llava"], series["vlkit"])
        rows.append([name, shown["vlkit"], shown["llava"], f"{ratios[name]:.2f}x"])
    rows.append(["peak RSS MiB (decode, 4 prompts)", *(f"{rss[s]:.0f}" for s in ("vlkit", "llava")), ""])
    table = markdown_table(["measure", "vlkit", "stock Llava (export)", "vlkit speed-up"], rows)
    lines = [
        f"- time to first token: {verdict(ratios['first token'], GOAL)}",
        f"- decode tokens/s, 1 prompt: {verdict(ratios['decode, 1 prompt'], GOAL)}; "
        f"4 left-padded prompts: {verdict(ratios['decode, 4 prompts'], GOAL)}",
        f"- later chat turn (image features reused, tower skipped): {ratios['later turn, first token']:.2f}x",
        f"- greedy outputs identical (1 and 4 prompts, {n} tokens): {'yes' if same else 'NO'}",
    ]
    body = f"{sides.sources}; {n} new tokens, greedy, KV cache, {args.rounds} interleaved rounds.\n\n{table}\n\n" + "\n".join(lines)
    publish("Generation: vlkit vs stock Llava on the export", body, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
