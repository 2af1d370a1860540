"""Trackers (train.log_with): which ones a value means, the errors, and what TensorBoard and wandb receive,
read back from the files they write, offline."""

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from test_train import tiny_config

import ddpm.trackers
from ddpm.config import ConfigError, load_config, tracker_names
from ddpm.trackers import LOG_WITH, auto_trackers, trackers
from ddpm.training import Trainer


@pytest.fixture
def no_wandb_setup(monkeypatch, tmp_path):
    """No wandb key, mode or login: what a machine where wandb was only installed looks like."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def test_log_with_values_name_the_trackers(no_wandb_setup, monkeypatch):
    assert LOG_WITH == ("auto", "all", "none", "tensorboard", "wandb")
    assert trackers("none") == []
    assert trackers("tensorboard") == ["tensorboard"] and trackers("all") == ["tensorboard", "wandb"]
    # auto: wandb only once it can start a run without asking for an account
    assert auto_trackers() == ["tensorboard"]
    no_wandb_setup.write_text("machine api.wandb.ai\n  login user\n  password 0123456789\n")
    assert auto_trackers() == ["tensorboard", "wandb"]
    no_wandb_setup.unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert auto_trackers() == ["tensorboard", "wandb"]
    monkeypatch.setattr(ddpm.trackers, "installed", lambda tracker: False)
    assert trackers("auto") == []


def test_a_bad_value_is_refused_when_the_config_is_read():
    with pytest.raises(
        ConfigError, match=r"'train\.log_with' .*expected one of auto, all, none, tensorboard"
    ):
        load_config(None, ["train.log_with=tensorbord"])
    with pytest.raises(ConfigError, match=r"'train\.tracker_project' .*expected a non-empty name"):
        load_config(None, ["train.tracker_project=' '"])


def test_a_tracker_not_installed_stops_training_before_any_work_with_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(ddpm.trackers, "installed", lambda tracker: tracker == "tensorboard")
    config = tiny_config(tmp_path / "run", "train.log_with=wandb")  # read: sampling needs no tracker
    message = (
        r'^train\.log_with=wandb but wandb is not installed: pip install wandb \(or pip install "ddpm\[tr'
    )
    with pytest.raises(ConfigError, match=message):
        tracker_names(config.train)
    with pytest.raises(ConfigError, match=message):
        Trainer(config)
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(ddpm.trackers, "installed", lambda tracker: False)
    with pytest.raises(ConfigError, match=r"log_with=all but tensorboard wandb are not installed: pip inst"):
        tracker_names(load_config(None, ["train.log_with=all"]).train)


def pixels(png: bytes | Path) -> np.ndarray:
    with Image.open(png if isinstance(png, Path) else io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def test_tensorboard_gets_the_scalars_every_sample_grid_and_the_config(tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(run, "train.log_with=tensorboard", "train.tracker_project=proj")).train()

    events = EventAccumulator(str(run / "proj"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    for key in ("loss", "lr"):
        got = {e.step: e.value for e in events.Scalars(key)}
        assert got == pytest.approx({r["step"]: r[key] for r in log}, rel=1e-6), key
    images = events.Images("samples/ema")
    assert [e.step for e in images] == [3, 6]
    for image in images:
        grid = pixels(run / "samples" / f"step-{image.step:07d}-ema.png")
        np.testing.assert_array_equal(pixels(image.encoded_image_string), grid)

    (hparams_dir,) = {p.parent for p in (run / "proj").glob("*/events.out.tfevents.*")}
    session = EventAccumulator(str(hparams_dir))
    session.Reload()
    content = session.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["train.steps"].number_value == 6
    assert hparams["model.channel_mult"].string_value == "[1, 2]"
    assert hparams["data.root"].string_value == "null"
    assert hparams["output_dir"].string_value == str(run)


def test_wandb_offline_writes_the_run_with_the_config_scalars_and_grids(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    (tmp_path / "wandb-dir").mkdir()
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    Trainer(tiny_config(run, "train.log_with=wandb", "train.tracker_project=proj", "train.steps=3")).train()

    (record_file,) = (tmp_path / "wandb-dir" / "wandb").glob("offline-run-*/run-*.wandb")
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    expected = [
        t.encode() for t in ("proj", "train.lr_schedule", "train.steps", "loss", json.dumps(last["loss"]))
    ]
    expected.append(b"samples/ema")
    # wandb's service process writes the records file on its own after finish() returns; on a loaded
    # machine the file can still hold only its header then: wait for the records (failing if none come).
    deadline = time.monotonic() + 120
    while not all(text in record_file.read_bytes() for text in expected) and time.monotonic() < deadline:
        time.sleep(0.5)
    records = record_file.read_bytes()  # protobuf records: the keys and JSON values appear as they are
    for text in expected:
        assert text in records, text
    (image,) = (record_file.parent / "files" / "media" / "images" / "samples").glob("ema_3_*.png")
    np.testing.assert_array_equal(pixels(image), pixels(run / "samples" / "step-0000003-ema.png"))
