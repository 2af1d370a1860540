"""The built-in task attributes: the measured attributes against closed forms (bars of known width, intensity
and shear, a blank image), their standardisation, the condition each batch carries, the config's checks,
and a short run that saves the attributes' units with its weights and samples from --cond vectors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_superres import run_sample_cli
from test_train import TINY_RUN

from ddpm.attributes import (
    ATTRIBUTES,
    attribute_statistics,
    measure_attributes,
    standardise_attributes,
    unstandardise_attributes,
)
from ddpm.config import ConfigError, load_config, read_task_settings
from ddpm.data import batch_conditions, build_dataset, split_digits, with_attribute_statistics
from ddpm.inference import load_for_sampling
from ddpm.io import TASK_FILE
from ddpm.run_dir import RUN_CONFIG, latest_checkpoint
from ddpm.training import Trainer

ATTRIBUTES_YAML = Path(__file__).resolve().parents[1] / "configs" / "attributes_digits.yaml"
INK, THICKNESS, SLANT = (ATTRIBUTES.index(name) for name in ("ink", "thickness", "slant"))


def as_image(ink: torch.Tensor) -> torch.Tensor:
    """Ink (H, W) in [0, 1] as a one-image batch (1, 1, H, W) in [-1, 1]."""
    return (ink * 2 - 1)[None, None]


def bar(width: int, length: int, *, intensity: float = 1.0, size: int = 16) -> torch.Tensor:
    """An upright bar, `width` columns by `length` rows, of constant ink `intensity`."""
    ink = torch.zeros(size, size)
    top, left = (size - length) // 2, (size - width) // 2
    ink[top : top + length, left : left + width] = intensity
    return as_image(ink)


def sheared_stroke(shear: float, *, size: int = 16, rows: range = range(2, 14)) -> torch.Tensor:
    """A stroke of one pixel's ink per row whose centre is at x = size / 2 + shear * (y - y_mid) (x to the
    right, y upwards), each row's ink split linearly between the two pixels around its centre, so that the
    row's centroid is exactly there."""
    ink = torch.zeros(size, size, dtype=torch.float64)
    y_mid = -(rows.start + rows.stop - 1) / 2 - 0.5
    for row in rows:
        centre = size / 2 + shear * (-(row + 0.5) - y_mid)
        left = int(np.floor(centre - 0.5))
        fraction = centre - 0.5 - left
        ink[row, left], ink[row, left + 1] = 1 - fraction, fraction
    return as_image(ink)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_a_bar_measures_its_intensity_and_its_width(width):
    length = 12
    for intensity in (1.0, 0.6):
        ink, thickness, slant = measure_attributes(bar(width, length, intensity=intensity))[0].tolist()
        assert ink == pytest.approx(intensity, abs=1e-6)  # the strokes' intensity, whatever their area
        assert thickness == pytest.approx(width * length / (width + length), abs=1e-5)  # 2 area / perimeter
        assert slant == pytest.approx(0.0, abs=1e-6)  # upright


@pytest.mark.parametrize("shear", [-0.6, -0.25, 0.3, 1.0])
def test_a_sheared_stroke_measures_its_shear_as_slant(shear):
    image = sheared_stroke(shear)
    assert measure_attributes(image)[0, SLANT].item() == pytest.approx(shear, abs=1e-5)
    # Mirrored left to right it leans the other way; transposed, its ink and thickness are unchanged
    flipped = measure_attributes(image.flip(-1))[0]
    assert flipped[SLANT].item() == pytest.approx(-shear, abs=1e-5)
    torch.testing.assert_close(flipped[[INK, THICKNESS]], measure_attributes(image)[0, [INK, THICKNESS]])


def test_a_blank_image_measures_zero_and_channels_are_averaged():
    assert measure_attributes(-torch.ones(2, 3, 8, 8)).tolist() == [[0.0, 0.0, 0.0]] * 2
    grey = bar(2, 6, intensity=0.5, size=8)
    rgb = torch.cat([bar(2, 6, size=8), -torch.ones(1, 1, 8, 8), bar(2, 6, intensity=0.5, size=8)], dim=1)
    torch.testing.assert_close(measure_attributes(rgb), measure_attributes(grey))


def test_standardised_attributes_have_the_training_sets_units():
    values = torch.tensor([[0.5, 2.0, -0.1], [0.6, 3.0, 0.1], [0.7, 4.0, 0.3]])
    mean, std = attribute_statistics(values)
    assert mean == pytest.approx((0.6, 3.0, 0.1)) and std == pytest.approx((0.1, 1.0, 0.2))
    vector = standardise_attributes(values, mean, std)
    torch.testing.assert_close(vector, torch.tensor([[-1.0, -1.0, -1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    torch.testing.assert_close(unstandardise_attributes(vector, mean, std), values)
    with pytest.raises(ValueError, match="the attribute\\(s\\) thickness do not vary over these 2 images"):
        attribute_statistics(torch.tensor([[0.5, 2.0, 0.0], [0.6, 2.0, 0.1]]))


def test_each_batch_carries_the_standardised_attributes_of_its_images():
    config = load_config(ATTRIBUTES_YAML)
    dataset = build_dataset(config.data)
    state = torch.get_rng_state()
    data = with_attribute_statistics(config.data, dataset)
    assert torch.equal(torch.get_rng_state(), state)  # the measurement draws nothing from the run's RNG
    digits = split_digits("train", 16)[0] * 2 - 1  # every training digit, in [-1, 1]
    measured = measure_attributes(digits)
    assert data.attribute_mean == pytest.approx(measured.double().mean(0).tolist(), rel=1e-5)
    assert data.attribute_std == pytest.approx(measured.double().std(0).tolist(), rel=1e-5)
    images = digits[:5]
    cond = batch_conditions(data, images, None)
    assert cond.kinds == ("vector",) and cond["vector"].shape == (5, len(ATTRIBUTES))
    expected = (measured[:5] - torch.tensor(data.attribute_mean)) / torch.tensor(data.attribute_std)
    torch.testing.assert_close(cond["vector"], expected)
    with pytest.raises(ValueError, match="data.task=attributes needs data.attribute_mean and attribute_std"):
        batch_conditions(config.data, images, None)  # the units not measured yet


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (
            ["model.cond_dim=2"],
            r"^data\.task=attributes gives the network a vector of 3 attributes \(ink, thickness, slant\) "
            r"but model\.cond_dim=2: set model\.cond_dim=3$",
        ),
        (["model.cond_dim=null"], r"but model\.cond_dim=null: set model\.cond_dim=3$"),
        (["model.cond_channels=1"], r"data\.task=attributes gives none: set model\.cond_channels=null"),
        (
            ["data.attribute_mean=[0.6,2.9]", "data.attribute_std=[0.1,0.3,0.1]"],
            r"^data\.attribute_mean has 2 entries but there are 3 attributes",
        ),
        (["data.attribute_mean=[0.6,2.9,0]"], r"data\.attribute_mean is set without data\.attribute_std"),
        (
            ["data.attribute_mean=[0.6,2.9,0]", "data.attribute_std=[0.1,0,0.1]"],
            r"data\.attribute_std=\[0\.1, 0\.0, 0\.1\]: each must be > 0",
        ),
        (
            ["data.task=none", "model.cond_dim=null", "data.attribute_mean=[0.6,2.9,0]"],
            r"data\.attribute_mean is set, but data\.task=none: set data\.task=attributes",
        ),
        (["train.fid_every=100"], r"train\.fid_every=100 with data\.task=attributes"),
    ],
)
def test_an_attributes_config_that_cannot_work_is_refused_when_read(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(ATTRIBUTES_YAML, overrides)


def test_a_short_run_saves_the_units_with_its_weights_and_samples_from_vectors(tmp_path, capsys):
    run = tmp_path / "run"
    extra = ["model.attention_resolutions=[4]", "train.sample_every=0", f"output_dir={run}"]
    config = load_config(ATTRIBUTES_YAML, [*TINY_RUN, *extra])
    trainer = Trainer(config)
    digits = split_digits("train", 8)[0] * 2 - 1
    mean, std = attribute_statistics(measure_attributes(digits))
    assert trainer.config.data.attribute_mean == pytest.approx(mean, rel=1e-5)
    # The grid's conditions: the first sample.n training digits' attributes, in those units
    expected = standardise_attributes(measure_attributes(digits[:4]), mean, std)
    torch.testing.assert_close(trainer.evaluation.grid_cond["vector"], expected, rtol=1e-5, atol=1e-5)
    trainer.train()
    # The units travel with the run's config and with each model folder (task.json), where sampling reads them
    assert load_config(run / RUN_CONFIG).data.attribute_std == pytest.approx(std, rel=1e-5)
    saved = json.loads((latest_checkpoint(run) / "ema" / TASK_FILE).read_text())
    assert saved["task"] == "attributes" and saved["attribute_mean"] == pytest.approx(mean, rel=1e-5)
    assert read_task_settings(saved, "task.json").attribute_std == pytest.approx(std, rel=1e-5)
    loaded = load_for_sampling(run)
    assert loaded.task == saved and loaded.model.cond_dim == len(ATTRIBUTES)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['slant'\] in task\.json; it holds task, "):
        read_task_settings({**saved, "slant": 1}, "task.json")
    # sample.py --cond: one image per vector file (the standardised attributes asked for)
    (tmp_path / "asked").mkdir()
    for i, vector in enumerate(([0.0, 0.0, 0.0], [2.0, -1.0, 1.5])):
        np.save(tmp_path / "asked" / f"{i}.npy", np.array(vector, dtype=np.float32))
    out = tmp_path / "grid.png"
    argv = ["--checkpoint", str(run), "--cond", str(tmp_path / "asked"), "--steps", "2", "--out", str(out)]
    code, stdout, _ = run_sample_cli(argv, capsys)
    assert code is None and stdout.strip() == str(out) and out.is_file()
