"""NoiseScheduler: closed forms, diffusers' schedulers as the reference, and errors at the boundary."""

import copy
import inspect
import pickle

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from ddpm.schedule import NoiseScheduler

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# our schedule name -> diffusers' name
DIFFUSERS_SCHEDULE = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
    "sigmoid": "sigmoid",
}


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("schedule", list(DIFFUSERS_SCHEDULE))
def test_alphas_cumprod_match_diffusers(schedule, rescale):
    ours = NoiseScheduler(
        beta_schedule=schedule, rescale_betas_zero_snr=rescale, prediction_type="v_prediction"
    )
    ref = DDPMScheduler(beta_schedule=DIFFUSERS_SCHEDULE[schedule], rescale_betas_zero_snr=rescale)
    assert ours.betas.dtype == ours.alphas.dtype == ours.alphas_cumprod.dtype == torch.float64
    assert ours.alphas_cumprod.shape == (1000,)
    # diffusers keeps its schedule in float32: agreement to float32 precision is all there is to check
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=0, atol=1e-6)


def test_linear_schedule_is_ddpm_and_cosine_is_capped():
    linear = NoiseScheduler()
    assert linear.betas[0].item() == pytest.approx(1e-4) and linear.betas[-1].item() == pytest.approx(0.02)
    cosine = NoiseScheduler(beta_schedule="cosine", num_train_timesteps=100)
    assert cosine.betas.max().item() == pytest.approx(0.999)
    assert cosine.alphas_cumprod[-1] > 0
    torch.testing.assert_close(cosine.alphas_cumprod, torch.cumprod(1 - cosine.betas, 0))


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_zero_terminal_snr(prediction_type):
    s = NoiseScheduler(rescale_betas_zero_snr=True, prediction_type=prediction_type)
    assert s.alphas_cumprod[-1].item() == 0.0
    assert s.alphas_cumprod[0].item() == pytest.approx(NoiseScheduler().alphas_cumprod[0].item())
    t = torch.arange(1000)
    snr = s.snr(t)
    assert snr[-1].item() == 0.0 and torch.isfinite(snr).all() and (snr[:-1] > 0).all()
    weights = s.loss_weight(t, weighting="min_snr")
    assert torch.isfinite(weights).all() and weights[-1].item() == 0.0
    x_t = torch.randn(2, 1, 2, 2)
    x0, eps = s.predict_x0_and_eps(torch.randn(2, 1, 2, 2), x_t, torch.tensor([999, 999]))
    assert torch.isfinite(x0).all() and torch.equal(eps, x_t)  # x_T is pure noise


def test_zero_terminal_snr_with_epsilon_prediction_is_refused():
    with pytest.raises(ValueError, match="v_prediction"):
        NoiseScheduler(rescale_betas_zero_snr=True, prediction_type="epsilon")


def test_add_noise_matches_diffusers():
    ours, ref = NoiseScheduler(), DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    # 1 - alpha_bar_0 = 1e-4 in diffusers' float32 table keeps only ~4 digits: 1e-5 is as close as it gets
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=0, atol=1e-5)


def test_add_noise_statistics():
    s = NoiseScheduler()
    n, c = 200_000, 0.7
    t = torch.full((n,), 300)
    x0 = torch.full((n, 1), c)
    x_t = s.add_noise(x0, torch.randn(n, 1, generator=torch.Generator().manual_seed(1)), t)
    ab = s.alphas_cumprod[300].item()
    assert x_t.mean().item() == pytest.approx(ab**0.5 * c, abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - ab, rel=0.02)


@pytest.mark.parametrize(
    ("prediction_type", "zero_snr"),
    [(p, False) for p in PREDICTION_TYPES] + [("sample", True), ("v_prediction", True)],
)
def test_training_target_round_trips_through_predict_x0_and_eps(prediction_type, zero_snr):
    s = NoiseScheduler(prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 2, 4, 4, generator=g), torch.randn(5, 2, 4, 4, generator=g)
    t = torch.tensor([0, 1, 400, 998, 999])
    x_t = s.add_noise(x0, eps, t)
    target = s.training_target(x0, eps, t)
    expected = {"epsilon": eps, "sample": x0, "v_prediction": s.velocity(x0, eps, t)}[prediction_type]
    torch.testing.assert_close(target, expected)
    x0_hat, eps_hat = s.predict_x0_and_eps(target, x_t, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-4, atol=1e-4)


def test_velocity_closed_form_and_conversions():
    s = NoiseScheduler()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 250, 990])
    a = s.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sig = (1 - s.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    v = s.velocity(x0, eps, t)
    torch.testing.assert_close(v, a * eps - sig * x0)
    x_t = s.add_noise(x0, eps, t)
    torch.testing.assert_close(a * x_t - sig * v, x0)  # x0 from v (Salimans & Ho 2022)
    torch.testing.assert_close(sig * x_t + a * v, eps)  # eps from v


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_min_snr_weights_closed_form(prediction_type):
    s = NoiseScheduler(prediction_type=prediction_type)
    gamma = 5.0
    t = torch.tensor([0, 50, 200, 600, 999])
    w = s.loss_weight(t, weighting="min_snr", min_snr_gamma=gamma)
    assert w.dtype == torch.float32 and w.shape == (5,)
    for wi, ab in zip(w.tolist(), s.alphas_cumprod[t].tolist(), strict=True):
        snr = ab / (1 - ab)
        expected = {
            "epsilon": min(snr, gamma) / snr,
            "sample": min(snr, gamma),
            "v_prediction": min(snr, gamma) / (snr + 1),
        }[prediction_type]
        assert wi == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(s.loss_weight(t), torch.ones(5))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_min_snr_weight_turns_every_target_into_the_min_snr_x0_loss(prediction_type):
    # Hang et al. 2023: the loss is min(snr, gamma) * ||x0_hat - x0||^2 whatever the network predicts
    s = NoiseScheduler(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 100, 500, 950])
    target = s.training_target(x0, eps, t)
    output = target + 0.1 * torch.randn(4, 8, generator=g, dtype=torch.float64)
    x0_hat, _ = s.predict_x0_and_eps(output, s.add_noise(x0, eps, t), t)
    weighted = s.loss_weight(t, weighting="min_snr").double() * ((output - target) ** 2).sum(1)
    torch.testing.assert_close(
        weighted, s.snr(t).clamp(max=5.0) * ((x0_hat - x0) ** 2).sum(1), rtol=1e-5, atol=0
    )


def test_clip_sample_clamps_x0_and_keeps_the_pair_consistent():
    s = NoiseScheduler(prediction_type="sample", clip_sample=True, clip_sample_range=1.0)
    x_t, t = torch.randn(2, 1, 2, 2), torch.tensor([100, 700])
    x0, eps = s.predict_x0_and_eps(torch.full((2, 1, 2, 2), 3.0), x_t, t)
    assert torch.equal(x0, torch.ones_like(x0))
    ab = s.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, x_t)


@pytest.mark.parametrize("steps", [1, 7, 10, 50, 250, 999, 1000])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_inference_timesteps_match_diffusers(spacing, steps):
    ref = DDIMScheduler(timestep_spacing=spacing)
    ref.set_timesteps(steps)
    ours = NoiseScheduler(timestep_spacing=spacing).inference_timesteps(steps)
    assert ours.dtype == torch.long and ours.shape == (steps,)
    assert torch.equal(ours, ref.timesteps)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize("steps", [1, 7, 10, 50, 250, 999])
@pytest.mark.parametrize(
    ("spacing", "steps_offset"), [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)]
)
def test_drop_last_timesteps_are_dpm_solvers(spacing, steps_offset, steps):
    """drop_last=True: DPMSolverMultistepScheduler's grid ("leading" and "linspace": steps + 1 timesteps, the
    last dropped), so that no network call is spent at t = 0 before the step to alpha_bar = 1."""
    scheduler = NoiseScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    if steps_offset == 1 and steps == 999:  # diffusers indexes past its table here; we refuse
        with pytest.raises(ValueError, match="steps_offset=1 with steps=999"):
            scheduler.inference_timesteps(steps, drop_last=True)
        return
    ref = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    ref.set_timesteps(steps)
    ours = scheduler.inference_timesteps(steps, drop_last=True)
    assert ours.dtype == torch.long and ours.shape == (steps,)
    assert torch.equal(ours, ref.timesteps)
    assert ours.min() > 0 or spacing == "trailing"  # trailing reaches 0 only near steps = T, as diffusers'


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_drop_last_with_every_timestep_visits_every_timestep(spacing):
    timesteps = NoiseScheduler(timestep_spacing=spacing).inference_timesteps(1000, drop_last=True)
    assert timesteps.tolist() == list(range(999, -1, -1))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize("spacing", ["karras", "exponential"])
@pytest.mark.parametrize("steps", [2, 10, 30])
def test_sigma_spacings_match_diffusers_euler(spacing, steps):
    """EulerDiscreteScheduler's use_karras_sigmas / use_exponential_sigmas on its "linspace" grid (whose ends
    are the schedule's sigma_max and sigma_min): the same noise levels and continuous timesteps, float64
    here, ends exact; drop_last changes nothing (DPMSolverMultistepScheduler drops none there either). One
    step is sigma_max alone (diffusers' linspace of one point is t = 0 instead)."""
    assert NoiseScheduler(timestep_spacing=spacing).inference_timesteps(1).tolist() == [999.0]
    ours = NoiseScheduler(timestep_spacing=spacing)
    ref = EulerDiscreteScheduler(timestep_spacing="linspace", **{f"use_{spacing}_sigmas": True})
    ref.alphas_cumprod = ours.alphas_cumprod.clone()
    ref.set_timesteps(steps)
    timesteps = ours.inference_timesteps(steps)
    assert timesteps.dtype == torch.float64 and timesteps.shape == (steps,)
    assert timesteps[0] == 999 and timesteps[-1] == 0
    torch.testing.assert_close(timesteps, ref.timesteps.double(), rtol=1e-6, atol=1e-4)  # theirs: float32
    sigmas = (1 / ours.alpha_bar(timesteps) - 1).sqrt()
    torch.testing.assert_close(sigmas, ref.sigmas[:-1].double(), rtol=1e-6, atol=0)
    assert torch.equal(ours.inference_timesteps(steps, drop_last=True), timesteps)


def test_karras_levels_are_edm_equation_5():
    s = NoiseScheduler(timestep_spacing="karras")
    sigma_min, sigma_max = ((1 - s.alphas_cumprod[[0, -1]]) / s.alphas_cumprod[[0, -1]]).sqrt().tolist()
    i = torch.arange(5, dtype=torch.float64)
    rho = 7
    expected = (sigma_max ** (1 / rho) + i / 4 * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    sigmas = (1 / s.alpha_bar(s.inference_timesteps(5)) - 1).sqrt()
    torch.testing.assert_close(sigmas, expected, rtol=1e-12, atol=0)
    exponential = NoiseScheduler(timestep_spacing="exponential")
    log_sigmas = (1 / exponential.alpha_bar(exponential.inference_timesteps(5)) - 1).log() / 2
    torch.testing.assert_close(log_sigmas.diff(), log_sigmas.diff()[:1].expand(4), rtol=1e-9, atol=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_continuous_timesteps_interpolate_log_sigma_and_round_trip(schedule):
    """alpha_bar at a float t: the table at whole t, log sigma linear in between (diffusers' _sigma_to_t
    inverted), and sigma -> sigma_to_t -> alpha_bar gives back 1 / (1 + sigma^2)."""
    s = NoiseScheduler(beta_schedule=schedule)
    whole = torch.tensor([0, 1, 500, 998, 999])
    torch.testing.assert_close(s.alpha_bar(whole.double()), s.alpha_bar(whole), rtol=1e-12, atol=0)
    mid = s.alpha_bar(torch.tensor([500.25], dtype=torch.float64))
    log_sigma = 0.75 * s.log_sigmas[500] + 0.25 * s.log_sigmas[501]
    assert mid.item() == pytest.approx(1 / (1 + log_sigma.exp().item() ** 2), rel=1e-12)
    sigmas = torch.logspace(-1.9, 2, 50, dtype=torch.float64).clamp(
        s.log_sigmas[0].exp(), s.log_sigmas[-1].exp()
    )
    t = s.sigma_to_t(sigmas)
    assert t.dtype == torch.float64 and (t >= 0).all() and (t <= 999).all()
    torch.testing.assert_close(s.alpha_bar(t), 1 / (1 + sigmas**2), rtol=1e-12, atol=0)
    assert s.sigma_to_t(1e-6).item() == 0 and s.sigma_to_t(1e6).item() == 999  # clipped to [0, T-1]


def log_sigma_lerp(s: NoiseScheduler, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar at float t by the log-sigma lerp alone (as before zero terminal SNR's last interval had a
    formula of its own)."""
    low = t.floor().clamp(0, s.num_train_timesteps - 2)
    w = t - low
    lo, hi = s.log_sigmas[low.long()], s.log_sigmas[low.long() + 1]
    return torch.sigmoid(-2 * torch.where(w == 0, lo, torch.lerp(lo, hi, w)))


def log_sigma_inverse(s: NoiseScheduler, sigma: torch.Tensor) -> torch.Tensor:
    """sigma_to_t by the log-sigma lerp alone."""
    log_sigma = sigma.log()
    low = (torch.searchsorted(s.log_sigmas, log_sigma, right=True) - 1).clamp(0, s.num_train_timesteps - 2)
    lo, hi = s.log_sigmas[low], s.log_sigmas[low + 1]
    return low + ((log_sigma - lo) / (hi - lo)).clamp(0, 1)


@pytest.mark.parametrize("zero_snr", [False, True])
def test_zero_terminal_snr_last_interval_takes_one_over_sigma_linear_and_nothing_else_moves(zero_snr):
    """At zero terminal SNR sigma_{T-1} is infinite: on (T-2, T-1] 1 / sigma goes linearly to 0, so that
    alpha_bar is finite, continuous, decreasing and exactly 0 at T-1 (the log-sigma lerp gave NaN on
    [T-1.5, T-1] and 0 on (T-2, T-1.5)), and sigma_to_t inverts it. Everywhere else, and on every interval
    of a schedule with a finite sigma_max, both are bit-identical to the log-sigma lerp."""
    s = NoiseScheduler(rescale_betas_zero_snr=zero_snr, prediction_type="v_prediction")
    t = torch.cat([torch.linspace(0, 998, 4001, dtype=torch.float64), torch.tensor([0.3, 997.7, 998.0])])
    if not zero_snr:
        t = torch.cat([t, torch.linspace(998, 999, 101, dtype=torch.float64)])
    assert torch.equal(s.alpha_bar(t), log_sigma_lerp(s, t))
    sigmas = (1 / log_sigma_lerp(s, t) - 1).sqrt()
    assert torch.equal(s.sigma_to_t(sigmas), log_sigma_inverse(s, sigmas))
    if not zero_snr:
        return
    t = 998 + torch.linspace(0, 1, 1001, dtype=torch.float64)
    ab, w = s.alpha_bar(t), t - 998  # w as t holds it
    sigma_998 = s.log_sigmas[998].exp()
    torch.testing.assert_close(ab[:-1], 1 / (1 + (sigma_998 / (1 - w[:-1])) ** 2), rtol=1e-12, atol=0)
    assert ab[0].item() == pytest.approx(s.alphas_cumprod[998].item(), rel=1e-12)
    assert ab[-1].item() == 0.0 and (ab.diff() < 0).all()
    assert s.alpha_bar(torch.tensor([999.0, 1200.0], dtype=torch.float64)).tolist() == [0.0, 0.0]
    # Continuous at T-2: the step just above it is as small as the one just below.
    step = 1e-9
    near = s.alpha_bar(torch.tensor([998 - step, 998.0, 998 + step], dtype=torch.float64))
    assert (near.diff().abs() < 1e-6 * near[1]).all()
    sigmas = sigma_998 * torch.logspace(0, 2, 50, dtype=torch.float64)
    back = s.sigma_to_t(torch.cat([sigmas, torch.tensor([torch.inf], dtype=torch.float64)]))
    assert (back[:-1] >= 998).all() and (back[:-1] < 999).all() and back[-1].item() == 999
    # t = 998 + w near 999 holds 1 - w to about 1e-13 absolute: relative 1e-11 at sigma = 100 sigma_998
    torch.testing.assert_close(s.alpha_bar(back[:-1]), 1 / (1 + sigmas**2), rtol=1e-10, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_conversions_take_continuous_timesteps(prediction_type):
    """predict_x0_and_eps and add_noise at a float t use alpha_bar(t): the pair round-trips."""
    s = NoiseScheduler(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([12.5, 400.3, 998.9], dtype=torch.float64)
    x_t = s.add_noise(x0, noise, t)
    ab = s.alpha_bar(t).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    got_x0, got_eps = s.predict_x0_and_eps(s.training_target(x0, noise, t), x_t, t)
    torch.testing.assert_close(got_x0, x0, rtol=0, atol=2e-3)
    torch.testing.assert_close(got_eps, noise, rtol=0, atol=2e-3)


@pytest.mark.parametrize("spacing", ["karras", "exponential"])
def test_sigma_spacings_with_zero_terminal_snr_are_refused(spacing):
    with pytest.raises(ValueError, match=f"timestep_spacing='{spacing}' .*sigma_max infinite"):
        NoiseScheduler(timestep_spacing=spacing, rescale_betas_zero_snr=True, prediction_type="v_prediction")


def test_default_spacing_is_trailing():
    """Lin et al. 2024: the first step starts from t = T - 1, where x_T ~ N(0, I) was trained."""
    assert NoiseScheduler().config["timestep_spacing"] == "trailing"
    assert NoiseScheduler().inference_timesteps(10)[0] == 999


def test_trailing_timesteps_keep_their_count_where_diffusers_adds_minus_one():
    ref = DDIMScheduler(timestep_spacing="trailing")
    ref.set_timesteps(61)  # diffusers' float arange yields 62 values here, the last -1
    ours = NoiseScheduler(timestep_spacing="trailing").inference_timesteps(61)
    assert ours.shape == (61,) and ours[0] == 999 and ours.min() >= 0
    assert torch.equal(ours, ref.timesteps[:61])


def test_leading_steps_offset_matches_diffusers_and_overflow_is_an_error():
    ref = DDIMScheduler(steps_offset=1)
    ref.set_timesteps(50)
    s = NoiseScheduler(steps_offset=1, timestep_spacing="leading")
    assert torch.equal(s.inference_timesteps(50), ref.timesteps)
    with pytest.raises(ValueError, match="steps_offset=1 with steps=1000"):
        s.inference_timesteps(1000)


@pytest.mark.parametrize("steps", [0, 1001, 2.5])
def test_inference_steps_out_of_range(steps):
    with pytest.raises(ValueError, match="1..num_train_timesteps=1000"):
        NoiseScheduler().inference_timesteps(steps)


def test_sample_timesteps_uniform_and_deterministic():
    s = NoiseScheduler(num_train_timesteps=10)
    t = s.sample_timesteps(5000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 9
    assert torch.bincount(t).min() > 400
    assert torch.equal(t, s.sample_timesteps(5000, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize(
    ("key", "value", "valid"),
    [
        ("beta_schedule", "quadratic", "linear, scaled_linear, cosine, sigmoid"),
        ("prediction_type", "x0", "epsilon, sample, v_prediction"),
        ("timestep_spacing", "uniform", "leading, trailing, linspace"),
    ],
)
def test_unknown_options_list_the_valid_ones(key, value, valid):
    with pytest.raises(ValueError, match=f"unknown {key} '{value}'; valid: {valid}"):
        NoiseScheduler(**{key: value})


def test_unknown_loss_weighting_and_bad_numbers():
    with pytest.raises(ValueError, match="valid: uniform, min_snr"):
        NoiseScheduler().loss_weight(torch.tensor([1]), weighting="snr")
    with pytest.raises(ValueError, match="beta_start"):
        NoiseScheduler(beta_start=0.0)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        NoiseScheduler(num_train_timesteps=1)


def test_config_is_the_constructor_kwargs():
    s = NoiseScheduler(beta_schedule="cosine", prediction_type="v_prediction", timestep_spacing="trailing")
    assert list(s.config) == list(inspect.signature(NoiseScheduler).parameters)
    torch.testing.assert_close(NoiseScheduler(**s.config).alphas_cumprod, s.alphas_cumprod)


def test_coefficients_follow_input_dtype_at_least_float32():
    s = NoiseScheduler()
    t = torch.tensor([10, 20])
    for dtype, expected in [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64,) * 2,
    ]:
        x = torch.randn(2, 1, 2, 2).to(dtype)
        assert s.add_noise(x, x, t).dtype == expected
    assert s.snr(t).dtype == torch.float64


def _count_copies(monkeypatch, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Patch Tensor.to to record every call made on one of `tensors`; returns the record."""
    made, real_to = [], torch.Tensor.to

    def to(self, *args, **kwargs):
        if any(self is tensor for tensor in tensors):
            made.append(self)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    return made


def test_each_table_is_converted_once_per_device_not_at_every_call(monkeypatch):
    # On a GPU each conversion of a CPU table is a copy from the host that waits for the device: made at every
    # training and sampler step, it stalls both. "meta" stands for any device other than the CPU here.
    scheduler = NoiseScheduler(variance_type="fixed_large")
    tables = [scheduler.alphas_cumprod, scheduler.log_sigmas, scheduler.betas]
    tables.append(scheduler.log_posterior_variance_clipped)
    made = _count_copies(monkeypatch, tables)
    t = torch.tensor([0, 5, 999], device="meta")
    x = torch.zeros(3, 1, 4, 4, device="meta")
    for _ in range(3):
        assert scheduler.add_noise(x, x, t).device.type == "meta"
        assert scheduler.alpha_bar(t.double() + 0.5).device.type == "meta"  # continuous t: log sigmas
        scheduler.model_log_variance(t)  # betas and the posterior variance
        scheduler.loss_weight(t, weighting="min_snr")
    assert sorted(map(id, made)) == sorted(map(id, tables))  # one conversion each, at the first call
    made.clear()
    scheduler.alpha_bar(torch.tensor([3]))  # on the CPU: the float64 table itself, no conversion
    assert made == []


def test_the_device_copies_of_the_tables_are_not_part_of_the_schedule():
    scheduler = NoiseScheduler(beta_schedule="cosine")
    fresh = NoiseScheduler(beta_schedule="cosine")
    scheduler.alpha_bar(torch.tensor([1, 2], device="meta"))
    for clone in (pickle.loads(pickle.dumps(scheduler)), copy.deepcopy(scheduler)):
        assert sorted(vars(clone)) == sorted(vars(fresh))  # the config's tables, nothing device-bound
        t = torch.tensor([1, 2])
        torch.testing.assert_close(clone.alpha_bar(t), fresh.alpha_bar(t))
    assert repr(scheduler) == repr(fresh) and scheduler.config == fresh.config
