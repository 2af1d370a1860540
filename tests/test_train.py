"""End to end: train -> checkpoint -> sample -> resume, on a tiny model and the digits, on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import TINY_MODEL
from safetensors.torch import load_file

import ddpm.inference
from ddpm import sample
from ddpm.config import ConfigError, load_config
from ddpm.inference import load_for_sampling
from ddpm.io import CheckpointError, load_unet
from ddpm.run_dir import latest_checkpoint, list_checkpoints
from ddpm.training import NonFiniteLossError, Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = [
    *TINY_MODEL,
    "train.steps=6",
    "train.warmup_steps=4",
    "train.checkpoint_every=3",
    "train.keep_checkpoints=5",
    "train.sample_every=3",
    "train.log_every=1",
    "sample.steps=2",
    "sample.n=4",
    "train.log_with=none",  # no tracker, whatever is installed or logged in here (test_trackers tests them)
]
TINY = [
    *TINY_RUN,
    "model.num_res_blocks=1",
    "model.attention_resolutions=[4]",
    "model.dropout=0.1",  # dropout draws from the global RNG: resume must restore it
]


def tiny_config(run_dir: Path, *extra: str):
    return load_config(ROOT / "configs" / "digits.yaml", [*TINY, f"output_dir={run_dir}", *extra])


def tiny_classic_config(run_dir: Path, *extra: str):
    """configs/seed_digits.yaml (ClassicUNet as a diffusion backbone), tiny."""
    return load_config(ROOT / "configs" / "seed_digits.yaml", [*TINY_RUN, f"output_dir={run_dir}", *extra])


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors") | {
        f"ema.{k}": v for k, v in load_file(checkpoint / "ema" / "model.safetensors").items()
    }


def poison_step(trainer: Trainer, step: int) -> list[int]:
    """Make the first loss of optimizer step `step` NaN (nan_policy=skip retries it on the next batch);
    returns a list that grows by one at every loss computed."""
    original, calls, poisoned = trainer._loss, [], []

    def loss(x0, labels):
        calls.append(1)
        bad = trainer.state.step + 1 == step and not poisoned
        poisoned.extend([1] if bad else [])
        return original(x0, labels) * (float("nan") if bad else 1.0)

    trainer._loss = loss
    return calls


def test_train_writes_a_complete_run_directory(tmp_path):
    run = tmp_path / "run"
    last = Trainer(tiny_config(run)).train()

    assert last == run / "checkpoints" / "step-0000006"
    assert [p.name for p in list_checkpoints(run)] == ["step-0000003", "step-0000006"]
    assert (run / "config.yaml").is_file()
    assert load_config(run / "config.yaml").train.steps == 6
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step-0000003-ema.png",
        "step-0000006-ema.png",
    ]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert log[0]["lr"] < log[-1]["lr"]  # warm-up
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["ema_updates"] == 6
    for file in [
        "config.json",
        "model.safetensors",
        "ema/config.json",
        "ema/model.safetensors",
        "noise_scheduler.json",
        "optimizer.bin",
        "random_states_0.pkl",
    ]:
        assert (last / file).is_file(), file
    # Both model folders' cards recommend the run's sampler settings (its sample: section).
    sample = load_config(run / "config.yaml").sample
    for card in (last / "README.md", last / "ema" / "README.md"):
        assert f"Recommended: the `{sample.sampler}` sampler with {sample.steps} steps" in card.read_text()
    # Both weight folders load as plain UNets, and EMA differs from the raw weights.
    raw, ema = load_unet(last), load_unet(last / "ema")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(raw.state_dict().values(), ema.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("config", [tiny_config, tiny_classic_config], ids=["UNet", "ClassicUNet"])
def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, config):
    straight = Trainer(config(tmp_path / "a")).train()
    AcceleratorState._reset_state(reset_partial_state=True)

    Trainer(config(tmp_path / "b", "train.steps=3")).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = Trainer(config(tmp_path / "b"), resume="latest").train()

    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert json.loads((resumed / "trainer_state.json").read_text())["step"] == 6


def test_fresh_start_refuses_to_overwrite_and_resume_needs_a_checkpoint(tmp_path):
    Trainer(tiny_config(tmp_path / "run", "train.steps=3")).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(CheckpointError, match="already holds checkpoints.*--resume"):
        Trainer(tiny_config(tmp_path / "run"))
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(CheckpointError, match="no checkpoint in .*start without --resume"):
        Trainer(tiny_config(tmp_path / "empty"), resume="latest")


def test_resuming_an_older_checkpoint_moves_the_abandoned_newer_ones_aside(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(tiny_config(run, "train.sample_every=0")).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    older = run / "checkpoints" / "step-0000003"
    last = Trainer(tiny_config(run, "train.steps=4", "train.sample_every=0"), resume=str(older)).train()

    assert last == run / "checkpoints" / "step-0000004"
    assert [p.name for p in list_checkpoints(run)] == ["step-0000003", "step-0000004"]
    (aside,) = (run / "checkpoints").glob("abandoned-*")
    assert [p.name for p in aside.iterdir()] == ["step-0000006"]
    assert (aside / "step-0000006" / "ema" / "model.safetensors").is_file()  # kept whole, not deleted
    assert f"moved step-0000006 (newer than step 3) to {aside}" in capsys.readouterr().out
    AcceleratorState._reset_state(reset_partial_state=True)
    assert Trainer(tiny_config(run, "train.steps=4"), resume="latest").state.step == 4


def test_resume_with_another_noise_schedule_is_refused_naming_the_keys(tmp_path):
    Trainer(tiny_config(tmp_path / "run", "train.steps=3", "train.sample_every=0")).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    changed = ["diffusion.beta_schedule=linear", "diffusion.prediction_type=epsilon"]
    with pytest.raises(
        CheckpointError,
        match=r"diffusion\.beta_schedule \(checkpoint 'cosine', config 'linear'\), "
        r"diffusion\.prediction_type \(checkpoint 'v_prediction', config 'epsilon'\).*--config .*\.yaml",
    ):
        Trainer(tiny_config(tmp_path / "run", *changed), resume="latest")


def test_the_package_imports_without_being_installed(tmp_path):
    code = (
        "import importlib.metadata as metadata\n"
        "installed = metadata.version\n"
        "def version(name):\n"
        "    if name == 'ddpm':\n"
        "        raise metadata.PackageNotFoundError(name)\n"
        "    return installed(name)\n"
        "metadata.version = version\n"
        "import ddpm, ddpm.io, ddpm.run_dir\n"
        "print(ddpm.run_dir.TrainerState(step=0, ema_updates=0).ddpm_version)\n"
        "model = ddpm.UNet(base_channels=8, channel_mult=(1,), attention_resolutions=(), norm_groups=4)\n"
        f"ddpm.io.save_unet({str(tmp_path / 'unet')!r}, model)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "unknown"
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["ddpm_version"] == "unknown"


def test_nan_loss_stops_naming_the_step_and_saves_nothing_after_it(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(run, "train.steps=6"))
    original = trainer._loss

    def poisoned(x0, labels):
        loss = original(x0, labels)
        return loss * float("nan") if trainer.state.step >= 4 else loss

    trainer._loss = poisoned
    with pytest.raises(NonFiniteLossError, match=r"step 5.*last good checkpoint: .*step-0000003"):
        trainer.train()
    assert [p.name for p in list_checkpoints(run)] == ["step-0000003"]


def test_nan_policy_skip_counts_and_skips_bad_steps(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(run, "train.steps=3", "train.nan_policy=skip"))
    calls = poison_step(trainer, 2)
    last = trainer.train()
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 3
    assert len(calls) == 4
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(w).all() for w in weights(last).values())


def test_the_classic_backbone_samples_with_guidance_and_through_sample_py(tmp_path):
    Trainer(tiny_classic_config(tmp_path / "b", "train.steps=3")).train()
    loaded = load_for_sampling(tmp_path / "b")
    assert type(loaded.model).__name__ == "ClassicUNet" and loaded.weights == "ema"
    y = torch.tensor([0, 9])
    images = sample(
        loaded.model, loaded.scheduler, (2, 1, 8, 8), sampler="dpm++", steps=2, y=y, guidance_scale=2
    )
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    result = run_script(
        str(ROOT / "sample.py"), "--n", "3", "--checkpoint", str(tmp_path / "b"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip().splitlines()[-1]).is_file()


def test_a_time_free_network_is_refused_before_any_work(tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the Trainer started working on a network it cannot train")

    monkeypatch.setattr("ddpm.training.trainer.build_accelerator", no_work)
    overrides = ["model.time_conditioning=false", "model.num_classes=null"]
    with pytest.raises(ConfigError, match=r"model\.time_conditioning=false builds a segmentation network"):
        Trainer(tiny_classic_config(tmp_path / "run", *overrides))
    with pytest.raises(ConfigError, match=r"model\.time_conditioning=false builds a segmentation network"):
        Trainer(tiny_config(tmp_path / "run", *overrides))
    assert not (tmp_path / "run").exists()


def test_incompatible_data_and_model_stop_before_training(tmp_path):
    with pytest.raises(ConfigError, match="data.channels"):
        Trainer(tiny_config(tmp_path / "run", "model.in_channels=3"))
    with pytest.raises(ConfigError, match="sample.guidance_scale=2.0 needs a class-conditional model"):
        Trainer(
            tiny_config(
                tmp_path / "run", "model.num_classes=null", "data.labels=false", "sample.guidance_scale=2"
            )
        )
    with pytest.raises(
        ConfigError, match=r"model\.image_size: image_size=12 must be divisible by 2\*\*\(levels - 1\) = 8"
    ):
        Trainer(
            tiny_config(
                tmp_path / "run", "data.image_size=12", "model.image_size=12", "model.channel_mult=[1,1,2,2]"
            )
        )


def run_script(
    *args: str, cwd: Path, launcher: list[str] | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [*(launcher or [sys.executable]), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_scripts_train_sample_and_resume(tmp_path):
    run = tmp_path / "run"
    common = [*TINY, f"output_dir={run}"]
    result = run_script(str(ROOT / "train.py"), *common, "train.steps=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train: 100%|" in result.stderr  # the progress bar, which TQDM_DISABLE=1 hides (below)
    result = run_script(str(ROOT / "train.py"), "--resume", *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout + result.stderr
    assert json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())["step"] == 6

    result = run_script(
        str(ROOT / "sample.py"), "--n", "5", "--checkpoint", str(run), "--save-images", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    grid = Path(result.stdout.strip().splitlines()[-1])
    assert grid == run / "samples" / "sample-step-0000006-ema-unipc2-seed0-n5.png" and grid.is_file()
    assert len(list(grid.with_suffix("").glob("*.png"))) == 5

    from PIL import Image

    with Image.open(grid) as image:  # 5 images of 8x8 in a 3-column grid with 1-pixel padding
        assert image.size == (3 * 9 + 1, 2 * 9 + 1)


def test_sample_without_checkpoint_is_a_one_line_error(tmp_path):
    result = run_script(str(ROOT / "sample.py"), "--checkpoint", str(tmp_path / "nothing"), cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr
    assert "train one with `python train.py` (`ddpm-train` when installed)" in result.stderr


def test_tqdm_disable_hides_every_progress_bar(tmp_path):
    """TQDM_DISABLE=1, tqdm's own switch, reaches the bars of training and sampling (tqdm takes it only as
    the default of a `disable` argument not passed)."""
    run, quiet = tmp_path / "run", {"TQDM_DISABLE": "1"}
    common = [*TINY_RUN, "train.steps=2", "train.sample_every=0", f"output_dir={run}"]
    trained = run_script(str(ROOT / "train.py"), *common, cwd=tmp_path, env=quiet)
    assert trained.returncode == 0, trained.stderr
    sampled = run_script(
        str(ROOT / "sample.py"), "--checkpoint", str(run), "--n", "2", cwd=tmp_path, env=quiet
    )
    assert sampled.returncode == 0, sampled.stderr
    for result in (trained, sampled):
        assert "%|" not in result.stderr and "it/s" not in result.stderr, result.stderr
    assert sampled.stderr == "unipc: 2 steps, 2 network calls (from the steps asked for)\n"


def test_train_bad_override_is_a_one_line_error(tmp_path):
    result = run_script(str(ROOT / "train.py"), "train.stepz=3", f"output_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "train.stepz" in result.stderr


def test_two_processes_over_gloo_keep_replicas_identical(tmp_path):
    run = tmp_path / "run"
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    result = run_script(
        str(ROOT / "train.py"),
        *TINY,
        f"output_dir={run}",
        "train.steps=4",
        "train.checkpoint_every=2",
        cwd=tmp_path,
        launcher=launcher,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = latest_checkpoint(run)
    assert (last / "random_states_0.pkl").is_file() and (last / "random_states_1.pkl").is_file()
    # Only the main process writes logs: one line per step, not two.
    assert len((run / "log.jsonl").read_text().splitlines()) == 4
    loaded = load_for_sampling(run)
    assert loaded.weights == "ema" and all(torch.isfinite(p).all() for p in loaded.model.parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the thread count is set for CPU training only")
def test_cpu_training_uses_every_core_whatever_accelerate_launch_set(tmp_path, monkeypatch):
    # `accelerate launch` without GPUs sets OMP_NUM_THREADS=1; a torchrun launch says how many processes
    # share the machine in LOCAL_WORLD_SIZE.
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        Trainer(tiny_config(tmp_path / "a"))
        assert torch.get_num_threads() == cores
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))
        Trainer(tiny_config(tmp_path / "b"))
        assert torch.get_num_threads() == 1
        Trainer(tiny_config(tmp_path / "c", "train.cpu_threads=3"))
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "5")  # asked for by the user: kept
        Trainer(tiny_config(tmp_path / "d"))
        assert torch.get_num_threads() == 5
    finally:
        torch.set_num_threads(before)


def test_a_network_call_budget_in_the_sample_section_drives_the_in_training_grids(tmp_path):
    """sample.calls, when set, replaces sample.steps everywhere the section is used: the config check and the
    grids written during training, which sample with the calls' steps (heun: 5 calls buy 3 steps)."""
    config = tiny_config(
        tmp_path / "run", "train.steps=3", "sample.sampler=heun", "sample.calls=5", "sample.steps=40"
    )
    trainer = Trainer(config)
    seen = []
    original = ddpm.inference.sample

    def recording(*args, **kwargs):
        seen.append((kwargs["steps"], kwargs["calls"]))
        return original(*args, **kwargs)

    with mock.patch("ddpm.inference.sample", recording):
        trainer.train()
    assert seen == [(None, 5)]
    assert (tmp_path / "run" / "samples" / "step-0000003-ema.png").is_file()


def test_a_class_model_without_a_null_label_trains_on_its_labels(tmp_path):
    """model.null_label=false (OpenAI's class-conditional layout): labels cannot be dropped or guided, so the
    config refuses both; training then passes every label to the network (none dropped, none withheld)."""
    with pytest.raises(ConfigError, match="train.label_dropout=0.1 but model.null_label=false"):
        tiny_config(tmp_path / "run", "model.null_label=false")
    with pytest.raises(ConfigError, match="sample.guidance_scale=2.0 needs a null label"):
        tiny_config(
            tmp_path / "run", "model.null_label=false", "train.label_dropout=0", "sample.guidance_scale=2"
        )
    config = tiny_config(
        tmp_path / "run",
        "model.null_label=false",
        "train.label_dropout=0",
        "train.steps=1",
        "train.sample_every=0",
    )
    trainer = Trainer(config)
    assert trainer.model.null_class is None
    seen = []
    forward = trainer.model.forward

    def recording_forward(x, t, y=None):
        seen.append(y)
        return forward(x, t, y)

    trainer.model.forward = recording_forward
    x0, labels = torch.zeros(4, 1, 8, 8), torch.tensor([0, 3, 9, 5])
    trainer._loss(x0, labels)
    assert len(seen) == 1 and torch.equal(seen[0], labels)
