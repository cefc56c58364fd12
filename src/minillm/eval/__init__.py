"""Evaluation: metrics a user can call on lists of strings, and the `minillm eval` runner.

Text metrics (:mod:`minillm.eval.metrics`): :func:`rouge_l`, :func:`exact_match`, :func:`distinct_n`.
Model-level measures: exposure bias (:func:`exposure_curves` under the protocols of
:mod:`minillm.eval.exposure`, :func:`exposure_bias`, :func:`ex_acc_err`), calibration
(:func:`expected_calibration_error`, :func:`reliability_bins`), the LLM judge
(:func:`judge_score`). The runner (:func:`minillm.eval.runner.run_eval`) is imported on demand.
"""

from __future__ import annotations

from minillm.eval.calibration import expected_calibration_error, reliability_bins
from minillm.eval.exposure import ex_acc_err, exposure_bias, exposure_curves
from minillm.eval.judge import judge_score, parse_scores
from minillm.eval.metrics import (
    distinct_n,
    exact_match,
    mean_words,
    normalize_answer,
    rouge_l,
    rouge_l_scores,
)

__all__ = [
    "distinct_n",
    "ex_acc_err",
    "exact_match",
    "expected_calibration_error",
    "exposure_bias",
    "exposure_curves",
    "judge_score",
    "mean_words",
    "normalize_answer",
    "parse_scores",
    "reliability_bins",
    "rouge_l",
    "rouge_l_scores",
]
