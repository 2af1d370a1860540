"""Sample quality with an exact denoiser (ddpm/exact_score.py): the distance of the samples to the data
distribution, for our samplers and diffusers' with the same network calls. Only discretisation error remains,
so these compare the solvers themselves."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

from ddpm.exact_score import MIXTURE, GaussianMixture, exact_predictor, wasserstein1
from ddpm.samplers import sample
from ddpm.schedule import NoiseScheduler

PIXELS = (8, 1, 32, 32)  # 8,192 independent draws: W1 sampling noise ~5e-3, below the solver errors here
SPACINGS = ("leading", "trailing", "linspace")


def x_T(shape=PIXELS) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def ours_dpmpp(scheduler: NoiseScheduler, steps: int) -> float:
    model = exact_predictor(MIXTURE, scheduler)
    return wasserstein1(
        sample(model, scheduler, noise=x_T(), sampler="dpm++", steps=steps, progress=False), MIXTURE
    )


def diffusers_dpmpp(spacing: str, steps: int) -> float:
    """DPMSolverMultistepScheduler as shipped (DPM-Solver++(2M), its own grid for `spacing`) on the same
    exact network (our float64 alpha_bar table) and the same x_T."""
    ref = DPMSolverMultistepScheduler(timestep_spacing=spacing)
    ref.set_timesteps(steps)
    model = exact_predictor(MIXTURE, NoiseScheduler())
    x = x_T()
    for t in ref.timesteps:
        x = ref.step(model(x, t), t, x).prev_sample
    return wasserstein1(x, MIXTURE)


# --- the test bed itself ------------------------------------------------------------------------------------


def test_wasserstein1_of_draws_is_the_sampling_floor_and_of_a_shift_is_the_shift():
    draws = MIXTURE.sample(PIXELS, torch.Generator().manual_seed(1))
    floor = wasserstein1(draws, MIXTURE)
    assert 0 < floor < 0.01
    assert wasserstein1(draws + 0.2, MIXTURE) == pytest.approx(0.2, abs=floor)  # W1(X + c, X) = |c|
    point = GaussianMixture(weights=(1.0,), means=(0.0,), stds=(1e-4,))
    assert wasserstein1(torch.tensor([-1.0, 1.0, 3.0]), point) == pytest.approx(5 / 3, abs=1e-4)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_exact_predictors_agree_across_prediction_types(prediction_type):
    """Each prediction type's exact output converts to the same (x0, eps), so sampling is identical."""
    runs = {}
    for kind in ("epsilon", prediction_type):
        scheduler = NoiseScheduler(prediction_type=kind, timestep_spacing="trailing")
        model = exact_predictor(MIXTURE, scheduler)
        runs[kind] = sample(model, scheduler, noise=x_T((2, 1, 8, 8)), steps=8, progress=False)
    torch.testing.assert_close(runs[prediction_type], runs["epsilon"], rtol=0, atol=1e-10)


def test_exact_predictor_is_the_posterior_mean():
    """E[eps | x_t] by Monte Carlo: the average noise of draws whose x_t falls in a narrow bin."""
    scheduler = NoiseScheduler()
    t = 400
    ab = scheduler.alphas_cumprod[t]
    g = torch.Generator().manual_seed(2)
    x0 = MIXTURE.sample((400_000,), g)
    eps = torch.randn(400_000, generator=g, dtype=torch.float64)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    model = exact_predictor(MIXTURE, scheduler)
    for centre in (-0.5, 0.0, 0.4):
        in_bin = (x_t - centre).abs() < 0.01
        predicted = model(torch.tensor([[centre]], dtype=torch.float64), torch.tensor([t]))
        assert eps[in_bin].mean().item() == pytest.approx(predicted.item(), abs=0.03)


def test_fractional_timesteps_interpolate_log_sigma():
    """Sigma-space solvers (diffusers' with Karras sigmas, k-diffusion's) call the model at fractional t: the
    noise level there is log sigma interpolated linearly between the two integer timesteps."""
    ab = NoiseScheduler().alphas_cumprod
    model = exact_predictor(MIXTURE, NoiseScheduler())
    x = torch.linspace(-1.5, 1.5, 7, dtype=torch.float64).reshape(7, 1)
    sigma = ((1 - ab) / ab).sqrt()
    sigma_t = sigma[400] ** 0.75 * sigma[401] ** 0.25  # t = 400.25: a quarter of the way in log sigma
    _, eps = MIXTURE.posterior_means(x, 1 / (1 + sigma_t**2))
    torch.testing.assert_close(model(x, torch.tensor(400.25)), eps, rtol=1e-12, atol=0)
    torch.testing.assert_close(model(x, torch.tensor(400.0)), model(x, torch.tensor(400)), rtol=1e-12, atol=0)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
def test_diffusers_karras_euler_driven_by_the_exact_predictor_reaches_the_sampling_floor():
    """The premise of bench/samplers.py for sigma-space schedulers: with many steps, diffusers' Euler on
    Karras sigmas (fractional t, inputs scaled by scale_model_input) samples the mixture."""
    shape = (4, 1, 32, 32)
    floor = wasserstein1(MIXTURE.sample(shape, torch.Generator().manual_seed(1)), MIXTURE)
    ref = EulerDiscreteScheduler(use_karras_sigmas=True)
    ref.set_timesteps(200)
    model = exact_predictor(MIXTURE, NoiseScheduler())
    x = x_T(shape) * ref.init_noise_sigma
    for t in ref.timesteps:
        x = ref.step(model(ref.scale_model_input(x, t), t), t, x).prev_sample
    assert wasserstein1(x, MIXTURE) < 2 * floor


def test_many_steps_reach_the_sampling_floor():
    """Nothing but discretisation error: 300 DPM-Solver++ steps land within 2x of exact draws' W1."""
    shape = (4, 1, 32, 32)
    floor = wasserstein1(MIXTURE.sample(shape, torch.Generator().manual_seed(1)), MIXTURE)
    scheduler = NoiseScheduler(timestep_spacing="trailing")
    model = exact_predictor(MIXTURE, scheduler)
    x = sample(model, scheduler, noise=x_T(shape), sampler="dpm++", steps=300, progress=False)
    assert wasserstein1(x, MIXTURE) < 2 * floor


# --- DPM-Solver++ against diffusers' ----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
def test_default_dpmpp_is_as_good_as_diffusers_trailing():
    """The defaults give the best quality per network call: 10 steps of NoiseScheduler() err no more than
    diffusers' DPM-Solver++ with timestep_spacing="trailing" (Lin et al. 2024)."""
    assert ours_dpmpp(NoiseScheduler(), 10) <= 1.01 * diffusers_dpmpp("trailing", 10)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_dpmpp_is_as_good_as_diffusers_for_every_spacing(spacing, steps):
    ours = ours_dpmpp(NoiseScheduler(timestep_spacing=spacing), steps)
    assert ours <= 1.01 * diffusers_dpmpp(spacing, steps)
