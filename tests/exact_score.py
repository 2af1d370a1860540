"""A test bed where the denoiser is exact: data whose pixels are independent draws from one 1-D Gaussian
mixture, so that E[x0 | x_t], E[eps | x_t] and E[v | x_t] are closed form under any variance-preserving
schedule. A sampler driven by `exact_predictor` errs only by its discretisation of the probability-flow ODE
(or SDE), which `wasserstein1` measures against the mixture itself.

With x_t = a x0 + s eps (a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t)) and x0 ~ sum_k w_k N(mu_k, sd_k^2):
    p(x_t | k) = N(a mu_k, v_k),  v_k = a^2 sd_k^2 + s^2,  r_k = P(k | x_t) proportional to w_k p(x_t | k),
    E[x0 | x_t, k] = mu_k + a sd_k^2 (x_t - a mu_k) / v_k,  E[eps | x_t, k] = s (x_t - a mu_k) / v_k,
and the unconditional expectations are the r_k-weighted sums. Both are finite at alpha_bar = 0 and 1.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GaussianMixture:
    """A 1-D Gaussian mixture: component k has weight weights[k], mean means[k] and standard deviation
    stds[k]."""

    weights: tuple[float, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]

    def cdf(self, x: Tensor) -> Tensor:
        """P(X <= x), elementwise; float64, shape of x."""
        w, mu, sd = self._params(x.device)
        return (w * torch.special.ndtr((x.double().unsqueeze(-1) - mu) / sd)).sum(-1)

    def sample(self, shape, generator: torch.Generator) -> Tensor:
        """Independent draws of `shape`, float64 on the CPU."""
        n = math.prod(shape)
        w, mu, sd = self._params("cpu")
        k = torch.multinomial(w, n, replacement=True, generator=generator)
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return (mu[k] + sd[k] * z).reshape(shape)

    def posterior_means(self, x_t: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
        """(E[x0 | x_t], E[eps | x_t]) for x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, elementwise.

        x_t: any shape; alpha_bar broadcastable to it. Returns float64 tensors of x_t's shape.
        """
        w, mu, sd = self._params(x_t.device)
        x, ab = x_t.double().unsqueeze(-1), alpha_bar.double().unsqueeze(-1)
        a, s2 = ab.sqrt(), 1 - ab
        var = ab * sd**2 + s2  # v_k, >= min(sd_k^2, 1) > 0
        resid = x - a * mu
        log_r = w.log() - 0.5 * var.log() - 0.5 * resid**2 / var
        r = torch.softmax(log_r, dim=-1)
        x0 = (r * (mu + a * sd**2 * resid / var)).sum(-1)
        eps = (r * (s2.sqrt() * resid / var)).sum(-1)
        return x0, eps

    def _params(self, device) -> tuple[Tensor, Tensor, Tensor]:
        """(K,) float64 tensors of the weights, means and stds on `device`."""
        return tuple(
            torch.tensor(p, dtype=torch.float64, device=device) for p in (self.weights, self.means, self.stds)
        )


# Three well separated modes of different widths inside [-1, 1]: few-step samplers visibly miss them.
MIXTURE = GaussianMixture(weights=(0.25, 0.45, 0.3), means=(-0.7, 0.05, 0.6), stds=(0.05, 0.12, 0.08))


def exact_predictor(
    mixture: GaussianMixture, alphas_cumprod: Tensor, prediction_type: str
) -> Callable[..., Tensor]:
    """The exact network for data drawn pixel by pixel from `mixture`: model(x, t, y=None) -> E[target | x_t].

    alphas_cumprod: (T,) the schedule's alpha_bar table (NoiseScheduler.alphas_cumprod). prediction_type:
    "epsilon", "sample" (x0) or "v_prediction" (v = a eps - s x0). x: (N, ...) any float dtype; t: (N,) or 0-d
    long (diffusers' loops pass either); y is ignored. Returns x's shape and dtype.
    """
    if prediction_type not in ("epsilon", "sample", "v_prediction"):
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    table = alphas_cumprod.double()

    def model(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t).expand(x.shape[0])
        ab = table[t.cpu()].to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
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
    below (grid spacing) / 2, about 3e-5 here). Any shape; values pooled."""
    values = samples.detach().double().flatten().sort().values.cpu()
    lo = min(values[0].item(), min(m - 8 * s for m, s in zip(mixture.means, mixture.stds, strict=True)))
    hi = max(values[-1].item(), max(m + 8 * s for m, s in zip(mixture.means, mixture.stds, strict=True)))
    x = torch.linspace(lo, hi, grid_points, dtype=torch.float64)
    empirical = torch.searchsorted(values, x, right=True).double() / values.numel()
    return torch.trapezoid((empirical - mixture.cdf(x)).abs(), x).item()
