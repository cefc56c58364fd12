"""Paired decoding: counter-based noise, exact sampling, filtering, and the decode loop.

The decode loop is checked on tiny GPT-2 models built in-process against independent full-sequence
(teacher-forced) forwards: recorded log-probabilities, the teacher-mixed sampling distribution,
batch invariance under left padding, stop handling and n-gram blocking.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from minillm.decoding import (
    Rollout,
    filter_logprobs,
    gumbel_sample,
    hashed_uniform,
    response_logits,
    row_seeds,
    sample,
    sequence_batch,
)


def chi2_999(dof: int) -> float:
    """Upper 0.999 quantile of chi-square (Wilson-Hilferty, within 1% for dof >= 3): a fixed-seed
    frequency check fails only on a real skew."""
    z = 3.0902  # standard normal 0.999 quantile
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi2_stat(counts: np.ndarray, probs: np.ndarray) -> float:
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a zero-probability outcome was drawn"
    return float(((counts[keep] - n * probs[keep]) ** 2 / (n * probs[keep])).sum())


# --- counter-based noise ----------------------------------------------------------------------


def test_hashed_uniform_range_moments_and_determinism() -> None:
    seeds = torch.arange(-2000, 2000) * 7919
    seeds[0], seeds[1] = torch.iinfo(torch.int64).max, torch.iinfo(torch.int64).min
    u = hashed_uniform(seeds, step=3, V=50)
    assert u.shape == (4000, 50) and u.dtype == torch.float64
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0  # log(-log u) stays finite
    n = u.numel()
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / n)
    # Var(sample variance of U(0,1)) = (1/80 - 1/144) / n
    assert abs(float(u.var()) - 1 / 12) < 4 * math.sqrt((1 / 80 - 1 / 144) / n)
    hist = np.histogram(u.numpy(), bins=20, range=(0, 1))[0]
    assert chi2_stat(hist, np.full(20, 1 / 20)) < chi2_999(19)
    # a pure function of (seed, step, token): same inputs, same noise; a row never depends on the others
    torch.testing.assert_close(hashed_uniform(seeds, 3, 50), u, rtol=0, atol=0)
    torch.testing.assert_close(hashed_uniform(seeds[17:18], 3, 50), u[17:18], rtol=0, atol=0)


def test_hashed_uniform_differs_across_steps_seeds_and_tokens() -> None:
    seeds = torch.arange(2000)
    u0, u1 = hashed_uniform(seeds, 0, 8), hashed_uniform(seeds, 1, 8)
    u_other = hashed_uniform(seeds + 10_000, 0, 8)
    assert not torch.isclose(u0, u1).any()
    assert not torch.isclose(u0, u_other).any()
    assert not torch.isclose(u0[1:], u0[:-1]).any()  # consecutive seeds
    assert not torch.isclose(u0[:, 1:], u0[:, :-1]).any()  # neighbouring tokens
    # no linear dependence between steps, seeds or tokens: |corr| of independent U(0,1) ~ 1/sqrt(n)
    bound = 5 / math.sqrt(u0.numel())
    for a, b in ((u0, u1), (u0, u_other), (u0[:, 1:], u0[:, :-1]), (u0[1:], u0[:-1])):
        corr = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert abs(corr) < bound, corr


def test_row_seeds_depend_on_key_and_salt_only() -> None:
    a = row_seeds(3, [5, 9, 11])
    assert a.dtype == torch.int64 and len(set(a.tolist())) == 3
    torch.testing.assert_close(row_seeds(3, [11, 5]), a[[2, 0]])
    assert not torch.equal(row_seeds(3, [5, 9, 11], salt=1), a)
    assert not torch.equal(row_seeds(4, [5, 9, 11]), a)


def test_gumbel_sample_follows_the_distribution() -> None:
    probs = np.array([0.4, 0.25, 0.0, 0.15, 0.12, 0.08])
    logp = torch.log(torch.tensor(probs))  # token 2 has log-probability -inf
    N = 20_000
    seeds = row_seeds(1, range(N))
    for step in (0, 5):
        y = gumbel_sample(logp[None].expand(N, -1), seeds, step)
        counts = np.bincount(y.numpy(), minlength=len(probs))
        assert chi2_stat(counts, probs) < chi2_999(4)
    # a different distribution is rejected by the same statistic (the check has power)
    assert chi2_stat(counts, np.array([0.35, 0.3, 0.0, 0.15, 0.12, 0.08])) > chi2_999(4)
    # per-row reproducible, whatever else is in the batch
    row = gumbel_sample(logp[None], seeds[123:124], 5)
    assert int(row) == int(y[123])


def test_gumbel_sample_unnormalised_and_float32_inputs() -> None:
    """argmax(log pi + G) does not need normalised log-probabilities: a shift changes nothing."""
    logits = torch.randn(500, 9, generator=torch.Generator().manual_seed(0))
    seeds = torch.arange(500)
    y = gumbel_sample(torch.log_softmax(logits, -1), seeds, 2)
    torch.testing.assert_close(gumbel_sample(logits + 3.0, seeds, 2), y, rtol=0, atol=0)


# --- filtering --------------------------------------------------------------------------------


def filter_ref(logp_V: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """From the definitions: p ~ exp(logp / tau); keep the k most likely; then keep the shortest
    most-likely prefix whose mass reaches top_p (a token stays while the mass before it is < top_p)."""
    z = logp_V / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda v: -p[v])
    keep = set(order[:top_k]) if top_k else set(order)
    if top_p < 1.0:
        mass_kept = sum(p[v] for v in keep)
        before, nucleus = 0.0, set()
        for v in order:
            if v not in keep:
                continue
            if before >= top_p:
                break
            nucleus.add(v)
            before += p[v] / mass_kept
        keep = nucleus
    out = np.full(len(p), -np.inf)
    total = sum(p[v] for v in keep)
    for v in keep:
        out[v] = math.log(p[v] / total)
    return out


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (2.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 1, 1.0), (1.0, 0, 0.6), (1.0, 0, 0.05), (0.7, 4, 0.8), (1.5, 10, 0.9)],
)
def test_filter_logprobs_matches_reference(temperature: float, top_k: int, top_p: float) -> None:
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(2.0 * torch.randn(4, 8, generator=g, dtype=torch.float64), -1)
    out = filter_logprobs(logp, temperature, top_k, top_p)
    for b in range(4):
        ref = filter_ref(logp[b].numpy(), temperature, top_k, top_p)
        np.testing.assert_allclose(out[b].numpy(), ref, rtol=1e-10, atol=1e-12)
        assert math.isclose(float(out[b].exp().sum()), 1.0, rel_tol=1e-12)
    if top_k == 1 or top_p == 0.05:  # greedy: only the most likely token survives
        assert ((out > -math.inf).sum(-1) == 1).all()
        assert torch.equal(out.argmax(-1), logp.argmax(-1))


def test_filter_logprobs_nucleus_boundary() -> None:
    """The token that crosses top_p stays; the first one after the mass is reached goes."""
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    kept = lambda p: (filter_logprobs(logp, 1.0, 0, p) > -math.inf).sum().item()  # noqa: E731
    assert kept(0.45) == 1 and kept(0.55) == 2 and kept(0.79) == 2 and kept(0.81) == 3 and kept(0.96) == 4


# --- the decode loop on tiny GPT-2 models --------------------------------------------------------

CORPUS = ["the cat sat on the mat .", "a dog ran to the big red ball and the cat saw it ."]


@pytest.fixture(scope="module")
def pair() -> dict[str, Any]:
    """A word tokenizer and two tiny GPT-2s whose next-token distributions are far from uniform and
    from each other (the random 0.02-std initialisation alone gives near-uniform, near-equal ones)."""
    from minillm.tiny import build_word_tokenizer, tiny_gpt2

    tok = build_word_tokenizer(CORPUS)
    models = []
    for seed in (1, 2):
        model = tiny_gpt2(tok, n_layer=2, n_embd=16, n_head=2, n_positions=64, seed=seed).eval()
        with torch.no_grad():
            model.transformer.wte.weight.mul_(4)
            for w in model.transformer.h.parameters():
                if w.dim() == 2:
                    w.mul_(15)
        models.append(model)
    ids = lambda text: tok(text)["input_ids"]  # noqa: E731
    prompts = [ids("the cat"), ids("a dog ran to the big red"), ids("ball"), ids("the mat . a cat saw")]
    return {"tok": tok, "student": models[0], "teacher": models[1], "V": len(tok), "eos": tok.eos_token_id, "pad": tok.pad_token_id, "prompts": prompts}


def _sample(pair: dict[str, Any], prompts: list[list[int]], keys: list[int], **kw: Any) -> Rollout:
    kw.setdefault("max_new_tokens", 8)
    kw.setdefault("stop_ids", [pair["eos"]])
    return sample(pair["student"], prompts, row_seeds(7, keys), pad_id=pair["pad"], vocab_size=pair["V"], **kw)


def _row(r: Rollout, b: int) -> dict[str, Any]:
    n = int(r.response_mask[b].sum())
    return {"ids": r.response_ids[b, :n].tolist(), "logq": r.logq[b, :n], "logmix": r.logmix[b, :n], "logp": None if r.logp is None else r.logp[b, :n]}


def _full_forward_logprobs(model: Any, r: Rollout) -> torch.Tensor:
    """log-softmax ``(B, R, V)`` of a teacher-forced full-sequence forward over prompt + response."""
    seq = sequence_batch(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
    with torch.no_grad():
        logits = model(**seq).logits
    return torch.log_softmax(response_logits(logits, r.prompt_ids.shape[1], r.response_ids.shape[1]).double(), -1)


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_sample_is_batch_invariant(pair: dict[str, Any], alpha: float) -> None:
    """A prompt's response is the same alone, in a left-padded batch of other lengths, in any order."""
    prompts, keys = pair["prompts"], [10, 11, 12, 13]
    kw = {"teacher": pair["teacher"], "alpha": alpha} if alpha > 0 else {}
    batch = _sample(pair, prompts, keys, **kw)
    rev = _sample(pair, prompts[::-1], keys[::-1], **kw)
    assert len({len(p) for p in prompts}) == len(prompts) and batch.prompt_mask.eq(0).any()
    assert len({tuple(_row(batch, b)["ids"]) for b in range(4)}) == 4
    for b in range(4):
        alone = _row(_sample(pair, [prompts[b]], [keys[b]], **kw), 0)
        for other in (_row(batch, b), _row(rev, 3 - b)):
            assert other["ids"] == alone["ids"]
            for key in ("logq", "logmix", "logp"):
                torch.testing.assert_close(other[key], alone[key], rtol=1e-4, atol=1e-5)
    # a different key (seed) gives a different response somewhere
    moved = _sample(pair, prompts, [20, 21, 22, 23], **kw)
    assert any(_row(moved, b)["ids"] != _row(batch, b)["ids"] for b in range(4))


def test_recorded_logprobs_match_a_full_forward(pair: dict[str, Any]) -> None:
    """logq, logp and logmix = log((1 - a) q + a p) of the drawn token, against teacher-forced forwards
    of both models over the whole sequence (no KV cache)."""
    a = 0.2
    r = _sample(pair, pair["prompts"], [1, 2, 3, 4], teacher=pair["teacher"], alpha=a, max_new_tokens=10)
    mask = r.response_mask.bool()
    assert mask.sum() > 10
    ids = r.response_ids.unsqueeze(-1)
    logq = _full_forward_logprobs(pair["student"], r).gather(-1, ids).squeeze(-1)
    logp = _full_forward_logprobs(pair["teacher"], r).gather(-1, ids).squeeze(-1)
    logmix = torch.log((1 - a) * logq.exp() + a * logp.exp())
    for recorded, ref in ((r.logq, logq), (r.logp, logp), (r.logmix, logmix)):
        assert recorded is not None
        torch.testing.assert_close(recorded[mask].double(), ref[mask], rtol=1e-4, atol=1e-5)
        assert (recorded[~mask] == 0).all()
    # the mixture really differs from q: the check above can tell the two apart
    assert (r.logmix[mask].double() - logq[mask]).abs().max() > 1e-2


def test_mixed_sampler_frequencies(pair: dict[str, Any]) -> None:
    """One decode step with many seeds: token frequencies follow (1 - a) q + a p, not q."""
    a, N = 0.2, 10_000
    prompt = pair["prompts"][0]
    r = _sample(pair, [prompt] * N, list(range(N)), teacher=pair["teacher"], alpha=a, max_new_tokens=1)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        q = torch.softmax(pair["student"](input_ids=ids).logits[0, -1].double(), -1)
        p = torch.softmax(pair["teacher"](input_ids=ids).logits[0, -1].double(), -1)
    mix = ((1 - a) * q + a * p).numpy()
    counts = np.bincount(r.response_ids[:, 0].numpy(), minlength=pair["V"])
    dof = pair["V"] - 1
    assert chi2_stat(counts, mix) < chi2_999(dof)
    assert chi2_stat(counts, q.numpy()) > chi2_999(dof), "q and the mixture should be distinguishable here"
    # and the recorded logmix is the drawn token's mixture log-probability
    torch.testing.assert_close(r.logmix[:, 0].double(), torch.log(torch.tensor(mix))[r.response_ids[:, 0]], rtol=1e-4, atol=1e-5)


def test_stop_tokens_end_rows(pair: dict[str, Any]) -> None:
    the, dot = pair["tok"].convert_tokens_to_ids(["the", "."])
    stops = [pair["eos"], the, dot]
    max_new = 15
    keys = list(range(24))
    r = _sample(pair, [pair["prompts"][k % 4] for k in keys], keys, teacher=pair["teacher"], stop_ids=stops, max_new_tokens=max_new)
    lengths = r.response_mask.sum(-1).long()
    stopped = 0
    for b in range(len(keys)):
        n = int(lengths[b])
        assert n >= 1
        assert r.response_mask[b, :n].eq(1).all() and r.response_mask[b, n:].eq(0).all()  # one contiguous run
        ids = r.response_ids[b].tolist()
        assert not set(ids[: n - 1]) & set(stops), "no stop token before the end"
        if ids[n - 1] in stops:
            stopped += 1
        else:
            assert n == r.response_ids.shape[1] == max_new  # cut by the budget only
        assert all(i == pair["pad"] for i in ids[n:])
        for rec in (r.logq, r.logp, r.logmix):
            assert rec is not None and (rec[b, n:] == 0).all() and (rec[b, :n] < 0).all()
    assert 0 < stopped < len(keys), "the draw should contain rows that stop and rows that run out of budget"
    # when every row stops, the loop ends early and the tensors are as long as the longest row
    r2 = _sample(pair, [pair["prompts"][0]] * 4, [0, 1, 2, 3], stop_ids=list(range(pair["V"])), max_new_tokens=max_new)
    assert r2.response_ids.shape == (4, 1) and r2.response_mask.eq(1).all()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram(pair: dict[str, Any], n: int) -> None:
    keys = list(range(8))
    prompts = [pair["prompts"][k % 4] for k in keys]
    # no stop tokens and a low temperature: long, loopy responses (n = 1 must stay under the vocabulary size)
    kw = {"stop_ids": [], "temperature": 0.5, "max_new_tokens": 14 if n == 1 else 30}

    def repeats(r: Rollout) -> int:
        total = 0
        for b in range(len(keys)):
            ids = _row(r, b)["ids"]
            grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
            total += len(grams) - len(set(grams))
        return total

    assert repeats(_sample(pair, prompts, keys, **kw)) > 0, "control: without the ban these draws repeat"
    banned = _sample(pair, prompts, keys, no_repeat_ngram_size=n, **kw)
    assert repeats(banned) == 0
    # logmix is the log-probability under the distribution actually sampled: tempered q with the
    # tokens that would complete a seen n-gram removed, renormalised
    logq = _full_forward_logprobs(pair["student"], banned)
    n_banned = 0
    for b in range(len(keys)):
        ids = _row(banned, b)["ids"]
        for t, y in enumerate(ids):
            lp = torch.log_softmax(logq[b, t] / kw["temperature"], -1)
            prefix = tuple(ids[t - n + 1 : t]) if n > 1 else ()
            ban = {ids[i + n - 1] for i in range(t - n + 1) if tuple(ids[i : i + n - 1]) == prefix}
            n_banned += len(ban)
            assert y not in ban
            lp[sorted(ban)] = -math.inf
            ref = float(torch.log_softmax(lp, -1)[y])
            assert math.isclose(float(banned.logmix[b, t]), ref, rel_tol=1e-4, abs_tol=1e-5), (b, t)
    assert n_banned > 0


def test_greedy_and_top_k_record_the_filtered_distribution(pair: dict[str, Any]) -> None:
    """top_k = 1 decodes greedily from the mixture; logmix is the log-probability under the filtered
    distribution the token was drawn from (0 for a greedy pick)."""
    a = 0.2
    r = _sample(pair, pair["prompts"], [0, 1, 2, 3], teacher=pair["teacher"], alpha=a, top_k=1, max_new_tokens=6)
    mask = r.response_mask.bool()
    torch.testing.assert_close(r.logmix[mask], torch.zeros(int(mask.sum())))
    lq, lp = _full_forward_logprobs(pair["student"], r), _full_forward_logprobs(pair["teacher"], r)
    mix = torch.log((1 - a) * lq.exp() + a * lp.exp())
    assert torch.equal(mix.argmax(-1)[mask], r.response_ids[mask])
    r3 = _sample(pair, pair["prompts"], [0, 1, 2, 3], top_k=3, temperature=0.7, max_new_tokens=6)
    mask3 = r3.response_mask.bool()
    lq3 = _full_forward_logprobs(pair["student"], r3)
    ref = torch.stack([torch.stack([torch.tensor(filter_ref(lq3[b, t].numpy(), 0.7, 3, 1.0)) for t in range(lq3.shape[1])]) for b in range(lq3.shape[0])])
    ref_tok = ref.gather(-1, r3.response_ids.unsqueeze(-1)).squeeze(-1)
    assert torch.isfinite(ref_tok[mask3]).all()  # every drawn token is inside the top 3
    torch.testing.assert_close(r3.logmix[mask3].double(), ref_tok[mask3], rtol=1e-4, atol=1e-5)


def test_alpha_without_teacher_raises(pair: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="teacher"):
        _sample(pair, pair["prompts"], [0, 1, 2, 3], alpha=0.2)
    r = _sample(pair, pair["prompts"], [0, 1, 2, 3], max_new_tokens=3)  # alpha 0, no teacher: fine
    assert r.logp is None
    torch.testing.assert_close(r.logmix, r.logq)
