"""The built-in task superres: the condition derived from each image, the config's checks, the trainer feeding
it to the network (with condition dropout), the in-training grid, `generate` with conditions and sample.py
--cond-image."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from test_train import TINY_RUN, weights
from test_unet import perturb, tiny

import ddpm
from ddpm import sample_cli
from ddpm.compiled import FixedBatchNetwork
from ddpm.conditions import Conditions
from ddpm.config import ConfigError, load_config, save_config
from ddpm.data import batch_conditions, superres_condition, upsample_low_res
from ddpm.inference import generate, load_for_sampling, read_cond_images
from ddpm.io import EMA
from ddpm.run_dir import latest_checkpoint
from ddpm.schedule import NoiseScheduler
from ddpm.training import Trainer

SUPERRES_YAML = Path(__file__).resolve().parents[1] / "configs" / "superres_digits.yaml"


def tiny_superres(run_dir: Path, *extra: str):
    """configs/superres_digits.yaml, tiny: 8x8 digits from their 2x2 versions."""
    overrides = [*TINY_RUN, "data.superres_factor=4", "model.attention_resolutions=[4]", *extra]
    return load_config(SUPERRES_YAML, [*overrides, f"output_dir={run_dir}"])


def test_the_condition_is_the_area_downsampled_image_upsampled_back():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 8, 12, generator=generator) * 2 - 1
    cond = superres_condition(images, 4)
    assert cond.shape == images.shape
    # Each 4x4 block holds the block's mean, everywhere in it
    block = images[1, 0, 4:8, 8:12]
    assert torch.allclose(cond[1, 0, 4:8, 8:12], block.mean().expand(4, 4))
    # Area-downsampling the condition gives the low-resolution image back (consistency)
    low = torch.nn.functional.interpolate(images, scale_factor=0.25, mode="area")
    assert torch.allclose(torch.nn.functional.avg_pool2d(cond, 4), low, atol=1e-6)


def test_batch_conditions_hold_the_labels_and_the_task_image():
    config = load_config(SUPERRES_YAML)
    images, labels = torch.rand(2, 1, 16, 16), torch.tensor([3, 4])
    cond = batch_conditions(config.data, images, labels)
    assert cond.kinds == ("label", "image") and torch.equal(cond["label"], labels)
    assert torch.equal(cond["image"], superres_condition(images, 4))
    assert batch_conditions(config.data, images, None).kinds == ("image",)
    assert not batch_conditions(load_config(None).data, images, None)  # data.task: none


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (
            ["data.task=none"],
            r"model\.cond_channels=1 conditions the network on an image, but data\.task=none",
        ),
        (["model.cond_channels=null"], r"data\.task=superres gives .* set model\.cond_channels=1"),
        (["data.superres_factor=3"], r"data\.superres_factor=3 does not divide data\.image_size=16"),
        (["data.superres_factor=1"], r"'data\.superres_factor'.*expected an integer >= 2"),
        (["train.fid_every=100"], r"train\.fid_every=100 with data\.task=superres"),
        (["data.task=inpaint"], r"data\.task=inpaint gives .* set model\.cond_channels=2"),
        (["data.task=zoom"], r"'data\.task'.*expected one of none, superres, inpaint, attributes"),
    ],
)
def test_a_superres_config_that_cannot_work_is_refused_when_read(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(SUPERRES_YAML, overrides)


def test_the_trainer_feeds_the_low_resolution_image_and_drops_it_at_the_configured_rate(tmp_path):
    trainer = Trainer(tiny_superres(tmp_path / "run"))
    seen = []
    forward = trainer.forward
    trainer.forward = lambda x, t, y: seen.append(y) or forward(x, t, y)
    x0 = torch.stack([trainer.dataset[i][0] for i in range(16)])
    labels = torch.full((16,), -1)
    for p in (0.0, 1.0):
        trainer.config.train.label_dropout = p
        assert torch.isfinite(trainer._loss(x0, labels))
    kept, dropped = seen
    assert kept.kinds == ("image",) and torch.equal(kept["image"], superres_condition(x0, 4))
    assert not kept.is_dropped("image").any() and dropped.is_dropped("image").all()


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (
            ["train.cond_dropout={image: 0.2, vector: 0.1}"],
            r"train\.cond_dropout=\{image: 0\.2, vector: 0\.1\} replaces train\.label_dropout=0\.1 \(the "
            r"joint dropout of a row's conditions\): set train\.label_dropout=0; \(2\) train\.cond_dropout "
            r"names vector, which the model is not built for \(it takes image\): drop it$",
        ),
        (
            [
                "train.label_dropout=0",
                "data.labels=true",
                "model.num_classes=10",
                "train.cond_dropout={image: 0.2}",
            ],
            r"train\.cond_dropout gives no probability for label: name every kind the model takes \(label, "
            r"image\), 0 to never drop one$",
        ),
        (
            ["train.label_dropout=0", "train.cond_dropout={image: 1.5}"],
            r"'train\.cond_dropout'.*expected a probability in \[0, 1\], a mapping kind -> probability",
        ),
        (
            ["train.label_dropout=0", "train.cond_dropout=often"],
            r"'train\.cond_dropout'.*expected a number, a",
        ),
        (
            [
                "train.label_dropout=0",
                "data.labels=true",
                "model.num_classes=10",
                "model.null_label=false",
                "train.cond_dropout={label: 0, image: 0.1}",
            ],
            r"train\.cond_dropout=\{image: 0\.1, label: 0\} but model\.null_label=false: the labels have no "
            r"null to drop them to; set model\.null_label=true or train\.cond_dropout=null$",
        ),
    ],
)
def test_a_cond_dropout_the_model_cannot_take_is_refused_when_read(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(SUPERRES_YAML, overrides)


@pytest.mark.parametrize(
    ("cond_dropout", "label", "image"),
    [("{label: 0.0, image: 1.0}", 0.0, 1.0), ("{label: 1.0, image: 0.0}", 1.0, 0.0), ("0.5", 0.5, 0.5)],
)
def test_cond_dropout_drops_each_kind_at_its_own_rate(tmp_path, cond_dropout, label, image):
    labelled = ("data.labels=true", "model.num_classes=10", "train.label_dropout=0")
    trainer = Trainer(tiny_superres(tmp_path / "run", *labelled, f"train.cond_dropout={cond_dropout}"))
    seen = []
    forward = trainer.forward
    trainer.forward = lambda x, t, y: seen.append(y) or forward(x, t, y)
    x0, labels = (
        torch.stack(column) for column in zip(*[trainer.dataset[i] for i in range(16)], strict=True)
    )
    torch.manual_seed(0)
    assert torch.isfinite(trainer._loss(x0, labels))
    (cond,) = seen
    assert cond.kinds == ("label", "image")
    # A dropped label goes to the network as the null label, 10; a dropped image stays marked dropped
    dropped = {"label": cond["label"] == 10, "image": cond.is_dropped("image")}
    for kind, p in (("label", label), ("image", image)):
        if p in (0.0, 1.0):
            assert bool(dropped[kind].all()) == (p == 1.0) and bool(dropped[kind].any()) == (p == 1.0), kind
    # The setting travels with the run: its config file reads back the same
    save_config(trainer.config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").train.cond_dropout == trainer.config.train.cond_dropout
    if label == image == 0.5:  # each kind drawn on its own: not the same rows, as the joint dropout drops
        assert 0 < int(dropped["label"].sum()) < 16 and not torch.equal(dropped["label"], dropped["image"])


def test_a_short_superres_run_trains_writes_grids_and_samples_from_its_conditions(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(tiny_superres(run))
    # The grid's conditions: the first sample.n training images' low-resolution versions
    first = torch.stack([trainer.dataset[i][0] for i in range(4)])
    assert torch.equal(trainer.evaluation.grid_cond["image"], superres_condition(first, 4))
    checkpoint = trainer.train()
    assert checkpoint == latest_checkpoint(run) and sorted(p.name for p in (run / "samples").iterdir()) == [
        "step-0000003-ema.png",
        "step-0000006-ema.png",
    ]
    loaded = load_for_sampling(run)  # the EMA weights of the last checkpoint
    model, scheduler = loaded.model, loaded.scheduler
    assert model.cond_channels == 1
    cond = Conditions({"image": superres_condition(first, 4)})
    images = generate(model, scheduler, 4, image_shape=(1, 8, 8), cond=cond, steps=2, batch_size=3)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    # Each image is drawn from its own conditions, whatever the batch: batches of 3 + 1 and of 4 agree
    whole = generate(model, scheduler, 4, image_shape=(1, 8, 8), cond=cond, steps=2)
    assert torch.allclose(images, whole, atol=1e-5)
    with pytest.raises(ValueError, match=r"conditioned on more than labels \(model\.cond_channels=1\)"):
        generate(model, scheduler, 4, image_shape=(1, 8, 8), steps=2)
    with pytest.raises(ValueError, match="cond must hold the conditions of the n=3 images"):
        generate(model, scheduler, 3, image_shape=(1, 8, 8), cond=cond, steps=2)


def test_the_fixed_batch_network_pads_conditions_with_the_first_row():
    model = perturb(tiny(cond_channels=2, cond_dim=3)).eval()
    network = FixedBatchNetwork(model, 4, mode=None)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=generator)
    t = torch.tensor([5, 50, 500])
    cond = Conditions({"image": torch.randn(3, 2, 8, 8, generator=generator), "vector": torch.randn(3, 3)})
    cond = cond.drop({"vector": torch.tensor([False, True, False])})
    assert torch.allclose(network(x, t, cond), model(x, t, cond), atol=1e-6)


def test_generate_still_samples_labels_without_conditions():
    # Labels still go as before: a class-conditional model samples its labels without cond
    model = tiny(num_classes=3).eval()
    images = generate(model, NoiseScheduler(num_train_timesteps=50), 2, image_shape=(3, 8, 8), steps=2)
    assert images.shape == (2, 3, 8, 8)


def test_a_resumed_superres_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path):
    # The condition dropout's draws are restored with the RNG: a resumed run drops the same rows
    extra = ("train.label_dropout=0.5", "train.sample_every=0")
    straight = Trainer(tiny_superres(tmp_path / "a", *extra)).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    Trainer(tiny_superres(tmp_path / "b", *extra, "train.steps=3")).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = Trainer(tiny_superres(tmp_path / "b", *extra), resume="latest").train()
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """A grey PNG of uint8 pixels (H, W)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(path)
    return path


def run_sample_cli(argv: list[str], capsys) -> tuple[int | str | None, str, str]:
    """sample.py's main(argv): (its exit code or one-line message, None when it returned; stdout; stderr)."""
    try:
        sample_cli.main(argv)
        code = None
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sample_cli_draws_one_image_per_low_resolution_image_under_its_condition(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(tiny_superres(run, "train.sample_every=0")).train()
    rng = np.random.default_rng(0)
    lows = [rng.integers(0, 256, (2, 2)) for _ in range(3)]  # the 8x8 model's 2x2 low-resolution images
    for i, low in enumerate(lows):
        write_png(tmp_path / "lows" / f"{i}.png", low)
    out = tmp_path / "grid.png"
    code, stdout, _ = run_sample_cli(
        ["--checkpoint", str(run), "--cond-image", str(tmp_path / "lows"), "--steps", "2", "--out", str(out)],
        capsys,
    )
    assert code is None and stdout.strip() == str(out)
    # The conditions are the low-resolution images upsampled as training did: each pixel a 4x4 block
    loaded = load_for_sampling(run)
    cond = read_cond_images(loaded, tmp_path / "lows")
    expected = torch.tensor(np.stack(lows), dtype=torch.float32)[:, None] / 127.5 - 1  # (3, 1, 2, 2)
    assert cond.kinds == ("image",) and cond["image"].shape == (3, 1, 8, 8)
    torch.testing.assert_close(cond["image"], upsample_low_res(expected, 4), rtol=0, atol=1e-6)
    # The grid: the three conditions in the first row, the images drawn from them in the second
    grid = np.asarray(Image.open(out).convert("L"), dtype=np.float32) / 127.5 - 1
    assert grid.shape == (2 * 9 + 1, 3 * 9 + 1)  # 8x8 cells, padding 1
    assert loaded.sampling.sampler == "unipc"  # the run's sampler, which sample.py took
    images = generate(
        loaded.model, loaded.scheduler, 3, image_shape=(1, 8, 8), cond=cond, sampler="unipc", steps=2
    )
    for i in range(3):
        cell = slice(1 + 9 * i, 9 + 9 * i)
        np.testing.assert_allclose(grid[1:9, cell], cond["image"][i, 0].numpy(), atol=1.5 / 255)
        np.testing.assert_allclose(grid[10:18, cell], images[i, 0].numpy(), atol=1.5 / 255)
    # The images follow their conditions: image 0's noise under image 1's condition gives another image
    swapped = generate(
        loaded.model,
        loaded.scheduler,
        3,
        image_shape=(1, 8, 8),
        cond=cond.rows([1, 0, 2]),
        sampler="unipc",
        steps=2,
    )
    assert not torch.allclose(swapped[0], images[0], atol=1e-2)
    # A default name says which conditions and guidance made the grid; a larger image is resized to the low
    # resolution; guidance drops the image condition to its null, in an interval, rescaled
    write_png(tmp_path / "big.png", rng.integers(0, 256, (6, 6)))
    guidance = ["--guidance-scale", "2", "--guidance-interval", "0.5", "inf", "--guidance-rescale", "0.7"]
    code, stdout, _ = run_sample_cli(
        ["--checkpoint", str(run), "--cond-image", str(tmp_path / "big.png"), "--steps", "2", *guidance],
        capsys,
    )
    name = "sample-step-0000006-ema-unipc2-guidance2-interval0.5-inf-rescale0.7-condbig-seed0-n1.png"
    assert code is None and Path(stdout.strip()).name == name
    grid = np.asarray(Image.open(stdout.strip()).convert("L"), dtype=np.float32) / 127.5 - 1
    assert grid.shape == (2 * 9 + 1, 9 + 1)
    cond = read_cond_images(loaded, tmp_path / "big.png")
    settings = {
        "sampler": "unipc",
        "steps": 2,
        "guidance_scale": 2.0,
        "guidance_interval": (0.5, float("inf")),
    }
    guided = generate(loaded.model, loaded.scheduler, 1, image_shape=(1, 8, 8), cond=cond, **settings)
    rescaled = generate(
        loaded.model, loaded.scheduler, 1, image_shape=(1, 8, 8), cond=cond, **settings, guidance_rescale=0.7
    )
    np.testing.assert_allclose(grid[10:18, 1:9], rescaled[0, 0].numpy(), atol=1.5 / 255)
    assert not torch.allclose(guided, rescaled, atol=1e-3)  # the rescale reached the sampler
    # The checkpoint's ema/ copied out of its run reads its conditions at the low resolution still: the
    # factor travels with the weights (task.json)
    shutil.copytree(latest_checkpoint(run) / EMA, tmp_path / "alone")
    alone = load_for_sampling(tmp_path / "alone")
    assert alone.run_dir is None and alone.task == {"task": "superres", "superres_factor": 4}
    torch.testing.assert_close(
        read_cond_images(alone, tmp_path / "lows")["image"], upsample_low_res(expected, 4)
    )


def test_cond_images_of_a_class_model_carry_its_labels(tmp_path):
    # A model folder outside a run: the image is read at the model's side, as the network takes it
    ddpm.save_pretrained(tmp_path / "model", tiny(cond_channels=3, num_classes=3), NoiseScheduler())
    for i in range(4):
        write_png(tmp_path / "images" / f"{i}.png", np.full((16, 16), 60 * i))
    loaded = load_for_sampling(tmp_path / "model")
    cond = read_cond_images(loaded, tmp_path / "images")
    assert cond.kinds == ("label", "image") and cond["image"].shape == (4, 3, 8, 8)
    assert cond["label"].tolist() == [0, 1, 2, 0]  # cycling over the classes, as generate's labels
    torch.testing.assert_close(
        cond["image"][:, :, 0, 0], (60 * torch.arange(4.0) / 127.5 - 1)[:, None].expand(4, 3)
    )
    assert read_cond_images(loaded, tmp_path / "images", class_label=2)["label"].tolist() == [2] * 4


@pytest.mark.parametrize(
    ("model", "argv", "pattern"),
    [
        (
            "plain",
            ["--cond-image", "lows"],
            r"^error: --cond-image \S+lows: this model takes no image condition \(model\.cond_channels is "
            r"unset\); drop --cond-image$",
        ),
        (
            "image",
            [],
            r"^error: this model is conditioned on an image \(model\.cond_channels=1\): pass --cond-image "
            r"PATH, an image or a folder of images \(for a superres run, the low-resolution ones; for an "
            r"inpaint run, the images to fill in, with --mask MASK\)$",
        ),
        (
            "image",
            ["--cond-image", "lows", "--n", "4"],
            r"^error: --n 4 with --cond-image: one image is drawn per condition image; drop --n$",
        ),
        (
            "two-channel",
            ["--cond-image", "lows"],
            r"^error: --cond-image \S+lows: the model's image condition has 2 channels, and image files are "
            r"read as 1 \(grey\) or 3 \(RGB\); pass its conditions to ddpm\.inference\.generate\(cond=\) ",
        ),
        ("image", ["--cond-image", "missing"], r"^error: \S+missing: no such file or folder; expected an"),
        (
            "image",
            ["--cond-image", "lows", "--mask", "lows"],
            r"^error: --mask \S+lows with --cond-image is for a model trained with data\.task=inpaint, and "
            r"this one's task is none: drop --mask$",
        ),
        (
            "image",
            ["--init-image", "lows", "--strength", "0.5"],
            r"^error: this model is conditioned on an image \(model\.cond_channels=1\): pass --cond-image ",
        ),
        (
            "image",
            ["--cond-image", "lows", "--guidance-scale", "2", "--guidance-interval", "1", "0.5"],
            r"^error: --guidance-interval 1 0\.5: expected two noise levels sigma_lo sigma_hi with 0 <= "
            r"sigma_lo <= sigma_hi \(sigma_hi may be inf\)$",
        ),
        (
            "image",
            ["--cond-image", "lows", "--guidance-scale", "2", "--guidance-rescale", "1.5"],
            r"^error: --guidance-rescale 1\.5: expected a number in \[0, 1\] \(0: plain guidance\)$",
        ),
        (
            "image",
            ["--cond-image", "lows", "--guidance-interval", "0.5", "2"],
            r"^error: --guidance-interval 0\.5 2: expected None without guidance \(guidance_scale=1\)$",
        ),
        (
            "image",
            ["--init-image", "lows", "--strength", "0.5", "--guidance-rescale", "0.5"],
            r"^error: editing guides at every step, unrescaled: drop --guidance-interval, "
            r"--guidance-rescale$",
        ),
    ],
)
def test_a_cond_image_or_guidance_the_model_cannot_take_is_refused_before_sampling(
    tmp_path, capsys, monkeypatch, model, argv, pattern
):
    models = {"plain": tiny(), "image": tiny(cond_channels=1), "two-channel": tiny(cond_channels=2)}
    ddpm.save_pretrained(tmp_path / "model", models[model], NoiseScheduler(num_train_timesteps=50))
    write_png(tmp_path / "lows" / "0.png", np.zeros((8, 8)))
    sampled = []
    monkeypatch.setattr(ddpm.inference, "generate", lambda *args, **kwargs: sampled.append(args))
    argv = [str(tmp_path / arg) if arg in ("lows", "missing") else arg for arg in argv]
    code, _, err = run_sample_cli(["--checkpoint", str(tmp_path / "model"), *argv, "--steps", "2"], capsys)
    assert isinstance(code, str) and "\n" not in code and re.search(pattern, code), code
    assert sampled == [] and err == ""  # nothing sampled, no sampler announced
    assert not (tmp_path / "model" / "samples").exists()
