"""Evaluation: metrics a user can call on lists of strings, and the `minillm eval` runner."""

from __future__ import annotations

from minillm.eval.metrics import rouge_l

__all__ = ["rouge_l"]
