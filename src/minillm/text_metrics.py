"""Text metrics on lists of strings: Rouge-L, exact match, distinct n-grams, self-BLEU, valid-answer
diversity, response length.

Every function takes plain Python strings and returns a percentage (0-100) unless it says
otherwise, so a user can score any list of responses without a model:

>>> rouge_l(["the cat sat"], [["a cat sat down", "the cat"]])  # doctest: +SKIP

Rouge-L is computed here (tokenisation, Porter stemming and the longest common subsequence) and
matches the ``rouge-score`` package's ``rougeL`` F-measure with ``use_stemmer=True`` (the test
suite checks this to 1e-6 on varied strings); the LCS is a bit-parallel algorithm, so long
responses cost O(n * m / word size) instead of the O(n * m) Python table.
"""

from __future__ import annotations

import bisect
import math
import re
import string
from collections import Counter
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
    "self_bleu",
    "valid_answers",
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


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def self_bleu(texts: Sequence[str], n: int = 4) -> float | None:
    """Self-BLEU x 100 (Zhu et al. 2018, Texygen): the mean over responses of the BLEU-n of each one
    against all the others as its references; higher = the responses repeat one another more.

    Per response h with the others R: BLEU = BP exp(sum_{k=1..n} log(p_k) / n), where p_k is the
    clipped k-gram precision (each k-gram of h counts at most its largest count in one response of
    R) over the k-grams of h, BP = 1 if |h| > r else exp(1 - r / |h|) with r the length in R
    closest to |h| (the shorter on a tie). Smoothing as NLTK's ``sentence_bleu`` with
    ``SmoothingFunction().method1`` (Texygen's): a p_k with no match counts as 0.1 / max(1, number of
    k-grams of h); a response with no matching word (or no word) scores 0. Tokens:
    ``text.lower().split()``, as :func:`distinct_n`. None for fewer than two responses (nothing to
    compare). Cost: linear in the total length (each k-gram's two largest counts are kept).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(texts) < 2:
        return None
    words = [t.lower().split() for t in texts]
    grams = [[_ngrams(w, k) for k in range(1, n + 1)] for w in words]
    # per k-gram: the largest count in one response, how many responses hold it, the second largest
    top: list[dict[tuple[str, ...], list[int]]] = [{} for _ in range(n)]
    for per_text in grams:
        for k, counts in enumerate(per_text):
            for g, c in counts.items():
                entry = top[k].setdefault(g, [0, 0, 0])  # best, holders of best, second
                if c > entry[0]:
                    entry[:] = [c, 1, entry[0]]
                elif c == entry[0]:
                    entry[1] += 1
                elif c > entry[2]:
                    entry[2] = c
    lengths = sorted(len(w) for w in words)
    scores = []
    for w, per_text in zip(words, grams):
        hits, totals = [], []
        for k, counts in enumerate(per_text):
            matched = 0
            for g, c in counts.items():
                best, holders, second = top[k][g]
                others = second if c == best and holders == 1 else best  # the largest count outside h
                matched += min(c, others)
            hits.append(matched)
            totals.append(max(1, sum(counts.values())))
        if not w or hits[0] == 0:
            scores.append(0.0)
            continue
        log_p = sum(math.log((h if h else 0.1) / t) for h, t in zip(hits, totals)) / n
        r = _closest_length(lengths, len(w))
        bp = 1.0 if len(w) > r else math.exp(1 - r / len(w))
        scores.append(100.0 * bp * math.exp(log_p))
    return sum(scores) / len(scores)


def _closest_length(lengths: list[int], c: int) -> int:
    """The length closest to ``c`` in sorted ``lengths`` after removing one ``c`` (h itself); the
    shorter one on a tie."""
    rest = list(lengths)
    del rest[bisect.bisect_left(rest, c)]
    i = bisect.bisect_left(rest, c)
    near = rest[max(0, i - 1) : i + 1]
    return min(near, key=lambda x: (abs(x - c), x))


def valid_answers(samples: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> dict[str, float] | None:
    """Semantic diversity on prompts with several valid answers.

    ``samples[i]``: the k responses to prompt i; ``references[i]``: its valid answers. Only prompts
    with at least two distinct answers (after :func:`normalize_answer`) count. A response is valid
    when it equals one of its prompt's answers after normalisation (exact match). Returns means over
    those prompts: ``distinct``, the number of distinct valid answers among the k responses;
    ``possible``, min(k, number of answers), the most ``distinct`` can reach; ``valid``, the share of
    responses that are valid (x 100); and ``prompts``, ``samples`` (k, mean). None when no prompt has
    several answers.
    """
    if len(samples) != len(references):
        raise ValueError(f"{len(samples)} sample lists but {len(references)} reference lists")
    distinct, possible, valid, ks = [], [], [], []
    for outs, refs in zip(samples, references):
        answers = {normalize_answer(r) for r in _as_refs(refs)}
        if len(answers) < 2 or not outs:
            continue
        said = [normalize_answer(o) for o in outs]
        distinct.append(len(answers.intersection(said)))
        possible.append(min(len(outs), len(answers)))
        valid.append(100.0 * sum(s in answers for s in said) / len(said))
        ks.append(len(outs))
    if not distinct:
        return None
    m = len(distinct)
    return {"distinct": sum(distinct) / m, "possible": sum(possible) / m, "valid": sum(valid) / m,
            "prompts": float(m), "samples": sum(ks) / m}
