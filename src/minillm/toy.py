"""The paper's Figure 2: forward vs reverse KL when one Gaussian must fit a two-mode mixture.

Target p(x) = sum_k w_k N(x; m_k, s_k^2); model q(x) = N(x; mu, sigma^2). We fit (mu, log sigma) by
minimising, on a fine grid (trapezoid rule, float64, torch autograd + L-BFGS),

* forward KL(p || q) = int p(x) (log p(x) - log q(x)) dx   -> *mode covering*: its minimiser over
  Gaussians is moment matching, mu = E_p[x], sigma^2 = Var_p[x];
* reverse KL(q || p) = int q(x) (log q(x) - log p(x)) dx   -> *mode seeking*: q settles on one mode
  (its local minima sit on the modes; we start from each component and the moment-matched fit and
  keep the lowest).

``minillm toy`` writes ``toy.png`` (both fits over the target) and ``toy.json`` (target, fits and
both divergences of each fit).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

Direction = Literal["forward", "reverse"]


@dataclass(frozen=True)
class Mixture:
    """A 1-D Gaussian mixture: ``weights`` (sum to 1), ``means`` and standard deviations ``stds``."""

    weights: tuple[float, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not (len(self.weights) == len(self.means) == len(self.stds) >= 1):
            raise ValueError("weights, means and stds must have the same, non-zero length")
        if any(w <= 0 for w in self.weights) or abs(sum(self.weights) - 1) > 1e-9:
            raise ValueError(f"weights must be positive and sum to 1, got {self.weights}")
        if any(s <= 0 for s in self.stds):
            raise ValueError(f"stds must be positive, got {self.stds}")

    def log_prob(self, x_N: torch.Tensor) -> torch.Tensor:
        """log p(x) for points ``x_N`` (N,): logsumexp_k [log w_k + log N(x; m_k, s_k^2)]."""
        w_K, m_K, s_K = (torch.tensor(v, dtype=x_N.dtype) for v in (self.weights, self.means, self.stds))
        return torch.logsumexp(w_K.log() + normal_log_prob(x_N[:, None], m_K, s_K), dim=1)

    def grid(self, n: int = 8001, width: float = 12.0) -> torch.Tensor:
        """Points ``(n,)`` covering every component and any Gaussian near the moment-matched fit."""
        mean, std = self.moments()
        lo = min([mean - width * std] + [m - width * s for m, s in zip(self.means, self.stds)])
        hi = max([mean + width * std] + [m + width * s for m, s in zip(self.means, self.stds)])
        return torch.linspace(lo, hi, n, dtype=torch.float64)

    def moments(self) -> tuple[float, float]:
        """(E_p[x], sqrt(Var_p[x])) in closed form."""
        mean = sum(w * m for w, m in zip(self.weights, self.means))
        second = sum(w * (s * s + m * m) for w, m, s in zip(self.weights, self.means, self.stds))
        return mean, math.sqrt(second - mean * mean)


# The target of the figure: two well-separated modes of unequal weight and width.
DEFAULT_TARGET = Mixture(weights=(0.4, 0.6), means=(-2.5, 2.0), stds=(0.6, 1.0))


def normal_log_prob(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(x; mu, sigma^2) = -(x - mu)^2 / (2 sigma^2) - log sigma - log(2 pi) / 2 (broadcasts)."""
    return -0.5 * ((x - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)


def kl_on_grid(logp_N: torch.Tensor, logq_N: torch.Tensor, x_N: torch.Tensor, direction: Direction) -> torch.Tensor:
    """KL on a grid by the trapezoid rule: forward int p (log p - log q), reverse int q (log q - log p)."""
    if direction == "forward":
        integrand = logp_N.exp() * (logp_N - logq_N)
    elif direction == "reverse":
        integrand = logq_N.exp() * (logq_N - logp_N)
    else:
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    return torch.trapezoid(integrand, x_N)


def divergence(target: Mixture, mu: float, sigma: float, direction: Direction) -> float:
    """KL between ``target`` and N(mu, sigma^2) in ``direction`` (forward: KL(p||q), reverse: KL(q||p))."""
    x_N = target.grid()
    logq_N = normal_log_prob(x_N, torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64))
    return float(kl_on_grid(target.log_prob(x_N), logq_N, x_N, direction))


def fit_gaussian(target: Mixture, direction: Direction, init: tuple[float, float] | None = None) -> tuple[float, float]:
    """(mu, sigma) of the Gaussian minimising the KL in ``direction``; L-BFGS from ``init`` or from
    several starts (forward: the moment-matched point is not used as a start, so the test of moment
    matching stays meaningful; it starts from (0, 1)).
    """
    if init is not None:
        starts = [init]
    elif direction == "forward":
        starts = [(0.0, 1.0)]
    else:
        starts = [(m, s) for m, s in zip(target.means, target.stds)] + [target.moments()]
    x_N = target.grid()
    logp_N = target.log_prob(x_N)
    runs = [_minimise(logp_N, x_N, direction, float(mu0), float(sigma0)) for mu0, sigma0 in starts]
    _, mu, sigma = min(runs)
    return mu, sigma


def _minimise(logp_N: torch.Tensor, x_N: torch.Tensor, direction: Direction, mu0: float, sigma0: float) -> tuple[float, float, float]:
    """L-BFGS on (mu, log sigma) from one start -> (KL, mu, sigma)."""
    mu = torch.tensor(mu0, dtype=torch.float64, requires_grad=True)
    log_sigma = torch.tensor(math.log(sigma0), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([mu, log_sigma], lr=1.0, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = kl_on_grid(logp_N, normal_log_prob(x_N, mu, log_sigma.exp()), x_N, direction)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        value = float(kl_on_grid(logp_N, normal_log_prob(x_N, mu, log_sigma.exp()), x_N, direction))
    return value, float(mu.detach()), float(log_sigma.detach().exp())


def run_toy(out: Path, target: Mixture = DEFAULT_TARGET) -> Path:
    """Fit both directions, write ``out/toy.json`` and ``out/toy.png``; return the PNG path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fits = {}
    for direction in ("forward", "reverse"):
        mu, sigma = fit_gaussian(target, direction)
        fits[direction] = {
            "mu": mu, "sigma": sigma,
            "forward_kl": divergence(target, mu, sigma, "forward"),
            "reverse_kl": divergence(target, mu, sigma, "reverse"),
        }
    mean, std = target.moments()
    result = {"target": asdict(target), "target_moments": {"mean": mean, "std": std}, "fits": fits}
    (out / "toy.json").write_text(json.dumps(result, indent=2))
    png = out / "toy.png"
    plot_toy(result, png)
    return png


def plot_toy(result: dict, path: Path) -> None:
    """Draw the target and both fits of a ``toy.json`` result into ``path`` (PNG, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    t = result["target"]
    target = Mixture(tuple(t["weights"]), tuple(t["means"]), tuple(t["stds"]))
    mean, std = target.moments()
    x_N = torch.linspace(mean - 3.5 * std, mean + 3.5 * std, 1000, dtype=torch.float64)
    fig = Figure(figsize=(7, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.fill_between(x_N.numpy(), target.log_prob(x_N).exp().numpy(), color="0.8", label="target p (mixture)")
    styles = {"forward": ("tab:blue", "--", "forward KL(p||q): mode covering"),
              "reverse": ("tab:red", "-", "reverse KL(q||p): mode seeking")}
    for direction, (color, ls, label) in styles.items():
        f = result["fits"][direction]
        q_N = normal_log_prob(x_N, torch.tensor(f["mu"], dtype=torch.float64), torch.tensor(f["sigma"], dtype=torch.float64)).exp()
        ax.plot(x_N.numpy(), q_N.numpy(), color=color, ls=ls, lw=2,
                label=f"{label}\n  mu={f['mu']:.2f}, sigma={f['sigma']:.2f}")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend above the peaks
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.set_title("Fitting one Gaussian q to a two-mode mixture p")
    ax.legend(fontsize=8, loc="upper left", frameon=False)
    fig.tight_layout()
    fig.savefig(path)
