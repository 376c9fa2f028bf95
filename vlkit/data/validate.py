"""`vlkit data validate FILE --images DIR [--model M]`: check a data file before training.

Reads the whole set: every sample's text, every image file (each decoded once), and with
`--model` every sample's encoded length. Prints one line per problem kind with a count and the
first few examples, then a summary line. Exits 0 when the set is clean (or, with
`--max-bad-fraction F`, when at most that fraction of samples is bad) and 1 otherwise.

The checks are those the training dataset applies (`vlkit.data.checks`), so a set that passes
here loses nothing to skipping during training.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from vlkit.data.checks import (
    REASONS,
    Problem,
    check_caption,
    check_images,
    check_messages,
    decode_problem,
    length_problem,
)
from vlkit.data.formats import detect_format, load_clip_pairs, load_conversations
from vlkit.errors import ConfigError, ModelLoadError, first_line

EXAMPLES_KEPT = 20


@dataclass
class ValidationReport:
    """What `validate_file` found: sample counts and, per problem, a count and the first examples."""

    path: str
    format: str
    image_root: str
    total: int = 0
    images_referenced: int = 0
    images_decoded: int = 0
    max_length: int | None = None
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # reason -> [(id, detail)]

    def add(self, sample_id: str, problem: Problem | None) -> None:
        if problem is None:
            return
        reason, detail = problem
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_KEPT:
            examples.append((sample_id, detail))

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.total if self.total else 1.0

    def passed(self, max_bad_fraction: float | None = None) -> bool:
        if self.total == 0:
            return False
        if max_bad_fraction is None:
            return self.bad == 0
        return self.bad_fraction <= max_bad_fraction

    def print(self, show: int = 3, max_bad_fraction: float | None = None, file: TextIO | None = None) -> None:
        out = file or sys.stdout
        print(f"{self.path}: {self.format}, {self.total} samples, image root {self.image_root}", file=out)
        print(f"  images: {self.images_referenced} referenced, {self.images_decoded} distinct files decoded", file=out)
        if self.max_length is not None:
            print(f"  lengths measured against max_length {self.max_length}", file=out)
        for reason in REASONS:
            if not self.counts[reason]:
                continue
            print(f"  {reason}: {self.counts[reason]} sample(s) ({REASONS[reason]})", file=out)
            for sample_id, detail in self.examples[reason][:show]:
                print(f"    - {sample_id}: {detail}", file=out)
        percent = 100.0 * self.bad_fraction if self.total else 0.0
        verdict = "OK" if self.passed(max_bad_fraction) else "FAILED"
        if self.total == 0:
            summary = "no samples"
        elif self.bad == 0:
            summary = f"all {self.total} samples are usable"
        else:
            summary = f"{self.bad} of {self.total} samples are bad ({percent:.2f}%)"
            if max_bad_fraction is not None:
                relation = "within" if self.passed(max_bad_fraction) else "above"
                summary += f", {relation} --max-bad-fraction {max_bad_fraction:g}"
        print(f"{verdict}: {summary}", file=out)


def _decode_all(paths: set[str], image_root: str, allow_outside_root: bool, progress: bool) -> dict[str, Problem | None]:
    """Decode each distinct image once, on a few threads (Pillow releases the GIL while decoding)."""
    ordered = sorted(paths)
    workers = min(8, (os.cpu_count() or 1) + 1)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda p: decode_problem(p, image_root, allow_outside_root), ordered)
        decoded = dict(zip(ordered, tqdm(results, total=len(ordered), desc="decoding images", unit="img",
                                         disable=not progress)))
    return decoded


def validate_file(
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    format: str = "auto",
    processor: Any = None,
    max_length: int | None = None,
    allow_outside_root: bool = False,
    progress: bool = True,
) -> ValidationReport:
    """Check every sample of a LLaVA / ShareGPT / CLIP pairs file; see the module docstring."""
    if format == "auto":
        format = detect_format(path)
    if max_length is not None and processor is None:
        raise ConfigError("--max-length needs --model: sample lengths are counted with the model's tokenizer")
    root = str(image_root)
    if not Path(root).is_dir():
        raise ConfigError(f"image root '{root}' is not a folder; pass the folder image paths are relative to")
    report = ValidationReport(str(path), format, root, max_length=max_length)
    if format == "clip":
        rows = load_clip_pairs(path)
        samples = [(r["id"], [r["image"]] if r["image"] else [], r["caption"], None) for r in rows]
    else:
        rows = load_conversations(path, format=format)
        samples = [(r["id"], r["images"], None, r["messages"]) for r in rows]
    report.total = len(samples)
    report.images_referenced = sum(len(images) for _, images, _, _ in samples)

    # Text first, then cheap file checks; only files that pass those get decoded.
    problems: list[Problem | None] = []
    for _sample_id, images, caption, messages in samples:
        if messages is None:
            problem = check_caption(caption) or (None if images else ("missing_image", "no image path"))
        else:
            problem = check_messages(messages, len(images))
        problems.append(problem or check_images(images, root, allow_outside_root))
    to_decode = {p for (_, images, _, _), problem in zip(samples, problems) if problem is None for p in images}
    decoded = _decode_all(to_decode, root, allow_outside_root, progress)
    report.images_decoded = len(decoded)

    measure = processor is not None and max_length is not None
    bar = tqdm(samples, desc="measuring lengths", unit="sample", disable=not (progress and measure))
    for (sample_id, images, _, messages), problem in zip(bar, problems):
        if problem is None:
            problem = next((decoded[p] for p in images if decoded.get(p) is not None), None)
        if problem is None and measure and messages is not None:
            problem = length_problem(processor, messages, len(images), max_length)
        report.add(sample_id, problem)
    return report


def _load_processor(model: str) -> tuple[Any, int | None]:
    """The processor of a run dir, a checkpoint or a vlkit export, and the LLM's maximum length from its config
    (no weights are loaded)."""
    folder = Path(model)
    try:
        from transformers import AutoConfig, AutoProcessor

        import vlkit  # noqa: F401  (registers VlkitConfig / VlkitProcessor with the Auto classes)

        if (folder / "manifest.json").is_file():  # a run dir, or a checkpoint (its run's processor/ two up)
            from vlkit.llm import resolve_llm_path
            from vlkit.processing import VlkitProcessor
            from vlkit.run_folder import RunManifest

            saved = next((p for p in (folder / "processor", folder.parent.parent / "processor") if p.is_dir()), None)
            if saved is None:
                raise ModelLoadError(f"{folder} is a run without its processor/ folder; give the run dir")
            processor = VlkitProcessor.from_pretrained(saved)
            config = AutoConfig.from_pretrained(resolve_llm_path(RunManifest.read(folder).locate("llm")))
        else:
            processor = AutoProcessor.from_pretrained(model)
            config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot load the processor of '{model}': {first_line(error)}") from None
    if not hasattr(processor, "encode_conversation"):
        raise ModelLoadError(f"'{model}' has a {type(processor).__name__}, which cannot encode vlkit's conversations; "
                             "give the run dir it was trained in, or an export made with --format vlkit")
    text_config = getattr(config, "text_config", config)
    return processor, getattr(text_config, "max_position_embeddings", None)


def run(args: argparse.Namespace) -> int:
    """Entry point of `vlkit data validate`."""
    processor, max_length = None, args.max_length
    if args.model:
        processor, model_max = _load_processor(args.model)
        max_length = max_length or model_max
    if args.max_bad_fraction is not None and not 0.0 <= args.max_bad_fraction <= 1.0:
        raise ConfigError(f"--max-bad-fraction must be between 0 and 1, got {args.max_bad_fraction}")
    report = validate_file(
        args.file, args.images, format=args.format, processor=processor, max_length=max_length,
        progress=sys.stderr.isatty(),
    )
    report.print(show=args.show, max_bad_fraction=args.max_bad_fraction)
    return 0 if report.passed(args.max_bad_fraction) else 1
