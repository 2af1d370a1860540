"""Samplers: trajectories against diffusers' schedulers, closed forms, guidance, precision and errors.

The models are toy callables: a fixed random linear map of x plus a function of t (float64), so that both
libraries see exactly the same deterministic network.
"""

import math
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from torch import nn

from ddpm.config import ConfigError, SampleConfig, load_config
from ddpm.exact_score import MIXTURE, exact_predictor, wasserstein1
from ddpm.interop.diffusers import diffusers_scheduler_config
from ddpm.samplers import (
    DROP_LAST,
    SAMPLERS,
    SampleOptionError,
    check_sample_options,
    denoiser,
    network_calls,
    posterior,
    sample,
    sampling_budget,
    solver_options,
)
from ddpm.schedule import NoiseScheduler

SHAPE = (2, 3, 4, 4)
# The solvers of diffusion models, whose last step returns the denoiser's x0: all but the sampler of
# consistency models, which returns f(x, sigma) (tests/test_consistency.py)
DIFFUSION_SAMPLERS = [name for name in SAMPLERS if name != "consistency"]


class LinearToy:
    """model(x, t, y) = x @ W + 0.1 sin(t / 100), W = 0.8 I + 0.2 (random rotation); records its calls."""

    def __init__(self, dim: int = 3 * 4 * 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        rotation = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
        self.weight = 0.8 * torch.eye(dim, dtype=torch.float64) + 0.2 * rotation
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def __call__(self, x, t, y=None):
        self.calls.append((x.clone(), t.clone(), y))
        out = (x.reshape(x.shape[0], -1).double() @ self.weight).reshape(x.shape)
        return (out + 0.1 * torch.sin(t.double() / 100).view(-1, 1, 1, 1)).to(x.dtype)


def x_T(dtype=torch.float64, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(42), dtype=dtype)


def run_diffusers(ref, model, x, generator=None) -> torch.Tensor:
    """The standard diffusers loop: set_timesteps done, then one `step` per timestep."""
    for t in ref.timesteps:
        kwargs = {"generator": generator} if generator is not None else {}
        x = ref.step(model(x, t.repeat(x.shape[0])), t, x, **kwargs).prev_sample
    return x


# --- agreement with diffusers -------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_trajectory_matches_diffusers(prediction_type, spacing):
    """50 steps, eta 0, no clipping, set_alpha_to_one; diffusers as shipped (float32). Not "linspace": there
    DDIMScheduler steps to t - T // steps instead of the next timestep of its list (diffusers #12633)."""
    ref = DDIMScheduler(
        prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing
    )
    ref.set_timesteps(50)
    expected = run_diffusers(ref, LinearToy(), x_T())
    scheduler = NoiseScheduler(prediction_type=prediction_type, timestep_spacing=spacing)
    ours = sample(LinearToy(), scheduler, noise=x_T(), progress=False)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_ddim_trajectory_matches_diffusers_exactly_on_the_same_table(prediction_type, clip):
    """With diffusers given our float64 alpha_bar the step arithmetic agrees to rounding. Clipping re-derives
    eps from the clipped x0, which is diffusers' use_clipped_model_output=True."""
    ours = NoiseScheduler(
        prediction_type=prediction_type, clip_sample=clip, clip_sample_range=0.5, timestep_spacing="leading"
    )
    ref = DDIMScheduler(
        prediction_type=prediction_type, clip_sample=clip, clip_sample_range=0.5, timestep_spacing="leading"
    )
    ref.alphas_cumprod = ours.alphas_cumprod.clone()
    ref.set_timesteps(20)
    model, x = LinearToy(), x_T()
    for t in ref.timesteps:
        out = model(x, t.repeat(x.shape[0]))
        x = ref.step(out, t, x, use_clipped_model_output=clip).prev_sample
    got = sample(LinearToy(), ours, noise=x_T(), steps=20, progress=False)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("spacing", "variance", "steps"),
    [
        ("leading", "fixed_small", 10),
        ("leading", "fixed_large", 10),
        ("leading", "fixed_small", 1000),
        ("leading", "fixed_large", 1000),
        ("linspace", "fixed_small", 10),
        ("linspace", "fixed_large", 10),
        ("trailing", "fixed_small", 10),
        # not trailing + fixed_large: diffusers adds beta-scaled noise on the final step when its t > 0;
        # we add none on the step to alpha_bar = 1 (Ho et al. Algorithm 2: z = 0 at the last step)
    ],
)
def test_ddpm_trajectory_matches_diffusers(spacing, variance, steps):
    """Same table, same x_T and the same generator seed: both draw one noise per step but the last."""
    ours = NoiseScheduler(timestep_spacing=spacing, variance_type=variance)
    ref = DDPMScheduler(variance_type=variance, clip_sample=False, timestep_spacing=spacing)
    ref.alphas_cumprod = ours.alphas_cumprod.clone()
    ref.set_timesteps(steps)
    expected = run_diffusers(ref, LinearToy(), x_T(), generator=torch.Generator().manual_seed(3))
    got = sample(
        LinearToy(),
        ours,
        noise=x_T(),
        sampler="ddpm",
        steps=steps,
        generator=torch.Generator().manual_seed(3),
        progress=False,
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_2m_matches_diffusers(prediction_type, steps, spacing):
    """DPMSolverMultistepScheduler as shipped (dpmsolver++, order 2, final sigma 0), with its own timesteps
    for each spacing: "leading" and "linspace" lay out steps + 1 and drop the last, which we do too. Its
    `step` casts x to float32 and keeps sigmas in float32, so float64 agreement is to float32 accuracy (a few
    1e-5)."""
    ours = NoiseScheduler(prediction_type=prediction_type, timestep_spacing=spacing)
    ref = DPMSolverMultistepScheduler(prediction_type=prediction_type, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    expected = run_diffusers(ref, LinearToy(), x_T())
    model = LinearToy()
    got = sample(model, ours, noise=x_T(), sampler="dpm++", steps=steps, progress=False)
    assert [int(t[0]) for _, t, _ in model.calls] == ref.timesteps.tolist()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_diffusers_schedulers_from_our_config_with_clipping_match_our_samplers(sampler):
    """diffusers_scheduler_config(scheduler, cls) builds each diffusers scheduler so that it computes what our
    sampler does, clip_sample included (DPM-Solver's thresholding at sample_max_value=1). The toy's x0 leaves
    [-1, 1], so the clamp is active."""
    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}[sampler]
    ours = NoiseScheduler(clip_sample=True, timestep_spacing="leading")
    ref = cls(**diffusers_scheduler_config(ours, cls))
    ref.set_timesteps(10)
    kwargs = {
        "ddpm": {"generator": torch.Generator().manual_seed(3)},
        "ddim": {"use_clipped_model_output": True},  # we re-derive eps from the clipped x0
        "dpm++": {},
    }[sampler]
    model, x, clamped = LinearToy(), x_T(), []
    for t in ref.timesteps:
        out = model(x, t.repeat(x.shape[0]))
        clamped.append(ours.predict_x0_and_eps(out, x, t.repeat(x.shape[0]))[0].abs().max() == 1.0)
        x = ref.step(out, t, x, **kwargs).prev_sample
    assert any(clamped)  # the clamp was active
    generator = torch.Generator().manual_seed(3)
    got = sample(
        LinearToy(), ours, noise=x_T(), sampler=sampler, steps=10, generator=generator, progress=False
    )
    torch.testing.assert_close(got, x, rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_2m_matches_diffusers_update_rules_in_float64(prediction_type, spacing):
    """diffusers' first- and second-order update functions driven in float64 (no float32 casts): exact."""
    ours = NoiseScheduler(prediction_type=prediction_type, timestep_spacing=spacing)
    ref = DPMSolverMultistepScheduler(prediction_type=prediction_type, algorithm_type="dpmsolver++")
    timesteps = ours.inference_timesteps(10, drop_last=True)
    ref.set_timesteps(timesteps=timesteps.tolist())
    ab = ours.alphas_cumprod[timesteps]
    ref.sigmas = torch.cat([((1 - ab) / ab).sqrt(), torch.zeros(1, dtype=torch.float64)])
    ref.alphas_cumprod = ours.alphas_cumprod.clone()
    model, x, history = LinearToy(), x_T(), []
    for i, t in enumerate(timesteps):
        ref._step_index = i
        history.append(ref.convert_model_output(model(x, t.repeat(x.shape[0])), sample=x))
        if i in (0, len(timesteps) - 1):  # first order on the first step and the final step
            x = ref.dpm_solver_first_order_update(history[-1], sample=x)
        else:
            x = ref.multistep_dpm_solver_second_order_update(history[-2:], sample=x)
    got = sample(LinearToy(), ours, noise=x_T(), sampler="dpm++", steps=10, progress=False)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-10)


# Our sigma-space samplers and the diffusers scheduler of the same maths; diffusers' "karras" and
# "exponential" are its use_*_sigmas on the "linspace" grid, whose ends are the schedule's sigma_max and
# sigma_min.
SIGMA_SAMPLERS = {
    "euler": EulerDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
}


def diffusers_sigma_scheduler(name: str, scheduler: NoiseScheduler):
    """The diffusers scheduler of sampler `name` with our schedule and spacing, on our float64 alpha_bar."""
    spacing = scheduler.timestep_spacing
    # our schedule under diffusers' names (DPMSolverMultistepScheduler takes the sigma spacings too)
    schedule = diffusers_scheduler_config(scheduler, "DPMSolverMultistepScheduler")
    keys = (
        "num_train_timesteps",
        "beta_schedule",
        "beta_start",
        "beta_end",
        "prediction_type",
        "steps_offset",
    )
    config = {key: schedule[key] for key in keys}
    config.update(
        timestep_spacing="linspace" if spacing in ("karras", "exponential") else spacing,
        use_karras_sigmas=spacing == "karras",
        use_exponential_sigmas=spacing == "exponential",
    )
    if name == "euler_a":  # EulerAncestralDiscreteScheduler has no use_*_sigmas: given ours below
        del config["use_karras_sigmas"], config["use_exponential_sigmas"]
    ref = SIGMA_SAMPLERS[name](**config)
    ref.alphas_cumprod = scheduler.alphas_cumprod.clone()
    return ref


def run_diffusers_sigma_space(ref, model, x, generator=None) -> torch.Tensor:
    """diffusers' k-diffusion-style loop: x / sqrt(alpha_bar) = x0 + sigma eps, scaled back for the model.
    x_T enters as x_T * sqrt(1 + sigma_0^2) (exactly our x_T, where diffusers' init_noise_sigma is
    approximate)."""
    x = x * (1 + ref.sigmas[0].double() ** 2) ** 0.5
    for t in ref.timesteps:
        kwargs = {"generator": generator} if generator is not None else {}
        out = model(ref.scale_model_input(x, t), t.repeat(x.shape[0]))
        x = ref.step(out, t, x, **kwargs).prev_sample
    return x


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", "karras", "exponential"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(SIGMA_SAMPLERS))
def test_sigma_space_samplers_match_diffusers(name, prediction_type, spacing):
    """Euler, Heun and Euler ancestral against diffusers' EulerDiscrete-, HeunDiscrete- and
    EulerAncestralDiscreteScheduler on the same timesteps, network calls and noise (diffusers steps in
    float32). 10 steps: diffusers' Euler "linspace" does not round its timesteps, ours (as DDIM's and
    DPM-Solver's) does; 999 / 9 is whole."""
    ours = NoiseScheduler(prediction_type=prediction_type, timestep_spacing=spacing)
    ref = diffusers_sigma_scheduler(name, ours)
    ref.set_timesteps(10)
    if name == "euler_a" and spacing in ("karras", "exponential"):
        timesteps = ours.inference_timesteps(10)
        ab = ours.alpha_bar(timesteps)
        ref.sigmas = torch.cat([((1 - ab) / ab).sqrt(), torch.zeros(1, dtype=torch.float64)]).float()
        ref.timesteps = timesteps.float()
    generator = torch.Generator().manual_seed(3) if name == "euler_a" else None
    expected = run_diffusers_sigma_space(ref, LinearToy(), x_T(), generator)
    model = LinearToy()
    got = sample(
        model,
        ours,
        noise=x_T(),
        sampler=name,
        steps=10,
        generator=torch.Generator().manual_seed(3),
        progress=False,
    )
    seen = torch.stack([t[0] for _, t, _ in model.calls]).double()
    torch.testing.assert_close(seen, ref.timesteps.double(), rtol=1e-6, atol=0)  # diffusers': float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize("spacing", ["karras", "exponential"])
def test_sigma_spacings_give_continuous_timesteps_at_their_noise_levels(spacing):
    """diffusers' karras/exponential sigmas (its DPMSolverMultistepScheduler lays them out between the
    schedule's ends too, then makes the timesteps integers); alpha_bar at each of our float timesteps is
    1 / (1 + sigma^2) of its level."""
    ours = NoiseScheduler(timestep_spacing=spacing)
    ref = DPMSolverMultistepScheduler(**{f"use_{spacing}_sigmas": True})
    ref.alphas_cumprod = ours.alphas_cumprod.clone()
    ref.set_timesteps(12)
    timesteps = ours.inference_timesteps(12)
    assert timesteps.dtype == torch.float64 and timesteps[0] == 999 and timesteps[-1] == 0
    sigmas = (1 / ours.alpha_bar(timesteps) - 1).sqrt()
    torch.testing.assert_close(sigmas, ref.sigmas[:-1].double(), rtol=1e-6, atol=0)  # theirs: float32
    assert (timesteps - ref.timesteps).abs().max() <= 1  # theirs: made integers


def test_heun_makes_two_calls_per_step_but_the_last():
    model = LinearToy()
    sample(model, NoiseScheduler(), SHAPE, sampler="heun", steps=6, progress=False)
    assert len(model.calls) == 11 == network_calls(SAMPLERS["heun"], 6)


@pytest.mark.parametrize(
    ("sampler", "steps", "calls", "used"),
    [("heun", None, 20, (10, 19)), ("heun", 10, None, (10, 19)), ("heun", None, 1, (1, 1))]
    + [("euler", None, 20, (20, 20)), ("dpm++", 7, None, (7, 7)), ("ddim", None, None, (50, 50))],
)
def test_sampling_budget_in_steps_or_network_calls(sampler, steps, calls, used):
    """A call budget buys the most steps that fit; sample() then makes exactly those calls."""
    budget = sampling_budget(sampler, steps=steps, calls=calls)
    assert (budget.steps, budget.calls) == used
    assert budget.asked == ("calls" if calls is not None else "steps")
    model = LinearToy()
    sample(model, NoiseScheduler(), SHAPE, sampler=sampler, steps=steps, calls=calls, progress=False)
    assert len(model.calls) == used[1]


def test_heun_churn_adds_seeded_noise_and_zero_churn_is_deterministic():
    def run(seed, **options):
        return sample(
            LinearToy(),
            NoiseScheduler(timestep_spacing="karras"),
            noise=x_T(),
            sampler="heun",
            steps=6,
            options=options,
            generator=torch.Generator().manual_seed(seed),
            progress=False,
        )

    plain = run(0)
    assert torch.equal(plain, run(1)) and torch.equal(plain, run(0, s_churn=0.0))
    churned = run(0, s_churn=10.0, s_tmin=0.05, s_tmax=50.0)
    assert torch.equal(churned, run(0, s_churn=10.0, s_tmin=0.05, s_tmax=50.0))
    assert not torch.allclose(churned, run(1, s_churn=10.0, s_tmin=0.05, s_tmax=50.0))
    assert not torch.allclose(churned, plain)
    # a window that no noise level of the grid falls in adds no noise
    assert torch.equal(run(0, s_churn=10.0, s_tmin=1000.0, s_tmax=2000.0), plain)


def test_heun_churn_is_edm_algorithm_2():
    """Two Karras levels, sigma_max then sigma_min, and a model predicting x0 = c. At sigma_max the churned
    level is capped at sigma_max: no noise. At sigma_min, gamma = s_churn / 2: sigma_hat = 1.2 sigma_min and
    x_hat = x / sqrt(alpha_bar) + sqrt(sigma_hat^2 - sigma_min^2) s_noise z in sigma space, which the model
    sees as x_hat / sqrt(1 + sigma_hat^2) at the continuous t of sigma_hat; the Euler step to 0 returns c."""
    scheduler = NoiseScheduler(prediction_type="sample", timestep_spacing="karras")
    c, seen = 0.25, []

    def model(x, t, y):
        seen.append((x.clone(), t[0].clone()))
        return torch.full_like(x, c)

    got = sample(
        model,
        scheduler,
        noise=x_T(),
        sampler="heun",
        steps=2,
        options={"s_churn": 0.4, "s_noise": 1.5},
        generator=torch.Generator().manual_seed(4),
        progress=False,
    )
    torch.testing.assert_close(got, torch.full(SHAPE, c, dtype=torch.float64), rtol=0, atol=1e-12)
    assert [t.item() for _, t in seen[:2]] == [999, 0] and torch.equal(seen[0][0], x_T())
    x, ab = seen[1][0], scheduler.alphas_cumprod[0].item()
    sigma = ((1 - ab) / ab) ** 0.5
    sigma_hat = 1.2 * sigma
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x_hat = (x / ab**0.5 + (sigma_hat**2 - sigma**2) ** 0.5 * 1.5 * z) / (1 + sigma_hat**2) ** 0.5
    torch.testing.assert_close(seen[2][0], x_hat, rtol=0, atol=1e-12)
    t_hat = seen[2][1]
    assert t_hat.is_floating_point() and 0 < t_hat.item() < 1
    assert scheduler.alpha_bar(t_hat).item() == pytest.approx(1 / (1 + sigma_hat**2), rel=1e-12)


def test_solver_options_errors():
    kwargs = {"shape": SHAPE, "progress": False}
    with pytest.raises(
        SampleOptionError, match=r"invalid options='s_churn': expected an option of sampler 'ddim' "
    ):
        sample(LinearToy(), NoiseScheduler(), options={"s_churn": 1.0}, **kwargs)
    with pytest.raises(SampleOptionError, match=r"invalid options='eta': .*pass eta to sample\(\) itself"):
        sample(LinearToy(), NoiseScheduler(), sampler="ddim", options={"eta": 0.5}, **kwargs)
    with pytest.raises(SampleOptionError, match=r"invalid options.s_churn=-1\.0: expected a number >= 0"):
        sample(LinearToy(), NoiseScheduler(), sampler="heun", options={"s_churn": -1.0}, **kwargs)
    with pytest.raises(SampleOptionError, match=r"invalid options.s_noise='1': expected a number"):
        sample(LinearToy(), NoiseScheduler(), sampler="heun", options={"s_noise": "1"}, **kwargs)
    with pytest.raises(
        SampleOptionError, match=r"invalid options.s_tmin=2\.0: expected at most options.s_tmax"
    ):
        sample(
            LinearToy(), NoiseScheduler(), sampler="heun", options={"s_tmin": 2.0, "s_tmax": 1.0}, **kwargs
        )
    with pytest.raises(SampleOptionError, match=r"invalid calls=5: expected None when steps are given"):
        sample(LinearToy(), NoiseScheduler(), steps=5, calls=5, **kwargs)
    with pytest.raises(
        SampleOptionError, match=r"invalid calls=0: expected an integer in 1\.\.1999 \(network "
    ):
        sample(LinearToy(), NoiseScheduler(), sampler="heun", calls=0, **kwargs)


def test_convergence_order_with_the_exact_score():
    """Error against network calls on a log-log scale, Karras spacing: slope about 1 for Euler, 2 for Heun.
    The error is the Wasserstein-1 distance between the pixels of a run and of a 600-call Heun reference from
    the same x_T (sorted values; the sampling noise of the data cancels), so only discretisation is left."""
    scheduler = NoiseScheduler(timestep_spacing="karras")
    model, noise = exact_predictor(MIXTURE, scheduler), x_T(shape=(2, 1, 32, 32))

    def pixels(name, calls):
        out = sample(model, scheduler, noise=noise, sampler=name, calls=calls, progress=False)
        return out.flatten().sort().values

    reference = pixels("heun", 600)
    for name, order in (("euler", 1), ("heun", 2)):
        calls = [32, 64, 128]
        errors = [(pixels(name, c) - reference).abs().mean().item() for c in calls]
        slope = -math.log(errors[-1] / errors[0]) / math.log(calls[-1] / calls[0])
        assert order - 0.3 < slope < order + 0.5, (name, errors)


# --- closed forms -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_step_is_the_gaussian_posterior(variance):
    """x_s drawn by the sampler == mean + std * z with the posterior of q(x_s | x_t, x0) derived here by
    Gaussian conditioning (x_s ~ N(sqrt(ab_s) x0, 1 - ab_s), x_t = sqrt(ab_t / ab_s) x_s + N(0, beta))."""
    scheduler = NoiseScheduler(prediction_type="sample", variance_type=variance)
    x0_pred = torch.linspace(-1, 1, 32, dtype=torch.float64).reshape(2, 1, 4, 4)
    calls = []

    def model(x, t, y):
        calls.append(x.clone())
        return x0_pred

    noise = x_T(shape=(2, 1, 4, 4))
    sample(
        model,
        scheduler,
        noise=noise,
        sampler="ddpm",
        steps=4,
        progress=False,
        generator=torch.Generator().manual_seed(5),
    )
    t, s = scheduler.inference_timesteps(4)[:2].tolist()
    ab_t, ab_s = scheduler.alphas_cumprod[t].item(), scheduler.alphas_cumprod[s].item()
    alpha, beta = ab_t / ab_s, 1 - ab_t / ab_s
    precision = 1 / (1 - ab_s) + alpha / beta
    mean = (ab_s**0.5 * x0_pred / (1 - ab_s) + alpha**0.5 * noise / beta) / precision
    std = (1 / precision) ** 0.5 if variance == "fixed_small" else beta**0.5
    z = torch.randn(noise.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(calls[1], mean + std * z, rtol=0, atol=1e-12)
    got_mean, var_small, got_beta = posterior(x0_pred, noise, ab_t, ab_s)
    torch.testing.assert_close(got_mean, mean, rtol=0, atol=1e-12)
    assert var_small == pytest.approx(1 / precision, rel=1e-12) and got_beta == pytest.approx(beta, rel=1e-12)


def test_ddim_with_eta_one_is_ddpm_with_fixed_small_variance():
    kwargs = {"noise": x_T(), "steps": 10, "progress": False}
    ddim = sample(
        LinearToy(),
        NoiseScheduler(),
        sampler="ddim",
        eta=1.0,
        **kwargs,
        generator=torch.Generator().manual_seed(0),
    )
    ddpm = sample(
        LinearToy(),
        NoiseScheduler(),
        sampler="ddpm",
        **kwargs,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_final_step_returns_the_predicted_x0(name):
    """alpha_bar = 1 after the last timestep: a model that always predicts x0 = c gives exactly c."""
    c = torch.full(SHAPE, 0.25, dtype=torch.float64)
    got = sample(
        lambda x, t, y: c,
        NoiseScheduler(prediction_type="sample"),
        noise=x_T(),
        sampler=name,
        steps=5,
        progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(got, c, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_model_sees_every_timestep_of_the_list_as_a_long_batch(name):
    """One call per timestep; Heun's correction calls the next timestep again (as HeunDiscreteScheduler's
    repeated timesteps), none after the last."""
    scheduler = NoiseScheduler(timestep_spacing="linspace")
    model = LinearToy()
    sample(model, scheduler, SHAPE, sampler=name, steps=7, progress=False)
    seen = torch.stack([t for _, t, _ in model.calls])  # (calls, N)
    calls = network_calls(SAMPLERS[name], 7)
    assert seen.dtype == torch.long and seen.shape == (calls, SHAPE[0])
    expected = scheduler.inference_timesteps(7, drop_last=SAMPLERS[name] in DROP_LAST)
    if name == "heun":
        expected = torch.cat([expected[:1], expected[1:].repeat_interleave(2)])
    assert torch.equal(seen[:, 0], expected) and torch.equal(seen[:, 0], seen[:, 1])


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_every_sampler_takes_the_continuous_timesteps_of_the_sigma_spacings(name):
    """ "karras": float timesteps reach the model as they are (no rounding), and every sampler, DDPM and DDIM
    included, steps between their noise levels and returns the predicted x0 on its last step."""
    scheduler = NoiseScheduler(prediction_type="sample", timestep_spacing="karras")
    seen, c = [], torch.full(SHAPE, 0.25, dtype=torch.float64)

    def model(x, t, y):
        seen.append(t[0].item())
        return c

    generator = torch.Generator().manual_seed(0)
    got = sample(model, scheduler, noise=x_T(), sampler=name, steps=5, generator=generator, progress=False)
    torch.testing.assert_close(got, c, rtol=0, atol=1e-12)
    assert sorted(set(seen), reverse=True) == scheduler.inference_timesteps(5).tolist()
    assert any(t != round(t) for t in seen)


def test_ddpm_with_all_training_steps_visits_every_timestep():
    model = LinearToy()
    sample(model, NoiseScheduler(num_train_timesteps=100), SHAPE, sampler="ddpm", steps=100, progress=False)
    assert [int(t[0]) for _, t, _ in model.calls] == list(range(99, -1, -1))


# --- zero terminal SNR and finiteness -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "variance", "eta"),
    [("ddpm", "fixed_small", 0.0), ("ddpm", "fixed_large", 0.0), ("ddim", "fixed_small", 0.0)]
    + [("ddim", "fixed_small", 1.0), ("dpm++", "fixed_small", 0.0)]
    + [(name, "fixed_small", 0.0) for name in ("euler", "heun", "euler_a")],
)
@pytest.mark.parametrize(
    "diffusion",
    [
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        {"rescale_betas_zero_snr": True, "prediction_type": "sample", "timestep_spacing": "trailing"},
        {"beta_schedule": "cosine", "timestep_spacing": "trailing"},
    ],
)
def test_sampling_stays_finite(diffusion, name, variance, eta):
    """Zero terminal SNR (alpha_bar = 0 at the first step visited), the cosine schedule's 0.999 last beta,
    every variance option (diffusers #14569: a variance option that gave NaN)."""
    scheduler = NoiseScheduler(**diffusion, variance_type=variance)
    model = LinearToy()
    got = sample(
        model,
        scheduler,
        noise=x_T(torch.float32),
        sampler=name,
        steps=8,
        eta=eta,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert int(model.calls[0][1][0]) == 999
    assert got.dtype == torch.float32 and torch.isfinite(got).all()


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_zero_terminal_snr_first_step_closed_form(name):
    """At alpha_bar_T = 0, x_T is pure noise and v = -x0: a model predicting v = -c gives x0 = c, eps = x_T,
    so the first step lands on sqrt(ab_s) c + sqrt(1 - ab_s) x_T (DDIM, DPM-Solver++ first order, Euler, and
    Heun, which cannot correct a step from sigma = inf), or on sqrt(ab_s) c + sqrt(1 - ab_s) z for the
    ancestral samplers (posterior mean sqrt(ab_s) x0, variance 1 - ab_s; Euler ancestral's sigma_up = sigma').
    """
    scheduler = NoiseScheduler(
        rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"
    )
    c, calls = 0.3, []

    def model(x, t, y):
        calls.append(x.clone())
        return torch.full_like(x, -c)

    noise = x_T()
    sample(
        model,
        scheduler,
        noise=noise,
        sampler=name,
        steps=4,
        progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    ab_s = scheduler.alphas_cumprod[scheduler.inference_timesteps(4)[1]].item()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(
        calls[1],
        ab_s**0.5 * c + (1 - ab_s) ** 0.5 * (z if name in ("ddpm", "euler_a", "dpm++2m_sde") else noise),
    )


def test_heun_churn_above_the_last_finite_sigma_shows_the_model_its_own_noise_level():
    """Zero terminal SNR, T = 10, 10 steps: the churn of step 1 raises sigma_8 = sigma_{T-2} by sqrt(2), into
    (sigma_{T-2}, inf), where log sigma has no line to T-1's infinite sigma. The model must get the t in
    (T-2, T-1) whose alpha_bar is 1 / (1 + sigma_hat^2) (1 / sigma linear there: t = 9 - 1 / sqrt(2)), not
    T-2's level (sigma_to_t pinned it there) nor NaN (alpha_bar's log-sigma lerp towards +inf)."""
    scheduler = NoiseScheduler(
        num_train_timesteps=10, rescale_betas_zero_snr=True, prediction_type="v_prediction"
    )
    exact, seen = exact_predictor(MIXTURE, scheduler), []

    def model(x, t, y):
        seen.append(t[0].clone())
        return exact(x, t, y)

    got = sample(
        model,
        scheduler,
        noise=x_T(),
        sampler="heun",
        steps=10,
        options={"s_churn": 10},  # gamma = min(10 / 10, sqrt(2) - 1)
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert torch.isfinite(got).all()
    assert seen[0].item() == 9  # sigma = inf: no churn, Euler alone (one call)
    ab = scheduler.alphas_cumprod[8].item()
    sigma_hat = ((1 - ab) / ab) ** 0.5 * 2**0.5
    t_hat = seen[1]
    assert t_hat.is_floating_point() and t_hat.item() == pytest.approx(9 - 2**-0.5, rel=1e-12)
    assert scheduler.alpha_bar(t_hat).item() == pytest.approx(1 / (1 + sigma_hat**2), rel=1e-12)


# --- determinism, guidance, precision -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "eta"),
    [("ddpm", 0.0), ("ddim", 0.5), ("dpm++", 0.0), ("euler", 0.0), ("heun", 0.0), ("euler_a", 0.0)],
)
def test_deterministic_under_a_fixed_generator(name, eta):
    def run(seed):
        return sample(
            LinearToy(),
            NoiseScheduler(),
            SHAPE,
            sampler=name,
            steps=6,
            eta=eta,
            progress=False,
            generator=torch.Generator().manual_seed(seed),
        )

    first = run(0)
    assert first.shape == SHAPE and first.dtype == torch.float32
    assert torch.equal(first, run(0))
    assert not torch.allclose(first, run(1))


class LabelToy(nn.Module):
    """Predicts x0 = the label value everywhere ("sample" prediction); counts calls and batch sizes."""

    def __init__(self, null_class: int | None = 10):
        super().__init__()
        self.null_class = null_class
        self.batches: list[tuple[int, list[int]]] = []

    def forward(self, x, t, y):
        self.batches.append((x.shape[0], y.tolist()))
        return y.to(x.dtype).view(-1, 1, 1, 1).expand_as(x)


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_classifier_free_guidance_one_batched_call_per_step(name):
    model = LabelToy(null_class=10)
    y = torch.tensor([2, 7])
    got = sample(
        model,
        NoiseScheduler(prediction_type="sample"),
        SHAPE,
        sampler=name,
        steps=5,
        y=y,
        guidance_scale=3.0,
        progress=False,
    )
    assert [n for n, _ in model.batches] == [2 * SHAPE[0]] * network_calls(SAMPLERS[name], 5)
    assert all(labels == [2, 7, 10, 10] for _, labels in model.batches)
    # out = uncond + s (cond - uncond), and the final step returns that x0
    expected = (10 + 3.0 * (y - 10)).float().view(-1, 1, 1, 1).expand(SHAPE)
    torch.testing.assert_close(got, expected)


def test_the_guidance_interval_guides_only_the_rows_whose_sigma_lies_in_it():
    # LabelToy's x0 is its label: conditional 2 and 7, unconditional the null label 10
    scheduler = NoiseScheduler(prediction_type="sample")
    y = torch.tensor([2, 7])
    t = torch.tensor([5, 900])  # one timestep per row
    alpha_bar = scheduler.alphas_cumprod[t]
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()  # sigma_5 << sigma_900
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    def x0(interval):
        denoise = denoiser(
            LabelToy(), scheduler, y=y, guidance_scale=3.0, guidance_interval=interval, null_class=10
        )
        return denoise(x, t).x0

    guided = (10 + 3.0 * (y - 10)).float().view(-1, 1, 1, 1).expand(SHAPE)
    conditional = y.float().view(-1, 1, 1, 1).expand(SHAPE)
    assert torch.equal(x0(None), guided)
    assert torch.equal(x0((0.0, math.inf)), guided)  # every sigma inside
    assert torch.equal(x0((2 * sigma[1].item(), math.inf)), conditional)  # every sigma outside: no guidance
    # Row 0's sigma inside, row 1's outside (the bounds are inside too)
    both = x0((sigma[0].item(), sigma[0].item()))
    assert torch.equal(both[0], guided[0]) and torch.equal(both[1], conditional[1])
    # Through sample(): outside the interval at every step, the conditional model alone
    unguided = sample(LabelToy(), scheduler, SHAPE, y=y, steps=4, progress=False)
    limited = sample(
        LabelToy(),
        scheduler,
        SHAPE,
        y=y,
        steps=4,
        guidance_scale=3.0,
        guidance_interval=(1e9, 1e9),
        progress=False,
    )
    assert torch.equal(limited, unguided) and torch.equal(unguided, conditional)


def test_guidance_null_label_override_and_errors():
    model = LabelToy(null_class=None)
    scheduler = NoiseScheduler(prediction_type="sample")
    y = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="needs a null label"):
        sample(model, scheduler, SHAPE, y=y, guidance_scale=2.0, progress=False)
    sample(model, scheduler, SHAPE, y=y, guidance_scale=2.0, null_class=5, steps=2, progress=False)
    assert model.batches[0][1] == [1, 2, 5, 5]
    with pytest.raises(ValueError, match="needs class labels y"):
        sample(LabelToy(), scheduler, SHAPE, guidance_scale=2.0, progress=False)
    unguided = LabelToy()
    sample(unguided, scheduler, SHAPE, y=y, steps=3, progress=False)
    assert [n for n, _ in unguided.batches] == [SHAPE[0]] * 3


class Bf16Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5, dtype=torch.bfloat16))
        self.input_dtypes: list[torch.dtype] = []

    def forward(self, x, t, y):
        self.input_dtypes.append(x.dtype)
        return x * self.scale


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_bf16_model_gets_bf16_inputs_and_sampling_stays_float32(name):
    model = Bf16Toy()
    got = sample(
        model,
        NoiseScheduler(),
        SHAPE,
        sampler=name,
        steps=3,
        progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert model.input_dtypes == [torch.bfloat16] * network_calls(SAMPLERS[name], 3)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()


def test_clip_sample_applies_to_the_returned_x0():
    got = sample(
        lambda x, t, y: torch.full_like(x, 5.0),
        NoiseScheduler(prediction_type="sample", clip_sample=True),
        SHAPE,
        steps=3,
        progress=False,
    )
    assert torch.equal(got, torch.ones(SHAPE))


def test_progress_bar_can_be_turned_off(capsys):
    sample(LinearToy(), NoiseScheduler(), SHAPE, steps=3, progress=True)
    assert "3/3" in capsys.readouterr().err
    sample(LinearToy(), NoiseScheduler(), SHAPE, steps=3, progress=False)
    assert capsys.readouterr().err == ""


# --- errors at the boundary ---------------------------------------------------------------------------------


def test_unknown_sampler_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"invalid sampler='plms': expected one of ddpm, ddim, dpm\+\+, "):
        sample(LinearToy(), NoiseScheduler(), SHAPE, sampler="plms")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "invalid steps=0: expected an integer in 1..num_train_timesteps=1000"),
        ({"steps": 1001}, "invalid steps=1001: expected an integer in 1..num_train_timesteps=1000"),
        ({"noise": torch.zeros(SHAPE)}, "exactly one of shape"),
        ({"shape": None}, "exactly one of shape"),
        ({"y": torch.tensor([1, 2, 3])}, r"y must have shape \(2,\)"),
        ({"eta": 1.5}, r"invalid eta=1.5: expected a number in \[0, 1\]"),
        (
            {"sampler": "ddpm", "eta": 0.5},
            "expected 0 with sampler 'ddpm' \\(eta applies only to sampler 'ddim'",
        ),
        ({"guidance_scale": -1.0}, "invalid guidance_scale=-1.0: expected a finite number >= 0"),
    ],
)
def test_invalid_arguments(kwargs, message):
    kwargs = {"shape": SHAPE, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        sample(LinearToy(), NoiseScheduler(), **kwargs)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sampler": "plms"}, r"invalid sampler='plms': expected one of ddpm, ddim, dpm\+\+"),
        ({"steps": 0}, r"invalid steps=0: expected an integer in 1\.\.num_train_timesteps=100$"),
        ({"steps": 101}, r"invalid steps=101: expected an integer in 1\.\.num_train_timesteps=100$"),
        ({"steps": 2.0}, r"invalid steps=2\.0: expected an integer"),
        ({"steps": True}, r"invalid steps=True: expected an integer"),
        ({"eta": -0.1}, r"invalid eta=-0\.1: expected a number in \[0, 1\]"),
        ({"eta": 1.5}, r"invalid eta=1\.5: expected a number in \[0, 1\]"),
        ({"eta": float("nan")}, r"invalid eta=nan: expected a number in \[0, 1\]"),
        ({"sampler": "dpm++", "eta": 0.5}, r"invalid eta=0\.5: expected 0 with sampler 'dpm\+\+'"),
        ({"guidance_scale": -0.5}, r"invalid guidance_scale=-0\.5: expected a finite number >= 0"),
        ({"guidance_scale": float("inf")}, r"invalid guidance_scale=inf: expected a finite number >= 0"),
        (
            {"guidance_interval": (1.0, 0.5)},
            r"invalid guidance_interval=\(1\.0, 0\.5\): expected two noise levels sigma_lo sigma_hi with "
            r"0 <= sigma_lo <= sigma_hi \(sigma_hi may be inf\)$",
        ),
        (
            {"guidance_interval": (-1.0, 2.0)},
            r"invalid guidance_interval=\(-1\.0, 2\.0\): expected two noise",
        ),
        ({"guidance_interval": (1.0,)}, r"invalid guidance_interval=\(1\.0,\): expected two noise levels"),
        ({"guidance_interval": (0.0, math.nan)}, r"invalid guidance_interval=\(0\.0, nan\): expected two"),
        (
            {"guidance_rescale": 1.5},
            r"invalid guidance_rescale=1\.5: expected a number in \[0, 1\] \(0: plain",
        ),
        ({"guidance_rescale": -0.1}, r"invalid guidance_rescale=-0\.1: expected a number in \[0, 1\]"),
        (
            {"guidance_interval": (0.5, 2.0)},
            r"invalid guidance_interval=\(0\.5, 2\.0\): expected None without guidance \(guidance_scale=1\)$",
        ),
        (
            {"guidance_rescale": 0.7},
            r"invalid guidance_rescale=0\.7: expected 0 without guidance \(guidance_",
        ),
    ],
)
def test_check_sample_options_names_the_option_and_its_range(options, message):
    options = {"sampler": "ddim", "steps": 10, "eta": 0.0, "guidance_scale": 1.0, **options}
    with pytest.raises(SampleOptionError, match=message) as caught:
        check_sample_options(**options, num_train_timesteps=100)
    assert isinstance(caught.value, ValueError) and caught.value.option in options


def test_check_sample_options_accepts_the_bounds():
    check_sample_options(sampler="ddim", steps=100, eta=1, guidance_scale=0, num_train_timesteps=100)
    check_sample_options(sampler="dpm++", steps=1, eta=0.0, guidance_scale=7.5, num_train_timesteps=100)
    check_sample_options(sampler="ddpm", steps=5000, eta=0, guidance_scale=1.0)  # no T: steps >= 1 only
    for interval, phi in (((0, 0), 0), ((0.5, math.inf), 1), ((2.0, 2.0), 0.7)):
        check_sample_options(
            sampler="ddim", steps=1, eta=0, guidance_scale=2, guidance_interval=interval, guidance_rescale=phi
        )


def test_each_solver_gets_only_the_options_it_declares():
    """sample() hands a solver those of eta and generator its signature declares, and no other."""
    assert {name: solver_options(solver) for name, solver in SAMPLERS.items()} == {
        "ddpm": ("generator",),
        "ddim": ("eta", "generator"),
        "dpm++": (),
        "dpm++2m": (),
        "euler": (),
        "euler_a": ("generator",),
        "heun": ("s_churn", "s_tmin", "s_tmax", "s_noise", "generator"),
        "dpm++3m": (),
        "dpm++2m_sde": ("generator",),
        "unipc": (),
        "consistency": ("generator",),
    }


def test_sample_passes_a_solver_its_declared_options_and_no_other(monkeypatch):
    received = {}

    def eta_only(denoise, x, timesteps, scheduler, *, eta, disable):
        received.update(eta=eta, disable=disable, steps=len(timesteps))
        return x

    monkeypatch.setitem(SAMPLERS, "ddim", eta_only)
    x = sample(LinearToy(), NoiseScheduler(), noise=x_T(), steps=4, eta=0.5, progress=False)
    assert received == {"eta": 0.5, "disable": True, "steps": 4} and torch.equal(x, x_T())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["sample.eta=1.5"],
            r"invalid value 1\.5 for 'sample\.eta' in override 'sample\.eta=1\.5': expected a ",
        ),
        (
            ["sample.sampler=ddpm", "sample.eta=0.5"],
            r"invalid value 0\.5 for 'sample\.eta' in override 'sample\.eta=0\.5': expected 0 with sampler "
            "'ddpm'",
        ),
        (
            ["diffusion.num_train_timesteps=100", "sample.steps=200"],
            r"invalid value 200 for 'sample\.steps' .*: expected an integer in 1\.\.num_train_timesteps=100",
        ),
        (["sample.steps=1001"], r"'sample\.steps' .*: expected an integer in 1\.\.num_train_timesteps=1000"),
        (["sample.steps=0"], r"'sample\.steps' .*: expected an integer in 1\.\.num_train_timesteps=1000"),
        (["sample.guidance_scale=.inf"], r"'sample\.guidance_scale' .*: expected a finite number >= 0"),
        (["sample.sampler=dmp"], r"invalid value 'dmp' for 'sample\.sampler' .*: expected one of ddpm, ddim"),
        (["sample.calls=0"], r"'sample\.calls' .*: expected an integer in 1\.\.1000 \(network calls of "),
        (
            ["sample.sampler=heun", "sample.calls=2001"],
            r"'sample\.calls' .*: expected an integer in 1\.\.1999 \(network calls of sampler 'heun'\)",
        ),
        (["sample.calls=1.5"], r"'sample\.calls' .*: expected an integer or null"),
        (
            ["sample.options={s_churn: 1}"],
            r"invalid value 's_churn' for 'sample\.options' in override .*: expected an option of sampler ",
        ),
        (
            ["sample.sampler=heun", "sample.options={s_noise: -1}"],
            r"invalid value -1 for 'sample\.options\.s_noise' in override 'sample\.options=.*: expected a ",
        ),
    ],
)
def test_config_refuses_sampling_settings_sample_would_refuse(overrides, message):
    """Checked when the config is read, by the same function as sample(): not at the first grid."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_sampling_settings_at_the_bounds_load():
    overrides = ["sample.sampler=ddim", "sample.steps=100", "sample.eta=1"]
    config = load_config(None, ["diffusion.num_train_timesteps=100", *overrides])
    assert config.sample.steps == 100 and config.sample.eta == 1.0
    overrides = ["sample.sampler=heun", "sample.calls=199", "sample.options={s_churn: 40, s_tmax: .inf}"]
    config = load_config(None, ["diffusion.num_train_timesteps=100", *overrides])
    assert config.sample.calls == 199 and config.sample.options == {"s_churn": 40, "s_tmax": math.inf}


@pytest.mark.parametrize("name", ["digits", "cifar10", "folder"])
def test_default_sampling_of_the_configs_beats_50_ddim_steps_with_trailing_spacing(name, tmp_path):
    """BENCHMARKS.md section 5's choice: a config's sample settings on its schedule (spacing included) have a
    lower exact-score error (W1 of 16,384 pixels to the mixture, same x_T) than the previous default, 50 DDIM
    steps on the same schedule with "trailing" spacing, for at most half its network calls; SampleConfig's
    defaults are the configs'."""
    root = ["data.root=" + str(tmp_path)] if name == "folder" else []  # folder.yaml requires one
    config = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml", root)
    settings = config.sample
    assert (settings.sampler, settings.steps) == (SampleConfig.sampler, SampleConfig.steps)
    assert sampling_budget(settings.sampler, steps=settings.steps, calls=settings.calls).calls <= 25
    noise = x_T(shape=(16, 1, 32, 32))

    def error(scheduler, sampler, steps):
        model = exact_predictor(MIXTURE, scheduler)
        out = sample(model, scheduler, noise=noise, sampler=sampler, steps=steps, progress=False)
        return wasserstein1(out, MIXTURE)

    ours = error(NoiseScheduler(**config.diffusion), settings.sampler, settings.steps)
    trailing = NoiseScheduler(**{**config.diffusion, "timestep_spacing": "trailing"})
    assert ours < error(trailing, "ddim", 50)


class ClassToy(nn.Module):
    """A class-conditional toy like UNet: labels 0..num_classes - 1 and the null label num_classes."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = self.null_class = num_classes
        self.calls = 0

    def forward(self, x, t, y):
        self.calls += 1
        return torch.zeros_like(x)


@pytest.mark.parametrize(
    ("labels", "kwargs", "bad"),
    [
        ([3, 11], {}, r"\[11\]"),
        ([-1, 2], {}, r"\[-1\]"),
        ([1, 2], {"guidance_scale": 2.0, "null_class": 12}, r"\[12\]"),
    ],
)
def test_labels_are_checked_against_num_classes_before_any_network_call(labels, kwargs, bad):
    model = ClassToy(num_classes=10)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes\] = \[0, 10\] .*got " + bad):
        sample(model, NoiseScheduler(), SHAPE, y=torch.tensor(labels), steps=2, progress=False, **kwargs)
    assert model.calls == 0


def test_labels_up_to_the_null_label_are_accepted():
    model = ClassToy(num_classes=10)
    sample(
        model, NoiseScheduler(), SHAPE, y=torch.tensor([0, 10]), steps=2, guidance_scale=3.0, progress=False
    )
    assert model.calls == 2


def test_the_denoiser_makes_the_timesteps_on_the_model_device_without_copying_them(monkeypatch):
    # The solvers read their timesteps from a CPU grid; copying one to a GPU at every network call (and the
    # schedule's table with it) would wait for the device each time. "meta" stands for the GPU here.
    seen = []

    def model(x, t, y):
        seen.append(t)
        return torch.zeros_like(x)

    denoise = denoiser(model, NoiseScheduler(), dtype=torch.float32)
    x = torch.zeros(3, 1, 4, 4, device="meta")
    timesteps = (torch.tensor(999), torch.tensor(0.5, dtype=torch.float64))
    for t in timesteps:  # the first calls convert the schedule's tables, once (test_schedule)
        denoise(x, t)
    copies, real_to = [], torch.Tensor.to

    def to(self, *args, **kwargs):
        moved = real_to(self, *args, **kwargs)
        if moved.device != self.device:
            copies.append(self)
        return moved

    monkeypatch.setattr(torch.Tensor, "to", to)
    for t in timesteps:
        x0, eps = denoise(x, t)
        assert x0.device.type == eps.device.type == "meta"
        assert seen[-1].device.type == "meta" and seen[-1].shape == (3,) and seen[-1].dtype == t.dtype
    assert copies == []
