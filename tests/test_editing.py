"""Editing (ddpm.inpaint, img2img, invert, interpolate) on the exact-score test bed, whose answers are known:
pixels drawn independently from MIXTURE, so the right completion of an image is the mixture itself; and a
2-pixel correlated Gaussian, where the right completion is the conditional N(rho x1, sd^2 (1 - rho^2)).
Then the sample.py flags end to end on a tiny saved model."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from test_unet import perturb

import ddpm
from ddpm.condition_files import read_cond_files
from ddpm.conditions import Conditions
from ddpm.data import read_images
from ddpm.edm import EDMScheduler
from ddpm.exact_score import MIXTURE, exact_predictor, wasserstein1
from ddpm.inference import edit_from_checkpoint
from ddpm.models.unet import UNet
from ddpm.samplers import SAMPLERS, SampleOptionError
from ddpm.samplers.editing import repaint_schedule
from ddpm.schedule import NoiseScheduler

ROOT = Path(__file__).resolve().parents[1]
# E[W1] of n exact draws of MIXTURE (ddpm.exact_score.wasserstein1), with a spread of about half of it.
W1_FLOOR = 0.514


def floor(n: int) -> float:
    return W1_FLOOR / math.sqrt(n)


def half_mask(size: int = 16) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[:, : size // 2] = 1  # the left half is known
    return mask


def mixture_images(shape, seed: int = 0) -> torch.Tensor:
    return MIXTURE.sample(shape, torch.Generator().manual_seed(seed)).float()


# --- inpainting ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sampler", "jump_n_sample"), [("ddpm", 1), ("ddim", 2)])
def test_inpainting_keeps_the_known_pixels_and_fills_in_the_prior(sampler, jump_n_sample):
    """Pixels are independent, so the unknown ones must follow MIXTURE whatever the known ones hold. 2,048
    unknown pixels: exact draws score W1 0.011 (spread about 0.006), and 100 DDPM steps on the cosine schedule
    add about 0.005 (0.008 measured on 8,192 pixels, floor 0.006), so 3x the floor, 0.034, passes the right
    answer and fails pure noise (W1 ~0.4) or a wrong jump variance."""
    scheduler = NoiseScheduler(beta_schedule="cosine")
    image = mixture_images((16, 1, 16, 16))
    out = ddpm.inpaint(
        exact_predictor(MIXTURE, scheduler),
        scheduler,
        image,
        half_mask(),
        steps=100,
        jump_length=10,
        jump_n_sample=jump_n_sample,
        sampler=sampler,
        generator=torch.Generator().manual_seed(1),
        progress=False,
    )
    assert torch.equal(out[..., :8], image[..., :8])  # bit for bit
    unknown = out[..., 8:]
    assert wasserstein1(unknown, MIXTURE) < 3 * floor(unknown.numel())
    # filled in anew, not copied: independent of the image's own pixels there
    assert abs(torch.corrcoef(torch.stack([unknown.flatten(), image[..., 8:].flatten()]))[0, 1]) < 0.1
    assert wasserstein1(torch.randn(unknown.shape), MIXTURE) > 10 * floor(unknown.numel())


def gaussian_pair_predictor(scheduler: NoiseScheduler, sd: float, rho: float):
    """The exact eps predictor for images of 2 pixels (N, 1, 1, 2) drawn from N(0, sd^2 [[1, rho], [rho, 1]]):
    in u = (x1 + x2) / sqrt(2), v = (x1 - x2) / sqrt(2) the pixels are independent with variances
    lam = sd^2 (1 +- rho), and E[u0 | u_t] = a lam u_t / (a^2 lam + s^2)."""
    lams = torch.tensor([sd**2 * (1 + rho), sd**2 * (1 - rho)], dtype=torch.float64)

    def model(x, t, y=None):
        ab = scheduler.alpha_bar(torch.as_tensor(t).cpu().expand(x.shape[0])).reshape(-1, 1)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        flat = x.double().reshape(-1, 2)
        uv = torch.stack([flat[:, 0] + flat[:, 1], flat[:, 0] - flat[:, 1]], 1) / 2**0.5
        eps_uv = s * uv / (a**2 * lams + s**2)  # (x_t - a E[x0 | x_t]) / s, per component
        eps = torch.stack([eps_uv[:, 0] + eps_uv[:, 1], eps_uv[:, 0] - eps_uv[:, 1]], 1) / 2**0.5
        return eps.reshape(x.shape).to(x.dtype)

    return model


def test_resampling_jumps_condition_the_unknown_pixel_on_the_known_one():
    """x2 given x1 should regress on x1 with slope rho = 0.9. Plain replacement (jump_n_sample=1) conditions
    too weakly (slope 0.61 measured), a known failing of the method that RePaint's jumps fix (0.74 with 5
    resamplings at 50 steps, 0.83 with 10 at 100). Standard error of each slope: 0.011 on 2,000 pairs."""
    sd, rho, n = 0.4, 0.9, 2000
    scheduler = NoiseScheduler(beta_schedule="cosine")
    model = gaussian_pair_predictor(scheduler, sd, rho)
    g = torch.Generator().manual_seed(0)
    chol = torch.linalg.cholesky(sd**2 * torch.tensor([[1, rho], [rho, 1]], dtype=torch.float64))
    pairs = (torch.randn(n, 2, generator=g, dtype=torch.float64) @ chol.T).clamp(-1, 1)
    image, mask = pairs.float().reshape(n, 1, 1, 2), torch.tensor([[1.0, 0.0]])
    slopes = []
    for jumps in (1, 5):
        out = ddpm.inpaint(
            model, scheduler, image, mask, steps=50, jump_length=10, jump_n_sample=jumps, progress=False,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
        x1, x2 = out[:, 0, 0, 0].double(), out[:, 0, 0, 1].double()
        assert torch.equal(x1, image[:, 0, 0, 0].double())
        slopes.append((torch.cov(torch.stack([x1, x2]))[0, 1] / x1.var()).item())
    assert slopes[0] < 0.7 and slopes[1] > slopes[0] + 0.08, slopes


def test_repaint_schedule_goes_back_jump_length_levels_jump_n_sample_minus_one_times():
    """Lugmayr et al.'s get_schedule_jump for 10 steps, jumps of 3, 2 samples: jumps after arriving at levels
    6, 3 and 0 counted from the end (positions 3, 6, 9), each undone and redone once."""
    assert repaint_schedule(10, 3, 2) == [
        *[0, 1, 2, 3, 2, 1, 0, 1, 2, 3],
        *[4, 5, 6, 5, 4, 3, 4, 5, 6],
        *[7, 8, 9, 8, 7, 6, 7, 8, 9, 10],
    ]
    assert repaint_schedule(10, 3, 1) == list(range(11))  # plain replacement
    assert repaint_schedule(5, 10, 10) == list(range(6))  # jumps longer than the grid: none


def test_inpainting_calls_the_network_once_per_step_down():
    calls = []

    def model(x, t, y=None):
        calls.append(float(t[0]))
        return torch.zeros_like(x)

    scheduler = NoiseScheduler(num_train_timesteps=100)
    ddpm.inpaint(
        model, scheduler, torch.zeros(2, 1, 4, 4), half_mask(4), steps=10, jump_length=3, jump_n_sample=2,
        progress=False,
    )  # fmt: skip
    path = repaint_schedule(10, 3, 2)
    grid = scheduler.inference_timesteps(10).tolist()
    assert calls == [grid[p] for p, q in zip(path[:-1], path[1:], strict=True) if q > p]


# --- image to image -----------------------------------------------------------------------------------------


def test_img2img_at_strength_0_is_the_input_and_at_1_sampling_from_q_of_x_T():
    scheduler = NoiseScheduler(timestep_spacing="exponential")
    model = exact_predictor(MIXTURE, scheduler)
    image = mixture_images((16, 1, 16, 16))
    calls = []
    counted = lambda x, t, y=None: calls.append(t) or model(x, t, y)  # noqa: E731
    kept = ddpm.img2img(counted, scheduler, image, 0.0, sampler="unipc", steps=20)
    assert torch.equal(kept, image) and calls == []
    out = ddpm.img2img(
        model, scheduler, image, 1.0, sampler="unipc", steps=20, generator=torch.Generator().manual_seed(1)
    )
    # 20 UniPC steps on exponential spacing are at the floor on the exact score (README: 0.0053 at n = 65,536)
    assert wasserstein1(out, MIXTURE) < 3 * floor(out.numel())
    z = torch.randn(image.shape, generator=torch.Generator().manual_seed(1))
    x_T = scheduler.add_noise(image, z, torch.full((16,), 999))
    expected = ddpm.sample(model, scheduler, noise=x_T, sampler="unipc", steps=20, progress=False)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_img2img_with_every_sampler_keeps_the_data_distribution_and_stays_near_the_input(sampler):
    """Images of MIXTURE noised to level t have the data's marginal at t, so sampling back from there gives
    MIXTURE again (loosely: 20 steps of DDPM alone err by 0.07); at strength 0.3 the output keeps most of
    each pixel (mean |out - in| 0.07 measured against 0.55 for independent draws)."""
    scheduler = NoiseScheduler(timestep_spacing="exponential")
    image = mixture_images((8, 1, 16, 16))
    model = exact_predictor(MIXTURE, scheduler)
    generator = torch.Generator().manual_seed(2)
    out = ddpm.img2img(model, scheduler, image, 0.3, sampler=sampler, steps=20, generator=generator)
    assert wasserstein1(out, MIXTURE) < 0.1
    assert 0 < (out - image).abs().mean() < 0.2


def test_sample_starts_at_start_step_from_the_noise_given():
    """start_step runs the grid's last steps - start_step timesteps; the network sees only those."""
    seen = []

    def model(x, t, y=None):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    scheduler = NoiseScheduler(num_train_timesteps=100)
    ddpm.sample(model, scheduler, noise=torch.zeros(1, 1, 2, 2), sampler="ddim", steps=10, start_step=6)
    assert seen == scheduler.inference_timesteps(10)[6:].tolist()
    with pytest.raises(ValueError, match=r"start_step must be an integer in 0\.\.steps-1 = 0\.\.9, got 10"):
        ddpm.sample(model, scheduler, noise=torch.zeros(1, 1, 2, 2), steps=10, start_step=10)
    with pytest.raises(ValueError, match=r"start_step=3 needs noise=<x at the level of that timestep>"):
        ddpm.sample(model, scheduler, (1, 1, 2, 2), steps=10, start_step=3)


# --- inversion ----------------------------------------------------------------------------------------------


def test_ddim_inversion_reconstructs_with_an_error_that_falls_as_steps_grow():
    """First order in the step: the mean |error| roughly halves as the steps double."""
    scheduler = NoiseScheduler()
    model = exact_predictor(MIXTURE, scheduler)
    image = MIXTURE.sample((2, 1, 16, 16), torch.Generator().manual_seed(0))  # float64
    errors = []
    for steps in (10, 20, 40):
        x_T = ddpm.invert(model, scheduler, image, steps=steps, progress=False)
        back = ddpm.sample(model, scheduler, noise=x_T, sampler="ddim", steps=steps, progress=False)
        errors.append((back - image).abs().mean().item())
    assert errors[1] < 0.7 * errors[0] and errors[2] < 0.7 * errors[1] and errors[2] < 0.04, errors


def test_inversion_is_the_ddim_step_run_backwards_with_the_network_at_the_level_reached():
    """One step: from x0 at alpha_bar = 1 to t = the grid's only timestep, with eps(x0, t)."""
    scheduler = NoiseScheduler(num_train_timesteps=100)
    eps = torch.full((1, 1, 2, 2), 0.5)
    seen = []
    model = lambda x, t, y=None: seen.append(int(t[0])) or eps  # noqa: E731
    image = torch.tensor([[[[0.1, -0.2], [0.3, 0.4]]]])
    x_T = ddpm.invert(model, scheduler, image, steps=1, progress=False)
    ab = scheduler.alphas_cumprod[99].item()
    torch.testing.assert_close(x_T, ab**0.5 * image + (1 - ab) ** 0.5 * eps)
    assert seen == [99]


# --- labels and guidance go through sample()'s own model call -----------------------------------------------


@pytest.mark.parametrize("edit", ["inpaint", "img2img", "invert"])
def test_editing_calls_the_model_with_sample_s_labels_and_guidance(edit):
    seen = []

    class Labelled(torch.nn.Module):
        num_classes, null_class = 3, 3

        def forward(self, x, t, y):
            seen.append(y.tolist())
            return torch.zeros_like(x)

    model, scheduler, image = Labelled(), NoiseScheduler(num_train_timesteps=10), torch.zeros(2, 1, 4, 4)
    y = torch.tensor([0, 2])
    run = {
        "inpaint": lambda **kw: ddpm.inpaint(
            model, scheduler, image, half_mask(4), steps=2, jump_n_sample=1, **kw
        ),
        "img2img": lambda **kw: ddpm.img2img(model, scheduler, image, 1.0, steps=2, **kw),
        "invert": lambda **kw: ddpm.invert(model, scheduler, image, steps=2, **kw),
    }[edit]
    run(y=y, guidance_scale=2.0, progress=False)
    assert seen == [[0, 2, 3, 3]] * 2  # one batched call [cond, null] per step
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes\] = \[0, 3\]"):
        run(y=torch.tensor([0, 7]), progress=False)


def point_mass_model(scheduler: NoiseScheduler):
    """The exact epsilon of data that are the constant image c, c = the row's vector condition (N, 1), or 0
    where that row's condition is dropped (the null): eps = (x_t - sqrt(alpha_bar) c) / sqrt(1 - alpha_bar).
    Guided at scale s it is the exact epsilon of the constant s c, which DDIM reaches from any x_t."""

    def model(x, t, y):
        assert isinstance(y, Conditions)  # the conditions reach the network as one structure
        c = torch.where(y.is_dropped("vector"), 0.0, y["vector"][:, 0]).view(-1, 1, 1, 1)
        ab = scheduler.alpha_bar(t).to(x.dtype).view(-1, 1, 1, 1)
        return (x - ab.sqrt() * c) / (1 - ab).sqrt()

    return model


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_each_edited_row_follows_its_own_condition_and_guidance_against_its_null(guidance_scale):
    scheduler = NoiseScheduler(num_train_timesteps=20)
    model, image = point_mass_model(scheduler), mixture_images((2, 1, 4, 4)).clamp(-1, 1)
    cond = Conditions({"vector": torch.tensor([[0.3], [-0.4]])})
    target = guidance_scale * cond["vector"].view(2, 1, 1, 1).expand(2, 1, 4, 4)
    common = {"cond": cond, "guidance_scale": guidance_scale, "progress": False}
    edited = ddpm.img2img(model, scheduler, image, 0.6, steps=5, **common)
    torch.testing.assert_close(edited, target, atol=1e-5, rtol=0)
    mask = half_mask(4)
    filled = ddpm.inpaint(model, scheduler, image, mask, steps=5, sampler="ddim", jump_n_sample=2, **common)
    torch.testing.assert_close(filled, torch.where(mask.bool(), image, target), atol=1e-5, rtol=0)
    # Inversion: each row of a batch is its row inverted alone under its own condition, and another
    # condition gives another x_T
    x_T = ddpm.invert(model, scheduler, image, steps=5, **common)
    for row in range(2):
        alone = ddpm.invert(
            model, scheduler, image[row : row + 1], steps=5, **{**common, "cond": cond.rows([row])}
        )
        torch.testing.assert_close(x_T[row : row + 1], alone, atol=1e-6, rtol=0)
    swapped = ddpm.invert(model, scheduler, image, steps=5, **{**common, "cond": cond.rows([1, 0])})
    assert not torch.allclose(swapped, x_T, atol=1e-2)
    with pytest.raises(ValueError, match=r"the conditions hold 1 rows for 2 images"):
        ddpm.img2img(model, scheduler, image, 0.6, steps=5, **{**common, "cond": cond.rows([0])})


# --- interpolation ------------------------------------------------------------------------------------------


def test_slerp_keeps_the_norm_of_orthogonal_equal_norm_noises_and_ends_exactly_at_them():
    a = torch.tensor([3.0, 0.0, 0.0, 0.0]).reshape(1, 2, 2)
    b = torch.tensor([0.0, 0.0, 3.0, 0.0]).reshape(1, 2, 2)
    alphas = [0.0, 0.25, 0.5, 1.0]
    out = ddpm.interpolate(a, b, alphas)
    assert out.shape == (4, 1, 2, 2)
    assert torch.equal(out[0], a) and torch.equal(out[3], b)
    torch.testing.assert_close(out.flatten(1).norm(dim=1), torch.full((4,), 3.0))
    # closed form on the quarter circle: angle alpha * pi / 2 from a towards b
    for k, alpha in enumerate(alphas):
        angle = alpha * math.pi / 2
        expected = torch.tensor([3 * math.cos(angle), 0.0, 3 * math.sin(angle), 0.0]).reshape(1, 2, 2)
        torch.testing.assert_close(out[k], expected)
    x, y = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    middle = ddpm.interpolate(x, y, [0.5])[0]
    assert abs(middle.norm() / x.norm() - 1) < 0.05 < abs((x + y).norm() / 2 / x.norm() - 1)  # unlike lerp


def test_slerp_of_parallel_noises_is_linear():
    a = torch.ones(4)
    torch.testing.assert_close(ddpm.interpolate(a, 3 * a, [0.5])[0], 2 * a)


# --- refused input ------------------------------------------------------------------------------------------


def tiny_unet() -> UNet:
    return UNet(
        in_channels=1, out_channels=1, base_channels=8, channel_mult=(1,), num_res_blocks=1,
        attention_resolutions=(), image_size=8, norm_groups=4,
    )  # fmt: skip


ZERO = lambda x, t, y=None: torch.zeros_like(x)  # noqa: E731
SCHEDULE = NoiseScheduler(num_train_timesteps=10)
IMAGE = torch.zeros(2, 1, 8, 8)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: ddpm.img2img(ZERO, SCHEDULE, torch.zeros(1, 8, 8), 0.5, steps=2),
            r"image must be a floating tensor \(N, C, H, W\) in \[-1, 1\], got torch\.float32 of shape "
            r"\(1, 8, 8\)",
        ),
        (
            lambda: ddpm.img2img(ZERO, SCHEDULE, torch.zeros(2, 1, 8, 8, dtype=torch.uint8), 0.5, steps=2),
            r"image must be a floating tensor .*torch\.uint8",
        ),
        (
            lambda: ddpm.invert(ZERO, SCHEDULE, IMAGE + 2, steps=2),
            r"image values must lie in \[-1, 1\] \(x \* 2 - 1 for pixels in \[0, 1\]\), got \[2, 2\]",
        ),
        (
            lambda: ddpm.invert(ZERO, SCHEDULE, IMAGE * float("nan"), steps=2),
            r"image values must lie in \[-1, 1\]",
        ),
        (
            lambda: ddpm.invert(tiny_unet(), SCHEDULE, torch.zeros(1, 1, 16, 16), steps=2),
            r"image must be \(N, 1, 8, 8\) for this model \(in_channels=1, image_size=8\), "
            r"got \(1, 1, 16, 16\)",
        ),
        (
            lambda: ddpm.invert(ZERO, SCHEDULE, IMAGE, steps=0),
            r"invalid steps=0: expected an integer in 1\.\.num_train_timesteps=10",
        ),
        (
            lambda: ddpm.inpaint(ZERO, SCHEDULE, IMAGE, torch.ones(2, 8, 8), steps=2),
            r"mask must be a tensor \(2, 1, 8, 8\) or \(8, 8\) for this image, got \(2, 8, 8\)",
        ),
        (
            lambda: ddpm.inpaint(ZERO, SCHEDULE, IMAGE, torch.full((8, 8), 0.5), steps=2),
            r"mask must hold only 0 \(pixel to fill in\) and 1 \(pixel to keep\)",
        ),
        (
            lambda: ddpm.inpaint(ZERO, SCHEDULE, IMAGE, half_mask(8), steps=2, sampler="unipc"),
            r"inpaint takes sampler 'ddpm' or 'ddim', got 'unipc': RePaint's resampling jumps need a "
            r"one-step sampler",
        ),
        (
            lambda: ddpm.inpaint(ZERO, SCHEDULE, IMAGE, half_mask(8), steps=2, jump_length=0),
            r"jump_length must be an integer >= 1, got 0",
        ),
        (
            lambda: ddpm.inpaint(ZERO, SCHEDULE, IMAGE, half_mask(8), steps=2, eta=0.5),
            r"invalid eta=0\.5: expected 0 with sampler 'ddpm' \(eta applies only to sampler 'ddim'\)",
        ),
        (
            lambda: ddpm.img2img(ZERO, SCHEDULE, IMAGE, 1.5, steps=2),
            r"strength must be a number in \[0, 1\] \(0: the image, 1: a new sample\), got 1\.5",
        ),
        (
            lambda: ddpm.img2img(ZERO, SCHEDULE, IMAGE, 0.5, sampler="plms", steps=2),
            r"invalid sampler='plms': expected one of ddpm, ddim",
        ),
        (
            lambda: ddpm.interpolate(torch.ones(3), torch.ones(4), [0.5]),
            r"x_a and x_b must be tensors of the same shape, got \(3,\) and \(4,\)",
        ),
        (
            lambda: ddpm.interpolate(torch.ones(3), torch.ones(3), [1.5]),
            r"alphas must be one or more numbers in \[0, 1\], got \[1\.5\]",
        ),
        (
            lambda: ddpm.interpolate(torch.ones(3), -torch.ones(3), [0.5]),
            r"x_a and x_b point in opposite directions",
        ),
        (lambda: ddpm.interpolate(torch.zeros(3), torch.ones(3), [0.5]), r"x_a and x_b must be nonzero"),
    ],
)
def test_bad_input_is_refused_saying_what_was_expected(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_sampler_errors_are_sample_option_errors():
    with pytest.raises(SampleOptionError):
        ddpm.img2img(ZERO, SCHEDULE, IMAGE, 0.5, steps=11)


# --- sample.py --------------------------------------------------------------------------------------------


@pytest.fixture
def model_folder(tmp_path) -> Path:
    """A tiny class-conditional model folder (8x8 grey) and, beside it, two RGB images of other sizes and a
    mask (white left half)."""
    torch.manual_seed(0)
    model = UNet(**{**tiny_unet().config, "num_classes": 3})
    ddpm.save_pretrained(tmp_path / "model", model, NoiseScheduler(num_train_timesteps=20))
    (tmp_path / "images").mkdir()
    for i, size in enumerate([(12, 10), (10, 16)]):
        pixels = torch.randint(0, 256, (*size[::-1], 3), generator=torch.Generator().manual_seed(i))
        Image.fromarray(pixels.byte().numpy()).save(tmp_path / "images" / f"{i}.png")
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (0, 0, 4, 8))
    mask.save(tmp_path / "mask.png")
    (tmp_path / "masks").mkdir()
    for i in range(3):
        mask.save(tmp_path / "masks" / f"{i}.png")
    return tmp_path


def run_sample(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "sample.py"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_sample_py_inpaints_a_folder(model_folder):
    tmp = model_folder
    result = run_sample(
        "--checkpoint", "model", "--init-image", "images", "--mask", "mask.png", "--steps", "4",
        "--jump-length", "2", "--jump-n-sample", "2", cwd=tmp,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    grid = Path(tmp, result.stdout.strip())
    assert grid == tmp / "model" / "samples" / "inpaint-model-raw-ddpm4-jump2x2-seed0-images.png"
    pixels = torch.from_numpy(np.asarray(Image.open(grid).convert("L")).copy())
    assert pixels.shape == (1 + 2 * 9, 1 + 2 * 9)  # inputs over results, 2 to a row, padding 1
    inputs, outputs = pixels[1:9, 1:9], pixels[10:18, 1:9]
    assert torch.equal(inputs[:, :4], outputs[:, :4])  # the kept half, in the PNG too
    assert not torch.equal(inputs[:, 4:], outputs[:, 4:])


def test_inversion_writes_the_noise_of_each_image(model_folder):
    tmp, config = model_folder, ROOT / "configs" / "digits.yaml"
    noise_file = edit_from_checkpoint(
        tmp / "model", invert_images=tmp / "images", steps=3, default_config=config
    )
    assert noise_file == tmp / "model" / "samples" / "invert-model-raw-ddim3-images.safetensors"
    with safe_open(noise_file, "pt") as f:
        assert f.get_tensor("noise").shape == (2, 1, 8, 8)
        assert "0.png" in f.metadata()["images"] and f.metadata()["steps"] == "3"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"init_image": None, "strength": 0.5},
            r"^--strength and --mask edit the images of --init-image PATH: pass it$",
        ),
        ({"invert_images": "images"}, r"^--invert PATH takes the images itself: drop --init-image$"),
        (
            {"init_image": None, "invert_images": "images", "mask": "mask.png"},
            r"^--invert takes no --strength or --mask",
        ),
        ({}, r"^--init-image needs either --strength S \(image-to-image\) or --mask PATH \(inpainting\)$"),
        ({"strength": 0.5, "mask": "mask.png"}, r"^--init-image needs either --strength S"),
        ({"strength": 0.5, "class_label": 5}, r"^--class-label 5 is out of range"),
        ({"strength": 0.5, "guidance_scale": 2.0}, r"^--guidance-scale 2 needs --class-label when editing$"),
        ({"strength": 0.5, "steps": 30}, r"^--steps 30: expected an integer in 1\.\.num_train_timesteps=20$"),
        (
            {"invert_images": "images", "init_image": None, "sampler": "unipc"},
            r"^--sampler unipc: --invert is DDIM inversion; drop --sampler$",
        ),
        ({"mask": "masks"}, r"^--mask masks: 3 masks for 2 images; give one or as many$"),
        (
            {"init_image": "nothing", "strength": 0.5},
            r"^nothing: no such file or folder; expected an image or a folder of images$",
        ),
    ],
)
def test_edit_options_are_checked_saying_which_flag(model_folder, monkeypatch, kwargs, message):
    monkeypatch.chdir(model_folder)
    kwargs = {"init_image": "images", **kwargs}
    with pytest.raises(ValueError, match=message):
        edit_from_checkpoint("model", default_config=ROOT / "configs" / "digits.yaml", **kwargs)


def test_img2img_of_one_image_with_a_class_label(model_folder):
    tmp = model_folder
    out = edit_from_checkpoint(
        tmp / "model", tmp / "images" / "1.png", default_config=ROOT / "configs" / "digits.yaml",
        strength=0.5, sampler="dpm++2m", steps=4, class_label=2, out=tmp / "edit.png",
    )  # fmt: skip
    assert out == tmp / "edit.png" and Image.open(out).size == (1 + 9, 1 + 2 * 9)


def test_editing_works_in_the_edm_formulation_s_frame():
    """EDMScheduler's samplers work on the data over sigma_data: inpainting keeps the known pixels bit for
    bit, and with the exact denoiser of a single image the unknown ones come back at the data's scale."""
    scheduler = EDMScheduler(sigma_data=0.5)
    image = torch.full((2, 1, 4, 4), 0.8)

    def model(x, t, y=None):  # F whose x0 / sigma_data = a x_t + s F is the image over sigma_data
        ab = scheduler.alpha_bar(torch.as_tensor(t)).reshape(-1, 1, 1, 1).to(x.dtype)
        return (image / 0.5 - ab.sqrt() * x) / (1 - ab).sqrt()

    out = ddpm.inpaint(model, scheduler, image, half_mask(4), steps=10, jump_n_sample=1, progress=False)
    assert torch.equal(out[..., :2], image[..., :2])
    torch.testing.assert_close(out[..., 2:], image[..., 2:], atol=1e-4, rtol=0)
    x_T = ddpm.invert(model, scheduler, image, steps=10, progress=False)
    back = ddpm.sample(model, scheduler, noise=x_T, sampler="ddim", steps=10, progress=False)
    torch.testing.assert_close(back, image, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["image", "vector"])
def test_editing_a_conditioned_model_takes_sample_py_s_conditions_row_by_row(tmp_path, kind):
    """--cond-image and --cond reach the editing functions as sample.py reads them: one condition each, or
    one for all the images; a conditioned model edited without them, or with a count that fits no image, is
    refused."""
    config = ROOT / "configs" / "digits.yaml"
    extra = {"image": {"cond_channels": 1}, "vector": {"cond_dim": 3}}[kind]
    torch.manual_seed(0)
    model = perturb(UNet(**{**tiny_unet().config, **extra}))
    ddpm.save_pretrained(tmp_path / "model", model, NoiseScheduler(num_train_timesteps=20))
    rng = np.random.default_rng(0)
    for folder, count in (("images", 2), ("conds", 2), ("three", 3)):
        for i in range(count):
            path = tmp_path / folder / f"{i}.{'png' if folder == 'images' or kind == 'image' else 'npy'}"
            path.parent.mkdir(exist_ok=True)
            if path.suffix == ".png":
                Image.fromarray(rng.integers(0, 256, (8, 8)).astype(np.uint8), mode="L").save(path)
            else:
                np.save(path, rng.normal(size=3).astype(np.float32))
    (tmp_path / "one").mkdir()  # condition 0 alone
    shutil.copy(next((tmp_path / "conds").iterdir()).with_stem("0"), tmp_path / "one")
    flag = "cond_image" if kind == "image" else "cond_files"
    loaded = ddpm.inference.load_for_sampling(tmp_path / "model", use_ema=False)
    images, _ = read_images(tmp_path / "images", image_size=8, channels=1)

    def conditions(folder: str) -> Conditions:
        if kind == "image":
            return ddpm.inference.read_cond_images(loaded, tmp_path / folder)
        return read_cond_files(tmp_path / folder, {"cond_dim": 3, "context_dim": None})

    def inverted(folder: str) -> torch.Tensor:
        kwargs = {flag: tmp_path / folder, "out": tmp_path / f"{folder}.safetensors"}
        path = edit_from_checkpoint(
            tmp_path / "model", invert_images=tmp_path / "images", steps=3, default_config=config, **kwargs
        )
        with safe_open(path, "pt") as f:
            return f.get_tensor("noise")

    each = inverted("conds")
    expected = ddpm.invert(loaded.model, loaded.scheduler, images, steps=3, cond=conditions("conds"))
    torch.testing.assert_close(each, expected, atol=1e-5, rtol=0)
    shared = inverted("one")  # one condition for both images: row 1 now under condition 0
    one = conditions("one").rows([0, 0])
    torch.testing.assert_close(
        shared, ddpm.invert(loaded.model, loaded.scheduler, images, steps=3, cond=one), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(shared[0], each[0], atol=1e-5, rtol=0)  # the same condition 0 is read
    assert not torch.allclose(shared[1], each[1], atol=1e-3)  # row 1 follows its condition
    # Guidance against the conditions' null needs no class label; the default name says the conditions
    grid = edit_from_checkpoint(
        tmp_path / "model", tmp_path / "images", strength=0.5, steps=2, sampler="ddim", guidance_scale=2.0,
        default_config=config, **{flag: tmp_path / "conds"},
    )  # fmt: skip
    assert grid.name == "img2img-model-raw-ddim2-strength0.5-guidance2-condconds-seed0-images.png"
    option = "--cond-image" if kind == "image" else "--cond"
    with pytest.raises(
        ValueError, match=rf"^{option} \S+three: 3 conditions for 2 images; give one or as many$"
    ):
        edit_from_checkpoint(
            tmp_path / "model", tmp_path / "images", strength=0.5, steps=2, default_config=config,
            **{flag: tmp_path / "three"},
        )  # fmt: skip
    with pytest.raises(ValueError, match=rf"^this model is conditioned on .*: pass {option} "):
        edit_from_checkpoint(tmp_path / "model", tmp_path / "images", strength=0.5, default_config=config)


def test_a_trained_inpainting_model_is_edited_with_the_mask_of_its_condition(tmp_path):
    """A model trained with data.task=inpaint takes --mask as the mask of its condition too, so it inpaints
    (the condition: the masked image and the mask, `inpaint_condition`); other edits of it are refused."""
    config = ROOT / "configs" / "digits.yaml"
    torch.manual_seed(0)
    model = perturb(UNet(**{**tiny_unet().config, "cond_channels": 2}))
    ddpm.save_pretrained(
        tmp_path / "model", model, NoiseScheduler(num_train_timesteps=20), task={"task": "inpaint"}
    )
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (8, 8)).astype(np.uint8), mode="L").save(
            tmp_path / "images" / f"{i}.png"
        )
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (0, 0, 4, 8))
    mask.save(tmp_path / "mask.png")
    loaded = ddpm.inference.load_for_sampling(tmp_path / "model", use_ema=False)
    cond = ddpm.inference.read_cond_images(loaded, tmp_path / "images", mask=tmp_path / "mask.png")
    images, _ = read_images(tmp_path / "images", image_size=8, channels=1)
    keep = torch.zeros(1, 1, 8, 8)
    keep[..., :4] = 1
    torch.testing.assert_close(cond["image"], torch.cat([images * keep, keep.expand(2, -1, -1, -1)], dim=1))
    seen = []
    forward = UNet.forward
    common = dict(default_config=config, steps=2, jump_n_sample=1, cond_image=tmp_path / "images")
    with mock.patch.object(
        UNet, "forward", lambda self, x, t, y=None: seen.append(y) or forward(self, x, t, y)
    ):
        edit_from_checkpoint(tmp_path / "model", tmp_path / "images", mask=tmp_path / "mask.png", **common)
    torch.testing.assert_close(seen[0]["image"], cond["image"])
    with pytest.raises(ValueError, match=r"data\.task=inpaint, whose condition needs the mask .*--mask"):
        edit_from_checkpoint(tmp_path / "model", tmp_path / "images", strength=0.5, **common)
