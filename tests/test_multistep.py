"""The multistep solvers (ddpm/samplers/multistep.py): trajectories against diffusers'
DPMSolverMultistepScheduler and UniPCMultistepScheduler on the same timesteps, the order of each step, zero
terminal SNR, determinism, and sample quality with the exact score (tests/exact_score.py).

The solvers are called directly with `denoise` built as `sample()` builds it without guidance; the toy model
is test_samplers' LinearToy (a fixed linear map of x plus a function of t, float64).
"""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from test_samplers import LinearToy, run_diffusers, x_T

from ddpm.exact_score import MIXTURE, exact_predictor, wasserstein1
from ddpm.samplers.multistep import dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, step_order, unipc
from ddpm.schedule import NoiseScheduler

# our solver -> diffusers' scheduler of the same maths, as shipped but for the options named
REFERENCES = {
    dpmpp_2m: (DPMSolverMultistepScheduler, {}),
    dpmpp_3m: (DPMSolverMultistepScheduler, {"solver_order": 3}),
    dpmpp_2m_sde: (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    unipc: (UniPCMultistepScheduler, {}),
}
ODE_SOLVERS = (dpmpp_2m, dpmpp_3m, unipc)
ALL_SOLVERS = (*ODE_SOLVERS, dpmpp_2m_sde)


def denoiser(model, scheduler: NoiseScheduler):
    """denoise(x_t, t) -> (x0, eps): the model on a batch of t, then the scheduler's conversion."""

    def denoise(x, t):
        t_batch = t.repeat(x.shape[0])
        return scheduler.predict_x0_and_eps(model(x, t_batch), x, t_batch)

    return denoise


def run(solver, model, scheduler: NoiseScheduler, x, steps: int, seed: int = 3) -> torch.Tensor:
    """`solver` on the DPM grid (`inference_timesteps(steps, drop_last=True)`); a generator of `seed` for the
    stochastic one."""
    timesteps = scheduler.inference_timesteps(steps, drop_last=True)
    options = {"generator": torch.Generator().manual_seed(seed)} if solver is dpmpp_2m_sde else {}
    return solver(denoiser(model, scheduler), x, timesteps, scheduler, **options, disable=True)


def reference(solver, steps: int, **config):
    cls, options = REFERENCES[solver]
    ref = cls(**options, **config)
    ref.set_timesteps(steps)
    return ref


# --- agreement with diffusers -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
# each spacing, and step counts on both sides of 15, below which diffusers lowers the order of the last steps
@pytest.mark.parametrize(
    ("spacing", "steps"), [("leading", 14), ("linspace", 15), ("trailing", 5), ("trailing", 25)]
)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("solver", ODE_SOLVERS, ids=lambda s: s.__name__)
def test_ode_solvers_match_diffusers(solver, prediction_type, spacing, steps):
    """diffusers as shipped (float32 sigmas and, for DPM-Solver, a float32 x inside `step`) with its own
    timesteps for each spacing: the same network calls and the same x0 to float32 accuracy."""
    ref = reference(solver, steps, prediction_type=prediction_type, timestep_spacing=spacing)
    expected = run_diffusers(ref, LinearToy(), x_T())
    scheduler = NoiseScheduler(prediction_type=prediction_type, timestep_spacing=spacing)
    model = LinearToy()
    got = run(solver, model, scheduler, x_T(), steps)
    assert [int(t[0]) for _, t, _ in model.calls] == ref.timesteps.tolist()  # one call per step, same t
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize(("spacing", "steps"), [("leading", 10), ("linspace", 25), ("trailing", 14)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_2m_sde_matches_diffusers_with_the_same_noise(prediction_type, spacing, steps):
    """In float32 both draw one standard normal of x's shape per step, in order, from the same generator
    (diffusers' randn_tensor on the CPU is torch.randn), so the trajectories agree to float32 rounding."""
    ref = reference(dpmpp_2m_sde, steps, prediction_type=prediction_type, timestep_spacing=spacing)
    expected = run_diffusers(ref, LinearToy(), x_T(torch.float32), generator=torch.Generator().manual_seed(3))
    scheduler = NoiseScheduler(prediction_type=prediction_type, timestep_spacing=spacing)
    got = run(dpmpp_2m_sde, LinearToy(), scheduler, x_T(torch.float32), steps, seed=3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    other_seed = run(dpmpp_2m_sde, LinearToy(), scheduler, x_T(torch.float32), steps, seed=4)
    assert (other_seed - expected).abs().max() > 1e-2  # the noise matters: the agreement is not vacuous


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("solver", ODE_SOLVERS, ids=lambda s: s.__name__)
def test_ode_solvers_match_diffusers_in_float64(solver, steps):
    """diffusers given our float64 alpha_bar table and sigmas, and (DPM-Solver) our float64 x in its update
    functions in place of the float32 copy its `step` makes: its own order choices and history, our numbers
    to rounding."""
    scheduler = NoiseScheduler(timestep_spacing="leading")
    ref = reference(solver, steps, timestep_spacing="leading")
    ab = scheduler.alphas_cumprod[ref.timesteps]
    ref.sigmas = torch.cat([((1 - ab) / ab).sqrt(), torch.zeros(1, dtype=torch.float64)])
    ref.alphas_cumprod = scheduler.alphas_cumprod.clone()
    current = {}
    if isinstance(ref, DPMSolverMultistepScheduler):
        for name in ("dpm_solver_first_order_update", "multistep_dpm_solver_second_order_update"):
            setattr(ref, name, _with_sample(getattr(ref, name), current))
        name = "multistep_dpm_solver_third_order_update"
        setattr(ref, name, _with_sample(getattr(ref, name), current))
    model, x = LinearToy(), x_T()
    for t in ref.timesteps:
        current["x"] = x
        x = ref.step(model(x, t.repeat(x.shape[0])), t, x).prev_sample
    got = run(solver, LinearToy(), scheduler, x_T(), steps)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-10)


def _with_sample(update, current: dict):
    """diffusers' update function called with sample=current["x"] instead of the sample it is given."""
    return lambda *args, **kwargs: update(*args, **{**kwargs, "sample": current["x"]})


# --- the order of each step ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "order", "below", "expected"),
    [
        (10, 3, 15, [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]),  # warm-up, then lower order on the last two steps
        (15, 3, 15, [1, 2] + [3] * 12 + [1]),  # 15 steps: only the final step to alpha_bar = 1 is lowered
        (6, 2, 15, [1, 2, 2, 2, 2, 1]),  # order 2: the rule changes nothing but the final step
        (20, 2, float("inf"), [1] + [2] * 18 + [1]),  # UniPC: lower_order_final at every step count
        (1, 3, 15, [1]),
        (2, 3, 15, [1, 1]),
    ],
)
def test_step_order_is_diffusers_rule(steps, order, below, expected):
    got = [step_order(i, steps, order, lower_order_final_below=below) for i in range(steps)]
    assert got == expected


# --- closed forms, zero terminal SNR, determinism -----------------------------------------------------------


@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=lambda s: s.__name__)
def test_final_step_returns_the_predicted_x0(solver):
    """alpha_bar = 1 after the last timestep: a model that always predicts x0 = c gives exactly c."""
    c = torch.full(x_T().shape, 0.25, dtype=torch.float64)
    got = run(solver, lambda x, t, y=None: c, NoiseScheduler(prediction_type="sample"), x_T(), 5)
    torch.testing.assert_close(got, c, rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [3, 8])
@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=lambda s: s.__name__)
def test_zero_terminal_snr_is_finite_and_its_first_step_is_closed_form(solver, steps):
    """At alpha_bar = 0 (lambda = -inf), x_T is pure noise and v = -x0: a model predicting v gives x0 = -v and
    eps = x_T, so the first (first-order) step lands on sqrt(ab_s) x0 + sqrt(1 - ab_s) x_T for the ODE
    solvers (for the SDE, e^{-h} = 0 there: sqrt(ab_s) x0 + sqrt(1 - ab_s) z). The infinite log-SNR gaps zero
    the higher-order terms that reach back to x_T, rather than making them NaN."""
    scheduler = NoiseScheduler(
        rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"
    )
    c, calls = 0.3, []

    def model(x, t, y=None):
        calls.append(x.clone())
        return torch.full_like(x, -c) + 0.1 * torch.sin(3 * x)  # not constant: the higher orders act

    noise = x_T()
    got = run(solver, model, scheduler, noise, steps, seed=0)
    assert torch.isfinite(got).all()
    ab_s = scheduler.alphas_cumprod[scheduler.inference_timesteps(steps)[1]].item()
    if solver is dpmpp_2m_sde:
        noise = torch.randn(noise.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = c - 0.1 * torch.sin(3 * x_T())  # x0 = -v at alpha_bar = 0
    torch.testing.assert_close(calls[1], ab_s**0.5 * x0 + (1 - ab_s) ** 0.5 * noise)


@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=lambda s: s.__name__)
def test_deterministic_and_dtype_preserving(solver):
    """The ODE solvers are functions of x_T; the SDE solver of x_T and the generator's seed."""
    scheduler = NoiseScheduler()
    first = run(solver, LinearToy(), scheduler, x_T(torch.float32), 6, seed=0)
    assert first.dtype == torch.float32 and torch.isfinite(first).all()
    assert torch.equal(first, run(solver, LinearToy(), scheduler, x_T(torch.float32), 6, seed=0))
    other_seed = run(solver, LinearToy(), scheduler, x_T(torch.float32), 6, seed=1)
    assert torch.equal(first, other_seed) == (solver is not dpmpp_2m_sde)


# --- sample quality with the exact score --------------------------------------------------------------------


@pytest.mark.parametrize("solver", [dpmpp_3m, unipc], ids=lambda s: s.__name__)
def test_third_order_solvers_beat_dpmpp_2m_at_ten_calls(solver):
    """With the exact denoiser only discretisation error remains: on the linear schedule at 10 network calls
    DPM-Solver++(3M) and UniPC-2 (order 3 with its corrector) land closer to the mixture than 2M."""
    scheduler = NoiseScheduler(timestep_spacing="trailing")
    model = exact_predictor(MIXTURE, scheduler)
    noise = x_T(shape=(8, 1, 32, 32))
    error = {s: wasserstein1(run(s, model, scheduler, noise, 10), MIXTURE) for s in (solver, dpmpp_2m)}
    assert error[solver] < error[dpmpp_2m]
