"""python -m ddpm.nll: the variational bound of a run's model on its data set, in bits/dim."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_condition_files import folder_config, make_folder
from test_fid import tiny_run
from test_unet import TINY, perturb

import ddpm
from ddpm.conditions import Conditions
from ddpm.config import Config, DataConfig, build_model, save_config
from ddpm.data import TensorImageDataset, build_dataset, collate_batch, superres_condition
from ddpm.models.unet import UNet
from ddpm.nll import image_nll, main, quantize
from ddpm.samplers import denoiser
from ddpm.schedule import NoiseScheduler
from ddpm.vlb import variational_bound


def test_quantize_rounds_to_the_256_levels():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0])
    levels = torch.round((quantize(x) + 1) * 127.5)
    torch.testing.assert_close((levels / 127.5 - 1), quantize(x))
    assert levels.tolist() == [0, 0, 0, 128, 191, 255, 255]  # 127.5 rounds half to even


class LabelledToy(torch.nn.Module):
    """A class-conditional "model" predicting x0 = scale x with zero variance values (learned_range),
    recording each call's labels and timesteps."""

    num_classes, null_class = 3, 3

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((y.clone(), t.clone()))
        return torch.cat([self.scale * x + 0.01 * t.view(-1, 1, 1, 1), torch.zeros_like(x)], dim=1)


SCHEDULER = NoiseScheduler(num_train_timesteps=20, prediction_type="sample", variance_type="learned_range")
IMAGES = torch.linspace(-1, 1, 5 * 4).reshape(5, 1, 2, 2)
LABELS = torch.tensor([0, -1, 2, 1, -1])


def toy_nll(model, n=5, batch_size=3):
    dataset = TensorImageDataset(IMAGES, LABELS, num_classes=3)
    return image_nll(model, SCHEDULER, dataset, n=n, batch_size=batch_size, progress=False)


def test_image_nll_is_the_mean_bound_with_its_standard_error():
    """Calls of 3 rows (image, timestep) over 5 images x 20 timesteps give each image's whole bound (as
    variational_bound on all five with the same noise), their mean and std / sqrt(n); each row has its image's
    label, the null label for an image without one."""
    model = LabelledToy()
    result = toy_nll(model)
    labels, timesteps = (torch.cat(column) for column in zip(*model.calls, strict=True))
    assert torch.equal(labels, torch.tensor([0, 3, 2, 1, 3]).repeat_interleave(20))
    assert torch.equal(timesteps, torch.arange(19, -1, -1).repeat(5))
    assert [len(y) for y, _ in model.calls] == [3] * 33 + [1]
    y = torch.tensor([0, 3, 2, 1, 3])
    expected = variational_bound(
        lambda x_t, t, image: denoiser(LabelledToy(), SCHEDULER, y=y[image])(x_t, t),
        SCHEDULER,
        quantize(IMAGES),
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(result.per_image, expected.total.double())
    assert result.bits_per_dim == pytest.approx(result.per_image.mean().item())
    assert result.stderr == pytest.approx(result.per_image.std().item() / math.sqrt(5))
    assert result.terms.shape == (20,) and result.bits_per_dim == pytest.approx(
        result.terms.sum().item() + result.prior
    )
    with pytest.raises(ValueError, match=r"n must be in 1\.\.5"):
        toy_nll(LabelledToy(), n=6)


def test_each_images_bound_depends_neither_on_the_batch_size_nor_on_n():
    """Image i's noise is its own draw: 1, 3, 7 or 100 rows per call, and 2 images or 5, give the same bound
    of each image (one network call per 100 rows when 100 fit)."""
    results = {batch: toy_nll(LabelledToy(), batch_size=batch).per_image for batch in (1, 3, 7)}
    many = LabelledToy()
    results[100] = toy_nll(many, batch_size=100).per_image
    assert len(many.calls) == 1
    for batch, per_image in results.items():
        torch.testing.assert_close(per_image, results[3], msg=f"batch size {batch}")
    torch.testing.assert_close(toy_nll(LabelledToy(), n=2).per_image, results[3][:2])


def test_the_cli_scores_a_run_on_the_held_out_split_and_says_what_it_costs(tmp_path, capsys):
    """The run's data (digits, labels 0-9) does not fit its 2-class model: refused; --data names a config
    whose data section has no labels, scored on the null label, on the digits' held-out split by default
    (the same number as image_nll on those images), on the training images with --split train. Before the
    start, stderr gives the cost in network calls (2 images x 50 timesteps in calls of 40 rows: 3), and the
    bar counts them."""
    model, scheduler, _ = tiny_run(tmp_path / "run")
    with pytest.raises(SystemExit, match=r"error: the data has label \d but the model has num_classes=2"):
        main([str(tmp_path / "run"), "--n", "4", "--device", "cpu"])
    (tmp_path / "data.yaml").write_text("data: {image_size: 8, labels: false}\n")
    args = ["--data", str(tmp_path / "data.yaml"), "--n", "2", "--batch", "40", "--device", "cpu"]
    capsys.readouterr()
    main([str(tmp_path / "run"), *args, "--json", str(tmp_path / "test.json")])
    out, err = capsys.readouterr()
    assert out.startswith("bits/dim: ") and "standard error over 2 images of digits, test split" in out
    assert "T = 50 terms, ema weights, variance fixed_small" in out
    assert "2 images x T = 50 timesteps = 100 rows: 3 network calls of up to 40 rows on cpu" in err
    assert "3/3 [" in err and "call/s" in err
    payload = json.loads((tmp_path / "test.json").read_text())
    assert payload["n"] == 2 and len(payload["terms"]) == 50 and payload["split"] == "test"
    assert f"{payload['bits_per_dim']:.4f} +- {payload['stderr']:.4f}" in out
    for split, bits in [("test", payload["bits_per_dim"]), ("train", None)]:
        images = build_dataset(DataConfig(image_size=8, labels=False, split=split))
        expected = image_nll(model, scheduler, images, n=2, batch_size=40, progress=False).bits_per_dim
        if bits is None:
            main([str(tmp_path / "run"), *args, "--split", "train", "--json", str(tmp_path / "train.json")])
            bits = json.loads((tmp_path / "train.json").read_text())["bits_per_dim"]
        assert bits == pytest.approx(expected, rel=1e-6), split
    assert "2 images of digits, train split" in capsys.readouterr().out


def test_a_folder_has_no_test_split_and_an_old_digits_run_is_not_held_out(tmp_path, capsys):
    """--split test on a folder data set is refused, naming the fix; without --split a folder is scored as
    it is (train). A run whose config.yaml predates data.split trained on every digit: scoring its test
    split warns that it is not held out."""
    model, _, _ = tiny_run(tmp_path / "run")
    (tmp_path / "pngs").mkdir()
    for i in range(2):
        Image.new("L", (8, 8), 40 * i).save(tmp_path / "pngs" / f"{i}.png")
    data = DataConfig(dataset="folder", root=str(tmp_path / "pngs"), image_size=8, labels=False)
    save_config(Config(data=data), tmp_path / "folder.yaml")
    args = [str(tmp_path / "run"), "--data", str(tmp_path / "folder.yaml"), "--device", "cpu"]
    with pytest.raises(
        SystemExit, match="error: data.split=test but data.dataset 'folder' has no such split"
    ):
        main([*args, "--split", "test"])
    main([*args, "--batch", "100"])
    assert "standard error over 2 images of folder, train split" in capsys.readouterr().out
    config = tmp_path / "run" / "config.yaml"
    config.write_text(config.read_text().replace("  split: train\n", ""))
    with pytest.raises(SystemExit, match=r"label \d but the model has num_classes=2"):
        main([str(tmp_path / "run"), "--device", "cpu"])
    assert "warning: this run trained on its test images too" in capsys.readouterr().err


def test_tqdm_disable_turns_the_bar_off_but_not_the_cost(tmp_path):
    """TQDM_DISABLE=1 in the environment, as for every tqdm bar: no bar; the cost line stays."""
    tiny_run(tmp_path / "run")
    (tmp_path / "data.yaml").write_text("data: {image_size: 8, labels: false}\n")
    command = [sys.executable, "-m", "ddpm.nll", str(tmp_path / "run"), "--data", str(tmp_path / "data.yaml")]
    done = subprocess.run(
        [*command, "--n", "1", "--batch", "25", "--device", "cpu"],
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
        check=True,
    )
    assert done.stderr == "1 image x T = 50 timesteps = 50 rows: 2 network calls of up to 25 rows on cpu\n"
    assert done.stdout.startswith("bits/dim: ")


def test_the_cli_refuses_a_folder_without_a_data_set(tmp_path):
    tiny_run(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").unlink()
    with pytest.raises(
        SystemExit, match="error: .*belongs to no run, so its data set is unknown: pass --data"
    ):
        main([str(tmp_path / "run" / "checkpoints" / "step-0000005"), "--device", "cpu"])


def scored_json(argv: list[str], out: Path) -> dict:
    main([*argv, "--device", "cpu", "--json", str(out)])
    return json.loads(out.read_text())


def bound_given(model, scheduler, images: torch.Tensor, cond: Conditions) -> torch.Tensor:
    """Each image's bound (bits/dim) with its own row of `cond`, by `variational_bound` itself."""
    return variational_bound(
        lambda x_t, t, image: denoiser(model, scheduler, cond=cond.rows(image))(x_t, t),
        scheduler,
        quantize(images),
        generator=torch.Generator().manual_seed(0),
    ).total.double()


def test_a_superres_model_is_scored_given_each_image_s_low_resolution_version(tmp_path):
    """The task saved with the weights gives each held-out digit its condition (the digit area-downsampled
    and upsampled back): the bound is that of the model given it, and another image's condition gives
    another bound."""
    torch.manual_seed(0)
    model = perturb(UNet(**{**TINY, "in_channels": 1, "out_channels": 1, "cond_channels": 1})).eval()
    scheduler = NoiseScheduler(num_train_timesteps=10)
    ddpm.save_pretrained(
        tmp_path / "model", model, scheduler, task={"task": "superres", "superres_factor": 4}
    )
    (tmp_path / "data.yaml").write_text("data: {image_size: 8, labels: false}\n")
    argv = [str(tmp_path / "model"), "--data", str(tmp_path / "data.yaml"), "--n", "3", "--batch", "7"]
    payload = scored_json(argv, tmp_path / "nll.json")
    images = torch.stack(
        [build_dataset(DataConfig(image_size=8, labels=False, split="test"))[i][0] for i in range(3)]
    )
    cond = Conditions({"image": superres_condition(images, 4)})
    per_image = bound_given(model, scheduler, images, cond)
    assert payload["bits_per_dim"] == pytest.approx(per_image.mean().item(), rel=1e-6)
    swapped = bound_given(model, scheduler, images, cond.rows([1, 2, 0]))
    assert abs(swapped.mean().item() - per_image.mean().item()) > 1e-4


def test_a_model_on_condition_files_is_scored_given_each_image_s_files(tmp_path):
    """A folder with condition files beside its images (a vector, a token sequence, an image): each image
    is scored with its own files, as training fed them."""
    make_folder(tmp_path / "data", n=4)
    config = folder_config(tmp_path / "data", run=tmp_path / "run")
    save_config(config, tmp_path / "data.yaml")
    torch.manual_seed(0)
    model = perturb(build_model(config.model)).eval()
    scheduler = NoiseScheduler(num_train_timesteps=10)
    ddpm.save_pretrained(tmp_path / "model", model, scheduler)
    argv = [str(tmp_path / "model"), "--data", str(tmp_path / "data.yaml"), "--n", "3", "--batch", "8"]
    payload = scored_json(argv, tmp_path / "nll.json")
    dataset = build_dataset(config.data, config.model)
    images, _, cond = collate_batch([dataset[i] for i in range(3)])
    assert cond.kinds == ("image", "vector", "context")
    per_image = bound_given(model, scheduler, images, cond)
    assert payload["bits_per_dim"] == pytest.approx(per_image.mean().item(), rel=1e-6)
    swapped = bound_given(model, scheduler, images, cond.rows([1, 2, 0]))
    assert abs(swapped.mean().item() - per_image.mean().item()) > 1e-4
