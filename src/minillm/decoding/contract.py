"""The sampling contract every decoding backend keeps.

Each step samples y_t from p~ = (1 - a) q + a p (MiniLLM Sec. 2.3) after temperature / top-k / top-p
filtering. The noise is a counter-based hash of (row seed, step, token id), not a global RNG stream:
a prompt's response depends only on its own seed, never on which other prompts share the batch, on
batch size, on the number of ranks, on the backend or on resuming. Every backend draws with
:func:`gumbel_argmax` (or, inside a CUDA graph, the same arithmetic over the whole vocabulary,
:func:`gumbel_sample`), so on the same log-probabilities all pick the same tokens.

This module holds what the backends share: the settings (:class:`Decoding`), the record they
return (:class:`Rollout`), the seeded noise, filtering, and the teacher-forced layout of a rollout
(:func:`sequence_batch`, :func:`packed_sequence_batch`). It imports no backend.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


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
    kl: torch.Tensor | None = None  # KL(q || p) of the step's two distributions (temperature 1), when a teacher decoded alongside
    logits_q: torch.Tensor | None = None  # (B, R, V) the student's logits at each drawn position (Decoding.keep_logits)
    logits_p: torch.Tensor | None = None  # (B, R, V) the teacher's, when it decoded alongside

    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)


@dataclass(frozen=True)
class Decoding:
    """The settings of one decode besides models, prompts and seeds.

    ``all_done(local_done) -> bool`` is the stop decision: every backend calls it with "all of my
    rows are finished" at the same points of its loop and stops when it returns True. The default
    is the local decision; under FSDP every rank must issue the same collectives, so a distributed
    caller passes a function that all-reduces the flag (and the same ``max_new_tokens`` on every
    rank), and a rank whose rows are done keeps stepping until every rank's are.
    ``keep_logits`` names the models ("student", "teacher") whose full next-token logits ``(B, R, V)``
    (in the model's output dtype, on its device) the :class:`Rollout` keeps, for a caller that would
    otherwise recompute them teacher-forced; mind the memory (B x max_new_tokens x V per model).
    """

    max_new_tokens: int
    stop_ids: tuple[int, ...]
    pad_id: int
    vocab_size: int
    alpha: float = 0.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 0
    autocast: torch.dtype | None = None
    keep_logits: tuple[str, ...] = ()
    all_done: Callable[[bool], bool] | None = None

    def stop(self, local_done: bool) -> bool:
        """The stop decision for a loop whose rows are (``local_done``) or are not all finished."""
        return self.all_done(local_done) if self.all_done is not None else local_done

    def mix_weights(self) -> tuple[float, float]:
        """(log a, log(1 - a)) of the teacher mix; (0, 0) without mixing."""
        return (math.log(self.alpha), math.log1p(-self.alpha)) if self.alpha > 0 else (0.0, 0.0)


def draw_distribution(logq_BV: torch.Tensor, logp_BV: torch.Tensor | None, d: Decoding) -> torch.Tensor:
    """log p~ ``(B, V)`` of one step: the teacher mix (when ``d.alpha`` > 0), then filtering."""
    if d.alpha > 0:
        if logp_BV is None:
            raise ValueError("teacher-mixed sampling (alpha > 0) needs a teacher")
        log_a, log_1ma = d.mix_weights()
        logmix_BV = torch.logaddexp(logq_BV + log_1ma, logp_BV + log_a)
    else:
        logmix_BV = logq_BV
    return filter_logprobs(logmix_BV, d.temperature, d.top_k, d.top_p)


def step_kl(logq_BV: torch.Tensor, logp_BV: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = sum_v q(v) [log q(v) - log p(v)] per row ``(B,)``; 0 log 0 taken as 0."""
    q = logq_BV.exp()
    return (q * torch.where(q > 0, logq_BV - logp_BV, torch.zeros_like(q))).sum(-1)


# --- counter-based sampling noise -------------------------------------------------------------

_M64 = (1 << 64) - 1


def _s64(x: int) -> int:
    x &= _M64
    return x - (1 << 64) if x >= (1 << 63) else x


_GOLDEN, _MIX1, _MIX2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)
_LOW = {k: (1 << (64 - k)) - 1 for k in (30, 27, 31, 11)}  # masks that turn an arithmetic >> k into a logical one


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & _LOW[k]


def _row_bases(seeds_B: torch.Tensor, step: int | torch.Tensor, V: int) -> torch.Tensor:
    """seed * golden + step * V + golden ``(B,)``: the hash input of token v is this plus v."""
    return seeds_B.to(torch.int64) * _GOLDEN + (step * V + _GOLDEN)


def _mix_(z: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, in place on int64 ``z`` (``tmp`` a scratch buffer of its shape);
    returns the top 53 bits (in ``tmp``)."""
    for k, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, k, out=tmp)
        tmp.bitwise_and_(_LOW[k])
        z.bitwise_xor_(tmp)
        if mult is not None:
            z.mul_(mult)
    torch.bitwise_right_shift(z, 11, out=tmp)
    return tmp.bitwise_and_(_LOW[11])


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser out of place (cheaper than :func:`_mix_` on small tensors); the top 53 bits."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return _shr(z ^ _shr(z, 31), 11)


def _to_unit(bits: torch.Tensor) -> torch.Tensor:
    """53 random bits -> Uniform(0, 1) in float64, never 0 or 1."""
    return (bits.to(torch.float64) + 0.5) * (1.0 / (1 << 53))


def hashed_uniform(seeds_B: torch.Tensor, step: int | torch.Tensor, V: int) -> torch.Tensor:
    """Uniform(0, 1) noise ``(B, V)`` from splitmix64 over (seed, step, token id), in float64."""
    idx = torch.arange(V, device=seeds_B.device, dtype=torch.int64)
    return _to_unit(_mix(_row_bases(seeds_B, step, V)[:, None] + idx[None, :]))


def _gumbel_scores(logprobs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """log pi + Gumbel noise in float64: the value whose argmax is the draw (one formula for all paths)."""
    return logprobs.double() - torch.log(-torch.log(u))


def gumbel_sample(logprobs_BV: torch.Tensor, seeds_B: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """argmax(log pi + Gumbel): an exact draw from pi, reproducible per row; the noise of every token
    is computed (graph-capturable: no host synchronisation)."""
    u = hashed_uniform(seeds_B, step, logprobs_BV.shape[-1])
    return torch.argmax(_gumbel_scores(logprobs_BV, u), dim=-1)


_CANDIDATES = 64  # the most likely tokens scored first by gumbel_argmax
_CHUNK = 1 << 18  # hash elements per block (rows x columns), small enough to stay in cache


def gumbel_argmax(logprobs_BV: torch.Tensor, seeds_B: torch.Tensor, step: int) -> torch.Tensor:
    """The same draw as :func:`gumbel_sample`, with far less work at large vocabularies.

    Only tokens that can still win get their noise turned into a float score. The top
    ``_CANDIDATES`` tokens by log pi are scored first, giving each row a best score M; every other
    token v has log pi(v) <= c, the smallest candidate's log-probability, so it can beat M only if
    its Gumbel noise exceeds M - c, i.e. if its uniform u_v exceeds exp(-exp(c - M)). That test is
    made on the hash's integer bits, block by block in place (no float pass over the vocabulary);
    the few tokens that pass are scored with the same float64 formula and the row's argmax is taken
    over candidates and survivors in token order (ties resolve to the lowest id, as a full argmax
    does). The threshold is loosened by a margin, so rounding can only add survivors, never drop
    a winner. Hashing is exact integer arithmetic, so the result equals the full computation's
    except where two tokens' float64 scores tie to the last bit.
    """
    B, V = logprobs_BV.shape
    dev = logprobs_BV.device
    k = min(_CANDIDATES, V)
    if k == V:
        return gumbel_sample(logprobs_BV, seeds_B, step)
    seeds_B = seeds_B.to(dev)
    bases = _row_bases(seeds_B, step, V)
    top_lp, top_ids = torch.topk(logprobs_BV, k, dim=-1, sorted=True)
    top_scores = _gumbel_scores(top_lp, _to_unit(_mix(bases[:, None] + top_ids)))
    best = top_scores.max(-1).values  # (B,) M
    floor = top_lp[:, -1].double()  # every other token has log pi <= this
    # u > exp(-exp(floor - M)) is necessary to win; compare 53-bit integers, loosened by a margin
    gap = (best - floor).clamp(max=700.0)
    u_min = torch.exp(-torch.exp(-gap)) - 1e-9
    bits_min = torch.where(torch.isfinite(floor), (u_min * (1 << 53)).floor() - 1, torch.full_like(u_min, float(1 << 53)))
    bits_min = bits_min.clamp(min=0).to(torch.int64)
    rows, cols = [], []
    width = max(1, _CHUNK // max(B, 1))
    z = torch.empty(B, min(width, V), dtype=torch.int64, device=dev)
    tmp = torch.empty_like(z)
    ar = torch.arange(min(width, V), dtype=torch.int64, device=dev)
    for s in range(0, V, width):
        c = min(width, V - s)
        zc, tc = z[:, :c], tmp[:, :c]
        torch.add(bases[:, None], ar[None, :c] + s, out=zc)
        hit = _mix_(zc, tc) >= bits_min[:, None]
        if bool(hit.any()):
            r, col = hit.nonzero(as_tuple=True)
            rows.append(r)
            cols.append(col + s)
    r_all = torch.cat([torch.arange(B, device=dev).repeat_interleave(k), *rows])
    c_all = torch.cat([top_ids.flatten(), *cols])
    # one entry per (row, token), in token order within each row
    key = torch.unique(r_all * V + c_all)  # sorted
    r_u, c_u = key // V, key % V
    scores = _gumbel_scores(logprobs_BV[r_u, c_u], _to_unit(_mix(bases[r_u] + c_u)))
    # per-row argmax with the lowest token id among ties: the first maximum in sorted order
    row_max = torch.full((B,), -math.inf, dtype=torch.float64, device=dev).scatter_reduce(0, r_u, scores, "amax")
    is_max = scores == row_max[r_u]
    return torch.full((B,), V, dtype=torch.int64, device=dev).scatter_reduce(0, r_u[is_max], c_u[is_max], "amin")


_FAST_NOISE_MIN = 1 << 17  # rows x vocabulary from which the pruned draw beats scoring every token


def draw(logpi_BV: torch.Tensor, seeds_B: torch.Tensor, step: int) -> torch.Tensor:
    """The seeded Gumbel-max draw outside a CUDA graph, by the cheaper of two equal computations."""
    if logpi_BV.device.type == "cpu" and logpi_BV.numel() >= _FAST_NOISE_MIN:
        return gumbel_argmax(logpi_BV, seeds_B, step)
    return gumbel_sample(logpi_BV, seeds_B, step)


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


def ban_repeated_ngrams(logprobs_BV: torch.Tensor, history: list[list[int]], n: int) -> torch.Tensor:
    """Set to -inf, per row, every token that would complete an n-gram the row already produced."""
    for b, seq in enumerate(history):
        if len(seq) < n - 1 or n <= 0:
            continue
        prefix = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
        banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix]
        if banned:
            logprobs_BV[b, banned] = float("-inf")
    return logprobs_BV


# --- what a caller needs around a decode ----------------------------------------------------------


def cache_kwarg(model: Any) -> str:
    """The name under which ``model.forward`` takes its KV cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"



def stop_token_ids(tokenizer: Any, model: Any, vocab_size: int) -> list[int]:
    """EOS of the tokenizer plus the end-of-turn ids a chat model's generation config lists."""
    ids = {tokenizer.eos_token_id}
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return sorted(i for i in ids if i is not None and 0 <= i < vocab_size)


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


def packed_sequence_batch(
    r_prompt_ids: torch.Tensor, r_prompt_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The same rows as :func:`sequence_batch`, each moved to the left: prompt, response, then one
    run of padding, so a batch is only as wide as its longest prompt + response (not the longest
    prompt plus the longest response).

    Returns the model inputs ``(B, L)`` and ``resp_pos`` ``(B, R)``: the position whose output
    predicts response token t of row b, ``P_b - 1 + t`` (clamped into the row at padding).
    """
    P, R = r_prompt_ids.shape[1], response_ids.shape[1]
    p_len = r_prompt_mask.sum(-1).long()
    r_len = response_mask.sum(-1).long()
    L = max(1, int((p_len + r_len).max())) if len(p_len) else 1
    joined = torch.cat([r_prompt_ids, response_ids], dim=1)
    # in the joined row the real tokens are contiguous from column P - P_b: shift each row left by that
    src = (torch.arange(L)[None, :] + (P - p_len)[:, None]).clamp(max=P + R - 1)
    attn = (torch.arange(L)[None, :] < (p_len + r_len)[:, None]).long()
    ids = joined.gather(1, src)  # padding repeats a real id of the row: masked, and a valid embedding index
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    resp_pos = ((p_len - 1).clamp(min=0)[:, None] + torch.arange(R)[None, :]).clamp(max=L - 1)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": pos}, resp_pos
