"""Exposure-bias protocols on constructed cases whose answer is known.

The "models" are next-token rules over a vocabulary of three tokens (a = 0, b = 1, EOS = 2), small
enough that every sequence up to l_max can be enumerated. Each case is checked three ways: the known
answer, :func:`exact_curve` (the code's exact expectation) against an independent brute force over
prefixes in float64, and Monte Carlo draws through :func:`protocol_curve` against the exact value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from minillm.eval.exposure import PROTOCOLS, exact_curve, exposure_curves, protocol_curve

A, B, EOS = 0, 1, 2
L = 8
Rule = Callable[[tuple[int, ...]], list[float]]


def _teacher(prefix: tuple[int, ...]) -> list[float]:
    """Mostly a, sometimes b, EOS at a constant rate; after a b it goes back to a."""
    return [0.85, 0.05, 0.10]


def _student_off_own_prefixes(prefix: tuple[int, ...]) -> list[float]:
    """Exact after a or at the start (the teacher's usual prefixes); after its own b it repeats b."""
    if prefix and prefix[-1] == B:
        return [0.30, 0.60, 0.10]
    return _teacher(prefix)


def _stopper(eos: float) -> Rule:
    """a:b = 4:1 whatever the prefix, EOS with probability ``eos``; after an EOS (text past the
    answer, fixed_length only) both models are uniform, so they agree there."""
    def rule(prefix: tuple[int, ...]) -> list[float]:
        if EOS in prefix:
            return [1 / 3, 1 / 3, 1 / 3]
        return [0.8 * (1 - eos), 0.2 * (1 - eos), eos]
    return rule


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _brute(protocol: str, p_next: Rule, q_next: Rule, length: int) -> tuple[list[float], list[float]]:
    """R(l) and eps(l) from a sum over prefixes (not over whole draws), float64, straight from the
    definitions: for each t, each prefix h of length t - 1 with its probability under q (for R) and
    p (for eps), the error d(h) = KL(p(.|h) || q(.|h))."""
    R_t, eps_t = [], []
    for t in range(1, length + 1):
        num_q = num_p = mass_q = mass_p = 0.0
        for h in product(range(3), repeat=t - 1):
            if protocol != "fixed_length" and EOS in h:
                continue  # a draw to EOS has no position after its EOS
            wq = wp = 1.0
            for i, tok in enumerate(h):
                wq *= q_next(h[:i])[tok]
                wp *= p_next(h[:i])[tok]
            d = _kl(p_next(h), q_next(h))
            num_q, num_p, mass_q, mass_p = num_q + wq * d, num_p + wp * d, mass_q + wq, mass_p + wp
        if protocol == "length_fair":  # the mean over the draws still running at t
            R_t.append(num_q / mass_q)
            eps_t.append(num_p / mass_p)
        else:  # fixed_length: every draw runs; to_eos: ended draws add 0 at t
            R_t.append(num_q)
            eps_t.append(num_p)
    return np.cumsum(R_t).tolist(), np.cumsum(eps_t).tolist()


def _monte_carlo(protocol: str, p_next: Rule, q_next: Rule, n: int, seed: int) -> dict:
    """``n`` draws from each model (numpy), their per-position errors, then :func:`protocol_curve`."""
    rng = np.random.default_rng(seed)

    def draws(rule: Rule) -> list[np.ndarray]:
        out = []
        for _ in range(n):
            h: tuple[int, ...] = ()
            d = []
            while len(h) < L and not (protocol != "fixed_length" and h and h[-1] == EOS):
                d.append(_kl(p_next(h), q_next(h)))
                h = (*h, int(rng.choice(3, p=rule(h))))
            out.append(np.array(d))
        return out

    return protocol_curve(protocol, draws(q_next), draws(p_next), min_at_risk=1,
                          length=L if protocol == "fixed_length" else None).to_dict()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("student", ["equal", "off_own", "stops_later"])
def test_exact_curve_matches_brute_force_over_prefixes(protocol: str, student: str) -> None:
    p, q = {"equal": (_teacher, _teacher), "off_own": (_teacher, _student_off_own_prefixes),
            "stops_later": (_stopper(0.20), _stopper(0.05))}[student]
    c = exact_curve(protocol, p, q, stop_ids=[EOS], length=L)
    R, eps = _brute(protocol, p, q, L)
    assert c.lengths == list(range(1, L + 1))
    assert pytest.approx(R, rel=1e-12, abs=1e-15) == c.R
    assert c.eps == pytest.approx(eps, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_student_equal_to_teacher_has_no_excess(protocol: str) -> None:
    c = exact_curve(protocol, _teacher, _teacher, stop_ids=[EOS], length=L)
    assert c.R == [0.0] * L and c.eps == [0.0] * L and c.ex_acc_err == [0.0] * L


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_student_off_on_its_own_prefixes_has_a_growing_excess(protocol: str) -> None:
    c = exact_curve(protocol, _teacher, _student_off_own_prefixes, stop_ids=[EOS], length=L)
    # no error before the first b: R(1) = eps(1) = 0 (ExAccErr 0), and at l = 2 both saw one b alike
    assert c.R[0] == c.eps[0] == 0.0 and c.ex_acc_err[0] == 0.0
    assert c.ex_acc_err[1] == pytest.approx(0.0, abs=1e-9)
    err = c.ex_acc_err[1:]
    assert all(b > a for a, b in zip(err, err[1:])), err  # grows with l
    assert err[-1] > 20.0  # b repeats: the student sits in its own error far more often than the teacher


def test_student_that_only_stops_later_has_no_excess_when_length_fair() -> None:
    p, q = _stopper(0.20), _stopper(0.05)
    fair = exact_curve("length_fair", p, q, stop_ids=[EOS], length=L)
    assert fair.ex_acc_err == pytest.approx([0.0] * L, abs=1e-9)
    # the error per running position is the same constant for both: KL of the EOS coin and a:b
    d = _kl(p(()), q(()))
    assert fair.kl_student == pytest.approx([d] * L) and fair.kl_teacher == pytest.approx([d] * L)
    # at-risk masses: P(no EOS among the first t - 1 tokens) under each model
    assert fair.at_risk_student == pytest.approx([0.95 ** t for t in range(L)])
    assert fair.at_risk_teacher == pytest.approx([0.80 ** t for t in range(L)])
    # the other protocols count the longer answers' extra terms as excess
    for protocol in ("to_eos", "fixed_length"):
        c = exact_curve(protocol, p, q, stop_ids=[EOS], length=L)
        assert c.ex_acc_err[0] == pytest.approx(0.0, abs=1e-9)
        assert all(e > 1.0 for e in c.ex_acc_err[1:]), (protocol, c.ex_acc_err)
    # fixed_length says how often a draw went on past its EOS: P(EOS among the first L - 1 tokens)
    fixed = exact_curve("fixed_length", p, q, stop_ids=[EOS], length=L)
    assert fixed.ended_early_student == pytest.approx(1 - 0.95 ** (L - 1))
    assert fixed.ended_early_teacher == pytest.approx(1 - 0.80 ** (L - 1))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_monte_carlo_agrees_with_the_exact_expectation(protocol: str) -> None:
    p, q = _teacher, _student_off_own_prefixes
    exact = exact_curve(protocol, p, q, stop_ids=[EOS], length=L)
    mc = _monte_carlo(protocol, p, q, n=3000, seed=1)
    assert mc["lengths"] == exact.lengths
    # means of bounded per-draw sums over 3000 draws: within 10% at each l (plus 5% of the curve's
    # end, for the early points where only the rare b draws carry any error; about 4 standard errors)
    assert mc["R"][1:] == pytest.approx(exact.R[1:], rel=0.1, abs=0.05 * exact.R[-1])
    assert mc["eps"][1:] == pytest.approx(exact.eps[1:], rel=0.1, abs=0.05 * exact.eps[-1])
    if protocol == "length_fair":
        assert mc["at_risk_student"][0] == mc["at_risk_teacher"][0] == 3000  # every draw runs at t = 1
        assert all(b <= a for a, b in zip(mc["at_risk_student"], mc["at_risk_student"][1:]))


def test_length_fair_curve_ends_where_too_few_draws_run() -> None:
    kl_q = [np.array([1.0, 1.0, 1.0]), np.array([1.0])]
    kl_p = [np.array([0.5, 0.5]), np.array([0.5, 0.5, 0.5, 0.5])]
    c = protocol_curve("length_fair", kl_q, kl_p, min_at_risk=2)
    assert c.lengths == [1] and c.at_risk_student == [2.0] and c.at_risk_teacher == [2.0]
    c = protocol_curve("length_fair", kl_q, kl_p, min_at_risk=1)
    assert c.lengths == [1, 2, 3] and c.R == [1.0, 2.0, 3.0] and c.eps == [0.5, 1.0, 1.5]
    assert c.ex_acc_err == pytest.approx([100.0] * 3)
    with pytest.raises(ValueError, match="fixed_length needs every draw"):
        protocol_curve("fixed_length", kl_q, kl_p)
    with pytest.raises(ValueError, match="unknown exposure protocol"):
        protocol_curve("fair", kl_q, kl_p)


def test_exposure_curves_on_tiny_models_report_both_protocols(tiny_task: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_task["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_task["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_task["student"]).eval()
    V = len(tok.get_vocab())
    prompts = [tok(t)["input_ids"] for t in ["Add two and three.", "Count from one to nine."]]
    curves, teacher_draws = exposure_curves(
        student, teacher, prompts, protocols=["fixed_length", "length_fair", "to_eos"], samples=3, seed=4, max_new_tokens=6,
        pad_id=tok.pad_token_id, vocab_size=V, batch_size=4, stop_ids=[tok.eos_token_id], min_at_risk=1)
    assert sorted(teacher_draws) == ["eos", "fixed"]
    fixed, fair, eos = curves["fixed_length"], curves["length_fair"], curves["to_eos"]
    assert fixed.lengths == list(range(1, 7)) and all(len(r) == 6 for r in fixed.student_samples.responses)
    ended = sum(tok.eos_token_id in r[:5] for r in fixed.student_samples.responses)
    assert fixed.ended_early_student == ended
    # length_fair's at-risk counts are the draws (to EOS) at least t long; its first point is to_eos's
    lens = [len(r) for r in fair.student_samples.responses]
    assert fair.at_risk_student == [float(sum(n >= t for n in lens)) for t in fair.lengths]
    assert fair.R[0] == pytest.approx(eos.R[0]) and fair.eps[0] == pytest.approx(eos.eps[0])
    assert fair.student_samples is eos.student_samples  # one set of draws to EOS serves both
    again, _ = exposure_curves(
        student, teacher, prompts, protocols=["length_fair"], samples=3, seed=4, max_new_tokens=6, pad_id=tok.pad_token_id,
        vocab_size=V, batch_size=4, stop_ids=[tok.eos_token_id], teacher_samples=teacher_draws, min_at_risk=1)
    assert pytest.approx(fair.R) == again["length_fair"].R
    assert again["length_fair"].eps == pytest.approx(fair.eps)
