"""Text metrics on lists of strings."""

from __future__ import annotations

from collections.abc import Sequence


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Rouge-L F-measure x 100 with Porter stemming, max over each prediction's references, averaged."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        return 0.0
    total = 0.0
    for pred, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        total += max((scorer.score(r, pred)["rougeL"].fmeasure for r in refs), default=0.0)
    return 100.0 * total / len(predictions)
