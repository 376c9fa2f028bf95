"""Answer scorers for `vlkit eval`: generic, pluggable, knowing nothing of any data set.

A scorer is `score(prediction, answer, question_type) -> bool`. Built in:
- `exact_match`: equal after VQAv2's answer normalisation (case, punctuation, articles, number
  words to digits, common contractions);
- `yes_no`: the first yes/no word of the prediction against the answer; `yes_no_metrics` gives
  precision, recall and F1 of "yes" as POPE reports them;
- `multiple_choice`: the option letter the prediction gives ("B", "(B)", "B. a cat", "Answer: B");
- `auto` (the default): yes/no for yes/no answers, multiple choice for single-letter answers,
  exact match otherwise.
Others plug in by name (`register_scorer`) or as `module:factory`, a function called with the data
file's path that returns a scorer (e.g. one that reads a world description next to the data).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path

from vlkit.errors import ConfigError

Scorer = Callable[[str, str, str], bool]

# VQAv2's answer normalisation (the evaluation script of the VQA challenge), written out here:
# no maintained library ships it.
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                "wont": "won't", "im": "i'm", "ive": "i've", "youre": "you're", "thats": "that's", "whats": "what's"}
YES_NO = {"yes", "no"}


def normalize_answer(text: str) -> str:
    """Lower case; punctuation, articles and filler removed; number words as digits."""
    text = text.lower().replace("\n", " ").replace("\t", " ")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = re.sub(r"[^\w\s']", " ", text)
    words = []
    for word in text.split():
        word = CONTRACTIONS.get(word.replace("'", ""), word)
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(words)


def exact_match(prediction: str, answer: str, question_type: str = "") -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def yes_no_word(text: str) -> str | None:
    """The first "yes" or "no" in a text, or None."""
    for word in normalize_answer(text).split():
        if word in YES_NO:
            return word
    return None


def yes_no(prediction: str, answer: str, question_type: str = "") -> bool:
    return yes_no_word(prediction) == yes_no_word(answer) is not None


def option_letter(text: str) -> str | None:
    """The option a text picks: "B", "(B)", "B.", "B) a cat", "Answer: B", "the answer is B"."""
    text = text.strip()
    match = re.match(r"^\(?([A-Z])(?:[).:]|\s|$)", text) or re.search(r"answer(?: is)?\s*[:\-]?\s*\(?([A-Z])\b", text, re.I)
    return match.group(1).upper() if match else None


def multiple_choice(prediction: str, answer: str, question_type: str = "") -> bool:
    picked = option_letter(prediction)
    return picked is not None and picked == option_letter(answer)


def auto(prediction: str, answer: str, question_type: str = "") -> bool:
    """Yes/no answers by yes_no, single option letters by multiple_choice, the rest by exact_match."""
    kind = answer_kind(answer)
    if kind == "yes/no":
        return yes_no(prediction, answer)
    if kind == "multiple choice":
        return multiple_choice(prediction, answer)
    return exact_match(prediction, answer)


def answer_kind(answer: str) -> str:
    """How `auto` scores an answer: "yes/no", "multiple choice" or "open"."""
    if normalize_answer(answer) in YES_NO:
        return "yes/no"
    if re.fullmatch(r"\(?[A-Z][).]?", answer.strip()):
        return "multiple choice"
    return "open"


SCORERS: dict[str, Scorer] = {"auto": auto, "exact_match": exact_match, "yes_no": yes_no,
                              "multiple_choice": multiple_choice}


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    """Decorator: make a scorer available to `vlkit eval --scorer NAME`."""
    def add(scorer: Scorer) -> Scorer:
        SCORERS[name] = scorer
        return scorer
    return add


def resolve_scorer(spec: str | Scorer | None, data_file: str | Path) -> Scorer:
    """A scorer from a registered name, a `module:factory` (called with the data file), or a callable."""
    if spec is None:
        return auto
    if callable(spec):
        return spec
    if spec in SCORERS:
        return SCORERS[spec]
    if ":" in spec:
        module_name, attribute = spec.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"cannot load scorer '{spec}': {error}") from None
        return factory(Path(data_file))
    raise ConfigError(f"unknown scorer '{spec}'; use one of {sorted(SCORERS)} or module:factory")


def yes_no_metrics(predictions: list[str], answers: list[str]) -> dict[str, float]:
    """POPE's figures over yes/no questions: accuracy, precision, recall and F1 of "yes", yes ratio."""
    said = [yes_no_word(p) for p in predictions]
    truth = [yes_no_word(a) for a in answers]
    true_yes = sum(s == "yes" and t == "yes" for s, t in zip(said, truth))
    said_yes = sum(s == "yes" for s in said)
    is_yes = sum(t == "yes" for t in truth)
    precision = true_yes / said_yes if said_yes else 0.0
    recall = true_yes / is_yes if is_yes else 0.0
    return {
        "accuracy": sum(s == t for s, t in zip(said, truth)) / len(truth) if truth else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": said_yes / len(said) if said else 0.0,
    }
