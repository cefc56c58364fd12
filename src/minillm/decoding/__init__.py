"""Decoding: one :func:`sample` in front of interchangeable backends.

* :mod:`minillm.decoding.contract` - the sampling contract: settings (:class:`Decoding`), the
  :class:`Rollout` record, the seeded noise, filtering, the teacher-forced layout of a rollout;
* :mod:`minillm.decoding.plain` - the plain loop over dynamic KV caches (``engine: eager``);
* :mod:`minillm.decoding.static` - static caches and one CUDA graph per token (``engine: static``).

A backend is a module with ``decode(model, prompts, seeds, d: Decoding, teacher) -> Rollout`` that
keeps the contract (the same tokens as the plain loop for the same seeds, ``d.all_done`` honoured)
and an entry in :data:`BACKENDS`; a new one (vLLM for the student, a remote teacher) is a new
file, not an edit of the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from minillm.decoding import plain, static
from minillm.decoding.contract import (
    Decoding,
    Rollout,
    filter_logprobs,
    gumbel_argmax,
    gumbel_sample,
    hashed_uniform,
    packed_sequence_batch,
    response_logits,
    row_seeds,
    sequence_batch,
    stop_token_ids,
)

log = logging.getLogger("minillm")

Backend = Callable[..., Rollout]
BACKENDS: dict[str, Backend] = {"eager": plain.decode, "static": static.decode}
_STATIC_FAILED: list[str] = []  # models for which the static engine failed in this process (auto falls back)

__all__ = [
    "BACKENDS", "Decoding", "Rollout", "filter_logprobs", "generate", "gumbel_argmax", "gumbel_sample", "hashed_uniform",
    "packed_sequence_batch", "response_logits", "row_seeds", "sample", "sequence_batch", "stop_token_ids",
]


def _auto_engine(device: torch.device) -> str:
    """``generation.engine: auto``: the static-cache graph engine on CUDA (unless it already failed)."""
    return "static" if device.type == "cuda" and not _STATIC_FAILED else "eager"


@torch.no_grad()
def sample(
    model: Any,
    prompts: Sequence[Sequence[int]],
    seeds: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    vocab_size: int,
    teacher: Any = None,
    alpha: float = 0.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    no_repeat_ngram_size: int = 0,
    autocast: torch.dtype | None = None,
    engine: str = "eager",
    keep_logits: Sequence[str] = (),
    all_done: Callable[[bool], bool] | None = None,
) -> Rollout:
    """Sample one response per prompt from (1 - alpha) q + alpha p (q = ``model``, p = ``teacher``).

    ``teacher`` without ``alpha`` still scores every sampled token (``Rollout.logp``): pass it only
    when those scores are wanted, it costs a teacher forward per token. Returns right-padded
    responses; a row stops at the first token in ``stop_ids`` (kept, masked in). ``engine``: a name
    in :data:`BACKENDS` ("eager": the plain loop; "static": static caches, one CUDA graph per step
    on GPU) or "auto" (static on CUDA, eager elsewhere; a model the static engine cannot run falls
    back to the plain loop with a warning). ``keep_logits`` and ``all_done``: see :class:`Decoding`.
    """
    d = Decoding(max_new_tokens, tuple(stop_ids), pad_id, vocab_size, alpha, temperature, top_k, top_p,
                 no_repeat_ngram_size, autocast, tuple(keep_logits), all_done)
    device = next(model.parameters()).device
    chosen = _auto_engine(device) if engine == "auto" else engine
    if chosen == "static" and no_repeat_ngram_size:
        chosen = "eager"  # n-gram bans need the token history on the host at every step
    if chosen not in BACKENDS:
        raise ValueError(f"unknown decoding engine {engine!r}; choose auto or one of {sorted(BACKENDS)}")
    if chosen != "eager" and engine == "auto":
        try:
            return BACKENDS[chosen](model, prompts, seeds, d, teacher)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
            if isinstance(e, ValueError) and "teacher" in str(e):
                raise
            # a model whose forward cannot run on a static cache / in a graph: say so once, then decode eagerly
            _STATIC_FAILED.append(type(model).__name__)
            log.warning("generation.engine=auto: the %s engine failed for %s (%s); using the plain loop "
                        "(set generation.engine=eager to skip the attempt)", chosen, type(model).__name__,
                        str(e).splitlines()[0][:200])
            chosen = "eager"
    return BACKENDS[chosen](model, prompts, seeds, d, teacher)


def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    keys: Sequence[int],
    *,
    seed: int,
    tokenizer: Any,
    vocab_size: int,
    max_new_tokens: int,
    max_len: int,
    batch_size: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    no_repeat_ngram_size: int = 0,
    autocast: torch.dtype | None = None,
    teacher: Any = None,
    alpha: float = 0.0,
    engine: str = "auto",
) -> list[list[int]]:
    """Sample one response per prompt (token ids, stop token removed), batched.

    ``keys`` (e.g. example indices) and ``seed`` fix each row's noise, so the output for a prompt
    does not depend on ``batch_size`` or on the other prompts.
    """
    was_training = model.training
    model.eval()
    stops = stop_token_ids(tokenizer, model, vocab_size)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    results: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [prompts[i] for i in idx]
        # each row keeps its own budget, so its response never depends on its batch-mates
        caps = [max(1, min(max_new_tokens, max_len - len(p))) for p in batch]
        r = sample(
            model, batch, row_seeds(seed, [keys[i] for i in idx]), max_new_tokens=max(caps), stop_ids=stops,
            pad_id=tokenizer.pad_token_id, vocab_size=vocab_size, teacher=teacher, alpha=alpha,
            temperature=temperature, top_k=top_k, top_p=top_p, no_repeat_ngram_size=no_repeat_ngram_size,
            autocast=autocast, engine=engine,
        )
        for b, i in enumerate(idx):
            ids = r.response_ids[b, : min(int(r.response_mask[b].sum()), caps[b])].tolist()
            if ids and ids[-1] in stops:
                ids = ids[:-1]
            results[i] = ids
    model.train(was_training)
    return [results[i] for i in range(len(prompts))]
