"""Per-token losses as pure functions.

Two families, one convention: every function returns per-token values of shape ``(B, T)``;
masking and reduction happen once, outside (:func:`masked_mean`, and the trainer's global token
normalisation). Shapes in names: ``_B`` batch, ``_T`` positions, ``_V`` vocabulary.

* **Divergences** ``D(student_logits_BTV, teacher_logits_BTV, **params) -> (B, T)``, registered by
  name in :data:`DIVERGENCES`. ``p`` is the teacher's next-token distribution, ``q`` the student's,
  both after dividing the logits by ``temperature``. Gradients flow into the student only when the
  caller lets them; the teacher logits are expected detached.
* **Policy-gradient pieces** for MiniLLM: :func:`future_returns`, :func:`clipped_pg`.

:func:`per_token` evaluates a divergence in chunks along ``T`` under activation checkpointing, so
the log-softmax of a batch x length x vocabulary tensor is never stored for backward on top of the
logits themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Divergence = Callable[..., torch.Tensor]
DIVERGENCES: dict[str, Divergence] = {}


def register(name: str) -> Callable[[Divergence], Divergence]:
    """Register a divergence under ``name``; a duplicate name is a programming error."""

    def deco(fn: Divergence) -> Divergence:
        if name in DIVERGENCES:
            raise ValueError(f"divergence {name!r} is already registered")
        DIVERGENCES[name] = fn
        return fn

    return deco


def get_divergence(name: str) -> Divergence:
    """Look a divergence up by name; an unknown name lists the options."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise KeyError(f"unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}") from None


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits are upcast; float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _logp(logits_BTV: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(_upcast(logits_BTV) / temperature, dim=-1)


def _kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) summed over the last axis; 0 * log 0 taken as 0."""
    a = logp_a.exp()
    # mask the log-ratio, not the product: a * (-inf) would give a NaN gradient where a = 0
    return (a * torch.where(a > 0, logp_a - logp_b, torch.zeros_like(a))).sum(-1)


def _mix(logp_a: torch.Tensor, logp_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w a + (1 - w) b) computed stably in log space."""
    if weight_a <= 0:
        return logp_b
    if weight_a >= 1:
        return logp_a
    # a finite floor: logaddexp(-inf, -inf) has a NaN gradient (a token both give probability 0)
    lo = torch.finfo(logp_a.dtype).min
    return torch.logaddexp((logp_a + math.log(weight_a)).clamp(min=lo), (logp_b + math.log1p(-weight_a)).clamp(min=lo))


@register("forward_kl")
def forward_kl(student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, *, temperature: float = 1.0, **_: float) -> torch.Tensor:
    """Forward KL, mean-covering (word-level KD): KL(p || q) = sum_v p(v) [log p(v) - log q(v)].

    Shapes: logits ``(B, T, V)`` -> ``(B, T)``.
    """
    return _kl(_logp(teacher_logits_BTV, temperature), _logp(student_logits_BTV, temperature))


@register("reverse_kl")
def reverse_kl(student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, *, temperature: float = 1.0, **_: float) -> torch.Tensor:
    """Reverse KL, mode-seeking (MiniLLM's single-step term): KL(q || p) = sum_v q(v) [log q(v) - log p(v)].

    Differentiated through ``q`` (both the weights q(v) and log q(v)). Shapes: ``(B, T, V)`` -> ``(B, T)``.
    """
    return _kl(_logp(student_logits_BTV, temperature), _logp(teacher_logits_BTV, temperature))


@register("jsd")
def jsd(student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, *, temperature: float = 1.0, beta: float = 0.5, **_: float) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024).

    JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.
    As in GKD's implementation the end points are the KLs themselves: beta = 0 gives KL(p || q)
    (forward), beta = 1 gives KL(q || p) (reverse). Shapes: ``(B, T, V)`` -> ``(B, T)``.
    """
    logp = _logp(teacher_logits_BTV, temperature)
    logq = _logp(student_logits_BTV, temperature)
    if beta <= 0:
        return _kl(logp, logq)
    if beta >= 1:
        return _kl(logq, logp)
    logm = _mix(logp, logq, beta)
    return beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)


@register("tvd")
def tvd(student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, *, temperature: float = 1.0, **_: float) -> torch.Tensor:
    """Total variation distance: TVD(p, q) = 1/2 sum_v |p(v) - q(v)|. Shapes: ``(B, T, V)`` -> ``(B, T)``."""
    p = _logp(teacher_logits_BTV, temperature).exp()
    q = _logp(student_logits_BTV, temperature).exp()
    return 0.5 * (p - q).abs().sum(-1)


@register("skew_forward_kl")
def skew_forward_kl(student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, *, temperature: float = 1.0, skew_alpha: float = 0.1, **_: float) -> torch.Tensor:
    """Skew forward KL (DistiLLM, Ko et al. 2024): KL(p || a p + (1 - a) q), a = ``skew_alpha``.

    a = 0 is the forward KL. Shapes: ``(B, T, V)`` -> ``(B, T)``.
    """
    logp = _logp(teacher_logits_BTV, temperature)
    logq = _logp(student_logits_BTV, temperature)
    return _kl(logp, _mix(logp, logq, skew_alpha))


@register("skew_reverse_kl")
def skew_reverse_kl(student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, *, temperature: float = 1.0, skew_alpha: float = 0.1, **_: float) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): KL(q || a q + (1 - a) p), a = ``skew_alpha``.

    a = 0 is the reverse KL. Shapes: ``(B, T, V)`` -> ``(B, T)``.
    """
    logp = _logp(teacher_logits_BTV, temperature)
    logq = _logp(student_logits_BTV, temperature)
    return _kl(logq, _mix(logq, logp, skew_alpha))


def _by_chunks(fn: Callable[..., torch.Tensor], logits_BTV: torch.Tensor, other: torch.Tensor, chunk: int) -> torch.Tensor:
    """``fn(logits chunk, other chunk) -> (B, t)`` over chunks of ``chunk`` positions -> ``(B, T)`` float32.

    When the logits need gradients, each chunk runs under non-reentrant activation checkpointing:
    the backward pass recomputes the chunk's softmax instead of keeping a second ``(B, T, V)``
    float32 tensor alive (only the chunk's inputs, views of the logits, are saved).
    """
    T = logits_BTV.shape[1]
    if T == 0:
        return logits_BTV.new_zeros(logits_BTV.shape[:2], dtype=torch.float32)
    grad = logits_BTV.requires_grad and torch.is_grad_enabled()
    outs = []
    for start in range(0, T, chunk):
        s, o = logits_BTV[:, start : start + chunk], other[:, start : start + chunk]
        outs.append(checkpoint(fn, s, o, use_reentrant=False) if grad else fn(s, o))
    return torch.cat(outs, dim=1)


def per_token(
    name: str,
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor,
    *,
    chunk: int = 128,
    **params: float,
) -> torch.Tensor:
    """Evaluate divergence ``name`` in chunks of ``chunk`` positions -> ``(B, T)``, checkpointed
    per chunk when the student logits need gradients (see :func:`_by_chunks`)."""
    fn = get_divergence(name)
    return _by_chunks(lambda s, t: fn(s, t, **params), student_logits_BTV, teacher_logits_BTV, chunk)


def token_cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Per-token negative log-likelihood -log q(y_t): ``(B, T, V)``, ``(B, T)`` -> ``(B, T)``."""
    return -token_logprobs(logits_BTV, targets_BT, chunk=chunk)


def token_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, chunk: int = 128, temperature: float = 1.0) -> torch.Tensor:
    """log q(y_t | y_<t) of the given tokens: ``(B, T, V)``, ``(B, T)`` -> ``(B, T)``.

    logit(y_t) - logsumexp per chunk: no log-softmax tensor is materialised, and with gradients
    each chunk is checkpointed (see :func:`_by_chunks`).
    """

    def logprob(lg: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        lg = _upcast(lg) if temperature == 1.0 else _upcast(lg) / temperature
        return lg.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, dim=-1)

    return _by_chunks(logprob, logits_BTV, targets_BT, chunk)


def token_entropy(logits_BTV: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Entropy of the next-token distribution, -sum_v q log q: ``(B, T, V)`` -> ``(B, T)`` (no grad)."""
    with torch.no_grad():
        outs = []
        for start in range(0, logits_BTV.shape[1], chunk):
            logq = F.log_softmax(_upcast(logits_BTV[:, start : start + chunk]), dim=-1)
            q = logq.exp()
            outs.append(-(q * torch.where(q > 0, logq, torch.zeros_like(logq))).sum(-1))  # 0 log 0 = 0
        return torch.cat(outs, dim=1) if outs else logits_BTV.new_zeros(logits_BTV.shape[:2])


def masked_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is set; 0 (not NaN) when none is."""
    mask = mask_BT.to(values_BT.dtype)
    # where, not only a product: inf/NaN at a padded position must not leak (inf * 0 = NaN)
    return (torch.where(mask != 0, values_BT, torch.zeros_like(values_BT)) * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# Policy gradient (MiniLLM, Sec. 2.2).


def future_returns(
    rewards_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    gamma: float = 1.0,
    length_norm: bool = True,
    include_current: bool = False,
) -> torch.Tensor:
    """Long-term return per response position -> ``(B, T)``, detached.

    Paper (default): R_{t+1} = sum_{t' > t} gamma^(t' - t - 1) r_{t'}, and with length
    normalisation R_{t+1} / (T_b - t), the number of rewards summed (0 where none remain).
    ``include_current`` follows the reference code: sum_{t' >= t} gamma^(t' - t) r_{t'}, normalised
    by the T_b - t + 1 terms it sums. Positions are counted from the start of the response, so the
    discount never depends on the prompt length; padded positions hold no reward and get 0.
    """
    mask = mask_BT.to(torch.float64)
    r = rewards_BT.detach().to(torch.float64) * mask
    T = r.shape[1]
    idx = torch.arange(T, device=r.device)
    offset = 0 if include_current else 1
    # D[t', t] = gamma^(t' - t - offset) for t' >= t + offset: returns = r @ D
    diff = idx[:, None] - idx[None, :] - offset
    D = torch.where(diff >= 0, torch.tensor(gamma, dtype=torch.float64, device=r.device) ** diff.clamp(min=0), 0.0)
    returns = r @ D
    if length_norm:
        count = mask @ (diff >= 0).to(torch.float64)
        returns = torch.where(count > 0, returns / count.clamp(min=1), torch.zeros_like(returns))
    return (returns * mask).to(rewards_BT.dtype if rewards_BT.is_floating_point() else torch.float32)


def clipped_pg(
    logq_BT: torch.Tensor,
    logq_old_BT: torch.Tensor,
    weight_BT: torch.Tensor,
    advantage_BT: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clipped policy-gradient loss with teacher-mix importance weights -> ``(B, T)`` twice.

    ratio_t = q_theta(y_t) / q_old(y_t) * w_t with w_t = q_old(y_t) / p~(y_t), so ratio_t equals
    q_theta(y_t) / p~(y_t); loss_t = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps)).
    ``clip`` = 0 disables clipping. Returns (loss, clipped indicator).
    """
    ratio = torch.exp(logq_BT - logq_old_BT.detach()) * weight_BT.detach()
    adv = advantage_BT.detach()
    loss = -adv * ratio
    if clip <= 0:
        return loss, torch.zeros_like(loss)
    clipped_loss = -adv * ratio.clamp(1 - clip, 1 + clip)
    return torch.maximum(loss, clipped_loss), (clipped_loss > loss).to(loss.dtype)


def whiten(values_BT: torch.Tensor, mask_BT: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance (and zero mean) over the masked positions, as the reference code does."""
    m = mask_BT.to(values_BT.dtype)
    n = m.sum().clamp(min=1)
    mean = (values_BT * m).sum() / n
    var = (((values_BT - mean) * m) ** 2).sum() / n
    out = (values_BT - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * m


def whiten_padded(values_BT: torch.Tensor) -> torch.Tensor:
    """The reference code's whitening of one PPO mini-batch -> ``(B, T)``: (x - mean) / sqrt(var + 1e-8)
    over *every* position of the padded tensor, so padding (0 where the caller padded) enters both
    the mean and the variance, and the result is not zero there (the loss masks it).

    mean and var (denominator n, the population variance) are taken over the positions of every
    rank's mini-batch under ``torch.distributed``, as the reference's ``get_global_statistics``,
    which is the path it always takes (it initialises a process group even for one GPU)."""
    import torch.distributed as dist

    x = values_BT.detach()
    sum_count = torch.stack([x.sum(), torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)])
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.all_reduce(sum_count)
    mean = sum_count[0] / sum_count[1]
    sq = ((x - mean) ** 2).sum()
    if distributed:
        dist.all_reduce(sq)
    return (x - mean) * torch.rsqrt(sq / sum_count[1] + 1e-8)
