"""Power-function EMA profiles and their post-hoc reconstruction (Karras et al. 2024, "Analyzing and Improving
the Training Dynamics of Diffusion Models", Sec. 3 and App. C): pure maths and the tracker, no files.

A power-function EMA of the training weights theta(tau) at training time t averages them with the profile

    p_gamma,t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 <= tau <= t   (Eq. 121),

whose width relative to t is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (Eq. 123), the
standard deviation of the profile in units of t; sigma_rel = 1/sqrt(12) at gamma = 0 (a uniform average) and
falls towards 0 as gamma grows. Over discrete steps it is tracked by ema_t = beta_t ema_{t-1} + (1 - beta_t)
theta_t with beta_t = (1 - 1/t)^(gamma + 1) (Eq. 127, t = 1, 2, ... optimizer steps; beta_1 = 0).

Snapshots of such EMAs taken during training (several gammas, several times) are profiles themselves, so the
EMA of any other profile at a snapshot time is approximated by the linear combination of snapshots whose
profile is closest to it in L2: solve A x = b with A_ij = <p_i, p_j> and b_i = <p_i, p_target>, the inner
products in closed form (Eq. 151, `profile_inner_products`), then scale x to sum to 1 (App. C.3, Alg. 3, as
NVlabs/edm2 does).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import torch

SIGMA_REL_MAX = 12**-0.5  # sigma_rel of gamma = 0, the uniform average; larger values have gamma < 0
DEFAULT_SIGMA_RELS = (0.05, 0.10)  # the two profiles the paper tracks during training


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma > 0 of the power-function profile of relative width `sigma_rel`, in (0, 1/sqrt(12)).

    Eq. 123 squared and rearranged (Eq. 126): gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0 with
    s = sigma_rel; its largest real root. Raises ValueError outside (0, 1/sqrt(12)).
    """
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(
            f"sigma_rel must lie in (0, 1/sqrt(12) = {SIGMA_REL_MAX:.4f}) (the relative width of a power-"
            f"function EMA profile, Karras et al. 2024 Eq. 123; 0.05 to 0.2 is typical), got {sigma_rel!r}"
        )
    inv = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (Eq. 123), for gamma > -1."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(gamma: float, t: int) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1), the weight that update t (t = 1, 2, ...) gives the previous average
    (Eq. 127)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_inner_products(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray):
    """<p_a, p_b> = int_0^min(t_a, t_b) p_gamma_a,t_a(tau) p_gamma_b,t_b(tau) dtau, elementwise over the
    broadcast arrays (Eq. 151):

        (gamma_a + 1) (gamma_b + 1) / ((gamma_a + gamma_b + 1) max(t_a, t_b)) * (t_a / t_b)^e,
        e = gamma_b where t_a < t_b, else -gamma_a.

    float64 in, float64 out; times in any unit (steps), the same for all.
    """
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    return (
        (gamma_a + 1)
        * (gamma_b + 1)
        * (t_a / t_b) ** exponent
        / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))
    )


def posthoc_coefficients(
    snapshot_steps: Sequence[float],
    snapshot_sigma_rels: Sequence[float],
    step: float,
    sigma_rels: Sequence[float],
) -> np.ndarray:
    """The weights of the snapshots in the post-hoc EMAs of `sigma_rels` at `step` (App. C.3, Alg. 3).

    snapshot_steps, snapshot_sigma_rels: (S,) the time and profile width of each snapshot (all at or before
    `step`, times > 0, no two alike: the Gram matrix must be invertible). Returns (S, K) float64, column k
    the coefficients x of sigma_rels[k]: EMA_k ~ sum_i x_ik snapshot_i, each column summing to 1.
    """
    steps = np.asarray(snapshot_steps, dtype=np.float64)
    gammas = np.array([sigma_rel_to_gamma(s) for s in snapshot_sigma_rels])
    out_gammas = np.array([sigma_rel_to_gamma(s) for s in sigma_rels])
    gram = profile_inner_products(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])  # (S, S)
    target = profile_inner_products(
        steps[:, None], gammas[:, None], float(step), out_gammas[None, :]
    )  # (S, K)
    x = np.linalg.solve(gram, target)
    return x / x.sum(axis=0, keepdims=True)


class PowerFunctionEMA:
    """Copies of a network that follow its parameters with power-function EMAs, one per sigma_rel.

    After optimizer step t (t = 1, 2, ...): ema_k <- beta_t ema_k + (1 - beta_t) theta_t with
    beta_t = `power_beta`(gamma_k, t), gamma_k = `sigma_rel_to_gamma`(sigma_rels[k]); the first update copies
    theta_1. Only parameters are averaged, buffers copied (as `ddpm.ema.EMA` does). `t` is given by the
    caller (the trainer's step), so that a resumed run continues the same sequence.

    Args:
        model: the network to follow (not the DDP wrapper); deep-copied once per profile into `modules`.
        sigma_rels: the relative widths of the tracked profiles, each in (0, 1/sqrt(12)).
    """

    def __init__(self, model: torch.nn.Module, sigma_rels: Sequence[float] = DEFAULT_SIGMA_RELS):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        frozen = copy.deepcopy(model).requires_grad_(False).eval()
        self.modules = [copy.deepcopy(frozen) for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, t: int) -> None:
        """Average in `model`'s parameters after optimizer step t (>= 1) and copy its buffers."""
        params = list(model.parameters())
        for gamma, module in zip(self.gammas, self.modules, strict=True):
            weight = 1.0 - power_beta(gamma, t)
            torch._foreach_lerp_(list(module.parameters()), params, weight)
            for mine, theirs in zip(module.buffers(), model.buffers(), strict=True):
                mine.copy_(theirs)

    def to(self, device: torch.device | str) -> PowerFunctionEMA:
        for module in self.modules:
            module.to(device)
        return self
