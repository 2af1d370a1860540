"""Faults and bad input: a killed, stopped or failing run loses nothing, and every error is one clear line.

The tiny digits run of test_train (6 steps, checkpoints and sample grids at steps 3 and 6) is trained once,
uninterrupted, as the reference; interrupted runs must end with exactly its weights after --resume.
"""

import contextlib
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.state import AcceleratorState
from PIL import Image
from test_train import (
    ROOT,
    TINY,
    poison_step,
    tiny_config,
    weights,
)

import ddpm
import ddpm.inference
import ddpm.sample_cli as sample_script
import ddpm.train as train_script
from ddpm.inference import load_for_sampling
from ddpm.io import CheckpointError, load_unet, save_unet
from ddpm.models.unet import UNet
from ddpm.run_dir import latest_checkpoint, list_checkpoints
from ddpm.schedule import NoiseScheduler
from ddpm.training import NonFiniteLossError, Trainer
from ddpm.training.interruption import STOP_HINT, StopSignals


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in the children: a tiny model gains nothing from more, and on a shared
    machine busy threads that wait for each other cost many times the work. (The same count everywhere also
    keeps CPU results bitwise comparable between processes.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted 6-step run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    Trainer(tiny_config(run)).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    return run


def run_at_step_3(reference: Path, destination: Path) -> Path:
    """A copy of the reference run as it was after its first checkpoint (its log runs on to step 6)."""
    shutil.copytree(reference, destination)
    shutil.rmtree(destination / "checkpoints" / "step-0000006")
    (destination / "samples" / "step-0000006-ema.png").unlink()
    return destination


def assert_same_weights(checkpoint: Path, expected: Path) -> None:
    a, b = weights(checkpoint), weights(expected)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def resume_to_the_end(run: Path) -> Path:
    AcceleratorState._reset_state(reset_partial_state=True)
    return Trainer(tiny_config(run), resume="latest").train()


def tiny_args(run: Path, *extra: str) -> list[str]:
    return [*TINY, f"output_dir={run}", *extra]


def call_main(script, argv: list[str], capsys) -> tuple[int | str, str, str]:
    """Run a script's main(argv); returns (the exit code or message, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        script.main(argv)
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def assert_one_line_error(code: int | str, pattern: str) -> None:
    """sys.exit("error: ...") is Python's way to print one line on stderr and exit with status 1; any other
    exception would have escaped main() with its traceback."""
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, code
    assert re.search(pattern, code), code


# -- SIGKILL at any moment


def train_until_killed(run: str, point: str, ready: str) -> None:
    """In a child process: train the tiny run, and at `point` create the file `ready` and hang until killed.

    "checkpoint write": step 6's checkpoint is half written (Accelerate's files and the raw weights are in
    its temporary folder); "sample grid": step 3's grid is half written; "step": in the middle of step 5.
    """

    def hang() -> None:
        Path(ready).touch()
        time.sleep(600)

    torch.set_num_threads(1)  # as in the test process

    if point == "checkpoint write":
        import ddpm.training.checkpoints

        save_pretrained = ddpm.training.checkpoints.save_pretrained

        def save_and_hang(folder, model, scheduler, **options):
            save_pretrained(folder, model, scheduler, **options)
            if "step-0000006" in str(folder):
                hang()

        ddpm.training.checkpoints.save_pretrained = save_and_hang
    elif point == "sample grid":
        import ddpm.inference

        save_image = ddpm.inference.save_image

        def save_half_and_hang(images, path, **kwargs):
            save_image(images, path, **kwargs)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            hang()

        ddpm.inference.save_image = save_half_and_hang
    else:
        loss = Trainer._loss

        def loss_and_hang(self, x0, labels):
            value = loss(self, x0, labels)
            if self.state.step == 4:
                hang()
            return value

        Trainer._loss = loss_and_hang
    Trainer(tiny_config(Path(run))).train()


@pytest.fixture(scope="module")
def forkserver():
    """Children forked from a server that has imported torch and ddpm already: a second each, not five."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["ddpm.training.trainer", "sklearn.datasets", "test_faults"])
    return context


@pytest.mark.parametrize("point", ["checkpoint write", "sample grid", "step"])
def test_sigkill_at_any_moment_loses_nothing_and_resume_ends_as_an_uninterrupted_run(
    tmp_path, reference, forkserver, point
):
    run, ready = tmp_path / "run", tmp_path / "ready"
    child = forkserver.Process(target=train_until_killed, args=(str(run), point, str(ready)))
    child.start()
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert child.is_alive() and time.monotonic() < deadline, f"the child ended early ({child.exitcode})"
        time.sleep(0.05)
    child.kill()
    child.join()
    assert child.exitcode == -signal.SIGKILL

    latest = run / "checkpoints" / "step-0000003"
    assert list_checkpoints(run) == [latest] and latest_checkpoint(run) == latest
    if point == "checkpoint write":
        leftover = run / "checkpoints" / ".tmp-step-0000006"
        assert (leftover / "model.safetensors").is_file() and not (leftover / "trainer_state.json").exists()
        assert load_for_sampling(run)[0] is not None  # sample.py takes the whole step-3 checkpoint
    grids = [p for p in (run / "samples").iterdir() if not p.name.startswith(".")]
    assert [p.name for p in grids] == ([] if point == "sample grid" else ["step-0000003-ema.png"])
    if point == "sample grid":
        (half,) = (run / "samples").glob(".tmp-*-step-0000003-ema.png")
        with pytest.raises(OSError), Image.open(half) as image:
            image.load()

    last = resume_to_the_end(run)
    assert last == run / "checkpoints" / "step-0000006"
    assert_same_weights(last, reference / "checkpoints" / "step-0000006")
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the next save removed the leftovers
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # steps logged before the kill are not repeated


def test_incomplete_and_symlinked_checkpoints_are_ignored_and_incomplete_ones_cleaned_up(tmp_path, reference):
    run = run_at_step_3(reference, tmp_path / "run")
    folder = run / "checkpoints"
    shutil.copytree(folder / "step-0000003", folder / "step-0000009")
    (folder / "step-0000009" / "trainer_state.json").unlink()  # e.g. damaged by hand
    shutil.copytree(folder / "step-0000003", folder / ".tmp-step-0000012")
    elsewhere = tmp_path / "elsewhere" / "step-0000099"
    shutil.copytree(folder / "step-0000003", elsewhere)
    (elsewhere / "trainer_state.json").write_text(json.dumps({"step": 99, "ema_updates": 99}))
    (folder / "step-0000099").symlink_to(elsewhere)

    assert latest_checkpoint(run) == folder / "step-0000003"
    assert load_for_sampling(folder / "step-0000099")[0] is not None  # followed when named
    last = resume_to_the_end(run)
    assert_same_weights(last, reference / "checkpoints" / "step-0000006")
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000003", "step-0000006", "step-0000099"]
    assert (elsewhere / "model.safetensors").is_file()  # the symlink's target is left alone

    AcceleratorState._reset_state(reset_partial_state=True)
    assert Trainer(tiny_config(run), resume="latest").train() == last  # a finished run: nothing to do
    assert latest_checkpoint(run) == last


# -- SIGINT and SIGTERM


def signal_at_step(monkeypatch, step: int, *signals: signal.Signals) -> None:
    """Make every Trainer send `signals` to this process while it computes step `step`."""
    loss = Trainer._loss

    def loss_and_signal(self, x0, labels):
        if self.state.step == step - 1:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return loss(self, x0, labels)

    monkeypatch.setattr(Trainer, "_loss", loss_and_signal)


def test_sigint_saves_the_current_step_and_exits_130(tmp_path, reference, capsys, monkeypatch):
    run = run_at_step_3(reference, tmp_path / "run")
    signal_at_step(monkeypatch, 5, signal.SIGINT)
    code, out, err = call_main(train_script, ["--resume", *tiny_args(run)], capsys)
    assert code == 128 + signal.SIGINT
    assert STOP_HINT in err.splitlines()  # said before training started
    saved = run / "checkpoints" / "step-0000005"
    assert f"stopped by SIGINT at step 5 of 6; saved checkpoint {saved}; continue with --resume" in out
    assert latest_checkpoint(run) == saved
    assert json.loads((saved / "trainer_state.json").read_text())["step"] == 5
    assert not (run / "samples" / "step-0000005-ema.png").exists()  # no grid delays a pre-empted job

    monkeypatch.undo()
    assert_same_weights(resume_to_the_end(run), reference / "checkpoints" / "step-0000006")


def test_a_repeated_sigterm_still_saves_and_exits_143(tmp_path, reference, capsys, monkeypatch):
    """Launchers pass on a signal the cluster already sent to every process: the second must not cut the
    save short."""
    run = run_at_step_3(reference, tmp_path / "run")
    signal_at_step(monkeypatch, 5, signal.SIGTERM, signal.SIGTERM)
    code, out, _ = call_main(train_script, ["--resume", *tiny_args(run)], capsys)
    assert code == 128 + signal.SIGTERM
    assert latest_checkpoint(run) == run / "checkpoints" / "step-0000005"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are restored


def test_ctrl_c_before_training_starts_exits_130_naming_the_last_checkpoint(
    tmp_path, reference, capsys, monkeypatch
):
    run = run_at_step_3(reference, tmp_path / "run")
    # Python raises KeyboardInterrupt only if SIGINT was not ignored when it started (as it is for a
    # background job of a non-interactive shell): install that handler here, as an interactive start would.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.setattr(Trainer, "_resume", lambda self, resume: os.kill(os.getpid(), signal.SIGINT))
    try:
        code, _, err = call_main(train_script, ["--resume", *tiny_args(run)], capsys)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 128 + signal.SIGINT
    assert (
        f"interrupted before training started; last checkpoint: {run / 'checkpoints' / 'step-0000003'}" in err
    )


# -- NaN, inf and fp16


def test_weights_with_nan_or_inf_are_never_saved(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", "train.steps=3"))
    with torch.no_grad():
        trainer.ema.module.conv_out.bias[0] = float("inf")  # stays non-finite through every EMA update
    with pytest.raises(
        CheckpointError,
        match=r"refusing to save step 3: the ema weights hold NaN or inf .*conv_out\.bias.*none",
    ):
        trainer.train()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_collapsing_fp16_loss_scale_stops_training(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", "train.steps=3"))
    # The scaler of fp16 training (GPU only) after many overflows: checked on the CPU with torch's own class.
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=0.5)
    with pytest.raises(NonFiniteLossError, match=r"fp16 loss scale fell to 0\.5 by step 1: .*bf16"):
        trainer.train()


def fp16_with_a_real_grad_scaler(trainer: Trainer) -> torch.amp.GradScaler:
    """Make the trainer's Accelerator do what it does for fp16 on a GPU, with torch's CPU GradScaler: the
    scaled backward, the unscale in clip_grad_norm_, scaler.step + update in the optimizer step, fp16
    autocast. (Accelerate turns fp16 into plain float32 on the CPU: it creates no scaler there.)"""
    accelerator, scaler = trainer.accelerator, torch.amp.GradScaler("cpu", init_scale=2.0**16)
    assert accelerator.mixed_precision == "fp16" and accelerator.scaler is None
    accelerator.native_amp, accelerator.scaler = True, scaler
    optimizer = AcceleratedOptimizer(trainer.optimizer.optimizer, device_placement=False, scaler=scaler)
    accelerator._optimizers = [optimizer]
    trainer.optimizer = optimizer
    return scaler


def test_fp16_nan_policy_skip_lowers_the_loss_scale_and_goes_on(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(
        tiny_config(run, "train.mixed_precision=fp16", "train.nan_policy=skip", "train.steps=3")
    )
    scaler = fp16_with_a_real_grad_scaler(trainer)
    dtypes = []  # of the last layer's output, inside the autocast region (Accelerate returns float32)
    conv_out = trainer.accelerator.unwrap_model(trainer.model).conv_out
    conv_out.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    calls = poison_step(trainer, 2)
    last = trainer.train()
    assert set(dtypes) == {torch.float16}  # the fp16 path ran, not a float32 stand-in
    assert len(calls) == 4 and json.loads((last / "trainer_state.json").read_text())["step"] == 3
    assert scaler.get_scale() == 2.0**15  # the skipped step counted as an overflow
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(w).all() for w in weights(last).values())


def test_a_resumed_run_with_a_skipped_step_continues_at_the_right_batch(tmp_path):
    straight = Trainer(tiny_config(tmp_path / "a", "train.nan_policy=skip"))
    poison_step(straight, 2)
    expected = straight.train()
    AcceleratorState._reset_state(reset_partial_state=True)

    first = Trainer(tiny_config(tmp_path / "b", "train.nan_policy=skip", "train.steps=3"))
    poison_step(first, 2)
    first.train()
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = Trainer(tiny_config(tmp_path / "b", "train.nan_policy=skip"), resume="latest").train()
    assert_same_weights(resumed, expected)
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped_steps"] == 1  # counted over the whole run, across the resume


# -- failed writes


def test_a_failed_checkpoint_write_names_the_path_and_keeps_the_earlier_ones(
    tmp_path, reference, capsys, monkeypatch
):
    """A real write error from the kernel: files may not grow past 4 kB once step 3 is saved (as root,
    read-only folders do not stop writes; a file size limit does)."""
    run = tmp_path / "run"
    save = Trainer._save

    def save_then_limit(self):
        saved = save(self)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))
        return saved

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    monkeypatch.setattr(Trainer, "_save", save_then_limit)
    try:
        code, _, _ = call_main(train_script, tiny_args(run, "train.sample_every=0"), capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, previous)
    assert_one_line_error(
        code,
        rf"could not write checkpoint {run / 'checkpoints' / 'step-0000006'}: .*; free disk space or fix the "
        r"permissions of .*--resume \(the earlier checkpoints are untouched\)",
    )
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000003"]  # the partial one is gone
    assert load_for_sampling(run)[0] is not None


def test_a_failed_grid_write_names_the_file(tmp_path, monkeypatch):
    from ddpm.inference import save_grid

    def disk_full(images, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ddpm.inference.save_image", disk_full)
    target = tmp_path / "samples" / "grid.png"
    with pytest.raises(OSError, match=rf"\[Errno 28\] cannot write {target}: No space left on device"):
        save_grid(torch.zeros(4, 1, 8, 8), target)
    assert list(target.parent.iterdir()) == []


# -- checkpoints from elsewhere: damaged, foreign, malicious


class RunsCode:
    """A pickle that would create a file when loaded by plain pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("file", ["optimizer.bin", "random_states_0.pkl"])
def test_a_pickle_that_runs_code_is_refused_not_run(tmp_path, reference, capsys, file):
    run = run_at_step_3(reference, tmp_path / "run")
    marker = tmp_path / "pwned"
    torch.save({"state": RunsCode(marker)}, run / "checkpoints" / "step-0000003" / file)
    code, _, _ = call_main(train_script, ["--resume", *tiny_args(run)], capsys)
    assert_one_line_error(code, rf"refusing to load \S+/{re.escape(file)}: .*could run code .*GLOBAL")
    assert not marker.exists()


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_foreign_weights(checkpoint: Path) -> None:
    """Weights of another UNet (8 -> 16 base channels) with their own config: a different model."""
    config = load_unet(checkpoint).config
    save_unet(checkpoint / "ema", UNet(**{**config, "base_channels": 16}))
    shutil.copy(checkpoint / "ema" / "model.safetensors", checkpoint / "model.safetensors")


def mismatch_ema_config(checkpoint: Path) -> None:
    """An EMA config.json that no longer describes its weights."""
    config = json.loads((checkpoint / "ema" / "config.json").read_text())
    (checkpoint / "ema" / "config.json").write_text(json.dumps({**config, "base_channels": 16}))


@pytest.mark.parametrize(
    ("damage", "resume_error", "sample_error"),
    [
        (
            lambda c: truncate(c / "model.safetensors"),
            r"cannot read \S+/model\.safetensors: .*incomplete metadata.*--resume PATH",
            None,  # sampling reads the EMA weights only
        ),
        (
            lambda c: truncate(c / "ema" / "model.safetensors"),
            r"cannot read \S+/ema/model\.safetensors: .*incomplete or damaged",
            r"cannot load the model in \S+step-0000003: .*incomplete metadata.*--checkpoint",
        ),
        (
            write_foreign_weights,
            r"weights in \S+/model\.safetensors do not fit the model of this config \(\d+ problems, e\.g\. .*"
            r"conv_in\.weight: file \(16, 1, 3, 3\) vs model \(8, 1, 3, 3\)",
            None,  # a whole UNet folder: sampling loads it as what it is
        ),
        (
            lambda c: (c / "optimizer.bin").unlink(),
            r"cannot resume from \S+step-0000003: .*optimizer\.bin.*name an earlier checkpoint",
            None,
        ),
        (
            lambda c: truncate(c / "random_states_0.pkl"),
            r"cannot read \S+/random_states_0\.pkl: .*damaged",
            None,
        ),
        (
            lambda c: (c / "ema" / "model.safetensors").unlink(),
            r"cannot read \S+/ema/model\.safetensors: No such file",
            r"cannot load the model in \S+step-0000003: \S+/ema/model\.safetensors not found",
        ),
        (
            mismatch_ema_config,
            None,  # training reads its networks' shapes from the run's config, not from config.json
            r"cannot load the model in \S+: the weights in \S+/ema/model\.safetensors do not fit the config",
        ),
    ],
    ids=["truncated", "truncated-ema", "foreign", "no-optimizer", "truncated-rng", "no-ema", "mismatch"],
)
def test_a_damaged_or_foreign_checkpoint_is_a_one_line_error(
    tmp_path, reference, capsys, damage, resume_error, sample_error
):
    run = run_at_step_3(reference, tmp_path / "run")
    damage(run / "checkpoints" / "step-0000003")
    if resume_error:
        code, _, _ = call_main(train_script, ["--resume", *tiny_args(run)], capsys)
        assert_one_line_error(code, resume_error)
    if sample_error:
        code, _, _ = call_main(sample_script, ["--checkpoint", str(run), "--n", "1"], capsys)
        assert_one_line_error(code, sample_error)


# -- bad input through train.py and sample.py: one line on stderr, exit status 1


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (
            ["diffusion.beta_schedule=cosin"],
            r"diffusion\.beta_schedule: unknown beta_schedule 'cosin'; valid: ",
        ),
        (
            ["model.base_channels=6"],
            r"model\.base_channels, .*: channel counts \[6\] .*not divisible by norm_groups=4 \(the model",
        ),
        (
            ["model.channel_mult=3"],
            r"^error: model: 'int' object is not iterable \(the model section holds UNet's",
        ),
        (["model.image_size=7"], r"model\.image_size=7 but data\.image_size=8: make them equal"),
        (
            ["data.image_size=12", "model.image_size=12", "model.channel_mult=[1,1,2,2]"],
            r"model\.image_size: image_size=12 must be divisible by 2\*\*\(levels - 1\) = 8",
        ),
        (["data.dataset=folder", "data.root=EMPTY"], r"no images found under data\.root '\S+'"),
        (["data.dataset=folder", "data.root=MISSING"], r"data\.root '\S+' is not a folder"),
        (["train.steps=-5"], r"invalid value -5 for 'train\.steps' .*: expected an integer >= 1"),
        (["--resume"], r"--resume: no checkpoint in \S+; start without --resume"),
        (["--resume", "MISSING"], r"\S+ is not a training checkpoint \(it has no trainer_state\.json\)"),
        (["--config", "MISSING"], r"config file \S+ not found; pass an existing file with --config"),
        (["--config", "BAD_YAML"], r"\S+bad\.yaml is not valid YAML \(line 2, column \d+\): expected ','"),
    ],
    ids=lambda x: " ".join(x) if isinstance(x, list) else None,
)
def test_bad_input_to_train_is_a_one_line_error(tmp_path, capsys, extra, pattern):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.yaml").write_text("train: [1\noutput_dir: x\n")
    places = {"EMPTY": tmp_path / "empty", "MISSING": tmp_path / "missing", "BAD_YAML": tmp_path / "bad.yaml"}
    for name, path in places.items():
        extra = [arg.replace(name, str(path)) for arg in extra]
    code, _, _ = call_main(train_script, [*tiny_args(tmp_path / "run"), *extra], capsys)
    assert_one_line_error(code, pattern)


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--n", "0"], r"--n must be a positive integer, got 0"),
        (["--n", "-3"], r"--n must be a positive integer, got -3"),
        (["--steps", "0"], r"--steps 0: expected an integer >= 1"),
        (["--batch-size", "-1"], r"--batch-size must be a positive integer, got -1"),
        (
            ["--class-label", "99"],
            r"--class-label 99 is out of range: the model has 10 classes, so pass a label in 0\.\.9",
        ),
        (["--class-label", "-1"], r"--class-label -1 is out of range"),
        (["--n", "abc"], r"argument --n: invalid int value: 'abc'; see --help"),
        (["--sampler", "plms"], r"argument --sampler: invalid choice: 'plms' \(choose from "),
        (["--steps", "5", "--calls", "5"], r"argument --calls: not allowed with argument --steps"),
        (["--calls", "0"], r"--calls 0: expected an integer in 1\.\.1000 \(network calls of sampler "),
        (["--option", "s_churn"], r"argument --option: expected NAME=VALUE, e\.g\. s_churn=40, got "),
        (["--option", "s_churn=1"], r"--option s_churn=\.\.\.: expected an option of sampler 'unipc' \(its "),
        (["--sampler", "heun", "--option", "s_churn=-1"], r"--option s_churn=-1: expected a number >= 0"),
        (["--unknown"], r"unrecognized arguments: --unknown"),
        (["--eta", "1.5"], r"--eta 1\.5: expected a number in \[0, 1\]"),
        (["--sampler", "ddpm", "--eta", "0.5"], r"--eta 0\.5: expected 0 with sampler 'ddpm'"),
        (["--guidance-scale", "-1"], r"--guidance-scale -1\.0: expected a finite number >= 0"),
        (["--seed", "-1"], r"--seed must be >= 0, got -1"),
        (["--steps", "5000"], r"--steps 5000: expected an integer in 1\.\.num_train_timesteps=1000"),
        (["--schedule", "missing.json"], r"--schedule missing\.json: no such file"),
        (
            ["--schedule", "BAD_JSON"],
            r"cannot read the noise schedule \S+bad\.json: .*NoiseScheduler's keyword",
        ),
        (["--checkpoint", "BARE"], r"bare has no noise_scheduler\.json, so the schedule .* --schedule FILE"),
        (["--checkpoint", "EMA", "--raw"], r"ema holds the EMA weights, but the raw ones were asked for"),
    ],
)
def test_bad_input_to_sample_is_a_one_line_error(reference, tmp_path, capsys, argv, pattern):
    (tmp_path / "bad.json").write_text('{"beta_schedule": "cosin"}')
    save_unet(tmp_path / "bare", load_unet(reference / "checkpoints" / "step-0000006"))
    places = {
        "BAD_JSON": tmp_path / "bad.json",
        "BARE": tmp_path / "bare",
        "EMA": reference / "checkpoints" / "step-0000006" / "ema",
    }
    argv = [str(places.get(arg, arg)) for arg in argv]
    code, _, _ = call_main(sample_script, ["--checkpoint", str(reference), *argv], capsys)
    assert_one_line_error(code, pattern)


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--n", "0"], r"^error: --n must be a positive integer, got 0$"),
        (["--batch-size", "0"], r"^error: --batch-size must be a positive integer, got 0$"),
        (["--seed", "-1"], r"^error: --seed must be >= 0, got -1$"),
        (["--steps", "0"], r"^error: --steps 0: expected an integer >= 1$"),
        (
            ["--sampler", "heun", "--calls", "0"],
            r"^error: --calls 0: expected an integer >= 1 \(network calls ",
        ),
        (["--eta", "1.5"], r"^error: --eta 1\.5: expected a number in \[0, 1\]"),
        (["--sampler", "ddpm", "--eta", "0.5"], r"^error: --eta 0\.5: expected 0 with sampler 'ddpm'"),
        (["--guidance-scale", "-1"], r"^error: --guidance-scale -1\.0: expected a finite number >= 0"),
        (
            ["--sampler", "heun", "--option", "s_churn=-1"],
            r"^error: --option s_churn=-1: expected a number >= 0",
        ),
        (["--out", "grid"], r"^error: --out grid: not an image file name; end it with \.png"),
        (["--out", "FOLDER"], r"^error: --out \S+ is a folder: name a file in it, e\.g\. \S+grid\.png$"),
        (["--out", "FILE/grid.png"], r"^error: cannot write \S+grid\.png: \S+file is not a folder this "),
    ],
)
def test_options_that_need_no_model_are_refused_before_it_is_loaded(
    reference, tmp_path, capsys, monkeypatch, argv, pattern
):
    (tmp_path / "file").touch()
    places = {"FOLDER": str(tmp_path), "FILE/grid.png": str(tmp_path / "file" / "grid.png")}
    loads = []
    monkeypatch.setattr(ddpm.inference, "load_for_sampling", lambda *args, **kwargs: loads.append(args))
    argv = [places.get(arg, arg) for arg in argv]
    code, _, err = call_main(sample_script, ["--checkpoint", str(reference), *argv], capsys)
    assert_one_line_error(code, pattern)
    assert loads == [] and err == ""


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (
            ["--class-label", "12"],
            r"^error: --class-label 12 is out of range: the model has 10 classes, so pass a label in 0\.\.9$",
        ),
        (
            ["--checkpoint", "UNCONDITIONAL", "--guidance-scale", "3"],
            r"^error: --guidance-scale 3 needs a class-conditional model; this one has no classes",
        ),
    ],
)
def test_a_label_or_guidance_the_model_cannot_take_is_refused_before_the_sampler_is_announced(
    reference, tmp_path, capsys, argv, pattern
):
    config = {**load_unet(reference / "checkpoints" / "step-0000006").config, "num_classes": None}
    ddpm.save_pretrained(tmp_path / "unconditional", UNet(**config), NoiseScheduler())
    argv = [str(tmp_path / "unconditional") if arg == "UNCONDITIONAL" else arg for arg in argv]
    code, out, err = call_main(sample_script, ["--checkpoint", str(reference), "--n", "2", *argv], capsys)
    assert_one_line_error(code, pattern)
    assert out == err == ""  # neither the sampler's line ("unipc: 20 steps, ...") nor a progress bar


# -- several processes


def launch(script: Path, *args: str, cwd: Path, stop_when=None, timeout: float = 240):
    """`accelerate launch` two CPU processes over gloo in their own session; `stop_when()` returning a signal
    sends it to the launcher, which passes it on to both. Returns (exit status, stdout, stderr); a launch
    still running after `timeout` seconds fails (and is killed, all its processes)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    out, err = cwd / "launch.out", cwd / "launch.err"
    deadline = time.monotonic() + timeout
    with open(out, "w") as stdout, open(err, "w") as stderr:
        launcher = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=stdout, stderr=stderr, start_new_session=True
        )
    try:
        while stop_when is not None and launcher.poll() is None:
            sig = stop_when()
            if sig:
                launcher.send_signal(sig)
                break
            assert time.monotonic() < deadline, "the launch did not reach the point to stop it"
            time.sleep(0.1)
        launcher.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        with contextlib.suppress(ProcessLookupError):  # the workers too, whatever happened
            os.killpg(launcher.pid, signal.SIGKILL)
    return launcher.returncode, out.read_text(), err.read_text()


def test_sigterm_to_accelerate_launch_saves_on_both_processes_at_the_same_step(tmp_path):
    run = tmp_path / "run"

    def after_step_3():
        log = run / "log.jsonl"
        return signal.SIGTERM if log.is_file() and len(log.read_text().splitlines()) >= 3 else None

    args = tiny_args(run, "train.steps=1000", "train.checkpoint_every=1000", "train.sample_every=0")
    _, out, err = launch(ROOT / "train.py", *args, cwd=tmp_path, stop_when=after_step_3)
    (saved,) = list_checkpoints(run)
    step = json.loads((saved / "trainer_state.json").read_text())["step"]
    assert (
        step >= 3 and (saved / "random_states_0.pkl").is_file() and (saved / "random_states_1.pkl").is_file()
    )
    assert f"stopped by SIGTERM at step {step} of 1000; saved checkpoint {saved}" in out, out + err[-3000:]


FAIL_ON_RANK_1 = """
import signal
import time

from ddpm.training.trainer import Trainer

loss = Trainer._loss


def loss_or_fail(self, x0, labels):
    if self.accelerator.process_index == 1 and self.state.step == 2:
        if {hang}:
            # Stuck for good (say on a dead device), though ended by the launcher's SIGTERM rather than by
            # its SIGKILL 30 s later: that grace period is the launcher's, not what is tested here.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(600)
        raise RuntimeError("process 1 failed on purpose")
    return loss(self, x0, labels)


Trainer._loss = loss_or_fail

import train  # noqa: E402

train.main()
"""


@pytest.mark.parametrize(
    ("hang", "message"),
    [
        (
            True,
            r"error: process 0 got no answer from the others within train\.dist_timeout_s=5 s at step 2: "
            r"another process crashed or hangs \(see its messages\); no checkpoint was saved yet",
        ),
        (False, r"RuntimeError: process 1 failed on purpose"),
    ],
    ids=["hangs", "raises"],
)
def test_a_process_that_hangs_or_fails_ends_the_whole_launch(tmp_path, hang, message):
    (tmp_path / "fail.py").write_text(FAIL_ON_RANK_1.format(hang=hang))
    args = tiny_args(tmp_path / "run", "train.dist_timeout_s=5", "train.sample_every=0")
    code, out, err = launch(tmp_path / "fail.py", *args, cwd=tmp_path, timeout=180)
    assert code != 0
    assert re.search(message, err), out + err[-3000:]


def test_stop_signals_in_another_thread_install_nothing_and_never_stop():
    """Only the main thread may set signal handlers (Python raises ValueError elsewhere): a Trainer run in a
    thread must still train, with the process's handlers left alone; in the main thread they are installed
    and restored."""
    one_process = types.SimpleNamespace(num_processes=1)
    before = signal.getsignal(signal.SIGINT)
    seen = {}

    def in_thread():
        with StopSignals(one_process, check_every=1) as signals:
            seen["handler"] = signal.getsignal(signal.SIGINT)
            seen["stop"] = signals.stop_requested(1)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == {"handler": before, "stop": False}
    with StopSignals(one_process, check_every=1) as signals:
        assert signal.getsignal(signal.SIGINT) is not before
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary of the main thread
        assert signals.stop_requested(1) and signals.stopped_by is signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before
