"""Per-token losses computed from final hidden states and the output layer, chunk by chunk.

The plain way to get a token-level loss is to build the logits ``(B, T, V)`` (hidden states times
the output embedding), keep them for backward, and take a log-softmax over them, itself a second
``(B, T, V)`` tensor (and a third for its gradient). At a 152k vocabulary that dominates a step's
memory. Here the logits of ``chunk`` positions at a time are made, used and dropped; the backward
pass makes them again per chunk (a custom autograd function) and turns the analytic gradient with
respect to the chunk's logits into gradients for the hidden states and the output layer. Neither
the student's nor the teacher's ``(B, T, V)`` logits ever exist, in forward or backward.

One call computes any of, per position (same conventions as :mod:`minillm.losses`: ``(B, T)`` out,
masking and reduction outside, float32 or float64 like the inputs):

* ``logprob``: log q(y_t) of the target, temperature 1 (:func:`minillm.losses.token_logprobs`);
  cross-entropy is its negative;
* ``entropy``: -sum_v q(v) log q(v), temperature 1, without gradient (:func:`minillm.losses.token_entropy`);
* ``divergence``: any registered divergence D(q, p) (:data:`minillm.losses.DIVERGENCES`) against
  the teacher, given as logits ``(B, T, V)`` or as its own hidden states and :class:`Head`.

Gradients with respect to z (a chunk's student logits, z' = z / tau):
d log q(y) / dz = onehot(y) - q; dKL(q||p)/dz' = q (log q - log p - KL); dKL(p||q)/dz' = q - p;
the other divergences differentiate their registered definition on the chunk. ``head=None``
takes ``hidden`` to be logits already (the materialised path, for models whose logits are not a
plain linear map of their last hidden state): the same function, without the recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from minillm.losses import _kl, _upcast, get_divergence

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # chunk positions x vocabulary: 64 MB per float32 temporary


@dataclass(frozen=True)
class Head:
    """A causal LM's output layer cut to the real vocabulary: logits = h @ weight[:V].T (+ bias[:V])."""

    weight: torch.Tensor  # (V', d), V' >= vocab_size (padded embedding rows are never used)
    bias: torch.Tensor | None
    vocab_size: int

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` -> ``(..., V)`` under the ambient autocast."""
        V = self.vocab_size
        return F.linear(hidden, self.weight[:V], self.bias[:V] if self.bias is not None else None)


@dataclass(frozen=True)
class _Spec:
    logprob: bool
    entropy: bool
    divergence: str | None
    params: tuple[tuple[str, float], ...]
    chunk: int
    student_head: Head | None = field(hash=False, compare=False)
    teacher_head: Head | None = field(hash=False, compare=False)
    autocast: tuple[str, bool, torch.dtype] = ("cpu", False, torch.bfloat16)

    @property
    def temperature(self) -> float:
        return float(dict(self.params).get("temperature", 1.0))


def _chunk_logits(x: torch.Tensor, head: Head | None) -> torch.Tensor:
    """The chunk's logits in float32 (float64 for float64 inputs): ``x`` itself without a head."""
    return _upcast(x if head is None else head.logits(x))


def _scaled(x: torch.Tensor, tau: float) -> torch.Tensor:
    return x if tau == 1.0 else x / tau


def _values(z: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor | None, spec: _Spec) -> list[torch.Tensor | None]:
    """(logprob, divergence, entropy) of one chunk of logits ``(C, V)``."""
    logq = F.log_softmax(z, dim=-1) if spec.logprob or spec.entropy else None
    lp = ent = div = None
    if spec.logprob:
        lp = logq.gather(-1, y.clamp(min=0)[:, None]).squeeze(-1)
    if spec.entropy:
        q = logq.exp()
        ent = -(q * torch.where(q > 0, logq, torch.zeros_like(logq))).sum(-1)
    if spec.divergence is not None:
        tau = spec.temperature
        if spec.divergence in ("reverse_kl", "forward_kl"):
            lq = logq if tau == 1.0 and logq is not None else F.log_softmax(_scaled(z, tau), dim=-1)
            lpt = F.log_softmax(_scaled(t, tau), dim=-1)
            div = _kl(lq, lpt) if spec.divergence == "reverse_kl" else _kl(lpt, lq)
        else:
            div = get_divergence(spec.divergence)(z[None], t[None], **dict(spec.params))[0]
    return [lp, div, ent]


def _logit_grad(z: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor | None, g_lp: torch.Tensor | None,
                g_div: torch.Tensor | None, spec: _Spec) -> torch.Tensor:
    """d(sum_n g_lp[n] logprob[n] + g_div[n] div[n]) / dz for one chunk ``(C, V)``."""
    g = torch.zeros_like(z)
    tau = spec.temperature
    lq1 = F.log_softmax(z, dim=-1) if g_lp is not None or (g_div is not None and tau == 1.0) else None
    if g_lp is not None:
        g -= g_lp[:, None] * lq1.exp()
        g.scatter_add_(-1, y.clamp(min=0)[:, None], g_lp[:, None].to(g.dtype))
    if g_div is not None:
        if spec.divergence in ("reverse_kl", "forward_kl"):
            lq = lq1 if tau == 1.0 else F.log_softmax(z / tau, dim=-1)
            q = lq.exp()
            lpt = F.log_softmax(_scaled(t, tau), dim=-1)
            if spec.divergence == "reverse_kl":
                diff = torch.where(q > 0, lq - lpt, torch.zeros_like(lq))
                kl = (q * diff).sum(-1, keepdim=True)
                g += (g_div[:, None] / tau) * q * (diff - kl)
            else:
                g += (g_div[:, None] / tau) * (q - lpt.exp())
        else:
            with torch.enable_grad():
                zz = z.detach().requires_grad_(True)
                d = get_divergence(spec.divergence)(zz[None], t[None], **dict(spec.params))[0]
                (gz,) = torch.autograd.grad(d, zz, g_div.to(d.dtype))
            g += gz
    return g


class _HeadTerms(torch.autograd.Function):
    """Chunked (logprob, divergence, entropy) over flattened positions ``idx`` of ``x_MD``."""

    @staticmethod
    def forward(ctx: Any, spec: _Spec, idx: torch.Tensor, x_MD: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, y_M: torch.Tensor | None, t_MD: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        M = x_MD.shape[0]
        dtype = torch.float64 if x_MD.dtype == torch.float64 else torch.float32
        outs = [torch.zeros(M, dtype=dtype, device=x_MD.device) for _ in range(3)]
        with torch.no_grad():
            for s in range(0, idx.numel(), spec.chunk):
                rows = idx[s : s + spec.chunk]
                z = _chunk_logits(x_MD[rows], spec.student_head)
                t = _chunk_logits(t_MD[rows], spec.teacher_head) if t_MD is not None else None
                for out, v in zip(outs, _values(z, t, y_M[rows] if y_M is not None else None, spec)):
                    if v is not None:
                        out[rows] = v.to(dtype)
        ctx.spec = spec
        ctx.save_for_backward(idx, x_MD, y_M, t_MD)
        ctx.mark_non_differentiable(outs[2])
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, g_lp: torch.Tensor | None, g_div: torch.Tensor | None, _g_ent: torch.Tensor | None) -> tuple[Any, ...]:
        spec: _Spec = ctx.spec
        idx, x_MD, y_M, t_MD = ctx.saved_tensors
        head = spec.student_head
        want_x, want_w, want_b = ctx.needs_input_grad[2], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        g_x = torch.zeros_like(x_MD) if want_x else None
        g_w = torch.zeros_like(head.weight) if want_w and head is not None else None
        g_b = torch.zeros_like(head.bias) if want_b and head is not None and head.bias is not None else None
        use_lp = g_lp is not None and spec.logprob
        use_div = g_div is not None and spec.divergence is not None
        if not (use_lp or use_div):
            return None, None, g_x, g_w, g_b, None, None
        dev_type, enabled, ac_dtype = spec.autocast
        V = head.vocab_size if head is not None else x_MD.shape[-1]
        with torch.no_grad(), torch.autocast(dev_type, dtype=ac_dtype, enabled=enabled):
            for s in range(0, idx.numel(), spec.chunk):
                rows = idx[s : s + spec.chunk]
                x = x_MD[rows]
                raw = x if head is None else head.logits(x)
                z = _upcast(raw)
                t = _chunk_logits(t_MD[rows], spec.teacher_head) if t_MD is not None else None
                g_z = _logit_grad(z, t, y_M[rows] if y_M is not None else None,
                                  g_lp[rows].to(z.dtype) if use_lp else None, g_div[rows].to(z.dtype) if use_div else None, spec)
                if head is None:
                    if g_x is not None:
                        g_x[rows] = g_z.to(g_x.dtype)
                    continue
                g_raw = g_z.to(raw.dtype)  # the matmuls run in the forward's compute dtype, as autograd's would
                if g_x is not None:
                    g_x.index_add_(0, rows, (g_raw @ head.weight[:V].to(g_raw.dtype)).to(g_x.dtype))
                if g_w is not None:
                    g_w[:V] += (g_raw.t() @ x.to(g_raw.dtype)).to(g_w.dtype)
                if g_b is not None:
                    g_b[:V] += g_raw.sum(0).to(g_b.dtype)
        return None, None, g_x, g_w, g_b, None, None


def head_terms(
    hidden_BTD: torch.Tensor,
    head: Head | None,
    *,
    targets_BT: torch.Tensor | None = None,
    entropy: bool = False,
    divergence: str | None = None,
    teacher_BTD: torch.Tensor | None = None,
    teacher_head: Head | None = None,
    mask_BT: torch.Tensor | None = None,
    chunk: int | None = None,
    **params: float,
) -> dict[str, torch.Tensor]:
    """``logprob`` (with ``targets_BT``), ``entropy`` and ``divergence`` (with ``teacher_BTD``) ``(B, T)``
    from student hidden states ``(B, T, d)`` and ``head``, in one chunked pass (see the module doc).

    ``hidden_BTD`` are logits ``(B, T, V)`` when ``head`` is None; ``teacher_BTD`` likewise
    (detached teacher logits, e.g. cached ones) when ``teacher_head`` is None, else the teacher's
    hidden states. Only positions with ``mask_BT`` set are computed (the others are 0).
    ``params`` go to the divergence (``temperature``, ``beta``, ``skew_alpha``). ``chunk``: positions
    per chunk (default: about 2^24 logits).
    """
    B, T = hidden_BTD.shape[:2]
    flat = hidden_BTD.reshape(B * T, hidden_BTD.shape[-1])
    if mask_BT is None:
        idx = torch.arange(B * T, device=flat.device)
    else:
        idx = mask_BT.reshape(-1).to(flat.device).nonzero().flatten()
    V = head.vocab_size if head is not None else hidden_BTD.shape[-1]
    if chunk is None:
        chunk = max(1, DEFAULT_CHUNK_ELEMENTS // max(V, 1))
    dev_type = flat.device.type
    spec = _Spec(
        logprob=targets_BT is not None, entropy=entropy, divergence=divergence,
        params=tuple(sorted(params.items())), chunk=chunk, student_head=head, teacher_head=teacher_head,
        autocast=(dev_type, torch.is_autocast_enabled(dev_type), torch.get_autocast_dtype(dev_type)),
    )
    if divergence is not None:
        get_divergence(divergence)  # an unknown name fails here, with the list of names
        if teacher_BTD is None:
            raise ValueError("a divergence needs the teacher's logits or hidden states (teacher_BTD)")
    y = targets_BT.reshape(-1).to(flat.device) if targets_BT is not None else None
    t = teacher_BTD.detach().reshape(B * T, teacher_BTD.shape[-1]) if divergence is not None else None
    weight = head.weight if head is not None else None
    bias = head.bias if head is not None else None
    lp, div, ent = _HeadTerms.apply(spec, idx, flat, weight, bias, y, t)
    out: dict[str, torch.Tensor] = {}
    if targets_BT is not None:
        out["logprob"] = lp.view(B, T)
    if divergence is not None:
        out["divergence"] = div.view(B, T)
    if entropy:
        out["entropy"] = ent.view(B, T)
    return out
