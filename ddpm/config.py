"""Run configuration: one YAML file with the sections model, diffusion, data, train, sample and output_dir.

`model` holds the network's constructor's keyword arguments (`UNet`'s, or with `architecture: classic`
`ClassicUNet`'s: `build_model`) and `diffusion` the `NoiseScheduler`'s, passed as given (a missing key takes
the constructor's default); their values are checked by building both when the file is read, on the meta
device (no memory, no time), so that each check exists once, in its constructor.
`data`, `train` and `sample` are dataclasses below: a missing key takes the default written there, and every
value is checked for its type and range when the file is read, so that a typo stops the run before it starts
rather than after an hour. What the constructors refuse and the settings of different sections that cannot
work together (`conflicts`) are then reported all at once, in one error. `model.image_size`, when left out, is
`data.image_size`: one value decides the image size. Overrides are dotted `key=value` strings read as YAML
scalars: `train.steps=200 data.batch_size=32 model.channel_mult=[1,2] output_dir=runs/try`.
"""

import copy
import dataclasses
import inspect
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from ddpm.attributes import ATTRIBUTES
from ddpm.compiled import AUTO, COMPILE_MODES
from ddpm.digit_strips import CONTEXT_DIM
from ddpm.digit_strips import GRID as STRIP_GRID
from ddpm.edm import FORMULATION, FORMULATIONS, EDMScheduler, schedule_class
from ddpm.ema.power import DEFAULT_SIGMA_RELS, SIGMA_REL_MAX
from ddpm.io import atomic_write
from ddpm.lr_schedule import LR_SCHEDULES
from ddpm.models import ARCHITECTURES
from ddpm.models.unet import CONDITION_ARGUMENTS
from ddpm.samplers import SampleOptionError, check_sample_options
from ddpm.schedule import LOSS_WEIGHTINGS, NoiseScheduler
from ddpm.trackers import LOG_WITH, trackers

# The values of train.timestep_sampling: uniform t, or Nichol & Dhariwal 2021's importance sampling of t by
# the root mean square of its recent losses (ddpm.training.timestep_sampler).
TIMESTEP_SAMPLINGS = ("uniform", "loss_second_moment")


def _bundled_configs() -> Path:
    """The folder of the configs that ship with ddpm: package data (ddpm/configs/) in an installed wheel, the
    source tree's configs/ in a clone or an editable install (pyproject.toml maps one onto the other)."""
    package = Path(__file__).resolve().parent
    return package / "configs" if (package / "configs").is_dir() else package.parent / "configs"


# The configs `--config NAME` finds by name (`resolve_config`).
BUNDLED_CONFIGS = _bundled_configs()
# The default job of ddpm-train and ddpm-sample (train.py, sample.py) without --config or --checkpoint.
DEFAULT_CONFIG = BUNDLED_CONFIGS / "digits.yaml"
# The values of data.dataset: ddpm.data keys its builders by these names.
DATASETS = ("digits", "digit_masks", "digit_strips", "folder", "cifar10", "mnist", "fashion_mnist", "celeba")
# The values of data.split each data set can give (ddpm.data): "train" its training images, "test" its
# held-out ones (torchvision's test split; for the digits a fixed tenth that training never sees), "all" both
# (the digits only: the reference of the benchmarks' kernel distances). A folder is its own training set.
SPLITS = {
    "digits": ("train", "test", "all"),
    "digit_masks": ("train", "test"),
    "digit_strips": ("train", "test"),
    "folder": ("train",),
    "cifar10": ("train", "test"),
    "mnist": ("train", "test"),
    "fashion_mnist": ("train", "test"),
    "celeba": ("train", "test"),
}
# The values of data.task: what a built-in task derives from each image as its conditions (ddpm.data):
# "none" nothing; "superres" the image area-downsampled by data.superres_factor and upsampled back; "inpaint"
# the image with random holes, and the mask of its known pixels; "attributes" a vector of the image's measured
# attributes (ddpm.attributes.ATTRIBUTES: ink, thickness, slant), standardised with the training set's.
TASKS = ("none", "superres", "inpaint", "attributes")
# The data keys `task_settings` saves with the weights.
TASK_SETTINGS = ("task", "superres_factor", "attribute_mean", "attribute_std")
# The kinds of condition data.conditions can read from files beside the images (ddpm.condition_files).
CONDITION_FILE_KINDS = ("image", "vector", "context")
# The conditions a data set gives with each image, by kind (ddpm.conditions.KINDS), beside its label:
# digit_masks (ddpm.digit_masks) yields masks as the images to generate and the cluttered digit as "image";
# digit_strips (ddpm.digit_strips) yields strips of digits and their token sequences as "context".
DATASET_CONDITIONS = {"digit_masks": ("image",), "digit_strips": ("context",)}
# The data sets made in memory from what scikit-learn ships, with no data.root.
BUILT_IN = ("digits", "digit_masks", "digit_strips")
T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override with an unknown key, or a value of the wrong type or out of range."""


@dataclass
class DataConfig:
    """The `data:` section: which images, at what size, and how they are batched (`ddpm.data`)."""

    dataset: str = "digits"  # one of DATASETS: digits | digit_masks | digit_strips | folder | cifar10 | ...
    root: str | None = None  # folder of images, or torchvision root (required for all but digits)
    image_size: int = 16  # square side in pixels after resize (+ centre crop for folders/celeba)
    channels: int = 1  # 1 or 3: images converted to L or RGB
    labels: bool = True  # return class labels (folder: from sub-folder names); False -> label -1
    split: str = "train"  # train | test | all: which images (SPLITS says which each data set has)
    hflip: bool = False  # random horizontal flip
    download: bool = False  # torchvision datasets only
    batch_size: int = 64  # per process
    num_workers: int | str = 0  # DataLoader workers per process, or "auto" (ddpm.data.loader_workers)
    task: str = (
        "none"  # one of TASKS: none | superres | inpaint | attributes (conditions derived from images)
    )
    superres_factor: int = 4  # superres: the side's reduction of the low-resolution image the model sees
    # attributes: each attribute's mean and std (ddpm.attributes.ATTRIBUTES order, their own units), the units
    # of the vector condition; null: measured on the training set when training starts (the run's saved
    # config and its model folders' task.json then hold them, and sampling reads them there)
    attribute_mean: tuple[float, ...] | None = None
    attribute_std: tuple[float, ...] | None = None
    # folder: conditions read from files beside each image, kind (image, vector, context) -> the name part of
    # its files: {image: cond, vector: emb} reads cat.png's from cat.cond.png and cat.emb.npy (or
    # .safetensors); ddpm.condition_files says how they are named and shaped
    conditions: dict[str, str] = field(default_factory=dict)
    paired: bool = False  # folder: data.root/targets/ the images, data.root/inputs/ their image conditions


@dataclass
class TrainConfig:
    """The `train:` section: the optimizer, its schedule, EMA, checkpoints, logging and the loss's options."""

    steps: int = 2000  # optimizer steps
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100  # linear LR warm-up, in optimizer steps
    lr_schedule: str = "constant"  # after the warm-up: constant | cosine | linear (ddpm.lr_schedule)
    lr_min: float = 0.0  # the learning rate cosine and linear decay towards
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    grad_accum: int = 1  # micro-batches per optimizer step
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay = min(ema_decay, (1 + n) / (10 + n))
    posthoc_ema_every: int = 0  # optimizer steps between post-hoc EMA snapshots (0: none); see ddpm.ema
    posthoc_ema_sigma_rels: tuple[float, ...] = DEFAULT_SIGMA_RELS  # their profiles' relative widths
    # p of dropping a row's conditions (label, task's image), all together, to their nulls (classifier-free
    # guidance; ddpm.losses.drop_conditions)
    label_dropout: float = 0.1
    # Per-kind condition dropout in place of label_dropout's joint one (which must then be 0): a probability
    # for every kind of condition the model takes, each kind drawn on its own, or kind -> probability naming
    # each of them ("label", "image", "vector", "context"; ddpm.losses.drop_conditions); null: label_dropout
    cond_dropout: float | dict[str, float] | None = None
    loss_weighting: str = "uniform"  # uniform | min_snr (ddpm.schedule.LOSS_WEIGHTINGS)
    min_snr_gamma: float = 5.0
    # Learn the variance (Nichol & Dhariwal 2021): the hybrid loss L_simple + 0.001 L_vlb (ddpm.losses); needs
    # model.out_channels = 2 * model.in_channels and diffusion.variance_type = learned_range
    learn_sigma: bool = False
    timestep_sampling: str = "uniform"  # uniform | loss_second_moment (their importance sampling of t)
    # Each true, false or auto: auto is on with CUDA and off on the CPU, where compiling costs minutes and
    # channels_last does not pay (BENCHMARKS.md sections 1 and 4); compile's auto also needs a run long enough
    # to repay the compilation (ddpm.compiled.training_compile_pays).
    channels_last: bool | str = "auto"  # channels_last weights and batches (NHWC, tensor cores' layout)
    compile: bool | str = "auto"  # torch.compile the network, at static shapes (ddpm.compiled)
    compile_mode: str = "default"  # torch.compile's mode: default | reduce-overhead (CUDA graphs) | ...
    checkpoint_every: int = 500  # optimizer steps
    keep_checkpoints: int = 3
    sample_every: int = 500  # optimizer steps; 0 disables in-training grids
    log_every: int = 10  # optimizer steps
    seed: int = 0
    nan_policy: str = "stop"  # stop | skip
    dist_timeout_s: float = 600.0  # seconds a process waits for the others before it stops with an error
    fid_every: int = 0  # optimizer steps between FIDs of the EMA weights against the data (0: never)
    fid_n: int = 2000  # images sampled for each in-training FID (papers report 50,000: use ddpm.fid)
    fid_weights: str | None = None  # Inception weights (default: $DDPM_FID_WEIGHTS, else downloaded)
    cpu_threads: int = 0  # CPU threads per process; 0: OMP_NUM_THREADS if > 1, else cores / processes
    log_with: str = "auto"  # auto | tensorboard | wandb | all | none (ddpm.trackers)
    tracker_project: str = "ddpm"  # the trackers' project: TensorBoard's folder in the run, wandb's project

    def condition_dropout(self, kinds: Sequence[str]) -> float | dict[str, float]:
        """The probability `ddpm.losses.drop_conditions` takes for a batch holding the conditions `kinds`:
        label_dropout (joint: a row's conditions all dropped together) unless cond_dropout is set, then one
        probability per kind (its mapping, or its one value for each of `kinds`)."""
        if self.cond_dropout is None:
            return self.label_dropout
        if isinstance(self.cond_dropout, Mapping):
            return dict(self.cond_dropout)
        return dict.fromkeys(kinds, self.cond_dropout)


@dataclass
class SampleConfig:
    """The `sample:` section: the in-training sample grids, and `sample.py`'s defaults for the run."""

    sampler: str = "unipc"  # a name in ddpm.samplers.SAMPLERS; the default: BENCHMARKS.md section 5
    steps: int = 20  # solver steps per sample (a Heun step costs two network calls)
    eta: float = 0.0  # DDIM stochasticity: 0 deterministic, 1 DDPM-like
    n: int = 16  # images in the in-training grid
    guidance_scale: float = 1.0  # classifier-free guidance weight; 1 = conditional model alone
    calls: int | None = None  # instead of steps: network calls per sample, the most steps that fit in them
    options: dict[str, Any] = field(default_factory=dict)  # the solver's own options, e.g. {s_churn: 40}

    def sampler_settings(self) -> dict[str, Any]:
        """This section as the keyword arguments of `ddpm.sample` (and `ddpm.inference.generate`) that it
        sets, everything but n; calls, when set, replace steps."""
        return {
            "sampler": self.sampler,
            "steps": None if self.calls is not None else self.steps,
            "calls": self.calls,
            "eta": self.eta,
            "options": dict(self.options),
            "guidance_scale": self.guidance_scale,
        }


@dataclass
class Config:
    """A whole config file: the `model` and `diffusion` constructors' arguments, the three sections above
    and the run directory."""

    model: dict[str, Any] = field(default_factory=dict)  # build_model(model): UNet(**model) by default
    diffusion: dict[str, Any] = field(default_factory=dict)  # build_schedule(diffusion)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    output_dir: str = "runs/default"

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and scalars (YAML- and JSON-able), in the layout of a config file."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        """The inverse of `to_dict`, with every key and value checked as in `load_config`."""
        return _build(d, lambda key: "the config dict")


def resolve_config(name_or_path: str | Path) -> Path:
    """The config file `name_or_path` means: a file that exists at that path, else the bundled config of that
    name (`digits` or `digits.yaml`: BUNDLED_CONFIGS/digits.yaml). A file wins over a bundled config of the
    same name, so that a user's own `digits.yaml` in the working directory is the one read.

    Raises ConfigError, listing the bundled configs, when neither exists.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = BUNDLED_CONFIGS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent == Path(".") and bundled.is_file():
        return bundled
    names = ", ".join(sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.yaml")))
    raise ConfigError(
        f"config file {name_or_path} not found; pass an existing file with --config, or the name of a "
        f"bundled config: {names}"
    )


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read the YAML config `path` (a file, or the name of a bundled config: `resolve_config`; None: no file,
    only the defaults) and apply dotted `key=value` overrides.

    Raises ConfigError naming the key, where it came from (file or override) and what is valid.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_config(path)
        loaded = _read_yaml(Path(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(loaded).__name__}")
        raw = copy.deepcopy(loaded or {})
    file_source = str(path) if path is not None else "the defaults"
    sources: dict[str, str] = {}  # dotted key -> the override that set it
    for text in overrides:
        key, value = _parse_override(text)
        sources[key] = f"override '{text}'"
        section, _, name = key.partition(".")
        if not name:
            raw[section] = value
        elif not isinstance(raw.get(section), dict):  # absent or null in the file: start an empty section
            raw[section] = {name: value}
        else:
            raw[section][name] = value
    return _build(raw, lambda key: sources.get(key, file_source))


def save_config(config: Config, path: str | Path) -> None:
    """Write `config` as YAML (what `load_config` reads back into an equal Config).

    Written atomically (`atomic_write`), so that a crash never leaves a truncated file at `path`.
    """
    with atomic_write(path) as tmp:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def conflicts(config: Config, model: Mapping[str, Any] | None = None) -> list[str]:
    """The settings of different sections of `config` that cannot work together, each with its fix.

    `model` is the network's whole config (every constructor argument, as `UNet.config`); by default
    config.model over its class's defaults. Only what is known without loading the data is checked here; the
    Trainer adds what the data set itself says (its number of classes). What one section's own values cannot
    be is its constructor's to say (`construct`): the image side's divisibility by 2^(levels-1), for one.
    """
    model_keys = config.model if model is None else model
    cls, kwargs = model_class(config.model)
    model = {**_defaults(cls), **kwargs} if model is None else model
    data, sample = config.data, config.sample

    def key(name: str) -> str:
        note = "" if name in model_keys else f" ({cls.__name__}'s default)"
        return f"model.{name}={_yaml(model[name])}{note}"

    problems = []
    learn_sigma = config.train.learn_sigma
    for name in ("in_channels", "out_channels"):
        expected = 2 * data.channels if name == "out_channels" and learn_sigma else data.channels
        if model[name] != expected:
            why = (
                " (train.learn_sigma=true: the prediction, then the variance values)"
                if expected != data.channels
                else ""
            )
            problems.append(
                f"{key(name)} but data.channels={data.channels}{why}: set model.{name}={expected} "
                "or change data.channels"
            )
    variance_type = {"variance_type": "fixed_small", **config.diffusion}["variance_type"]
    if learn_sigma != (variance_type == "learned_range"):
        note = "" if "variance_type" in config.diffusion else " (NoiseScheduler's default)"
        if learn_sigma:
            fix = "diffusion.variance_type=learned_range or train.learn_sigma=false"
        else:
            fix = "train.learn_sigma=true (and model.out_channels=2*data.channels) or a fixed variance_type"
        problems.append(
            f"train.learn_sigma={_yaml(learn_sigma)} but diffusion.variance_type={variance_type}{note}: a "
            f"learned variance needs both (and model.out_channels = 2 x data.channels); set {fix}"
        )
    if model["image_size"] != data.image_size:
        problems.append(
            f"{key('image_size')} but data.image_size={data.image_size}: make them equal (model.image_size "
            "is the side the model samples at and that attention_resolutions refer to; left out, it is "
            "data.image_size)"
        )
    if model["num_classes"] is not None and not data.labels:
        problems.append(
            f"{key('num_classes')} but data.labels=false: set model.num_classes=null or data.labels=true"
        )
    if diffusion_class(config.diffusion)[0] is EDMScheduler and config.train.loss_weighting != "uniform":
        problems.append(
            f"train.loss_weighting={config.train.loss_weighting} but diffusion.{FORMULATION}=edm, whose loss "
            "weight lambda(sigma) is its own (Karras et al. 2022): set train.loss_weighting=uniform"
        )
    if diffusion_class(config.diffusion)[0] is EDMScheduler and config.train.timestep_sampling != "uniform":
        problems.append(
            f"train.timestep_sampling={config.train.timestep_sampling} but diffusion.{FORMULATION}=edm, "
            "whose noise levels are continuous (no per-timestep loss history): set "
            "train.timestep_sampling=uniform"
        )
    built = [kind for kind, name in CONDITION_ARGUMENTS.items() if model.get(name) is not None]
    problems += _cond_dropout_problems(config.train, built)
    if model["num_classes"] is not None and model.get("null_label", True) is False:
        if config.train.cond_dropout is not None:
            problems.append(
                f"train.cond_dropout={_yaml(config.train.cond_dropout)} but model.null_label=false: the "
                "labels have no null to drop them to; set model.null_label=true or train.cond_dropout=null"
            )
        if config.train.label_dropout > 0:
            problems.append(
                f"train.label_dropout={_yaml(config.train.label_dropout)} but model.null_label=false: no "
                "null label to drop labels to; set train.label_dropout=0 or model.null_label=true"
            )
        if sample.guidance_scale != 1:
            problems.append(
                f"sample.guidance_scale={_yaml(sample.guidance_scale)} needs a null label, but "
                "model.null_label=false: set sample.guidance_scale=1 or model.null_label=true"
            )
    conditioned = any(model.get(name) is not None for name in CONDITION_ARGUMENTS.values())
    if not conditioned and sample.guidance_scale != 1:
        problems.append(
            f"sample.guidance_scale={_yaml(sample.guidance_scale)} needs a class-conditional model: set "
            "sample.guidance_scale=1 or model.num_classes"
        )
    problems += _task_problems(config, model, key)
    problems += _condition_file_problems(config, model, key)
    if "context" in DATASET_CONDITIONS.get(data.dataset, ()):
        problems += _dataset_context_problems(config, model, key)
    return problems


def _condition_file_problems(
    config: Config, model: Mapping[str, Any], key: Callable[[str], str]
) -> list[str]:
    """What does not fit the conditions read from files (data.conditions, data.paired): each kind the network
    takes but no file gives, or a file gives but the network does not take; a data set other than a folder,
    a flip (which the conditions would not follow), data.task's image beside the files', the in-training
    FID (which samples without conditions)."""
    data, problems = config.data, []
    files = set(data.conditions) | ({"image"} if data.paired else set())
    if not files:
        kinds = {"cond_dim": "a vector", "context_dim": "a token sequence"}
        if data.task == "attributes":  # the task gives the vector (`_attribute_problems`)
            del kinds["cond_dim"]
        if "context" in DATASET_CONDITIONS.get(data.dataset, ()):
            del kinds["context_dim"]  # the data set gives it (`_dataset_context_problems`)
        for name, kind in kinds.items():
            if model.get(name) is not None:  # ClassicUNet has none of them
                word = "vector" if name == "cond_dim" else "context"
                task = ", or data.task=attributes" if name == "cond_dim" else ""
                problems.append(
                    f"{key(name)} conditions the network on {kind}, but the data give none: set "
                    f"model.{name}=null{task}, or read one per image from files (data.conditions={{{word}: "
                    "NAME})"
                )
        return problems
    if data.dataset != "folder":
        problems.append(
            f"data.conditions / data.paired read files beside the images of a folder, and data.dataset is "
            f"{data.dataset}: set data.dataset=folder"
        )
    if data.paired and "image" in data.conditions:
        problems.append(
            "data.paired=true reads each image condition from inputs/, and data.conditions names one too "
            f"(image: {data.conditions['image']}): drop one of them"
        )
    if "vector" in files and data.task == "attributes":
        problems.append(
            f"data.task=attributes gives the vector condition, and it is read from files too (vector: "
            f"{data.conditions['vector']}): set data.task=none or read no vector from files"
        )
    if "image" in files and data.task not in ("none", "attributes"):
        problems.append(
            f"data.task={data.task} gives the image condition, and it is read from files too: set "
            "data.task=none or read no image from files"
        )
    if data.hflip:
        problems.append("data.hflip=true would flip the images but not their condition files: set it false")
    if config.train.fid_every:
        problems.append(
            f"train.fid_every={config.train.fid_every} with condition files: the in-training FID samples "
            "without conditions; set train.fid_every=0 and score checkpoints with python -m ddpm.fid "
            "CONFIG RUN, which samples on the data's conditions"
        )
    names = {"image": "cond_channels", "vector": "cond_dim", "context": "context_dim"}
    for kind, name in names.items():
        if kind in files and model.get(name) is None:
            problems.append(f"condition files give each image a {kind}, but {key(name)}: set model.{name}")
        elif kind not in files and model.get(name) is not None and kind != "image":
            problems.append(
                f"{key(name)} takes a {kind}, which no condition file gives: add {kind} to data.conditions "
                f"or set model.{name}=null"
            )
    if "image" in files and model.get("cond_channels") not in (None, 1, 3):
        problems.append(
            f"{key('cond_channels')}: condition image files are read as 1 (grey) or 3 (RGB) channels: set "
            "model.cond_channels=1 or 3"
        )
    return problems


def _cond_dropout_problems(train: TrainConfig, built: Sequence[str]) -> list[str]:
    """What does not fit train.cond_dropout: label_dropout's joint dropout beside it, or a mapping that does
    not name exactly the kinds of condition the model is built for (`built`, in KINDS order)."""
    p = train.cond_dropout
    if p is None:
        return []
    problems = []
    takes = ", ".join(built) or "no condition"
    if train.label_dropout:
        problems.append(
            f"train.cond_dropout={_yaml(p)} replaces train.label_dropout={_yaml(train.label_dropout)} (the "
            "joint dropout of a row's conditions): set train.label_dropout=0"
        )
    if isinstance(p, Mapping):
        unknown = [kind for kind in p if kind not in built]
        if unknown:
            problems.append(
                f"train.cond_dropout names {', '.join(map(str, unknown))}, which the model is not built "
                f"for (it takes {takes}): drop {'it' if len(unknown) == 1 else 'them'}"
            )
        missing = [kind for kind in built if kind not in p]
        if missing:
            problems.append(
                f"train.cond_dropout gives no probability for {', '.join(missing)}: name every kind the "
                f"model takes ({takes}), 0 to never drop one"
            )
    return problems


def _task_problems(config: Config, model: Mapping[str, Any], key: Callable[[str], str]) -> list[str]:
    # model: the network's whole config; key(name) says a key of it that the network has
    """What does not fit data.task: the image condition it gives (or none) against model.cond_channels, the
    factor against the image side, and the in-training FID, which samples without conditions."""
    data, cond_channels = config.data, model.get("cond_channels")
    problems = _attribute_problems(data, model, key)
    if "image" in DATASET_CONDITIONS.get(data.dataset, ()):
        return problems + _dataset_image_problems(config, cond_channels)
    if data.task != "none" and config.train.fid_every:
        problems.append(
            f"train.fid_every={config.train.fid_every} with data.task={data.task}: the in-training FID "
            "samples without the task's conditions; set train.fid_every=0 and score checkpoints with "
            "python -m ddpm.fid CONFIG RUN, which samples on the data's conditions"
        )
    if data.task in ("none", "attributes"):
        if cond_channels is None or "image" in data.conditions or data.paired:  # read from files
            return problems
        return problems + [
            f"{key('cond_channels')} conditions the network on an image, but data.task={data.task} gives "
            "none: set model.cond_channels=null, or data.task=superres or inpaint, or read images from files "
            "(data.conditions={image: NAME} or data.paired=true)"
        ]
    expected = task_cond_channels(data)
    if cond_channels != expected:
        what = "the masked image and the mask" if data.task == "inpaint" else "an image"
        width = f"data.channels + 1 = {expected}" if data.task == "inpaint" else f"data.channels={expected}"
        problems.append(
            f"data.task={data.task} gives the network {what} ({width} channels) but "
            f"model.cond_channels={_yaml(cond_channels)}: set model.cond_channels={expected}"
        )
    if data.task == "superres" and data.image_size % data.superres_factor:
        problems.append(
            f"data.superres_factor={data.superres_factor} does not divide data.image_size={data.image_size}: "
            "choose a factor of the side"
        )
    return problems


def _attribute_problems(data: DataConfig, model: Mapping[str, Any], key: Callable[[str], str]) -> list[str]:
    """What does not fit data.task=attributes: model.cond_dim other than the number of ATTRIBUTES, and
    data.attribute_mean / attribute_std set without the task, only one of them, of another length than
    ATTRIBUTES or with a std that is not positive."""
    problems, n = [], len(ATTRIBUTES)
    stats = {name: getattr(data, name) for name in ("attribute_mean", "attribute_std")}
    given = [name for name, value in stats.items() if value is not None]
    if data.task != "attributes":
        return [f"data.{name} is set, but data.task={data.task}: set data.task=attributes" for name in given]
    names = ", ".join(ATTRIBUTES)
    if "cond_dim" not in model:
        problems.append(f"data.task=attributes gives a vector ({names}) to a network that takes none: a UNet")
    elif model["cond_dim"] != n:
        problems.append(
            f"data.task=attributes gives the network a vector of {n} attributes ({names}) but "
            f"{key('cond_dim')}: set model.cond_dim={n}"
        )
    if len(given) == 1:
        missing = ({"attribute_mean", "attribute_std"} - set(given)).pop()
        problems.append(f"data.{given[0]} is set without data.{missing}: set both, or neither (measured)")
    for name in given:
        if len(stats[name]) != n:
            problems.append(
                f"data.{name} has {len(stats[name])} entries but there are {n} attributes ({names}): give "
                f"{n}, or null to measure them on the training set"
            )
    if stats["attribute_std"] is not None and not all(s > 0 for s in stats["attribute_std"]):
        problems.append(f"data.attribute_std={_yaml(list(stats['attribute_std']))}: each must be > 0")
    return problems


def task_cond_channels(data: DataConfig) -> int | None:
    """The channels of the image condition data.task gives: data.channels for superres (the low-resolution
    image), data.channels + 1 for inpaint (the masked image, then the mask); None for no task and for
    attributes (a vector)."""
    return {"none": None, "superres": data.channels, "inpaint": data.channels + 1, "attributes": None}[
        data.task
    ]


def task_settings(data: DataConfig) -> dict[str, Any]:
    """The data keys of data.task that sampling needs to build its conditions as training did, saved with
    the weights (`ddpm.io.TASK_FILE`): {"task": ...}, for superres its "superres_factor", for attributes
    its "attribute_mean" and "attribute_std" (lists, the units of the vector condition)."""
    settings: dict[str, Any] = {"task": data.task}
    if data.task == "superres":
        settings["superres_factor"] = data.superres_factor
    if data.task == "attributes":
        settings["attribute_mean"] = _list(data.attribute_mean)
        settings["attribute_std"] = _list(data.attribute_std)
    return settings


def read_task_settings(settings: Mapping[str, Any], where: str) -> DataConfig:
    """The data section of saved `task_settings` (the other data keys at their defaults), checked as a config
    file's are; `where` names the file in errors (ConfigError)."""
    unknown = sorted(set(settings) - set(TASK_SETTINGS))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; it holds {', '.join(TASK_SETTINGS)}")
    return _build({"data": dict(settings)}, lambda key: where).data


def _list(values: tuple[float, ...] | None) -> list[float] | None:
    return None if values is None else list(values)


def _dataset_image_problems(config: Config, cond_channels: int | None) -> list[str]:
    """What does not fit a data set that gives each image an image condition (DATASET_CONDITIONS): a
    data.task beside it, a network without that condition, other than one channel, an in-training FID."""
    data, problems = config.data, []
    if data.task != "none":
        problems.append(
            f"data.dataset={data.dataset} gives each image its own image condition, and "
            f"data.task={data.task} would give another: set data.task=none"
        )
    if data.channels != 1 or cond_channels != 1:
        problems.append(
            f"data.dataset={data.dataset} gives 1-channel masks and 1-channel images, but data.channels="
            f"{data.channels} and model.cond_channels={_yaml(cond_channels)}: set data.channels=1 and "
            "model.cond_channels=1"
        )
    if config.train.fid_every:
        problems.append(
            f"train.fid_every={config.train.fid_every} with data.dataset={data.dataset}: the in-training FID "
            "samples without the image conditions; set train.fid_every=0"
        )
    return problems


def _dataset_context_problems(
    config: Config, model: Mapping[str, Any], key: Callable[[str], str]
) -> list[str]:
    """What does not fit a data set that gives each image a token sequence (digit_strips, ddpm.digit_strips):
    a network without cross-attention of the tokens' width, class labels (a strip holds several digits),
    other than one channel, an odd side (a 2 x 2 grid of slots), a data.task, a flip (which would mirror the
    digits and their order), an in-training FID (which samples without the sequences)."""
    data, problems = config.data, []
    if model.get("context_dim") != CONTEXT_DIM:
        name = key("context_dim") if "context_dim" in model else "the network (architecture: classic)"
        problems.append(
            f"data.dataset={data.dataset} gives each image a sequence of {CONTEXT_DIM}-wide tokens, but "
            f"{name}: set model.context_dim={CONTEXT_DIM} (a UNet with attention blocks)"
        )
    if data.labels or model.get("num_classes") is not None:
        problems.append(
            f"data.dataset={data.dataset} has no class labels (a strip holds several digits; its tokens say "
            "which), but data.labels=true or model.num_classes is set: set data.labels=false and "
            "model.num_classes=null"
        )
    if data.channels != 1:
        problems.append(f"data.dataset={data.dataset} gives 1-channel images: set data.channels=1")
    if data.image_size % STRIP_GRID:
        problems.append(
            f"data.dataset={data.dataset} cuts the image into a {STRIP_GRID} x {STRIP_GRID} grid of slots, "
            f"but data.image_size={data.image_size} is odd: choose an even side (16: the digits' own 8 x 8)"
        )
    if data.task != "none":
        problems.append(f"data.dataset={data.dataset} gives its own conditions: set data.task=none")
    if data.hflip:
        problems.append(
            "data.hflip=true would mirror the digits and their order, but not the tokens: set it false"
        )
    if config.train.fid_every:
        problems.append(
            f"train.fid_every={config.train.fid_every} with data.dataset={data.dataset}: the in-training FID "
            "samples without the token sequences; set train.fid_every=0"
        )
    return problems


def tracker_names(train: TrainConfig) -> list[str]:
    """The trackers train.log_with means (`ddpm.trackers.trackers`: "auto" is those installed); a tracker
    named but not installed is a ConfigError with the pip command.

    Checked when training starts rather than when the file is read: a run's config is also read to sample
    from it, on machines that need not have its trackers.
    """
    try:
        return trackers(train.log_with)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def model_class(model: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
    """The class a config's `model` section builds, ARCHITECTURES[model["architecture"]] (`UNet` when the key
    is left out, "classic" for `ClassicUNet`), and its keyword arguments (the section without the key).
    Raises ConfigError for an unknown architecture, listing the known ones."""
    kwargs = dict(model)
    name = kwargs.pop(ARCHITECTURE, DEFAULT_ARCHITECTURE)
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise ConfigError(
            f"invalid value {name!r} for 'model.{ARCHITECTURE}': expected one of {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[name], kwargs


def diffusion_class(diffusion: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
    """The class a config's `diffusion` section builds, `ddpm.edm.FORMULATIONS[diffusion["formulation"]]`
    (`NoiseScheduler` when the key is left out, "edm" for `EDMScheduler`), and its keyword arguments. Raises
    ConfigError for an unknown formulation, listing the known ones."""
    try:
        return schedule_class(diffusion)
    except ValueError:
        raise ConfigError(
            f"invalid value {diffusion[FORMULATION]!r} for 'diffusion.{FORMULATION}': expected one of "
            f"{', '.join(FORMULATIONS)}"
        ) from None


def build_schedule(diffusion: Mapping[str, Any]) -> Any:
    """The noise schedule of a config's `diffusion` section (`diffusion_class`: a NoiseScheduler or an
    EDMScheduler); a refused value is a ConfigError (`construct`)."""
    cls, kwargs = diffusion_class(diffusion)
    return construct(cls, "diffusion", kwargs)


def build_model(model: Mapping[str, Any]) -> torch.nn.Module:
    """The network of a config's `model` section (`model_class`); a refused value is a ConfigError
    (`construct`)."""
    cls, kwargs = model_class(model)
    return construct(cls, "model", kwargs)


def check_diffusion_model(model: Mapping[str, Any]) -> None:
    """Raise ConfigError unless a config's `model` section builds a time-conditioned network: one built
    with time_conditioning=False is a segmentation network, `model(x)`, that no diffusion loss or sampler
    can call."""
    cls, kwargs = model_class(model)
    if not {**_defaults(cls), **kwargs}["time_conditioning"]:
        note = "" if "time_conditioning" in kwargs else f" ({cls.__name__}'s default)"
        raise ConfigError(
            f"model.time_conditioning=false{note} builds a segmentation network, called as model(x) with no "
            "timestep, not a diffusion model: set model.time_conditioning=true to train or sample it"
        )


def construct(
    cls: type[T], section: str, kwargs: Mapping[str, Any], aliases: Mapping[str, str] | None = None
) -> T:
    """`cls(**kwargs)` for a config's `section` (model: UNet, diffusion: NoiseScheduler); a value the
    constructor refuses (its ValueError or TypeError) is a ConfigError naming the keys its message mentions.

    `aliases` maps a key to the one that set it, where that is another (model.image_size, left out, is
    data.image_size), so that the error names the key to change.
    """
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:
        keys = [f"{section}.{key}" for key in kwargs if re.search(rf"\b{key}\b", str(error))]
        keys = [(aliases or {}).get(key, key) for key in keys]
        raise ConfigError(
            f"{', '.join(keys) or section}: {error} (the {section} section holds {cls.__name__}'s arguments)"
        ) from None


def raise_problems(problems: Sequence[str]) -> None:
    """Raise one ConfigError, on one line, listing every problem (none: return)."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        listed = "; ".join(f"({i}) {problem}" for i, problem in enumerate(problems, 1))
        raise ConfigError(f"{len(problems)} problems in the config: {listed}")


SECTIONS: dict[str, type] = {"data": DataConfig, "train": TrainConfig, "sample": SampleConfig}
# The model section's key naming its network (a key of ddpm.models.ARCHITECTURES), and the network without it.
ARCHITECTURE = "architecture"
DEFAULT_ARCHITECTURE = "unet"
TOP_LEVEL_KEYS = ("model", "diffusion", "data", "train", "sample", "output_dir")

# Values accepted by the options that take one of a list (read from the module that owns it where one does).
_CHOICES: dict[str, tuple] = {
    "data.dataset": DATASETS,
    "data.task": TASKS,
    "data.channels": (1, 3),
    "data.split": ("train", "test", "all"),
    "train.mixed_precision": ("auto", "no", "fp16", "bf16"),
    "train.nan_policy": ("stop", "skip"),
    "train.loss_weighting": LOSS_WEIGHTINGS,
    "train.timestep_sampling": TIMESTEP_SAMPLINGS,
    "train.lr_schedule": LR_SCHEDULES,
    "train.compile_mode": COMPILE_MODES,
    "train.log_with": LOG_WITH,
}

# Ranges, checked after the types: key -> (predicate, what is expected).
_AT_LEAST_1 = (lambda v: v >= 1, "an integer >= 1")
_AT_LEAST_0 = (lambda v: v >= 0, "a number >= 0")
_POSITIVE = (lambda v: v > 0, "a number > 0")
_UNIT = (lambda v: 0 <= v < 1, "a number in [0, 1)")
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.image_size": _AT_LEAST_1,
    "data.batch_size": _AT_LEAST_1,
    "data.superres_factor": (lambda v: v >= 2, "an integer >= 2"),
    "data.num_workers": (lambda v: v == "auto" or v >= 0, "an integer >= 0, or auto"),
    "data.conditions": (
        lambda v: all(k in CONDITION_FILE_KINDS and re.fullmatch(r"[\w-]+", n) for k, n in v.items()),
        f"a mapping from {', '.join(CONDITION_FILE_KINDS)} to a name part of file names (letters, digits, "
        "_ and -), e.g. {image: cond}",
    ),
    "train.steps": _AT_LEAST_1,
    "train.lr": _POSITIVE,
    "train.weight_decay": _AT_LEAST_0,
    "train.adam_betas": (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "train.warmup_steps": _AT_LEAST_0,
    "train.lr_min": _AT_LEAST_0,
    "train.grad_clip": _AT_LEAST_0,
    "train.grad_accum": _AT_LEAST_1,
    "train.ema_decay": _UNIT,
    "train.posthoc_ema_every": _AT_LEAST_0,
    "train.posthoc_ema_sigma_rels": (
        lambda v: 0 < len(v) == len(set(v)) and all(0 < s < SIGMA_REL_MAX for s in v),
        f"a list of distinct numbers in (0, {SIGMA_REL_MAX:.4f}) (the widths of power-function EMA profiles)",
    ),
    "train.label_dropout": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "train.cond_dropout": (
        lambda v: all(
            0 <= p <= 1 for p in (v.values() if isinstance(v, Mapping) else [] if v is None else [v])
        ),
        "a probability in [0, 1], a mapping kind -> probability in [0, 1], or null",
    ),
    "train.min_snr_gamma": _POSITIVE,
    "train.checkpoint_every": _AT_LEAST_1,
    "train.keep_checkpoints": _AT_LEAST_1,
    "train.sample_every": _AT_LEAST_0,
    "train.log_every": _AT_LEAST_1,
    "train.seed": _AT_LEAST_0,
    "train.dist_timeout_s": _POSITIVE,
    "train.fid_every": _AT_LEAST_0,
    "train.fid_n": _AT_LEAST_1,
    "train.cpu_threads": _AT_LEAST_0,
    "train.tracker_project": (lambda v: bool(v.strip()), "a non-empty name"),
    "sample.n": _AT_LEAST_1,  # the others: ddpm.samplers.check_sample_options
}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# Field annotation -> (does the value have this type, how to describe the type in an error).
_TYPES: dict[Any, tuple[Callable[[Any], bool], str]] = {
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (_is_number, "a number"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    bool | str: (lambda v: isinstance(v, bool) or v == AUTO, f"true, false or {AUTO}"),
    str: (lambda v: isinstance(v, str), "a string"),
    str | None: (lambda v: v is None or isinstance(v, str), "a string or null"),
    int | None: (lambda v: v is None or isinstance(v, int) and not isinstance(v, bool), "an integer or null"),
    int | str: (  # data.num_workers
        lambda v: v == "auto" or isinstance(v, int) and not isinstance(v, bool),
        "an integer or auto",
    ),
    dict[str, Any]: (lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v), "a mapping"),
    dict[str, str]: (  # data.conditions
        lambda v: (
            isinstance(v, Mapping) and all(isinstance(k, str) and isinstance(n, str) for k, n in v.items())
        ),
        "a mapping kind -> name",
    ),
    float | dict[str, float] | None: (  # train.cond_dropout
        lambda v: (
            v is None
            or _is_number(v)
            or isinstance(v, Mapping)
            and all(isinstance(k, str) and _is_number(p) for k, p in v.items())
        ),
        "a number, a mapping kind -> number, or null",
    ),
    tuple[float, float]: (
        lambda v: isinstance(v, list | tuple) and len(v) == 2 and all(map(_is_number, v)),
        "a list of two numbers",
    ),
    tuple[float, ...]: (
        lambda v: isinstance(v, list | tuple) and all(map(_is_number, v)),
        "a list of numbers",
    ),
    tuple[float, ...] | None: (  # data.attribute_mean, attribute_std
        lambda v: v is None or isinstance(v, list | tuple) and all(map(_is_number, v)),
        "a list of numbers, or null",
    ),
}


def _build(raw: Mapping[str, Any], where: Callable[[str], str]) -> Config:
    """Check `raw` (a config file's layout) and turn it into a Config; `where(key)` says where key was set."""
    for name in raw:
        if name not in TOP_LEVEL_KEYS:
            raise ConfigError(
                f"unknown key '{name}' in {where(name)}; valid top-level keys: {', '.join(TOP_LEVEL_KEYS)}"
            )
    sections = {}
    for name in TOP_LEVEL_KEYS[:-1]:
        section = raw.get(name)
        if section is None:
            section = {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"'{name}' in {where(name)} must be a mapping of keys, got {section!r}")
        sections[name] = dict(section)
    output_dir = raw.get("output_dir", Config.output_dir)
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError(_invalid("output_dir", output_dir, where, "a non-empty string (a directory path)"))

    for name, (constructor, kwargs) in _constructors(sections).items():
        if sections[name]:
            valid = _keyword_arguments(constructor) + [
                {"model": ARCHITECTURE, "diffusion": FORMULATION}[name]
            ]
            _check_names(name, kwargs, valid, where, f" ({constructor.__name__})")
    built = {name: _build_section(name, sections[name], where) for name in SECTIONS}
    _check_sample(built["sample"], sections["diffusion"], where)
    model, data = sections["model"], built["data"]
    aliases = {}
    if model and "image_size" not in model:  # one value decides: the side of the data
        model["image_size"] = data.image_size
        aliases["model.image_size"] = "data.image_size"
    config = Config(model=model, diffusion=sections["diffusion"], output_dir=output_dir, **built)
    problems = _refused(sections, aliases)
    problems += conflicts(config) if model else []  # no model section: a file for the data alone
    problems += _lr_problems(built["train"])
    if data.dataset not in BUILT_IN and data.root is None:
        problems.append(
            f"data.root is required for data.dataset '{data.dataset}' (in {where('data.dataset')}): "
            "the folder of images or the torchvision root, e.g. data.root=data/cifar10"
        )
    problems += [problem] if (problem := split_problem(data)) else []
    raise_problems(problems)
    return config


def split_problem(data: DataConfig) -> str | None:
    """What is wrong with data.split for data.dataset (a split that data set does not have), with the fix;
    None when nothing is. Checked when a config is read and again by `ddpm.data.build_dataset`."""
    valid = SPLITS.get(data.dataset, ())
    if not valid or data.split in valid:
        return None
    why = " (a folder is one set of images: point data.root at a folder of held-out images to score those)"
    return (
        f"data.split={data.split} but data.dataset '{data.dataset}' has no such split; valid there: "
        f"{', '.join(valid)}{why if data.dataset == 'folder' else ''}"
    )


def _lr_problems(train: TrainConfig) -> list[str]:
    """train.lr_min that cannot work: above train.lr, or set for the constant schedule that never uses it."""
    if train.lr_schedule == "constant" and train.lr_min != 0:
        return [
            f"train.lr_min={_yaml(train.lr_min)} is only used by a decaying schedule: set "
            "train.lr_schedule=cosine or linear, or leave train.lr_min out"
        ]
    if train.lr_min > train.lr:
        return [
            f"train.lr_min={_yaml(train.lr_min)} is above train.lr={_yaml(train.lr)}: the schedule decays "
            "from train.lr to train.lr_min; lower train.lr_min"
        ]
    return []


def _build_section(section: str, values: dict[str, Any], where: Callable[[str], str]) -> Any:
    """The dataclass of `section` from the keys given (checked here); the others take their defaults."""
    cls = SECTIONS[section]
    types = typing.get_type_hints(cls)
    _check_names(section, values, list(types), where)
    kwargs = {}
    for name, value in values.items():
        key = f"{section}.{name}"
        has_type, type_name = _TYPES[types[name]]
        if not has_type(value):
            raise ConfigError(_invalid(key, value, where, type_name))
        choices = _CHOICES.get(key)
        if choices is not None and value not in choices:
            raise ConfigError(_invalid(key, value, where, f"one of {', '.join(map(str, choices))}"))
        if key in _RANGES and not _RANGES[key][0](value):  # before the conversion: errors show the input
            raise ConfigError(_invalid(key, value, where, _RANGES[key][1]))
        if types[name] is float:
            value = float(value)
        elif (
            types[name] in (tuple[float, float], tuple[float, ...], tuple[float, ...] | None)
            and value is not None
        ):
            value = tuple(float(v) for v in value)
        kwargs[name] = value
    return cls(**kwargs)


def _check_sample(sample: SampleConfig, diffusion: Mapping[str, Any], where: Callable[[str], str]) -> None:
    """The sampling settings, by the check `ddpm.sample` itself makes (steps up to the diffusion's T); calls,
    when set, replace steps."""
    T = diffusion.get("num_train_timesteps", _defaults(NoiseScheduler)["num_train_timesteps"])
    try:  # a T of the wrong type is NoiseScheduler's to report
        check_sample_options(
            **sample.sampler_settings(), num_train_timesteps=T if isinstance(T, int) else None
        )
    except SampleOptionError as error:
        key = f"sample.{error.option}"  # an entry of the options mapping: sample.options.NAME
        message = _invalid(key, error.value, lambda _: where(".".join(key.split(".")[:2])), error.expected)
        raise ConfigError(message) from None


def _refused(sections: Mapping[str, dict[str, Any]], aliases: Mapping[str, str]) -> list[str]:
    """What the network and NoiseScheduler refuse of the model and diffusion sections given, one problem each.

    Both are built on the meta device: their checks run without allocating or initialising any weights.
    """
    problems = []
    with torch.device("meta"):
        for name, (constructor, kwargs) in _constructors(sections).items():
            if sections[name]:
                try:
                    construct(constructor, name, kwargs, aliases)
                except ConfigError as error:
                    problems.append(str(error))
    return problems


def _constructors(sections: Mapping[str, dict[str, Any]]) -> dict[str, tuple[type, dict[str, Any]]]:
    """Section name -> (the class it is passed to, its keyword arguments), for model and diffusion."""
    return {"model": model_class(sections["model"]), "diffusion": diffusion_class(sections["diffusion"])}


def _check_names(
    section: str, values: Mapping[str, Any], valid: Sequence[str], where: Callable[[str], str], note: str = ""
) -> None:
    for name in values:
        if name not in valid:
            key = f"{section}.{name}"
            raise ConfigError(
                f"unknown key '{key}' in {where(key)}; valid keys of {section}{note}: {', '.join(valid)}"
            )


def _defaults(constructor: type) -> dict[str, Any]:
    parameters = inspect.signature(constructor).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not p.empty}


def _yaml(value: Any) -> str:
    """A value as it would be written in a config file or an override (null, false, [1, 2])."""
    return yaml.safe_dump(_plain(value), default_flow_style=True).removesuffix("\n...\n").strip()


def _keyword_arguments(constructor: type) -> list[str]:
    parameters = inspect.signature(constructor).parameters.values()
    return [p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _invalid(key: str, value: Any, where: Callable[[str], str], expected: str) -> str:
    return f"invalid value {value!r} for '{key}' in {where(key)}: expected {expected}"


def _read_yaml(path: Path) -> Any:
    """The YAML document at `path`; a missing file or a syntax error is a ConfigError saying where."""
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; pass an existing file with --config") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None


def _parse_override(text: str) -> tuple[str, Any]:
    """'train.steps=200' -> ('train.steps', 200): the value is read as a YAML scalar or flow list."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. train.steps=200")
    section, _, name = key.partition(".")
    if name and section not in TOP_LEVEL_KEYS[:-1]:
        raise ConfigError(
            f"unknown key '{key}' in override '{text}'; valid sections: {', '.join(TOP_LEVEL_KEYS[:-1])}"
        )
    if section in TOP_LEVEL_KEYS[:-1] and (not name or "." in name):
        raise ConfigError(f"override '{text}' must name one key of {section}, e.g. {section}.KEY=VALUE")
    try:
        return key, yaml.load(value, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({error.problem})") from None


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively, so that yaml.safe_dump and json accept the result."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (1e-3, 5E4) as floats, as YAML 1.2 does;
    PyYAML follows YAML 1.1 and would hand `lr: 1e-3` over as the string '1e-3'."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
