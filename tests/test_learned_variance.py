"""Learned variance (Nichol & Dhariwal 2021): the schedule's variance_type, sampling a model with 2C output
channels (against diffusers' DDPMScheduler on respaced timesteps, and closed forms), guidance, and errors."""

import json
import math

import pytest
import torch
from diffusers import DDPMScheduler
from test_sampling_paths import TINY

from ddpm.interop.diffusers import diffusers_scheduler_config, scheduler_from_diffusers
from ddpm.io import save_pretrained
from ddpm.models import UNet
from ddpm.samplers import SAMPLERS, denoiser, sample
from ddpm.schedule import NoiseScheduler
from ddpm.source import load_pretrained

SHAPE = (2, 3, 4, 4)


class LearnedToy:
    """model(x, t, y) -> 2C channels: a fixed linear map of x plus a function of t (the prediction), then
    v = tanh(a second map of x) in (-1, 1) (the variance values); y shifts both when given."""

    def __init__(self, dim: int = 3 * 4 * 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.weight = 0.8 * torch.eye(dim, dtype=torch.float64) + 0.1 * torch.randn(dim, dim, generator=g)
        self.weight_v = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5

    def __call__(self, x, t, y=None):
        flat = x.reshape(x.shape[0], -1).double()
        out = (flat @ self.weight).reshape(x.shape) + 0.1 * torch.sin(t.double() / 100).view(-1, 1, 1, 1)
        v = torch.tanh(flat @ self.weight_v).reshape(x.shape)
        if y is not None:
            out = out + 0.05 * y.double().view(-1, 1, 1, 1)
            v = torch.tanh(v + 0.3 * y.double().view(-1, 1, 1, 1))
        return torch.cat([out, v], dim=1).to(x.dtype)


def x_T(shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(42), dtype=torch.float64)


@pytest.mark.parametrize(("spacing", "steps"), [("leading", 10), ("linspace", 7), ("leading", 1000)])
def test_ancestral_learned_range_matches_diffusers_on_respaced_timesteps(spacing, steps):
    """The variance interpolates log beta and log beta-tilde of the spaced schedule (beta = 1 - alpha_bar_t /
    alpha_bar_s), as diffusers' DDPMScheduler(variance_type="learned_range") does; "leading" and "linspace"
    end at t = 0, where neither adds noise (with "trailing" diffusers adds noise on its last step, t > 0)."""
    ours = NoiseScheduler(timestep_spacing=spacing, variance_type="learned_range")
    ref = DDPMScheduler(variance_type="learned_range", clip_sample=False, timestep_spacing=spacing)
    ref.alphas_cumprod = ours.alphas_cumprod.clone()  # float64, as ours (diffusers keeps float32)
    ref.set_timesteps(steps)
    model, x, generator = LearnedToy(), x_T(), torch.Generator().manual_seed(3)
    for t in ref.timesteps:
        x = ref.step(model(x, t.repeat(x.shape[0])), t, x, generator=generator).prev_sample
    got = sample(
        LearnedToy(),
        ours,
        noise=x_T(),
        sampler="ddpm",
        steps=steps,
        generator=torch.Generator().manual_seed(3),
        progress=False,
    )
    torch.testing.assert_close(got, x, rtol=0, atol=1e-8)


@pytest.mark.parametrize(("v", "expected"), [(1.0, "beta"), (-1.0, "beta_tilde"), (0.0, "geometric mean")])
def test_learned_range_step_closed_form(v, expected):
    """One ancestral step from t to s of a model predicting x0 = c and a constant v: x_s = posterior mean +
    std z, with std^2 = beta (v = +1), beta-tilde (v = -1) or sqrt(beta beta-tilde) (v = 0), beta and
    beta-tilde of the spaced step written out here."""
    scheduler = NoiseScheduler(prediction_type="sample", variance_type="learned_range")
    c, calls = 0.2, []

    def model(x, t, y):
        calls.append(x.clone())
        return torch.cat([torch.full_like(x, c), torch.full_like(x, v)], dim=1)

    noise = x_T()
    sample(model, scheduler, noise=noise, sampler="ddpm", steps=5, generator=torch.Generator().manual_seed(7))
    t, s = scheduler.inference_timesteps(5)[:2].tolist()
    ab_t, ab_s = scheduler.alphas_cumprod[t].item(), scheduler.alphas_cumprod[s].item()
    beta = 1 - ab_t / ab_s
    beta_tilde = (1 - ab_s) / (1 - ab_t) * beta
    var = {"beta": beta, "beta_tilde": beta_tilde, "geometric mean": (beta * beta_tilde) ** 0.5}[expected]
    mean = ab_s**0.5 * beta / (1 - ab_t) * c + (1 - beta) ** 0.5 * (1 - ab_s) / (1 - ab_t) * noise
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(calls[1], mean + var**0.5 * z, rtol=0, atol=1e-12)


def test_log_variance_ends_and_improved_diffusion_values_at_t0():
    scheduler = NoiseScheduler(variance_type="learned_range")
    t = torch.tensor([0, 1, 500, 999])
    betas = scheduler.betas[t].view(-1, 1, 1, 1)
    ab = scheduler.alphas_cumprod
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    beta_tilde = (scheduler.betas * (1 - ab_prev) / (1 - ab))[t].view(-1, 1, 1, 1)
    beta_tilde[0] = beta_tilde[1]  # t = 0: clipped to beta-tilde_1 (beta-tilde_0 = 0)
    ones = torch.ones(4, 1, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(scheduler.model_log_variance(t, ones), betas.log().expand(4, 1, 2, 2))
    torch.testing.assert_close(scheduler.model_log_variance(t, -ones), beta_tilde.log().expand(4, 1, 2, 2))
    small = NoiseScheduler(variance_type="fixed_small").model_log_variance(t)
    torch.testing.assert_close(small, beta_tilde.log())
    large = NoiseScheduler(variance_type="fixed_large").model_log_variance(t)
    expected = betas.log().clone()
    expected[0] = beta_tilde[0].log()  # improved-diffusion: beta-tilde_1 at t = 0, for the decoder
    torch.testing.assert_close(large, expected)


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n != "ddpm"])
def test_other_samplers_use_the_prediction_channels_alone(name):
    """DDIM, the ODE and multistep solvers on a 2C model == the same solver on its first C channels."""
    learned, fixed = NoiseScheduler(variance_type="learned_range"), NoiseScheduler()
    toy = LearnedToy()

    def first_channels(x, t, y=None):
        return toy(x, t, y)[:, : x.shape[1]]

    kwargs = {"noise": x_T(), "sampler": name, "steps": 6, "progress": False}
    got = sample(toy, learned, generator=torch.Generator().manual_seed(1), **kwargs)
    expected = sample(first_channels, fixed, generator=torch.Generator().manual_seed(1), **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_guidance_guides_the_prediction_and_takes_the_variance_of_the_conditional_pass():
    scheduler = NoiseScheduler(variance_type="learned_range")
    toy, y, x, t = LearnedToy(), torch.tensor([1, 3]), x_T(), torch.tensor(500)
    got = denoiser(toy, scheduler, y=y, guidance_scale=3.0, null_class=10, dtype=torch.float64)(x, t)
    t_batch = t.repeat(2)
    cond, uncond = toy(x, t_batch, y), toy(x, t_batch, torch.full_like(y, 10))
    guided = uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3])
    x0, eps = scheduler.predict_x0_and_eps(guided, x, t_batch)
    torch.testing.assert_close(got.x0, x0)
    torch.testing.assert_close(got.eps, eps)
    torch.testing.assert_close(got.variance_values, cond[:, 3:])


def test_learned_range_with_a_c_channel_model_is_refused():
    def c_channels(x, t, y=None):
        return x

    with pytest.raises(
        ValueError, match=r"variance_type='learned_range' needs a model with 2 x 3 = 6 output"
    ):
        sample(
            c_channels, NoiseScheduler(variance_type="learned_range"), noise=x_T(), sampler="ddpm", steps=2
        )
    with pytest.raises(ValueError, match=r"returned 6 channels for images of 3 \(twice the image channels"):
        sample(LearnedToy(), NoiseScheduler(), noise=x_T(), sampler="ddim", steps=2)
    with pytest.raises(ValueError, match="unknown variance_type 'learned'; valid: fixed_small, fixed_large"):
        NoiseScheduler(variance_type="learned")


def test_variance_type_is_saved_with_the_weights_and_old_files_load(tmp_path):
    model = UNet(**{**TINY, "out_channels": 2, "num_classes": None})
    model.eval()
    save_pretrained(tmp_path / "m", model, NoiseScheduler(variance_type="learned_range"))
    _, scheduler = load_pretrained(tmp_path / "m")
    assert scheduler.variance_type == "learned_range"
    images = sample(model, scheduler, (2, 1, 8, 8), sampler="ddpm", steps=3, progress=False)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    # a noise_scheduler.json written before variance_type existed: fixed_small
    old = {k: v for k, v in NoiseScheduler().config.items() if k != "variance_type"}
    (tmp_path / "m" / "noise_scheduler.json").write_text(json.dumps(old))
    _, scheduler = load_pretrained(tmp_path / "m")
    assert scheduler.variance_type == "fixed_small"


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [("fixed_small", "fixed_small"), ("fixed_small_log", "fixed_small"), ("fixed_large_log", "fixed_large")]
    + [("learned_range", "learned_range"), (None, "fixed_small")],
)
def test_diffusers_variance_type_both_ways(theirs, ours):
    config = {} if theirs is None else {"variance_type": theirs}
    scheduler = scheduler_from_diffusers(config)
    assert scheduler.variance_type == ours
    assert diffusers_scheduler_config(scheduler)["variance_type"] == ours
    dpm = diffusers_scheduler_config(scheduler, "DPMSolverMultistepScheduler")["variance_type"]
    assert dpm == ("learned_range" if ours == "learned_range" else None)
    assert "variance_type" not in diffusers_scheduler_config(scheduler, "DDIMScheduler")
    with pytest.raises(ValueError, match="variance_type 'learned' .* is not supported"):
        scheduler_from_diffusers({"variance_type": "learned"})


def test_learned_range_sampling_stays_finite_on_zero_terminal_snr_and_cosine():
    for diffusion in (
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
        {"beta_schedule": "cosine"},
    ):
        scheduler = NoiseScheduler(**diffusion, variance_type="learned_range")
        got = sample(LearnedToy(), scheduler, noise=x_T().float(), sampler="ddpm", steps=8, progress=False)
        assert torch.isfinite(got).all() and not math.isnan(got.sum().item())
