"""Files: the atomic writes (a temporary file or folder beside the target, renamed over it only once written
whole) and model folders: the network's files (save_unet, load_unet) and the networks as Hub models
(UNet.from_pretrained, model.save_pretrained: huggingface_hub's PyTorchModelHubMixin)."""

import errno
import hashlib
import json
import os

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import SafetensorError
from safetensors.torch import save_file
from test_unet import inputs, perturb, tiny  # pytest puts tests/ on sys.path

from ddpm.io import CheckpointError, atomic_folder, atomic_write, load_unet, save_pretrained, save_unet
from ddpm.models import ClassicUNet, UNet
from ddpm.schedule import NoiseScheduler
from ddpm.source import load_pretrained
from ddpm.version import ddpm_version


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


def test_a_new_folder_appears_whole_and_an_existing_one_gets_each_file_whole(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name == f".tmp-{os.getpid()}-model" and tmp.is_dir()
        (tmp / "a.json").write_text("new a")
        assert not target.exists()  # nothing at the path before the rename
    assert sorted(os.listdir(tmp_path)) == ["model"] and (target / "a.json").read_text() == "new a"

    (target / "kept.txt").write_text("not written again")
    with atomic_folder(target) as tmp:
        (tmp / "a.json").write_text("newer a")
        (tmp / "b.json").write_text("new b")
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert sorted(os.listdir(target)) == ["a.json", "b.json", "kept.txt"]
    assert (target / "a.json").read_text() == "newer a" and (
        target / "kept.txt"
    ).read_text() == "not written again"


def test_a_failed_folder_write_leaves_the_folder_as_it_was(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "a.json").write_text("old")
    with (
        pytest.raises(OSError, match=rf"\[Errno 28\] cannot write {target}: No space left on device"),
        atomic_folder(target) as tmp,
    ):
        (tmp / "a.json").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert os.listdir(tmp_path) == ["model"] and (target / "a.json").read_text() == "old"


# --- the networks as Hub models: UNet.from_pretrained, save_pretrained (PyTorchModelHubMixin) ---------------


def digest(state: dict[str, torch.Tensor]) -> str:
    """One hash of a state dict: its names, dtypes, shapes and bytes, in order."""
    sha = hashlib.sha256()
    for name, tensor in state.items():
        sha.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        sha.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def write_folder_as_before_the_mixin(folder, model, scheduler) -> None:
    """A model folder as ddpm.save_pretrained wrote it before the networks were Hub models: its config.json
    (class, version, constructor arguments), its safetensors file and its schedule, written by hand."""
    folder.mkdir(parents=True)
    config = {"class": type(model).__name__, "ddpm_version": "0.1.0", **model.config}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "noise_scheduler.json").write_text(json.dumps(scheduler.config, indent=2) + "\n")


@pytest.mark.parametrize(
    "model",
    [
        perturb(tiny(num_classes=3, channel_mult=[1, 2])),
        perturb(ClassicUNet(base_channels=8, channel_mult=[1, 2], time_conditioning=True, num_classes=3)),
    ],
    ids=["UNet", "ClassicUNet"],
)
def test_from_pretrained_and_save_pretrained_round_trip_bit_for_bit_both_ways_with_the_old_folders(
    tmp_path, model
):
    cls, scheduler = type(model), NoiseScheduler(num_train_timesteps=50, beta_schedule="cosine")
    model.save_pretrained(tmp_path / "mixin", scheduler=scheduler)
    assert sorted(os.listdir(tmp_path / "mixin")) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "noise_scheduler.json",
    ]
    loaded = cls.from_pretrained(tmp_path / "mixin")
    assert type(loaded) is cls and loaded.config == model.config and not loaded.training
    assert digest(loaded.state_dict()) == digest(model.state_dict())
    # ddpm.load_pretrained reads the mixin's folder, with its schedule
    network, schedule = load_pretrained(tmp_path / "mixin")
    assert digest(network.state_dict()) == digest(model.state_dict()) and schedule.config == scheduler.config

    # a folder written before: loads with from_pretrained, and its weights file is the one written now, byte
    # for byte (the mixin's save_model writes the same contiguous tensors with no metadata)
    write_folder_as_before_the_mixin(tmp_path / "before", model, scheduler)
    assert digest(cls.from_pretrained(str(tmp_path / "before")).state_dict()) == digest(model.state_dict())
    saved = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("before", "mixin")]
    assert saved[0] == saved[1]

    # ddpm.save_pretrained writes the same folder, whole
    save_pretrained(tmp_path / "io", model, scheduler)
    assert sorted(os.listdir(tmp_path)) == ["before", "io", "mixin"]  # no temporary folder left
    assert (tmp_path / "io" / "model.safetensors").read_bytes() == saved[1]
    assert json.loads((tmp_path / "io" / "config.json").read_text()) == {
        "class": cls.__name__,
        "ddpm_version": ddpm_version(),
        **model.config,
    }


def test_a_folder_without_a_schedule_loads_as_a_network_but_not_as_a_model_folder(tmp_path):
    tiny().save_pretrained(tmp_path / "bare")
    assert not (tmp_path / "bare" / "noise_scheduler.json").exists()
    assert isinstance(UNet.from_pretrained(tmp_path / "bare"), UNet)
    with pytest.raises(CheckpointError, match=r"bare has no noise_scheduler\.json"):
        load_pretrained(tmp_path / "bare")
    assert "None was saved with these weights" in (tmp_path / "bare" / "README.md").read_text()


def test_the_model_card_states_the_schedule_the_sampler_settings_and_shows_the_grid(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "grid.png")
    model, scheduler = tiny(num_classes=3), NoiseScheduler(num_train_timesteps=50, beta_schedule="cosine")
    sampling = {"sampler": "heun", "steps": 10, "calls": None, "eta": 0.0, "guidance_scale": 2.0}
    sampling["options"] = {"s_churn": 40}
    model.save_pretrained(
        tmp_path / "m", scheduler=scheduler, sampling=sampling, sample_grid=tmp_path / "grid.png"
    )
    assert (tmp_path / "m" / "sample_grid.png").read_bytes() == (tmp_path / "grid.png").read_bytes()
    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.library_name == "ddpm" and card.data.pipeline_tag == "unconditional-image-generation"
    assert {"ddpm", "diffusion", "pytorch_model_hub_mixin"} <= set(card.data.tags)
    text = card.text
    assert (
        f"{sum(p.numel() for p in model.parameters()):,} parameters, 3-channel 8x8 images, 3 classes" in text
    )
    assert '| `beta_schedule` | `"cosine"` |' in text and "| `num_train_timesteps` | `50` |" in text
    assert "the `heun` sampler with 10 steps, guidance scale 2, s_churn=40." in text
    command = "--sampler heun --steps 10 --guidance-scale 2 --option s_churn=40"
    assert f"ddpm sample --checkpoint path/to/this/folder --n 16 {command}" in text
    assert "![samples](sample_grid.png)" in text
    assert 'ddpm.load_pretrained("path/to/this/folder")' in text


def test_from_pretrained_says_which_loader_another_folder_needs(tmp_path, monkeypatch):
    ClassicUNet(base_channels=8, channel_mult=[1, 2]).save_pretrained(tmp_path / "classic")
    with pytest.raises(ValueError, match=r"describes a ClassicUNet, not a UNet: load it with ClassicUNet\."):
        UNet.from_pretrained(tmp_path / "classic")
    (tmp_path / "diffusers").mkdir()
    (tmp_path / "diffusers" / "model.safetensors").write_bytes(b"")
    (tmp_path / "diffusers" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(
        ValueError, match=r"describes a diffusers UNet2DModel: load it with ddpm\.load_pretrained"
    ):
        UNet.from_pretrained(tmp_path / "diffusers")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # so runs/typo is a path, not a Hub repo id
    with pytest.raises(
        FileNotFoundError, match=rf"^runs/typo: no such file or folder \(looked for {tmp_path}/"
    ):
        UNet.from_pretrained("runs/typo")
