"""OpenAI's published diffusion models as our `UNet` and `NoiseScheduler`: the `UNetModel` checkpoints of
guided-diffusion (ADM, Dhariwal & Nichol 2021) and improved-diffusion (Nichol & Dhariwal 2021).

Their checkpoints are bare state dicts (`.pt`); the architecture is given by the flags their READMEs publish
beside each one (MODEL_FLAGS and DIFFUSION_FLAGS), under their own names. `parse_openai_flags(string)` reads
such a flag string with their defaults, `unet_from_openai(path, **model_flags)` builds the UNet that computes
the same function as their `UNetModel` and loads the weights into it,
`scheduler_from_openai(**diffusion_flags)` builds the schedule, and `load_openai(path, flag_string)` does all
three.

How their network maps onto ours (the same block order: conv, levels of ResBlocks [+ attention] with a
resampler between levels, a middle ResBlock-attention-ResBlock, the up path on concatenated skips, GroupNorm,
SiLU, conv): their sinusoid is [cos, sin] with frequencies exp(-ln(10000) i / half) (our
time_flip_sin_to_cos=True, time_freq_shift=0) of width num_channels (our time_channels) and a 4x wider
embedding; GroupNorm(32, eps 1e-5) computed in float32 (torch's autocast does the same); use_scale_shift_norm
is our time_injection "scale_shift", else "add"; the label embedding (exactly 1000 rows: null_label=False) is
added to the time embedding. Pure weight-layout differences are permuted at load time: their qkv 1x1 conv
(3C, C, 1) becomes to_q, to_k and to_v, split per head then per q/k/v in their legacy order
(`[head][q|k|v][channel]`) or per q/k/v then per head with use_new_attention_order (`[q|k|v][head][channel]`);
their proj_out 1x1 conv becomes to_out. Attention at `attention_resolutions` (feature-map sides) means their
downsampling rates image_size // r. With rescale_timesteps the network sees t * 1000 / diffusion_steps
(our time_scale).
"""

from __future__ import annotations

import os
import pickle
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ddpm.models.unet import AttentionBlock, ResBlock, UNet
from ddpm.schedule import NoiseScheduler

NUM_CLASSES = 1000  # the class count of every class-conditional OpenAI model (ImageNet)
CODEBASES = ("guided-diffusion", "improved-diffusion")
# Their model flags with their defaults (script_util.model_and_diffusion_defaults, the same in both codebases
# for the flags both have; improved-diffusion lacks the last five, which are then off).
OPENAI_MODEL_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "attention_resolutions": "16,8",
    "dropout": 0.0,
    "learn_sigma": False,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "num_head_channels": -1,
    "channel_mult": "",
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
}
# Flags only guided-diffusion has: a flag string with one of them is guided-diffusion's.
GUIDED_ONLY_FLAGS = (
    "num_head_channels",
    "channel_mult",
    "resblock_updown",
    "use_fp16",
    "use_new_attention_order",
)
# Their diffusion flags with each codebase's defaults; they differ in rescale_timesteps (which changes what
# the network sees when diffusion_steps != 1000) and rescale_learned_sigmas (a training loss setting).
_GUIDED_DIFFUSION_DEFAULTS = {
    "learn_sigma": False,
    "sigma_small": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
}
OPENAI_DIFFUSION_DEFAULTS: dict[str, dict[str, Any]] = {
    "guided-diffusion": _GUIDED_DIFFUSION_DEFAULTS,
    "improved-diffusion": {
        **_GUIDED_DIFFUSION_DEFAULTS,
        "rescale_timesteps": True,
        "rescale_learned_sigmas": True,
    },
}
# The two diffusion flags that change the network's function (the time scale); unet_from_openai takes them.
NETWORK_DIFFUSION_FLAGS = ("diffusion_steps", "rescale_timesteps")
# channel_mult="" means this per image_size (guided-diffusion's create_model; 32 is improved-diffusion's).
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
# Flags of their other models, which take inputs our UNet has not: refused with this reason.
UNSUPPORTED_FLAGS = {
    "large_size": "the super-resolution models (SuperResModel: 64_256_upsampler.pt, 128_512_upsampler.pt, "
    "upsample_cond_500K.pt) also take the upsampled low-resolution image as 3 more input channels, which "
    "ddpm's samplers do not feed",
    "small_size": "see large_size",
}
# Their parameter names inside a ResBlock and an AttentionBlock, for ours (qkv is split, see _attention).
RESBLOCK_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# timestep_respacing -> our timestep_spacing: "N" picks round(i (T - 1) / (N - 1)), our "linspace"; "ddimN"
# takes every (T // N)-th step from 0, our "leading".
RESPACING_SPACINGS = {"": "linspace", "N": "linspace", "ddimN": "leading"}


def parse_openai_flags(
    flags: str | Sequence[str], *, codebase: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Their flag string (MODEL_FLAGS and DIFFUSION_FLAGS of their READMEs, e.g. "--attention_resolutions
    32,16,8 --class_cond True --diffusion_steps 1000 ...", or its shlex-split words) as (model_flags,
    diffusion_flags): every flag of `unet_from_openai` and `scheduler_from_openai`, the given ones parsed as
    their argparse does (booleans from yes/true/t/y/1 and no/false/f/n/0; the last of a repeated flag wins),
    the others at their defaults. model_flags also holds diffusion_steps and rescale_timesteps, which set
    the network's time scale.

    `codebase` ("guided-diffusion" or "improved-diffusion") picks the diffusion defaults, which differ in
    rescale_timesteps (improved-diffusion: True); None means guided-diffusion when a flag only it has is
    given (every guided-diffusion README command has resblock_updown), else improved-diffusion. Raises
    ValueError naming a flag that is unknown, refused (the super-resolution models' large_size, small_size),
    a sampling or training flag (their batch_size, use_ddim, ...: our sampler options), or badly formed.
    """
    words = shlex.split(flags) if isinstance(flags, str) else list(flags)
    given: dict[str, str] = {}
    while words:
        word = words.pop(0)
        if not word.startswith("--"):
            raise ValueError(f"OpenAI flags: expected --name value, got {word!r}")
        name, sep, value = word[2:].partition("=")
        if not sep:
            if not words:
                raise ValueError(f"OpenAI flag --{name} has no value")
            value = words.pop(0)
        given[name] = value
    if codebase is None:
        codebase = "guided-diffusion" if set(given) & set(GUIDED_ONLY_FLAGS) else "improved-diffusion"
    if codebase not in CODEBASES:
        raise ValueError(f"unknown codebase {codebase!r}; valid: {', '.join(CODEBASES)}")
    diffusion_defaults = OPENAI_DIFFUSION_DEFAULTS[codebase]
    defaults = {**OPENAI_MODEL_DEFAULTS, **diffusion_defaults}
    for name in given:
        _check_known(name, defaults)
    values = {
        name: _parse_value(name, given[name], defaults[name]) if name in given else defaults[name]
        for name in defaults
    }
    model_flags = {k: values[k] for k in [*OPENAI_MODEL_DEFAULTS, *NETWORK_DIFFUSION_FLAGS]}
    diffusion_flags = {k: values[k] for k in diffusion_defaults}
    return model_flags, diffusion_flags


def unet_from_openai(
    source: str | os.PathLike | Mapping[str, Tensor],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **model_flags: Any,
) -> UNet:
    """The UNet equal to their `UNetModel` built from `model_flags`, with the weights of `source`: a
    guided-diffusion or improved-diffusion `.pt` state dict (read with `torch.load(weights_only=True)`, never
    a full unpickle) or the state dict itself. `model(x, t, y)` then equals their `model(x, t, y)`, all 2C
    output channels with learn_sigma (the first C predict the noise, or x0 with predict_xstart).

    model_flags, under their names (defaults: OPENAI_MODEL_DEFAULTS): image_size, num_channels,
    num_res_blocks, channel_mult ("" for their per-size default, a comma string or a list), learn_sigma,
    class_cond, attention_resolutions (a comma string or a list of sides), num_heads, num_head_channels,
    num_heads_upsample, use_scale_shift_norm, dropout, resblock_updown, use_new_attention_order, use_fp16
    and use_checkpoint (accepted; they only change precision and memory); and diffusion_steps with
    rescale_timesteps (with it the network sees t * 1000 / diffusion_steps; it must be given when
    diffusion_steps != 1000, the codebases' defaults differing). A class-conditional model has exactly 1000
    labels and no null label (null_class None), so classifier-free guidance needs fine-tuning first.
    Raises ValueError naming an unknown or unmappable flag, or, for a state dict that does not fit the
    flags, naming the first mismatching tensor with both shapes. The model is built on the meta device and
    takes the converted tensors as its parameters (no second copy in memory); then moved to `device`/`dtype`.
    """
    new_order = bool(model_flags.get("use_new_attention_order", False))
    with torch.device("meta"):
        model = UNet(**unet_kwargs_from_openai(**model_flags))
    state = _read_state_dict(source)
    plan = _conversion_plan(model, new_order)
    _check_fits(state, plan, source)
    converted: dict[str, Tensor] = {}
    for their_name, (_, convert) in plan.items():
        tensor = state[their_name]
        converted.update(convert(tensor.float() if tensor.is_floating_point() else tensor))
    model.load_state_dict(converted, assign=True)
    return model.to(device=device, dtype=dtype)


def unet_kwargs_from_openai(**model_flags: Any) -> dict[str, Any]:
    """Our UNet's keyword arguments for their model flags (see `unet_from_openai`).

    Mapping: num_channels -> time_channels (their sinusoid width) and, times channel_mult[0], base_channels
    (channel_mult is divided by its first entry, so 512's (0.5, 1, 1, 2, 2, 4, 4) of 256 channels becomes
    base_channels=128 with channel_mult (1, 2, 2, 4, 4, 8, 8)); num_res_blocks, image_size, num_heads,
    num_heads_upsample (-1: None), dropout, resblock_updown the same; num_head_channels -> head_channels
    (-1: None); attention_resolutions r -> the sides image_size // (image_size // r) that are levels;
    learn_sigma -> out_channels 6; class_cond -> num_classes=1000, null_label=False; use_scale_shift_norm ->
    time_injection "scale_shift" (else "add"); rescale_timesteps -> time_scale=1000 / diffusion_steps.
    """
    known = {**OPENAI_MODEL_DEFAULTS, **dict.fromkeys(NETWORK_DIFFUSION_FLAGS)}
    for name in model_flags:
        _check_known(name, known)
    f = {**OPENAI_MODEL_DEFAULTS, **model_flags}
    size, width = int(f["image_size"]), int(f["num_channels"])
    mult = _channel_mult(f["channel_mult"], size)
    level_channels = [int(m * width) for m in mult]  # their int(mult * model_channels)
    base = level_channels[0]
    if any(c % base for c in level_channels):
        raise ValueError(
            f"channel_mult={f['channel_mult']!r}: level channels {level_channels} are not all multiples of "
            f"the first, {base}, which ddpm's UNet needs"
        )
    steps, rescale = f.get("diffusion_steps", 1000), f.get("rescale_timesteps")
    if rescale is None and steps != 1000:
        raise ValueError(
            f"diffusion_steps={steps}: pass rescale_timesteps (improved-diffusion's default True: the "
            "network saw t * 1000 / diffusion_steps; guided-diffusion's False: it saw t), or read the flags "
            "with parse_openai_flags, which knows each codebase's defaults"
        )
    sides = [size // 2**level for level in range(len(mult))]
    rates = [size // int(r) for r in _int_list(f["attention_resolutions"], "attention_resolutions")]
    return {
        "in_channels": 3,
        "out_channels": 6 if f["learn_sigma"] else 3,
        "base_channels": base,
        "channel_mult": [c // base for c in level_channels],
        "num_res_blocks": int(f["num_res_blocks"]),
        # their test is "downsampling rate in attention_ds"; a rate no level has gets no attention
        "attention_resolutions": [side for side in sides if size // side in rates],
        "image_size": size,
        "num_heads": int(f["num_heads"]),
        "head_channels": None if f["num_head_channels"] == -1 else int(f["num_head_channels"]),
        "num_heads_upsample": None if f["num_heads_upsample"] == -1 else int(f["num_heads_upsample"]),
        "dropout": float(f["dropout"]),
        "time_injection": "scale_shift" if f["use_scale_shift_norm"] else "add",
        "time_flip_sin_to_cos": True,
        "time_channels": width,
        "time_scale": 1000.0 / steps if rescale else 1.0,
        "num_classes": NUM_CLASSES if f["class_cond"] else None,
        "null_label": False,
        "resblock_updown": bool(f["resblock_updown"]),
    }


def scheduler_kwargs_from_openai(**diffusion_flags: Any) -> dict[str, Any]:
    """NoiseScheduler's keyword arguments for their diffusion flags (defaults: guided-diffusion's, for the
    flags not given; `parse_openai_flags` fills each codebase's own).

    diffusion_steps -> num_train_timesteps; noise_schedule "linear" -> beta_start 1e-4 * 1000 / T and
    beta_end 0.02 * 1000 / T (their linear schedule, scaled to keep its shape for any T); "cosine" ->
    "cosine" (Nichol & Dhariwal Eq. 17 with s = 0.008, betas clipped at 0.999, as theirs); predict_xstart
    -> prediction_type "sample" (else "epsilon"); learn_sigma -> variance_type "learned_range", else
    sigma_small -> "fixed_small", else "fixed_large" (their default); clip_sample=True (their samplers'
    clip_denoised default); timestep_respacing "" or "N" -> timestep_spacing "linspace" (their "N" spacing for
    the usual N: 10, 20, 25, 50, 100, 200, 250, 500, 1000, 4000 checked; for some others their running float
    sum rounds a .5 tie the other way, one step apart), "ddimN" -> "leading" (equal when N divides T). The
    number of steps is the sampler's (`sample.py --steps N`). use_kl and rescale_learned_sigmas set their
    training loss only, rescale_timesteps the network (unet_from_openai): all three are accepted here and
    change nothing. Raises ValueError naming an unknown flag or value.
    """
    defaults = OPENAI_DIFFUSION_DEFAULTS["guided-diffusion"]
    for name in diffusion_flags:
        _check_known(name, defaults)
    f = {**defaults, **diffusion_flags}
    steps = int(f["diffusion_steps"])
    schedule = f["noise_schedule"]
    if schedule not in ("linear", "cosine"):
        raise ValueError(f"noise_schedule={schedule!r} is not one of their schedules: linear, cosine")
    kwargs: dict[str, Any] = {"num_train_timesteps": steps, "beta_schedule": schedule}
    if schedule == "linear":
        kwargs.update(beta_start=1e-4 * 1000 / steps, beta_end=0.02 * 1000 / steps)
    variance = "learned_range" if f["learn_sigma"] else "fixed_small" if f["sigma_small"] else "fixed_large"
    kwargs.update(
        prediction_type="sample" if f["predict_xstart"] else "epsilon",
        variance_type=variance,
        clip_sample=True,
        timestep_spacing=_spacing(str(f["timestep_respacing"])),
    )
    return kwargs


def scheduler_from_openai(**diffusion_flags: Any) -> NoiseScheduler:
    """The NoiseScheduler of their diffusion flags: `NoiseScheduler(**scheduler_kwargs_from_openai(...))`."""
    return NoiseScheduler(**scheduler_kwargs_from_openai(**diffusion_flags))


def load_openai(
    path: str | os.PathLike,
    flags: str | Sequence[str],
    *,
    codebase: str | None = None,
    device: torch.device | str | None = None,
) -> tuple[UNet, NoiseScheduler]:
    """(UNet in eval mode, NoiseScheduler) of an OpenAI checkpoint and the flag string published with it
    (`parse_openai_flags`, `unet_from_openai`, `scheduler_from_openai`)."""
    model_flags, diffusion_flags = parse_openai_flags(flags, codebase=codebase)
    model = unet_from_openai(path, device=device, **model_flags)
    return model.eval(), scheduler_from_openai(**diffusion_flags)


def _check_known(name: str, known: Mapping[str, Any]) -> None:
    """Raises ValueError for a flag `unet_from_openai`/`scheduler_from_openai` do not take, saying why."""
    if name in known:
        return
    if name in UNSUPPORTED_FLAGS:
        raise ValueError(f"OpenAI flag --{name} is not supported: {UNSUPPORTED_FLAGS[name]}")
    raise ValueError(
        f"unknown OpenAI flag --{name}: pass their MODEL_FLAGS and DIFFUSION_FLAGS only "
        f"({', '.join(known)}); "
        "sampling flags (batch_size, num_samples, use_ddim, clip_denoised, ...) are sample.py's own options "
        "(--batch-size, --n, --sampler, ...)"
    )


def _parse_value(name: str, text: str, default: Any) -> Any:
    """A flag's value as their argparse reads it: the type of its default (str2bool for booleans)."""
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("yes", "true", "t", "y", "1"):
            return True
        if lowered in ("no", "false", "f", "n", "0"):
            return False
        raise ValueError(f"OpenAI flag --{name} {text}: expected a boolean (True or False)")
    try:
        return type(default)(text)
    except ValueError:
        raise ValueError(f"OpenAI flag --{name} {text}: expected {type(default).__name__}") from None


def _int_list(value: str | Sequence[int], name: str) -> list[int]:
    """A comma string ("32,16,8") or a sequence of ints as a list of ints."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        return [int(item) for item in items]
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected integers, as a comma string or a list") from None


def _channel_mult(value: str | Sequence[float], image_size: int) -> tuple[float, ...]:
    """Their channel_mult: "" -> the default for image_size, else a comma string or a sequence."""
    if value == "" or value is None:
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"image_size={image_size} has no default channel_mult in their code (sizes "
                f"{sorted(DEFAULT_CHANNEL_MULT)}); pass channel_mult"
            )
        return DEFAULT_CHANNEL_MULT[image_size]
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(float(item) for item in items)


def _spacing(respacing: str) -> str:
    """Our timestep_spacing for their timestep_respacing (RESPACING_SPACINGS)."""
    kind = "ddimN" if respacing.startswith("ddim") else "N" if respacing else ""
    number = respacing.removeprefix("ddim")
    if kind and not number.isdigit():
        raise ValueError(
            f"timestep_respacing={respacing!r} is not supported: only '', 'N' and 'ddimN' (one section) map "
            "onto a timestep spacing; sample with --steps N instead"
        )
    return RESPACING_SPACINGS[kind]


def _read_state_dict(source: str | os.PathLike | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """The state dict of a .pt file (tensors only: weights_only=True) or the mapping itself."""
    if isinstance(source, Mapping):
        return source
    try:
        state = torch.load(Path(source), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{source} is not a plain state dict of tensors (weights_only loading refused it: "
            f"{str(error).splitlines()[0]}); OpenAI's checkpoints are"
        ) from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{source} holds a {type(state).__name__}, not a state dict")
    return state


Converter = Callable[[Tensor], dict[str, Tensor]]


def _conversion_plan(model: UNet, new_order: bool) -> dict[str, tuple[tuple[int, ...], Converter]]:
    """For each tensor of their state dict, in their order: (its shape, the function that turns it into our
    tensors). Their names follow their module lists: time_embed, label_emb, input_blocks.i.j (the first
    is the input conv; then per level num_res_blocks [ResBlock, attention], then the resampler),
    middle_block.0-2, output_blocks.i.j ([ResBlock, attention, resampler]) and out."""
    pairs: list[tuple[str, str, nn.Module]] = [  # (their prefix, our prefix, our module)
        ("time_embed.0", "time_embedding.linear_1", model.time_embedding.linear_1),
        ("time_embed.2", "time_embedding.linear_2", model.time_embedding.linear_2),
    ]
    if model.class_embedding is not None:
        pairs.append(("label_emb", "class_embedding", model.class_embedding))
    pairs.append(("input_blocks.0.0", "conv_in", model.conv_in))
    index = 1
    for level, block in enumerate(model.down_blocks):
        for i, resnet in enumerate(block.resnets):
            ours = f"down_blocks.{level}"
            pairs.append((f"input_blocks.{index}.0", f"{ours}.resnets.{i}", resnet))
            if block.attentions:
                pairs.append((f"input_blocks.{index}.1", f"{ours}.attentions.{i}", block.attentions[i]))
            index += 1
        if block.resample is not None:
            # their Downsample's conv is `op`; a resampling ResBlock has the ResBlock names
            theirs = f"input_blocks.{index}.0" + ("" if isinstance(block.resample, ResBlock) else ".op")
            pairs.append((theirs, f"down_blocks.{level}.resample", block.resample))
            index += 1
    mid = model.mid_block
    pairs.append(("middle_block.0", "mid_block.resnets.0", mid.resnets[0]))
    if mid.attentions:
        pairs.append(("middle_block.1", "mid_block.attentions.0", mid.attentions[0]))
    pairs.append((f"middle_block.{2 if mid.attentions else 1}", "mid_block.resnets.1", mid.resnets[1]))
    index = 0
    for j, block in enumerate(model.up_blocks):
        for i, resnet in enumerate(block.resnets):
            ours = f"up_blocks.{j}"
            pairs.append((f"output_blocks.{index}.0", f"{ours}.resnets.{i}", resnet))
            if block.attentions:
                pairs.append((f"output_blocks.{index}.1", f"{ours}.attentions.{i}", block.attentions[i]))
            if i == len(block.resnets) - 1 and block.resample is not None:
                position = 2 if block.attentions else 1
                pairs.append((f"output_blocks.{index}.{position}", f"{ours}.resample", block.resample))
            index += 1
    pairs += [("out.0", "conv_norm_out", model.conv_norm_out), ("out.2", "conv_out", model.conv_out)]

    plan: dict[str, tuple[tuple[int, ...], Converter]] = {}
    for theirs, ours, module in pairs:
        if isinstance(module, AttentionBlock):
            plan.update(_attention_plan(theirs, ours, module, new_order))
            continue
        for name, parameter in module.named_parameters():
            their_name = name
            if isinstance(module, ResBlock):
                layer, _, kind = name.partition(".")
                their_name = f"{RESBLOCK_NAMES[layer]}.{kind}"
            plan[f"{theirs}.{their_name}"] = (tuple(parameter.shape), _rename(f"{ours}.{name}"))
    return plan


def _attention_plan(
    theirs: str, ours: str, block: AttentionBlock, new_order: bool
) -> dict[str, tuple[tuple[int, ...], Converter]]:
    """Their AttentionBlock's tensors: norm -> group_norm; qkv (3C, C, 1) and (3C,) -> to_q, to_k, to_v;
    proj_out (C, C, 1) -> to_out."""
    channels, heads = block.to_q.in_features, block.heads
    plan = {
        f"{theirs}.norm.weight": ((channels,), _rename(f"{ours}.group_norm.weight")),
        f"{theirs}.norm.bias": ((channels,), _rename(f"{ours}.group_norm.bias")),
        f"{theirs}.proj_out.weight": (
            (channels, channels, 1),
            _rename(f"{ours}.to_out.weight", squeeze=True),
        ),
        f"{theirs}.proj_out.bias": ((channels,), _rename(f"{ours}.to_out.bias")),
    }
    for kind, shape in (("weight", (3 * channels, channels, 1)), ("bias", (3 * channels,))):
        plan[f"{theirs}.qkv.{kind}"] = (shape, _split_qkv(ours, kind, heads, new_order))
    return plan


def _rename(ours: str, *, squeeze: bool = False) -> Converter:
    """A converter that files the tensor under our name, a 1x1 Conv1d kernel (C, C, 1) as a Linear (C, C)."""
    return lambda tensor: {ours: tensor[..., 0] if squeeze else tensor}


def _split_qkv(ours: str, kind: str, heads: int, new_order: bool) -> Converter:
    """Their qkv output channels are `[head][q|k|v][channel]` (legacy) or `[q|k|v][head][channel]`
    (use_new_attention_order); ours are three projections, each `[head][channel]`."""

    def convert(tensor: Tensor) -> dict[str, Tensor]:
        rows = tensor.reshape(tensor.shape[0], -1)  # (3C, C) or (3C, 1)
        channels = rows.shape[0] // 3
        if new_order:
            split = rows.reshape(3, heads, channels // heads, -1)
        else:
            split = rows.reshape(heads, 3, channels // heads, -1).transpose(0, 1)
        q, k, v = (part.reshape(channels, -1) for part in split)  # each (C, C) or (C, 1)
        shape = (channels, channels) if kind == "weight" else (channels,)
        return {
            f"{ours}.to_{name}.{kind}": part.reshape(shape).contiguous()
            for name, part in zip("qkv", (q, k, v), strict=True)
        }

    return convert


def _check_fits(
    state: Mapping[str, Tensor], plan: Mapping[str, tuple[tuple[int, ...], Converter]], source: object
) -> None:
    """Raises ValueError naming the first tensor (in their order) that is missing or mis-shaped, else the
    first one the flags have no place for, with the count of problems."""
    what = source if not isinstance(source, Mapping) else "the state dict"
    first_conv = state.get("input_blocks.0.0.weight")
    if first_conv is not None and first_conv.ndim == 4 and first_conv.shape[1] == 6:
        raise ValueError(
            f"{what} is a super-resolution model (its first conv takes 6 input channels: the noisy image and "
            f"the upsampled low-resolution one), which is not supported: {UNSUPPORTED_FLAGS['large_size']}"
        )
    problems = [
        f"{name}: missing"
        if name not in state
        else f"{name}: file {tuple(state[name].shape)} vs flags {shape}"
        for name, (shape, _) in plan.items()
        if name not in state or tuple(state[name].shape) != shape
    ]
    problems += [f"{name}: not in a model of these flags" for name in state if name not in plan]
    if problems:
        raise ValueError(
            f"{what} does not fit the model flags: {problems[0]} ({len(problems)} mismatching tensors); pass "
            "the MODEL_FLAGS published with this checkpoint (image_size, num_channels, num_res_blocks, "
            "channel_mult, attention_resolutions, num_head_channels, learn_sigma, class_cond, "
            "resblock_updown)"
        )
