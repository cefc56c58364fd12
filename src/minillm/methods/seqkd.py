"""Sequence-level KD (Kim & Rush 2016): SFT on responses the teacher sampled.

SeqKD is exactly :class:`~minillm.methods.sft.SFT` (cross-entropy on response tokens, plus L_PT
when ``data.pretrain`` is set) over a different ``data.train``: the JSONL that ``minillm generate``
wrote. The method adds no loss of its own; it only says which file it trains on and whether that
file carries ``minillm generate``'s metadata. Any instruction file is accepted.
"""

from __future__ import annotations

import logging

from minillm.config import Config
from minillm.data import RunData
from minillm.generate_data import read_meta
from minillm.methods.base import register_method
from minillm.methods.sft import SFT
from minillm.models import Models

log = logging.getLogger("minillm")


@register_method("seqkd")
class SeqKD(SFT):
    """L = mean over the sampled responses' tokens of -log q(y_t | y_<t, x) (+ pt_coef * L_PT)."""

    def __init__(self, cfg: Config, models: Models, data: RunData) -> None:
        super().__init__(cfg, models, data)
        train = str(cfg.data.train)
        meta = read_meta(train)
        if meta is None:
            log.info("seqkd: training on %s (%d examples; not written by `minillm generate`, used as is)", train, len(data.train))
        else:
            log.info(
                "seqkd: training on %s (%d examples; %d sample(s) per prompt from %s %s, seed %s)",
                train, len(data.train), meta.get("samples", 0), meta.get("which", "?"), meta.get("model", "?"), meta.get("seed", "?"),
            )
