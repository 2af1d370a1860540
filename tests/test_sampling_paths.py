"""Every way to sample a trained model: the schedule it was trained with travels with its weights, every
random draw is independent of the others, and a grid's file name says what made it."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image

import ddpm
import ddpm.inference
from ddpm.config import Config, DataConfig, SampleConfig, load_config, save_config
from ddpm.inference import edit_from_checkpoint, generate, grid_from_checkpoint, load_for_sampling
from ddpm.interop.diffusers import diffusers_scheduler_config
from ddpm.io import CheckpointError, save_unet
from ddpm.models.unet import UNet
from ddpm.run_dir import TrainerState
from ddpm.samplers import solvers
from ddpm.schedule import NoiseScheduler
from ddpm.training.checkpoints import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"
TINY = dict(
    in_channels=1,
    out_channels=1,
    base_channels=8,
    channel_mult=(1,),
    num_res_blocks=1,
    attention_resolutions=(),
    image_size=8,
    norm_groups=4,
    num_classes=3,
)
# Far from NoiseScheduler()'s defaults in every key that changes the sampling maths.
TRAINED = dict(
    num_train_timesteps=40, beta_schedule="cosine", prediction_type="v_prediction", clip_sample=True
)


def tiny_unet(seed: int) -> UNet:
    torch.manual_seed(seed)
    model = UNet(**TINY)
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised layer: the raw and EMA weights differ everywhere
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture
def run(tmp_path) -> Path:
    """A run directory holding one checkpoint (step 5) written by save_checkpoint, as training writes it."""
    run = tmp_path / "run"
    scheduler = NoiseScheduler(**TRAINED)
    sample = SampleConfig(sampler="ddim", steps=2, n=3)
    data = DataConfig(image_size=TINY["image_size"], channels=TINY["in_channels"])
    config = Config(model=TINY, diffusion=scheduler.config, data=data, sample=sample, output_dir=str(run))
    save_config(config, run / "config.yaml")
    try:
        save_checkpoint(
            Accelerator(cpu=True),
            run,
            TrainerState(step=5, ema_updates=5),
            model=tiny_unet(0),
            ema_model=tiny_unet(1),
            scheduler=scheduler,
            keep=2,
        )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return run


# --- the schedule travels with the weights ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "use_ema", "label", "seed"),
    [
        ("run", True, "ema", 1),
        ("checkpoint", True, "ema", 1),
        ("checkpoint", False, "raw", 0),
        ("ema folder", True, "ema", 1),
    ],
)
def test_every_path_to_the_weights_samples_with_the_trained_schedule(run, where, use_ema, label, seed):
    checkpoint = run / "checkpoints" / "step-0000005"
    path = {"run": run, "checkpoint": checkpoint, "ema folder": checkpoint / "ema"}[where]
    loaded = load_for_sampling(path, use_ema=use_ema)
    assert loaded.weights == label and not loaded.model.training
    assert loaded.scheduler.config == NoiseScheduler(**TRAINED).config
    torch.testing.assert_close(loaded.model.state_dict(), tiny_unet(seed).state_dict(), rtol=0, atol=0)
    # the run's sample: settings come with them, and where they belong
    assert loaded.sampling == SampleConfig(sampler="ddim", steps=2, n=3)
    assert (loaded.folder, loaded.run_dir) == (checkpoint, run)


def test_a_damaged_config_json_stops_only_the_weights_it_describes(run):
    """A damaged raw config.json is a CheckpointError naming the checkpoint when the raw weights are asked
    for, and does not stand in the way of the EMA weights beside it."""
    checkpoint = run / "checkpoints" / "step-0000005"
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(
        CheckpointError, match=r"cannot load the model in \S+step-0000005: Expecting property"
    ):
        load_for_sampling(run, use_ema=False)
    assert load_for_sampling(run).weights == "ema"


def test_every_weights_folder_written_holds_its_schedule(run):
    checkpoint = run / "checkpoints" / "step-0000005"
    for folder, seed in ((checkpoint, 0), (checkpoint / "ema", 1)):
        assert json.loads((folder / "noise_scheduler.json").read_text()) == NoiseScheduler(**TRAINED).config
        model, scheduler = ddpm.load_pretrained(folder)
        assert scheduler.config == NoiseScheduler(**TRAINED).config and not model.training
        torch.testing.assert_close(model.state_dict(), tiny_unet(seed).state_dict(), rtol=0, atol=0)


def test_a_checkpoint_ema_folder_written_before_the_schedule_travelled_takes_the_checkpoints(run):
    ema = run / "checkpoints" / "step-0000005" / "ema"
    (ema / "noise_scheduler.json").unlink()
    assert ddpm.load_pretrained(ema)[1].config == NoiseScheduler(**TRAINED).config


def test_save_and_load_pretrained_round_trip(tmp_path):
    model, scheduler = tiny_unet(0), NoiseScheduler(**TRAINED)
    ddpm.save_pretrained(tmp_path / "m", model, scheduler)
    loaded, loaded_scheduler = ddpm.load_pretrained(tmp_path / "m")
    assert loaded.config == model.config and loaded_scheduler.config == scheduler.config
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_a_folder_without_a_schedule_is_refused_saying_how_to_name_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_unet(tmp_path / "bare", tiny_unet(0))
    fix = (
        r"bare has no noise_scheduler\.json, so the schedule its weights were trained with is unknown: copy "
        r"the noise_scheduler\.json of the checkpoint they came from into it, write NoiseScheduler\(\.\.\.\)"
        r"\.config there as JSON \(ddpm\.save_pretrained does\), or pass sample\.py --schedule FILE"
    )
    with pytest.raises(CheckpointError, match=fix):
        ddpm.load_pretrained(tmp_path / "bare")
    with pytest.raises(CheckpointError, match=fix):
        load_for_sampling(tmp_path / "bare")
    # --schedule names it: our noise_scheduler.json or a diffusers scheduler_config.json
    (tmp_path / "ours.json").write_text(json.dumps(NoiseScheduler(**TRAINED).config))
    diffusers = pytest.importorskip("diffusers")
    diffusers.DDPMScheduler(**diffusers_scheduler_config(NoiseScheduler(**TRAINED))).save_config(tmp_path)
    for file in ("ours.json", "scheduler_config.json"):
        loaded = load_for_sampling(tmp_path / "bare", schedule=tmp_path / file)
        assert loaded.scheduler.config == NoiseScheduler(**TRAINED).config and loaded.weights == "raw"
        # a folder outside a run: SampleConfig's defaults
        assert (loaded.sampling, loaded.folder, loaded.run_dir) == (SampleConfig(), tmp_path / "bare", None)
    ours = tmp_path / "ours.json"
    grid = grid_from_checkpoint(
        tmp_path / "bare", 1, default_config=ROOT / "configs" / "digits.yaml", steps=2, schedule=ours
    )
    assert grid == tmp_path / "bare" / "samples" / "sample-bare-raw-unipc2-seed0-n1.png" and grid.is_file()


def test_sampling_an_ema_folder_writes_an_ema_grid_into_its_run(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ema = run / "checkpoints" / "step-0000005" / "ema"
    grid = grid_from_checkpoint(ema, 2, default_config=ROOT / "configs" / "digits.yaml")
    # the run's sample: settings (ddim, 2 steps), not SampleConfig's defaults
    assert grid == run / "samples" / "sample-step-0000005-ema-ddim2-seed0-n2.png" and grid.is_file()
    with pytest.raises(CheckpointError, match=r"ema holds the EMA weights, but the raw ones were asked for"):
        grid_from_checkpoint(ema, 2, default_config=ROOT / "configs" / "digits.yaml", use_ema=False)


def test_a_model_folder_outside_a_run_samples_into_a_samples_folder_of_its_own(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ddpm.save_pretrained(tmp_path / "model", tiny_unet(0), NoiseScheduler(**TRAINED))
    grid = grid_from_checkpoint(tmp_path / "model", 2, default_config=DIGITS, steps=2)
    assert grid == tmp_path / "model" / "samples" / "sample-model-raw-unipc2-seed0-n2.png" and grid.is_file()
    assert list(elsewhere.iterdir()) == []  # nothing in the current folder
    grid = grid_from_checkpoint(tmp_path / "model", 2, default_config=DIGITS, steps=2, out="mine.png")
    assert grid == Path("mine.png") and (elsewhere / "mine.png").is_file()  # --out wins
    # A model from the Hub: its snapshot is the Hub cache's, so the grid goes to samples/ here.
    monkeypatch.setattr(ddpm.inference, "HF_HUB_CACHE", str(tmp_path))
    grid = grid_from_checkpoint(tmp_path / "model", 2, default_config=DIGITS, steps=2)
    assert grid == elsewhere / "samples" / "sample-model-raw-unipc2-seed0-n2.png" and grid.is_file()


def test_without_a_checkpoint_the_default_run_is_looked_for_in_the_current_folder(tmp_path, monkeypatch):
    """sample.py without --checkpoint reads the output_dir of the default config, runs/digits: a path relative
    to the current folder, which the error says, with the command that trains it."""
    monkeypatch.chdir(tmp_path)
    message = (
        rf"^no trained model at {re.escape(str(tmp_path / 'runs' / 'digits'))} \(the default --checkpoint: "
        r"output_dir runs/digits of digits\.yaml, relative to the current folder "
        rf"{re.escape(str(tmp_path))}\); sample from the folder you trained in, train one with "
        r"`python train\.py` \(`ddpm-train` when installed\), or pass --checkpoint PATH$"
    )
    with pytest.raises(CheckpointError, match=message):
        grid_from_checkpoint(None, 2, default_config=DIGITS)
    with pytest.raises(CheckpointError, match=message):  # the same run, never a Hub repo id runs/digits
        edit_from_checkpoint(None, "images", strength=0.5, default_config=DIGITS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, r"^--batch-size must be a positive integer, got 0$"),
        ({"seed": -1}, r"^--seed must be >= 0, got -1$"),
        ({"eta": 2.0}, r"^--eta 2\.0: expected a number in \[0, 1\]"),
        ({"steps": 0}, r"^--steps 0: expected an integer >= 1$"),
        ({"out": "edited"}, r"^--out edited: not an image file name"),
    ],
)
def test_edit_options_that_need_no_model_are_refused_before_it_is_loaded(monkeypatch, kwargs, message):
    loads = []
    monkeypatch.setattr(ddpm.inference, "load_for_sampling", lambda *args, **kw: loads.append(args))
    with pytest.raises(ValueError, match=message):
        edit_from_checkpoint("model", "images", strength=0.5, default_config=DIGITS, **kwargs)
    assert loads == []


def test_a_run_without_a_checkpoint_says_how_to_train_one(run):
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(
        CheckpointError,
        match=r"^no checkpoint in \S+run; train one with `python train\.py` \(`ddpm-train` when",
    ):
        load_for_sampling(run)


# --- grid file names ----------------------------------------------------------------------------------------


def test_a_grid_is_named_after_what_made_it_and_never_replaces_another(run):
    options = [
        ({}, "ddim2-seed0-n2"),
        ({"save_images": True, "n": 3}, "ddim2-seed0-n3"),
        ({"class_label": 1, "guidance_scale": 3.0}, "ddim2-class1-guidance3-seed0-n2"),
        ({"sampler": "ddim", "eta": 0.5, "seed": 7}, "ddim2-eta0.5-seed7-n2"),
        ({"sampler": "ddpm", "steps": 3}, "ddpm3-seed0-n2"),
        ({"sampler": "heun", "calls": 6}, "heun3-calls5-seed0-n2"),  # a Heun step costs 2 calls, the last 1
        ({"sampler": "euler", "calls": 3}, "euler3-seed0-n2"),
        ({"sampler": "heun", "steps": 2, "options": {"s_churn": 1.5}}, "heun2-calls3-s_churn1.5-seed0-n2"),
    ]
    grids = []
    for kwargs, name in options:
        kwargs = {"n": 2, **kwargs}
        grid = grid_from_checkpoint(run, default_config=ROOT / "configs" / "digits.yaml", **kwargs)
        assert grid == run / "samples" / f"sample-step-0000005-ema-{name}.png" and grid.is_file()
        grids.append(grid)
    assert sorted(p.name for p in (run / "samples").iterdir()) == sorted(
        [*(g.name for g in grids), grids[1].stem]
    )
    assert len(list((run / "samples" / grids[1].stem).glob("*.png"))) == 3  # --save-images


def test_with_every_image_saved_the_grid_shows_only_the_first(run, monkeypatch):
    # 50,000 images in one grid take longer to encode than to sample; they are all in the folder anyway.
    monkeypatch.setattr(ddpm.inference, "GRID_WITH_IMAGES", 2)
    grid = grid_from_checkpoint(run, 3, default_config=ROOT / "configs" / "digits.yaml", save_images=True)
    side = TINY["image_size"]
    assert Image.open(grid).size == (2 * (side + 1) + 1, side + 2)  # two images and their padding
    assert len(list(grid.with_suffix("").glob("*.png"))) == 3


def test_grid_says_the_steps_and_network_calls_used_and_takes_the_runs_calls_and_options(run):
    """sample.py prints what `say` is told; the run's sample.calls replaces its steps, and its solver options
    apply with its own sampler only."""
    said = []
    grid = grid_from_checkpoint(
        run, 1, default_config=ROOT / "configs" / "digits.yaml", sampler="heun", calls=4, say=said.append
    )
    assert said == ["heun: 2 steps, 3 network calls (from the calls asked for)"]
    assert grid.name == "sample-step-0000005-ema-heun2-calls3-seed0-n1.png"
    config = load_config(run / "config.yaml")
    config.sample = SampleConfig(sampler="heun", calls=5, options={"s_churn": 2.0}, n=3)
    save_config(config, run / "config.yaml")
    grid = grid_from_checkpoint(run, 1, default_config=ROOT / "configs" / "digits.yaml")
    assert grid.name == "sample-step-0000005-ema-heun3-calls5-s_churn2-seed0-n1.png"
    grid = grid_from_checkpoint(run, 1, default_config=ROOT / "configs" / "digits.yaml", sampler="euler")
    assert grid.name == "sample-step-0000005-ema-euler5-seed0-n1.png"


# --- independent noise --------------------------------------------------------------------------------------


def test_every_random_draw_of_generate_is_independent(monkeypatch):
    """x_T of every image and each ancestral noise draw of the ddpm sampler, per image: no two are alike (on
    today's main the first noise of the first image of each batch was its x_T)."""
    draws: list[torch.Tensor] = []
    real_sample, real_randn = ddpm.inference.sample, solvers.gaussian_noise

    def recording_sample(*args, noise, **kwargs):
        draws.extend(noise)
        return real_sample(*args, noise=noise, **kwargs)

    def recording_randn(*args, **kwargs):
        out = real_randn(*args, **kwargs)
        draws.extend(out)
        return out

    monkeypatch.setattr(ddpm.inference, "sample", recording_sample)
    monkeypatch.setattr(solvers, "gaussian_noise", recording_randn)
    model = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
    generate(model, NoiseScheduler(), 4, image_shape=(1, 16, 16), sampler="ddpm", steps=3, batch_size=2)
    assert len(draws) == 4 + 2 * 2 * 2  # x_T of 4 images; 2 batches x 2 noisy steps x 2 images
    flat = torch.stack([d.flatten() for d in draws])
    flat = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)
    correlation = flat @ flat.T / (flat.shape[1] - 1)
    off_diagonal = correlation - torch.eye(len(draws))
    assert off_diagonal.abs().max() < 0.4, off_diagonal.abs().max()  # independent: |r| ~ 1/16


def test_an_images_start_noise_does_not_depend_on_the_batch_size():
    model = lambda x, t, y: 0.1 * x  # noqa: E731
    options = dict(image_shape=(1, 8, 8), sampler="ddim", steps=3, seed=5)
    whole = generate(model, NoiseScheduler(), 5, batch_size=5, **options)
    torch.testing.assert_close(generate(model, NoiseScheduler(), 5, batch_size=2, **options), whole)
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        generate(model, NoiseScheduler(), 1, **{**options, "seed": -1})
