"""The built-in task inpaint: the masks and the condition derived from each image, the config's checks, the
trainer feeding the condition (and resuming exactly), and sample.py --cond-image with --mask building the
condition with the same function; the task travelling with the weights (task.json)."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from test_superres import run_sample_cli, write_png
from test_train import TINY_RUN, weights
from test_unet import tiny

import ddpm
from ddpm.conditions import Conditions
from ddpm.config import ConfigError, load_config
from ddpm.data import batch_conditions, inpaint_condition, inpaint_masks
from ddpm.inference import generate, load_for_sampling, read_cond_images
from ddpm.io import EMA, TASK_FILE
from ddpm.schedule import NoiseScheduler
from ddpm.training import Trainer

INPAINT_YAML = Path(__file__).resolve().parents[1] / "configs" / "inpaint_digits.yaml"


def tiny_inpaint(run_dir: Path, *extra: str):
    """configs/inpaint_digits.yaml, tiny: 8x8 digits."""
    overrides = [*TINY_RUN, "model.attention_resolutions=[4]", *extra]
    return load_config(INPAINT_YAML, [*overrides, f"output_dir={run_dir}"])


def test_the_condition_keeps_the_known_pixels_zeroes_the_hole_and_appends_the_mask():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    masks = torch.ones(2, 1, 8, 8)
    masks[0, :, 2:5, 1:7] = 0
    masks[1, :, :, 6:] = 0
    cond = inpaint_condition(images, masks)
    assert cond.shape == (2, 4, 8, 8)
    known = masks.bool().expand(-1, 3, -1, -1)
    assert torch.equal(cond[:, :3][known], images[known])  # known pixels as they are
    assert (cond[:, :3][~known] == 0).all()  # the hole: 0, mid-grey
    assert torch.equal(cond[:, 3:], masks)  # then the mask, 1 = known
    with pytest.raises(ValueError, match=r"masks must be \(N, 1, H, W\) for images \(2, 3, 8, 8\)"):
        inpaint_condition(images, masks.expand(-1, 3, -1, -1))


def test_masks_are_boxes_and_strokes_drawn_deterministically():
    masks = inpaint_masks(200, 16, generator=torch.Generator().manual_seed(3))
    assert masks.shape == (200, 1, 16, 16) and set(masks.unique().tolist()) <= {0.0, 1.0}
    hole = 1 - masks[:, 0]
    area = hole.sum((1, 2))
    assert (area >= 1).all() and (area < 256).all()  # always a hole, always known pixels
    # A box is a full rectangle (its bounding box all hole), sides 4 to 12 (1/4 to 3/4 of 16); a stroke
    # mostly is not (a short one may be: a few small rectangles are strokes)
    rows, cols = hole.amax(2), hole.amax(1)
    rectangles = area == rows.sum(1) * cols.sum(1)
    large = rectangles & (rows.sum(1) >= 4) & (cols.sum(1) >= 4)
    assert 70 < int(large.sum()) < 130 and int(rectangles.sum()) < 140, (
        int(large.sum()),
        int(rectangles.sum()),
    )
    assert (rows[rectangles].sum(1) <= 12).all() and (cols[rectangles].sum(1) <= 12).all()
    # The same generator seed gives the same masks; the global RNG too, after the same seed
    again = inpaint_masks(200, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(masks, again)
    assert not torch.equal(masks, inpaint_masks(200, 16, generator=torch.Generator().manual_seed(4)))
    torch.manual_seed(7)
    first = inpaint_masks(5, 16)
    torch.manual_seed(7)
    assert torch.equal(first, inpaint_masks(5, 16))
    # The draws do not depend on the masks' shapes: the stream after n masks is the same at every side
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    inpaint_masks(4, 8, generator=a)
    inpaint_masks(4, 64, generator=b)
    assert torch.equal(a.get_state(), b.get_state())


def test_batch_conditions_of_inpaint_hold_the_masked_image_and_the_mask():
    config = load_config(INPAINT_YAML)
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    cond = batch_conditions(config.data, images, None, generator=torch.Generator().manual_seed(0))
    masks = inpaint_masks(4, 16, generator=torch.Generator().manual_seed(0))
    assert cond.kinds == ("image",) and torch.equal(cond["image"], inpaint_condition(images, masks))


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (
            ["model.cond_channels=1"],
            r"^data\.task=inpaint gives the network the masked image and the mask \(data\.channels \+ 1 = 2 "
            r"channels\) but model\.cond_channels=1: set model\.cond_channels=2$",
        ),
        (
            ["data.channels=3", "model.in_channels=3", "model.out_channels=3"],
            r"set model\.cond_channels=4$",
        ),
        (
            ["data.task=none"],
            r"but data\.task=none gives none: set model\.cond_channels=null, or data\.task=",
        ),
        (["train.fid_every=100"], r"train\.fid_every=100 with data\.task=inpaint"),
    ],
)
def test_an_inpaint_config_that_cannot_work_is_refused_when_read(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(INPAINT_YAML, overrides)


def test_the_trainer_feeds_the_masked_images_and_their_masks(tmp_path):
    trainer = Trainer(tiny_inpaint(tmp_path / "run", "train.label_dropout=0"))
    seen = []
    forward = trainer.forward
    trainer.forward = lambda x, t, y: seen.append(y) or forward(x, t, y)
    x0 = torch.stack([trainer.dataset[i][0] for i in range(16)])
    torch.manual_seed(0)
    trainer._loss(x0, torch.full((16,), -1))
    (cond,) = seen
    image = cond["image"]
    assert image.shape == (16, 2, 8, 8)
    masks = image[:, 1:]
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(image, inpaint_condition(x0, masks))  # the batch's own images, masked
    # Masks drawn afresh at every step
    trainer._loss(x0, torch.full((16,), -1))
    assert not torch.equal(seen[1]["image"][:, 1:], masks)
    # The grid's conditions: the first images with masks from train.seed's own generator
    first = torch.stack([trainer.dataset[i][0] for i in range(4)])
    grid_masks = inpaint_masks(4, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(trainer.evaluation.grid_cond["image"], inpaint_condition(first, grid_masks))


def test_a_resumed_inpaint_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path):
    extra = ("train.label_dropout=0.5", "train.sample_every=0")
    straight = Trainer(tiny_inpaint(tmp_path / "a", *extra)).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    Trainer(tiny_inpaint(tmp_path / "b", *extra, "train.steps=3")).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = Trainer(tiny_inpaint(tmp_path / "b", *extra), resume="latest").train()
    a, b = weights(straight), weights(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_sample_cli_inpaints_from_a_cond_image_and_a_mask_as_training_built_them(tmp_path, capsys):
    run = tmp_path / "run"
    checkpoint = Trainer(tiny_inpaint(run, "train.sample_every=0")).train()
    # The task travels with the weights: each model folder of the checkpoint describes itself
    for folder in (checkpoint, checkpoint / EMA):
        assert json.loads((folder / TASK_FILE).read_text()) == {"task": "inpaint"}
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (8, 8)) for _ in range(3)]
    for i, picture in enumerate(pictures):
        write_png(tmp_path / "images" / f"{i}.png", picture)
    keep = np.full((8, 8), 255)
    keep[2:6, 3:7] = 0  # the hole
    write_png(tmp_path / "mask.png", keep)
    out = tmp_path / "grid.png"
    argv = ["--checkpoint", str(run), "--cond-image", str(tmp_path / "images"), "--mask"]
    code, stdout, _ = run_sample_cli(
        [*argv, str(tmp_path / "mask.png"), "--steps", "2", "--out", str(out)], capsys
    )
    assert code is None and stdout.strip() == str(out)
    loaded = load_for_sampling(run)
    cond = read_cond_images(loaded, tmp_path / "images", mask=tmp_path / "mask.png")
    images = torch.tensor(np.stack(pictures), dtype=torch.float32)[:, None] / 127.5 - 1
    masks = torch.tensor(keep > 0, dtype=torch.float32).expand(3, 1, 8, 8)
    torch.testing.assert_close(cond["image"], inpaint_condition(images, masks), rtol=0, atol=1e-6)
    # The grid: the masked images (hole grey) in the first row, the images drawn from them in the second
    grid = np.asarray(Image.open(out).convert("L"), dtype=np.float32) / 127.5 - 1
    assert grid.shape == (2 * 9 + 1, 3 * 9 + 1)
    settings = {"sampler": loaded.sampling.sampler, "steps": 2}
    drawn = generate(loaded.model, loaded.scheduler, 3, image_shape=(1, 8, 8), cond=cond, **settings)
    for i in range(3):
        cell = slice(1 + 9 * i, 9 + 9 * i)
        np.testing.assert_allclose(grid[1:9, cell], cond["image"][i, 0].numpy(), atol=1.5 / 255)
        np.testing.assert_allclose(grid[10:18, cell], drawn[i, 0].numpy(), atol=1.5 / 255)
    # What is true of a trained inpainter however short its training: the hole's pixels never reach it (new
    # pixels there draw the same images), the known pixels and the mask do
    changed = [p.copy() for p in pictures]
    for p in changed:
        p[2:6, 3:7] = 255 - p[2:6, 3:7]
    for i, picture in enumerate(changed):
        write_png(tmp_path / "changed" / f"{i}.png", picture)
    same = read_cond_images(loaded, tmp_path / "changed", mask=tmp_path / "mask.png")
    assert torch.equal(same["image"], cond["image"])
    redrawn = generate(loaded.model, loaded.scheduler, 3, image_shape=(1, 8, 8), cond=same, **settings)
    torch.testing.assert_close(redrawn, drawn, rtol=0, atol=0)
    other = cond["image"].clone()
    other[:, 1, 0, 0] = 0  # one more pixel in the hole: the mask reaches the network
    moved = generate(
        loaded.model,
        loaded.scheduler,
        3,
        image_shape=(1, 8, 8),
        cond=Conditions({"image": other}),
        **settings,
    )
    assert not torch.allclose(moved, drawn, atol=1e-4)
    # The checkpoint's ema/ copied out of its run is still an inpainting model (its task.json)
    shutil.copytree(checkpoint / EMA, tmp_path / "alone")
    alone = load_for_sampling(tmp_path / "alone")
    assert alone.run_dir is None and alone.task == {"task": "inpaint"}
    torch.testing.assert_close(
        read_cond_images(alone, tmp_path / "images", mask=tmp_path / "mask.png")["image"], cond["image"]
    )


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (
            ["--cond-image", "images"],
            r"^error: this model inpaints \(data\.task=inpaint\): pass --mask MASK \(white = keep\) with "
            r"--cond-image \S+images$",
        ),
        (
            ["--cond-image", "images", "--mask", "masks"],
            r"^error: --mask \S+masks: 2 masks for 3 images; give one or as many$",
        ),
    ],
)
def test_an_inpaint_model_without_fitting_masks_is_refused_before_sampling(
    tmp_path, capsys, monkeypatch, argv, pattern
):
    ddpm.save_pretrained(
        tmp_path / "model",
        tiny(cond_channels=4),
        NoiseScheduler(num_train_timesteps=50),
        task={"task": "inpaint"},
    )
    for i in range(3):
        write_png(tmp_path / "images" / f"{i}.png", np.zeros((8, 8)))
    for i in range(2):
        write_png(tmp_path / "masks" / f"{i}.png", np.zeros((8, 8)))
    sampled = []
    monkeypatch.setattr(ddpm.inference, "generate", lambda *args, **kwargs: sampled.append(args))
    argv = [str(tmp_path / arg) if arg in ("images", "masks") else arg for arg in argv]
    code, _, err = run_sample_cli(["--checkpoint", str(tmp_path / "model"), *argv, "--steps", "2"], capsys)
    assert isinstance(code, str) and re.search(pattern, code), code
    assert sampled == [] and err == ""


def test_a_damaged_task_file_is_refused_naming_it(tmp_path):
    ddpm.save_pretrained(
        tmp_path / "model", tiny(cond_channels=1), NoiseScheduler(), task={"task": "superres"}
    )
    (tmp_path / "model" / TASK_FILE).write_text('{"task": "zoom"}')
    with pytest.raises(
        ddpm.io.CheckpointError, match=r"cannot read the task settings \S+task\.json: .*'data\.task'"
    ):
        load_for_sampling(tmp_path / "model")
