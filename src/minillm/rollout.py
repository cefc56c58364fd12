"""Paired student/teacher decoding with teacher-mixed sampling.

Each step samples y_t from p~ = (1 - a) q + a p (MiniLLM Sec. 2.3), student and teacher each
running with their own KV cache. Sampling noise is a counter-based hash of (row seed, step, token),
not a global RNG stream: a prompt's response depends only on its own seed, never on which other
prompts share the batch, on batch size, on the number of ranks or on resuming. This is the
contract a future static-cache / CUDA-graph engine must keep (same tokens as this loop).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from minillm.data.instruct import collate_prompts

log = logging.getLogger("minillm")
_STATIC_FAILED: list[str] = []  # models for which the static engine failed in this process (auto falls back)


def _auto_engine(device: torch.device) -> str:
    """``generation.engine: auto``: the static-cache graph engine on CUDA (unless it already failed)."""
    return "static" if device.type == "cuda" and not _STATIC_FAILED else "eager"


@dataclass
class Rollout:
    """A batch of sampled responses. Shapes: prompts ``(B, P)`` left-padded, responses ``(B, R)``."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor  # pad after the end
    response_mask: torch.Tensor  # float, 1 on real tokens (EOS included)
    logq: torch.Tensor  # log q(y_t) under the decoding model, temperature 1
    logp: torch.Tensor | None  # log p(y_t) under the teacher (None without one)
    logmix: torch.Tensor  # log of the probability y_t was actually drawn with
    seeds: torch.Tensor  # (B,) the row seeds

    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)


@dataclass(frozen=True)
class Decoding:
    """The settings of one decode besides models, prompts and seeds (see :func:`sample`)."""

    max_new_tokens: int
    stop_ids: tuple[int, ...]
    pad_id: int
    vocab_size: int
    alpha: float = 0.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    autocast: torch.dtype | None = None


# --- counter-based sampling noise -------------------------------------------------------------

_M64 = (1 << 64) - 1


def _s64(x: int) -> int:
    x &= _M64
    return x - (1 << 64) if x >= (1 << 63) else x


_GOLDEN, _MIX1, _MIX2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def hashed_uniform(seeds_B: torch.Tensor, step: int | torch.Tensor, V: int) -> torch.Tensor:
    """Uniform(0, 1) noise ``(B, V)`` from splitmix64 over (seed, step, token id), in float64."""
    idx = torch.arange(V, device=seeds_B.device, dtype=torch.int64)
    z = seeds_B.to(torch.int64)[:, None] * _GOLDEN + (step * V + idx)[None, :] + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return (_shr(z, 11).to(torch.float64) + 0.5) * (1.0 / (1 << 53))


def gumbel_sample(logprobs_BV: torch.Tensor, seeds_B: torch.Tensor, step: int) -> torch.Tensor:
    """argmax(log pi + Gumbel): an exact draw from pi, reproducible per row."""
    u = hashed_uniform(seeds_B, step, logprobs_BV.shape[-1])
    g = -torch.log(-torch.log(u))
    return torch.argmax(logprobs_BV.double() + g, dim=-1)


def row_seeds(base_seed: int, keys: Sequence[int], salt: int = 0) -> torch.Tensor:
    """Per-row seeds from a run seed, a stable per-example key (e.g. example index) and a salt
    (e.g. the rollout round), independent of batch composition."""
    out = []
    for k in keys:
        h = (base_seed * 1_000_003 + int(k)) * 2_654_435_761 + salt * 97_531
        out.append(_s64(h * 0x2545F4914F6CDD1D))
    return torch.tensor(out, dtype=torch.int64)


# --- filtering ---------------------------------------------------------------------------------


def filter_logprobs(logprobs_BV: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k and nucleus filtering; returns renormalised log-probabilities."""
    out = logprobs_BV / temperature if temperature != 1.0 else logprobs_BV
    if top_k and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = torch.sort(out, dim=-1, descending=True)
        probs = F.softmax(sorted_lp, dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return F.log_softmax(out, dim=-1)


def _ban_repeated_ngrams(logprobs_BV: torch.Tensor, history: list[list[int]], n: int) -> torch.Tensor:
    for b, seq in enumerate(history):
        if len(seq) < n - 1 or n <= 0:
            continue
        prefix = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
        banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix]
        if banned:
            logprobs_BV[b, banned] = float("-inf")
    return logprobs_BV


# --- the decode loop ---------------------------------------------------------------------------


def _cache_kwarg(model: Any) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _Stepper:
    """Incremental forward with a KV cache for one model."""

    def __init__(self, model: Any, vocab_size: int, autocast: torch.dtype | None) -> None:
        from transformers import DynamicCache

        self.model, self.V = model, vocab_size
        self.cache = DynamicCache()
        self.kw = _cache_kwarg(model)
        self.autocast = autocast

    def __call__(self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(ids.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with ctx:
            out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1, **{self.kw: self.cache})
        return F.log_softmax(out.logits[:, -1, : self.V].float(), dim=-1)


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
    all_done: Callable[[bool], bool] | None = None,
) -> Rollout:
    """Sample one response per prompt from (1 - alpha) q + alpha p (q = ``model``, p = ``teacher``).

    ``teacher`` without ``alpha`` still scores every sampled token (``Rollout.logp``). Returns
    right-padded responses; a row stops at the first token in ``stop_ids`` (kept, masked in).
    ``engine``: "eager" (this loop, dynamic caches), "static" (static caches, one CUDA graph per
    step on GPU: :mod:`minillm.engine`) or "auto" (static on CUDA, eager elsewhere).
    ``all_done(local_done) -> bool`` decides when the loop stops from whether this batch's rows
    are all done (default: that alone); under a sharded model every rank must keep stepping until
    all are (:meth:`minillm.distributed.Dist.all_done`), and this plain loop runs.
    """
    device = next(model.parameters()).device
    chosen = _auto_engine(device) if engine == "auto" else engine
    if chosen == "static" and not no_repeat_ngram_size and all_done is None:
        from minillm.engine import engine_sample

        try:
            d = Decoding(max_new_tokens, tuple(stop_ids), pad_id, vocab_size, alpha, temperature, top_k, top_p, autocast)
            return engine_sample(model, prompts, seeds, d, teacher)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
            if engine != "auto" or isinstance(e, ValueError) and "teacher" in str(e):
                raise
            # a model whose forward cannot run on a static cache / in a graph: say so once, then decode eagerly
            _STATIC_FAILED.append(type(model).__name__)
            log.warning("generation.engine=auto: the static-cache engine failed for %s (%s); using the plain loop "
                        "(set generation.engine=eager to skip the attempt)", type(model).__name__, str(e).splitlines()[0][:200])
    ids_BP, attn_BP = collate_prompts(prompts, pad_id)
    ids_BP, attn_BP = ids_BP.to(device), attn_BP.to(device)
    B = ids_BP.shape[0]
    seeds = seeds.to(device)
    student = _Stepper(model, vocab_size, autocast)
    tstep = _Stepper(teacher, vocab_size, None) if teacher is not None else None
    if alpha > 0 and tstep is None:
        raise ValueError("teacher-mixed sampling (alpha > 0) needs a teacher")
    log_a, log_1ma = (math.log(alpha), math.log1p(-alpha)) if alpha > 0 else (0.0, 0.0)
    stop = torch.tensor(sorted(set(stop_ids)), device=device)
    decide = all_done or bool  # when the loop ends, given whether this batch's rows are all done

    attn = attn_BP
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    step_ids = ids_BP
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logq_l, logp_l, logmix_l, mask_l = [], [], [], [], []
    history: list[list[int]] = [[] for _ in range(B)]
    for t in range(max_new_tokens):
        logq_V = student(step_ids, attn, pos)
        logp_V = tstep(step_ids, attn, pos) if tstep is not None else None
        if alpha > 0:
            logmix_V = torch.logaddexp(logq_V + log_1ma, logp_V + log_a)
        else:
            logmix_V = logq_V
        logpi_V = filter_logprobs(logmix_V, temperature, top_k, top_p)
        if no_repeat_ngram_size:
            # renormalise, so logmix stays the log-probability the token was actually drawn with
            logpi_V = F.log_softmax(_ban_repeated_ngrams(logpi_V, history, no_repeat_ngram_size), dim=-1)
        y = gumbel_sample(logpi_V, seeds, t)
        y = torch.where(done, torch.full_like(y, pad_id), y)
        live = (~done).float()
        tokens.append(y)
        mask_l.append(live)
        logq_l.append(logq_V.gather(-1, y[:, None]).squeeze(-1) * live)
        logmix_l.append(logpi_V.gather(-1, y[:, None]).squeeze(-1) * live)
        if logp_V is not None:
            logp_l.append(logp_V.gather(-1, y[:, None]).squeeze(-1) * live)
        if no_repeat_ngram_size:
            for b in range(B):
                if not done[b]:
                    history[b].append(int(y[b]))
        done = done | torch.isin(y, stop)
        if decide(bool(done.all())):
            break
        step_ids = y[:, None]
        attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=device)], dim=1)
        pos = pos[:, -1:] + 1
    stack = lambda xs: torch.stack(xs, dim=1) if xs else torch.zeros(B, 0, device=device)  # noqa: E731
    return Rollout(
        prompt_ids=ids_BP.cpu(),
        prompt_mask=attn_BP.cpu(),
        response_ids=stack(tokens).long().cpu(),
        response_mask=stack(mask_l).cpu(),
        logq=stack(logq_l).cpu(),
        logp=stack(logp_l).cpu() if tstep is not None else None,
        logmix=stack(logmix_l).cpu(),
        seeds=seeds.cpu(),
    )


def sequence_batch(r_prompt_ids: torch.Tensor, r_prompt_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Join left-padded prompts and right-padded responses for a teacher-forced forward.

    Returns ``input_ids``/``attention_mask``/``position_ids`` ``(B, P+R)``; the logits that predict
    the response sit at positions ``P-1 .. P+R-2`` (see :func:`response_logits`).
    """
    ids = torch.cat([r_prompt_ids, response_ids], dim=1)
    attn = torch.cat([r_prompt_mask, response_mask.long()], dim=1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": pos}


def response_logits(logits_BLV: torch.Tensor, prompt_len: int, response_len: int) -> torch.Tensor:
    """The logits ``(B, R, V)`` that predict the response tokens of a :func:`sequence_batch`."""
    return logits_BLV[:, prompt_len - 1 : prompt_len - 1 + response_len]


def stop_token_ids(tokenizer: Any, model: Any, vocab_size: int) -> list[int]:
    """EOS of the tokenizer plus the end-of-turn ids a chat model's generation config lists."""
    ids = {tokenizer.eos_token_id}
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return sorted(i for i in ids if i is not None and 0 <= i < vocab_size)


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
