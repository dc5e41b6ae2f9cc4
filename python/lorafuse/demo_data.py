"""The small task `lorafuse demo` fine-tunes on: review sentiment with negation, written here.

Each example is one templated sentence about a subject ("the coffee", "the hotel room", ...)
with a positive or negative adjective, optionally negated ("was not", "was never", "i would
not call ... "). The label is ``1`` (positive) when the adjective's polarity and the negation
agree, ``0`` otherwise -- so a bag of words cannot solve it: "the food was not great" and
"the food was great" share every content word. The split is by *subject*: the held-out
sentences talk about subjects the model never saw in training, so held-out accuracy measures
what it learned about sentiment and negation, not memorised sentences.

Everything is deterministic (a fixed ``random.Random``), independent of the demo's ``--seed``:
the same data on every machine and every run. No torch needed here.
"""

from __future__ import annotations

import random
from typing import NamedTuple

__all__ = ["Example", "LABELS", "make_task", "TRAIN_SUBJECTS", "TEST_SUBJECTS"]

LABELS = ("negative", "positive")

TRAIN_SUBJECTS = (
    "the food", "the service", "the movie", "the hotel room", "the concert", "the book",
    "the staff", "the new phone", "the coffee", "the trip", "the video game", "the lecture",
)
TEST_SUBJECTS = ("the restaurant", "the album", "the museum tour", "the laptop")

POSITIVE = ("great", "wonderful", "excellent", "delightful", "fantastic", "pleasant", "superb",
            "lovely", "amazing", "brilliant", "enjoyable", "impressive")
NEGATIVE = ("terrible", "awful", "boring", "disappointing", "horrible", "dreadful", "mediocre",
            "poor", "unpleasant", "bland", "annoying", "awkward")

# (template, negated?)  {s} = subject, {a} = adjective
TEMPLATES = (
    ("{s} was {a}.", False),
    ("honestly, {s} was {a}.", False),
    ("i thought {s} was really {a}.", False),
    ("everyone agreed that {s} was {a}.", False),
    ("{s} is {a}, in my opinion.", False),
    ("{s} was not {a}.", True),
    ("honestly, {s} was not {a} at all.", True),
    ("i would not call {s} {a}.", True),
    ("{s} was never {a}.", True),
    ("nobody thought {s} was {a}.", True),
)


class Example(NamedTuple):
    text: str
    label: int  # 0 negative, 1 positive


def _all_examples(subjects: tuple[str, ...]) -> list[Example]:
    out = []
    for subject in subjects:
        for words, polarity in ((POSITIVE, 1), (NEGATIVE, 0)):
            for adjective in words:
                for template, negated in TEMPLATES:
                    text = template.format(s=subject, a=adjective)
                    text = text[0].upper() + text[1:]
                    out.append(Example(text, polarity ^ int(negated)))
    return out


def make_task(n_train: int = 480, n_test: int = 160, data_seed: int = 1234) -> tuple[list[Example], list[Example]]:
    """``(train, test)``: balanced, shuffled, deterministic; test subjects never occur in train."""
    rng = random.Random(data_seed)
    splits = []
    for subjects, n in ((TRAIN_SUBJECTS, n_train), (TEST_SUBJECTS, n_test)):
        pool = _all_examples(subjects)
        by_label = [[e for e in pool if e.label == c] for c in (0, 1)]
        if n < 2 or n // 2 > min(len(b) for b in by_label):
            raise ValueError(f"n must be in [2, {2 * min(len(b) for b in by_label)}] for these subjects, got {n}")
        chosen = rng.sample(by_label[0], n // 2) + rng.sample(by_label[1], n - n // 2)
        rng.shuffle(chosen)
        splits.append(chosen)
    return splits[0], splits[1]
