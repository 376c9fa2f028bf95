"""Words files: what each image shows, as a text in one fixed layout of words, the targets of a
`visual_words` connector's reader.

A words file is JSON lines, one image each:

    {"image": "images/train_000000.png", "words": "shapes: 1. left: - - nothing at left. top: small green circle at top. ..."}

Every text has the same number of words (split at whitespace). Word k of every text is slot k of the
layout; its candidates are the distinct words the train file has there, so a slot whose word never
changes ("left:") is fixed text, and the reader chooses among the others' candidates ("small",
"large", "-"). The shapes world's generator writes `words_{split}.jsonl` (`python -m data_tools.shapes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlkit.data.formats import json_lines
from vlkit.errors import DataError

IGNORE = -100  # a word the layout lacks at that slot (a val text with a word train never had): not scored


@dataclass
class WordsRow:
    image: str  # resolved path
    words: list[str]


def read_words_file(path: str | Path, image_root: str | Path) -> list[WordsRow]:
    """The rows of a words file, image paths resolved against image_root; one-line DataError on bad input."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"words file not found: {path} (JSON lines of {{\"image\": PATH, \"words\": TEXT}}; "
                        "python -m data_tools.shapes writes words_{split}.jsonl)")
    rows = []
    for number, row in json_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("words"), str):
            raise DataError(f"{path}:{number}: a row needs an \"image\" path and a \"words\" text")
        rows.append(WordsRow(str(Path(image_root) / row["image"]), row["words"].split()))
    if not rows:
        raise DataError(f"{path}: no rows")
    lengths = {len(row.words) for row in rows}
    if len(lengths) > 1:
        first = next(number for number, row in enumerate(rows, start=1) if len(row.words) != len(rows[0].words))
        raise DataError(f"{path}: every text needs the same number of words (one layout); row 1 has "
                        f"{len(rows[0].words)}, row {first} has {len(rows[first - 1].words)}")
    return rows


def infer_layout(rows: list[WordsRow]) -> list[list[str]]:
    """Per slot, its candidate words in first-seen order."""
    return [list(dict.fromkeys(row.words[slot] for row in rows)) for slot in range(len(rows[0].words))]


def layout_token_ids(layout: list[list[str]], tokenizer) -> list[list[list[int]]]:
    """Per slot, the token ids of each candidate as it reads in the running text (a space before every
    word but the first), the `groups` of a visual_words connector."""
    return [[tokenizer(("" if slot == 0 else " ") + word, add_special_tokens=False)["input_ids"] for word in words]
            for slot, words in enumerate(layout)]


def slot_targets(rows: list[WordsRow], layout: list[list[str]]) -> torch.Tensor:
    """[rows, slots] candidate indices; IGNORE where a row's word is not among the slot's candidates."""
    index = [{word: k for k, word in enumerate(words)} for words in layout]
    if rows and len(rows[0].words) != len(layout):
        raise DataError(f"the words texts have {len(rows[0].words)} words; the layout has {len(layout)} slots")
    return torch.tensor([[index[slot].get(word, IGNORE) for slot, word in enumerate(row.words)] for row in rows])
