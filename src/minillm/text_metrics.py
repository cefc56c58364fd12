"""Text metrics on lists of strings: Rouge-L, exact match, distinct n-grams, response length.

Every function takes plain Python strings and returns a percentage (0-100) unless it says
otherwise, so a user can score any list of responses without a model:

>>> rouge_l(["the cat sat"], [["a cat sat down", "the cat"]])  # doctest: +SKIP

Rouge-L is computed here (tokenisation, Porter stemming and the longest common subsequence) and
matches the ``rouge-score`` package's ``rougeL`` F-measure with ``use_stemmer=True`` (the test
suite checks this to 1e-6 on varied strings); the LCS is a bit-parallel algorithm, so long
responses cost O(n * m / word size) instead of the O(n * m) Python table.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from functools import lru_cache

__all__ = [
    "distinct_n",
    "exact_match",
    "lcs_length",
    "mean_words",
    "normalize_answer",
    "rouge_l",
    "rouge_l_scores",
    "rouge_tokenize",
]

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


@lru_cache(maxsize=1)
def _porter() -> object:
    # NLTK's Porter stemmer (default NLTK_EXTENSIONS mode) is the one rouge-score uses
    from nltk.stem import porter

    return porter.PorterStemmer()


@lru_cache(maxsize=1 << 16)
def _stem(word: str) -> str:
    return _porter().stem(word)  # type: ignore[attr-defined]


def rouge_tokenize(text: str, stem: bool = True) -> list[str]:
    """Rouge tokens of ``text``: lowercase, every run of characters outside ``[a-z0-9]`` is a
    separator (so accented and non-Latin letters are dropped, as in ROUGE-1.5.5), and words of
    more than 3 characters are Porter-stemmed."""
    words = _NON_ALNUM.sub(" ", text.lower()).split()
    if stem:
        words = [_stem(w) if len(w) > 3 else w for w in words]
    # stemming never empties a word of 4+ letters, but keep only valid tokens to be safe
    return [w for w in words if w and _NON_ALNUM.search(w) is None]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences.

    Bit-parallel (Hyyro 2004): bit i of ``v`` is 0 where row i of the classic LCS table grew;
    per token y of ``b``: u = v & match(y); v = (v + u) | (v - u). LCS = zero bits of v.
    """
    if not a or not b:
        return 0
    match: dict[str, int] = {}
    for i, tok in enumerate(a):
        match[tok] = match.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & match.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def _f_lcs(ref: list[str], pred: list[str]) -> float:
    """Rouge-L F1 = 2 P R / (P + R), P = LCS / |pred|, R = LCS / |ref|; 0 when either is empty."""
    if not ref or not pred:
        return 0.0
    lcs = lcs_length(ref, pred)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


def _as_refs(refs: str | Sequence[str]) -> list[str]:
    return [refs] if isinstance(refs, str) else list(refs)


def _check_lengths(predictions: Sequence[str], references: Sequence[object]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[float]:
    """Per-prediction Rouge-L F x 100: the best over that prediction's references (0 with none)."""
    _check_lengths(predictions, references)
    out = []
    for pred, refs in zip(predictions, references):
        pred_toks = rouge_tokenize(pred)
        out.append(100.0 * max((_f_lcs(rouge_tokenize(r), pred_toks) for r in _as_refs(refs)), default=0.0))
    return out


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Rouge-L F-measure x 100 with Porter stemming, max over each prediction's references, averaged.

    ``references[i]`` is one string or a list of acceptable answers for ``predictions[i]``.
    An empty prediction list scores 0.
    """
    scores = rouge_l_scores(predictions, references)
    return sum(scores) / len(scores) if scores else 0.0


_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """The normalisation of the reference code's exact match (S-NI's evaluation: SQuAD v1.1's
    without the article removal): lowercase, delete ASCII punctuation (``string.punctuation``),
    collapse whitespace. "Twenty-one." equals "twentyone"; "the cat" does not equal "cat"."""
    return " ".join(text.lower().translate(_DELETE_PUNCTUATION).split())


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Share (x 100) of predictions equal to one of their references after :func:`normalize_answer`.

    A prediction with no reference counts as a miss.
    """
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    hits = 0
    for pred, refs in zip(predictions, references):
        p = normalize_answer(pred)
        hits += any(p == normalize_answer(r) for r in _as_refs(refs))
    return 100.0 * hits / len(predictions)


def distinct_n(texts: Sequence[str], n: int = 4) -> float:
    """Distinct-n x 100: unique n-grams / all n-grams, pooled over every response.

    Tokenisation: ``text.lower().split()`` (whitespace after lowercasing; punctuation stays
    attached to its word). n-grams never cross two responses. 0 when no response has n words.
    ``distinct_n(texts, 4)`` is the paper's Dist-4.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return 100.0 * len(seen) / total if total else 0.0


def mean_words(texts: Sequence[str]) -> float:
    """Mean number of whitespace-separated words per response (0 for no responses)."""
    return sum(len(t.split()) for t in texts) / len(texts) if texts else 0.0
