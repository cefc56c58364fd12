"""Losses fused with the LM head (:mod:`minillm.fused`) against the plain logits path in float64:
values and gradients (hidden states, head weight, bias) with padding, temperature, tied and untied
heads, padded vocabularies, a teacher given as logits or as hidden states + head; and edge cases."""

from __future__ import annotations

import pytest
import torch

from minillm import losses
from minillm.fused import Head, head_terms

B, T, D, V, V_PAD, DT = 3, 7, 5, 11, 14, 6
DIVS = sorted(losses.DIVERGENCES)


def _setup(seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    h = r(B, T, D).requires_grad_(True)
    w = (2 * r(V_PAD, D)).requires_grad_(True)  # padded rows V..V_PAD-1 are never used
    b = r(V_PAD).requires_grad_(True) if bias else None
    t_h, t_w = r(B, T, DT), 2 * r(V, DT)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 5:] = 0  # padding at the end of a row
    mask[2, :2] = 0  # and prompt positions at the start of another
    coef = {k: r(B, T) for k in ("logprob", "divergence", "entropy")}  # arbitrary upstream gradients
    return h, w, b, t_h, t_w, y, mask, coef


def _plain(h, w, b, t_logits, y, mask, coef, divergence, params):
    logits = h @ w[:V].T + (b[:V] if b is not None else 0)
    out = {"logprob": losses.token_logprobs(logits, y)}
    if divergence is not None:
        out["divergence"] = losses.per_token(divergence, logits, t_logits, **params)
    out["entropy"] = losses.token_entropy(logits)
    return out, sum((coef[k] * v * mask).sum() for k, v in out.items() if k != "entropy")


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [x for x in tensors if x is not None])


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("teacher_as", ["logits", "hidden"])
def test_values_and_gradients_equal_the_plain_path(divergence: str, temperature: float, teacher_as: str) -> None:
    h, w, b, t_h, t_w, y, mask, coef = _setup()
    params = {"temperature": temperature, "beta": 0.3, "skew_alpha": 0.2}
    t_logits = t_h @ t_w.T
    ref, ref_loss = _plain(h, w, b, t_logits, y, mask, coef, divergence, params)
    ref_g = _grads(ref_loss, [h, w, b])
    teacher = (t_h, Head(t_w, None, V)) if teacher_as == "hidden" else (t_logits, None)
    got = head_terms(h, Head(w, b, V), targets_BT=y, entropy=True, divergence=divergence, teacher_BTD=teacher[0],
                     teacher_head=teacher[1], mask_BT=mask, chunk=4, **params)
    for k in ("logprob", "divergence", "entropy"):
        torch.testing.assert_close(got[k], ref[k] * mask, rtol=1e-10, atol=1e-12)
        assert (got[k][mask == 0] == 0).all()
    loss = sum((coef[k] * got[k] * mask).sum() for k in ("logprob", "divergence"))
    for a, e in zip(_grads(loss, [h, w, b]), ref_g):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
    assert not got["entropy"].requires_grad


def test_tied_head_accumulates_both_gradients() -> None:
    """A tied output embedding also feeds the input: its gradient is the sum of both uses."""
    h, w, _, t_h, t_w, y, mask, coef = _setup(1, bias=False)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))

    def hidden(weight):
        return h + weight[ids][..., :D]  # the embedding lookup of the same matrix

    t_logits = t_h @ t_w.T
    _, ref_loss = _plain(hidden(w), w, None, t_logits, y, mask, coef, "reverse_kl", {})
    ref_g = _grads(ref_loss, [h, w])
    got = head_terms(hidden(w), Head(w, None, V), targets_BT=y, divergence="reverse_kl", teacher_BTD=t_logits, mask_BT=mask)
    loss = sum((coef[k] * got[k] * mask).sum() for k in ("logprob", "divergence"))
    g_h, g_w = _grads(loss, [h, w])
    torch.testing.assert_close(g_h, ref_g[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_w, ref_g[1], rtol=1e-9, atol=1e-12)
    assert w.shape[0] == V_PAD and (g_w[V:] == 0).all()  # padded rows: no gradient from the head (nor the lookup)


def test_logits_path_without_head_matches() -> None:
    """head=None: the input is logits already (the materialised path), same values and gradient."""
    h, w, b, t_h, t_w, y, mask, coef = _setup(2)
    logits = (h @ w[:V].T + b[:V]).detach().requires_grad_(True)
    t_logits = t_h @ t_w.T
    ref, ref_loss = _plain(logits, torch.eye(V, dtype=torch.float64), None, t_logits, y, mask, coef, "forward_kl", {})
    (ref_g,) = _grads(ref_loss, [logits])
    got = head_terms(logits, None, targets_BT=y, divergence="forward_kl", teacher_BTD=t_logits, mask_BT=mask, chunk=5)
    loss = sum((coef[k] * got[k] * mask).sum() for k in ("logprob", "divergence"))
    (g,) = _grads(loss, [logits])
    torch.testing.assert_close(g, ref_g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["divergence"], ref["divergence"] * mask, rtol=1e-10, atol=1e-12)


def test_all_masked_and_identical_distributions() -> None:
    h, w, b, t_h, t_w, y, mask, _ = _setup(4)
    none = head_terms(h, Head(w, b, V), targets_BT=y, divergence="reverse_kl", teacher_BTD=t_h @ t_w.T, mask_BT=torch.zeros(B, T))
    assert all((v == 0).all() for v in none.values())
    g = torch.autograd.grad(none["logprob"].sum() + none["divergence"].sum(), [h, w], allow_unused=True)
    assert all(x is None or (x == 0).all() for x in g)
    # the teacher is the student itself: every divergence is 0 and so is its gradient
    same_logits = (h @ w[:V].T + b[:V]).detach()
    for name in DIVS:
        out = head_terms(h, Head(w, b, V), divergence=name, teacher_BTD=same_logits, mask_BT=mask, beta=0.5, skew_alpha=0.1)
        torch.testing.assert_close(out["divergence"], torch.zeros(B, T, dtype=torch.float64), atol=1e-12, rtol=0)
        (gh,) = torch.autograd.grad(out["divergence"].sum(), [h])
        assert gh.abs().max() < 1e-9, name


def test_float32_inputs_and_unknown_divergence() -> None:
    h, w, b, t_h, t_w, y, mask, _ = _setup(5)
    out = head_terms(h.float(), Head(w.float(), b.float(), V), targets_BT=y, entropy=True, mask_BT=mask)
    assert out["logprob"].dtype == torch.float32 and out["entropy"].dtype == torch.float32
    ref = losses.token_logprobs((h @ w[:V].T + b[:V]).float(), y) * mask
    torch.testing.assert_close(out["logprob"], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="unknown divergence"):
        head_terms(h, Head(w, b, V), divergence="nope", teacher_BTD=t_h @ t_w.T)
