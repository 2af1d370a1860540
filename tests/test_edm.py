"""The EDM formulation (Karras et al. 2022, Table 1): the preconditioning identities, the loss at the exact
denoiser of Gaussian data against its closed form, the samplers with the exact denoiser of a mixture, and a
run trained with `diffusion: {formulation: edm}` sampled with no flags."""

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from test_train import ROOT, TINY

import ddpm
from ddpm.config import ConfigError, build_schedule, load_config
from ddpm.edm import EDMScheduler, schedule_from_config
from ddpm.exact_score import MIXTURE, GaussianMixture, wasserstein1
from ddpm.inference import grid_from_checkpoint
from ddpm.interop.diffusers import diffusers_scheduler_config
from ddpm.io import read_schedule, save_pretrained
from ddpm.losses import diffusion_loss
from ddpm.source import load_pretrained
from ddpm.training import Trainer

EDM = EDMScheduler()
SIGMAS = torch.tensor([0.002, 0.01, 0.1, 0.5, 1.0, 3.0, 80.0], dtype=torch.float64)


def test_preconditioning_gives_unit_variance_input_and_target_and_unit_effective_weight():
    c_skip, c_out, c_in, c_noise = EDM.precondition(SIGMAS)
    sd2, s2 = 0.25, SIGMAS**2
    torch.testing.assert_close(
        c_in**2 * (sd2 + s2), torch.ones_like(SIGMAS)
    )  # Var(c_in (x0 + sigma eps)) = 1
    # Var((x0 - c_skip (x0 + sigma eps)) / c_out) = ((1 - c_skip)^2 sd^2 + c_skip^2 sigma^2) / c_out^2 = 1
    torch.testing.assert_close(((1 - c_skip) ** 2 * sd2 + c_skip**2 * s2) / c_out**2, torch.ones_like(SIGMAS))
    torch.testing.assert_close(c_noise, SIGMAS.log() / 4)
    # lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (Table 1) times c_out^2 is 1: the loss weight on F
    torch.testing.assert_close((s2 + sd2) / (s2 * sd2) * c_out**2, torch.ones_like(SIGMAS))
    assert torch.equal(EDM.loss_weight(torch.zeros(3)), torch.ones(3))
    with pytest.raises(
        ValueError, match="lambda\\(sigma\\) = 1 / c_out\\(sigma\\)\\^2.*use loss weighting 'uniform'"
    ):
        EDM.loss_weight(torch.zeros(3), weighting="min_snr")


def test_the_loss_on_f_is_lambda_weighted_denoiser_error_and_the_samplers_see_eq_7():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(7, 1, 4, 4, generator=g) * 0.5, torch.randn(7, 1, 4, 4, generator=g)
    t = EDM.sigma_to_t(SIGMAS / 0.5)  # noise levels of the samplers' frame, sigma / sigma_data
    torch.testing.assert_close(EDM.sigma(t), SIGMAS)
    F = torch.randn(7, 1, 4, 4, generator=g)
    c_skip, c_out, c_in, _ = (c.float().reshape(-1, 1, 1, 1) for c in EDM.precondition(SIGMAS))
    x = x0 + SIGMAS.float().reshape(-1, 1, 1, 1) * noise
    torch.testing.assert_close(EDM.add_noise(x0, noise, t), c_in * x)  # the network's input
    D = c_skip * x + c_out * F  # Eq. 7
    lam = 1 / c_out**2
    per_sample = ((F - EDM.training_target(x0, noise, t)) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(per_sample, (lam * (D - x0) ** 2).mean((1, 2, 3)), rtol=1e-4, atol=1e-6)
    # The samplers' (x0, eps) from F at their x_t (= the network input): x0 * sigma_data is D, and
    # x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps holds
    x_t = EDM.add_noise(x0, noise, t)
    x0_hat, eps_hat = EDM.predict_x0_and_eps(F, x_t, t)
    torch.testing.assert_close(x0_hat * 0.5, D, rtol=1e-5, atol=1e-5)
    ab = EDM.alpha_bar(t).float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(ab.sqrt() * x0_hat + (1 - ab).sqrt() * eps_hat, x_t, rtol=1e-5, atol=1e-5)
    # The exact target recovers the noise
    _, eps = EDM.predict_x0_and_eps(EDM.training_target(x0, noise, t), x_t, t)
    torch.testing.assert_close(eps, noise, rtol=1e-4, atol=1e-4)


def test_training_noise_levels_are_log_normal_and_sampling_uses_the_karras_grid():
    t = EDM.sample_timesteps(200_000, generator=torch.Generator().manual_seed(0))
    log_sigma = EDM.sigma(t).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.01)
    sigmas = EDM.sigma(EDM.inference_timesteps(18))
    i = torch.arange(18, dtype=torch.float64)
    karras = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # Karras et al. 2022, Eq. 5
    torch.testing.assert_close(sigmas, karras, rtol=1e-12, atol=0)
    assert sigmas[0].item() == pytest.approx(80, rel=1e-12) and sigmas[-1].item() == pytest.approx(
        0.002, rel=1e-12
    )
    # The samplers' frame: sigma' = sigma / sigma_data, alpha_bar = 1 / (1 + sigma'^2)
    torch.testing.assert_close(EDM.alpha_bar(EDM.inference_timesteps(18)), 1 / (1 + (karras / 0.5) ** 2))


@pytest.mark.parametrize("data_std", [0.5, 0.3, 1.0])
def test_the_loss_at_the_exact_denoiser_of_gaussian_data_equals_its_closed_form(data_std):
    """Data x0 ~ N(0, s^2) per pixel: D*(x; sigma) = s^2 / (s^2 + sigma^2) x, and the lambda-weighted error
    of D* at sigma is s^2 (sigma^2 + sd^2) / (sd^2 (s^2 + sigma^2)), exactly 1 when s = sigma_data."""

    def exact_f(x_in, t, y=None):
        sigma = EDM.sigma(t.cpu()).float().reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = (
            c.float().reshape(-1, 1, 1, 1) for c in EDM.precondition(EDM.sigma(t.cpu()))
        )
        x = x_in / c_in
        return (data_std**2 / (data_std**2 + sigma**2) * x - c_skip * x) / c_out

    g = torch.Generator().manual_seed(1)
    n = 8192
    x0 = torch.randn(n, 1, 8, 8, generator=g) * data_std
    noise = torch.randn(n, 1, 8, 8, generator=g)
    t = EDM.sample_timesteps(n, generator=g)
    loss = diffusion_loss(exact_f, EDM, x0, noise, t)
    s2, sigma2 = data_std**2, EDM.sigma(t) ** 2
    closed_form = (s2 * (sigma2 + 0.25) / (0.25 * (s2 + sigma2))).mean().item()
    assert loss.item() == pytest.approx(closed_form, rel=0.01)  # 8192 x 64 pixels: ~0.2% Monte Carlo error
    if data_std == 0.5:
        assert closed_form == pytest.approx(1.0, rel=1e-12)


def exact_edm_network(mixture: GaussianMixture, scheduler: EDMScheduler):
    """F with D = c_skip x + c_out F the exact denoiser E[x0 | x0 + sigma eps] of data drawn pixel by pixel
    from `mixture` (its posterior means at alpha_bar = 1 / (1 + sigma^2), in data units)."""

    def model(x_in, t, y=None):
        sigma = scheduler.sigma(torch.as_tensor(t).cpu().expand(x_in.shape[0]))
        c_skip, c_out, c_in, _ = (
            c.reshape(-1, *([1] * (x_in.ndim - 1))) for c in scheduler.precondition(sigma)
        )
        x = x_in.double() / c_in
        ab = 1 / (1 + sigma.reshape(c_in.shape) ** 2)
        denoised, _ = mixture.posterior_means(x * ab.sqrt(), ab)
        return ((denoised - c_skip * x) / c_out).to(x_in.dtype)

    return model


# W1 to the mixture; the floor of 8,192 exact draws is 0.0057 (ddpm.exact_score.wasserstein1). Measured: heun
# 0.0152 at 18 steps, 0.0063 at 50; dpm++2m 0.0140 at 20, 0.0062 at 100; unipc 0.0089 at 20.
@pytest.mark.parametrize(
    ("sampler", "steps", "bound"), [("heun", 50, 0.008), ("dpm++2m", 100, 0.008), ("unipc", 20, 0.011)]
)
def test_samplers_with_the_exact_denoiser_reproduce_the_data(sampler, steps, bound):
    noise = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = ddpm.sample(
        exact_edm_network(MIXTURE, EDM), EDM, noise=noise, sampler=sampler, steps=steps, progress=False
    )
    assert wasserstein1(x0, MIXTURE) < bound


def test_the_probability_flow_ode_does_not_depend_on_sigma_data():
    """sigma_data only scales the samplers' frame (and the network's input and output): with the exact
    denoiser and the same x at sigma_max, every sigma_data gives the same images."""
    x_max = 80 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    images = []
    for scheduler in (EDM, EDMScheduler(sigma_data=1.0), EDMScheduler(sigma_data=0.2)):
        noise = x_max * scheduler.precondition(torch.tensor(80.0))[2]  # x_T: the network's input at sigma_max
        model = exact_edm_network(MIXTURE, scheduler)
        images.append(ddpm.sample(model, scheduler, noise=noise, sampler="dpm++2m", steps=8, progress=False))
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(images[2], images[0], rtol=0, atol=1e-10)


def edm_config(tmp_path, run_dir, diffusion: dict, *extra: str):
    """tests/test_train.py's tiny digits run, its `diffusion` section replaced (an override sets one key)."""
    raw = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    raw["diffusion"] = diffusion
    file = tmp_path / "edm.yaml"
    file.write_text(yaml.safe_dump(raw))
    return load_config(file, [*TINY, f"output_dir={run_dir}", *extra])


def test_the_config_picks_the_formulation_and_refuses_what_cannot_work(tmp_path):
    uniform, run = "train.loss_weighting=uniform", tmp_path / "run"
    config = edm_config(tmp_path, run, {"formulation": "edm", "sigma_data": 0.5}, uniform)
    scheduler = build_schedule(config.diffusion)
    assert isinstance(scheduler, EDMScheduler) and scheduler.config["p_mean"] == -1.2
    assert schedule_from_config(scheduler.config).config == scheduler.config
    with pytest.raises(
        ConfigError, match="train.loss_weighting=min_snr but diffusion.formulation=edm.*=uniform"
    ):
        edm_config(tmp_path, run, {"formulation": "edm"}, "train.loss_weighting=min_snr")
    with pytest.raises(
        ConfigError, match="invalid value 'vp' for 'diffusion.formulation': expected one of ddpm, edm"
    ):
        edm_config(tmp_path, run, {"formulation": "vp"})
    with pytest.raises(ConfigError, match="unknown key 'diffusion.beta_schedule'.*EDMScheduler"):
        edm_config(tmp_path, run, {"formulation": "edm", "beta_schedule": "cosine"}, uniform)
    with pytest.raises(ConfigError, match="diffusion.sigma_min.*0 < sigma_min < sigma_max"):
        edm_config(tmp_path, run, {"formulation": "edm", "sigma_min": 100}, uniform)


def test_an_edm_run_saves_its_formulation_with_the_weights_and_samples_without_flags(tmp_path):
    run = tmp_path / "run"
    diffusion = {"formulation": "edm", "clip_sample": True}
    extra = ["train.loss_weighting=uniform", "sample.sampler=heun", "train.steps=2", "train.sample_every=2"]
    try:
        last = Trainer(edm_config(tmp_path, run, diffusion, *extra)).train()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert (run / "samples" / "step-0000002-ema.png").is_file()
    grid = grid_from_checkpoint(
        run, 4, default_config=ROOT / "configs" / "digits.yaml"
    )  # what sample.py does
    assert grid.is_file() and "heun" in grid.name
    model, scheduler = load_pretrained(last / "ema")
    assert isinstance(scheduler, EDMScheduler) and scheduler.clip_sample
    assert isinstance(read_schedule(last / "noise_scheduler.json"), EDMScheduler)
    images = ddpm.inference.generate(model, scheduler, 4, image_shape=(1, 8, 8), sampler="dpm++2m", steps=4)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    save_pretrained(tmp_path / "folder", model, scheduler)
    assert load_pretrained(tmp_path / "folder")[1].config == scheduler.config


def test_diffusers_scheduler_export_refuses_the_edm_formulation():
    with pytest.raises(ValueError, match=r"EDMScheduler \(diffusion.formulation=edm\) has no DDIMScheduler"):
        diffusers_scheduler_config(EDM, "DDIMScheduler")
