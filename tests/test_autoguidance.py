"""Autoguidance (Karras et al. 2024): a weak model in place of classifier-free guidance's unconditional pass.

The closed form: data drawn pixel by pixel from a Gaussian mixture shifted by 0.1 x the class label, for which
ddpm/exact_score.py gives E[x0 | x_t] exactly; the strong model is that of `MIXTURE`, the weak one that of
the same mixture with every component three times wider. At every call of the sampler the guided x0 must be
D_weak + w (D - D_weak) of the two closed forms at that call's x_t, t and labels.
"""

import functools
import re

import pytest
import torch

import ddpm.inference
from ddpm import sample_cli
from ddpm.exact_score import MIXTURE, GaussianMixture
from ddpm.inference import generate
from ddpm.io import save_pretrained
from ddpm.models.unet import UNet
from ddpm.samplers import SAMPLERS, denoiser, sample
from ddpm.schedule import NoiseScheduler

WIDE = GaussianMixture(MIXTURE.weights, MIXTURE.means, tuple(3 * sd for sd in MIXTURE.stds))
SHIFT = 0.1  # the data of label y is the mixture shifted by SHIFT * y


def closed_form_x0(mixture: GaussianMixture, scheduler, x_t, t, y):
    """E[x0 | x_t] for data mixture + SHIFT * y (y None: unshifted), float64."""
    alpha_bar = scheduler.alpha_bar(torch.as_tensor(t).expand(x_t.shape[0])).view(-1, 1, 1, 1)
    shift = (
        torch.zeros(x_t.shape[0], 1, 1, 1, dtype=torch.float64) if y is None else SHIFT * y.view(-1, 1, 1, 1)
    )
    x0, _ = mixture.posterior_means(x_t - alpha_bar.sqrt() * shift, alpha_bar)
    return x0 + shift


class ShiftedMixtureModel:
    """The exact network (the scheduler's prediction type) for data `mixture` + SHIFT * label; records the
    labels of each call."""

    def __init__(self, mixture: GaussianMixture, scheduler: NoiseScheduler):
        self.mixture, self.scheduler, self.labels = mixture, scheduler, []

    def __call__(self, x, t, y=None):
        self.labels.append(None if y is None else y.clone())
        alpha_bar = self.scheduler.alpha_bar(t).view(-1, 1, 1, 1)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x0 = closed_form_x0(self.mixture, self.scheduler, x, t, y)
        eps = (x - a * x0) / s
        kind = self.scheduler.prediction_type
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[kind].to(x.dtype)


def spied(monkeypatch, records: list):
    """Make sample()'s "ddim" record, at every call of the guided denoiser, (x_t, t, the x0 it returns)."""
    ddim = SAMPLERS["ddim"]

    @functools.wraps(ddim)
    def spy(denoise, x, timesteps, scheduler, **kwargs):
        def recording(x_t, t):
            out = denoise(x_t, t)
            records.append((x_t.clone(), t, out.x0))
            return out

        return ddim(recording, x, timesteps, scheduler, **kwargs)

    monkeypatch.setitem(SAMPLERS, "ddim", spy)


def noise(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "unconditional"])
def test_the_guided_denoiser_is_d_weak_plus_w_times_d_minus_d_weak_at_every_call(
    monkeypatch, prediction_type, labels
):
    scheduler = NoiseScheduler(num_train_timesteps=100, prediction_type=prediction_type, clip_sample=False)
    strong, weak = ShiftedMixtureModel(MIXTURE, scheduler), ShiftedMixtureModel(WIDE, scheduler)
    y = torch.tensor([3, 0, 7, 5]) if labels else None
    records, w = [], 2.5
    spied(monkeypatch, records)
    sample(strong, scheduler, noise=noise(), sampler="ddim", steps=6, y=y, guidance_scale=w, autoguide=weak)
    assert len(records) == 6 and len(weak.labels) == 6
    for x_t, t, x0 in records:
        d, d_weak = (closed_form_x0(m, scheduler, x_t, t, y) for m in (MIXTURE, WIDE))
        torch.testing.assert_close(x0, d_weak + w * (d - d_weak), rtol=1e-9, atol=1e-9)
        assert not torch.allclose(x0, d)  # the guidance changes something


def test_the_guidance_interval_and_rescale_apply_to_autoguidance(monkeypatch):
    scheduler = NoiseScheduler(num_train_timesteps=100, prediction_type="sample", clip_sample=False)
    strong, weak = ShiftedMixtureModel(MIXTURE, scheduler), ShiftedMixtureModel(WIDE, scheduler)
    y, w, interval = torch.tensor([1, 2, 3, 4]), 3.0, (0.5, 5.0)
    records = []
    spied(monkeypatch, records)
    sample(
        strong, scheduler, noise=noise(), sampler="ddim", steps=8, y=y, guidance_scale=w,
        guidance_interval=interval, guidance_rescale=0.7, autoguide=weak,
    )  # fmt: skip
    inside = 0
    for x_t, t, x0 in records:
        d, d_weak = (closed_form_x0(m, scheduler, x_t, t, y) for m in (MIXTURE, WIDE))
        alpha_bar = scheduler.alpha_bar(t)
        sigma = ((1 - alpha_bar) / alpha_bar).sqrt().item()
        if interval[0] <= sigma <= interval[1]:
            inside += 1
            guided = d_weak + w * (d - d_weak)  # x0 prediction: the network's own channels
            std = lambda z: z.flatten(1).std(1).view(-1, 1, 1, 1)  # noqa: E731
            expected = 0.7 * guided * std(d) / std(guided) + 0.3 * guided
        else:
            expected = d
        torch.testing.assert_close(x0, expected, rtol=1e-9, atol=1e-9)
    assert 0 < inside < len(records)


def test_the_weak_model_gets_the_same_x_t_t_and_conditions_as_the_model():
    class Recorder:
        def __init__(self, scale):
            self.scale, self.calls = scale, []

        def __call__(self, x, t, y=None):
            self.calls.append((x.clone(), t.clone(), y.clone()))
            return self.scale * x + 0.01 * y.view(-1, 1, 1, 1)

    strong, weak = Recorder(0.5), Recorder(0.3)
    scheduler = NoiseScheduler(num_train_timesteps=50)
    y = torch.tensor([2, 9, 4])
    sample(
        strong, scheduler, noise=noise(3), sampler="unipc", steps=4, y=y, guidance_scale=2.0, autoguide=weak
    )
    assert len(strong.calls) == len(weak.calls) == 4
    for (x, t, labels), (x_weak, t_weak, labels_weak) in zip(strong.calls, weak.calls, strict=True):
        assert torch.equal(x, x_weak) and torch.equal(t, t_weak)
        assert torch.equal(labels, y) and torch.equal(labels_weak, y)  # no null labels, same order


def test_weight_one_is_the_model_alone_and_never_calls_the_weak_model():
    scheduler = NoiseScheduler(num_train_timesteps=100, prediction_type="v_prediction", clip_sample=False)
    strong = ShiftedMixtureModel(MIXTURE, scheduler)

    def weak(x, t, y=None):
        raise AssertionError("the weak model was called at weight 1")

    x_t, t, y = noise(), torch.tensor(40), torch.tensor([1, 2, 3, 4])
    alone = denoiser(strong, scheduler, y=y, dtype=torch.float64)(x_t, t)
    with_weak = denoiser(strong, scheduler, y=y, autoguide=weak, dtype=torch.float64)(x_t, t)
    assert torch.equal(alone.x0, with_weak.x0) and torch.equal(alone.eps, with_weak.eps)


def tiny(**overrides) -> UNet:
    config = dict(
        in_channels=1, out_channels=1, base_channels=8, channel_mult=(1,), num_res_blocks=1,
        attention_resolutions=(), image_size=8, norm_groups=4,
    )  # fmt: skip
    return UNet(**{**config, **overrides}).eval()


def test_an_unconditional_unet_is_autoguided_where_classifier_free_guidance_is_refused():
    torch.manual_seed(0)
    model, weak = tiny(), tiny()
    with torch.no_grad():  # UNet's output layer starts at zero: give both networks outputs of their own
        for parameter in [*model.parameters(), *weak.parameters()]:
            parameter.normal_(0, 0.1)
    scheduler = NoiseScheduler(num_train_timesteps=20)
    kwargs = dict(image_shape=(1, 8, 8), sampler="ddim", steps=3, guidance_scale=2.0)
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        generate(model, scheduler, 2, **kwargs)
    images = generate(model, scheduler, 2, **kwargs, autoguide=weak)
    plain = generate(model, scheduler, 2, **{**kwargs, "guidance_scale": 1.0})
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    assert (images - plain).abs().max() > 1e-4  # the weak model's guidance moved the images


@pytest.mark.parametrize(
    ("weak", "message"),
    [
        (dict(image_size=16), r"the weak model's image_size=16 differs from the model's image_size=8"),
        (dict(in_channels=3, out_channels=3), r"the weak model's in_channels=3 differs"),
        (dict(num_classes=5), r"the weak model's num_classes=5 differs from the model's num_classes=3"),
        (dict(num_classes=None), r"the weak model's num_classes=None differs"),
        (dict(cond_dim=4), r"the weak model's cond_dim=4 differs from the model's cond_dim=None"),
        (dict(time_conditioning=False, num_classes=None), r"UNet has time_conditioning=False"),
    ],
)
def test_a_weak_model_that_takes_other_images_or_conditions_is_refused(weak, message):
    model = tiny(num_classes=3)
    with pytest.raises(ValueError, match=message):
        sample(model, NoiseScheduler(num_train_timesteps=20), (2, 1, 8, 8), steps=2, y=torch.tensor([0, 1]),
               guidance_scale=2.0, autoguide=tiny(**{"num_classes": 3, **weak}))  # fmt: skip


def test_autoguidance_at_weight_one_and_the_model_as_its_own_weak_model_are_refused():
    model = tiny(num_classes=3)
    common = dict(shape=(2, 1, 8, 8), steps=2, y=torch.tensor([0, 1]))
    with pytest.raises(
        ValueError, match=r"invalid guidance_scale=1\.0: expected a weight != 1 with autoguidance"
    ):
        sample(model, NoiseScheduler(num_train_timesteps=20), **common, autoguide=tiny(num_classes=3))
    with pytest.raises(ValueError, match="autoguide is the model itself"):
        sample(model, NoiseScheduler(num_train_timesteps=20), **common, guidance_scale=2.0, autoguide=model)


# --- sample.py --------------------------------------------------------------------------------------------


@pytest.fixture
def folders(tmp_path):
    torch.manual_seed(0)
    scheduler = NoiseScheduler(num_train_timesteps=20)
    save_pretrained(tmp_path / "model", tiny(num_classes=3), scheduler)
    save_pretrained(tmp_path / "weak", tiny(num_classes=3), scheduler)
    save_pretrained(tmp_path / "wide", tiny(num_classes=3, image_size=16), scheduler)
    save_pretrained(tmp_path / "other-schedule", tiny(num_classes=3), NoiseScheduler(num_train_timesteps=30))
    return tmp_path


def test_sample_py_autoguide_reaches_the_sampler_with_the_weak_weights(folders, monkeypatch, capsys):
    calls = []

    def spy(model, scheduler, **kwargs):
        calls.append(kwargs)
        return sample(model, scheduler, **kwargs)

    monkeypatch.setattr(ddpm.inference, "sample", spy)
    out = folders / "grid.png"
    argv = ["--checkpoint", str(folders / "model"), "--autoguide", str(folders / "weak"), "--n", "3"]
    sample_cli.main([*argv, "--guidance-scale", "2", "--steps", "2", "--out", str(out)])
    assert out.is_file() and capsys.readouterr().out.strip() == str(out)
    weak = calls[0]["autoguide"]
    expected = ddpm.inference.load_for_sampling(folders / "weak").model
    assert calls[0]["guidance_scale"] == 2.0 and isinstance(weak, UNet)
    for (name, p), (_, q) in zip(weak.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    main = ddpm.inference.load_for_sampling(folders / "model").model
    assert not torch.equal(next(weak.parameters()), next(main.parameters()))


@pytest.mark.parametrize(
    ("weak", "extra", "message"),
    [
        ("weak", [], r"--autoguide \S+weak needs --guidance-scale W, its weight"),
        (
            "weak",
            ["--guidance-scale", "1"],
            r"--guidance-scale 1\.0: expected a weight != 1 with autoguidance .* drop .* --autoguide",
        ),
        (
            "wide",
            ["--guidance-scale", "2"],
            r"--autoguide \S+wide: autoguide: the weak model's image_size=16",
        ),
        ("other-schedule", ["--guidance-scale", "2"], r"noise schedule differs .* in num_train_timesteps;"),
        ("weak", ["--init-image", "x.png", "--strength", "0.5"], r"only: drop --autoguide$"),
    ],
)
def test_sample_py_refuses_autoguidance_it_cannot_do_in_one_line(folders, weak, extra, message):
    argv = ["--checkpoint", str(folders / "model"), "--autoguide", str(folders / weak), "--steps", "2"]
    with pytest.raises(SystemExit) as exit_info:
        sample_cli.main([*argv, *extra, "--out", str(folders / "grid.png")])
    line = str(exit_info.value.code)
    assert line.startswith("error: ") and "\n" not in line
    assert re.search(message, line), line
    assert not (folders / "grid.png").exists()
