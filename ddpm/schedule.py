"""The noise schedule of a diffusion model and the arithmetic on it: forward noising, training targets,
the conversions between the model's output and (x0, epsilon), SNR loss weights and inference timesteps.

Notation (Ho et al. 2020): beta_t is the variance of the noise added at step t, alpha_t = 1 - beta_t and
alpha_bar_t = prod_{s <= t} alpha_s, so that x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.
Timesteps are integers 0 .. T-1 (T = num_train_timesteps), 0 being the least noisy. The noise level of x_t in
the variance-exploding view x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps is sigma_t = sqrt((1 - alpha_bar_t) /
alpha_bar_t) (Karras et al. 2022); a continuous sigma maps to a continuous t in [0, T-1] by linear
interpolation of log sigma between the integer timesteps (k-diffusion's and diffusers' `sigma_to_t`), and
back by the same interpolation (`alpha_bar` at a float t), so sigma-space spacings ("karras", "exponential")
drive any discrete-time model; above the last finite sigma of a zero-terminal-SNR schedule, 1 / sigma is
interpolated instead (see `alpha_bar`).

Zero terminal SNR (Lin et al. 2024, `rescale_betas_zero_snr=True`) makes alpha_bar_{T-1} exactly 0, so x_{T-1}
is pure noise. Then epsilon prediction cannot be turned into an x0 estimate at t = T-1
(x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) divides by zero, and x_t = eps carries no information
about x0). We therefore refuse that combination at construction, as the paper advises, and accept
`v_prediction` and `sample`, for which every conversion below divides only by
sqrt(1 - alpha_bar) >= sqrt(beta_0) > 0. `snr(t)` is then exactly 0 at the last step, and the min-SNR weights
use forms with no division by it.
"""

import math

import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace", "karras", "exponential")
SIGMA_SPACINGS = ("karras", "exponential")  # spaced in sigma between the schedule's ends: float timesteps
KARRAS_RHO = 7.0  # Karras et al. 2022, Eq. 5: the rho of their experiments
LOSS_WEIGHTINGS = ("uniform", "min_snr")
# The reverse-process variance Sigma_t of p(x_s | x_t), named as diffusers' DDPMScheduler names them:
# "fixed_small" the posterior variance beta-tilde, "fixed_large" beta (Ho et al. 2020, Sec. 3.2),
# "learned_range" interpolated in log space by the model's second C output channels (Nichol & Dhariwal 2021).
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


class NoiseScheduler:
    """A discrete-time variance-preserving noise schedule; pure tensor maths, no state beyond its config (and
    the copies of its tables on the devices it was used on, which change no result: `_table`).

    The keyword arguments are exactly a config's `diffusion:` section; `config` records them.
    """

    # What the samplers' x0 is the data over: 1 here; sigma_data for ddpm.edm.EDMScheduler, whose samplers
    # work on the data over sigma_data (`sample` and the editing functions scale by it).
    data_scale = 1.0

    def __init__(
        self,
        *,
        num_train_timesteps: int = 1000,  # T, the number of training noise levels
        beta_schedule: str = "linear",  # one of BETA_SCHEDULES
        beta_start: float = 1e-4,  # beta_0 of linear, scaled_linear and sigmoid (unused by cosine)
        beta_end: float = 0.02,  # beta_{T-1} of linear, scaled_linear and sigmoid (unused by cosine)
        prediction_type: str = "epsilon",  # what the model predicts: one of PREDICTION_TYPES
        rescale_betas_zero_snr: bool = False,  # rescale so that alpha_bar_{T-1} = 0 (Lin et al. 2024, Alg. 1)
        clip_sample: bool = False,  # clamp the x0 estimate to [-clip_sample_range, clip_sample_range]
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "trailing",  # one of TIMESTEP_SPACINGS: see inference_timesteps
        steps_offset: int = 0,  # added to "leading" timesteps (as in diffusers)
        variance_type: str = "fixed_small",  # one of VARIANCE_TYPES: see `log_variance`
    ):
        _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("variance_type", variance_type, VARIANCE_TYPES)
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
        if beta_schedule != "cosine" and not 0 < beta_start <= beta_end < 1:
            raise ValueError(
                f"beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, "
                f"got beta_start={beta_start}, beta_end={beta_end}"
            )
        if clip_sample_range <= 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range}")
        if not isinstance(steps_offset, int) or steps_offset < 0:
            raise ValueError(f"steps_offset must be an integer >= 0, got {steps_offset!r}")
        if rescale_betas_zero_snr and prediction_type == "epsilon":
            raise ValueError(
                "rescale_betas_zero_snr=True needs prediction_type 'v_prediction' (or 'sample'): at zero "
                "terminal SNR x_T is pure noise, so an epsilon prediction gives no estimate of x0 there "
                "(Lin et al. 2024)"
            )
        if rescale_betas_zero_snr and timestep_spacing in SIGMA_SPACINGS:
            raise ValueError(
                f"timestep_spacing={timestep_spacing!r} spaces the noise levels between sigma_max and "
                "sigma_min, but rescale_betas_zero_snr=True makes sigma_max infinite (alpha_bar_{T-1} = 0): "
                "use timestep_spacing 'trailing' (Lin et al. 2024) or rescale_betas_zero_snr=False"
            )
        self.config = {
            "num_train_timesteps": num_train_timesteps,
            "beta_schedule": beta_schedule,
            "beta_start": beta_start,
            "beta_end": beta_end,
            "prediction_type": prediction_type,
            "rescale_betas_zero_snr": rescale_betas_zero_snr,
            "clip_sample": clip_sample,
            "clip_sample_range": clip_sample_range,
            "timestep_spacing": timestep_spacing,
            "steps_offset": steps_offset,
            "variance_type": variance_type,
        }
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.variance_type = variance_type

        betas = _make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        if rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        self._set_tables(betas)

    def _set_tables(self, betas: Tensor) -> None:
        """Every table of the schedule from its (T,) float64 betas: here from the named schedule, in a
        subclass from another library's betas."""
        self.betas = betas  # (T,) float64
        self.alphas = 1.0 - betas  # (T,) float64
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,) float64, alpha_bar_t
        # (T,) float64, increasing; +inf at zero terminal SNR
        self.log_sigmas = 0.5 * ((1 - self.alphas_cumprod).log() - self.alphas_cumprod.log())
        # (T,) float64: beta-tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) (Ho et al. Eq. 7),
        # 0 at t = 0 (alpha_bar_{-1} = 1); its log with t = 0 clipped to beta-tilde_1 (as improved-diffusion)
        alphas_cumprod_prev = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])
        self.posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.log_posterior_variance_clipped = torch.cat(
            [self.posterior_variance[1:2], self.posterior_variance[1:]]
        ).log()

    @property
    def learns_variance(self) -> bool:
        """Whether the model outputs 2C channels, the second C setting the variance ("learned_range")."""
        return self.variance_type == "learned_range"

    def split_output(self, model_output: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
        """A model output (N, C', H, W) for images of `channels` = C channels -> (prediction (N, C, H, W), the
        variance values v (N, C, H, W) in [-1, 1] or None). With "learned_range" C' must be 2C; otherwise C.

        Raises ValueError naming the mismatch and the fix (the model was trained for the other variance_type).
        """
        got = model_output.shape[1]
        if self.learns_variance:
            if got != 2 * channels:
                raise ValueError(
                    f"variance_type='learned_range' needs a model with 2 x {channels} = {2 * channels} "
                    f"output channels (the prediction, then the variance values), but it returned {got}: "
                    "sample it with a fixed variance_type ('fixed_small' or 'fixed_large') in its "
                    "noise_scheduler.json, or train it with model.out_channels=2*in_channels and "
                    "train.learn_sigma=true"
                )
            prediction, v = model_output.split(channels, dim=1)
            return prediction, v
        if got != channels:
            hint = (
                " (twice the image channels: a model trained with learned variance needs "
                "variance_type='learned_range' in its noise_scheduler.json)"
                if got == 2 * channels
                else ""
            )
            raise ValueError(
                f"the model returned {got} channels for images of {channels}{hint}; variance_type="
                f"{self.variance_type!r} expects exactly {channels}"
            )
        return model_output, None

    def log_variance(self, log_beta: Tensor, log_beta_tilde: Tensor, v: Tensor | None = None) -> Tensor:
        """The log of the reverse-process variance Sigma of p(x_s | x_t) by `variance_type`, from the log of
        the step's beta = 1 - alpha_bar_t / alpha_bar_s and of its posterior variance beta-tilde =
        (1 - alpha_bar_s) / (1 - alpha_bar_t) beta (Ho et al. 2020, Eq. 7 and Sec. 3.2):
        "fixed_small": log beta-tilde; "fixed_large": log beta; "learned_range": Nichol & Dhariwal 2021,
        Eq. 15, frac log beta + (1 - frac) log beta-tilde with frac = (v + 1) / 2 (v = +1: beta, v = -1:
        beta-tilde). log_beta, log_beta_tilde: tensors broadcasting against v ((N, 1, 1, 1) or scalars); v:
        (N, C, H, W), needed for "learned_range" only. Returns their broadcast shape, in v's dtype or theirs.
        """
        if self.variance_type == "fixed_small":
            return log_beta_tilde
        if self.variance_type == "fixed_large":
            return log_beta
        if v is None:
            raise ValueError("variance_type='learned_range' needs the model's variance values v")
        frac = (v + 1) / 2
        return frac * log_beta.to(v.dtype) + (1 - frac) * log_beta_tilde.to(v.dtype)

    def posterior_log_variance(self, t: Tensor, *, ndim: int = 4) -> Tensor:
        """log beta-tilde_t, the variance of the posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020, Eq. 7), at
        training timesteps t, with t = 0 (where it is 0) clipped to beta-tilde_1 as improved-diffusion does.
        t: (N,) long. Returns (N, 1, ..., 1) float64 (float32 on MPS) of `ndim` dimensions."""
        return self._table(self.log_posterior_variance_clipped, t)[t].reshape(-1, *([1] * (ndim - 1)))

    def model_log_variance(self, t: Tensor, v: Tensor | None = None, *, ndim: int = 4) -> Tensor:
        """`log_variance` of the one-step reverse process p(x_{t-1} | x_t) at training timesteps t, with
        improved-diffusion's values at t = 0 (where beta-tilde_0 = 0): beta-tilde is clipped to beta-tilde_1,
        and "fixed_large" takes beta-tilde_1 too ("a better decoder log likelihood"); "learned_range" keeps
        log beta_0 as its upper end. t: (N,) long; v: (N, C, H, W) or None. Returns (N, 1, ..., 1) float64 of
        `ndim` dimensions for the fixed types, v's shape and dtype for "learned_range".
        """
        shape = (-1, *([1] * (ndim - 1)))
        log_beta_tilde = self.posterior_log_variance(t, ndim=ndim)
        log_beta = self._table(self.betas, t)[t].log().reshape(shape)
        if self.variance_type == "fixed_large":
            log_beta = torch.where(t.reshape(shape) == 0, log_beta_tilde, log_beta)
        return self.log_variance(log_beta, log_beta_tilde, v)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"NoiseScheduler({args})"

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Sample q(x_t | x0) (Ho et al. Eq. 4): x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.

        x0, noise: (N, ...); t: (N,) long or float (see `alpha_bar`). Returns (N, ...) in x0's dtype, at
        least float32.
        """
        alpha_bar = self._gather(t, x0)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho 2022, Sec. 4).

        x0, noise: (N, ...); t: (N,) long. Returns (N, ...).
        """
        alpha_bar = self._gather(t, x0)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The regression target for `prediction_type`: eps, x0 or v. Shapes as in `add_noise`."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        return self.velocity(x0, noise, t)

    def predict_x0_and_eps(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, *, clip: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Turn a model output into the estimates (x0, eps) at x_t; the one conversion every sampler uses.

        model_output, x_t: (N, ...); t: (N,) long or float (see `alpha_bar`). With `clip_sample` (and clip,
        which the training loss turns off), x0 is clamped and eps re-derived from the clamped x0 so that the
        pair stays consistent with x_t (as in GLIDE / improved-diffusion's DDIM). Divides only by
        sqrt(alpha_bar_t) for epsilon prediction (alpha_bar_t > 0 there, see the module docstring) and by
        sqrt(1 - alpha_bar_t) >= sqrt(beta_0) otherwise.
        """
        alpha_bar = self._gather(t, x_t)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()  # signal and noise scales of x_t = a x0 + s eps
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x_t - s * eps) / a
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (x_t - a * x0) / s
        else:  # v = a eps - s x0 and x_t = a x0 + s eps, with a^2 + s^2 = 1
            x0 = a * x_t - s * model_output
            eps = a * model_output + s * x_t
        if self.clip_sample and clip:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
            eps = (x_t - a * x0) / s
        return x0, eps

    def alpha_bar(self, t: Tensor) -> Tensor:
        """alpha_bar at timesteps t, float64 (float32 on MPS), t's shape and device.

        Integer t: the table, alphas_cumprod[t]. Float t, continuous time in [0, T-1]: 1 / (1 + sigma^2) with
        log sigma interpolated linearly between the integer timesteps around t (the inverse of `sigma_to_t`,
        so a timestep made from a noise level gives back that noise level); t outside [0, T-1] takes the
        nearest end's sigma, as diffusers' and k-diffusion's `sigma_to_t` clip.

        Under zero terminal SNR sigma_{T-1} is infinite and log sigma has no line to T-1: on (T-2, T-1] it is
        1 / sigma = sqrt(SNR) that goes linearly from 1 / sigma_{T-2} to 0, sigma = sigma_{T-2} / (1 - w) at
        t = T-2 + w (the rescaled schedule itself ends so: sqrt(alpha_bar), about 1 / sigma there, is affine
        in t, Lin et al. 2024, Alg. 1). Continuous, increasing in t, exactly 0 at T-1.
        """
        if not t.is_floating_point():
            return self._table(self.alphas_cumprod, t)[t]
        log_sigmas = self._table(self.log_sigmas, t)
        low = t.detach().floor().clamp(0, self.num_train_timesteps - 2)
        w = (t - low).clamp(0, 1).to(log_sigmas.dtype)
        lo, hi = log_sigmas[low.long()], log_sigmas[low.long() + 1]
        last = hi.isinf()  # (T-2, T-1] under zero terminal SNR
        # Each branch of a where() is computed everywhere: fed only values that keep it (and its gradient)
        # finite where it is not taken.
        linear = torch.lerp(lo, torch.where(last, lo, hi), w)
        log_sigma = torch.where(last, lo - torch.log1p(-torch.where(last, w, 0)), linear)
        return torch.sigmoid(-2 * log_sigma)  # 1 / (1 + sigma^2), 0 at sigma = inf

    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """The continuous timestep of noise level sigma: t = i + w where log sigma = (1 - w) log sigma_i +
        w log sigma_{i+1} between the integer timesteps i, i + 1 around it (diffusers' `_sigma_to_t`,
        k-diffusion's `sigma_to_t`); above sigma_{T-2} under zero terminal SNR, w = 1 - sigma_{T-2} / sigma
        (the inverse of `alpha_bar` there; sigma = inf gives T-1). sigma: > 0, a float or a tensor of any
        shape (read in float64); returns float64 of its shape, clipped to [0, T-1].
        """
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        log_sigmas = self.log_sigmas
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(
            0, self.num_train_timesteps - 2
        )
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        last = hi.isinf()
        w = torch.where(last, -torch.expm1(lo - log_sigma), (log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return low + w

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t); t: (N,) long -> (N,) float64.

        Exactly 0 at the last step under zero terminal SNR; finite everywhere since 1 - alpha_bar_t >= beta_0.
        """
        alpha_bar = self.alpha_bar(t)
        return alpha_bar / (1 - alpha_bar)

    def loss_weight(self, t: Tensor, *, weighting: str = "uniform", min_snr_gamma: float = 5.0) -> Tensor:
        """Per-sample weights of the MSE loss for `prediction_type`; t: (N,) long -> (N,) float32.

        "uniform": all ones. "min_snr": Min-SNR-gamma (Hang et al. 2023) written for each target, i.e. the
        weight that makes the loss equal to min(snr, gamma) * ||x0_hat - x0||^2:
        epsilon: min(snr, gamma) / snr; sample: min(snr, gamma); v_prediction: min(snr, gamma) / (snr + 1).
        The epsilon weight is computed as min(1, gamma / snr), its limit 1 at snr = 0.
        """
        _check_choice("weighting", weighting, LOSS_WEIGHTINGS)
        if weighting == "uniform":
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        snr = self.snr(t)
        if self.prediction_type == "epsilon":
            weight = (min_snr_gamma / snr).clamp(max=1.0)
        elif self.prediction_type == "sample":
            weight = snr.clamp(max=min_snr_gamma)
        else:
            weight = snr.clamp(max=min_snr_gamma) / (snr + 1)
        return weight.float()

    def inference_timesteps(self, steps: int, *, drop_last: bool = False) -> Tensor:
        """The `steps` timesteps a sampler visits, descending; (steps,) on the CPU, long for the schedule's
        own timesteps and float64 (continuous t, see `alpha_bar`) for "karras" and "exponential".

        Same meaning as diffusers' `timestep_spacing` (Lin et al. 2024, Table 2); with
        T = num_train_timesteps, n = steps, i = 0 .. n-1 and round-half-to-even in float64 (as numpy does):
        "leading": i * (T // n) + steps_offset (never reaches T-1 unless n = T);
        "trailing": round(T - i * T / n) - 1 (always starts at T-1; the default: Lin et al. 2024, Sec. 3.3);
        "linspace": round(i * (T - 1) / (n - 1)).
        Unlike diffusers' "trailing" (whose float arange returns steps + 1 values, the last -1, for some step
        counts such as 61 of 1000), this always returns exactly `steps` timesteps.
        "karras" and "exponential" space the noise levels sigma from the schedule's sigma_max (t = T-1) to its
        sigma_min (t = 0), then map each to its continuous t (`sigma_to_t`), as diffusers'
        use_karras_sigmas and use_exponential_sigmas do (with timestep_spacing "linspace" in
        EulerDiscreteScheduler, whose ends those are; its DPMSolverMultistepScheduler rounds t to integers):
        "karras": sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
        rho = 7 (Karras et al. 2022, Eq. 5); "exponential": log sigma uniform from log sigma_max to
        log sigma_min.

        drop_last: lay out n = steps + 1 timesteps and return all but the last, as diffusers'
        DPMSolverMultistepScheduler does for "leading" and "linspace". Their last timestep is then about
        T / (steps + 1) rather than 0 (or steps_offset), where a step to alpha_bar = 1 would spend a network
        call on almost nothing. "trailing" ends at T / steps - 1 already and ignores it, as do steps = T and
        the sigma spacings (DPMSolverMultistepScheduler does not drop their last either).
        """
        T = self.num_train_timesteps
        if not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an integer in 1..num_train_timesteps={T}, got {steps!r}")
        if self.timestep_spacing in SIGMA_SPACINGS:
            return self.sigma_to_t(self._sigma_spacing(steps))
        n = steps + 1 if drop_last and self.timestep_spacing != "trailing" and steps < T else steps
        i = torch.arange(n, dtype=torch.float64)
        if self.timestep_spacing == "leading":
            timesteps = (i * (T // n) + self.steps_offset).flip(0)
        elif self.timestep_spacing == "trailing":
            delta = (T - T / n) - T  # numpy's float arange steps by its first difference, not by -T/n
            timesteps = torch.round(T + i * delta) - 1
        else:
            timesteps = torch.round(i * ((T - 1) / max(n - 1, 1))).flip(0)
        timesteps = timesteps[:steps].long()
        if timesteps[0] >= T:
            raise ValueError(
                f"steps_offset={self.steps_offset} with steps={steps} and 'leading' spacing gives timestep "
                f"{int(timesteps[0])} >= num_train_timesteps={T}; use fewer steps or a smaller steps_offset"
            )
        return timesteps

    def sample_timesteps(self, n: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
        """n training timesteps drawn uniformly from 0..T-1; (n,) long on `device`.

        Drawn on the generator's device (so a CPU generator gives the same t on every device), then moved.
        """
        draw_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=draw_device)
        return t.to(device) if device is not None else t

    def _sigma_spacing(self, steps: int) -> Tensor:
        """(steps,) float64 noise levels from sigma_max down to sigma_min, by `timestep_spacing`; the ends are
        exactly the schedule's (t = T-1 and 0)."""
        sigma_min, sigma_max = self.log_sigmas[[0, -1]].exp().tolist()
        return sigma_grid(self.timestep_spacing, steps, sigma_min, sigma_max)

    def _table(self, values: Tensor, t: Tensor) -> Tensor:
        """The (T,) schedule table `values` (one of this schedule's float64 CPU tables, which stay the truth)
        on t's device, float64 (float32 on MPS, which has no float64).

        Converted once per (table, device, dtype) and kept: a CPU table indexed by a CUDA t would otherwise
        be copied to the device, a blocking host sync, at every training step and every sampler step.
        The copies are not part of the schedule's state (`__getstate__`)."""
        dtype = torch.float32 if t.device.type == "mps" else torch.float64
        if t.device.type == "cpu" and dtype == values.dtype:
            return values
        cache = self.__dict__.setdefault("_device_tables", {})
        key = (id(values), t.device, dtype)
        held = cache.get(key)
        if held is None or held[0] is not values:  # `values` is kept alongside, so its id is not reused
            held = cache[key] = (values, values.to(device=t.device, dtype=dtype))
        return held[1]

    def __getstate__(self) -> dict:
        """The schedule without its device copies of the tables (`_table`): pickles and deep copies hold the
        config's tables alone, on the CPU."""
        return {k: v for k, v in self.__dict__.items() if k != "_device_tables"}

    def _gather(self, t: Tensor | int | float, x: Tensor) -> Tensor:
        """alpha_bar at t reshaped to broadcast over x: (N,) -> (N, 1, ..., 1), in x's dtype (at least
        float32)."""
        coeff = self.alpha_bar(torch.as_tensor(t, device=x.device))
        dtype = torch.promote_types(x.dtype, torch.float32)
        return coeff.to(dtype).reshape(-1, *([1] * (x.ndim - 1)))


def sigma_grid(
    spacing: str, steps: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO
) -> Tensor:
    """(steps,) float64 noise levels from sigma_max down to sigma_min, spaced by one of SIGMA_SPACINGS:
    "karras": sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    (Karras et al. 2022, Eq. 5); "exponential": log sigma uniform. The ends are exactly sigma_max and
    sigma_min, not their round trip through the formula; one step is sigma_max alone."""
    _check_choice("timestep_spacing", spacing, SIGMA_SPACINGS)
    if spacing == "karras":
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sigmas = (hi + ramp * (lo - hi)) ** rho
    else:
        sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()
    sigmas[0] = sigma_max
    if steps > 1:
        sigmas[-1] = sigma_min
    return sigmas


def _make_betas(schedule: str, T: int, beta_start: float, beta_end: float) -> Tensor:
    """(T,) float64 betas of the named schedule."""
    if schedule == "linear":  # Ho et al. 2020, Sec. 4: 1e-4 to 0.02
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":  # linear in sqrt(beta), as Stable Diffusion
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if schedule == "sigmoid":  # GeoDiff (Xu et al. 2022)
        return (
            torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start)
            + beta_start
        )

    # cosine: Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2),
    # s = 0.008; beta_t = 1 - alpha_bar(t+1) / alpha_bar(t) clipped at 0.999 against the singularity at t = T.
    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def _rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alpha_bar) so that it ends at exactly 0 and keeps
    its first value, then recover the betas. (T,) float64 -> (T,) float64 with alpha_bar_{T-1} == 0."""
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
