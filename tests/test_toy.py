"""The toy of the paper's Figure 2: forward KL covers both modes, reverse KL seeks one."""

from __future__ import annotations

import json
import math

import pytest

from minillm.toy import DEFAULT_TARGET, Mixture, divergence, fit_gaussian, run_toy


def _moments_by_definition(t: Mixture) -> tuple[float, float]:
    """E[x] and sqrt(Var[x]) of a mixture from E[x] = sum w m, E[x^2] = sum w (s^2 + m^2)."""
    mean = sum(w * m for w, m in zip(t.weights, t.means))
    second = sum(w * (s**2 + m**2) for w, m, s in zip(t.weights, t.means, t.stds))
    return mean, math.sqrt(second - mean**2)


def _gauss_kl(m1: float, s1: float, m2: float, s2: float) -> float:
    """KL(N(m1, s1^2) || N(m2, s2^2)) in closed form."""
    return math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_grid_kl_matches_closed_form_between_gaussians(direction: str) -> None:
    target = Mixture((1.0,), (0.7,), (1.3,))
    q_mu, q_sigma = -0.4, 0.8
    got = divergence(target, q_mu, q_sigma, direction)  # type: ignore[arg-type]
    want = _gauss_kl(0.7, 1.3, q_mu, q_sigma) if direction == "forward" else _gauss_kl(q_mu, q_sigma, 0.7, 1.3)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)


@pytest.fixture(scope="module")
def fits() -> dict[str, tuple[float, float]]:
    return {d: fit_gaussian(DEFAULT_TARGET, d) for d in ("forward", "reverse")}  # type: ignore[misc]


def test_forward_kl_fit_is_moment_matching(fits: dict[str, tuple[float, float]]) -> None:
    mean, std = _moments_by_definition(DEFAULT_TARGET)
    mu, sigma = fits["forward"]
    assert mu == pytest.approx(mean, abs=1e-4)
    assert sigma == pytest.approx(std, rel=1e-4)


def test_reverse_kl_fit_sits_on_one_mode(fits: dict[str, tuple[float, float]]) -> None:
    mu, sigma = fits["reverse"]
    k = min(range(2), key=lambda i: abs(DEFAULT_TARGET.means[i] - mu))
    assert abs(mu - DEFAULT_TARGET.means[k]) < 0.1
    assert sigma == pytest.approx(DEFAULT_TARGET.stds[k], rel=0.1)
    # far from the mixture's mean, i.e. not covering both modes
    assert abs(mu - DEFAULT_TARGET.moments()[0]) > 1.0


def test_each_fit_wins_its_own_divergence(fits: dict[str, tuple[float, float]]) -> None:
    fwd, rev = fits["forward"], fits["reverse"]
    assert divergence(DEFAULT_TARGET, *rev, "reverse") < divergence(DEFAULT_TARGET, *fwd, "reverse") - 0.05
    assert divergence(DEFAULT_TARGET, *fwd, "forward") < divergence(DEFAULT_TARGET, *rev, "forward") - 0.05


def test_run_toy_writes_png_and_json(tmp_path) -> None:
    png = run_toy(tmp_path / "toy")
    assert png == tmp_path / "toy" / "toy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "toy" / "toy.json").read_text())
    assert result["target"]["means"] == list(DEFAULT_TARGET.means)
    fwd, rev = result["fits"]["forward"], result["fits"]["reverse"]
    assert fwd["mu"] == pytest.approx(DEFAULT_TARGET.moments()[0], abs=1e-4)
    assert rev["reverse_kl"] < fwd["reverse_kl"] and fwd["forward_kl"] < rev["forward_kl"]
    assert fwd["forward_kl"] == pytest.approx(divergence(DEFAULT_TARGET, fwd["mu"], fwd["sigma"], "forward"))


def test_mixture_refuses_bad_weights() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        Mixture((0.5, 0.6), (0.0, 1.0), (1.0, 1.0))
