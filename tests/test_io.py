"""Files: the atomic write (a temporary file beside the target, renamed over it only once written whole) and
the network's files in a model folder (save_unet, load_unet)."""

import errno
import json
import os

import pytest
import torch
from safetensors import SafetensorError
from test_unet import inputs, perturb, tiny  # pytest puts tests/ on sys.path

from ddpm.io import atomic_write, load_unet, save_unet
from ddpm.models import ClassicUNet


def test_the_content_lands_at_the_path_and_no_temporary_file_is_left(tmp_path):
    target = tmp_path / "new" / "folder" / "file.txt"  # the parent folders are created
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.name == f".tmp-{os.getpid()}-file.txt"
        tmp.write_text("whole")
        assert not target.exists()  # nothing at the path before the rename
    assert target.read_text() == "whole"
    assert os.listdir(target.parent) == ["file.txt"]


def test_an_existing_file_is_replaced_whole(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old and longer")
    with atomic_write(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["file.txt"]


def test_a_failed_write_leaves_the_target_untouched_and_names_it(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with (
        pytest.raises(OSError, match=rf"\[Errno 28\] cannot write {target}: No space left on device") as info,
        atomic_write(target) as tmp,
    ):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC and isinstance(info.value.__cause__, OSError)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["file.txt"]


def test_an_unwritable_folder_is_an_error_naming_the_path(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    target = blocker / "file.txt"
    with pytest.raises(OSError, match=rf"cannot write {target}: "), atomic_write(target) as tmp:
        tmp.write_text("never")


def test_any_other_error_passes_unchanged_and_removes_the_temporary_file(tmp_path):
    target = tmp_path / "file.txt"
    with pytest.raises(ValueError, match="^bad data$"), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise ValueError("bad data")
    assert os.listdir(tmp_path) == []


def test_a_safetensors_write_error_is_an_oserror_naming_the_path(tmp_path):
    target = tmp_path / "weights.safetensors"
    with (
        pytest.raises(OSError, match=rf"^cannot write {target}: Error while serializing: I/O error$"),
        atomic_write(target) as tmp,
    ):
        tmp.write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error\nsecond line")
    assert os.listdir(tmp_path) == []


def test_a_folder_lands_whole_replaces_an_existing_one_and_a_failed_one_leaves_nothing(tmp_path):
    target = tmp_path / "folder"
    with atomic_write(target) as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "a.txt").write_text("first")
        assert not target.exists()
    assert (target / "sub" / "a.txt").read_text() == "first"
    with (
        pytest.raises(OSError, match=rf"\[Errno 28\] cannot write {target}: No space left on device"),
        atomic_write(target) as tmp,
    ):
        tmp.mkdir()
        (tmp / "b.txt").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert os.listdir(tmp_path) == ["folder"] and os.listdir(target) == ["sub"]  # as it was
    with atomic_write(target) as tmp:
        tmp.mkdir()
        (tmp / "b.txt").write_text("second")
    assert os.listdir(tmp_path) == ["folder"] and os.listdir(target) == ["b.txt"]  # the old one is gone


# --- the network's files -----------------------------------------------------------------------------------


def test_save_unet_and_load_unet_round_trip(tmp_path):
    model = perturb(tiny(num_classes=3, channel_mult=[1, 2]))
    save_unet(tmp_path / "unet", model)
    assert (tmp_path / "unet" / "config.json").is_file()
    assert (tmp_path / "unet" / "model.safetensors").is_file()
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["class"] == "UNet" and "ddpm_version" in config
    assert config["channel_mult"] == [1, 2] and config["num_classes"] == 3
    loaded = load_unet(tmp_path / "unet")
    assert loaded.config == model.config
    x, t = inputs()
    y = torch.tensor([2, 3])
    assert torch.equal(model.eval()(x, t, y), loaded.eval()(x, t, y))
    as_bf16 = load_unet(tmp_path / "unet", dtype=torch.bfloat16)
    assert as_bf16.conv_in.weight.dtype == torch.bfloat16
    assert torch.isfinite(as_bf16(x.bfloat16(), t, y)).all()


def test_a_saved_classic_unet_loads_as_one(tmp_path):
    model = perturb(ClassicUNet(base_channels=8, channel_mult=[1, 2], time_conditioning=True, num_classes=3))
    save_unet(tmp_path / "classic", model)
    config = json.loads((tmp_path / "classic" / "config.json").read_text())
    assert config["class"] == "ClassicUNet" and config["time_conditioning"] is True
    loaded = load_unet(tmp_path / "classic")
    assert type(loaded) is ClassicUNet and loaded.config == model.config
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 3])
    assert torch.equal(model.eval()(x, t, y), loaded.eval()(x, t, y))


def test_load_unet_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"is not a directory; pass the folder written by ddpm\.save_pretrained"
    ):
        load_unet(tmp_path / "nothing")
    folder = tmp_path / "unet"
    save_unet(folder, tiny())
    (folder / "model.safetensors").rename(tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        load_unet(folder)
    (tmp_path / "weights").rename(folder / "model.safetensors")

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "widht": 3}))
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['widht'\].*valid keys"):
        load_unet(folder)
    (folder / "config.json").write_text(json.dumps({**config, "base_channels": 16, "norm_groups": 8}))
    with pytest.raises(
        ValueError, match=r"do not fit the config.*conv_in.weight: file \(8, 3, 3, 3\) vs model"
    ):
        load_unet(folder)
    (folder / "config.json").write_text(json.dumps({**config, "num_classes": 3}))
    with pytest.raises(ValueError, match="missing class_embedding.weight"):
        load_unet(folder)
    (folder / "config.json").write_text(json.dumps({**config, "class": "ResNet"}))
    with pytest.raises(
        ValueError, match=r"describes a ResNet, not one of ddpm's networks \(UNet, ClassicUNet\)"
    ):
        load_unet(folder)
