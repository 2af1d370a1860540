"""Conversion of diffusers models into ours: a `UNet2DModel` of the DDPM family becomes our `UNet`.

`unet_from_diffusers(folder)` loads one (config.json + weights, or a pipeline folder with `unet/`);
`unet_kwargs_from_diffusers(config)` maps its config.json onto our constructor; `diffusers_unet_folder(path)`
tells a diffusers folder from ours. Nothing here imports diffusers: the published files are read directly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from ddpm.models.unet import CONFIG_NAME, UNet, load_checked

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

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


def unet_from_diffusers(
    directory: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> UNet:
    """Builds the UNet equal to a diffusers `UNet2DModel` of the DDPM family saved in `directory`.

    `directory` holds config.json and diffusion_pytorch_model.safetensors (or .bin), as written by
    `UNet2DModel.save_pretrained` and published for google/ddpm-cifar10-32, google/ddpm-celebahq-256,
    google/ddpm-ema-church-256 etc.; a pipeline folder whose UNet is in `unet/` works too. The result
    computes the same function: `model(x, t, y) == unet(x, t, class_labels=y).sample`. The config is
    mapped by `unet_kwargs_from_diffusers`, which raises ValueError for unsupported options.
    A class-conditional UNet2DModel (num_class_embeds = K) becomes num_classes = K: labels 0..K-1 are the
    same, and the null label K, which diffusers does not have, gets a zero embedding (no class term), so
    classifier-free guidance needs fine-tuning with label dropout first.
    """
    folder = diffusers_unet_folder(directory)
    if folder is None:
        raise FileNotFoundError(
            f"no diffusers model in {directory}: expected config.json (or unet/config.json) with a "
            "'_class_name' key, as UNet2DModel.save_pretrained writes; folders written by our "
            "UNet.save_pretrained load with UNet.from_pretrained"
        )
    config = json.loads((folder / CONFIG_NAME).read_text())
    weights = next((folder / name for name in DIFFUSERS_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"no weights in {folder}: expected one of {list(DIFFUSERS_WEIGHTS)}")
    if config["_class_name"] != "UNet2DModel":
        raise ValueError(
            f"{folder / CONFIG_NAME} describes a {config['_class_name']}; UNet.from_diffusers loads "
            "UNet2DModel (the DDPM family) only"
        )
    model = UNet(**unet_kwargs_from_diffusers(config))
    if weights.suffix == ".safetensors":
        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    load_checked(
        model,
        _rename_diffusers_tensors(state),
        f"the tensors in {weights} do not fit the UNet2DModel that {folder / CONFIG_NAME} describes",
        "the file may hold a modified UNet2DModel, which from_diffusers cannot map",
    )
    return model.to(device=device, dtype=dtype)


def diffusers_unet_folder(directory: str | os.PathLike) -> Path | None:
    """The folder of a diffusers model in `directory`: itself, or its `unet/` (a pipeline folder); None when
    neither holds a diffusers config.json (one with a '_class_name' key; ours have 'class')."""
    for folder in (Path(directory), Path(directory) / "unet"):
        config = folder / CONFIG_NAME
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
        num_class_embeds -> num_classes (see UNet.from_diffusers for the null label)
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
            f"unknown UNet2DModel option(s) {unknown}; UNet.from_diffusers knows those of diffusers 0.42: "
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
    return {
        "in_channels": c["in_channels"],
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
        "num_classes": c["num_class_embeds"],
        "downsample": "conv" if c["downsample_padding"] == 1 else "conv_asymmetric",
    }


def _rename_diffusers_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A UNet2DModel state dict under our names (DIFFUSERS_RENAMES), with the null label's row appended to
    the class embedding: zeros, so that label num_classes adds nothing to the time embedding."""
    renamed = {}
    for key, value in state.items():
        for old, new in DIFFUSERS_RENAMES.items():
            key = key.replace(old, new)
        renamed[key] = value
    if "class_embedding.weight" in renamed:
        weight = renamed["class_embedding.weight"]  # (num_class_embeds, 4 * base)
        renamed["class_embedding.weight"] = torch.cat([weight, weight.new_zeros(1, weight.shape[1])])
    return renamed
