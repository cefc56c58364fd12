"""The demo's built-in instruction task: deterministic by seed, scorable, three kinds of prompt.

* ``exact``: one right answer (arithmetic, list reversal, the next weekday) - Rouge-L and exact match;
* ``open``: several right answers (name a colour, an animal that flies ...) - the teacher's
  distribution is multi-modal, which is where mode-seeking reverse KL matters;
* ``long``: long answers of 64-82 tokens (count up to twenty and back down; count to twenty, then
  the days to Sunday, then the months to December), each list ending at a word the prompt names -
  where exposure bias shows; ``long_rounds`` > 1 asks for the answer that many times over
  (``--size large``: 4 rounds, 260-320 tokens).

Records are Dolly-shaped JSONL (``instruction``, ``context``, ``response``) plus ``references``
(every right answer) and ``kind``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from minillm.data.instruct import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
OPEN = {
    "Name a colour.": COLOURS[:5],
    "Name an animal that can fly.": ["bird", "bat", "bee", "owl"],
    "Name a fruit.": ["apple", "banana", "cherry", "pear", "plum"],
    "Give an even number below ten.": ["two", "four", "six", "eight"],
    "Name a day of the weekend.": ["Saturday", "Sunday"],
    "Name a season.": ["spring", "summer", "autumn", "winter"],
}
WORDS = ["sun", "moon", "star", "tree", "river", "stone", "cloud", "rain", "wind", "fire", "snow", "leaf"]


def _exact(rng: random.Random) -> dict[str, Any]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(11), rng.randrange(10)
        ans = f"The answer is {NUMBERS[a + b]}."
        return {"instruction": f"Add {NUMBERS[a]} and {NUMBERS[b]}.", "context": "", "response": ans}
    if kind == 1:
        items = rng.sample(WORDS, rng.randrange(3, 6))
        return {"instruction": "Reverse the list.", "context": " ".join(items), "response": " ".join(reversed(items))}
    d = rng.randrange(7)
    return {"instruction": f"Which day comes after {DAYS[d]}?", "context": "", "response": f"{DAYS[(d + 1) % 7]} comes after {DAYS[d]}."}


def _open(rng: random.Random) -> dict[str, Any]:
    q = rng.choice(sorted(OPEN))
    answers = OPEN[q]
    # a skewed choice: a teacher fits several modes of unequal mass
    weights = [2 ** (len(answers) - i) for i in range(len(answers))]
    ans = rng.choices(answers, weights=weights)[0]
    return {"instruction": q, "context": "", "response": ans, "references": list(answers)}


def _long_answer(rng: random.Random) -> tuple[str, str]:
    """One long instruction and its answer: 33-41 comma-separated words, 65-81 tokens."""
    if rng.random() < 0.5:
        a = rng.randrange(0, 9)
        b = rng.randrange(0, 9 - a)  # a + b <= 8: 33-41 numbers
        words = NUMBERS[a:] + NUMBERS[b:-1][::-1]
        return f"Count from {NUMBERS[a]} up to twenty and back down to {NUMBERS[b]}.", ", ".join(words)
    a = rng.randrange(0, 8)
    d = rng.randrange(0, min(4, 8 - a))
    m = rng.randrange(0, 8 - a - d)  # a + d + m <= 7: 33-40 words
    words = NUMBERS[a:] + DAYS[d:] + MONTHS[m:]
    return (f"Count from {NUMBERS[a]} to twenty, then name the days from {DAYS[d]} to Sunday, "
            f"then the months from {MONTHS[m]} to December.", ", ".join(words))


def _long(rng: random.Random, rounds: int = 1) -> dict[str, Any]:
    instruction, answer = _long_answer(rng)
    if rounds > 1:
        instruction += f" Say it {NUMBERS[rounds]} times."
        answer = ", ".join([answer] * rounds)
    return {"instruction": instruction, "context": "", "response": answer}


KINDS = {"exact": _exact, "open": _open, "long": _long}


def make_examples(n: int, seed: int, mix: tuple[float, float, float] = (0.4, 0.3, 0.3), long_rounds: int = 1) -> list[dict[str, Any]]:
    """``n`` task records, deterministic by ``seed``; ``mix`` = shares of exact / open / long;
    ``long_rounds``: how many times a long answer is repeated (1: 65-81 tokens)."""
    rng = random.Random(seed)
    names = list(KINDS)
    out = []
    for _ in range(n):
        kind = rng.choices(names, weights=mix)[0]
        rec = _long(rng, long_rounds) if kind == "long" else KINDS[kind](rng)
        rec.setdefault("references", [rec["response"]])
        rec["kind"] = kind
        out.append(rec)
    return out


def corpus_texts() -> list[str]:
    """Every string the task can produce, for building a tokenizer that covers it."""
    parts = [ALPACA_NO_INPUT, ALPACA_WITH_INPUT, "The answer is comes after Which day Add and Reverse the list Count from to List months starting from",
             "up and back down then name the days months Say it times"]
    parts += NUMBERS + DAYS + MONTHS + COLOURS + WORDS + [a for v in OPEN.values() for a in v] + list(OPEN)
    parts += pretrain_sentences(random.Random(0), 50)
    return parts


def pretrain_sentences(rng: random.Random, n: int) -> list[str]:
    """Plain sentences over the task's words: the general corpus for the pre-training loss."""
    out = []
    for _ in range(n):
        k = rng.randrange(4)
        if k == 0:
            a = rng.randrange(15)
            out.append(" ".join(NUMBERS[a : a + 5]) + ".")
        elif k == 1:
            d = rng.randrange(7)
            out.append(f"{DAYS[(d + 1) % 7]} comes after {DAYS[d]}.")
        elif k == 2:
            out.append(f"{rng.choice(COLOURS)} and {rng.choice(COLOURS)} and {rng.choice(WORDS)}.")
        else:
            m = rng.randrange(10)
            out.append(", ".join(MONTHS[m : m + 3]) + ".")
    return out


def write_task(out: Path, seed: int, n_train: int, n_valid: int, n_test: int, n_pretrain: int = 400,
               long_rounds: int = 1) -> dict[str, Path]:
    """Write train / valid / test JSONL and a pre-training text corpus under ``out``.

    Also ``test_long.jsonl``: the ``long`` records of the test split, the prompts on which exposure
    bias is measured (the other kinds end within a few tokens)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    splits = {name: make_examples(n, seed * 1000 + offset, long_rounds=long_rounds)
              for offset, (name, n) in enumerate((("train", n_train), ("valid", n_valid), ("test", n_test)))}
    splits["test_long"] = [r for r in splits["test"] if r["kind"] == "long"]
    for name, recs in splits.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in recs))
    paths["pretrain"] = out / "pretrain.txt"
    paths["pretrain"].write_text("\n".join(pretrain_sentences(random.Random(seed + 7), n_pretrain)) + "\n")
    return paths
