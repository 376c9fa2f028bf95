"""How the shapes world's answers are scored: `vlkit eval --scorer data_tools.shapes_scoring:scorer_for`.

- short answers (colour, shape, count, position, existence): exact match after the world's own
  normalisation (case, punctuation, number words), unchanged since the world's first version, so
  figures stay comparable across versions;
- descriptions: correct when the set of (colour, shape) pairs the prediction names equals the
  truth's; the colour and shape words come from world.json next to the data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

NUMBER_WORDS = {"zero": "0", "none": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}


def normalize_answer(text: str) -> str:
    words = re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(word, word) for word in words)


def named_pairs(text: str, colours: list[str], shapes: list[str]) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a sentence names: a colour followed by a shape within two words."""
    words = re.sub(r"[^a-z ]", " ", text.lower()).split()
    singular = {shape + "s": shape for shape in shapes} | {shape + "es": shape for shape in shapes}
    words = [singular.get(word, word) for word in words]
    pairs = set()
    for index, word in enumerate(words):
        if word in colours:
            for follower in words[index + 1 : index + 4]:
                if follower in shapes:
                    pairs.add((word, follower))
                    break
    return pairs


def score(prediction: str, answer: str, question_type: str, vocabulary: dict[str, list[str]]) -> bool:
    if question_type == "description":
        colours, shapes = vocabulary["colours"], vocabulary["shapes"]
        return named_pairs(prediction, colours, shapes) == named_pairs(answer, colours, shapes)
    return normalize_answer(prediction) == normalize_answer(answer)


def load_vocabulary(data_file: Path) -> dict[str, list[str]]:
    """Colours and shapes of the world (world.json next to the data); empty lists without one."""
    world_file = Path(data_file).parent / "world.json"
    if world_file.is_file():
        world = json.loads(world_file.read_text())
        return {"colours": list(world["colours"]), "shapes": list(world["shapes"])}
    return {"colours": [], "shapes": []}


def scorer_for(data_file: str | Path) -> Callable[[str, str, str], bool]:
    """The scorer `vlkit eval` calls per answer, bound to the world of `data_file`."""
    vocabulary = load_vocabulary(Path(data_file))
    return lambda prediction, answer, question_type: score(prediction, answer, question_type, vocabulary)
