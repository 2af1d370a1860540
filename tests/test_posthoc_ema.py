"""Post-hoc EMA (Karras et al. 2024): the power-function profile maths against closed forms, the least-squares
reconstruction against EMAs tracked directly, and the snapshots of a training run (exact resume, the CLI)."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import safetensors.torch
import torch
from accelerate.state import AcceleratorState
from safetensors import SafetensorError
from safetensors.torch import load_file
from test_condition_files import folder_config, make_folder
from test_superres import tiny_superres
from test_train import tiny_config

from ddpm.conditions import Conditions
from ddpm.config import ConfigError
from ddpm.data import build_dataset, collate_batch, superres_condition
from ddpm.ema import (
    SIGMA_REL_MAX,
    PowerFunctionEMA,
    gamma_to_sigma_rel,
    posthoc_coefficients,
    power_beta,
    profile_inner_products,
    sigma_rel_to_gamma,
)
from ddpm.ema.__main__ import main as ema_main
from ddpm.ema.posthoc import denoising_score, list_snapshots, load_run, posthoc_model, reconstruct
from ddpm.inference import load_for_sampling
from ddpm.io import CheckpointError
from ddpm.losses import diffusion_loss
from ddpm.source import load_pretrained
from ddpm.training import Trainer


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.08, 0.10, 0.2, 0.28])
def test_gamma_gives_a_profile_whose_relative_std_is_sigma_rel(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma > 0
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    # The profile at t = 1, p(tau) = (gamma + 1) tau^gamma on [0, 1]: its std is sigma_rel (Eq. 123)
    tau = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    p = (gamma + 1) * tau**gamma
    mean = torch.trapezoid(tau * p, tau)
    var = torch.trapezoid((tau - mean) ** 2 * p, tau)
    assert torch.trapezoid(p, tau).item() == pytest.approx(1, abs=1e-5)
    assert var.sqrt().item() == pytest.approx(sigma_rel, rel=1e-5)


def test_known_exponents_and_the_refused_widths():
    # The paper's two training profiles (Sec. 3.1): sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.9722, abs=1e-4)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.9372, abs=1e-4)
    assert gamma_to_sigma_rel(0) == pytest.approx(SIGMA_REL_MAX)  # a uniform average
    for bad in (0.0, -0.1, SIGMA_REL_MAX, 0.3):
        with pytest.raises(ValueError, match=r"sigma_rel must lie in \(0, 1/sqrt\(12\) = 0.2887\)"):
            sigma_rel_to_gamma(bad)


def test_tracked_ema_weights_each_step_by_the_power_profile():
    """The weights beta_t gives the steps form (gamma + 1) tau^gamma / t^(gamma + 1), up to discretisation."""
    gamma, T = sigma_rel_to_gamma(0.1), 4000
    weights = np.zeros(T + 1)
    for t in range(1, T + 1):  # ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t, on indicator trajectories
        weights *= power_beta(gamma, t)
        weights[t] = 1 - power_beta(gamma, t)
    assert weights.sum() == pytest.approx(1, abs=1e-12) and weights[0] == 0
    tau = np.arange(T + 1)
    expected = (gamma + 1) * tau**gamma / T ** (gamma + 1)
    assert np.abs(weights - expected).max() < 2e-3 * expected.max()


def test_inner_products_match_numerical_integration():
    tau = np.linspace(0, 1000, 2_000_001)
    for (t_a, g_a), (t_b, g_b) in [
        ((1000, 6.9), (700, 17.0)),
        ((300, 3.0), (1000, 9.5)),
        ((500, 2.0), (500, 2.0)),
    ]:
        p_a = np.where(tau <= t_a, (g_a + 1) * tau**g_a / t_a ** (g_a + 1), 0)
        p_b = np.where(tau <= t_b, (g_b + 1) * tau**g_b / t_b ** (g_b + 1), 0)
        numeric = np.trapezoid(p_a * p_b, tau)
        assert profile_inner_products(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-5)
        assert profile_inner_products(t_b, g_b, t_a, g_a) == pytest.approx(numeric, rel=1e-5)


def track(trajectory: torch.Tensor, sigma_rels, every: int):
    """Follow `trajectory` (T + 1, D) with a PowerFunctionEMA; returns it and its snapshots
    [(step, sigma_rel, (D,) weights)] every `every` steps."""
    net = torch.nn.Linear(trajectory.shape[1], 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(trajectory[0])
    ema, snapshots = PowerFunctionEMA(net, sigma_rels), []
    for t in range(1, len(trajectory)):
        with torch.no_grad():
            net.weight.copy_(trajectory[t])
        ema.update(net, t)
        if t % every == 0:
            snapshots += [
                (t, s, m.weight[0].clone()) for s, m in zip(ema.sigma_rels, ema.modules, strict=True)
            ]
    return ema, snapshots


def test_reconstruction_matches_an_ema_tracked_directly_with_that_profile():
    g = torch.Generator().manual_seed(0)
    T, D = 2000, 64
    walk = torch.cumsum(torch.randn(T + 1, D, generator=g, dtype=torch.float64), 0) * 0.01
    trajectory = walk + torch.sin(torch.linspace(0, 6, T + 1, dtype=torch.float64))[:, None]
    _, snapshots = track(trajectory, (0.05, 0.10), every=50)
    truth, _ = track(trajectory, (0.08, 0.15), every=T)
    steps, widths, values = zip(*snapshots, strict=True)
    x = posthoc_coefficients(steps, widths, T, [0.08, 0.15])
    assert np.allclose(x.sum(0), 1)
    for k, module in enumerate(truth.modules):
        rebuilt = (torch.from_numpy(x[:, k])[:, None] * torch.stack(values)).sum(0)
        moved = (trajectory[T] - module.weight[0]).abs().max()  # how far the EMA lags the weights
        error = (rebuilt - module.weight[0]).abs().max()
        assert error < 1e-4 * moved, (truth.sigma_rels[k], error, moved)
    # A tracked profile at a snapshot's time is that snapshot, alone
    x = posthoc_coefficients(steps, widths, 1000, [0.10])[:, 0]
    assert x[list(zip(steps, widths, strict=True)).index((1000, 0.10))] == pytest.approx(1, abs=1e-9)
    assert np.abs(x).sum() == pytest.approx(1, abs=1e-9)


def test_config_checks_the_posthoc_settings(tmp_path):
    config = tiny_config(tmp_path, "train.posthoc_ema_every=2", "train.posthoc_ema_sigma_rels=[0.05,0.12]")
    assert config.train.posthoc_ema_every == 2 and config.train.posthoc_ema_sigma_rels == (0.05, 0.12)
    assert tiny_config(tmp_path).train.posthoc_ema_every == 0  # off by default
    for bad in ("[0.05,0.3]", "[0.1,0.1]", "[]"):
        with pytest.raises(
            ConfigError, match=r"train.posthoc_ema_sigma_rels.*distinct numbers in \(0, 0.2887\)"
        ):
            tiny_config(tmp_path, f"train.posthoc_ema_sigma_rels={bad}")


POSTHOC = ("train.posthoc_ema_every=2", "train.sample_every=0")


def snapshot_tensors(run) -> dict[int, dict[str, torch.Tensor]]:
    return {s.step: load_file(s.path) for s in list_snapshots(run)}


def test_a_resumed_run_writes_the_same_snapshots_as_an_uninterrupted_one(tmp_path):
    Trainer(tiny_config(tmp_path / "a", *POSTHOC)).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    # Stopped after step 4 (checkpoints at 3 and 4, snapshots at 2 and 4), then resumed from the older
    # checkpoint 3: the snapshot of step 4 belongs to the abandoned branch and is set aside, then rewritten.
    Trainer(tiny_config(tmp_path / "b", *POSTHOC, "train.steps=4")).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    older = tmp_path / "b" / "checkpoints" / "step-0000003"
    Trainer(tiny_config(tmp_path / "b", *POSTHOC), resume=str(older)).train()

    a, b = snapshot_tensors(tmp_path / "a"), snapshot_tensors(tmp_path / "b")
    assert sorted(a) == sorted(b) == [2, 4, 6]
    for step in a:
        assert a[step].keys() == b[step].keys()
        for key in a[step]:
            torch.testing.assert_close(a[step][key], b[step][key], rtol=0, atol=0, msg=f"{step} {key}")
    assert (
        tmp_path / "b" / "posthoc_ema" / "abandoned-after-step-0000003" / "step-0000004.safetensors"
    ).is_file()
    # The checkpoint holds the trackers: resuming with other widths, or one without them, is refused
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(
        CheckpointError, match=r"sigma_rel=\[0.05, 0.1\].*posthoc_ema_sigma_rels=\[0.05, 0.2\]"
    ):
        Trainer(
            tiny_config(tmp_path / "b", *POSTHOC, "train.posthoc_ema_sigma_rels=[0.05,0.2]"), resume="latest"
        )
    AcceleratorState._reset_state(reset_partial_state=True)
    checkpoint = tmp_path / "a" / "checkpoints" / "step-0000003"
    (checkpoint / "posthoc_ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no post-hoc EMA state.*train.posthoc_ema_every=0"):
        Trainer(tiny_config(tmp_path / "c", *POSTHOC), resume=str(checkpoint))


def test_cli_reconstructs_a_model_folder_and_sweeps(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(tiny_config(run, *POSTHOC, "train.posthoc_ema_sigma_rels=[0.05,0.1]")).train()
    out = tmp_path / "phema"
    ema_main([str(run), "--sigma-rel", "0.1", "--out", str(out)])
    model, scheduler = load_pretrained(out)
    # sigma_rel 0.10 at the last snapshot is tracked: the folder holds that snapshot's profile exactly
    last = load_file(list_snapshots(run)[-1].path)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, last[f"1/{name}"], rtol=0, atol=2e-6, msg=name)
    assert scheduler.config == load_run(run)[1].config
    made_from = json.loads((out / "posthoc_ema.json").read_text())
    assert (
        made_from["sigma_rel"] == 0.1 and made_from["step"] == 6 and made_from["snapshot_steps"] == [2, 4, 6]
    )
    assert load_for_sampling(out).weights == "posthoc-ema"  # named so in grids, and FID takes it as EMA

    ema_main([str(run), "--sweep", "0.05,0.15", "--n", "32", "--out", str(tmp_path / "best")])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["0.0500", "0.1500"]
    losses = [float(line.split()[3]) for line in lines]
    assert all(math.isfinite(v) and v > 0 for v in losses)
    best = load_pretrained(tmp_path / "best")[0].state_dict()
    expected = reconstruct(run, posthoc_model(load_run(run)[0]), [[0.05, 0.15][int(np.argmin(losses))]])[0]
    for name, value in best.items():
        torch.testing.assert_close(value, expected[name], msg=name)


def test_cli_writes_the_model_folder_whole_or_not_at_all(tmp_path, monkeypatch):
    """A failed weights write (safetensors' error, as on a full disk) is one line naming --out and leaves no
    partial folder, nor a temporary one; an earlier output stays as it was, and a later write replaces it
    whole; a folder holding anything else is refused, untouched."""
    run = tmp_path / "run"
    Trainer(tiny_config(run, *POSTHOC, "train.steps=2", "train.checkpoint_every=2")).train()
    out = tmp_path / "phema"

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def failed_write(sigma_rel: str) -> str:
        with monkeypatch.context() as patch, pytest.raises(SystemExit) as exit_:
            patch.setattr(safetensors.torch, "save_file", full_disk)  # under the mixin's save_model
            ema_main([str(run), "--sigma-rel", sigma_rel, "--out", str(out)])
        return exit_.value.code

    message = failed_write("0.1")
    disk_full = "Error while serializing: I/O error: No space left on device (os error 28)"
    assert message == f"error: cannot write {out}: {disk_full}"
    assert sorted(os.listdir(tmp_path)) == ["run"]
    ema_main([str(run), "--sigma-rel", "0.1", "--out", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "noise_scheduler.json",
        "posthoc_ema.json",
    ]
    assert failed_write("0.05").startswith(f"error: cannot write {out}: ")
    assert sorted(os.listdir(tmp_path)) == ["phema", "run"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    ema_main([str(run), "--sigma-rel", "0.05", "--out", str(out)])
    assert json.loads((out / "posthoc_ema.json").read_text())["sigma_rel"] == 0.05
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=rf"^error: {out} exists and holds notes.txt, which a post-hoc EMA"):
        ema_main([str(run), "--sigma-rel", "0.1", "--out", str(out)])
    assert (out / "notes.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["phema", "run"]


def test_cli_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="is not a run directory"):
        ema_main([str(tmp_path), "--sigma-rel", "0.1", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--sigma-rel needs --out"):
        ema_main([str(tmp_path), "--sigma-rel", "0.1"])
    run = tmp_path / "run"
    Trainer(tiny_config(run, "train.steps=1", "train.sample_every=0")).train()
    with pytest.raises(SystemExit, match="holds no snapshots: train with train.posthoc_ema_every"):
        ema_main([str(run), "--sigma-rel", "0.1", "--out", str(tmp_path / "o")])


SHORT = ("train.steps=2", "train.checkpoint_every=2")


@pytest.mark.parametrize("kind", ["files", "superres"])
def test_runs_with_condition_files_or_a_task_score_each_image_with_its_conditions(tmp_path, kind):
    """--sweep scores with the conditions training gave each image (its condition files; the task's
    low-resolution image), and the model folder keeps the task, read by sampling and the likelihood."""
    run = tmp_path / "run"
    if kind == "files":
        make_folder(tmp_path / "data", n=8)
        config = folder_config(tmp_path / "data", *POSTHOC, *SHORT, "train.label_dropout=0", run=run)
    else:
        config = tiny_superres(run, *POSTHOC, *SHORT)
    Trainer(config).train()
    out = tmp_path / "phema"
    ema_main([str(run), "--sweep", "0.05,0.1", "--n", "4", "--out", str(out)])
    assert ((out / "task.json").is_file()) == (kind == "superres")
    assert load_for_sampling(out).task == (
        {"task": "superres", "superres_factor": 4} if kind == "superres" else {"task": "none"}
    )
    model, scheduler = load_pretrained(out)
    data = build_dataset(dataclasses.replace(config.data, hflip=False), config.model)
    indices = [i * len(data) // 4 for i in range(4)]
    x0, _, *files = collate_batch([data[i] for i in indices])
    cond = files[0] if kind == "files" else Conditions({"image": superres_condition(x0, 4)})
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=generator)
    t = scheduler.sample_timesteps(4, generator=generator)

    def loss(cond: Conditions) -> float:
        return diffusion_loss(
            model, scheduler, x0, noise, t, cond, weighting=config.train.loss_weighting
        ).item()

    score = denoising_score(model, scheduler, config, n=4, seed=0)
    assert score == pytest.approx(loss(cond), rel=1e-5)
    assert abs(loss(cond.rows([1, 2, 3, 0])) - score) > 1e-6 * score  # another image's conditions differ
