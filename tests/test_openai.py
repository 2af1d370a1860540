"""Loading OpenAI's guided-diffusion and improved-diffusion checkpoints (ddpm.interop.openai), without their
code or weights.

The oracle is written here from their architecture (script_util.create_model and unet.UNetModel): the tensor
names and shapes of their state dict for given flags (`their_layers`, `their_shapes`) and their forward pass
as equations (`reference_forward`: [cos, sin] sinusoid, GroupNorm(32), AdaGN, resampling ResBlocks, QKV
attention in both channel orders). Every README configuration is checked by names and shapes on the meta
device (no memory); tiny versions of the same structures are checked numerically, every tensor random so that
a zero-initialised layer cannot hide a wrong mapping.
"""

import importlib.util
import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddpm.inference import generate, grid_from_checkpoint, load_for_sampling
from ddpm.interop.openai import (
    parse_openai_flags,
    scheduler_from_openai,
    scheduler_kwargs_from_openai,
    unet_from_openai,
    unet_kwargs_from_openai,
)
from ddpm.io import CheckpointError
from ddpm.models.unet import AttentionBlock, ResBlock, sinusoidal_embedding
from ddpm.samplers import sample
from ddpm.schedule import NoiseScheduler

ROOT = Path(__file__).resolve().parents[1]
# NoiseScheduler(variance_type=...) comes with issue 14's learned variance (helper "var"), merged beside this.
HAS_VARIANCE_TYPE = "variance_type" in inspect.signature(NoiseScheduler).parameters
needs_variance_type = pytest.mark.skipif(
    not HAS_VARIANCE_TYPE, reason="needs NoiseScheduler(variance_type=...) from issue 14's learned variance"
)

# MODEL_FLAGS (+ DIFFUSION_FLAGS) of every checkpoint in guided-diffusion's README ...
GUIDED = {
    "64x64_diffusion": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
    "--dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 "
    "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True --use_new_attention_order True "
    "--use_fp16 True --use_scale_shift_norm True",
    "128x128_diffusion": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
    "--image_size 128 --learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "256x256_diffusion": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
    "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "256x256_diffusion_uncond": "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 "
    "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "512x512_diffusion": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
    "--image_size 512 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 False --use_scale_shift_norm True",
    "lsun_bedroom": "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 "
    "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "lsun_horse_nodropout": "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 "
    "--dropout 0.0 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
    "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
    "--use_scale_shift_norm True",
    "128x128_diffusion (DDIM section)": "--attention_resolutions 32,16,8 --class_cond True --image_size 128 "
    "--learn_sigma True --num_channels 256 --num_heads 4 --num_res_blocks 2 --resblock_updown True "
    "--use_fp16 True --use_scale_shift_norm True",
}
# ... and of improved-diffusion's (MODEL_FLAGS DIFFUSION_FLAGS, as their README sets them).
IMPROVED = {
    "imagenet64_uncond_100M_1500K": "--image_size 64 --num_channels 128 --num_res_blocks 3 "
    "--learn_sigma True --diffusion_steps 4000 --noise_schedule cosine",
    "cifar10_uncond_50M_500K": "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
    "--dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine",
    "imagenet64_cond_270M_250K": "--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True "
    "--class_cond True --diffusion_steps 4000 --noise_schedule cosine --rescale_learned_sigmas False "
    "--rescale_timesteps False",
    "lsun_uncond_100M_1200K_bs128": "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 "
    "--learn_sigma True --use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000 "
    "--noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False",
    "lsun_uncond_100M_2400K_bs64": "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 "
    "--learn_sigma True --use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000 "
    "--noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False "
    "--use_scale_shift_norm False",
    "imagenet64_uncond_vlb_100M_1500K": "--image_size 64 --num_channels 128 --num_res_blocks 3 "
    "--learn_sigma True --diffusion_steps 4000 --noise_schedule cosine --use_kl True",
    "cifar10_uncond_vlb_50M_500K": "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
    "--dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine --use_kl True",
}
UPSAMPLERS = {
    "64_256_upsampler": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
    "--large_size 256  --small_size 64 --learn_sigma True --noise_schedule linear --num_channels 192 "
    "--num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "128_512_upsampler": "--attention_resolutions 32,16 --class_cond True --diffusion_steps 1000 "
    "--large_size 512 --small_size 128 --learn_sigma True --noise_schedule linear --num_channels 192 "
    "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
    "--use_scale_shift_norm True",
}
PER_SIZE_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
PER_SIZE_MULT[32] = (1, 2, 2, 2)  # improved-diffusion's


# --- their architecture, written from their create_model / UNetModel ----------------------------------------


def their_layers(f: dict) -> tuple[list, list, list]:
    """(input_blocks, middle_block, output_blocks) of their UNetModel for flags `f`, each block a list of
    layer specs: ("conv", cin, cout), ("res", cin, cout, "down"|"up"|None), ("attn", ch, heads),
    ("down", ch) (stride-2 conv `op`), ("up", ch) (nearest x2 + conv `conv`)."""
    size, mc = f["image_size"], f["num_channels"]
    mult = f["channel_mult"] or PER_SIZE_MULT[size]
    if isinstance(mult, str):
        mult = tuple(int(m) for m in mult.split(","))
    attention_res = f["attention_resolutions"]
    if isinstance(attention_res, str):
        attention_res = [int(r) for r in attention_res.split(",")]
    rates = {size // r for r in attention_res}

    def heads(ch, n):
        return ch // f["num_head_channels"] if f["num_head_channels"] != -1 else n

    up_heads = f["num_heads_upsample"] if f["num_heads_upsample"] != -1 else f["num_heads"]
    ch = int(mult[0] * mc)
    inputs, chans, ds = [[("conv", 3, ch)]], [ch], 1
    for level, m in enumerate(mult):
        for _ in range(f["num_res_blocks"]):
            block = [("res", ch, int(m * mc), None)]
            ch = int(m * mc)
            if ds in rates:
                block.append(("attn", ch, heads(ch, f["num_heads"])))
            inputs.append(block)
            chans.append(ch)
        if level != len(mult) - 1:
            inputs.append([("res", ch, ch, "down") if f["resblock_updown"] else ("down", ch)])
            chans.append(ch)
            ds *= 2
    middle = [("res", ch, ch, None), ("attn", ch, heads(ch, f["num_heads"])), ("res", ch, ch, None)]
    outputs = []
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(f["num_res_blocks"] + 1):
            block = [("res", ch + chans.pop(), int(mc * m), None)]
            ch = int(mc * m)
            if ds in rates:
                block.append(("attn", ch, heads(ch, up_heads)))
            if level and i == f["num_res_blocks"]:
                block.append(("res", ch, ch, "up") if f["resblock_updown"] else ("up", ch))
                ds //= 2
            outputs.append(block)
    return inputs, middle, outputs


def their_shapes(f: dict) -> dict[str, tuple[int, ...]]:
    """Their state dict's tensor names and shapes for flags `f`."""
    mc, emb = f["num_channels"], 4 * f["num_channels"]
    shapes = {
        "time_embed.0.weight": (emb, mc),
        "time_embed.0.bias": (emb,),
        "time_embed.2.weight": (emb, emb),
        "time_embed.2.bias": (emb,),
    }
    if f["class_cond"]:
        shapes["label_emb.weight"] = (1000, emb)
    scale_shift = 2 if f["use_scale_shift_norm"] else 1

    def layer(prefix, spec):
        kind = spec[0]
        if kind == "conv":
            shapes.update({f"{prefix}.weight": (spec[2], spec[1], 3, 3), f"{prefix}.bias": (spec[2],)})
        elif kind == "res":
            cin, cout = spec[1], spec[2]
            shapes.update(
                {
                    f"{prefix}.in_layers.0.weight": (cin,),
                    f"{prefix}.in_layers.0.bias": (cin,),
                    f"{prefix}.in_layers.2.weight": (cout, cin, 3, 3),
                    f"{prefix}.in_layers.2.bias": (cout,),
                    f"{prefix}.emb_layers.1.weight": (scale_shift * cout, emb),
                    f"{prefix}.emb_layers.1.bias": (scale_shift * cout,),
                    f"{prefix}.out_layers.0.weight": (cout,),
                    f"{prefix}.out_layers.0.bias": (cout,),
                    f"{prefix}.out_layers.3.weight": (cout, cout, 3, 3),
                    f"{prefix}.out_layers.3.bias": (cout,),
                }
            )
            if cin != cout:
                shapes.update({f"{prefix}.skip_connection.weight": (cout, cin, 1, 1)})
                shapes.update({f"{prefix}.skip_connection.bias": (cout,)})
        elif kind == "attn":
            c = spec[1]
            shapes.update(
                {
                    f"{prefix}.norm.weight": (c,),
                    f"{prefix}.norm.bias": (c,),
                    f"{prefix}.qkv.weight": (3 * c, c, 1),
                    f"{prefix}.qkv.bias": (3 * c,),
                    f"{prefix}.proj_out.weight": (c, c, 1),
                    f"{prefix}.proj_out.bias": (c,),
                }
            )
        else:
            name = "op" if kind == "down" else "conv"
            shapes.update(
                {f"{prefix}.{name}.weight": (spec[1], spec[1], 3, 3), f"{prefix}.{name}.bias": (spec[1],)}
            )

    inputs, middle, outputs = their_layers(f)
    for i, block in enumerate(inputs):
        for j, spec in enumerate(block):
            layer(f"input_blocks.{i}.{j}", spec)
    for j, spec in enumerate(middle):
        layer(f"middle_block.{j}", spec)
    for i, block in enumerate(outputs):
        for j, spec in enumerate(block):
            layer(f"output_blocks.{i}.{j}", spec)
    c0 = inputs[0][0][2]
    out = 6 if f["learn_sigma"] else 3
    shapes.update(
        {"out.0.weight": (c0,), "out.0.bias": (c0,), "out.2.weight": (out, c0, 3, 3), "out.2.bias": (out,)}
    )
    return shapes


def group_norm(x, sd, prefix):
    """Their GroupNorm32: 32 groups, eps 1e-5, computed in float32."""
    return F.group_norm(x.float(), 32, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], 1e-5)


def reference_resblock(sd, p, x, emb, resample, scale_shift):
    """Their ResBlock: h = conv(SiLU(GN(x))) (resampling h and x after the SiLU for up/down); emb_out =
    Linear(SiLU(emb)); AdaGN GN(h) (1 + scale) + shift, or GN(h + emb_out); conv(dropout(SiLU(.))); + skip."""
    h = F.silu(group_norm(x, sd, f"{p}.in_layers.0"))
    if resample == "down":
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    elif resample == "up":
        h, x = (
            F.interpolate(h, scale_factor=2, mode="nearest"),
            F.interpolate(x, scale_factor=2, mode="nearest"),
        )
    h = F.conv2d(h, sd[f"{p}.in_layers.2.weight"], sd[f"{p}.in_layers.2.bias"], padding=1)
    emb_out = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[
        :, :, None, None
    ]
    if scale_shift:
        scale, shift = emb_out.chunk(2, dim=1)
        h = group_norm(h, sd, f"{p}.out_layers.0") * (1 + scale) + shift
    else:
        h = group_norm(h + emb_out, sd, f"{p}.out_layers.0")
    h = F.conv2d(F.silu(h), sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"], padding=1)
    if f"{p}.skip_connection.weight" in sd:
        x = F.conv2d(x, sd[f"{p}.skip_connection.weight"], sd[f"{p}.skip_connection.bias"])
    return x + h


def reference_attention(sd, p, x, heads, new_order):
    """Their AttentionBlock: qkv = Conv1d(GN(x)) over the H*W positions; the legacy order reads its channels
    as [head][q|k|v][d], the new order as [q|k|v][head][d]; softmax(q.k / sqrt(d)) v; proj_out; + x."""
    n, c, height, width = x.shape
    tokens = x.reshape(n, c, -1)  # (N, C, T)
    qkv = F.conv1d(group_norm(tokens, sd, f"{p}.norm"), sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"])
    d = c // heads
    if new_order:
        q, k, v = (part.reshape(n * heads, d, -1) for part in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(n * heads, 3 * d, -1).split(d, dim=1)
    weights = torch.softmax(torch.einsum("bdt,bds->bts", q, k) / math.sqrt(d), dim=-1)
    out = torch.einsum("bts,bds->bdt", weights, v).reshape(n, c, -1)
    out = F.conv1d(out, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])
    return (tokens + out).reshape(n, c, height, width)


def reference_forward(sd, f, x, t, y=None):
    """Their UNetModel.forward from their equations, on a state dict of their names."""
    mc = f["num_channels"]
    t = t.float() * (1000.0 / f["diffusion_steps"]) if f["rescale_timesteps"] else t
    half = mc // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    sinusoid = torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # [cos, sin]
    emb = F.linear(sinusoid, sd["time_embed.0.weight"], sd["time_embed.0.bias"])
    emb = F.linear(F.silu(emb), sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    if y is not None:
        emb = emb + sd["label_emb.weight"][y]

    def apply(prefix, spec, h):
        kind = spec[0]
        if kind == "conv":
            return F.conv2d(h, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], padding=1)
        if kind == "res":
            return reference_resblock(sd, prefix, h, emb, spec[3], f["use_scale_shift_norm"])
        if kind == "attn":
            return reference_attention(sd, prefix, h, spec[2], f["use_new_attention_order"])
        if kind == "down":
            return F.conv2d(h, sd[f"{prefix}.op.weight"], sd[f"{prefix}.op.bias"], stride=2, padding=1)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        return F.conv2d(h, sd[f"{prefix}.conv.weight"], sd[f"{prefix}.conv.bias"], padding=1)

    inputs, middle, outputs = their_layers(f)
    h, skips = x, []
    for i, block in enumerate(inputs):
        for j, spec in enumerate(block):
            h = apply(f"input_blocks.{i}.{j}", spec, h)
        skips.append(h)
    for j, spec in enumerate(middle):
        h = apply(f"middle_block.{j}", spec, h)
    for i, block in enumerate(outputs):
        h = torch.cat([h, skips.pop()], dim=1)
        for j, spec in enumerate(block):
            h = apply(f"output_blocks.{i}.{j}", spec, h)
    h = F.silu(group_norm(h, sd, "out.0"))
    return F.conv2d(h, sd["out.2.weight"], sd["out.2.bias"], padding=1)


def random_state_dict(f, seed=0):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in their_shapes(f).items():
        if name.startswith("label_emb"):
            state[name] = torch.randn(shape, generator=generator)
        else:  # scaled so that activations stay O(1) through the depth
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            state[name] = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
            if name.endswith(("norm.weight", "in_layers.0.weight", "out_layers.0.weight", "out.0.weight")):
                state[name] = 1 + 0.1 * torch.randn(shape, generator=generator)
    return state


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny models gain nothing from more, and on a shared machine threads that
    wait for each other cost many times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flags(string: str, **codebase) -> dict:
    model_flags, diffusion_flags = parse_openai_flags(string, **codebase)
    return {**model_flags, **diffusion_flags}


# Tiny versions of each structure (32 channels: their GroupNorm has 32 groups).
TINY_GUIDED = (  # ADM: resampling ResBlocks, heads by channels, new QKV order, AdaGN, classes, learned sigma
    "--image_size 16 --num_channels 32 --channel_mult 1,2 --num_res_blocks 1 --attention_resolutions 16,8 "
    "--num_head_channels 16 --resblock_updown True --use_new_attention_order True --class_cond True "
    "--learn_sigma True --use_scale_shift_norm True --use_fp16 True"
)
TINY_IMPROVED = (  # improved-diffusion: conv resamplers, 2 heads in the legacy order, t * 1000 / 4000
    "--image_size 16 --num_channels 32 --channel_mult 1,1 --num_res_blocks 1 --num_heads 2 "
    "--learn_sigma True --diffusion_steps 4000 --noise_schedule cosine --rescale_timesteps True"
)
TINY_ADD = (  # no scale-shift (the LSUN bedroom model), legacy order with another head count upward
    "--image_size 16 --num_channels 32 --channel_mult 1,2 --num_res_blocks 1 --attention_resolutions 8 "
    "--num_heads 2 --num_heads_upsample 4 --use_scale_shift_norm False --resblock_updown True"
)


# --- every README checkpoint: names and shapes ------------------------------------------------------------


@pytest.mark.parametrize("name", [*GUIDED, *IMPROVED])
def test_every_readme_checkpoint_loads_by_names_and_shapes(name):
    string = GUIDED.get(name) or IMPROVED[name]
    f = flags(string)
    state = {k: torch.empty(shape, device="meta") for k, shape in their_shapes(f).items()}
    model = unet_from_openai(state, **parse_openai_flags(string)[0])
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s) for s in their_shapes(f).values())
    assert model.config["out_channels"] == 6 and model.null_class is None
    assert model.num_classes == (1000 if f["class_cond"] else None)
    if name == "imagenet64_cond_270M_250K":  # their README: "270M parameters" (273.0M exactly)
        assert sum(p.numel() for p in model.parameters()) / 270e6 == pytest.approx(1, abs=0.015)
    if name.startswith("512"):  # channel_mult 0.5: 128 channels first, the 256-wide time embedding kept
        assert model.config["base_channels"] == 128 and model.config["time_channels"] == 256
    # improved-diffusion's 4000-step models saw t / 4 (rescale_timesteps defaults to True there)
    assert model.config["time_scale"] == (
        0.25
        if name
        in (
            "imagenet64_uncond_100M_1500K",
            "cifar10_uncond_50M_500K",
            "imagenet64_uncond_vlb_100M_1500K",
            "cifar10_uncond_vlb_50M_500K",
        )
        else 1.0
    )


@pytest.mark.parametrize("name", list(UPSAMPLERS))
def test_the_upsamplers_are_refused_saying_why(name):
    with pytest.raises(ValueError, match=r"--large_size is not supported: the super-resolution models"):
        parse_openai_flags(UPSAMPLERS[name])


def test_improved_diffusions_upsampler_is_refused_by_its_six_input_channels():
    """Its README flags have no large_size: the 6-channel input conv tells it apart."""
    string = "--num_channels 192 --num_res_blocks 2 --learn_sigma True --class_cond True"
    f = flags(string + " --image_size 256")
    state = {k: torch.empty(shape, device="meta") for k, shape in their_shapes(f).items()}
    state["input_blocks.0.0.weight"] = torch.empty(192, 6, 3, 3, device="meta")
    with pytest.raises(ValueError, match=r"a super-resolution model .*6 input channels.* not supported"):
        unet_from_openai(state, **parse_openai_flags(string + " --image_size 256")[0])


def test_a_state_dict_that_does_not_fit_names_the_first_mismatch():
    f = flags(TINY_GUIDED)
    state = random_state_dict(f)
    with pytest.raises(
        ValueError,
        match=r"does not fit the model flags: time_embed\.0\.weight: file \(128, 32\) vs flags \(256, 64\) "
        r"\(\d+ mismatching tensors\); pass the MODEL_FLAGS",
    ):
        unet_from_openai(
            state, **parse_openai_flags(TINY_GUIDED.replace("--num_channels 32", "--num_channels 64"))[0]
        )
    del state["out.2.bias"]
    with pytest.raises(ValueError, match=r"out\.2\.bias: missing \(1 mismatching tensors\)"):
        unet_from_openai(state, **parse_openai_flags(TINY_GUIDED)[0])


# --- tiny models: numbers against their equations ---------------------------------------------------------


@pytest.mark.parametrize("string", [TINY_GUIDED, TINY_IMPROVED, TINY_ADD], ids=["guided", "improved", "add"])
def test_a_tiny_model_computes_their_function(string, tmp_path):
    f = flags(string)
    state = random_state_dict(f)
    torch.save(state, tmp_path / "model.pt")
    model = unet_from_openai(tmp_path / "model.pt", **parse_openai_flags(string)[0]).eval()
    size = f["image_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, f["diffusion_steps"] - 1])
    y = torch.tensor([7, 999]) if f["class_cond"] else None
    with torch.no_grad():
        expected = reference_forward(state, f, x, t, y)
        got = model(x, t, y)
    assert got.shape == expected.shape == (2, 6 if f["learn_sigma"] else 3, size, size)
    assert expected.abs().mean() > 0.1  # a non-trivial function
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_the_512_layout_halves_the_first_level_and_keeps_the_time_width():
    """channel_mult (0.5, 1, 2) of 64 channels: levels of 32, 64, 128 and a 64-wide sinusoid."""
    string = (
        "--image_size 16 --num_channels 64 --num_res_blocks 1 --attention_resolutions 4 --learn_sigma False"
    )
    model_flags = {**parse_openai_flags(string)[0], "channel_mult": [0.5, 1, 2]}
    f = {**flags(string), "channel_mult": (0.5, 1, 2)}
    state = random_state_dict(f, seed=3)
    model = unet_from_openai(state, **model_flags).eval()
    assert model.config["base_channels"] == 32 and model.config["channel_mult"] == [1, 2, 4]
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, torch.tensor([500])),
            reference_forward(state, f, x, torch.tensor([500])),
            atol=1e-4,
            rtol=1e-4,
        )


@pytest.mark.parametrize("new_order", [False, True])
def test_both_qkv_orders_become_our_projections(new_order):
    """One attention block: our AttentionBlock with their qkv split in their order equals their attention;
    read in the other order the same weights give another function (so the test can fail)."""
    channels, heads = 64, 4
    generator = torch.Generator().manual_seed(0)
    sd = {
        "a.norm.weight": 1 + 0.1 * torch.randn(channels, generator=generator),
        "a.norm.bias": torch.randn(channels, generator=generator),
        "a.qkv.weight": torch.randn(3 * channels, channels, 1, generator=generator) / 8,
        "a.qkv.bias": torch.randn(3 * channels, generator=generator),
        "a.proj_out.weight": torch.randn(channels, channels, 1, generator=generator) / 8,
        "a.proj_out.bias": torch.randn(channels, generator=generator),
    }
    string = (
        f"--image_size 8 --num_channels {channels} --channel_mult 1 --num_res_blocks 1 "
        f"--attention_resolutions 8 --num_heads {heads} --use_new_attention_order {new_order}"
    )
    state = random_state_dict(flags(string))
    for name, value in sd.items():  # the middle block's attention
        state[name.replace("a.", "middle_block.1.")] = value
    model = unet_from_openai(state, **parse_openai_flags(string)[0])
    block = model.mid_block.attentions[0]
    assert isinstance(block, AttentionBlock) and block.heads == heads
    x = torch.randn(2, channels, 4, 4, generator=generator)
    with torch.no_grad():
        ours = block(x)
        torch.testing.assert_close(
            ours, reference_attention(sd, "a", x, heads, new_order), atol=1e-5, rtol=1e-5
        )
        other = reference_attention(sd, "a", x, heads, not new_order)
    assert (ours - other).abs().max() > 1e-2


@pytest.mark.parametrize("resample", ["down", "up"])
@pytest.mark.parametrize("time_injection", ["scale_shift", "add"])
def test_a_resampling_resblock_is_their_resblock(resample, time_injection):
    """Our ResBlock(resample=...) with their tensors equals their ResBlock(up/down=True): the branch resampled
    after its first SiLU, the shortcut resampled too; AdaGN or the added embedding."""
    channels, emb_channels = 32, 16
    block = ResBlock(channels, channels, emb_channels, time_injection, 0.0, 32, 1e-5, resample=resample)
    generator = torch.Generator().manual_seed(4)
    for parameter in block.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator) * 0.3
    names = {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
    }
    sd = {}
    for name, value in block.state_dict().items():
        layer, kind = name.split(".")
        sd[f"r.{names[layer]}.{kind}"] = value
    x = torch.randn(2, channels, 8, 8, generator=generator)
    emb = torch.randn(2, emb_channels, generator=generator)
    with torch.no_grad():
        ours = block(x, F.silu(emb))  # our UNet applies the embedding's SiLU once, before every block
        theirs = reference_resblock(sd, "r", x, emb, resample, time_injection == "scale_shift")
    side = 4 if resample == "down" else 16
    assert ours.shape == (2, channels, side, side)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_the_timestep_embedding_is_cos_then_sin_with_their_frequencies():
    t = torch.tensor([0.0, 1.0, 250.0, 999.0])
    dim = 8
    ours = sinusoidal_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0.0)
    for i in range(dim // 2):
        freq = 10000 ** (-i / (dim // 2))
        torch.testing.assert_close(ours[:, i], torch.cos(t * freq))
        torch.testing.assert_close(ours[:, dim // 2 + i], torch.sin(t * freq))


# --- flags ------------------------------------------------------------------------------------------------


def test_flags_parse_with_each_codebases_defaults():
    model_flags, diffusion_flags = parse_openai_flags(IMPROVED["cifar10_uncond_50M_500K"])
    assert model_flags["num_heads"] == 4 and model_flags["attention_resolutions"] == "16,8"
    assert model_flags["dropout"] == 0.3 and model_flags["learn_sigma"] is True
    assert diffusion_flags["rescale_timesteps"] is True and diffusion_flags["diffusion_steps"] == 4000
    model_flags, diffusion_flags = parse_openai_flags(GUIDED["64x64_diffusion"])
    assert diffusion_flags["rescale_timesteps"] is False and model_flags["num_head_channels"] == 64
    assert model_flags["use_new_attention_order"] is True
    _, forced = parse_openai_flags("--image_size 64", codebase="guided-diffusion")
    assert forced["rescale_timesteps"] is False
    # a repeated flag: the last wins, as with argparse; --name=value works too
    assert parse_openai_flags("--dropout 0.1 --dropout=0.2")[0]["dropout"] == 0.2


@pytest.mark.parametrize(
    ("string", "message"),
    [
        ("--batch_size 4", r"unknown OpenAI flag --batch_size: pass their MODEL_FLAGS and DIFFUSION_FLAGS"),
        ("--use_ddim True", r"unknown OpenAI flag --use_ddim: .*sample\.py's own options"),
        ("--class_cond maybe", r"--class_cond maybe: expected a boolean"),
        ("--num_channels", r"--num_channels has no value"),
        ("image_size 64", r"expected --name value, got 'image_size'"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(string, message):
    with pytest.raises(ValueError, match=message):
        parse_openai_flags(string)


def test_unmappable_model_flags_are_refused_naming_the_flag():
    with pytest.raises(ValueError, match=r"image_size=48 has no default channel_mult .*; pass channel_mult"):
        unet_kwargs_from_openai(**parse_openai_flags("--image_size 48")[0])
    with pytest.raises(ValueError, match=r"level channels \[128, 192\] are not all multiples of the first"):
        unet_kwargs_from_openai(image_size=16, num_channels=64, channel_mult="2,3")
    with pytest.raises(ValueError, match=r"unknown OpenAI flag --num_head"):
        unet_kwargs_from_openai(image_size=64, num_head=2)
    with pytest.raises(ValueError, match=r"diffusion_steps=4000: pass rescale_timesteps"):
        unet_kwargs_from_openai(image_size=64, diffusion_steps=4000)
    assert (
        unet_kwargs_from_openai(image_size=64, diffusion_steps=4000, rescale_timesteps=True)["time_scale"]
        == 0.25
    )


# --- the schedule -----------------------------------------------------------------------------------------


def test_their_schedules_become_ours():
    # linear, scaled by 1000 / T to keep its shape (their get_named_beta_schedule)
    linear = scheduler_kwargs_from_openai(diffusion_steps=4000, noise_schedule="linear")
    assert linear["beta_start"] == pytest.approx(2.5e-5) and linear["beta_end"] == pytest.approx(0.005)
    kwargs = scheduler_kwargs_from_openai(
        diffusion_steps=4000,
        noise_schedule="cosine",
        learn_sigma=True,
        predict_xstart=True,
        timestep_respacing="250",
    )
    assert kwargs == {
        "num_train_timesteps": 4000,
        "beta_schedule": "cosine",
        "prediction_type": "sample",
        "variance_type": "learned_range",
        "clip_sample": True,
        "timestep_spacing": "linspace",
    }
    assert (
        scheduler_kwargs_from_openai()["variance_type"] == "fixed_large"
    )  # their default, sigma_small False
    assert scheduler_kwargs_from_openai(sigma_small=True)["variance_type"] == "fixed_small"
    assert scheduler_kwargs_from_openai(timestep_respacing="ddim25")["timestep_spacing"] == "leading"
    with pytest.raises(ValueError, match=r"timestep_respacing='10,20' is not supported"):
        scheduler_kwargs_from_openai(timestep_respacing="10,20")
    with pytest.raises(ValueError, match=r"noise_schedule='sqrt' is not one of their schedules"):
        scheduler_kwargs_from_openai(noise_schedule="sqrt")
    # the betas, against their formulas: linear, and cosine alpha_bar(t) = cos^2((t/T + s)/(1 + s) pi/2)
    # as 1 - alpha_bar((i+1)/T) / alpha_bar(i/T) capped at 0.999
    ours = {k: v for k, v in linear.items() if k != "variance_type"}
    torch.testing.assert_close(
        NoiseScheduler(**ours).betas, torch.linspace(2.5e-5, 0.005, 4000, dtype=torch.float64)
    )
    cosine = {k: v for k, v in kwargs.items() if k != "variance_type"}

    def alpha_bar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = [min(1 - alpha_bar((i + 1) / 4000) / alpha_bar(i / 4000), 0.999) for i in range(4000)]
    torch.testing.assert_close(NoiseScheduler(**cosine).betas, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("count", [25, 50, 100, 250, 1000])
def test_their_respacing_picks_the_timesteps_of_our_spacing(count):
    """Their "N": round(i * (T - 1) / (N - 1)) summed as a running float; "ddimN": every (T // N)-th step."""
    T = 1000
    stride, cursor, theirs = (T - 1) / (count - 1), 0.0, []
    for _ in range(count):
        theirs.append(round(cursor))
        cursor += stride
    spaced = NoiseScheduler(
        num_train_timesteps=T,
        timestep_spacing=scheduler_kwargs_from_openai(timestep_respacing=str(count))["timestep_spacing"],
    )
    assert spaced.inference_timesteps(count).tolist() == sorted(theirs, reverse=True)
    ddim = NoiseScheduler(
        num_train_timesteps=T,
        timestep_spacing=scheduler_kwargs_from_openai(timestep_respacing=f"ddim{count}")["timestep_spacing"],
    )
    assert ddim.inference_timesteps(count).tolist() == sorted(range(0, T, T // count), reverse=True)


@needs_variance_type
def test_scheduler_from_openai_builds_the_noise_scheduler():
    scheduler = scheduler_from_openai(**parse_openai_flags(GUIDED["64x64_diffusion"])[1])
    assert (
        scheduler.config["variance_type"] == "learned_range" and scheduler.config["beta_schedule"] == "cosine"
    )


# --- sampling -----------------------------------------------------------------------------------------------


def test_a_model_without_a_null_label_refuses_guidance_and_the_null_label(tmp_path):
    f = flags(TINY_GUIDED.replace("--learn_sigma True", "--learn_sigma False"))
    model = unet_from_openai(
        random_state_dict(f),
        **parse_openai_flags(TINY_GUIDED.replace("--learn_sigma True", "--learn_sigma False"))[0],
    ).eval()
    assert model.class_embedding.num_embeddings == 1000 and model.null_class is None
    scheduler = NoiseScheduler()
    with pytest.raises(ValueError, match=r"--guidance-scale 3 needs a null label.*fine-tun"):
        generate(model, scheduler, 1, image_shape=(3, 16, 16), steps=2, guidance_scale=3.0)
    with pytest.raises(ValueError, match=r"guidance_scale=3.0 needs a null label.*fine-tun"):
        sample(model, scheduler, (1, 3, 16, 16), steps=2, y=torch.tensor([1]), guidance_scale=3.0)
    with pytest.raises(
        ValueError,
        match=r"labels must lie in \[0, num_classes - 1\] = \[0, 999\] \(the model has no null label\)",
    ):
        sample(model, scheduler, (1, 3, 16, 16), steps=2, y=torch.tensor([1000]))
    with pytest.raises(ValueError, match=r"pass y; it has no null label \(null_label=False\)"):
        model(torch.zeros(1, 3, 16, 16), 5)
    images = generate(model, scheduler, 2, image_shape=(3, 16, 16), steps=2)  # labels 0, 1
    assert images.shape == (2, 3, 16, 16) and images.isfinite().all()


def test_a_pickle_that_is_not_a_plain_state_dict_is_refused(tmp_path):
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")
    with pytest.raises(ValueError, match=r"module\.pt is not a plain state dict of tensors"):
        unet_from_openai(tmp_path / "module.pt")


def test_sampling_an_openai_file_needs_its_flags(tmp_path):
    torch.save(random_state_dict(flags(TINY_ADD)), tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match=r"tiny\.pt is an OpenAI checkpoint file: pass --openai-flags"):
        load_for_sampling(tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match=r"^--openai-flags: unknown OpenAI flag --bogus"):
        load_for_sampling(tmp_path / "tiny.pt", openai_flags=TINY_ADD + " --bogus 1")
    with pytest.raises(CheckpointError, match=r"missing\.pt: no such file"):
        load_for_sampling(tmp_path / "missing.pt", openai_flags=TINY_ADD)


@needs_variance_type
def test_sample_py_samples_an_openai_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.save(random_state_dict(flags(TINY_ADD)), tmp_path / "tiny.pt")
    loaded = load_for_sampling(tmp_path / "tiny.pt", openai_flags=TINY_ADD)
    assert loaded.weights == "openai" and loaded.scheduler.config["variance_type"] == "fixed_large"
    with pytest.raises(CheckpointError, match=r"cannot load \S+tiny\.pt: \S+tiny\.pt does not fit the model"):
        load_for_sampling(tmp_path / "tiny.pt", openai_flags=TINY_ADD.replace("--num_res_blocks 1", ""))
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(
        [
            "--checkpoint",
            str(tmp_path / "tiny.pt"),
            "--openai-flags",
            TINY_ADD,
            "--n",
            "2",
            "--sampler",
            "ddim",
            "--steps",
            "2",
        ]
    )
    grid = Path(capsys.readouterr().out.strip())
    assert grid == tmp_path / "samples" / "sample-tiny.pt-openai-ddim2-seed0-n2.png" and grid.is_file()
    assert grid_from_checkpoint(
        tmp_path / "tiny.pt",
        1,
        default_config=ROOT / "configs" / "digits.yaml",
        steps=1,
        openai_flags=TINY_ADD,
    ).is_file()
