import functools
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from ddpm.config import (
    DATASETS,
    SPLITS,
    Config,
    ConfigError,
    DataConfig,
    SampleConfig,
    TrainConfig,
    build_model,
    build_schedule,
    check_diffusion_model,
    construct,
    load_config,
    save_config,
)
from ddpm.data import BUILDERS, DataError, build_dataset
from ddpm.edm import EDMScheduler
from ddpm.models import ClassicUNet
from ddpm.models.unet import UNet
from ddpm.schedule import NoiseScheduler

DIGITS_YAML = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
FOLDER_YAML = DIGITS_YAML.with_name("folder.yaml")


def requires(*modules: str) -> None:
    """Skip when a module of another builder is not there yet (config checks names against them)."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not available")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_digits_config_loads_and_builds():
    requires("ddpm.models.unet", "ddpm.schedule", "ddpm.samplers")
    from ddpm.models.unet import UNet
    from ddpm.schedule import NoiseScheduler

    config = load_config(DIGITS_YAML)
    file = yaml.safe_load(DIGITS_YAML.read_text())
    assert config.model == file["model"] and config.diffusion == file["diffusion"]
    assert config.data == DataConfig(**file["data"])
    assert config.output_dir == file["output_dir"]
    assert config.train.steps == file["train"]["steps"]
    assert config.train.adam_betas == TrainConfig.adam_betas  # not in the file: the default
    assert (config.data.dataset, config.data.image_size, config.data.channels) == ("digits", 16, 1)
    model = UNet(**config.model)
    assert model.config["in_channels"] == config.data.channels and model.num_classes == 10
    assert NoiseScheduler(**config.diffusion).config["num_train_timesteps"] == 1000


def test_defaults_fill_in_missing_sections_and_keys(tmp_path):
    config = load_config(write(tmp_path, "train:\n  steps: 5\n"))
    assert config == Config(train=TrainConfig(steps=5))
    assert config.model == {} and config.diffusion == {} and config.sample == SampleConfig()
    assert load_config(None) == Config()
    assert load_config(write(tmp_path, "")) == Config()


def test_overrides_of_each_type(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\n  lr: 0.1\n")
    config = load_config(
        path,
        [
            "train.steps=200",  # int
            "train.lr=3e-4",  # float without a dot: YAML 1.1 would read a string
            "train.ema_decay=0",  # an int where a float is expected
            "data.hflip=true",  # bool
            "train.adam_betas=[0.5, 0.9]",  # list
            "train.mixed_precision=bf16",  # string
            "output_dir=runs/try",
            "data.num_workers=2",
            "data.num_workers=3",  # the last one wins
        ],
    )
    assert config.train.steps == 200
    assert config.train.lr == 3e-4 and isinstance(config.train.lr, float)
    assert config.train.ema_decay == 0.0 and isinstance(config.train.ema_decay, float)
    assert config.data.hflip is True
    assert config.train.adam_betas == (0.5, 0.9)
    assert config.train.mixed_precision == "bf16"
    assert config.output_dir == "runs/try"
    assert config.data.num_workers == 3


def test_overrides_of_model_and_diffusion_keys(tmp_path):
    requires("ddpm.models.unet", "ddpm.schedule")
    config = load_config(
        None,
        ["model.channel_mult=[1,2]", "model.num_classes=null", "diffusion.beta_end=0.01", "data.channels=3"],
    )
    assert config.model == {"channel_mult": [1, 2], "num_classes": None, "image_size": 16}
    assert config.diffusion == {"beta_end": 0.01}


def test_exponent_floats_in_a_file_are_numbers(tmp_path):
    config = load_config(write(tmp_path, "train:\n  lr: 1e-3\n  min_snr_gamma: 5E0\n"))
    assert config.train.lr == 1e-3 and config.train.min_snr_gamma == 5.0


TRAIN_KEYS = r"valid keys of train: steps, lr, weight_decay, adam_betas, warmup_steps"

# (file text, overrides, modules it needs, message pattern)
ERRORS = [
    ("train:\n  stepz: 3\n", [], (), r"unknown key 'train\.stepz' in \S+job\.yaml; " + TRAIN_KEYS),
    ("", ["train.stepz=3"], (), r"unknown key 'train\.stepz' in override 'train\.stepz=3'; " + TRAIN_KEYS),
    ("", ["data.sizes=3"], (), r"unknown key 'data\.sizes'.*valid keys of data: dataset, root, image_size"),
    ("", ["sample.stepz=3"], (), r"unknown key 'sample\.stepz'.*valid keys of sample: sampler, steps, eta"),
    (
        "trian:\n  steps: 3\n",
        [],
        (),
        r"unknown key 'trian' in \S+job\.yaml; valid top-level keys: model, diffusion, data, train, sample, "
        "output_dir",
    ),
    (
        "",
        ["trian.steps=3"],
        (),
        r"unknown key 'trian\.steps' in override 'trian\.steps=3'; valid sections: model",
    ),
    (
        "model:\n  base_chanels: 8\n",
        [],
        ("ddpm.models.unet",),
        r"unknown key 'model\.base_chanels' in \S+; valid keys of model \(UNet\): in_channels, out_channels, "
        "base_channels",
    ),
    (
        "",
        ["diffusion.beta_schedul=linear"],
        ("ddpm.schedule",),
        r"unknown key 'diffusion\.beta_schedul' in override .*; valid keys of diffusion \(NoiseScheduler\): "
        "num_train_timesteps, beta_schedule",
    ),
    (
        "",
        ["train.steps=abc"],
        (),
        r"invalid value 'abc' for 'train\.steps' in override .*: expected an integer",
    ),
    (
        "train:\n  steps: 2.5\n",
        [],
        (),
        r"invalid value 2\.5 for 'train\.steps' in \S+job\.yaml: expected an integer",
    ),
    ("", ["data.hflip=3"], (), r"invalid value 3 for 'data\.hflip' .*: expected true or false"),
    ("", ["train.lr=fast"], (), r"invalid value 'fast' for 'train\.lr' .*: expected a number"),
    ("", ["train.steps=true"], (), r"invalid value True for 'train\.steps' .*: expected an integer"),
    ("", ["train.adam_betas=[0.9]"], (), r"'train\.adam_betas' .*: expected a list of two numbers"),
    ("", ["train.adam_betas=[0.9, 1.5]"], (), r"'train\.adam_betas' .*: expected two numbers in \[0, 1\)"),
    ("", ["output_dir=3"], (), r"invalid value 3 for 'output_dir' .*: expected a non-empty string"),
    ("", ["train.steps=0"], (), r"invalid value 0 for 'train\.steps' .*: expected an integer >= 1"),
    ("", ["data.batch_size=0"], (), r"invalid value 0 for 'data\.batch_size' .*: expected an integer >= 1"),
    ("", ["train.lr=-1e-4"], (), r"invalid value -0\.0001 for 'train\.lr' .*: expected a number > 0"),
    ("", ["train.ema_decay=1.0"], (), r"'train\.ema_decay' .*: expected a number in \[0, 1\)"),
    ("", ["data.channels=2"], (), r"invalid value 2 for 'data\.channels' .*: expected one of 1, 3"),
    (
        "",
        ["data.num_workers=-1"],
        (),
        r"value -1 for 'data\.num_workers' .*: expected an integer >= 0, or auto",
    ),
    (
        "",
        ["data.num_workers=many"],
        (),
        r"value 'many' for 'data\.num_workers' .*: expected an integer or auto",
    ),
    (
        "data:\n  dataset: cifar100\n",
        [],
        (),
        r"invalid value 'cifar100' for 'data\.dataset' .*: expected one of digits, digit_masks, "
        "digit_strips, folder, cifar10, mnist, fashion_mnist, celeba",
    ),
    (
        "",
        ["train.mixed_precision=fp8"],
        (),
        r"'train\.mixed_precision' .*: expected one of auto, no, fp16, bf16",
    ),
    ("", ["train.nan_policy=ignore"], (), r"'train\.nan_policy' .*: expected one of stop, skip"),
    ("", ["train.dist_timeout_s=0"], (), r"value 0 for 'train\.dist_timeout_s' .*: expected a number > 0"),
    (
        "",
        ["train.loss_weighting=snr"],
        ("ddpm.schedule",),
        r"invalid value 'snr' for 'train\.loss_weighting' .*: expected one of uniform, min_snr",
    ),
    (
        "",
        ["sample.sampler=dmp"],
        ("ddpm.samplers",),
        r"invalid value 'dmp' for 'sample\.sampler' .*: expected one of .*ddim",
    ),
    ("", ["data.dataset=cifar10"], (), r"data\.root is required for data\.dataset 'cifar10'"),
    ("train: 3\n", [], (), r"'train' in \S+job\.yaml must be a mapping of keys, got 3"),
    ("", ["train.steps"], (), r"override 'train\.steps' must look like key=value"),
    ("", ["train=3"], (), r"override 'train=3' must name one key of train"),
    ("", ["model.a.b=3"], (), r"override 'model\.a\.b=3' must name one key of model"),
    (
        "",
        ["train.adam_betas=[0.9,"],
        (),
        r"override 'train\.adam_betas=\[0\.9,': the value is not valid YAML",
    ),
]


@pytest.mark.parametrize(("text", "overrides", "modules", "pattern"), ERRORS)
def test_errors_name_the_key_and_what_is_valid(tmp_path, text, overrides, modules, pattern):
    requires(*modules)
    with pytest.raises(ConfigError, match=pattern) as error:
        load_config(write(tmp_path, text), overrides)
    assert "\n" not in str(error.value)
    assert isinstance(error.value, ValueError)


def test_from_dict_checks_like_load_config():
    with pytest.raises(
        ConfigError, match=r"unknown key 'train\.stepz' in the config dict; valid keys of train"
    ):
        Config.from_dict({"train": {"stepz": 3}})


def test_to_dict_from_dict_round_trip(tmp_path):
    config = load_config(
        None, ["train.steps=7", "train.adam_betas=[0.5,0.6]", "data.root=/data", "output_dir=x"]
    )
    d = config.to_dict()
    assert d["train"]["adam_betas"] == [0.5, 0.6]  # lists, so that YAML and JSON take it
    assert yaml.safe_load(yaml.safe_dump(d)) == d
    assert Config.from_dict(d) == config


def test_save_load_round_trip(tmp_path):
    requires("ddpm.models.unet", "ddpm.schedule", "ddpm.samplers")
    config = load_config(
        DIGITS_YAML,
        ["train.lr=1e-5", "data.hflip=true", "model.channel_mult=[1,2]", "model.attention_resolutions=[8]"],
    )
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config


def test_save_load_round_trip_of_the_defaults(tmp_path):
    config = load_config(None, ["train.lr=1e-5", "train.warmup_steps=0", "data.root=null"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


# -- settings of different sections that cannot work together: refused when the config is read, all at once


def test_image_size_mismatch_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"model\.image_size=16 .*data\.image_size=32") as error:
        load_config(DIGITS_YAML, ["data.image_size=32"])
    assert "\n" not in str(error.value)


def test_model_image_size_is_taken_from_data_when_absent(tmp_path):
    model = (
        "model:\n  in_channels: 1\n  out_channels: 1\n  channel_mult: [1, 2]\n  attention_resolutions: []\n"
    )
    text = model + "data:\n  image_size: 8\n"
    config = load_config(write(tmp_path, text))
    assert config.model["image_size"] == 8
    assert load_config(write(tmp_path, text), ["data.image_size=12"]).model["image_size"] == 12
    assert load_config(None) == Config()  # no model section: nothing to fill (a file for the data alone)


def test_every_conflict_is_reported_at_once():
    overrides = ["data.channels=3", "data.image_size=10", "data.labels=false", "data.dataset=folder"]
    with pytest.raises(ConfigError) as error:
        load_config(DIGITS_YAML, [*overrides, "sample.guidance_scale=2", "diffusion.clip_sample_range=0"])
    message = str(error.value)
    assert "\n" not in message
    for pattern in [
        r"^6 problems in the config: ",
        r"diffusion\.clip_sample_range: clip_sample_range must be > 0, got 0 \(the diffusion section holds ",
        r"model\.in_channels=1 but data\.channels=3: set model\.in_channels=3",
        r"model\.out_channels=1 but data\.channels=3: set model\.out_channels=3",
        r"model\.image_size=16 but data\.image_size=10: make them equal",
        r"model\.num_classes=10 but data\.labels=false: set model\.num_classes=null or data\.labels=true",
        r"data\.root is required for data\.dataset 'folder'",
    ]:
        assert re.search(pattern, message), (pattern, message)
    with pytest.raises(
        ConfigError, match=r"sample\.guidance_scale=2\.0 needs a class-conditional model: set sample\."
    ):
        load_config(DIGITS_YAML, ["model.num_classes=null", "data.labels=false", "sample.guidance_scale=2"])


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (
            ["model.norm_groups=7"],
            r"model\.norm_groups: channel counts \[16, 32\] \(base_channels \* channel_mult\) are not "
            r"divisible by norm_groups=7 \(the model section holds UNet's arguments\)$",
        ),
        (["model.channel_mult=3"], r"^model: 'int' object is not iterable \(the model section holds UNet's"),
        (
            ["diffusion.beta_schedule=linear", "diffusion.beta_end=2"],
            r"^diffusion\.beta_end: beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, got "
            r"beta_start=0\.0001, beta_end=2 \(the diffusion section holds NoiseScheduler's arguments\)$",
        ),
        (
            ["model.image_size=10", "data.image_size=10"],
            r"^model\.channel_mult, model\.image_size: image_size=10 must be divisible by "
            r"2\*\*\(levels - 1\) = 4, for channel_mult=\[1, 2, 2\]: use another image_size or fewer levels",
        ),
    ],
    ids=lambda x: " ".join(x) if isinstance(x, list) else None,
)
def test_what_the_constructors_refuse_is_refused_when_the_config_is_read(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern) as error:
        load_config(DIGITS_YAML, overrides)
    assert "\n" not in str(error.value)


def test_an_image_size_taken_from_data_is_named_as_data_image_size(tmp_path):
    model = (
        "model:\n  in_channels: 1\n  out_channels: 1\n  channel_mult: [1, 2, 2]\n  attention_resolutions: []"
    )
    with pytest.raises(
        ConfigError,
        match=r"^model\.channel_mult, data\.image_size: image_size=10 must be divisible by "
        r"2\*\*\(levels - 1\) = 4, for channel_mult=\[1, 2, 2\]: use another image_size or fewer levels "
        r"\(the model section holds UNet's arguments\)$",
    ):
        load_config(write(tmp_path, model + "\ndata:\n  image_size: 10\n"))


def test_a_diffusion_section_alone_is_checked_by_its_constructor():
    with pytest.raises(ConfigError, match=r"^diffusion\.prediction_type: .*'x0'"):
        Config.from_dict({"diffusion": {"prediction_type": "x0"}})


def test_the_constructors_run_on_the_meta_device(monkeypatch):
    devices = []
    build = UNet.__init__

    @functools.wraps(build)  # keeps the signature: config reads the valid keys and defaults from it
    def spy(self, **kwargs):
        build(self, **kwargs)
        devices.append(self.conv_in.weight.device)

    monkeypatch.setattr(UNet, "__init__", spy)
    load_config(DIGITS_YAML)
    assert devices == [torch.device("meta")]


def test_construct_names_the_keys_of_the_error_and_their_aliases():
    assert isinstance(construct(NoiseScheduler, "diffusion", {"beta_schedule": "cosine"}), NoiseScheduler)
    with pytest.raises(
        ConfigError, match=r"^diffusion\.beta_schedule: unknown beta_schedule 'cosin'; valid: "
    ):
        construct(NoiseScheduler, "diffusion", {"beta_schedule": "cosin"})
    kwargs = {"image_size": 7, "channel_mult": [1, 2]}
    with pytest.raises(ConfigError, match=r"^data\.image_size, model\.channel_mult: image_size=7 must be "):
        construct(UNet, "model", kwargs, aliases={"model.image_size": "data.image_size"})


def test_the_data_sets_are_the_ones_config_accepts():
    assert tuple(BUILDERS) == DATASETS
    with pytest.raises(
        DataError,
        match=r"^unknown dataset 'cifar100'; valid: digits, digit_masks, digit_strips, folder, cifar10, "
        r"mnist, fashion_mnist, celeba$",
    ):
        build_dataset(DataConfig(dataset="cifar100"))


def test_a_split_the_data_set_lacks_is_refused_when_the_config_is_read():
    assert (
        load_config(None).data.split == "train"
        and load_config(None, ["data.split=test"]).data.split == "test"
    )
    with pytest.raises(ConfigError, match=r"'data\.split'.*expected one of train, test, all"):
        load_config(None, ["data.split=valid"])
    folder = ["data.dataset=folder", "data.root=images", "data.split=test"]
    with pytest.raises(
        ConfigError,
        match=r"^data\.split=test but data\.dataset 'folder' has no such split; valid there: train \(",
    ):
        load_config(None, folder)
    with pytest.raises(
        ConfigError, match=r"data\.split=all but data\.dataset 'mnist'.*valid there: train, test$"
    ):
        load_config(None, ["data.dataset=mnist", "data.root=m", "data.split=all"])
    assert tuple(SPLITS) == DATASETS


def test_unet_defaults_count_for_an_absent_model_key():
    # model.in_channels is not in the file: UNet's default, 3, does not fit 1-channel data.
    with pytest.raises(ConfigError, match=r"model\.in_channels=3 \(UNet's default\) but data\.channels=1"):
        Config.from_dict({"model": {"out_channels": 1, "channel_mult": [1, 2]}, "data": {"image_size": 8}})


SEED_DIGITS_YAML = DIGITS_YAML.with_name("seed_digits.yaml")


def test_the_architecture_key_chooses_the_network_and_its_keys():
    config = load_config(SEED_DIGITS_YAML)
    assert config.model["architecture"] == "classic"
    model = build_model(config.model)
    assert type(model) is ClassicUNet and model.time_conditioning and model.num_classes == 10
    assert type(build_model(load_config(DIGITS_YAML).model)) is UNet  # no key: UNet
    with pytest.raises(ConfigError, match=r"'model\.architecture': expected one of unet, classic"):
        load_config(SEED_DIGITS_YAML, ["model.architecture=resnet"])
    with pytest.raises(
        ConfigError, match=r"unknown key 'model\.num_res_blocks'.*\(ClassicUNet\): in_channels"
    ):
        load_config(SEED_DIGITS_YAML, ["model.num_res_blocks=2"])
    with pytest.raises(
        ConfigError, match=r"model\.norm_groups: channel counts \[32, 64, 128\].*ClassicUNet's"
    ):
        load_config(SEED_DIGITS_YAML, ["model.norm_groups=5"])
    with pytest.raises(
        ConfigError, match=r"model\.in_channels=3 \(ClassicUNet's default\) but data\.channels=1"
    ):
        Config.from_dict({"model": {"architecture": "classic", "image_size": 16}})


def test_a_time_free_network_is_no_diffusion_model():
    check_diffusion_model(load_config(SEED_DIGITS_YAML).model)
    check_diffusion_model({})  # UNet's default is time-conditioned
    with pytest.raises(
        ConfigError,
        match=r"^model\.time_conditioning=false \(ClassicUNet's default\) builds a segmentation network, "
        r"called as model\(x\)",
    ):
        check_diffusion_model({"architecture": "classic"})
    with pytest.raises(ConfigError, match=r"^model\.time_conditioning=false builds a segmentation network"):
        check_diffusion_model({"time_conditioning": False})


def test_folder_config_loads_and_fits_its_model(tmp_path):
    import torch
    from PIL import Image

    from ddpm.data import build_dataset
    from ddpm.models.unet import UNet

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (80, 70), (40 * i, 90, 200)).save(folder / f"{i}.png")
    with pytest.raises(ConfigError, match=r"data\.root is required for data\.dataset 'folder'"):
        load_config(FOLDER_YAML)
    config = load_config(FOLDER_YAML, [f"data.root={folder}"])
    assert config.data.dataset == "folder" and not config.data.labels and "num_classes" not in config.model
    model = UNet(**config.model)
    image, label = build_dataset(config.data)[0]
    assert image.shape == (config.data.channels, config.data.image_size, config.data.image_size)
    with torch.no_grad():
        assert model(image[None], 10).shape == image[None].shape


@pytest.mark.parametrize(
    ("cores", "processes", "workers"), [(1, 1, 0), (2, 1, 1), (3, 1, 2), (64, 1, 4), (8, 2, 3)]
)
def test_num_workers_auto_leaves_the_main_process_a_core(monkeypatch, cores, processes, workers):
    """torch's DataLoader warns when a loader starts more workers than the cores its process may run on."""
    from ddpm.data import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    assert loader_workers("auto") == workers and workers < cores
    assert loader_workers(3) == 3  # a number is taken as it is


def test_the_folder_config_builds_its_loader_without_a_warning_on_2_cores(tmp_path, monkeypatch):
    import warnings

    from PIL import Image

    from ddpm.data import build_dataset
    from ddpm.training.trainer import _loader

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (80, 70), (40 * i, 90, 200)).save(folder / f"{i}.png")
    config = load_config(FOLDER_YAML, [f"data.root={folder}", "data.batch_size=2"])
    assert config.data.num_workers == "auto"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # as torch counts them
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "This DataLoader will create 4 worker processes ..."
        loader = _loader(build_dataset(config.data), config, num_processes=1)
        images, _ = next(iter(loader))
    assert loader.num_workers == 1 and images.shape == (2, 3, 64, 64)


def test_trainer_checks_a_config_built_in_code_and_the_classes_of_the_data():
    from ddpm.data import TensorImageDataset
    from ddpm.models.unet import UNet
    from ddpm.training.trainer import _check_compatible

    tiny = dict(base_channels=8, channel_mult=[1, 2], attention_resolutions=[], image_size=8, norm_groups=4)
    model = UNet(in_channels=1, out_channels=1, num_classes=3, **tiny)
    data = DataConfig(image_size=8, channels=3)
    five_classes = TensorImageDataset(torch.zeros(5, 3, 8, 8), torch.arange(5), num_classes=5)
    with pytest.raises(
        ConfigError, match=r"^3 problems .*in_channels=1 but .*out_channels=1 but .*5 classes"
    ):
        _check_compatible(model, five_classes, Config(model=model.config, data=data))
    no_labels = TensorImageDataset(torch.zeros(5, 1, 8, 8), torch.full((5,), -1), num_classes=None)
    with pytest.raises(ConfigError, match=r"^model\.num_classes=3 but the digits data has no labels"):
        _check_compatible(model, no_labels, Config(model=model.config, data=replace(data, channels=1)))


@pytest.mark.parametrize("launcher", [["python"], ["accelerate", "launch", "-q"]], ids=" ".join)
def test_a_bad_key_through_the_documented_commands_ends_with_our_line_and_status_1(launcher):
    # README's commands: `python train.py` for one process, `accelerate launch -q train.py` where accelerate's
    # own settings are wanted (without -q, accelerate prints its traceback after our line).
    root = DIGITS_YAML.parents[1]
    bin_dir = Path(sys.executable).parent
    launch = [str(bin_dir / launcher[0]), *launcher[1:]]
    if launcher[0] == "accelerate":
        launch += ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no"]
        launch += ["--dynamo_backend", "no"]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*launch, "train.py", "train.stepz=1", "output_dir=never"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown key 'train.stepz' in override 'train.stepz=1'"), result.stderr


# Every training config that ships: configs/ (seed_unet.yaml is the write-up's segmentation network, a model
# section that tests/test_classic.py builds, not a run) and bench/configs/.
SHIPPED_CONFIGS = [
    path
    for path in sorted(DIGITS_YAML.parent.glob("*.yaml"))
    + sorted((DIGITS_YAML.parents[1] / "bench" / "configs").glob("*.yaml"))
    if path.name != "seed_unet.yaml"
]


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_is_read_and_builds_its_model_and_schedule(path):
    """load_config builds the network and the schedule of each config on the meta device, so a key that
    the constructors refuse (or a conflict between sections) fails here, not an hour into a run."""
    config = load_config(path, ["data.root=images"] if path == FOLDER_YAML else [])  # folder.yaml asks for it
    raw = yaml.safe_load(path.read_text())
    assert config.output_dir == raw["output_dir"] and config.model["image_size"] == raw["data"]["image_size"]
    edm = raw["diffusion"].get("formulation") == "edm"
    assert isinstance(build_schedule(config.diffusion), EDMScheduler) == edm
