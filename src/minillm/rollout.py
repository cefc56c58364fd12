"""Compatibility module: decoding lives in :mod:`minillm.decoding` (one ``sample()`` in front of
the plain-loop and static-cache backends). The names below stay importable from here."""

from __future__ import annotations

from minillm.decoding import (
    Decoding,
    Rollout,
    filter_logprobs,
    generate,
    gumbel_sample,
    hashed_uniform,
    packed_sequence_batch,
    response_logits,
    row_seeds,
    sample,
    sequence_batch,
    stop_token_ids,
)

__all__ = [
    "Decoding", "Rollout", "filter_logprobs", "generate", "gumbel_sample", "hashed_uniform", "packed_sequence_batch",
    "response_logits", "row_seeds", "sample", "sequence_batch", "stop_token_ids",
]
