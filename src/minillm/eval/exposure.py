"""Exposure bias as excess accumulated error (Arora et al. 2022; MiniLLM Sec. 3.3), three protocols.

With p the teacher, q the student, x a prompt, y a draw and d_t(y) = KL( p(.|y<t, x) || q(.|y<t, x) )
the error at position t (exact sum over the vocabulary, from one teacher-forced forward of each model
over the draws, :func:`minillm.losses.per_token`), a protocol turns the per-position errors of the
student's draws (y ~ q) and of the teacher's draws (y ~ p) into two curves R(l) and eps(l) and

    ExAccErr(l) = (R(l) - eps(l)) / eps(l) x 100.

R is the error the student accumulates on the prefixes it produces itself, eps the same error on
prefixes it was trained to imitate; their relative gap is the part due to exposure bias.

``fixed_length`` (the paper's; Arora et al. measure fixed-length continuations): every draw runs to
exactly l_max tokens, end-of-sequence ignored, and

    R(l)   = E_{y ~ q} sum_{t<=l} d_t(y),     eps(l) = E_{y ~ p} sum_{t<=l} d_t(y).

A draw that samples EOS before l_max goes on past the end of its answer, on text neither model was
trained on; the curve reports how many draws of each model did (``ended_early_student`` /
``ended_early_teacher``: EOS sampled at a position t < l_max).

``length_fair``: draws stop at their EOS (kept). With n_q(t) the student's draws still running at
t (length >= t; the at-risk count) and n_p(t) the teacher's,

    m_q(t) = mean_{y ~ q, |y| >= t} d_t(y),   m_p(t) = mean_{y ~ p, |y| >= t} d_t(y),
    R_fair(l) = sum_{t<=l} m_q(t),            eps_fair(l) = sum_{t<=l} m_p(t).

Each position counts once whatever share of the draws reached it, so a student whose answers are
only longer (or shorter) than the teacher's adds nothing by that alone; the curve stops at the
last l where both at-risk counts are at least ``min_at_risk``. m_q, m_p, n_q and n_p are reported
beside the curve.

``to_eos`` (kept for comparison): draws stop at their EOS and a draw that ended keeps its final sum,

    R(l) = E_{y ~ q} sum_{t<=min(l,|y|)} d_t(y),   eps(l) likewise over y ~ p,

so a student with longer answers accumulates more terms: the ratio mixes length with error.

Expectations are Monte Carlo averages over ``samples`` draws per prompt, at temperature 1 with no
top-k / top-p (the definitions need y ~ q and y ~ p exactly). The student's and the teacher's
draws for a (prompt, sample) share their sampling noise (common random numbers), which lowers the
variance of R - eps. :func:`protocol_curve` also takes a weight per draw, so an exact expectation
over every sequence of a small model (weights = sequence probabilities) goes through the same code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from minillm.data.instruct import collate_prompts
from minillm.decoding import response_logits, row_seeds, sample, sequence_batch
from minillm.losses import per_token
from minillm.models import vocab_logits

__all__ = ["PROTOCOLS", "ExposureCurve", "accumulated_kl", "draw_samples", "ex_acc_err", "exposure_bias",
           "exact_curve", "exposure_curves", "position_kl", "protocol_curve"]

PROTOCOLS = ("fixed_length", "length_fair", "to_eos")


def ex_acc_err(R: Sequence[float], eps: Sequence[float]) -> list[float]:
    """ExAccErr(l) = (R(l) - eps(l)) / eps(l) x 100, element-wise.

    Where eps(l) = 0 the ratio is undefined: 0 when R(l) = 0 as well (a student identical to the
    teacher), NaN otherwise.
    """
    if len(R) != len(eps):
        raise ValueError(f"R has {len(R)} lengths but eps has {len(eps)}")
    out = []
    for r, e in zip(R, eps):
        if e > 0:
            out.append((r - e) / e * 100.0)
        else:
            out.append(0.0 if r == e else math.nan)
    return out


@dataclass
class Samples:
    """Sampled continuations: ``responses[i]`` (token ids) continues ``prompts[prompt_index[i]]``."""

    prompt_index: list[int]
    responses: list[list[int]]


def _clean(xs: Sequence[float]) -> list[float | None]:
    return [None if not math.isfinite(x) else float(x) for x in xs]


@dataclass
class ExposureCurve:
    """R(l), eps(l) and ExAccErr(l) for l = 1 .. len(lengths) under ``protocol``; ``n_samples`` draws each.

    ``length_fair`` also fills the per-position means (``kl_student`` = m_q, ``kl_teacher`` = m_p)
    and the at-risk counts (``at_risk_student`` = n_q, ``at_risk_teacher`` = n_p); ``fixed_length``
    fills ``ended_early_*`` (draws that sampled EOS before l_max) when the stop ids are known.
    """

    lengths: list[int]
    R: list[float]
    eps: list[float]
    ex_acc_err: list[float]
    n_samples: int
    protocol: str = "fixed_length"
    kl_student: list[float] | None = None
    kl_teacher: list[float] | None = None
    at_risk_student: list[float] | None = None
    at_risk_teacher: list[float] | None = None
    ended_early_student: float | None = None
    ended_early_teacher: float | None = None
    student_samples: Samples | None = field(default=None, repr=False)
    teacher_samples: Samples | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"lengths", "ex_acc_err", "R", "eps", "n_samples", "protocol"}`` plus the
        protocol's extra fields when set (NaN -> null)."""
        out: dict[str, Any] = {"lengths": list(self.lengths), "ex_acc_err": _clean(self.ex_acc_err), "R": _clean(self.R),
                               "eps": _clean(self.eps), "n_samples": self.n_samples, "protocol": self.protocol}
        for k in ("kl_student", "kl_teacher", "at_risk_student", "at_risk_teacher"):
            v = getattr(self, k)
            if v is not None:
                out[k] = _clean(v)
        for k in ("ended_early_student", "ended_early_teacher"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out


def _weights(w: Sequence[float] | None, n: int) -> np.ndarray:
    w_N = np.ones(n, dtype=np.float64) if w is None else np.asarray(w, dtype=np.float64)
    if w_N.shape != (n,) or (w_N < 0).any():
        raise ValueError(f"need {n} non-negative weights, got {w_N.shape}")
    return w_N


def _padded(kl: Sequence[np.ndarray], L: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-draw errors as ``(N, L)`` (0 past a draw's end) and the alive mask ``(N, L)``."""
    d_NL = np.zeros((len(kl), L), dtype=np.float64)
    alive_NL = np.zeros((len(kl), L), dtype=np.float64)
    for n, k in enumerate(kl):
        m = min(len(k), L)
        d_NL[n, :m] = np.asarray(k, dtype=np.float64)[:m]
        alive_NL[n, :m] = 1.0
    return d_NL, alive_NL


def protocol_curve(
    protocol: str,
    kl_student: Sequence[np.ndarray],
    kl_teacher: Sequence[np.ndarray],
    *,
    w_student: Sequence[float] | None = None,
    w_teacher: Sequence[float] | None = None,
    ended_early: tuple[float, float] | None = None,
    min_at_risk: float = 1.0,
    length: int | None = None,
) -> ExposureCurve:
    """R, eps and ExAccErr under ``protocol`` from per-draw errors d_t(y) (see the module docstring).

    ``kl_student[n]`` holds d_1 .. d_|y| of the student's n-th draw (``kl_teacher`` of the
    teacher's); ``w_*`` weigh the draws (default 1 each: a Monte Carlo mean; sequence probabilities:
    an exact expectation). ``length``: l_max (default the longest draw). ``fixed_length`` needs every
    draw to have l_max positions. ``min_at_risk`` (``length_fair``): the curve ends at the last l
    where the summed weight of the draws still running is at least this, for both models.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown exposure protocol {protocol!r}; choose from {PROTOCOLS}")
    if not kl_student or not kl_teacher:
        raise ValueError("exposure bias needs at least one draw of each model")
    wq_N, wp_N = _weights(w_student, len(kl_student)), _weights(w_teacher, len(kl_teacher))
    L = length or max(len(k) for k in list(kl_student) + list(kl_teacher))
    L = max(L, 1)
    dq_NL, aq_NL = _padded(kl_student, L)
    dp_NL, ap_NL = _padded(kl_teacher, L)
    extra: dict[str, Any] = {}
    if protocol == "fixed_length":
        if aq_NL.min() < 1 or ap_NL.min() < 1:
            raise ValueError(f"fixed_length needs every draw to have {L} positions")
        R_L = wq_N @ dq_NL.cumsum(axis=1) / wq_N.sum()
        eps_L = wp_N @ dp_NL.cumsum(axis=1) / wp_N.sum()
        if ended_early is not None:
            extra = {"ended_early_student": ended_early[0], "ended_early_teacher": ended_early[1]}
    elif protocol == "to_eos":
        # zeros past a draw's end: the cumulative sum keeps the draw's final error
        R_L = wq_N @ dq_NL.cumsum(axis=1) / wq_N.sum()
        eps_L = wp_N @ dp_NL.cumsum(axis=1) / wp_N.sum()
    else:
        nq_L, np_L = wq_N @ aq_NL, wp_N @ ap_NL  # at-risk counts (summed weights) per position
        keep = int(np.sum((nq_L >= min_at_risk) & (np_L >= min_at_risk)))  # both counts only fall with t
        with np.errstate(invalid="ignore", divide="ignore"):
            mq_L = (wq_N @ dq_NL) / nq_L
            mp_L = (wp_N @ dp_NL) / np_L
        L = keep
        R_L, eps_L = np.cumsum(mq_L[:L]), np.cumsum(mp_L[:L])
        extra = {"kl_student": mq_L[:L].tolist(), "kl_teacher": mp_L[:L].tolist(),
                 "at_risk_student": nq_L[:L].tolist(), "at_risk_teacher": np_L[:L].tolist()}
    R, eps = R_L.tolist(), eps_L.tolist()
    return ExposureCurve(lengths=list(range(1, L + 1)), R=R, eps=eps, ex_acc_err=ex_acc_err(R, eps),
                         n_samples=len(kl_student), protocol=protocol, **extra)


def draw_samples(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    samples: int,
    seed: int,
    max_new_tokens: int,
    pad_id: int,
    vocab_size: int,
    batch_size: int,
    stop_ids: Sequence[int] = (),
    autocast: torch.dtype | None = None,
    engine: str = "eager",
) -> Samples:
    """``samples`` draws per prompt from ``model`` at temperature 1 (no filtering).

    Draw s of prompt i uses row key ``i * samples + s``, so a draw does not depend on the batch.
    ``engine`` is :func:`minillm.decoding.sample`'s decoding engine.
    """
    was_training = model.training
    model.eval()
    rows = [(i, s) for i in range(len(prompts)) for s in range(samples)]
    out = Samples([], [])
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        r = sample(
            model, [prompts[i] for i, _ in chunk], row_seeds(seed, [i * samples + s for i, s in chunk]),
            max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id, vocab_size=vocab_size, autocast=autocast,
            engine=engine,
        )
        for b, (i, _) in enumerate(chunk):
            out.prompt_index.append(i)
            out.responses.append(r.response_ids[b, : int(r.response_mask[b].sum())].tolist())
    model.train(was_training)
    return out


def _forward(model: Any, batch: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
    dev = next(model.parameters()).device
    ctx = torch.autocast(dev.type, dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        return model(**{k: v.to(dev) for k, v in batch.items()}, use_cache=False).logits


@torch.no_grad()
def position_kl(
    student: Any,
    teacher: Any,
    prompts: Sequence[Sequence[int]],
    draws: Samples,
    *,
    length: int,
    pad_id: int,
    vocab_size: int,
    batch_size: int,
    autocast: torch.dtype | None = None,
) -> list[np.ndarray]:
    """d_t(y) = KL(p(.|y<t, x) || q(.|y<t, x)) at every position t <= min(|y|, ``length``) of every draw.

    Returns one float64 array per draw. Per batch: one teacher-forced forward of each model over
    prompt + draw, logits ``(B, R, V)`` at the response positions, forward KL per position ``(B, R)``.
    """
    out: list[np.ndarray] = []
    models = [student, teacher]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    for start in range(0, len(draws.responses), batch_size):
        resp = [r[:length] for r in draws.responses[start : start + batch_size]]
        ids_BP, attn_BP = collate_prompts([prompts[i] for i in draws.prompt_index[start : start + batch_size]], pad_id)
        R = max(1, max(len(r) for r in resp))
        resp_BR = torch.full((len(resp), R), pad_id, dtype=torch.long)
        mask_BR = torch.zeros((len(resp), R), dtype=torch.float32)
        for b, r in enumerate(resp):
            resp_BR[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask_BR[b, : len(r)] = 1.0
        batch = sequence_batch(ids_BP, attn_BP, resp_BR, mask_BR)
        P = ids_BP.shape[1]
        q_BRV = vocab_logits(response_logits(_forward(student, batch, autocast), P, R), vocab_size)
        p_BRV = vocab_logits(response_logits(_forward(teacher, batch, autocast), P, R), vocab_size)
        kl_BR = per_token("forward_kl", q_BRV, p_BRV).double().cpu().numpy()
        out.extend(kl_BR[b, : len(r)].copy() for b, r in enumerate(resp))
    for m, mode in zip(models, modes):
        m.train(mode)
    return out


def accumulated_kl(
    student: Any,
    teacher: Any,
    prompts: Sequence[Sequence[int]],
    draws: Samples,
    *,
    length: int,
    pad_id: int,
    vocab_size: int,
    batch_size: int,
    autocast: torch.dtype | None = None,
) -> np.ndarray:
    """Mean over draws of sum_{t <= min(l, |y|)} d_t(y) for l = 1 .. ``length``, shape ``(length,)``.

    A draw shorter than l keeps its final sum (an empty draw adds 0): R / eps of ``to_eos`` and, for
    draws of exactly ``length`` tokens, of ``fixed_length``.
    """
    if not draws.responses:
        return np.zeros(length, dtype=np.float64)
    kl = position_kl(student, teacher, prompts, draws, length=length, pad_id=pad_id, vocab_size=vocab_size,
                     batch_size=batch_size, autocast=autocast)
    d_NL, _ = _padded(kl, length)
    return d_NL.cumsum(axis=1).mean(axis=0)


def _ended_early(draws: Samples, stop_ids: Sequence[int], length: int) -> int:
    """Draws that sampled a stop token at a position t < ``length`` (text after the answer follows)."""
    stops = set(stop_ids)
    return sum(any(tok in stops for tok in r[: length - 1]) for r in draws.responses)


def exposure_curves(
    student: Any,
    teacher: Any,
    prompts: Sequence[Sequence[int]],
    *,
    protocols: Sequence[str],
    samples: int,
    seed: int,
    max_new_tokens: int,
    pad_id: int,
    vocab_size: int,
    batch_size: int,
    stop_ids: Sequence[int] = (),
    teacher_samples: dict[str, Samples] | None = None,
    autocast: torch.dtype | None = None,
    engine: str = "eager",
    min_at_risk: float = 1.0,
) -> tuple[dict[str, ExposureCurve], dict[str, Samples]]:
    """One :class:`ExposureCurve` per protocol of ``student`` against ``teacher`` on ``prompts``.

    Draws are made once per kind: ``"fixed"`` (EOS ignored, for ``fixed_length``) and ``"eos"``
    (stopping at ``stop_ids``, shared by ``length_fair`` and ``to_eos``). Returns the curves and the
    teacher's draws by kind; pass those back as ``teacher_samples`` to reuse them for the next
    student (eps's draws do not depend on the student).
    """
    if not prompts:
        raise ValueError("exposure bias needs at least one prompt")
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"unknown exposure protocol {p!r}; choose from {PROTOCOLS}")
    if any(p != "fixed_length" for p in protocols) and not stop_ids:
        raise ValueError("length_fair and to_eos need stop_ids (the draws stop at EOS)")
    teacher_draws = dict(teacher_samples or {})
    common = dict(samples=samples, seed=seed, max_new_tokens=max_new_tokens, pad_id=pad_id, vocab_size=vocab_size,
                  batch_size=batch_size, autocast=autocast, engine=engine)
    kl = dict(length=max_new_tokens, pad_id=pad_id, vocab_size=vocab_size, batch_size=batch_size, autocast=autocast)
    curves: dict[str, ExposureCurve] = {}
    kinds = {"fixed": [p for p in protocols if p == "fixed_length"], "eos": [p for p in protocols if p != "fixed_length"]}
    for kind, names in kinds.items():
        if not names:
            continue
        stops = () if kind == "fixed" else tuple(stop_ids)
        q_draws = draw_samples(student, prompts, stop_ids=stops, **common)  # type: ignore[arg-type]
        if kind not in teacher_draws:
            teacher_draws[kind] = draw_samples(teacher, prompts, stop_ids=stops, **common)  # type: ignore[arg-type]
        p_draws = teacher_draws[kind]
        kq = position_kl(student, teacher, prompts, q_draws, **kl)  # type: ignore[arg-type]
        kp = position_kl(student, teacher, prompts, p_draws, **kl)  # type: ignore[arg-type]
        early = None
        if kind == "fixed" and stop_ids:
            early = (float(_ended_early(q_draws, stop_ids, max_new_tokens)), float(_ended_early(p_draws, stop_ids, max_new_tokens)))
        for name in names:
            length = max_new_tokens if name == "fixed_length" else None
            c = protocol_curve(name, kq, kp, ended_early=early, min_at_risk=min_at_risk, length=length)
            c.student_samples, c.teacher_samples = q_draws, p_draws
            curves[name] = c
    return curves, teacher_draws


def exposure_bias(
    student: Any,
    teacher: Any,
    prompts: Sequence[Sequence[int]],
    *,
    samples: int,
    seed: int,
    max_new_tokens: int,
    pad_id: int,
    vocab_size: int,
    batch_size: int,
    stop_ids: Sequence[int] = (),
    teacher_samples: Samples | None = None,
    autocast: torch.dtype | None = None,
    engine: str = "eager",
    protocol: str | None = None,
) -> ExposureCurve:
    """The ExAccErr curve of ``student`` against ``teacher`` under one protocol.

    ``protocol`` defaults to ``fixed_length`` without ``stop_ids`` (every draw has exactly
    ``max_new_tokens`` tokens) and ``to_eos`` with them. ``teacher_samples`` (from
    :func:`draw_samples` on the teacher with the same arguments) may be passed to reuse the
    teacher's draws across several students.
    """
    name = protocol or ("to_eos" if stop_ids else "fixed_length")
    kind = "fixed" if name == "fixed_length" else "eos"
    reuse = {kind: teacher_samples} if teacher_samples is not None else None
    curves, _ = exposure_curves(student, teacher, prompts, protocols=[name], samples=samples, seed=seed,
                                max_new_tokens=max_new_tokens, pad_id=pad_id, vocab_size=vocab_size,
                                batch_size=batch_size, stop_ids=stop_ids, teacher_samples=reuse, autocast=autocast,
                                engine=engine)
    return curves[name]


def _kl(p_V: np.ndarray, q_V: np.ndarray) -> float:
    """KL(p || q) in float64, 0 log 0 = 0."""
    p_V, q_V = np.asarray(p_V, dtype=np.float64), np.asarray(q_V, dtype=np.float64)
    nz = p_V > 0
    return float(np.sum(p_V[nz] * (np.log(p_V[nz]) - np.log(q_V[nz]))))


def exact_curve(
    protocol: str,
    p_next: Callable[[tuple[int, ...]], Sequence[float]],
    q_next: Callable[[tuple[int, ...]], Sequence[float]],
    *,
    stop_ids: Sequence[int],
    length: int,
    max_sequences: int = 200_000,
) -> ExposureCurve:
    """The exact expectation of ``protocol``'s curve for a small model given by its next-token rules.

    ``p_next(prefix)`` / ``q_next(prefix)`` give the teacher's / student's next-token probabilities
    ``(V,)`` after a response prefix (a tuple of token ids; the prompt is fixed). Every sequence a
    draw can be is enumerated - all ``V ** length`` of them for ``fixed_length``, those that stop at
    their first token of ``stop_ids`` (or reach ``length``) otherwise - with d_t(y) in float64; the
    student's draws are weighted by q(y), the teacher's by p(y), and :func:`protocol_curve` does the
    rest, so this checks the same code as the Monte Carlo path. At-risk counts and ``ended_early_*``
    are then probabilities (at-risk masses), not counts.
    """
    stops = set(stop_ids)
    to_eos = protocol != "fixed_length"
    seqs: list[tuple[list[float], float, float]] = []  # (d_1..d_|y|, q(y), p(y))
    early = [0.0, 0.0]

    def walk(prefix: tuple[int, ...], kl: list[float], wq: float, wp: float, ended: bool) -> None:
        if len(seqs) > max_sequences:
            raise ValueError(f"more than {max_sequences} sequences: use a smaller vocabulary or length")
        if len(prefix) == length or (to_eos and prefix and prefix[-1] in stops):
            seqs.append((kl, wq, wp))
            if ended:
                early[0] += wq
                early[1] += wp
            return
        p_V, q_V = np.asarray(p_next(prefix), dtype=np.float64), np.asarray(q_next(prefix), dtype=np.float64)
        d = _kl(p_V, q_V)
        for tok in range(len(p_V)):
            if p_V[tok] == 0 and q_V[tok] == 0:
                continue
            # an EOS before the last position means text after the answer follows (fixed_length)
            now_ended = ended or (tok in stops and len(prefix) < length - 1)
            walk((*prefix, tok), [*kl, d], wq * q_V[tok], wp * p_V[tok], now_ended)

    walk((), [], 1.0, 1.0, False)
    kl_N = [np.asarray(k) for k, _, _ in seqs]
    curve = protocol_curve(protocol, kl_N, kl_N, w_student=[w for _, w, _ in seqs], w_teacher=[w for _, _, w in seqs],
                           ended_early=(early[0], early[1]) if protocol == "fixed_length" else None,
                           min_at_risk=1e-300, length=length if protocol == "fixed_length" else None)
    return curve
