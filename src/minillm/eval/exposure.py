"""Exposure bias as excess accumulated error (Arora et al. 2022; MiniLLM Sec. 3.3).

With p the teacher, q the student, x a prompt and l a generation length:

    R(l)   = E_{y ~ q(.|x)} sum_{t=1..l} KL( p(.|y<t, x) || q(.|y<t, x) )   (student's own prefixes)
    eps(l) = E_{y ~ p(.|x)} sum_{t=1..l} KL( p(.|y<t, x) || q(.|y<t, x) )   (teacher's prefixes)
    ExAccErr(l) = (R(l) - eps(l)) / eps(l) x 100

R is the error the student accumulates on the prefixes it produces itself, eps the same error
on prefixes it was trained to imitate; their relative gap is the part due to exposure bias.
Both expectations are Monte Carlo averages over ``samples`` draws per prompt, at temperature 1
with no top-k / top-p (the definition needs y ~ q and y ~ p exactly). The student's and the
teacher's draws for a (prompt, sample) share their sampling noise (common random numbers), which
lowers the variance of R - eps.

Samples run to exactly ``max_new_tokens`` tokens by default, ignoring end-of-sequence, so every
sample contributes to every l (Arora et al. measure fixed-length generations). With
``stop_at_eos`` a sample ends at its EOS and adds nothing after it.

The KL at every position is the exact sum over the full vocabulary, from one teacher-forced
forward of each model over the sampled sequences (:func:`minillm.losses.per_token`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from minillm.data.instruct import collate_prompts
from minillm.decoding import response_logits, row_seeds, sample, sequence_batch
from minillm.losses import per_token
from minillm.models import vocab_logits

__all__ = ["ExposureCurve", "accumulated_kl", "draw_samples", "ex_acc_err", "exposure_bias"]


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


@dataclass
class ExposureCurve:
    """R(l), eps(l) and ExAccErr(l) for l = 1 .. len(lengths); ``n_samples`` draws each."""

    lengths: list[int]
    R: list[float]
    eps: list[float]
    ex_acc_err: list[float]
    n_samples: int
    student_samples: Samples | None = field(default=None, repr=False)
    teacher_samples: Samples | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"lengths", "ex_acc_err", "R", "eps", "n_samples"}`` (NaN -> null)."""
        clean = lambda xs: [None if not math.isfinite(x) else float(x) for x in xs]  # noqa: E731
        return {"lengths": list(self.lengths), "ex_acc_err": clean(self.ex_acc_err), "R": clean(self.R),
                "eps": clean(self.eps), "n_samples": self.n_samples}


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
    """Mean over draws of sum_{t <= l} KL(p(.|y<t, x) || q(.|y<t, x)) for l = 1 .. ``length``.

    Returns a float64 array of shape ``(length,)``. A draw shorter than l adds nothing after its
    end. Per batch: one teacher-forced forward of each model over prompt + draw, logits ``(B, R, V)``
    at the response positions, forward KL per position ``(B, R)``, cumulative sum over positions.
    """
    total_L = np.zeros(length, dtype=np.float64)
    n = len(draws.responses)
    if n == 0:
        return total_L
    models = [student, teacher]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    for start in range(0, n, batch_size):
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
        kl_BR = per_token("forward_kl", q_BRV, p_BRV).double().cpu() * mask_BR.double()
        cum_BR = kl_BR.cumsum(dim=1).sum(dim=0).numpy()  # (R,) summed over the batch
        total_L[:R] += cum_BR[:length]
        if length > R:  # draws that ended keep their final accumulated error
            total_L[R:] += cum_BR[-1]
    for m, mode in zip(models, modes):
        m.train(mode)
    return total_L / n


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
) -> ExposureCurve:
    """The ExAccErr curve of ``student`` against ``teacher`` on ``prompts`` (token ids).

    ``teacher_samples`` (from :func:`draw_samples` on the teacher with the same arguments) may be
    passed to reuse the teacher's draws across several students. ``stop_ids`` empty (default):
    every draw has exactly ``max_new_tokens`` tokens.
    """
    if not prompts:
        raise ValueError("exposure bias needs at least one prompt")
    common = dict(samples=samples, seed=seed, max_new_tokens=max_new_tokens, pad_id=pad_id, vocab_size=vocab_size,
                  batch_size=batch_size, stop_ids=stop_ids, autocast=autocast, engine=engine)
    q_draws = draw_samples(student, prompts, **common)  # type: ignore[arg-type]
    p_draws = teacher_samples if teacher_samples is not None else draw_samples(teacher, prompts, **common)  # type: ignore[arg-type]
    length = max([len(r) for r in q_draws.responses + p_draws.responses] + [1])
    kl = dict(length=length, pad_id=pad_id, vocab_size=vocab_size, batch_size=batch_size, autocast=autocast)
    R = accumulated_kl(student, teacher, prompts, q_draws, **kl)  # type: ignore[arg-type]
    eps = accumulated_kl(student, teacher, prompts, p_draws, **kl)  # type: ignore[arg-type]
    return ExposureCurve(
        lengths=list(range(1, length + 1)), R=R.tolist(), eps=eps.tolist(), ex_acc_err=ex_acc_err(R.tolist(), eps.tolist()),
        n_samples=len(q_draws.responses), student_samples=q_draws, teacher_samples=p_draws,
    )
