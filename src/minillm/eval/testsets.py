"""Test sets: the shared format registry (:mod:`minillm.data.formats`) read under evaluation's rules.

Every format training reads is a test-set format and the other way round (``eval.format``, or
``eval.formats`` per set; ``auto`` picks it from the first record). Evaluation is stricter than
training, which drops and counts what it cannot use: here a record with a blank prompt, a blank
reference (an empty answer would be an exact match) or, in a format that carries answers (Dolly,
SelfInst, S-NI, UnNI), no answer at all is refused with its file and line. Vicuna questions and
plain prompts may come without references; Rouge-L, exact match and the LM loss are then n/a and
only the judge and reference-free metrics apply. The LM loss is taken on an example's first
reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minillm.data.formats import FORMATS as REGISTRY
from minillm.data.formats import Example, parse_records
from minillm.data.formats import sniff_format as _sniff
from minillm.errors import UserError

FORMATS = ("auto", *REGISTRY)

__all__ = ["FORMATS", "TestSet", "load_test_set", "sniff_format"]


@dataclass
class TestSet:
    """A loaded test set: the resolved format and its examples (in file order)."""

    source: str
    format: str
    examples: list[Example]

    __test__ = False  # not a pytest class

    @property
    def has_references(self) -> bool:
        return any(ex.references for ex in self.examples)


def sniff_format(rec: Any, where: str = "") -> str:
    """The format of a test-set record (:func:`minillm.data.formats.sniff_format`, set by eval.format)."""
    return _sniff(rec, where, key="eval.format")


def _check_example(ex: Example) -> None:
    prompt = ex.instruction if ex.messages is None else ex.messages[-1]["content"] if ex.messages else ""
    if not prompt.strip():
        raise UserError(f"{ex.source}: the prompt is empty")
    for i, ref in enumerate(ex.references):
        if not ref.strip():
            raise UserError(f"{ex.source}: reference {i + 1} of {len(ex.references)} is blank; fill it in or drop the record")


def load_test_set(source: str, fmt: str = "auto", max_examples: int | None = None, split: str = "test") -> TestSet:
    """Read and validate a test set (JSONL / JSON file, saved or Hub dataset) into examples.

    ``max_examples`` keeps the first N examples (after instances are expanded).
    """
    if fmt not in FORMATS:
        raise UserError(f"eval.format: unknown format {fmt!r}; choose one of {FORMATS}")
    examples: list[Example] = []
    resolved = None
    for parsed in parse_records(source, fmt, split, key="eval.format"):
        resolved = parsed.format
        for ex in parsed.examples:
            if resolved.answer is not None and not ex.references:
                article = "an" if resolved.answer[0] in "aeiou" else "a"
                raise UserError(f"{ex.source}: {resolved.name} record needs {article} {resolved.answer!r} (its reference answer); "
                                f"found {sorted(map(str, parsed.record))} (or set eval.format)")
            _check_example(ex)
            if ex.references:
                ex.response = ex.references[0]
            examples.append(ex)
        if max_examples is not None and len(examples) >= max_examples:
            examples = examples[:max_examples]
            break
    if not examples or resolved is None:
        raise UserError(f"{source}: no records found")
    return TestSet(source=source, format=resolved.name, examples=examples)
