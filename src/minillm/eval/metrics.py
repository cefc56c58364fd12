"""Text metrics of ``minillm eval`` (Rouge-L, exact match, Dist-n): the implementations live in
:mod:`minillm.text_metrics`, a leaf module that validation during training can use too."""

from __future__ import annotations

from minillm.text_metrics import (
    distinct_n,
    exact_match,
    lcs_length,
    mean_words,
    normalize_answer,
    rouge_l,
    rouge_l_scores,
    rouge_tokenize,
)

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
