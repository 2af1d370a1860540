"""The EDM formulation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", Table 1): a network F preconditioned into the denoiser

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))          (Eq. 7)
    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4,           sd = sigma_data,

for x = x0 + sigma eps, trained on noise levels ln sigma ~ N(P_mean, P_std^2) with the loss weight
lambda(sigma) = 1 / c_out^2, i.e. || F - (x0 - c_skip x) / c_out ||^2 with unit weight (Eq. 8).

`EDMScheduler` is that formulation behind the interface of `ddpm.schedule.NoiseScheduler`, so that the loss
(`ddpm.losses.diffusion_loss`), the trainer and every sampler of `ddpm.samplers` take it unchanged. Its
"timestep" t, what the network is called with, is c_noise = ln(sigma) / 4. The samplers work in the
variance-preserving form x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps; in the data scaled by
1 / sigma_data that form is exactly EDM's network input: with sigma' = sigma / sigma_data and
alpha_bar = 1 / (1 + sigma'^2),

    x_t = (x0 / sigma_data + sigma' eps) / sqrt(1 + sigma'^2) = c_in (x0 + sigma eps),
    x0 / sigma_data = sqrt(alpha_bar) x_t + sqrt(1 - alpha_bar) F     (Eq. 7 divided by sigma_data),

so a sampler's x_t is the network's input as it is, F is a v-prediction with the sign flipped in that frame,
and the x0 a sampler returns is the data over sigma_data (`ddpm.sample` multiplies it back, `data_scale`).
x_T ~ N(0, I) is then exact at any sigma_max, where EDM's sigma_max * N(0, I) ignores the data's variance.

`FORMULATIONS` names the two noise schedules; a config's `diffusion:` section picks one with its key
`formulation` (default "ddpm", `NoiseScheduler`), and `schedule_from_config` rebuilds either from the saved
config (noise_scheduler.json), so sampling needs no flags.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ddpm.schedule import KARRAS_RHO, SIGMA_SPACINGS, NoiseScheduler, sigma_grid

FORMULATION = "formulation"  # the key of a diffusion section (and of a saved schedule) that picks the class
# How EDMScheduler spaces sigma: the two of ddpm.schedule, and "trailing", the Karras grid of one more step
# without its last level (see `EDMScheduler.inference_timesteps`), the grid of distilled students.
EDM_SPACINGS = (*SIGMA_SPACINGS, "trailing")
MAX_SAMPLING_STEPS = 1000  # EDMScheduler.num_train_timesteps: the cap on sampling steps, as for T = 1000


class EDMScheduler:
    """The EDM formulation's noise levels, preconditioning and loss (Karras et al. 2022, Table 1), with the
    methods of `NoiseScheduler` that the loss and the samplers call; pure tensor maths, no state beyond its
    config. The keyword arguments are a config's `diffusion:` section with `formulation: edm`.

    Timesteps t are c_noise = ln(sigma) / 4 (float64), sigma the noise level in data units; see the module
    docstring for the frame the samplers work in.
    """

    prediction_type = "edm"  # the network predicts F of Eq. 7
    # No learned variance in this formulation: the network has C output channels, and the ancestral sampler
    # takes the posterior variance (NoiseScheduler's methods of the same name, for the same interface).
    variance_type = "fixed_small"
    learns_variance = False
    split_output = NoiseScheduler.split_output
    log_variance = NoiseScheduler.log_variance
    num_train_timesteps = MAX_SAMPLING_STEPS  # continuous: no training timesteps; the most sampling steps

    def __init__(
        self,
        *,
        sigma_data: float = 0.5,  # standard deviation of the data (images in [-1, 1]: 0.5, as EDM)
        p_mean: float = -1.2,  # mean of ln sigma during training (EDM's P_mean)
        p_std: float = 1.2,  # standard deviation of ln sigma during training (EDM's P_std)
        sigma_min: float = 0.002,  # the lowest noise level sampled (before the final step to sigma = 0)
        sigma_max: float = 80.0,  # the noise level sampling starts from
        rho: float = KARRAS_RHO,  # the exponent of the "karras" spacing (Eq. 5)
        # how sampling spaces sigma: one of EDM_SPACINGS (karras, exponential, trailing: distilled students)
        timestep_spacing: str = "karras",
        clip_sample: bool = False,  # clamp the x0 estimate to [-clip_sample_range, clip_sample_range]
        clip_sample_range: float = 1.0,
    ):
        for name, value in (("sigma_data", sigma_data), ("p_std", p_std), ("rho", rho)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(
                "sigma_min and sigma_max must satisfy 0 < sigma_min < sigma_max < inf, got "
                f"sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        if timestep_spacing not in EDM_SPACINGS:
            raise ValueError(
                f"unknown timestep_spacing {timestep_spacing!r} for the EDM formulation; valid: "
                f"{', '.join(EDM_SPACINGS)}"
            )
        if clip_sample_range <= 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range}")
        self.config = {
            FORMULATION: "edm",
            "sigma_data": sigma_data,
            "p_mean": p_mean,
            "p_std": p_std,
            "sigma_min": sigma_min,
            "sigma_max": sigma_max,
            "rho": rho,
            "timestep_spacing": timestep_spacing,
            "clip_sample": clip_sample,
            "clip_sample_range": clip_sample_range,
        }
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.timestep_spacing = timestep_spacing
        self.clip_sample, self.clip_sample_range = clip_sample, clip_sample_range
        self.data_scale = sigma_data  # the samplers' x0 is the data over this
        # (2,) float64: ln sigma' = ln(sigma / sigma_data) at sigma_min and sigma_max (NoiseScheduler's table
        # of log sigmas, in the samplers' frame, reduced to its ends)
        self.log_sigmas = torch.tensor([sigma_min, sigma_max], dtype=torch.float64).div(sigma_data).log()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != FORMULATION)
        return f"EDMScheduler({args})"

    def precondition(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) of Table 1 at noise levels sigma (any shape, > 0), float64 (float32
        on MPS) on sigma's device."""
        sigma = _high_precision(sigma)
        sd2 = self.sigma_data**2
        root = (sigma**2 + sd2).sqrt()
        return sd2 / (sigma**2 + sd2), sigma * self.sigma_data / root, 1 / root, sigma.log() / 4

    def sigma(self, t: Tensor) -> Tensor:
        """The noise level sigma = exp(4 t) of timesteps t = c_noise; float64 (float32 on MPS), t's shape and
        device."""
        return (4 * _high_precision(t)).exp()

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The network's input c_in (x0 + sigma eps) at t = c_noise; x0, noise: (N, ...), t: (N,). Returns
        (N, ...) in x0's dtype (at least float32)."""
        sigma = self.sigma(t)  # on t's device: no host sync per training step
        _, _, c_in, _ = self.precondition(sigma)
        return self._bcast(c_in, x0) * (x0 + self._bcast(sigma, x0) * noise)

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """F's target (x0 - c_skip x) / c_out with x = x0 + sigma eps (Eq. 8), of unit variance for data of
        standard deviation sigma_data. Shapes as in `add_noise`."""
        sigma = self.sigma(t)
        c_skip, c_out, _, _ = self.precondition(sigma)
        x = x0 + self._bcast(sigma, x0) * noise
        return (x0 - self._bcast(c_skip, x0) * x) / self._bcast(c_out, x0)

    def loss_weight(self, t: Tensor, *, weighting: str = "uniform", min_snr_gamma: float = 5.0) -> Tensor:
        """Ones, (N,) float32: EDM's lambda(sigma) = 1 / c_out^2 on || D - x0 ||^2 is unit weight on F's
        error. Raises ValueError for any weighting but "uniform" (min_snr_gamma is unused)."""
        if weighting != "uniform":
            raise ValueError(
                f"the EDM formulation weights its loss by lambda(sigma) = 1 / c_out(sigma)^2 (Karras et al. "
                f"2022): use loss weighting 'uniform', not {weighting!r}"
            )
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)

    def sample_timesteps(self, n: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
        """n training timesteps c_noise = ln(sigma) / 4 with ln sigma ~ N(p_mean, p_std^2); (n,) float64 on
        `device`, drawn on the generator's device (so a CPU generator gives the same t on every device)."""
        draw_device = generator.device if generator is not None else device
        z = torch.randn(n, generator=generator, device=draw_device, dtype=torch.float64)
        t = (self.p_mean + self.p_std * z) / 4
        return t.to(device) if device is not None else t

    def alpha_bar(self, t: Tensor) -> Tensor:
        """alpha_bar = 1 / (1 + sigma'^2), sigma' = sigma / sigma_data, of the samplers' frame at t = c_noise;
        float64 (float32 on MPS) of t's shape and device."""
        log_sigma = 4 * _high_precision(t) - math.log(self.sigma_data)
        return torch.sigmoid(-2 * log_sigma)

    def snr(self, t: Tensor) -> Tensor:
        """The samplers' signal-to-noise ratio alpha_bar / (1 - alpha_bar) = (sigma_data / sigma)^2 at t =
        c_noise; float64 (float32 on MPS) of t's shape and device."""
        return (2 * math.log(self.sigma_data) - 8 * _high_precision(t)).exp()

    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """The timestep c_noise of the samplers' noise level sigma' = sigma / sigma_data; float64."""
        return (torch.as_tensor(sigma, dtype=torch.float64) * self.sigma_data).log() / 4

    def inference_timesteps(self, steps: int, *, drop_last: bool = False) -> Tensor:
        """The `steps` timesteps (c_noise, float64, descending) of sigma from sigma_max down to sigma_min by
        `timestep_spacing` ("karras": Eq. 5 with `rho`); the samplers step from the last to sigma = 0.
        "trailing": the first `steps` of the "karras" grid of steps + 1, so that sigma_max comes first, the
        last step goes from above sigma_min straight to 0 (as NoiseScheduler's "trailing" ends at T / steps
        - 1), and the grid of n steps is every other level of the grid of 2n (progressive distillation's
        students). drop_last is ignored, as for NoiseScheduler's sigma spacings."""
        if not isinstance(steps, int) or not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"steps must be an integer in 1..{self.num_train_timesteps}, got {steps!r}")
        trailing = self.timestep_spacing == "trailing"
        spacing = "karras" if trailing else self.timestep_spacing
        sigmas = sigma_grid(spacing, steps + trailing, self.sigma_min, self.sigma_max, self.rho)
        return sigmas[:steps].log() / 4

    def predict_x0_and_eps(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, *, clip: bool = True
    ) -> tuple[Tensor, Tensor]:
        """(x0 / sigma_data, eps) at the samplers' x_t from F = model_output: with a = sqrt(alpha_bar) and
        s = sqrt(1 - alpha_bar), x0 / sigma_data = a x_t + s F (Eq. 7 over sigma_data) and eps = s x_t - a F.
        With `clip_sample` (and clip, which training losses turn off), x0 is clamped to the range (over
        sigma_data) and eps re-derived from it."""
        alpha_bar = self._bcast(self.alpha_bar(torch.as_tensor(t, device=x_t.device)), x_t)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x0 = a * x_t + s * model_output
        eps = s * x_t - a * model_output
        if self.clip_sample and clip:
            limit = self.clip_sample_range / self.sigma_data
            x0 = x0.clamp(-limit, limit)
            eps = (x_t - a * x0) / s
        return x0, eps

    @staticmethod
    def _bcast(coefficient: Tensor, x: Tensor) -> Tensor:
        """(N,) float64 -> (N, 1, ..., 1) on x's device in x's dtype (at least float32)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return coefficient.to(device=x.device, dtype=dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _high_precision(values: Tensor | float) -> Tensor:
    """`values` as a tensor in float64 on its device (float32 on MPS, which has no float64)."""
    values = torch.as_tensor(values)
    return values.to(torch.float32 if values.device.type == "mps" else torch.float64)


FORMULATIONS: dict[str, type] = {"ddpm": NoiseScheduler, "edm": EDMScheduler}


def schedule_class(section: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
    """The class a diffusion section (or a saved schedule) builds, FORMULATIONS[section["formulation"]]
    (NoiseScheduler when the key is left out), and its keyword arguments (the section without the key).
    Raises ValueError for an unknown formulation, listing the known ones."""
    kwargs = dict(section)
    name = kwargs.pop(FORMULATION, "ddpm")
    if not isinstance(name, str) or name not in FORMULATIONS:
        raise ValueError(f"unknown {FORMULATION} {name!r}; valid: {', '.join(FORMULATIONS)}")
    return FORMULATIONS[name], kwargs


def schedule_from_config(config: Mapping[str, Any]) -> NoiseScheduler | EDMScheduler:
    """The schedule of a saved config (noise_scheduler.json) or a diffusion section: `schedule_class`."""
    cls, kwargs = schedule_class(config)
    return cls(**kwargs)
