"""python -m ddpm.nll: the variational bound of a run's model on its data set, in bits/dim."""

import json
import math

import pytest
import torch
from test_fid import tiny_run

from ddpm.data import TensorImageDataset
from ddpm.nll import image_nll, main, quantize
from ddpm.samplers import denoiser
from ddpm.schedule import NoiseScheduler
from ddpm.vlb import variational_bound


def test_quantize_rounds_to_the_256_levels():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0])
    levels = torch.round((quantize(x) + 1) * 127.5)
    torch.testing.assert_close((levels / 127.5 - 1), quantize(x))
    assert levels.tolist() == [0, 0, 0, 128, 191, 255, 255]  # 127.5 rounds half to even


def test_image_nll_is_the_mean_bound_with_its_standard_error():
    """Batches of 3 over 5 images give each image's whole bound (as variational_bound on it with the same
    noise), their mean and std / sqrt(n); a conditional model scores images without a label on its null
    label."""
    scheduler = NoiseScheduler(
        num_train_timesteps=20, prediction_type="sample", variance_type="learned_range"
    )
    seen = []

    class Model(torch.nn.Module):
        num_classes, null_class = 3, 3

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x, t, y):
            seen.append(y.clone())
            return torch.cat([self.scale * x, torch.zeros_like(x)], dim=1)

    images = torch.linspace(-1, 1, 5 * 4).reshape(5, 1, 2, 2)
    labels = torch.tensor([0, -1, 2, 1, -1])
    result = image_nll(
        Model(),
        scheduler,
        TensorImageDataset(images, labels, num_classes=3),
        n=5,
        batch_size=3,
        progress=False,
    )
    assert torch.equal(seen[0], torch.tensor([0, 3, 2])) and torch.equal(seen[-1], torch.tensor([1, 3]))
    generator = torch.Generator().manual_seed(0)
    first = variational_bound(
        denoiser(Model(), scheduler, y=torch.tensor([0, 3, 2])),
        scheduler,
        quantize(images[:3]),
        generator=generator,
    )
    torch.testing.assert_close(result.per_image[:3], first.total.double())
    assert result.bits_per_dim == pytest.approx(result.per_image.mean().item())
    assert result.stderr == pytest.approx(result.per_image.std().item() / math.sqrt(5))
    assert result.terms.shape == (20,) and result.bits_per_dim == pytest.approx(
        result.terms.sum().item() + result.prior
    )
    with pytest.raises(ValueError, match=r"n must be in 1\.\.5"):
        image_nll(Model(), scheduler, TensorImageDataset(images, labels, num_classes=3), n=6)


def test_the_cli_scores_a_run_on_its_data_set(tmp_path, capsys):
    """The run's data (digits, labels 0-9) does not fit its 2-class model: refused; --data names a config
    whose data section has no labels, scored on the null label."""
    tiny_run(tmp_path / "run")
    with pytest.raises(SystemExit, match="error: the data has label 3 but the model has num_classes=2"):
        main([str(tmp_path / "run"), "--n", "4", "--device", "cpu"])
    (tmp_path / "data.yaml").write_text("data: {image_size: 8, labels: false}\n")
    args = [
        "--data",
        str(tmp_path / "data.yaml"),
        "--n",
        "2",
        "--device",
        "cpu",
        "--json",
        str(tmp_path / "n.json"),
    ]
    main([str(tmp_path / "run"), *args])
    out = capsys.readouterr().out
    assert out.startswith("bits/dim: ") and "standard error over 2 images of digits" in out
    assert "T = 50 terms, ema weights, variance fixed_small" in out
    payload = json.loads((tmp_path / "n.json").read_text())
    assert payload["n"] == 2 and len(payload["terms"]) == 50 and payload["bits_per_dim"] > 0
    assert f"{payload['bits_per_dim']:.4f} +- {payload['stderr']:.4f}" in out


def test_the_cli_refuses_a_folder_without_a_data_set(tmp_path):
    tiny_run(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").unlink()
    with pytest.raises(
        SystemExit, match="error: .*belongs to no run, so its data set is unknown: pass --data"
    ):
        main([str(tmp_path / "run" / "checkpoints" / "step-0000005"), "--device", "cpu"])
