"""Conversion between diffusers and ddpm: a `UNet2DModel` of the DDPM family becomes our `UNet`, and our
`NoiseScheduler` goes to and from the configs of diffusers' DDPM, DDIM and DPM-Solver schedulers.

`unet_from_diffusers(folder_or_repo_id)` loads a UNet2DModel (config.json + weights, or a pipeline folder with
`unet/`; `unet_from_diffusers_folder` the same from a local folder);
`unet_kwargs_from_diffusers(config)` maps its config.json onto our constructor; `diffusers_unet_folder(path)`
tells a diffusers folder from ours; `diffusers_folder_scheduler(folder)` reads the scheduler_config.json
beside it. `scheduler_from_diffusers(config)` and `diffusers_scheduler_config(scheduler, cls)` convert
schedules. The other way, `diffusers_unet_config(config)` and `diffusers_state_dict(model)` are our UNet as
a UNet2DModel, `save_diffusers_unet(folder, model)` writes its folder (an image-conditioned model's too:
its sample is [x, image, flag], `ddpm.models.unet.image_condition_input`; vector and token-sequence conditions
are refused by name, UNet2DModel having no layout for them), and `save_diffusers_pipeline(folder, model,
scheduler)` writes a pipeline folder: a DDPMPipeline, or for a class-conditional model the
ClassConditionalPipeline of `ddpm.interop.class_conditional_pipeline` (its source goes into the folder).
`pipeline_scheduler` says which diffusers scheduler and spacing that folder gets. Nothing here imports
diffusers: the published files are read and written directly.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ddpm.hub import local_path
from ddpm.models.unet import UNet
from ddpm.models.weights import load_checked
from ddpm.schedule import SIGMA_SPACINGS, VARIANCE_TYPES, NoiseScheduler

DIFFUSERS_CONFIG = (
    "config.json"  # ours has the same name: the content ('_class_name' or 'class') tells them apart
)
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_SCHEDULER_CONFIG = "scheduler_config.json"
PIPELINE_UNET, PIPELINE_SCHEDULER = "unet", "scheduler"  # the subfolders of a pipeline folder
PIPELINE_INDEX = "model_index.json"  # a pipeline folder's list of its parts and their classes
DIFFUSERS_VERSION = "0.42.0"  # the version whose UNet2DModel options this module knows (written to configs)
# Written by diffusers_unet_config for a class-conditional UNet: the label of our null class (the last row of
# num_class_embeds), which diffusers ignores (a private key) and unet_kwargs_from_diffusers reads back.
NULL_CLASS_KEY = "_ddpm_null_class"
# Written by diffusers_unet_config for an image-conditioned UNet: its cond_channels, which UNet2DModel sees as
# part of in_channels (the input is [x, image, flag], `ddpm.models.unet.image_condition_input`).
COND_CHANNELS_KEY = "_ddpm_cond_channels"
# The UNet options diffusers_unet_config maps (gradient_checkpointing changes no output); any other option
# exports only at its default.
EXPORTED_UNET_OPTIONS = {
    "in_channels", "out_channels", "base_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
    "image_size", "num_heads", "head_channels", "mid_attention", "dropout", "norm_groups", "norm_eps",
    "time_conditioning", "time_injection", "time_flip_sin_to_cos", "time_freq_shift", "time_channels",
    "num_classes", "null_label", "cond_channels", "downsample", "head_kernel_size", "gradient_checkpointing",
}  # fmt: skip

# UNet2DModel's constructor defaults (diffusers 0.42), for the keys an older config.json lacks: the DDPM
# checkpoints' configs were written by diffusers 0.0.4 and have no dropout, add_attention, etc.
DIFFUSERS_DEFAULTS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}
# Block type -> whether it has attention; the other diffusers blocks (cross-attention, skip, ...) do not map.
DIFFUSERS_DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}
DIFFUSERS_UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}
# diffusers tensor name fragments -> ours. The attention names before diffusers 0.14 (query, key, value,
# proj_attn) are still those of some published files.
DIFFUSERS_RENAMES = {
    ".downsamplers.0.conv.": ".resample.",
    ".upsamplers.0.": ".resample.",
    ".to_out.0.": ".to_out.",
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.",
}
# Our beta_schedule names that diffusers spells otherwise (Nichol & Dhariwal's cosine, capped at 0.999).
DIFFUSERS_SCHEDULE_NAMES = {"cosine": "squaredcos_cap_v2"}
# The diffusers schedulers `diffusers_scheduler_config` writes for, each with the settings that make it
# compute what our sampler of the same maths computes ("ddpm", "ddim" with alpha_bar = 1 after the last step,
# "dpm++").
DIFFUSERS_SAMPLER_SETTINGS = {
    "DDPMScheduler": {},
    "DDIMScheduler": {"set_alpha_to_one": True},
    "DPMSolverMultistepScheduler": {
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "solver_type": "midpoint",
        "final_sigmas_type": "zero",
    },
}
# The DPMSolverMultistepScheduler flag of each sigma spacing. "exponential" (log sigma uniform) is also
# uniform in log-SNR, which use_lu_lambdas lays out from the table's own log sigmas, so that its first
# timestep is 999 (at every step count on the shipped schedules: tests/test_export.py). use_exponential_sigmas
# lays out the same grid from a recomputed sigma_max, whose timestep comes out 998.99... and is truncated to
# 998 on the cosine schedule: the first timesteps repeat and its step runs past the end (IndexError; diffusers
# #12771). use_karras_sigmas does the same on the cosine schedule, and has no alternative.
SIGMA_SPACING_FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_lu_lambdas"}
# Of our spacings, those that each scheduler of DIFFUSERS_SAMPLER_SETTINGS runs correctly in diffusers' own
# loop (DDPMPipeline's) at every step count N in 1..T (diffusers 0.42.1; tests/test_export.py runs them all on
# the shipped configs' schedules); a model with another spacing is exported with the first. The others fail:
# - "trailing" (every class): its float arange lays out N + 1 timesteps, the last -1, at 62 of the counts
#   1..1000 (61, 103, 121, ...); DDPM's and DDIM's step then reads alphas_cumprod[-1], the noisiest level.
# - DDIMScheduler steps to t - T // N whatever timestep comes next: right for "leading" alone.
# - DPMSolverMultistepScheduler: "leading" and "linspace" repeat a timestep at N = T (IndexError, NaN); Karras
#   sigmas repeat the first timestep on the cosine schedule (IndexError, diffusers #12771); "exponential"
#   (use_lu_lambdas, SIGMA_SPACING_FLAGS) runs.
# ("leading" with a steps_offset s runs N up to T - s only, in diffusers as in ddpm.sample, which refuses
# more.)
PIPELINE_SPACINGS = {
    "DDPMScheduler": ("linspace", "leading"),
    "DDIMScheduler": ("leading",),
    "DPMSolverMultistepScheduler": ("exponential",),
}
# The conditions UNet2DModel has no layout for, each with why (diffusers_unet_config refuses them by name).
CONDITION_REFUSALS = {
    "cond_dim": (
        "UNet2DModel's class embedding is a label table, a TimestepEmbedding of a scalar's sinusoid "
        "('timestep') or the identity, never a projection of a vector as ours (Linear, SiLU, Linear, and a "
        "learned null); that is UNet2DConditionModel's class_embed_type='projection', another block layout"
    ),
    "context_dim": (
        "UNet2DModel has no cross-attention; a token sequence needs UNet2DConditionModel (CrossAttn blocks "
        "with transformer layers), another block layout, which this export does not write"
    ),
}
# A class-conditional model's pipeline: DDPMPipeline passes no class labels, so the folder names this class
# of ours in model_index.json and holds its module's source (diffusers loads it with trust_remote_code=True).
CONDITIONAL_PIPELINE = ("class_conditional_pipeline", "ClassConditionalPipeline")  # (module, class)


def unet_from_diffusers(
    directory: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> UNet:
    """Builds the UNet equal to a diffusers `UNet2DModel` of the DDPM family saved in `directory`.

    `directory` holds config.json and diffusion_pytorch_model.safetensors (or .bin), as written by
    `UNet2DModel.save_pretrained` and published for google/ddpm-cifar10-32, google/ddpm-celebahq-256,
    google/ddpm-ema-church-256 etc.; a pipeline folder whose UNet is in `unet/` works too, and so does a Hub
    repo id such as "google/ddpm-cifar10-32" (fetched into the Hub cache, `ddpm.hub.local_path`). The result
    computes the same function: `model(x, t, y) == unet(x, t, class_labels=y).sample`. The config is
    mapped by `unet_kwargs_from_diffusers`, which raises ValueError for unsupported options.
    A class-conditional UNet2DModel (num_class_embeds = K) becomes num_classes = K: labels 0..K-1 are the
    same, and the null label K, which diffusers does not have, gets a zero embedding (no class term), so
    classifier-free guidance needs fine-tuning with label dropout first.
    """
    return unet_from_diffusers_folder(local_path(directory), device=device, dtype=dtype)


def unet_from_diffusers_folder(
    directory: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> UNet:
    """`unet_from_diffusers` of a local folder (what `ddpm.source` hands it). Raises FileNotFoundError for a
    folder without a diffusers model or its weights."""
    folder = diffusers_unet_folder(directory)
    if folder is None:
        raise FileNotFoundError(
            f"no diffusers model in {directory}: expected config.json (or unet/config.json) with a "
            "'_class_name' key, as UNet2DModel.save_pretrained writes; ddpm model folders (written by "
            "ddpm.save_pretrained) load with ddpm.load_pretrained"
        )
    config = json.loads((folder / DIFFUSERS_CONFIG).read_text())
    weights = next((folder / name for name in DIFFUSERS_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"no weights in {folder}: expected one of {list(DIFFUSERS_WEIGHTS)}")
    if config["_class_name"] != "UNet2DModel":
        raise ValueError(
            f"{folder / DIFFUSERS_CONFIG} describes a {config['_class_name']}; unet_from_diffusers loads "
            "UNet2DModel (the DDPM family) only"
        )
    model = UNet(**unet_kwargs_from_diffusers(config))
    if weights.suffix == ".safetensors":
        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    load_checked(
        model,
        _rename_diffusers_tensors(state, null_row=NULL_CLASS_KEY not in config),
        f"the tensors in {weights} do not fit the UNet2DModel that {folder / DIFFUSERS_CONFIG} describes",
        "the file may hold a modified UNet2DModel, which unet_from_diffusers cannot map",
    )
    return model.to(device=device, dtype=dtype)


def diffusers_unet_folder(directory: str | os.PathLike) -> Path | None:
    """The folder of a diffusers model in `directory`: itself, or its `unet/` (a pipeline folder); None when
    neither holds a diffusers config.json (one with a '_class_name' key; ours have 'class')."""
    for folder in (Path(directory), Path(directory) / PIPELINE_UNET):
        config = folder / DIFFUSERS_CONFIG
        if config.is_file() and "_class_name" in json.loads(config.read_text()):
            return folder
    return None


def unet_kwargs_from_diffusers(config: dict) -> dict:
    """Our UNet's constructor kwargs for a diffusers UNet2DModel config (its config.json as a dict).

    Mapping (missing keys take DIFFUSERS_DEFAULTS, keys starting with '_' are ignored):
        in_channels, out_channels, dropout, norm_eps -> the same names
        block_out_channels = [b * m for m in channel_mult] -> base_channels = b, channel_mult
        layers_per_block -> num_res_blocks;  norm_num_groups -> norm_groups;  add_attention -> mid_attention
        Attn{Down,Up}Block2D at level i -> attention_resolutions contains sample_size / 2**i
        sample_size (int, or the height of [height, width]) -> image_size
        attention_head_dim None -> num_heads = 1;  an int -> head_channels
        resnet_time_scale_shift "default" -> time_injection "add";  "scale_shift" -> "scale_shift"
        flip_sin_to_cos, freq_shift -> time_flip_sin_to_cos, time_freq_shift
        num_class_embeds -> num_classes (see unet_from_diffusers for the null label); with NULL_CLASS_KEY
            (written by diffusers_unet_config) num_class_embeds - 1, the last row being our null label
        COND_CHANNELS_KEY k (written by diffusers_unet_config) -> cond_channels = k, in_channels - k - 1
        downsample_padding 1 -> downsample "conv";  0 -> "conv_asymmetric"
    Anything else raises ValueError naming the option and what is supported: other block types
    (cross-attention, skip, ...), attention on one path only, time_embedding_type other than positional,
    class_embed_type, center_input_sample, act_fn other than silu, mid_block_scale_factor != 1, resnet
    resampling, a custom time_embedding_dim, a middle attention without GroupNorm or with other groups.
    """
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    unknown = sorted(set(c) - set(DIFFUSERS_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown UNet2DModel option(s) {unknown}; unet_from_diffusers knows those of diffusers 0.42: "
            f"{sorted(DIFFUSERS_DEFAULTS)}"
        )
    channels = list(c["block_out_channels"])
    base = channels[0]
    for key, supported in [
        ("center_input_sample", [False]),
        ("time_embedding_type", ["positional"]),
        ("time_embedding_dim", [None, 4 * base]),
        ("class_embed_type", [None]),
        ("mid_block_type", ["UNetMidBlock2D"]),
        ("mid_block_scale_factor", [1]),
        ("downsample_type", ["conv"]),
        ("upsample_type", ["conv"]),
        ("downsample_padding", [0, 1]),
        ("act_fn", ["silu", "swish"]),
        ("resnet_time_scale_shift", ["default", "scale_shift"]),
    ]:
        if c[key] not in supported:
            raise ValueError(f"UNet2DModel option {key}={c[key]!r} is not supported; supported: {supported}")

    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    for key, types, known in [
        ("down_block_types", down, DIFFUSERS_DOWN_BLOCKS),
        ("up_block_types", up, DIFFUSERS_UP_BLOCKS),
    ]:
        unsupported = sorted({name for name in types if name not in known})
        if unsupported:
            raise ValueError(
                f"UNet2DModel {key} {unsupported} not supported; supported: {list(known)} (the DDPM family)"
            )
        if len(types) != len(channels):
            raise ValueError(f"{key} has {len(types)} entries for {len(channels)} block_out_channels")
    attention = [DIFFUSERS_DOWN_BLOCKS[name] for name in down]
    if [DIFFUSERS_UP_BLOCKS[name] for name in reversed(up)] != attention:
        raise ValueError(
            f"down_block_types {down} and up_block_types {up} put attention at different levels; "
            "only the mirrored layout (up = reversed down, Attn at the same levels) is supported"
        )
    if any(ch % base for ch in channels):
        raise ValueError(f"block_out_channels {channels} must all be multiples of the first, {base}")
    # The middle attention normalises with attn_norm_num_groups, else norm_num_groups, except that with
    # scale_shift and no attn_norm_num_groups diffusers gives it no GroupNorm at all.
    mid_groups = c["attn_norm_num_groups"]
    if mid_groups is None and c["resnet_time_scale_shift"] == "default":
        mid_groups = c["norm_num_groups"]
    if c["add_attention"] and mid_groups != c["norm_num_groups"]:
        raise ValueError(
            f"the middle attention block normalises with {mid_groups} groups (attn_norm_num_groups="
            f"{c['attn_norm_num_groups']}, resnet_time_scale_shift={c['resnet_time_scale_shift']!r}); "
            f"only norm_num_groups={c['norm_num_groups']} is supported"
        )
    size = c["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size  # only picks the attention levels
    if size is None:
        raise ValueError("UNet2DModel config has no sample_size; set it to the training image side")
    cond_channels = config.get(COND_CHANNELS_KEY)
    return {
        "in_channels": c["in_channels"] - (cond_channels + 1 if cond_channels is not None else 0),
        "out_channels": c["out_channels"],
        "base_channels": base,
        "channel_mult": [ch // base for ch in channels],
        "num_res_blocks": c["layers_per_block"],
        "attention_resolutions": [size // 2**level for level, attn in enumerate(attention) if attn],
        "image_size": size,
        "num_heads": 1,
        "head_channels": c["attention_head_dim"],
        "mid_attention": c["add_attention"],
        "dropout": c["dropout"],
        "norm_groups": c["norm_num_groups"],
        "norm_eps": c["norm_eps"],
        "time_injection": "add" if c["resnet_time_scale_shift"] == "default" else "scale_shift",
        "time_flip_sin_to_cos": c["flip_sin_to_cos"],
        "time_freq_shift": float(c["freq_shift"]),
        "num_classes": c["num_class_embeds"] - 1 if NULL_CLASS_KEY in config else c["num_class_embeds"],
        "cond_channels": cond_channels,
        "downsample": "conv" if c["downsample_padding"] == 1 else "conv_asymmetric",
    }


def diffusers_folder_scheduler(directory: str | os.PathLike) -> NoiseScheduler:
    """The NoiseScheduler of the scheduler_config.json beside a diffusers model: in `directory`, in its
    scheduler/ (a pipeline folder) or in its parent's scheduler/ (`directory` is a pipeline's unet/);
    DDPMScheduler's defaults (`scheduler_from_diffusers({})`) when there is none."""
    folder = Path(directory)
    for candidate in (folder, folder / PIPELINE_SCHEDULER, folder.parent / PIPELINE_SCHEDULER):
        if (candidate / DIFFUSERS_SCHEDULER_CONFIG).is_file():
            return scheduler_from_diffusers(json.loads((candidate / DIFFUSERS_SCHEDULER_CONFIG).read_text()))
    return scheduler_from_diffusers({})


def scheduler_from_diffusers(config: dict) -> NoiseScheduler:
    """The NoiseScheduler equal to a diffusers DDPMScheduler, DDIMScheduler or DPMSolverMultistepScheduler
    config (`scheduler_config.json`, `scheduler.config` or what `diffusers_scheduler_config` returns).

    Keys the dict lacks take DDPMScheduler's defaults, notably clip_sample=True (which the published DDPM
    checkpoints also set), but a DPMSolverMultistepScheduler config (its `_class_name`) has no clipping.
    Their `squaredcos_cap_v2` is our `cosine`. `thresholding` with sample_max_value = 1 clamps x0 to
    [-1, 1] (diffusers clamps the dynamic threshold to [1, sample_max_value]): it is read as clip_sample.
    Dynamic thresholding (sample_max_value > 1) and trained_betas raise ValueError. `variance_type`
    "fixed_small", "fixed_large" and "learned_range" are ours (their "_log" forms, the same variance, map to
    the first two; "learned", an unbounded log-variance, raises ValueError; absent: "fixed_small"). Sampler
    settings (set_alpha_to_one, solver_order, ...) are not part of a schedule and are ignored.
    """
    if config.get("trained_betas") is not None:
        raise ValueError("the diffusers option trained_betas is not supported")
    variance_type = config.get("variance_type") or "fixed_small"  # DPMSolverMultistep's may be null
    variance_type = (
        variance_type.removesuffix("_log") if variance_type.startswith("fixed_") else variance_type
    )
    if variance_type == "learned":
        raise ValueError(
            "the diffusers variance_type 'learned' (the model outputs its log-variance directly) is not "
            f"supported; valid: {', '.join(VARIANCE_TYPES)}"
        )
    clip_sample = config.get("clip_sample", config.get("_class_name") != "DPMSolverMultistepScheduler")
    clip_sample_range = config.get("clip_sample_range", 1.0) if clip_sample else 1.0
    if config.get("thresholding", False):
        if config.get("sample_max_value", 1.0) != 1.0:
            raise ValueError(
                f"diffusers' dynamic thresholding with sample_max_value={config['sample_max_value']} is "
                "not supported; with sample_max_value=1.0 it is clip_sample=True (a clamp to [-1, 1])"
            )
        clip_sample, clip_sample_range = True, min(clip_sample_range, 1.0)
    beta_schedule = config.get("beta_schedule", "linear")
    ours_of = {theirs: ours for ours, theirs in DIFFUSERS_SCHEDULE_NAMES.items()}
    return NoiseScheduler(
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        beta_schedule=ours_of.get(beta_schedule, beta_schedule),
        beta_start=config.get("beta_start", 1e-4),
        beta_end=config.get("beta_end", 0.02),
        prediction_type=config.get("prediction_type", "epsilon"),
        rescale_betas_zero_snr=config.get("rescale_betas_zero_snr", False),
        clip_sample=clip_sample,
        clip_sample_range=clip_sample_range,
        timestep_spacing=_spacing_from_diffusers(config),
        steps_offset=config.get("steps_offset", 0),
        variance_type=variance_type,
    )


def diffusers_scheduler_config(scheduler: NoiseScheduler, cls: str | type = "DDPMScheduler") -> dict:
    """`scheduler` as keyword arguments of the diffusers scheduler `cls` (the class or its name, one of
    DIFFUSERS_SAMPLER_SETTINGS: DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler), with the sampler
    settings there, so that it computes what `ddpm.sample` computes with sampler "ddpm", "ddim" or "dpm++"
    (and the same spacing). diffusers' `from_config` takes it too; `scheduler_from_diffusers` inverts it.

    DPMSolverMultistepScheduler has no clip_sample: clip_sample=True becomes its thresholding with
    sample_max_value=1.0, exactly a clamp of x0 to [-1, 1]; a clip_sample_range other than 1 raises
    ValueError, having no equivalent there. The sigma spacings "karras" and "exponential" become its
    use_karras_sigmas / use_lu_lambdas (SIGMA_SPACING_FLAGS; DDPMScheduler and DDIMScheduler have neither:
    ValueError).
    variance_type goes to DDPMScheduler as it is, to DPMSolverMultistepScheduler as "learned_range" or None,
    and not to DDIMScheduler, which has none (it then loses that the model has 2C output channels). An
    unknown scheduler raises ValueError listing the valid ones.
    """
    name = cls if isinstance(cls, str) else cls.__name__
    _check_target(scheduler, name)
    beta_schedule = scheduler.config["beta_schedule"]
    config = {
        "_class_name": name,  # as in diffusers' own configs: whose keys these are (scheduler_from_diffusers)
        **scheduler.config,
        "beta_schedule": DIFFUSERS_SCHEDULE_NAMES.get(beta_schedule, beta_schedule),
        **DIFFUSERS_SAMPLER_SETTINGS[name],
    }
    if name == "DDIMScheduler":  # it has no variance_type; its step takes the prediction channels alone
        del config["variance_type"]
    if name == "DPMSolverMultistepScheduler":  # its variance_type says only whether the model learns one
        config["variance_type"] = "learned_range" if scheduler.learns_variance else None
        clip_sample, clip_sample_range = config.pop("clip_sample"), config.pop("clip_sample_range")
        if clip_sample and clip_sample_range != 1.0:
            raise ValueError(
                f"clip_sample=True with clip_sample_range={clip_sample_range} has no equivalent in "
                "DPMSolverMultistepScheduler (its thresholding clamps x0 to [-1, 1] at most); use "
                "clip_sample_range=1.0 or sample with ddpm.sample(..., sampler='dpm++')"
            )
        config.update(thresholding=clip_sample, sample_max_value=1.0)
    spacing = config["timestep_spacing"]
    if spacing in SIGMA_SPACINGS:
        if name != "DPMSolverMultistepScheduler":
            raise ValueError(
                f"timestep_spacing={spacing!r} has no equivalent in {name}; export to "
                "DPMSolverMultistepScheduler, or sample with ddpm.sample"
            )
        # diffusers spaces these sigmas over the whole table whatever its timestep_spacing says
        config.update(timestep_spacing="linspace", **{SIGMA_SPACING_FLAGS[spacing]: True})
    return config


def pipeline_scheduler(
    scheduler: NoiseScheduler, scheduler_class: str | None = None
) -> tuple[str, NoiseScheduler]:
    """The diffusers scheduler class an exported pipeline folder gets for `scheduler`, and the schedule it
    runs: `scheduler_class` (by default DPMSolverMultistepScheduler for the sigma spacings, DDPMScheduler for
    the others) and `scheduler` with a spacing that class runs correctly at every step count in diffusers'
    own loop (PIPELINE_SPACINGS): its own where it is one of them, else the class's first ("trailing" goes to
    DDPMScheduler as "linspace", "karras" to DPMSolverMultistepScheduler as "exponential"). Raises
    ValueError as `diffusers_scheduler_config` does, and for a zero-terminal-SNR schedule (no finite
    sigma_max) with DPMSolverMultistepScheduler, which runs correctly only on a sigma spacing."""
    spacing = scheduler.config.get("timestep_spacing")
    if scheduler_class is None:
        scheduler_class = "DPMSolverMultistepScheduler" if spacing in SIGMA_SPACINGS else "DDPMScheduler"
    _check_target(scheduler, scheduler_class)
    runs = PIPELINE_SPACINGS[scheduler_class]
    if spacing in runs:
        return scheduler_class, scheduler
    if scheduler.config["rescale_betas_zero_snr"] and runs[0] in SIGMA_SPACINGS:
        raise ValueError(
            f"{scheduler_class} runs correctly at every step count only with timestep_spacing "
            f"{runs[0]!r}, which needs a finite sigma_max, and this schedule has "
            "rescale_betas_zero_snr=True; export with --scheduler DDPMScheduler"
        )
    return scheduler_class, NoiseScheduler(**{**scheduler.config, "timestep_spacing": runs[0]})


def _check_target(scheduler: NoiseScheduler, name: str) -> None:
    """ValueError unless `name` is a scheduler of DIFFUSERS_SAMPLER_SETTINGS and `scheduler` has the discrete
    timesteps of a beta schedule (ddpm.edm.EDMScheduler has neither)."""
    if "beta_schedule" not in scheduler.config:
        raise ValueError(
            f"{type(scheduler).__name__} (diffusion.formulation=edm) has no {name} equivalent: that "
            "scheduler works on discrete timesteps of a beta schedule; sample the model with ddpm.sample"
        )
    if name not in DIFFUSERS_SAMPLER_SETTINGS:
        raise ValueError(
            f"unknown diffusers scheduler {name!r}; valid: {', '.join(DIFFUSERS_SAMPLER_SETTINGS)}"
        )


def _spacing_from_diffusers(config: dict) -> str:
    """Our timestep_spacing for a diffusers scheduler config: "karras" for use_karras_sigmas, "exponential"
    for use_exponential_sigmas or use_lu_lambdas, else its timestep_spacing (DDPMScheduler's default
    "leading" when absent)."""
    if config.get("use_karras_sigmas", False):
        return "karras"
    if config.get("use_exponential_sigmas", False) or config.get("use_lu_lambdas", False):
        return "exponential"
    return config.get("timestep_spacing", "leading")


def _rename_diffusers_tensors(state: dict[str, Tensor], *, null_row: bool = True) -> dict[str, Tensor]:
    """A UNet2DModel state dict under our names (DIFFUSERS_RENAMES), with (`null_row`) the null label's row
    appended to the class embedding: zeros, so that label num_classes adds nothing to the time embedding."""
    renamed = {}
    for key, value in state.items():
        for old, new in DIFFUSERS_RENAMES.items():
            key = key.replace(old, new)
        renamed[key] = value
    if null_row and "class_embedding.weight" in renamed:
        weight = renamed["class_embedding.weight"]  # (num_class_embeds, 4 * base)
        renamed["class_embedding.weight"] = torch.cat([weight, weight.new_zeros(1, weight.shape[1])])
    return renamed


def diffusers_unet_config(config: dict) -> dict:
    """Our UNet's config (its constructor's keyword arguments, `model.config`) as the config.json of the
    diffusers UNet2DModel that computes the same function; `unet_kwargs_from_diffusers` inverts it.

    The mapping of `unet_kwargs_from_diffusers` read backwards, with every option written out (no defaults
    of either library assumed). A class-conditional UNet keeps its null label: num_class_embeds =
    num_classes + 1, the last label being "no label" (classifier-free guidance), recorded as NULL_CLASS_KEY
    (with null_label=False, num_class_embeds = num_classes). An image condition (cond_channels = k) widens
    the input: in_channels = C + k + 1, recorded as COND_CHANNELS_KEY, and the caller passes UNet2DModel
    the sample [x, image, flag] (channels 0..C-1 x, C..C+k-1 the image, C+k the flag: 1 for an image, 0 with
    the image zeroed for the null condition), as `ddpm.models.unet.image_condition_input` builds it; with
    num_classes too, the labels go in class_labels. What UNet2DModel cannot express raises ValueError naming
    the option: a vector condition (cond_dim: its class embeddings hold no projection of a vector), a token
    sequence (context_dim: it has no cross-attention), time_conditioning=False, downsample="maxpool",
    head_kernel_size other than 3, a timestep sinusoid (time_channels, else base_channels) narrower or wider
    than the first level (channel_mult[0] other than 1: UNet2DModel sizes it by its first block's channels),
    num_heads > 1 where the attention blocks differ in width (UNet2DModel fixes the channels per head, not
    the heads), and any other option of UNet set away from its default (EXPORTED_UNET_OPTIONS lists those
    mapped here)."""
    c = config
    defaults = {
        name: p.default for name, p in inspect.signature(UNet.__init__).parameters.items() if name != "self"
    }
    for option, why in CONDITION_REFUSALS.items():
        if c.get(option) is not None:
            raise ValueError(f"model.{option}={c[option]!r} cannot be exported to diffusers: {why}")
    for option in sorted(set(c) - EXPORTED_UNET_OPTIONS):
        if option not in defaults or c[option] != defaults[option]:
            raise ValueError(
                f"model.{option}={c[option]!r} cannot be exported to diffusers (UNet2DModel has no such "
                f"option); it exports at its default, {defaults.get(option)!r}"
            )
    refusals = [
        ("time_conditioning", c["time_conditioning"], True, "a UNet2DModel always takes a timestep"),
        ("downsample", c["downsample"], ("conv", "conv_asymmetric"), "UNet2DModel downsamples by conv"),
        ("head_kernel_size", c["head_kernel_size"], 3, "UNet2DModel's output conv is 3x3"),
    ]
    for option, value, supported, why in refusals:
        if value not in (supported if isinstance(supported, tuple) else (supported,)):
            raise ValueError(
                f"model.{option}={value!r} cannot be exported to diffusers ({why}); supported: {supported}"
            )
    base, levels = c["base_channels"], len(c["channel_mult"])
    channels = [base * mult for mult in c["channel_mult"]]
    if (c["time_channels"] or base) != channels[0]:
        raise ValueError(
            f"model.channel_mult[0]={c['channel_mult'][0]} with time_channels={c['time_channels']} cannot be "
            f"exported to diffusers (UNet2DModel's timestep sinusoid is as wide as its first level, "
            f"{channels[0]} channels, ours {c['time_channels'] or base}); supported: channel_mult[0]=1 and "
            "time_channels null or base_channels"
        )
    attention = [c["image_size"] // 2**level in c["attention_resolutions"] for level in range(levels)]
    widths = [ch for ch, attn in zip(channels, attention, strict=True) if attn]
    widths += [channels[-1]] if c["mid_attention"] else []
    head_dim = c["head_channels"]
    if head_dim is None and c["num_heads"] > 1 and widths:
        dims = {width // c["num_heads"] for width in widths}
        if len(dims) > 1 or any(width % c["num_heads"] for width in widths):
            raise ValueError(
                f"model.num_heads={c['num_heads']} cannot be exported to diffusers: its attention blocks "
                f"are {sorted(set(widths))} channels wide and UNet2DModel has one width per head for all "
                "of them; use head_channels instead"
            )
        head_dim = dims.pop()
    classes, image = c["num_classes"], c.get("cond_channels")
    null = classes is not None and c["null_label"]
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        **({NULL_CLASS_KEY: classes} if null else {}),
        **({COND_CHANNELS_KEY: image} if image is not None else {}),
        "sample_size": c["image_size"],
        "in_channels": c["in_channels"] + (image + 1 if image is not None else 0),
        "out_channels": c["out_channels"],
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "freq_shift": int(shift) if (shift := c["time_freq_shift"]) == int(shift) else shift,
        "flip_sin_to_cos": c["time_flip_sin_to_cos"],
        "down_block_types": ["AttnDownBlock2D" if attn else "DownBlock2D" for attn in attention],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(attention)],
        "block_out_channels": channels,
        "layers_per_block": c["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": 1 if c["downsample"] == "conv" else 0,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": c["dropout"],
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": c["norm_groups"],
        # explicit: with scale_shift and None, UNet2DModel would give its attention blocks no GroupNorm
        "attn_norm_num_groups": c["norm_groups"],
        "norm_eps": c["norm_eps"],
        "resnet_time_scale_shift": "default" if c["time_injection"] == "add" else "scale_shift",
        "add_attention": c["mid_attention"],
        "class_embed_type": None,
        "num_class_embeds": None if classes is None else classes + int(null),
        "num_train_timesteps": None,
    }


def diffusers_state_dict(model: UNet) -> dict[str, Tensor]:
    """Our UNet's weights under UNet2DModel's names (DIFFUSERS_RENAMES backwards, with the names of diffusers
    0.14 and later), contiguous, for the config of `diffusers_unet_config(model.config)`."""
    state = {}
    for key, value in model.state_dict().items():
        resample = ".downsamplers.0.conv." if key.startswith("down_blocks.") else ".upsamplers.0."
        key = key.replace(".to_out.", ".to_out.0.").replace(".resample.", resample)
        state[key] = value.contiguous()
    return state


def save_diffusers_unet(folder: str | os.PathLike, model: UNet) -> None:
    """Write the UNet2DModel folder of `model` (config.json from `diffusers_unet_config`,
    diffusion_pytorch_model.safetensors from `diffusers_state_dict`): `UNet2DModel.from_pretrained(folder)`
    computes our function, for an image-conditioned model on the sample `image_condition_input(x, image,
    dropped)` (see `diffusers_unet_config`). Raises ValueError naming what UNet2DModel cannot express."""
    config = diffusers_unet_config(model.config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DIFFUSERS_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(diffusers_state_dict(model), str(folder / DIFFUSERS_WEIGHTS[0]), metadata={"format": "pt"})


def save_diffusers_pipeline(
    folder: str | os.PathLike, model: UNet, scheduler: NoiseScheduler, *, scheduler_class: str | None = None
) -> tuple[str, NoiseScheduler]:
    """Write a diffusers pipeline folder: model_index.json, unet/ (config.json from `diffusers_unet_config`,
    diffusion_pytorch_model.safetensors from `diffusers_state_dict`) and scheduler/ (scheduler_config.json
    from `diffusers_scheduler_config`), for the scheduler class and spacing of `pipeline_scheduler(scheduler,
    scheduler_class)`, which it returns. An unconditional model's folder is a DDPMPipeline
    (`DDPMPipeline.from_pretrained(folder)`); a class-conditional one's is a ClassConditionalPipeline, whose
    module (CONDITIONAL_PIPELINE) is copied into the folder and named in model_index.json, so that
    `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads it with nothing of ddpm
    installed. Raises ValueError naming what diffusers cannot express, and for an image-conditioned model
    (cond_channels), whose UNet alone exports (`save_diffusers_unet`): both pipelines draw noise of the
    UNet's in_channels and pass no image."""
    if model.cond_channels is not None:
        raise ValueError(
            f"model.cond_channels={model.cond_channels} cannot be exported as a diffusers pipeline: "
            "DDPMPipeline and ClassConditionalPipeline pass no image condition; write the UNet2DModel "
            "alone with ddpm.interop.diffusers.save_diffusers_unet and feed it "
            "ddpm.models.unet.image_condition_input(x, image, dropped)"
        )
    scheduler_class, runs = pipeline_scheduler(scheduler, scheduler_class)
    diffusers_unet_config(model.config)  # refuses what UNet2DModel cannot express before anything is written
    scheduler_config = {**diffusers_scheduler_config(runs, scheduler_class)}
    scheduler_config["_diffusers_version"] = DIFFUSERS_VERSION
    module, pipeline_class = CONDITIONAL_PIPELINE
    index = {
        "_class_name": "DDPMPipeline" if model.num_classes is None else [module, pipeline_class],
        "_diffusers_version": DIFFUSERS_VERSION,
        PIPELINE_SCHEDULER: ["diffusers", scheduler_class],
        PIPELINE_UNET: ["diffusers", "UNet2DModel"],
    }
    folder = Path(folder)
    (folder / PIPELINE_SCHEDULER).mkdir(parents=True, exist_ok=True)
    (folder / PIPELINE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if model.num_classes is not None:
        shutil.copyfile(Path(__file__).with_name(f"{module}.py"), folder / f"{module}.py")
    save_diffusers_unet(folder / PIPELINE_UNET, model)
    scheduler_file = folder / PIPELINE_SCHEDULER / DIFFUSERS_SCHEDULER_CONFIG
    scheduler_file.write_text(json.dumps(scheduler_config, indent=2) + "\n")
    return scheduler_class, runs
