"""The MiniLLM gradient estimator is unbiased for the gradient of the sequence-level reverse KL.

A tiny "policy" whose next-token logits are a learnable table indexed by the prefix, over a
3-token vocabulary with EOS and responses of at most 3 tokens, has 15 possible responses. The exact
sequence-level KL(q || p) = sum_y q(y) log(q(y) / p(y)) and its autograd gradient are computed by
enumeration, and so is the expectation over y ~ q of MiniLLM's per-sequence gradient (Gu et al.
2024, Sec. 2.2; a = 0, no clipping, no discount, no length normalisation)

    sum_t [ grad KL(q(. | y<t) || p(. | y<t)) - R_{t+1} grad log q(y_t | y<t) ],
    R_{t+1} = sum_{t' > t} log p(y_t' | y<t') - log q(y_t' | y<t'),

built from the project's own pieces (``per_token("reverse_kl")``, ``future_returns``,
``clipped_pg``). The two must agree to float64 precision. A Monte-Carlo check then runs the real
sampler on a tiny GPT-2.
"""

from __future__ import annotations

import math

import pytest
import torch

from minillm.decoding import response_logits, sample, sequence_batch
from minillm.losses import clipped_pg, future_returns, per_token, token_logprobs

V, EOS, T_MAX = 3, 0, 3


def _responses() -> list[tuple[int, ...]]:
    """Every response: it ends at the first EOS or after T_MAX tokens."""
    out: list[tuple[int, ...]] = []

    def grow(prefix: tuple[int, ...]) -> None:
        if (prefix and prefix[-1] == EOS) or len(prefix) == T_MAX:
            out.append(prefix)
            return
        for v in range(V):
            grow((*prefix, v))

    grow(())
    return out


RESPONSES = _responses()
PREFIXES = sorted({y[:t] for y in RESPONSES for t in range(len(y))}, key=lambda p: (len(p), p))
ROW = {p: i for i, p in enumerate(PREFIXES)}  # prefix -> row of the logit table
B = len(RESPONSES)
IDS = torch.zeros(B, T_MAX, dtype=torch.long)  # padding holds EOS ids (masked out)
IDX = torch.zeros(B, T_MAX, dtype=torch.long)  # padding reads row 0 (garbage, masked out)
MASK = torch.zeros(B, T_MAX, dtype=torch.float64)
for _b, _y in enumerate(RESPONSES):
    for _t, _v in enumerate(_y):
        IDS[_b, _t], IDX[_b, _t], MASK[_b, _t] = _v, ROW[_y[:_t]], 1.0


def _tables(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64).requires_grad_()
    teacher = 1.5 * torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64)
    return student, teacher


def exact_kl(theta: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """sum_y q(y) log(q(y) / p(y)) by enumeration, log q(y) = sum_t log q(y_t | y<t)."""
    logq_tab, logp_tab = torch.log_softmax(theta, -1), torch.log_softmax(teacher, -1)
    total = theta.new_zeros(())
    mass = 0.0
    for y in RESPONSES:
        logq = sum(logq_tab[ROW[y[:t]], y[t]] for t in range(len(y)))
        logp = sum(logp_tab[ROW[y[:t]], y[t]] for t in range(len(y)))
        total = total + torch.exp(logq) * (logq - logp)
        mass += math.exp(float(logq.detach()))
    assert abs(mass - 1.0) < 1e-12  # the responses are every outcome
    return total


def expected_estimator(
    theta: torch.Tensor,
    teacher: torch.Tensor,
    *,
    single_step: bool = True,
    length_norm: bool = False,
    include_current: bool | None = None,
) -> torch.Tensor:
    """E_{y ~ q}[grad of MiniLLM's per-sequence loss] by enumeration (weight q(y), detached).

    single_step: loss_y = sum_t KL_t + pg_t with A_t = R_{t+1}; otherwise loss_y = sum_t pg_t with
    the return including r_t (pure policy gradient). pg_t is ``clipped_pg`` with clip 0 at
    q_theta = q_old, whose gradient is -A_t grad log q(y_t).
    """
    s_BTV, t_BTV = theta[IDX], teacher[IDX]
    logq = token_logprobs(s_BTV, IDS)
    logq_old = logq.detach()
    logp = token_logprobs(t_BTV, IDS)
    q_y = torch.exp((logq_old * MASK).sum(-1))  # the probability of sampling each response
    rewards = (logp - logq_old) * MASK
    current = (not single_step) if include_current is None else include_current
    adv = future_returns(rewards, MASK, gamma=1.0, length_norm=length_norm, include_current=current)
    logmix = logq_old  # a = 0: the sampler is q itself, so w = q_old / p~ = 1
    pg, clipped = clipped_pg(logq, logq_old, torch.exp(logq_old - logmix), adv, clip=0.0)
    assert clipped.sum() == 0
    per_tok = pg + per_token("reverse_kl", s_BTV, t_BTV, chunk=2) if single_step else pg
    loss = (q_y[:, None] * per_tok * MASK).sum()
    return torch.autograd.grad(loss, theta)[0]


def test_enumeration_is_complete() -> None:
    assert B == 1 + 2 + 12 and len(PREFIXES) == 7
    assert sorted(MASK.sum(-1).tolist()) == [1.0] + [2.0] * 2 + [3.0] * 12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_step_estimator_is_unbiased(seed: int) -> None:
    theta, teacher = _tables(seed)
    true_grad = torch.autograd.grad(exact_kl(theta, teacher), theta)[0]
    est = expected_estimator(theta, teacher, single_step=True)
    assert true_grad.abs().max() > 1e-2  # a real signal, not two zeros
    torch.testing.assert_close(est, true_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_policy_gradient_is_unbiased(seed: int) -> None:
    """single_step off: the return includes r_t and no single-step term is added."""
    theta, teacher = _tables(seed)
    true_grad = torch.autograd.grad(exact_kl(theta, teacher), theta)[0]
    est = expected_estimator(theta, teacher, single_step=False)
    torch.testing.assert_close(est, true_grad, rtol=1e-10, atol=1e-12)


def test_double_counting_the_current_reward_is_caught() -> None:
    """Negative control: the single-step term plus a return that includes r_t counts step t twice."""
    theta, teacher = _tables(0)
    true_grad = torch.autograd.grad(exact_kl(theta, teacher), theta)[0]
    est = expected_estimator(theta, teacher, single_step=True, include_current=True)
    assert (est - true_grad).norm() > 0.1 * true_grad.norm()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_length_normalised_estimator_is_a_descent_direction(seed: int) -> None:
    """R_{t+1} / (T - t) is a different (biased by design) objective: not equal, but still downhill."""
    theta, teacher = _tables(seed)
    true_grad = torch.autograd.grad(exact_kl(theta, teacher), theta)[0]
    est = expected_estimator(theta, teacher, single_step=True, length_norm=True)
    assert (est - true_grad).norm() > 1e-3 * true_grad.norm()
    assert torch.dot(est.flatten(), true_grad.flatten()) > 0


def test_gradient_step_lowers_the_kl() -> None:
    """Following the expected estimate for a few steps lowers the exact KL, which is what training does."""
    theta, teacher = _tables(3)
    kl0 = float(exact_kl(theta, teacher).detach())
    work = theta.detach().clone()
    for _ in range(6):
        g = expected_estimator(work.requires_grad_(), teacher)
        work = (work - 1.0 * g).detach()
    assert float(exact_kl(work, teacher)) < 0.3 * kl0


# --- Monte Carlo with the real sampler on a tiny GPT-2 -------------------------------------------


def test_monte_carlo_with_real_sampler() -> None:
    """The estimator averaged over rollouts of :func:`minillm.decoding.sample` approaches the exact
    gradient of KL(q || p) over the enumerable responses (max 2 new tokens, vocabulary 5).

    The error is judged against its own predicted size sigma^2 = (E||g_y||^2 - ||E g_y||^2) / N,
    computed from the enumerated per-response gradients; sampled response frequencies must also
    pass a chi-square test against q(y).
    """
    from minillm.tiny import build_word_tokenizer, tiny_gpt2

    tok = build_word_tokenizer(["a b"])
    n_vocab, eos, pad = len(tok), tok.eos_token_id, tok.pad_token_id
    student, teacher = (tiny_gpt2(tok, n_layer=1, n_embd=16, n_head=2, n_positions=16, seed=s).eval() for s in (1, 2))
    with torch.no_grad():  # larger than the 0.02-std initialisation, so q and p differ visibly
        for model in (student, teacher):
            model.transformer.wte.weight.mul_(4)
            for w in model.transformer.h.parameters():
                if w.dim() == 2:
                    w.mul_(15)
    params = [p for p in student.parameters() if p.requires_grad]
    prompt = tok("a b a")["input_ids"]
    max_new = 2

    def per_sequence_losses(resp_ids: torch.Tensor, resp_mask: torch.Tensor, logq_old: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """MiniLLM's per-response loss sum_t mask (KL_t + pg_t), a = 0, clip 0, gamma 1, no length norm."""
        n = resp_ids.shape[0]
        p_ids = torch.tensor([prompt] * n)
        seq = sequence_batch(p_ids, torch.ones_like(p_ids), resp_ids, resp_mask)
        s = response_logits(student(**seq).logits, p_ids.shape[1], resp_ids.shape[1])
        with torch.no_grad():
            t = response_logits(teacher(**seq).logits, p_ids.shape[1], resp_ids.shape[1])
        logq = token_logprobs(s, resp_ids)
        adv = future_returns((logp - logq_old) * resp_mask, resp_mask, gamma=1.0, length_norm=False)
        pg, _ = clipped_pg(logq, logq_old, torch.ones_like(logq), adv, clip=0.0)
        return ((per_token("reverse_kl", s, t) + pg) * resp_mask).sum(-1)

    def flat_grad(loss: torch.Tensor, retain: bool = False) -> torch.Tensor:
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=retain)])

    # every response: [eos] or two tokens, the first not eos
    responses = [[eos]] + [[a, b] for a in range(n_vocab) if a != eos for b in range(n_vocab)]
    R = len(responses)
    e_ids = torch.full((R, max_new), pad)
    e_mask = torch.zeros(R, max_new)
    for i, y in enumerate(responses):
        e_ids[i, : len(y)] = torch.tensor(y)
        e_mask[i, : len(y)] = 1.0
    p_ids = torch.tensor([prompt] * R)
    seq = sequence_batch(p_ids, torch.ones_like(p_ids), e_ids, e_mask)
    logq_tok = token_logprobs(response_logits(student(**seq).logits, p_ids.shape[1], max_new), e_ids) * e_mask
    with torch.no_grad():
        logp_tok = token_logprobs(response_logits(teacher(**seq).logits, p_ids.shape[1], max_new), e_ids) * e_mask
    logq_y, logp_y = logq_tok.sum(-1), logp_tok.sum(-1)
    q_y = logq_y.exp().detach()
    assert abs(float(q_y.sum()) - 1.0) < 1e-5
    true_grad = flat_grad((logq_y.exp() * (logq_y - logp_y)).sum())
    # the per-response estimator gradients, and their mean under q (= the true gradient, see above)
    losses = per_sequence_losses(e_ids, e_mask, logq_tok.detach(), logp_tok)
    g_y = torch.stack([flat_grad(losses[i], retain=True) for i in range(R)])
    torch.testing.assert_close(q_y @ g_y, true_grad, rtol=1e-4, atol=1e-6)

    N = 3000
    r = sample(student, [prompt] * N, torch.arange(N), max_new_tokens=max_new, stop_ids=[eos], pad_id=pad, vocab_size=n_vocab, teacher=teacher)
    counts = torch.zeros(R)
    for b in range(N):
        y = r.response_ids[b, : int(r.response_mask[b].sum())].tolist()
        counts[responses.index(y)] += 1
    chi2 = float(((counts - N * q_y) ** 2 / (N * q_y)).sum())
    assert chi2 < 45.3, f"sampled responses do not follow q(y): chi2 {chi2:.1f} on {R - 1} dof (p < 0.001)"

    resp_ids = r.response_ids
    if resp_ids.shape[1] < max_new:  # every row stopped early
        resp_ids = torch.nn.functional.pad(resp_ids, (0, max_new - resp_ids.shape[1]), value=pad)
    mask = torch.nn.functional.pad(r.response_mask, (0, max_new - r.response_mask.shape[1]))
    logq_old = torch.nn.functional.pad(r.logq, (0, max_new - r.logq.shape[1]))
    logp = torch.nn.functional.pad(r.logp, (0, max_new - r.logp.shape[1]))
    mc_grad = flat_grad(per_sequence_losses(resp_ids, mask, logq_old, logp).mean())

    sigma2 = float((q_y @ (g_y**2).sum(-1) - true_grad.pow(2).sum()) / N)
    err2 = float((mc_grad - true_grad).pow(2).sum())
    assert err2 < 3.0 * sigma2, f"MC error^2 {err2:.3g} vs predicted {sigma2:.3g}"
    cos = float(torch.dot(mc_grad, true_grad) / (mc_grad.norm() * true_grad.norm()))
    assert cos > 0.8, cos
