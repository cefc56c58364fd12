"""Per-token losses against float64 references written from the definitions.

Every divergence of the registry is compared with a numpy loop over the vocabulary, then put
through one edge-case battery (identity, masking, padding garbage, -inf logits, sign, chunking).
The policy-gradient pieces (future returns, clipped PG, whitening) are compared with plain Python
loops over the batch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minillm import losses
from minillm.losses import (
    DIVERGENCES,
    clipped_pg,
    future_returns,
    get_divergence,
    masked_mean,
    per_token,
    register,
    token_cross_entropy,
    token_entropy,
    token_logprobs,
    whiten,
)

NEG_INF = float("-inf")

# (name, params): every registered divergence with its parameter end points and an interior value
CASES: list[tuple[str, dict[str, float]]] = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 1.0}),
    ("tvd", {}),
    ("skew_forward_kl", {"skew_alpha": 0.0}),
    ("skew_forward_kl", {"skew_alpha": 0.1}),
    ("skew_forward_kl", {"skew_alpha": 1.0}),
    ("skew_reverse_kl", {"skew_alpha": 0.0}),
    ("skew_reverse_kl", {"skew_alpha": 0.1}),
    ("skew_reverse_kl", {"skew_alpha": 1.0}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items())}" if p else n for n, p in CASES]


def test_cases_cover_the_registry() -> None:
    assert {n for n, _ in CASES} == set(DIVERGENCES)


# --- float64 references from the definitions -----------------------------------------------


def _softmax(logits_V: np.ndarray, temperature: float) -> np.ndarray:
    z = logits_V / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def _kl_ref(a_V: np.ndarray, b_V: np.ndarray) -> float:
    """sum_v a(v) log(a(v) / b(v)), with 0 log(0 / b) = 0 and a log(a / 0) = inf."""
    total = 0.0
    for a, b in zip(a_V, b_V):
        if a == 0.0:
            continue
        total += math.inf if b == 0.0 else a * math.log(a / b)
    return total


def _div_ref_one(name: str, q: np.ndarray, p: np.ndarray, params: dict[str, float]) -> float:
    if name == "forward_kl":
        return _kl_ref(p, q)
    if name == "reverse_kl":
        return _kl_ref(q, p)
    if name == "jsd":
        beta = params.get("beta", 0.5)
        if beta == 0.0:  # documented convention: the end points are the KLs themselves
            return _kl_ref(p, q)
        if beta == 1.0:
            return _kl_ref(q, p)
        m = beta * p + (1 - beta) * q
        return beta * _kl_ref(p, m) + (1 - beta) * _kl_ref(q, m)
    if name == "tvd":
        return 0.5 * float(sum(abs(pv - qv) for pv, qv in zip(p, q)))
    if name == "skew_forward_kl":
        a = params.get("skew_alpha", 0.1)
        return _kl_ref(p, a * p + (1 - a) * q)
    if name == "skew_reverse_kl":
        a = params.get("skew_alpha", 0.1)
        return _kl_ref(q, a * q + (1 - a) * p)
    raise AssertionError(f"no reference for {name}")


def div_ref(name: str, s_BTV: torch.Tensor, t_BTV: torch.Tensor, temperature: float = 1.0, **params: float) -> np.ndarray:
    """Reference divergence per position ``(B, T)``, float64, one vocabulary loop per position."""
    s, t = s_BTV.detach().double().numpy(), t_BTV.detach().double().numpy()
    B, T, _ = s.shape
    out = np.zeros((B, T))
    for b in range(B):
        for i in range(T):
            out[b, i] = _div_ref_one(name, _softmax(s[b, i], temperature), _softmax(t[b, i], temperature), params)
    return out


def _grad(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d out / d x; zero when ``out`` does not depend on ``x`` (skew_forward_kl at skew_alpha 1 is KL(p || p))."""
    return torch.autograd.grad(out, x)[0] if out.requires_grad else torch.zeros_like(x)


def _logits(*shape: int, seed: int, scale: float = 2.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


# --- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_divergence_matches_reference(name: str, params: dict[str, float], temperature: float) -> None:
    s, t = _logits(2, 5, 7, seed=1), _logits(2, 5, 7, seed=2)
    fn = get_divergence(name)
    ref = div_ref(name, s, t, temperature, **params)
    out = fn(s, t, temperature=temperature, **params)
    assert out.shape == (2, 5) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-12)
    # float32 and bfloat16 inputs are computed in float32
    out32 = fn(s.float(), t.float(), temperature=temperature, **params)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, rtol=1e-4, atol=1e-5)
    assert fn(s.bfloat16(), t.bfloat16(), temperature=temperature, **params).dtype == torch.float32
    # per_token forwards the parameters and agrees
    np.testing.assert_allclose(per_token(name, s, t, chunk=2, temperature=temperature, **params).numpy(), ref, rtol=1e-10, atol=1e-12)


def test_parameters_matter() -> None:
    """Guard against a parameter silently swallowed by ``**_``: interior values differ from the end points."""
    s, t = _logits(1, 4, 6, seed=3), _logits(1, 4, 6, seed=4)
    jsd = [get_divergence("jsd")(s, t, beta=b) for b in (0.0, 0.5, 1.0)]
    assert not torch.allclose(jsd[0], jsd[1]) and not torch.allclose(jsd[1], jsd[2])
    for name, base in (("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")):
        fn = get_divergence(name)
        torch.testing.assert_close(fn(s, t, skew_alpha=0.0), get_divergence(base)(s, t))
        assert not torch.allclose(fn(s, t, skew_alpha=0.1), fn(s, t, skew_alpha=0.0))
        torch.testing.assert_close(fn(s, t, skew_alpha=1.0), torch.zeros(1, 4, dtype=torch.float64))
    t1, t2 = get_divergence("reverse_kl")(s, t, temperature=1.0), get_divergence("reverse_kl")(s, t, temperature=2.0)
    assert not torch.allclose(t1, t2)


# --- edge-case battery over the registry --------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_identical_distributions_give_zero(name: str, params: dict[str, float]) -> None:
    s = _logits(2, 4, 9, seed=5)
    fn = get_divergence(name)
    torch.testing.assert_close(fn(s, s.clone(), **params), torch.zeros(2, 4, dtype=torch.float64), atol=1e-12, rtol=0)
    # the same distribution written with shifted logits (softmax is shift-invariant), float32
    out = fn(s.float(), s.float() + 3.0, temperature=2.0, **params)
    torch.testing.assert_close(out, torch.zeros(2, 4), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_all_masked_gives_zero_not_nan(name: str, params: dict[str, float]) -> None:
    s = _logits(2, 3, 5, seed=6).requires_grad_()
    t = _logits(2, 3, 5, seed=7)
    out = masked_mean(per_token(name, s, t, **params), torch.zeros(2, 3))
    assert out.item() == 0.0
    assert torch.equal(_grad(out, s), torch.zeros_like(s))


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_padding_garbage_does_not_change_masked_mean(name: str, params: dict[str, float]) -> None:
    B, T, V = 3, 6, 8
    lengths = [6, 2, 4]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    s, t = _logits(B, T, V, seed=8), _logits(B, T, V, seed=9)
    fn_mean = lambda s_, t_: masked_mean(per_token(name, s_, t_, chunk=4, **params), mask)  # noqa: E731
    # reference: the mean over real positions only, each row cut to its length
    ref = np.concatenate([div_ref(name, s[b : b + 1, :n], t[b : b + 1, :n], **params)[0] for b, n in enumerate(lengths)]).mean()
    pad = mask[..., None] == 0
    for garbage_s, garbage_t in (
        (_logits(B, T, V, seed=10, scale=1e3), _logits(B, T, V, seed=11, scale=1e3)),
        (torch.full((B, T, V), 1e30, dtype=torch.float64), torch.zeros(B, T, V, dtype=torch.float64)),
    ):
        s_g = torch.where(pad, garbage_s, s).requires_grad_()
        t_g = torch.where(pad, garbage_t, t)
        out = fn_mean(s_g, t_g)
        np.testing.assert_allclose(out.item(), ref, rtol=1e-10)
        grad = _grad(out, s_g)
        assert torch.isfinite(grad).all() and (grad[pad.expand_as(grad)] == 0).all()
        # the same gradient as without garbage
        s_c = s.clone().requires_grad_()
        torch.testing.assert_close(grad, _grad(fn_mean(s_c, t), s_c))
    # non-finite garbage (a teacher giving a sampled token probability 0, NaN logits) stays out of the mean
    s_bad = torch.where(pad, torch.full_like(s, float("nan")), s)
    t_bad = torch.where(pad, torch.full_like(t, NEG_INF).index_fill(-1, torch.tensor([0]), 0.0), t)
    np.testing.assert_allclose(fn_mean(s_bad, t_bad).item(), ref, rtol=1e-10)


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_neg_inf_logits_give_finite_results(name: str, params: dict[str, float]) -> None:
    """A token with probability 0 under both models (vocabulary masking) contributes nothing."""
    B, T, V = 2, 3, 6
    s, t = _logits(B, T, V, seed=12), _logits(B, T, V, seed=13)
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[..., 2] = NEG_INF
    t_inf[..., 2] = NEG_INF
    s_inf[0, 1, 4] = NEG_INF  # and one more token masked in both at one position
    t_inf[0, 1, 4] = NEG_INF
    fn = get_divergence(name)
    x = s_inf.clone().requires_grad_()
    out = fn(x, t_inf, temperature=2.0, **params)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.detach().numpy(), div_ref(name, s_inf, t_inf, 2.0, **params), rtol=1e-10, atol=1e-12)
    # equal to dropping token 2 from the vocabulary
    keep = [v for v in range(V) if v != 2]
    torch.testing.assert_close(out.detach(), fn(s_inf[..., keep], t_inf[..., keep], temperature=2.0, **params))
    grad = _grad(out.sum(), x)
    assert torch.isfinite(grad).all(), "a zero-probability token must not turn the gradient into NaN"
    assert (grad[..., 2] == 0).all()
    # also through per_token's checkpointed path, in float32
    x32 = s_inf.float().requires_grad_()
    assert torch.isfinite(_grad(per_token(name, x32, t_inf.float(), chunk=2, **params).sum(), x32)).all()


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_one_sided_zero_probability_matches_reference(name: str, params: dict[str, float]) -> None:
    """-inf in only one model: finite where the definition is finite, +inf where it is not."""
    s, t = _logits(1, 2, 5, seed=14), _logits(1, 2, 5, seed=15)
    for s_, t_ in ((s.clone().index_fill(-1, torch.tensor([1]), NEG_INF), t), (s, t.clone().index_fill(-1, torch.tensor([1]), NEG_INF))):
        out = get_divergence(name)(s_, t_, **params)
        ref = div_ref(name, s_, t_, **params)
        assert not torch.isnan(out).any()
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_non_negative(name: str, params: dict[str, float]) -> None:
    for seed in range(4):
        s, t = _logits(4, 8, 11, seed=100 + seed, scale=1.0 + 3 * seed), _logits(4, 8, 11, seed=200 + seed, scale=4.0)
        assert (get_divergence(name)(s, t, **params) >= -1e-12).all()
        assert (get_divergence(name)(s.float(), t.float(), **params) >= -1e-6).all()
    if name == "tvd":
        assert (get_divergence(name)(s, t) <= 1.0 + 1e-12).all()


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_per_token_chunking_keeps_values_and_gradients(name: str, params: dict[str, float]) -> None:
    B, T, V = 2, 7, 9
    s, t = _logits(B, T, V, seed=16), _logits(B, T, V, seed=17)
    weights = _logits(B, T, seed=18)  # a non-uniform upstream gradient

    def run(chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = s.clone().requires_grad_()
        out = get_divergence(name)(x, t, temperature=2.0, **params) if chunk is None else per_token(name, x, t, chunk=chunk, temperature=2.0, **params)
        return out.detach(), _grad((out * weights).sum(), x)

    ref_out, ref_grad = run(None)
    for chunk in (1, 2, 3, 7, 128):
        out, grad = run(chunk)
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        torch.testing.assert_close(per_token(name, s, t, chunk=3, temperature=2.0, **params), ref_out)
    assert per_token(name, s[:, :0], t[:, :0], **params).shape == (B, 0)


def test_per_token_uses_checkpointing_only_with_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = losses.checkpoint

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "checkpoint", spy)
    s, t = _logits(1, 5, 4, seed=19), _logits(1, 5, 4, seed=20)
    per_token("reverse_kl", s, t, chunk=2)
    assert calls == []
    per_token("reverse_kl", s.requires_grad_(), t, chunk=2)
    assert len(calls) == 3


@pytest.mark.parametrize("fn", ["reverse_kl", "token_logprobs"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_losses_keep_no_second_logits_tensor_for_backward(fn: str, temperature: float) -> None:
    """What autograd saves for backward stays far below one more (B, T, V) float32 tensor: each
    chunk's softmax is recomputed, and only views of the logits are kept."""
    B, T, V = 2, 64, 512
    s = torch.randn(B, T, V, requires_grad=True)
    other = torch.randn(B, T, V) if fn == "reverse_kl" else torch.randint(0, V, (B, T))
    saved: list[torch.Tensor] = []

    def keep(x: torch.Tensor) -> torch.Tensor:
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda x: x):
        if fn == "reverse_kl":
            out = per_token("reverse_kl", s, other, chunk=16, temperature=temperature)
        else:
            out = token_logprobs(s, other, chunk=16, temperature=temperature)
    inputs = {s.untyped_storage().data_ptr(), other.untyped_storage().data_ptr()}  # held by the caller anyway
    owned = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x in saved
             if x.untyped_storage().data_ptr() not in inputs}
    assert sum(owned.values()) < 0.1 * s.numel() * 4, owned
    out.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reverse_kl_gradient(temperature: float) -> None:
    """d KL(q || p) / d s against autograd of the definition and the closed form
    (1 / tau) q_j (log q_j / p_j - KL)."""
    s, t = _logits(2, 3, 6, seed=21), _logits(2, 3, 6, seed=22)
    x = s.clone().requires_grad_()
    get_divergence("reverse_kl")(x, t, temperature=temperature).sum().backward()

    y = s.clone().requires_grad_()
    ez, et = torch.exp(y / temperature), torch.exp(t / temperature)
    q, p = ez / ez.sum(-1, keepdim=True), et / et.sum(-1, keepdim=True)
    kl = (q * torch.log(q / p)).sum(-1)
    kl.sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)

    q, p = q.detach(), p.detach()
    closed = q * (torch.log(q / p) - kl.detach()[..., None]) / temperature
    torch.testing.assert_close(x.grad, closed, rtol=1e-10, atol=1e-12)


# --- registry -------------------------------------------------------------------------------


def test_registry_duplicate_and_unknown_names() -> None:
    before = dict(DIVERGENCES)
    with pytest.raises(ValueError, match="forward_kl"):
        register("forward_kl")(lambda s, t, **_: s)
    assert before == DIVERGENCES
    with pytest.raises(KeyError) as err:
        get_divergence("reverse-kl")
    for name in DIVERGENCES:
        assert name in str(err.value)
    with pytest.raises(KeyError, match="reverse-kl"):
        per_token("reverse-kl", _logits(1, 2, 3, seed=0), _logits(1, 2, 3, seed=0))


def test_register_new_divergence() -> None:
    name = "_test_squared_prob_gap"
    try:

        @register(name)
        def gap(student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, **_: float) -> torch.Tensor:
            return ((student_logits_BTV.softmax(-1) - teacher_logits_BTV.softmax(-1)) ** 2).sum(-1)

        assert get_divergence(name) is gap
        assert per_token(name, _logits(1, 3, 4, seed=1), _logits(1, 3, 4, seed=2), chunk=2).shape == (1, 3)
    finally:
        DIVERGENCES.pop(name, None)


# --- token log-probs, cross-entropy, entropy --------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 128])
def test_token_logprobs_and_cross_entropy(chunk: int) -> None:
    B, T, V = 3, 5, 7
    logits = _logits(B, T, V, seed=23)
    g = torch.Generator().manual_seed(24)
    targets = torch.randint(0, V, (B, T), generator=g)
    for temperature in (1.0, 2.0):
        ref = torch.log_softmax(logits / temperature, -1).gather(-1, targets[..., None]).squeeze(-1)
        torch.testing.assert_close(token_logprobs(logits, targets, chunk=chunk, temperature=temperature), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(token_cross_entropy(logits, targets, chunk=chunk), -token_logprobs(logits, targets))
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="none").reshape(B, T)
    torch.testing.assert_close(token_cross_entropy(logits, targets, chunk=chunk), ce)
    # float32 path, bf16 input upcast, the ignore index (-100) is clamped and gives a finite value to mask
    ref1 = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits.float(), targets, chunk=chunk), ref1.float(), rtol=1e-5, atol=1e-5)
    assert token_logprobs(logits.bfloat16(), targets).dtype == torch.float32
    ignore = targets.clone()
    ignore[0, 2:] = -100
    assert torch.isfinite(token_logprobs(logits, ignore, chunk=chunk)).all()
    assert token_logprobs(logits[:, :0], targets[:, :0]).shape == (B, 0)
    # gradient: d log q_y / d s = onehot(y) - q
    x = logits.clone().requires_grad_()
    token_logprobs(x, targets, chunk=chunk).sum().backward()
    torch.testing.assert_close(x.grad, torch.nn.functional.one_hot(targets, V).double() - logits.softmax(-1))


def test_token_entropy() -> None:
    logits = _logits(2, 4, 5, seed=25)
    logits[0, 0, 1] = NEG_INF
    ref = np.zeros((2, 4))
    for b in range(2):
        for i in range(4):
            q = _softmax(logits[b, i].numpy(), 1.0)
            ref[b, i] = -sum(v * math.log(v) for v in q if v > 0)
    out = token_entropy(logits.requires_grad_(), chunk=3)
    assert not out.requires_grad
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12)
    uniform = token_entropy(torch.zeros(1, 2, 8))
    torch.testing.assert_close(uniform, torch.full((1, 2), math.log(8)))
    one_hot = torch.full((1, 1, 4), NEG_INF)
    one_hot[0, 0, 3] = 0.0
    assert token_entropy(one_hot).item() == 0.0


# --- future returns ---------------------------------------------------------------------------


def returns_ref(r: np.ndarray, lengths: list[int], gamma: float, length_norm: bool, include_current: bool) -> np.ndarray:
    """Double loop from the definition: R_t = sum_{t' >= t + k} gamma^(t' - t - k) r_t', k = 0 or 1,
    divided by the number of terms when length-normalised; 0 past the end of the row."""
    k = 0 if include_current else 1
    out = np.zeros_like(r)
    for b, n in enumerate(lengths):
        for t in range(n):
            total, count = 0.0, 0
            for t2 in range(t + k, n):
                total += gamma ** (t2 - t - k) * r[b, t2]
                count += 1
            if length_norm:
                total = total / count if count else 0.0
            out[b, t] = total
    return out


@pytest.mark.parametrize("include_current", [False, True])
@pytest.mark.parametrize("length_norm", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 0.95])
def test_future_returns(gamma: float, length_norm: bool, include_current: bool) -> None:
    lengths = [7, 1, 4, 0, 2]
    B, T = len(lengths), 7
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    r = _logits(B, T, seed=26)
    r_garbage = torch.where(mask > 0, r, torch.full_like(r, 1e6)).requires_grad_()  # padding holds junk
    out = future_returns(r_garbage, mask, gamma=gamma, length_norm=length_norm, include_current=include_current)
    ref = returns_ref(r.numpy(), lengths, gamma, length_norm, include_current)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)
    assert not out.requires_grad and out.grad_fn is None
    assert out.dtype == torch.float64
    assert (out[mask == 0] == 0).all()
    # float32 rewards come back as float32
    out32 = future_returns(r.float(), mask, gamma=gamma, length_norm=length_norm, include_current=include_current)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_future_returns_known_values() -> None:
    r = torch.tensor([[1.0, 2.0, 3.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = future_returns(r, mask, gamma=0.5, length_norm=False)
    torch.testing.assert_close(out, torch.tensor([[2.0 + 0.5 * 3.0, 3.0, 0.0, 0.0]], dtype=torch.float64))
    out = future_returns(r, mask, gamma=1.0, length_norm=True, include_current=True)
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.5, 3.0, 0.0]], dtype=torch.float64))


# --- clipped policy gradient ------------------------------------------------------------------


def clipped_ref(logq: np.ndarray, logq_old: np.ndarray, w: np.ndarray, adv: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per element: loss = max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(logq - logq_old) w;
    returns (loss, clipped indicator, d loss / d logq)."""
    loss, clipped, grad = np.zeros_like(logq), np.zeros_like(logq), np.zeros_like(logq)
    for idx in np.ndindex(logq.shape):
        ratio = math.exp(logq[idx] - logq_old[idx]) * w[idx]
        a = adv[idx]
        plain = -a * ratio
        if eps > 0:
            c = -a * min(max(ratio, 1 - eps), 1 + eps)
            loss[idx], clipped[idx] = max(plain, c), float(c > plain)
        else:
            loss[idx] = plain
        # the clipped branch is constant in logq; the plain one has derivative -A r
        grad[idx] = 0.0 if clipped[idx] else -a * ratio
    return loss, clipped, grad


@pytest.mark.parametrize("eps", [0.0, 0.2, 0.5])
def test_clipped_pg(eps: float) -> None:
    B, T = 4, 6
    logq_old = -torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(27)) * 3
    logq = logq_old + 0.6 * _logits(B, T, seed=28, scale=1.0)
    w = torch.exp(0.4 * _logits(B, T, seed=29, scale=1.0))
    adv = _logits(B, T, seed=30)
    x = logq.clone().requires_grad_()
    loss, clipped = clipped_pg(x, logq_old, w, adv, eps)
    ref_loss, ref_clipped, ref_grad = clipped_ref(logq.numpy(), logq_old.numpy(), w.numpy(), adv.numpy(), eps)
    np.testing.assert_allclose(loss.detach().numpy(), ref_loss, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(clipped.numpy(), ref_clipped)
    loss.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), ref_grad, rtol=1e-12, atol=1e-14)
    if eps > 0:
        assert 0 < ref_clipped.sum() < B * T, "the draw should exercise both branches"
    else:
        assert clipped.sum() == 0


def test_clipped_pg_ratio_is_q_over_mix_and_gradients_stop_at_old_terms() -> None:
    B, T = 3, 5
    logq_old = -torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(31)) * 2
    logmix = -torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(32)) * 2
    logq = (logq_old + 0.1 * _logits(B, T, seed=33, scale=1.0)).requires_grad_()
    w = torch.exp(logq_old - logmix).requires_grad_()
    adv = (-torch.ones(B, T, dtype=torch.float64)).requires_grad_()
    old = logq_old.clone().requires_grad_()
    loss, _ = clipped_pg(logq, old, w, adv, clip=0.0)  # A = -1: loss = ratio
    torch.testing.assert_close(loss, torch.exp(logq - logmix))
    loss.sum().backward()
    assert old.grad is None and w.grad is None and adv.grad is None  # all detached
    # at q_theta = q_old and w = 1 the gradient is -A d log q
    logq2 = logq_old.clone().requires_grad_()
    a2 = _logits(B, T, seed=34)
    clipped_pg(logq2, logq_old, torch.ones(B, T, dtype=torch.float64), a2, clip=0.2)[0].sum().backward()
    torch.testing.assert_close(logq2.grad, -a2)


# --- whitening --------------------------------------------------------------------------------


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten(shift_mean: bool) -> None:
    lengths = [5, 2, 3]
    T = 5
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=torch.float64)
    v = 3.0 + 2.0 * _logits(3, T, seed=35, scale=1.0)
    v_garbage = torch.where(mask > 0, v, torch.full_like(v, 1e6))
    out = whiten(v_garbage, mask, shift_mean=shift_mean)
    real = np.concatenate([v[b, :n].numpy() for b, n in enumerate(lengths)])
    mean, var = real.mean(), real.var()
    ref = np.zeros((3, T))
    for b, n in enumerate(lengths):
        for i in range(n):
            ref[b, i] = (v[b, i].item() - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-12)
    real_out = out[mask > 0]
    np.testing.assert_allclose(real_out.var(unbiased=False).item(), var / (var + 1e-8), rtol=1e-10)
    np.testing.assert_allclose(real_out.mean().item(), 0.0 if shift_mean else mean, atol=1e-10)
    assert (out[mask == 0] == 0).all()
