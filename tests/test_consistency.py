"""Consistency distillation (ddpm.samplers.consistency, ddpm.losses.consistency_distillation_losses,
ddpm.training.consistency, ddpm.distill --method consistency): the boundary-condition parameterisation and
the Karras grid against their formulas; the teacher's ODE step against closed forms and our solvers; the
loss and the multistep sampler against the exact-score mixture, whose ODE makes the ideal consistency
function known, for the discrete-time schedule and the EDM formulation; then tiny distillations of the digits
end to end (of a teacher of each formulation): files, sample.py with no flags, exact resume, refusals."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from test_distill import (
    CONDITIONED_KINDS,
    conditioned_teacher,
    distils_into_a_student_that_samples_with_its_conditions,
    exact_network,
    recorded,
    sample_py,
)

from ddpm import sample
from ddpm.data import inpaint_condition, inpaint_masks
from ddpm.distill import main as distill_main
from ddpm.edm import EDMScheduler
from ddpm.exact_score import MIXTURE, GaussianMixture, exact_predictor, wasserstein1
from ddpm.inference import generate, load_for_sampling
from ddpm.losses import PSEUDO_HUBER_C, consistency_distillation_losses
from ddpm.samplers import ddim, denoiser, heun
from ddpm.samplers.consistency import (
    SIGMA_DATA,
    boundary_coefficients,
    consistency_output,
    frame_sigma_data,
    ode_step,
    sigma_range,
)
from ddpm.schedule import NoiseScheduler
from ddpm.training.consistency import GRID_SIGMA_MAX, ConsistencySettings, start_consistency_distillation

ROOT = Path(__file__).resolve().parents[1]
SCHEDULER = NoiseScheduler(
    beta_schedule="cosine", prediction_type="v_prediction", timestep_spacing="trailing"
)
SIGMA_MIN, SIGMA_MAX = sigma_range(SCHEDULER)
EDM = EDMScheduler(timestep_spacing="trailing")  # the EDM formulation on a consistency student's grid


def sigma_of(t: torch.Tensor, scheduler: NoiseScheduler | EDMScheduler = SCHEDULER) -> torch.Tensor:
    """The samplers' sigma at t (for EDM, sigma / sigma_data)."""
    ab = scheduler.alpha_bar(t)
    return ((1 - ab) / ab).sqrt()


def at(values: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1)"""
    return values.reshape(-1, 1, 1, 1)


# ---- the parameterisation and the grid ---------------------------------------------------------------------


def test_the_boundary_coefficients_are_appendix_cs_and_pin_f_to_the_identity_at_sigma_min():
    c_skip, c_out = boundary_coefficients(torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64), 0.002, 0.5)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    torch.testing.assert_close(
        c_skip[1:], torch.tensor([0.25 / (0.998**2 + 0.25), 0.25 / (79.998**2 + 0.25)], dtype=torch.float64)
    )
    torch.testing.assert_close(
        c_out[1:], torch.tensor([0.5 * 0.998 / 1.25**0.5, 0.5 * 79.998 / 6400.25**0.5], dtype=torch.float64)
    )


def test_the_consistency_function_is_the_papers_on_the_network_read_as_edms_f():
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64)
    d = torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64)  # any network's x0 estimate
    t = torch.tensor([0.0, 3.5, 100.0, 700.0, 999.0], dtype=torch.float64)
    got = consistency_output(d, x_t, t, SCHEDULER, SIGMA_DATA)

    sigma = at(sigma_of(t))
    x = x_t * (1 + sigma**2).sqrt()  # x_sigma = x0 + sigma eps
    sd = SIGMA_DATA
    f_edm = (d - sd**2 / (sigma**2 + sd**2) * x) / (sigma * sd / (sigma**2 + sd**2).sqrt())  # Karras Eq. 7
    c_skip, c_out = (at(c) for c in boundary_coefficients(sigma.flatten(), SIGMA_MIN, sd))
    torch.testing.assert_close(got, c_skip * x + c_out * f_edm, rtol=1e-9, atol=1e-9)
    # at sigma_min (t = 0) the identity on x_sigma, whatever the network says
    torch.testing.assert_close(got[0], x[0], rtol=0, atol=1e-12)


def karras(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_max ** (1 / 7) + ramp * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7  # Eq. 5


def test_the_grid_is_sigma_max_then_the_karras_grid_from_80_down_when_the_schedule_reaches_above_80():
    assert SIGMA_MAX > 2e4
    sigmas = sigma_of(ConsistencySettings(calls=1, sigmas=18).timesteps(SCHEDULER))
    assert sigmas.shape == (18,)
    assert sigmas[0].item() == pytest.approx(SIGMA_MAX, rel=1e-9)
    torch.testing.assert_close(sigmas[1:], karras(17, SIGMA_MIN, GRID_SIGMA_MAX), rtol=1e-9, atol=0)


def test_the_grid_spans_a_schedule_below_80_evenly_in_sigma_to_the_one_seventh():
    low = NoiseScheduler(num_train_timesteps=100, prediction_type="v_prediction")  # linear: sigma_max 1.3
    sigma_min, sigma_max = sigma_range(low)
    assert sigma_max < GRID_SIGMA_MAX
    t = ConsistencySettings(calls=1, sigmas=18).timesteps(low)
    ab = low.alpha_bar(t)
    torch.testing.assert_close(((1 - ab) / ab).sqrt(), karras(18, sigma_min, sigma_max), rtol=1e-9, atol=0)


# ---- the teacher's ODE step --------------------------------------------------------------------------------

GAUSSIAN = GaussianMixture(weights=(1.0,), means=(0.3,), stds=(0.4,))


def test_the_euler_step_on_a_gaussian_is_its_closed_form_and_heun_is_closer_to_the_exact_flow():
    # data N(mu, s^2): D = mu + s^2 (x - mu) / (s^2 + sigma^2), and the ODE's flow from sigma to sigma' is
    # x' = mu + (x - mu) sqrt(s^2 + sigma'^2) / sqrt(s^2 + sigma^2) (in x_sigma = x0 + sigma eps)
    teacher = denoiser(exact_predictor(GAUSSIAN, SCHEDULER), SCHEDULER, dtype=torch.float64)
    mu, s = 0.3, 0.4
    x_t = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = SCHEDULER.sigma_to_t(torch.tensor([50.0, 5.0, 1.0, 0.1], dtype=torch.float64))
    t_next = SCHEDULER.sigma_to_t(torch.tensor([45.0, 4.5, 0.9, 0.09], dtype=torch.float64))
    sigma, sigma_next = at(sigma_of(t)), at(sigma_of(t_next))
    x = x_t * (1 + sigma**2).sqrt()

    def in_vp(x_sigma):
        return x_sigma / (1 + sigma_next**2).sqrt()

    euler = ode_step(teacher, x_t, t, t_next, SCHEDULER, solver="euler")
    closed = mu + (x - mu) * (s**2 + sigma * sigma_next) / (s**2 + sigma**2)
    torch.testing.assert_close(euler, in_vp(closed), rtol=1e-9, atol=1e-9)

    exact = in_vp(mu + (x - mu) * ((s**2 + sigma_next**2) / (s**2 + sigma**2)).sqrt())
    heun_step = ode_step(teacher, x_t, t, t_next, SCHEDULER, solver="heun")
    assert ((heun_step - exact).abs() < 0.2 * (euler - exact).abs() + 1e-12).all()


def test_heun_takes_eulers_step_across_more_than_10x_in_sigma_where_it_is_closer_to_the_flow():
    teacher = denoiser(exact_predictor(GAUSSIAN, SCHEDULER), SCHEDULER, dtype=torch.float64)
    mu, s = 0.3, 0.4
    x_t = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma_pair = torch.tensor([[2e4, 80.0], [700.0, 80.0]], dtype=torch.float64)  # 250x and 8.75x
    t, t_next = SCHEDULER.sigma_to_t(sigma_pair).unbind(1)
    sigma, sigma_next = at(sigma_pair[:, 0]), at(sigma_pair[:, 1])
    exact = mu + (x_t * (1 + sigma**2).sqrt() - mu) * ((s**2 + sigma_next**2) / (s**2 + sigma**2)).sqrt()
    exact = exact / (1 + sigma_next**2).sqrt()
    euler = ode_step(teacher, x_t, t, t_next, SCHEDULER, solver="euler")
    heun_step = ode_step(teacher, x_t, t, t_next, SCHEDULER, solver="heun")
    torch.testing.assert_close(heun_step[0], euler[0], rtol=0, atol=0)
    assert (heun_step[1] != euler[1]).all()
    # Karras' trapezoid on row 0, in x_sigma, against Euler's step there
    x_sigma, x_euler = x_t[0] * (1 + sigma[0] ** 2).sqrt(), euler[0] * (1 + sigma_next[0] ** 2).sqrt()
    eps, eps_next = (x_sigma - teacher(x_t, t).x0[0]) / sigma[0], teacher(euler, t_next).eps[0]
    trapezoid = x_euler + (sigma_next[0] - sigma[0]) / 2 * (eps_next - eps)
    exact_sigma = exact[0] * (1 + sigma_next[0] ** 2).sqrt()
    assert (x_euler - exact_sigma).abs().max() < (trapezoid - exact_sigma).abs().max() / 30


@pytest.mark.parametrize(("solver", "name"), [("heun", heun), ("euler", ddim)])
def test_the_step_is_our_solvers_step(solver, name):
    # our solver on the grid (t, t_next) steps to t_next, then returns its x0 estimate there: D(step)
    teacher = denoiser(exact_predictor(MIXTURE, SCHEDULER), SCHEDULER, dtype=torch.float64)
    x_t = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t, t_next = torch.tensor(812.25, dtype=torch.float64), torch.tensor(430.5, dtype=torch.float64)
    by_solver = name(teacher, x_t, torch.stack([t, t_next]), SCHEDULER)
    stepped = ode_step(teacher, x_t, t.repeat(3), t_next.repeat(3), SCHEDULER, solver=solver)
    torch.testing.assert_close(teacher(stepped, t_next).x0, by_solver, rtol=0, atol=1e-12)


# ---- the loss and the sampler on the exact-score mixture ---------------------------------------------------


def exact_teacher(scheduler: NoiseScheduler | EDMScheduler):
    """The exact denoiser of MIXTURE's data under `scheduler` (x0 in the samplers' frame)."""
    return denoiser(exact_network(scheduler), scheduler, dtype=torch.float64)


# the discrete-time schedule, and EDM's, whose samplers' frame is the data over sigma_data = 0.5
FORMULATIONS = pytest.mark.parametrize("scheduler", [SCHEDULER, EDM], ids=["ddpm", "edm"])


def ideal_consistency(
    x_t: torch.Tensor, t: torch.Tensor, scheduler: NoiseScheduler | EDMScheduler, steps: int = 100
) -> torch.Tensor:
    """The exact ODE's end at sigma_min from each row's (x_t, t), in x_sigma (of the samplers' frame):
    `steps` Heun steps of the exact teacher, geometric in sigma."""
    teacher, (sigma_min, _) = exact_teacher(scheduler), sigma_range(scheduler)
    ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    log_sigmas = sigma_of(t, scheduler).log()[:, None] * (1 - ramp) + math.log(sigma_min) * ramp
    grid = scheduler.sigma_to_t(log_sigmas.exp())  # (N, steps + 1)
    x = x_t
    for k in range(steps):
        x = ode_step(teacher, x, grid[:, k], grid[:, k + 1], scheduler, solver="heun")
    return x * (1 + sigma_min**2) ** 0.5


def network_of(consistency_function, scheduler: NoiseScheduler | EDMScheduler, delta: float = 0.0):
    """The network (v-prediction, or EDM's F = -v in the samplers' frame) whose consistency function
    (`consistency_output`) is consistency_function(x_t, t, scheduler) + delta, delta in data units: f =
    A x_t + r D is solved for D (at sigma_min, where r = 0, any D: the teacher's)."""
    teacher, sigma_data = exact_teacher(scheduler), frame_sigma_data(scheduler)

    def model(x_t, t, y=None):
        t = t.expand(x_t.shape[0])
        zero = consistency_output(torch.zeros_like(x_t), x_t, t, scheduler, sigma_data)
        r = consistency_output(torch.ones_like(x_t), x_t, t, scheduler, sigma_data) - zero
        wanted = consistency_function(x_t, t, scheduler) + delta / scheduler.data_scale
        d = torch.where(r > 0, (wanted - zero) / r.clamp(min=1e-300), teacher(x_t, t).x0)
        ab = at(scheduler.alpha_bar(t))
        eps = (x_t - ab.sqrt() * d) / (1 - ab).sqrt()
        v = ab.sqrt() * eps - (1 - ab).sqrt() * d
        return -v if scheduler.prediction_type == "edm" else v

    return model


@FORMULATIONS
def test_the_ideal_consistency_function_has_near_zero_loss_and_a_shifted_one_its_pseudo_huber_distance(
    scheduler,
):
    g = torch.Generator().manual_seed(3)
    x0 = MIXTURE.sample((16, 1, 4, 4), g)
    noise = torch.randn(16, 1, 4, 4, generator=g, dtype=torch.float64)
    # a fine grid, where one Heun step of the teacher is accurate (at N = 18 a step spans up to a factor of
    # 12 in sigma, across modes of width 0.05: its error, not the function's, then dominates the loss)
    timesteps = ConsistencySettings(calls=1, sigmas=400).timesteps(scheduler)
    # pairs from the second level to sigma_min's: the discrete schedule's first pair spans its sigma_max (2e4)
    # and GRID_SIGMA_MAX (80), where the ideal's own 100 steps err more (below; Karras' trapezoid there, in
    # place of Euler's step, doubles it: test_heun_takes_eulers_step_across_more_than_10x_in_sigma...)
    index = torch.linspace(1, 398, 16).round().long()
    ideal, teacher = network_of(ideal_consistency, scheduler), exact_teacher(scheduler)

    losses = consistency_distillation_losses(ideal, ideal, teacher, scheduler, x0, noise, index, timesteps)
    assert losses.abs().max() < 1e-4, losses  # the errors of one Heun step and of the 100 of the ideal
    top = torch.zeros_like(index)
    top_losses = consistency_distillation_losses(ideal, ideal, teacher, scheduler, x0, noise, top, timesteps)
    assert top_losses.abs().max() < (5e-3 if scheduler is SCHEDULER else 1e-4), top_losses

    c = PSEUDO_HUBER_C * 16**0.5
    shifted = consistency_distillation_losses(
        network_of(ideal_consistency, scheduler, 0.05), ideal, teacher, scheduler, x0, noise, index, timesteps
    )
    expected = torch.full((16,), (16 * 0.05**2 + c**2) ** 0.5 - c, dtype=torch.float64)
    torch.testing.assert_close(shifted, expected, rtol=1e-3, atol=1e-5)
    # and the teacher's own network, read as a consistency function, is far from consistent (at this fine
    # grid's close pairs, by 10x the ideal's bound on average and up to 0.05 where the modes separate)
    as_is = exact_network(scheduler)
    assert (
        consistency_distillation_losses(as_is, as_is, teacher, scheduler, x0, noise, index, timesteps).mean()
        > 1e-3
    )


def test_a_learned_variances_channels_are_left_out_of_the_loss():
    learned = NoiseScheduler(
        beta_schedule="cosine", prediction_type="v_prediction", variance_type="learned_range"
    )
    g = torch.Generator().manual_seed(4)
    x0 = MIXTURE.sample((8, 1, 4, 4), g)
    noise = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    timesteps = ConsistencySettings(calls=1, sigmas=18).timesteps(learned)
    index = torch.arange(8) * 2
    teacher, network = exact_teacher(SCHEDULER), exact_network(SCHEDULER)  # the same alpha_bar

    def with_variance(x_t, t, y=None):  # the mean channels, then variance values that vary with x_t
        return torch.cat([network(x_t, t, y), x_t.tanh()], dim=1)

    mean_only = consistency_distillation_losses(
        network, network, teacher, SCHEDULER, x0, noise, index, timesteps
    )
    both = consistency_distillation_losses(
        with_variance, with_variance, teacher, learned, x0, noise, index, timesteps
    )
    assert mean_only.abs().max() > 1e-3  # not a trivial zero
    torch.testing.assert_close(both, mean_only, rtol=0, atol=0)


@FORMULATIONS
@pytest.mark.parametrize("calls", [1, 2])
def test_the_multistep_sampler_with_the_ideal_consistency_function_draws_the_mixture(scheduler, calls):
    n = 512
    noise = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model = network_of(ideal_consistency, scheduler)
    got = sample(
        model,
        scheduler,
        noise=noise,
        sampler="consistency",
        steps=calls,
        generator=torch.Generator().manual_seed(5),
        progress=False,
    )
    components = list(zip(MIXTURE.weights, MIXTURE.means, MIXTURE.stds, strict=True))
    mean = sum(w * m for w, m, _ in components)
    var = sum(w * (s**2 + m**2) for w, m, s in components) - mean**2
    floor = 0.514 / (n * 16) ** 0.5  # wasserstein1's sampling floor for MIXTURE
    assert wasserstein1(got, MIXTURE) < 3 * floor + 0.002
    assert abs(got.mean().item() - mean) < 0.02 and abs(got.var().item() - var) < 0.01


# ---- tiny distillations of the digits ----------------------------------------------------------------------

TINY = {"steps": 4, "sigmas": 8}  # a checkpoint every 4 steps (the teacher's 10, capped at steps)


def final_weights(student: Path, step: int) -> dict[str, torch.Tensor]:
    last = student / "checkpoints" / f"step-{step:07d}"
    return {
        f"{folder}.{k}": v
        for folder in (".", "ema", "target")
        for k, v in load_file(last / folder / "model.safetensors").items()
    }


def test_the_student_is_a_run_folder_that_sample_py_samples_with_the_consistency_sampler(teacher, tmp_path):
    student = tmp_path / "student"
    distill_main(
        [
            str(teacher),
            "--method",
            "consistency",
            "--calls",
            "2",
            "--steps",
            "4",
            "--sigmas",
            "8",
            "--solver",
            "euler",
            "--out",
            str(student),
        ]
    )
    loaded = load_for_sampling(student)
    assert (loaded.sampling.sampler, loaded.sampling.steps, loaded.sampling.guidance_scale) == (
        "consistency",
        2,
        1.0,
    )
    assert loaded.scheduler.config == {
        **load_for_sampling(teacher).scheduler.config,
        "timestep_spacing": "trailing",
    }
    # the teacher run's EMA weights are the teacher, and the student and its target started from them
    first = load_file(student / "teacher" / "model.safetensors")
    ema = load_file(teacher / "checkpoints" / "step-0000010" / "ema" / "model.safetensors")
    assert all(torch.equal(first[k], ema[k]) for k in ema)
    weights = final_weights(student, 4)
    assert not all(torch.equal(weights[f"target.{k}"], first[k]) for k in first)  # it followed the student
    assert not all(torch.equal(weights[f"target.{k}"], weights[f"..{k}"]) for k in first)  # with a lag

    result = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(student), "--n", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert "consistency: 2 steps, 2 network calls" in result.stderr
    assert Path(result.stdout.strip()).name == "sample-step-0000004-ema-consistency2-seed0-n4.png"


@pytest.mark.parametrize("kind", CONDITIONED_KINDS)
def test_a_teacher_conditioned_on_what_its_data_gives_distils_into_a_student_that_samples_with_it(
    tmp_path, kind, capsys
):
    consistency = ["--method", "consistency", "--steps", "2", "--sigmas", "8"]
    distils_into_a_student_that_samples_with_its_conditions(
        kind, tmp_path, consistency, "consistency: 1 steps, 1 network calls", capsys
    )


def test_the_student_the_target_and_the_guided_teacher_get_the_batchs_conditions_drawn_last(tmp_path):
    run, _ = conditioned_teacher("inpaint", tmp_path)
    distiller = start_consistency_distillation(run, tmp_path / "student", calls=1, guidance_scale=2.0, **TINY)
    student, target, teacher = [], [], []
    distiller.forward = recorded(distiller.forward, student)
    distiller.target.module = recorded(distiller.target.module, target)
    distiller.teacher = recorded(distiller.teacher, teacher)
    x0 = torch.stack([distiller.dataset[i][0] for i in range(4)])
    torch.manual_seed(7)
    distiller._loss(x0, torch.full((4,), -1))

    # The draws' order: eps, each image's pair, then the masks of inpaint's condition (the global RNG's)
    torch.manual_seed(7)
    torch.randn_like(x0), torch.randint(0, len(distiller.timesteps) - 1, (4,))
    holed = inpaint_condition(x0, inpaint_masks(4, 8))
    ((given,), (targeted,)) = student, target
    for cond in (given, targeted):
        assert cond.kinds == ("image",) and torch.equal(cond["image"], holed)
        assert not cond.is_dropped("image").any()
    assert teacher  # each teacher call (Heun's, or Euler's on the top hop) one guided call on [cond, null]
    for guided in teacher:
        assert torch.equal(guided["image"], torch.cat([holed, holed]))
        assert guided.is_dropped("image").tolist() == [False] * 4 + [True] * 4


def test_an_edm_teacher_distils_into_a_student_that_samples_at_its_calls_with_no_flags(edm_teacher, tmp_path):
    student = tmp_path / "student"
    start_consistency_distillation(edm_teacher, student, calls=2, **TINY).train()

    loaded = load_for_sampling(student)
    assert isinstance(loaded.scheduler, EDMScheduler)
    teacher_schedule = load_for_sampling(edm_teacher).scheduler.config
    assert loaded.scheduler.config == {**teacher_schedule, "timestep_spacing": "trailing"}
    assert (loaded.sampling.sampler, loaded.sampling.steps) == ("consistency", 2)
    # the grid it samples: sigma_max, then a level above sigma_min, where f would spend a call on nothing
    sigmas = loaded.scheduler.sigma(loaded.scheduler.inference_timesteps(2))
    assert sigmas[0].item() == pytest.approx(80) and 0.002 < sigmas[1].item() < 80
    images = generate(
        loaded.model, loaded.scheduler, 4, image_shape=(1, 8, 8), sampler="consistency", steps=2
    )
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    sample_py(student, "consistency: 2 steps, 2 network calls")


@pytest.fixture(scope="module")
def uninterrupted(teacher, tmp_path_factory) -> dict[str, torch.Tensor]:
    student = tmp_path_factory.mktemp("straight") / "student"
    start_consistency_distillation(teacher, student, calls=1, **TINY).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    return final_weights(student, 4)


def test_a_resumed_distillation_ends_with_the_same_weights_and_target_as_an_uninterrupted_one(
    teacher, uninterrupted, tmp_path
):
    student = tmp_path / "student"
    interrupted = start_consistency_distillation(teacher, student, calls=1, **TINY)
    interrupted.config.train.checkpoint_every = 2  # (a config is plain data) a checkpoint to resume from
    interrupted.signals.stop_requested = lambda step: step == 2  # as SIGTERM there would
    interrupted.train()
    AcceleratorState._reset_state(reset_partial_state=True)
    assert (student / "checkpoints" / "step-0000002" / "target").is_dir()
    start_consistency_distillation(teacher, student, calls=1, **TINY, resume=True).train()

    resumed = final_weights(student, 4)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stage-steps", "5"], "--stage-steps is an option of --method progressive, not of consistency"),
        (["--calls", "0"], "--calls 0: expected an integer in 1..num_train_timesteps=1000"),
        (["--sigmas", "1"], "--sigmas 1: expected an integer >= 2"),
        (["--steps", "0"], "--steps 0: expected a positive integer"),
        (["--target-ema", "1"], "--target-ema 1.0: expected a number in [0, 1)"),
        (["--solver", "rk4"], "--solver rk4: expected one of heun, euler"),
    ],
)
def test_bad_settings_are_refused_with_one_line(teacher, tmp_path, args, message):
    calls = [] if "--calls" in args else ["--calls", "1"]
    with pytest.raises(SystemExit) as stopped:
        distill_main([str(teacher), "--method", "consistency", *calls, "--out", str(tmp_path / "s"), *args])
    assert str(stopped.value.code).startswith(f"error: {message}"), stopped.value.code
    assert "\n" not in str(stopped.value.code)
    assert not (tmp_path / "s").exists()


def test_consistency_options_are_refused_with_progressive_distillation(teacher, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        distill_main(
            [str(teacher), "--method", "progressive", "--calls", "1", "--target-ema", "0.9"]
            + ["--out", str(tmp_path / "s")]
        )
    assert str(stopped.value.code) == (
        "error: --target-ema is an option of --method consistency, not of progressive: drop it (or pass "
        "--method consistency)"
    )


def test_a_resume_of_a_progressive_distillation_with_the_consistency_method_is_refused(teacher, tmp_path):
    student = tmp_path / "student"
    common = [str(teacher), "--calls", "1", "--out", str(student)]
    distill_main([*common, "--method", "progressive", "--teacher-steps", "2", "--stage-steps", "1"])
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(SystemExit) as stopped:
        distill_main([*common, "--resume"])  # the default method, consistency
    assert str(stopped.value.code) == (
        f"error: {student} holds a progressive distillation: resume it with --method progressive, or start "
        "again in another --out"
    )


def test_a_resumed_distillation_of_an_inpainting_teacher_ends_as_an_uninterrupted_one(tmp_path):
    # data.task inpaint's masks are drawn from the global RNG after the loss's own draws: a checkpoint
    # restores it, so a resumed run sees the masks, noise and pairs an uninterrupted one sees
    run, _ = conditioned_teacher("inpaint", tmp_path)
    settings = {"calls": 1, "guidance_scale": 2.0, **TINY}
    start_consistency_distillation(run, tmp_path / "whole", **settings).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    student = tmp_path / "student"
    interrupted = start_consistency_distillation(run, student, **settings)
    interrupted.config.train.checkpoint_every = 2
    interrupted.signals.stop_requested = lambda step: step == 2
    interrupted.train()
    AcceleratorState._reset_state(reset_partial_state=True)
    assert (student / "checkpoints" / "step-0000002").is_dir()
    start_consistency_distillation(run, student, **settings, resume=True).train()

    resumed, uninterrupted = final_weights(student, 4), final_weights(tmp_path / "whole", 4)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0, msg=key)
