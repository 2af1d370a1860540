"""An exact-score test bed for checking samplers: data whose pixels are independent draws from one 1-D
Gaussian mixture, so that E[x0 | x_t], E[eps | x_t] and E[v | x_t] are closed form under any
variance-preserving schedule. A sampler driven by `exact_predictor` errs only by its discretisation of the
probability-flow ODE (or SDE), which `wasserstein1` measures against the mixture itself: no network error,
seconds on a CPU, and each solver's convergence order shows as the slope of error against network calls.

With x_t = a x0 + s eps (a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t)) and x0 ~ sum_k w_k N(mu_k, sd_k^2):
    p(x_t | k) = N(a mu_k, v_k),  v_k = a^2 sd_k^2 + s^2,  r_k = P(k | x_t) proportional to w_k p(x_t | k),
    E[x0 | x_t, k] = mu_k + a sd_k^2 (x_t - a mu_k) / v_k,  E[eps | x_t, k] = s (x_t - a mu_k) / v_k,
and the unconditional expectations are the r_k-weighted sums (Tweedie's formula, computed per component).
Both are finite at alpha_bar = 0 and 1.

Used by tests/test_exact_score.py (and the sampler tests) and by bench/samplers.py:

    model = exact_predictor(MIXTURE, scheduler)
    x0 = ddpm.sample(model, scheduler, noise=torch.randn(8, 1, 32, 32, dtype=torch.float64), steps=10)
    error = wasserstein1(x0, MIXTURE)  # compare with wasserstein1(MIXTURE.sample(x0.shape, g), MIXTURE)
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ddpm.schedule import NoiseScheduler


@dataclass(frozen=True)
class GaussianMixture:
    """A 1-D Gaussian mixture: component k has weight weights[k], mean means[k] and standard deviation
    stds[k]; density sum_k w_k N(x; mu_k, sd_k^2)."""

    weights: tuple[float, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]

    def cdf(self, x: Tensor) -> Tensor:
        """F(x) = P(X <= x) = sum_k w_k Phi((x - mu_k) / sd_k), elementwise; float64, shape of x."""
        x = x.double()
        return sum(w * torch.special.ndtr((x - mu) / sd) for w, mu, sd in self._components())

    def sample(self, shape, generator: torch.Generator) -> Tensor:
        """Independent draws of `shape` (component k with probability w_k, then N(mu_k, sd_k^2)), float64 on
        the CPU."""
        n = math.prod(shape)
        w, mu, sd = (torch.tensor(p, dtype=torch.float64) for p in (self.weights, self.means, self.stds))
        k = torch.multinomial(w, n, replacement=True, generator=generator)
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return (mu[k] + sd[k] * z).reshape(shape)

    def posterior_means(self, x_t: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
        """(E[x0 | x_t], E[eps | x_t]) for x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, elementwise, by
        the closed forms of the module docstring.

        x_t: any shape; alpha_bar broadcastable to it. Returns float64 tensors of x_t's shape.
        """
        x, ab = x_t.double(), alpha_bar.double().to(x_t.device)
        a, s2 = ab.sqrt(), 1 - ab
        log_r, x0_k, eps_k = [], [], []
        # One full-size tensor per component (K small): broadcasting a trailing K dim is ~10x slower on CPU.
        for w, mu, sd in self._components():
            var = ab * sd**2 + s2  # v_k, >= min(sd_k^2, 1) > 0
            resid = x - a * mu
            log_r.append(math.log(w) - 0.5 * var.log() - 0.5 * resid**2 / var)
            x0_k.append(mu + a * sd**2 * resid / var)
            eps_k.append(s2.sqrt() * resid / var)
        r = torch.softmax(torch.stack(log_r), dim=0)  # (K, ...) P(k | x_t)
        return (r * torch.stack(x0_k)).sum(0), (r * torch.stack(eps_k)).sum(0)

    def _components(self) -> list[tuple[float, float, float]]:
        """[(w_k, mu_k, sd_k)] for each component k."""
        return list(zip(self.weights, self.means, self.stds, strict=True))


# Three well separated modes of different widths inside [-1, 1]: few-step samplers visibly miss them.
MIXTURE = GaussianMixture(weights=(0.25, 0.45, 0.3), means=(-0.7, 0.05, 0.6), stds=(0.05, 0.12, 0.08))


def exact_predictor(mixture: GaussianMixture, scheduler: NoiseScheduler) -> Callable[..., Tensor]:
    """The exact network for data drawn pixel by pixel from `mixture` under `scheduler`'s schedule:
    model(x, t, y=None) -> E[target | x_t], the target being `scheduler.prediction_type`'s ("epsilon",
    "sample" for x0, or "v_prediction", v = a eps - s x0).

    x: (N, ...) any float dtype; t: (N,) or 0-d (diffusers' loops pass either), integer or float. A fractional
    t is a noise level between two training timesteps, at `scheduler.alpha_bar(t)` (log sigma interpolated
    linearly, as k-diffusion and diffusers' sigma-space schedulers map sigma to t). y is ignored. Returns x's
    shape and dtype.
    """
    prediction_type = scheduler.prediction_type

    def model(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t).cpu().expand(x.shape[0])
        ab = scheduler.alpha_bar(t).to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
        x0, eps = mixture.posterior_means(x, ab)
        if prediction_type == "epsilon":
            out = eps
        elif prediction_type == "sample":
            out = x0
        else:
            out = ab.sqrt() * eps - (1 - ab).sqrt() * x0
        return out.to(x.dtype)

    return model


def wasserstein1(samples: Tensor, mixture: GaussianMixture, grid_points: int = 50_001) -> float:
    """W1 between the empirical distribution of every value in `samples` and `mixture`: the integral of
    |F_n(x) - F(x)| over x (Vallender 1973), by the trapezoid rule on a grid spanning both (its error is
    below (grid spacing) / 2, about 3e-5 here). Any shape; values pooled.

    The sampling floor: n exact draws of the mixture score E[W1] ~ sqrt(2 / (pi n)) int sqrt(F (1 - F)) dx
    (the mean of |Brownian bridge|), 0.514 / sqrt(n) for MIXTURE (0.0057 at n = 8,192, 0.0020 at 65,536),
    with a spread of about half that: a sampler's error is resolved only above it, at the same n."""
    values = samples.detach().double().flatten().sort().values.cpu()
    lo = min(values[0].item(), min(m - 8 * s for m, s in zip(mixture.means, mixture.stds, strict=True)))
    hi = max(values[-1].item(), max(m + 8 * s for m, s in zip(mixture.means, mixture.stds, strict=True)))
    x = torch.linspace(lo, hi, grid_points, dtype=torch.float64)
    empirical = torch.searchsorted(values, x, right=True).double() / values.numel()
    return torch.trapezoid((empirical - mixture.cdf(x)).abs(), x).item()
