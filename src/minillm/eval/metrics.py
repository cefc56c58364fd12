"""Text metrics of ``minillm eval`` (Rouge-L, exact match, Dist-n). The implementations live in
:mod:`minillm.text_metrics`, a leaf module that validation during training uses too; this module
keeps them reachable as ``minillm.eval.metrics.*``."""

from __future__ import annotations

from minillm import text_metrics as _impl
from minillm.text_metrics import *  # noqa: F403

__all__ = list(_impl.__all__)
