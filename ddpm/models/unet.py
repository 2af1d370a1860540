"""The denoising U-Net of DDPM (Ho et al. 2020, appendix B) with the improvements of improved-diffusion.

Block structure (the same as diffusers' `UNet2DModel`, so that its DDPM weights load by renaming tensors,
see `ddpm.interop.diffusers`):

    conv_in 3x3
    down path, per level: num_res_blocks x (ResBlock [+ AttentionBlock]), then a stride-2 downsample
        (not on the last level); every block's output is kept as a skip
    middle: ResBlock, AttentionBlock, ResBlock
    up path, per level: (num_res_blocks + 1) x (ResBlock on [h, skip] [+ AttentionBlock]), then a
        nearest-x2 upsample + 3x3 conv (not on the last level)
    head: GroupNorm, SiLU, conv
With `resblock_updown` each resampler is a ResBlock that resamples inside (BigGAN's up/down blocks, as
guided-diffusion's ADM uses them, Dhariwal & Nichol 2021, section 3), see `ddpm.interop.openai`.

Conditioning: emb = MLP(sinusoid(t)) + label_embedding(y) [+ vector_embedding(v)], handed to every
ResBlock. The conditions travel as one `ddpm.conditions.Conditions` (a label tensor y is the conditions of
labels alone); each kind the network is built for has a learned null, used for the rows the Conditions marks
dropped (classifier-free guidance's unconditional half, `cond.null()`):
    label   (num_classes):   a row of the label embedding, id `null_class` = num_classes;
    image   (cond_channels): concatenated with x at the input, after a flag channel (1: an image, 0: dropped,
                             the image then zeros), so conv_in takes in_channels + cond_channels + 1;
    vector  (cond_dim):      Linear, SiLU, Linear into the embedding, a learned embedding where dropped;
    context (context_dim):   read by cross-attention in every attention block (the attention_resolutions'
                             levels and the middle) after their self-attention; a learned null token is
                             always the first key, and a dropped row sees it alone.
With `time_conditioning=False` there is no embedding at all and the network is a segmentation U-Net (the seed
write-up's plain one, exactly, is `ddpm.models.classic.ClassicUNet`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ddpm.conditions import Conditions, as_conditions
from ddpm.models.hub_model import HubModel

TIME_INJECTIONS = ("scale_shift", "add")
DOWNSAMPLES = ("conv", "conv_asymmetric", "maxpool")
# What a network built with time_conditioning=False is, for the errors of everything that needs a timestep.
TIME_FREE = (
    "has time_conditioning=False: it is a segmentation network, called as model(x) with no timestep, "
    "not a diffusion model (build it with time_conditioning=True for that)"
)
# The constructor argument that builds each kind of condition into a network (None: not built).
CONDITION_ARGUMENTS = {
    "label": "num_classes",
    "image": "cond_channels",
    "vector": "cond_dim",
    "context": "context_dim",
}


class UNet(nn.Module, HubModel):
    """Predicts noise (or x0, or v) from a noisy image x_t, a timestep t and optional conditions: a class
    label, an image, a vector and a token sequence (see the module's docstring).

    `config` holds the constructor's keyword arguments (JSON-able) and is saved beside the weights in a model
    folder: `UNet.from_pretrained(folder_or_repo_id)`, `model.save_pretrained(folder)` and
    `model.push_to_hub(repo_id)` (`ddpm.models.hub_model`). With `num_classes`, the label embedding has
    num_classes + 1 rows: id `null_class` (= num_classes) is the "no label" used for classifier-free guidance
    (Ho & Salimans 2022). With `null_label=False` it has exactly num_classes rows and `null_class` is None
    (OpenAI's class-conditional models): such a model has no unconditional output, so guidance needs
    fine-tuning with a null label first.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,  # channels of x
        out_channels: int = 3,  # channels of the prediction
        base_channels: int = 128,  # channels of the first level; the time embedding has 4x as many
        channel_mult: Sequence[int] = (1, 2, 2, 2),  # level i has base_channels * channel_mult[i] channels
        num_res_blocks: int = 2,  # residual blocks per level on the down path (one more on the up path)
        attention_resolutions: Sequence[int] = (16,),  # feature-map sides that get attention (see image_size)
        image_size: int = 32,  # input side that attention_resolutions refer to; other sizes are accepted
        num_heads: int = 1,  # attention heads, unless head_channels is given
        head_channels: int | None = None,  # channels per attention head (heads = channels // head_channels)
        num_heads_upsample: int | None = None,  # heads on the up path (None: num_heads), unless head_channels
        mid_attention: bool = True,  # attention between the two residual blocks of the middle
        dropout: float = 0.0,  # dropout probability inside each residual block
        norm_groups: int = 32,  # GroupNorm groups; every channel count must be divisible by it
        norm_eps: float = 1e-5,  # GroupNorm epsilon
        time_conditioning: bool = True,  # False: no t, no embedding (a plain segmentation U-Net)
        time_injection: str = "scale_shift",  # "scale_shift": norm(h) * (1 + s) + b; "add": h + proj(emb)
        time_flip_sin_to_cos: bool = False,  # sinusoid order [cos, sin] instead of [sin, cos]
        time_freq_shift: float = 0.0,  # frequency denominator is (half - shift); see sinusoidal_embedding
        time_channels: int
        | None = None,  # sinusoid width (None: base_channels); the embedding has 4x as many
        time_scale: float = 1.0,  # the network embeds t * time_scale (improved-diffusion: 1000 / T)
        num_classes: int | None = None,  # class-conditional with labels 0..num_classes-1 (+ the null label)
        null_label: bool = True,  # with num_classes: a label-embedding row for "no label" (for guidance)
        cond_channels: int | None = None,  # channels of an image condition concatenated with x (at x's side)
        cond_dim: int | None = None,  # width of a vector condition projected into the time embedding
        context_dim: int | None = None,  # width of the tokens of a sequence read by cross-attention
        downsample: str = "conv",  # "conv": stride-2 3x3 conv; "conv_asymmetric": PadAfterConv2d; "maxpool"
        resblock_updown: bool = False,  # resample with ResBlocks (avg-pool / nearest inside), not downsample
        head_kernel_size: int = 3,  # kernel side of the output conv (odd)
        gradient_checkpointing: bool = False,  # recompute each block in the backward pass to save memory
    ) -> None:
        # The config is exactly the constructor's keyword arguments, so it is read from the frame once.
        config = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        super().__init__()
        self.config = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in config.items()}
        _check_config(self.config)
        levels = len(channel_mult)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_classes = num_classes
        # Label id num_classes means "no label": training drops labels to it, guidance samples with it.
        self.null_class = num_classes if null_label else None
        self.cond_channels, self.cond_dim, self.context_dim = cond_channels, cond_dim, context_dim
        self.time_conditioning = time_conditioning
        self.gradient_checkpointing = gradient_checkpointing

        time_channels = time_channels or base_channels
        emb_channels = 4 * time_channels if time_conditioning else None
        self.time_embedding = (
            TimestepEmbedding(
                time_channels, emb_channels, time_flip_sin_to_cos, time_freq_shift, scale=time_scale
            )
            if time_conditioning
            else None
        )
        self.class_embedding = (
            nn.Embedding(num_classes + int(null_label), emb_channels) if num_classes is not None else None
        )

        def res(cin: int, cout: int, resample: str | None = None) -> ResBlock:
            return ResBlock(
                cin, cout, emb_channels, time_injection, dropout, norm_groups, norm_eps, resample=resample
            )

        def attn(channels: int, heads: int = num_heads) -> AttentionBlock:
            heads = channels // head_channels if head_channels is not None else heads
            return AttentionBlock(channels, heads, norm_groups, norm_eps, context_dim=context_dim)

        channels = base_channels * channel_mult[0]
        # An image condition comes after x, with its flag channel (see _input)
        image_channels = cond_channels + 1 if cond_channels is not None else 0
        self.conv_in = nn.Conv2d(in_channels + image_channels, channels, 3, padding=1)
        skip_channels = [channels]
        self.down_blocks = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            out = base_channels * mult
            with_attention = image_size // 2**level in attention_resolutions
            block = Level()
            for _ in range(num_res_blocks):
                block.resnets.append(res(channels, out))
                channels = out
                if with_attention:
                    block.attentions.append(attn(channels))
                skip_channels.append(channels)
            if level < levels - 1:
                block.resample = (
                    res(channels, channels, "down") if resblock_updown else _downsampler(downsample, channels)
                )
                skip_channels.append(channels)
            self.down_blocks.append(block)

        self.mid_block = Level()
        self.mid_block.resnets.extend([res(channels, channels), res(channels, channels)])
        if mid_attention:
            self.mid_block.attentions.append(attn(channels))

        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            out = base_channels * mult
            with_attention = image_size // 2**level in attention_resolutions
            block = Level()
            for _ in range(num_res_blocks + 1):
                block.resnets.append(res(channels + skip_channels.pop(), out))
                channels = out
                if with_attention:
                    block.attentions.append(attn(channels, num_heads_upsample or num_heads))
            if level > 0:
                block.resample = res(channels, channels, "up") if resblock_updown else Upsample(channels)
            self.up_blocks.append(block)

        self.conv_norm_out = nn.GroupNorm(norm_groups, channels, norm_eps)
        self.conv_out = nn.Conv2d(channels, out_channels, head_kernel_size, padding=head_kernel_size // 2)
        # Built last and only when asked for, so that a network without them is the same, bit for bit
        self.vector_embedding = VectorEmbedding(cond_dim, emb_channels) if cond_dim is not None else None
        self.context_tokens = ContextTokens(context_dim) if context_dim is not None else None

        # Zero-init: every residual branch starts as the identity and the network outputs zero
        # (improved-diffusion; DiT does the same for its modulation and output layers).
        for module in self.modules():
            if isinstance(module, ResBlock):
                _zero(module.conv2)
            elif isinstance(module, AttentionBlock):
                _zero(module.to_out)
                if module.cross_out is not None:
                    _zero(module.cross_out)
        _zero(self.conv_out)

    def forward(
        self, x: Tensor, t: Tensor | float | int | None = None, y: Conditions | Tensor | None = None
    ) -> Tensor:
        """x: (N, in_channels, H, W); t: (N,) or scalar timestep, int or float; y: the conditions, a
        `Conditions` holding each kind the network is built for (`ddpm.conditions` gives their shapes), or
        (N,) long labels alone, the same as `Conditions.from_labels(y)`. Labels lie in [0, num_classes]
        (num_classes = `null_class`, no label; [0, num_classes - 1] with null_label=False). Rows a Conditions
        marks dropped get the learned null of that kind. Returns (N, out_channels, H, W)."""
        cond = as_conditions(y)
        emb = conditioning(self, x, t, cond, len(self.down_blocks))  # (N, 4 * base_channels) or None
        if self.vector_embedding is not None:
            emb = emb + self.vector_embedding(cond["vector"], cond.is_dropped("vector"))
        if emb is not None:
            emb = F.silu(emb)  # every block's time projection starts with SiLU: apply it once here
        context = (  # the attention blocks' extra arguments: () or (tokens (N, 1 + L, D), keep (N, 1 + L))
            self.context_tokens(cond["context"], cond.get("context_mask"), cond.is_dropped("context"))
            if self.context_tokens is not None
            else ()
        )

        h = self.conv_in(self._input(x, cond))  # (N, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                h = self._run(resnet, h, emb)
                if block.attentions:
                    h = self._run(block.attentions[i], h, *context)
                skips.append(h)
            if block.resample is not None:
                h = self._resample(block.resample, h, emb)  # (N, C, H, W) -> (N, C, H/2, W/2)
                skips.append(h)

        h = self._run(self.mid_block.resnets[0], h, emb)
        if self.mid_block.attentions:
            h = self._run(self.mid_block.attentions[0], h, *context)
        h = self._run(self.mid_block.resnets[1], h, emb)

        for block in self.up_blocks:
            for i, resnet in enumerate(block.resnets):
                h = self._run(resnet, torch.cat([h, skips.pop()], dim=1), emb)  # (N, C + C_skip, H, W)
                if block.attentions:
                    h = self._run(block.attentions[i], h, *context)
            if block.resample is not None:
                h = self._resample(block.resample, h, emb)  # (N, C, H, W) -> (N, C, 2H, 2W)

        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (N, out_channels, H, W)

    def _input(self, x: Tensor, cond: Conditions) -> Tensor:
        """x, or with an image condition (N, C, H, W) -> (N, C + cond_channels + 1, H, W): [x, image, flag],
        flag 1 where the row has its image and 0 where it is dropped, its image then zeros. A flag rather than
        a learned null image: it fits any input side, tells a dropped image from an all-zero one (an empty
        mask), and keeps the layout of a plain wider input conv (diffusers' UNet2DModel in_channels)."""
        if self.cond_channels is None:
            return x
        return image_condition_input(x, cond["image"], cond.is_dropped("image"))

    def _run(self, block: nn.Module, *args: Tensor | None) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _resample(self, resample: nn.Module, h: Tensor, emb: Tensor | None) -> Tensor:
        # A resampling ResBlock (resblock_updown) takes the embedding like every other ResBlock.
        return self._run(resample, h, emb) if isinstance(resample, ResBlock) else resample(h)


def image_condition_input(x: Tensor, image: Tensor, dropped: Tensor) -> Tensor:
    """The input conv_in of an image-conditioned UNet reads: x (N, C, H, W), image (N, cond_channels, H, W)
    and dropped (N,) bool -> (N, C + cond_channels + 1, H, W) = [x, image, flag], the flag channel 1 where
    the row has its image and 0 where it is dropped (its image then zeros). It is also the `sample` of the
    diffusers UNet2DModel that `ddpm.interop.diffusers` exports such a model to."""
    kept = ~dropped[:, None, None, None]  # (N, 1, 1, 1)
    image = torch.where(kept, image.to(x.dtype), 0.0)  # (N, cond_channels, H, W)
    flag = kept.to(x.dtype).expand(-1, 1, *x.shape[2:])  # (N, 1, H, W)
    return torch.cat([x, image, flag], dim=1)


def conditioning(
    net: nn.Module,
    x: Tensor,
    t: Tensor | float | int | None,
    y: Conditions | Tensor | None,
    levels: int,
) -> Tensor | None:
    """Checks a U-Net's inputs and returns emb = MLP(sinusoid(t)) + label_embedding(y), (N, E), or None for a
    time-free network. `net` (UNet or ClassicUNet) has in_channels, time_conditioning, time_embedding,
    class_embedding, num_classes and null_class, and (UNet) the arguments of CONDITION_ARGUMENTS; `levels`
    is its number of resolutions. y: a Conditions or (N,) labels (`as_conditions`), checked against what
    the network is built for (`check_conditions`); dropped labels become `null_class`."""
    cond = as_conditions(y)
    name = type(net).__name__
    if x.ndim != 4:
        raise ValueError(f"x must be a 4-D tensor (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, height, width = x.shape
    if c != net.in_channels:
        raise ValueError(
            f"x must have in_channels={net.in_channels} channels, got {c} (shape {tuple(x.shape)})"
        )
    fix = f"got {height}x{width}; resize or pad the input"
    check_divisible("height and width", (height, width), levels, fix)
    if not net.time_conditioning:
        if t is not None:
            raise ValueError(f"this {name} {TIME_FREE}")
        check_conditions(net, cond, x)
        return None

    if t is None:
        raise ValueError(f"this {name} is time-conditioned: pass the timestep t, a scalar or an (N,) tensor")
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"t must be a scalar or have shape (N,) = ({n},), got shape {tuple(t.shape)}")
    emb = net.time_embedding(t)
    check_conditions(net, cond, x)
    if net.class_embedding is None:
        return emb
    y = cond["label"]
    if "label" in cond.dropped:  # a dict lookup, not a value read: no host sync
        y = torch.where(cond.dropped["label"], net.null_class, y)
    # The range of y is not checked here: that would read a device value (a host sync) on every call.
    # It is checked where labels enter: the data set against num_classes, and the sampling entry.
    return emb + net.class_embedding(y)


def check_conditions(net: nn.Module, cond: Conditions, x: Tensor) -> None:
    """ValueError, saying what to pass, unless `cond` holds exactly the kinds of condition `net` is built for
    (CONDITION_ARGUMENTS: an argument not None, read from net's attributes) with their shapes for x
    (N, C, H, W): "label" (N,) long, "image" (N, cond_channels, H, W), "vector" (N, cond_dim), "context"
    (N, L, context_dim) and "context_mask" (N, L) bool; labels can be dropped only with a null label. Reads
    shapes and dtypes only, no tensor value."""
    name = type(net).__name__
    n, _, height, width = x.shape
    built = {kind: getattr(net, arg, None) for kind, arg in CONDITION_ARGUMENTS.items()}
    for kind in cond.kinds:
        if built[kind] is None and kind == "label":
            raise ValueError(f"this {name} has no class embedding (num_classes=None): call it without y")
        if built[kind] is None:
            raise ValueError(
                f"this {name} takes no {kind} condition ({CONDITION_ARGUMENTS[kind]}=None): leave "
                f"'{kind}' out of the conditions, or build the network with {CONDITION_ARGUMENTS[kind]}"
            )
    expected = {
        "label": (n,),
        "image": (n, built["image"], height, width),
        "vector": (n, built["vector"]),
        "context": (n, "L", built["context"]),
    }
    for kind, size in built.items():
        if size is None:
            continue
        shape = "(" + ", ".join(map(str, expected[kind])) + ")"
        if kind not in cond and kind == "label":
            unconditional = (
                f"for unconditional outputs pass y = torch.full((N,), model.null_class) (null_class = "
                f"{net.null_class})"
                if net.null_class is not None
                else "it has no null label (null_label=False), so no unconditional output"
            )
            raise ValueError(
                f"this {name} is class-conditional (num_classes={net.num_classes}): pass y; {unconditional}"
            )
        if kind not in cond:
            raise ValueError(
                f"this {name} is built for {kind} conditions ({CONDITION_ARGUMENTS[kind]}={size}): pass "
                f"Conditions holding '{kind}' of shape {shape}; for its learned null, mark the rows dropped "
                "(cond.null(), Conditions.drop)"
            )
        value = cond[kind]
        got = tuple(value.shape)
        if kind == "label":
            if got != (n,) or value.dtype not in (torch.long, torch.int):
                raise ValueError(f"y must be a long tensor of shape ({n},), got {value.dtype} of shape {got}")
            if "label" in cond.dropped and net.null_class is None:
                raise ValueError(
                    f"this {name} has no null label (null_label=False): its labels cannot be dropped"
                )
            continue
        matches = len(got) == len(expected[kind]) and all(
            e == "L" and g > 0 or g == e for g, e in zip(got, expected[kind], strict=True)
        )
        if not matches or not value.is_floating_point():
            raise ValueError(
                f"the {kind} condition must be a float tensor of shape {shape}, got {value.dtype} of "
                f"shape {got}"
            )
    mask = cond.get("context_mask")
    if mask is not None and (
        mask.dtype != torch.bool or tuple(mask.shape) != tuple(cond["context"].shape[:2])
    ):
        raise ValueError(
            f"context_mask must be a bool tensor of shape (N, L) = {tuple(cond['context'].shape[:2])} (True: "
            f"a real token), got {mask.dtype} of shape {tuple(mask.shape)}"
        )


def sinusoidal_embedding(
    t: Tensor, dim: int, *, flip_sin_to_cos: bool = False, freq_shift: float = 0.0
) -> Tensor:
    """Transformer position encoding of timesteps (Vaswani et al. 2017, section 3.5; DDPM appendix B).

    t: (N,) int or float timesteps (continuous time works). With half = dim // 2 and i = 0..half-1,
        freq_i = exp(-ln(10000) * i / (half - freq_shift)),
        embedding = [sin(t * freq), cos(t * freq)]   ([cos, sin] when flip_sin_to_cos).
    freq_shift = 1 and flip_sin_to_cos = False reproduce the original DDPM code. Returns (N, dim) float32,
    computed in float32 whatever the autocast state.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - freq_shift)
    )
    angles = t.float()[:, None] * freqs[None]  # (N, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=1)


class TimestepEmbedding(nn.Module):
    """t (N,) -> Linear(SiLU(Linear(sinusoid(t * scale)))) (N, emb_channels)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        flip_sin_to_cos: bool,
        freq_shift: float,
        *,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.channels, self.flip_sin_to_cos, self.freq_shift = channels, flip_sin_to_cos, freq_shift
        self.scale = scale
        self.linear_1 = nn.Linear(channels, emb_channels)
        self.linear_2 = nn.Linear(emb_channels, emb_channels)

    def forward(self, t: Tensor) -> Tensor:
        # scale 1 leaves t as it is (an int t stays exact); else t * scale in float32, as improved-diffusion
        t = t if self.scale == 1.0 else t.float() * self.scale
        emb = sinusoidal_embedding(
            t, self.channels, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
        )
        return self.linear_2(F.silu(self.linear_1(emb.to(self.linear_1.weight.dtype))))


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv3x3, time injection, GroupNorm, SiLU, dropout, conv3x3, plus the shortcut.

    time_injection "add" (DDPM): h = norm2(h + proj(emb)); "scale_shift" (AdaGN, Dhariwal & Nichol 2021,
    section 3, as in improved-diffusion): h = norm2(h) * (1 + scale) + shift, [scale, shift] = proj(emb).
    resample "down" / "up" (BigGAN-style, guided-diffusion's resblock_updown): both the branch, after its
    first SiLU and before conv1, and the shortcut x go through a 2x2 average pool / a nearest x2 upsample.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int | None,
        time_injection: str,
        dropout: float,
        groups: int,
        eps: float,
        *,
        resample: str | None = None,
    ) -> None:
        super().__init__()
        self.scale_shift = time_injection == "scale_shift"
        self.resample = resample
        self.norm1 = nn.GroupNorm(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = (
            nn.Linear(emb_channels, out_channels * (2 if self.scale_shift else 1)) if emb_channels else None
        )
        self.norm2 = nn.GroupNorm(groups, out_channels, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor, emb: Tensor | None) -> Tensor:
        """x: (N, C_in, H, W); emb: (N, E), already through SiLU, or None. Returns (N, C_out, H, W), or
        (N, C_out, H/2, W/2) / (N, C_out, 2H, 2W) with resample "down" / "up"."""
        h = F.silu(self.norm1(x))
        if self.resample is not None:
            h, x = _resample(h, self.resample), _resample(x, self.resample)
        h = self.conv1(h)
        if self.time_emb_proj is None:
            h = self.norm2(h)
        elif self.scale_shift:
            scale, shift = self.time_emb_proj(emb)[:, :, None, None].chunk(2, dim=1)  # 2 x (N, C_out, 1, 1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + self.time_emb_proj(emb)[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(h)))
        return self.conv_shortcut(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection; with `context_dim`,
    then cross-attention from the positions to a token sequence (queries from the image, keys and values
    from the tokens, as in latent diffusion, Rombach et al. 2022, section 3.3), with its own residual."""

    def __init__(
        self, channels: int, heads: int, groups: int, eps: float, *, context_dim: int | None = None
    ) -> None:
        super().__init__()
        self.heads = heads
        self.group_norm = nn.GroupNorm(groups, channels, eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)
        cross = context_dim is not None
        self.cross_norm = nn.GroupNorm(groups, channels, eps) if cross else None
        self.cross_q = nn.Linear(channels, channels) if cross else None
        self.cross_k = nn.Linear(context_dim, channels) if cross else None
        self.cross_v = nn.Linear(context_dim, channels) if cross else None
        self.cross_out = nn.Linear(channels, channels) if cross else None

    def forward(self, x: Tensor, context: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        """x: (N, C, H, W) -> (N, C, H, W). With cross-attention, context: (N, L, context_dim) tokens and
        keep: (N, L) bool, False for the tokens no position may attend to (padding, dropped rows)."""
        height = x.shape[2]
        tokens = rearrange(self.group_norm(x), "n c h w -> n (h w) c")  # a view for channels_last inputs
        q, k, v = (
            rearrange(proj(tokens), "n l (heads d) -> n heads l d", heads=self.heads)
            for proj in (self.to_q, self.to_k, self.to_v)
        )
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "n heads l d -> n l (heads d)")
        x = x + rearrange(self.to_out(out), "n (h w) c -> n c h w", h=height)
        if self.cross_q is None:
            return x
        tokens = rearrange(self.cross_norm(x), "n c h w -> n (h w) c")  # (N, HW, C)
        q = rearrange(self.cross_q(tokens), "n l (heads d) -> n heads l d", heads=self.heads)
        context = context.to(self.cross_k.weight.dtype)
        k, v = (
            rearrange(proj(context), "n l (heads d) -> n heads l d", heads=self.heads)
            for proj in (self.cross_k, self.cross_v)
        )  # (N, heads, L, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # (N, heads, HW, d)
        out = rearrange(out, "n heads l d -> n l (heads d)")
        return x + rearrange(self.cross_out(out), "n (h w) c -> n c h w", h=height)


class VectorEmbedding(nn.Module):
    """A vector condition into the time embedding: v (N, D) -> Linear(SiLU(Linear(v))) (N, E) (the layout of
    diffusers' "projection" class embedding), and a learned embedding `null` for the rows dropped."""

    def __init__(self, dim: int, emb_channels: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, emb_channels)
        self.linear_2 = nn.Linear(emb_channels, emb_channels)
        self.null = nn.Parameter(torch.zeros(emb_channels))

    def forward(self, vector: Tensor, dropped: Tensor) -> Tensor:
        """vector: (N, D); dropped: (N,) bool. Returns (N, E)."""
        emb = self.linear_2(F.silu(self.linear_1(vector.to(self.linear_1.weight.dtype))))
        return torch.where(dropped[:, None], self.null.to(emb.dtype), emb)


class ContextTokens(nn.Module):
    """The keys and values the cross-attention reads: a learned null token first, then the sequence.

    Every query can attend to the null token, so a row whose tokens are all padding still has a defined
    attention (no softmax over nothing), and a dropped row attends to the null token alone: its learned null.
    Tokens that are not kept are also zeroed, so that no value of theirs (even inf or NaN) reaches the output.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, context: Tensor, mask: Tensor | None, dropped: Tensor) -> tuple[Tensor, Tensor]:
        """context: (N, L, D); mask: (N, L) bool, True for a real token, or None (all real); dropped: (N,)
        bool. Returns tokens (N, 1 + L, D) and keep (N, 1 + L) bool."""
        n, length, _ = context.shape
        keep = ~dropped[:, None].expand(n, length)  # (N, L)
        if mask is not None:
            keep = keep & mask
        context = torch.where(keep[:, :, None], context.to(self.null.dtype), 0.0)
        tokens = torch.cat([self.null.expand(n, 1, -1), context], dim=1)  # (N, 1 + L, D)
        return tokens, torch.cat([keep.new_ones(n, 1), keep], dim=1)


class PadAfterConv2d(nn.Conv2d):
    """Stride-2 3x3 conv after zero-padding the right and bottom edges by one pixel: (N, C, H, W) ->
    (N, C, H/2, W/2). This is TensorFlow's 'SAME' padding on even sides, used by the original DDPM code and
    hence by its published weights (diffusers' downsample_padding=0). The "conv" downsample pads every edge
    instead, which shifts the sampling grid by one pixel: weights trained with one do not fit the other."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (0, 1, 0, 1)))  # (N, C, H + 1, W + 1) -> (N, C, H/2, W/2)


class Level(nn.Module):
    """One resolution of the U-Net: residual blocks, their attention blocks (none, or one per residual
    block) and the resampler that leaves it (None on the last level). UNet.forward runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.resnets = nn.ModuleList()
        self.attentions = nn.ModuleList()
        self.resample: nn.Module | None = None


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: (N, C, H, W) -> (N, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _resample(x: Tensor, direction: str) -> Tensor:
    """(N, C, H, W) -> (N, C, H/2, W/2) by 2x2 average pooling ("down") or (N, C, 2H, 2W) by nearest
    neighbour ("up"): the parameter-free resamplers inside a resampling ResBlock."""
    if direction == "down":
        return F.avg_pool2d(x, 2)
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def _zero(layer: nn.Conv2d | nn.Linear) -> None:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


def _downsampler(kind: str, channels: int) -> nn.Module:
    """The layer that leaves a level, `kind` one of DOWNSAMPLES: (N, C, H, W) -> (N, C, H/2, W/2)."""
    if kind == "maxpool":
        return nn.MaxPool2d(2)
    if kind == "conv_asymmetric":
        return PadAfterConv2d(channels)
    return nn.Conv2d(channels, channels, 3, stride=2, padding=1)


def _check_config(config: dict) -> None:
    """Raises ValueError for a UNet configuration that cannot be built, saying what is expected."""
    mult, groups = config["channel_mult"], config["norm_groups"]
    if not mult or any(m <= 0 for m in mult):
        raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {mult}")
    if config["time_injection"] not in TIME_INJECTIONS:
        raise ValueError(f"time_injection must be one of {TIME_INJECTIONS}, got {config['time_injection']!r}")
    if config["downsample"] not in DOWNSAMPLES:
        raise ValueError(f"downsample must be one of {DOWNSAMPLES}, got {config['downsample']!r}")
    if config["num_classes"] is not None and not config["time_conditioning"]:
        raise ValueError(
            "num_classes needs time_conditioning=True: the label embedding is added to the time one"
        )
    if config["num_classes"] is not None and config["num_classes"] < 1:
        raise ValueError(f"num_classes must be a positive int or None, got {config['num_classes']}")
    for name in ("cond_channels", "cond_dim", "context_dim"):
        value = config[name]
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int or None (no such condition), got {value!r}")
        if not config["time_conditioning"]:
            raise ValueError(
                f"{name} needs time_conditioning=True: a time-free network is a segmentation network, "
                "whose input is its only image"
            )
    if config["context_dim"] is not None and not (config["attention_resolutions"] or config["mid_attention"]):
        raise ValueError(
            "context_dim needs attention blocks, where the cross-attention is: set attention_resolutions "
            "or mid_attention=true"
        )
    if config["head_kernel_size"] % 2 != 1:
        raise ValueError(f"head_kernel_size must be odd, got {config['head_kernel_size']}")
    time_channels = config["time_channels"] or config["base_channels"]
    if config["time_conditioning"] and time_channels % 2:
        raise ValueError(
            f"time_channels (default base_channels) must be even (sin/cos halves), got {time_channels}"
        )
    if not config["time_scale"] > 0:
        raise ValueError(f"time_scale must be > 0, got {config['time_scale']}")
    channels = sorted({config["base_channels"] * m for m in mult})
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(
            f"channel counts {bad} (base_channels * channel_mult) are not divisible by norm_groups={groups}"
        )
    size, levels = config["image_size"], len(mult)
    fix = f"for channel_mult={mult}: use another image_size or fewer levels"
    check_divisible(f"image_size={size}", (size,), levels, fix)
    sizes = [size // 2**level for level in range(levels)]
    unmatched = [r for r in config["attention_resolutions"] if r not in sizes]
    if unmatched:
        raise ValueError(
            f"attention_resolutions {unmatched} match no level: with image_size={size} "
            f"the levels have sides {sizes}"
        )
    attention_channels = {
        config["base_channels"] * m
        for m, s in zip(mult, sizes, strict=True)
        if s in config["attention_resolutions"]
    }
    middle = {config["base_channels"] * mult[-1]} if config["mid_attention"] else set()
    head_channels = config["head_channels"]
    up_heads = config["num_heads_upsample"] or config["num_heads"]
    for name, heads, channels in [
        ("num_heads", config["num_heads"], attention_channels | middle),
        ("num_heads_upsample", up_heads, attention_channels),
    ]:
        bad = sorted(c for c in channels if c % (head_channels or heads))
        if bad:
            what = f"head_channels={head_channels}" if head_channels is not None else f"{name}={heads}"
            raise ValueError(f"attention channel counts {bad} are not divisible by {what}")


def check_divisible(what: str, sides: Sequence[int], levels: int, fix: str) -> None:
    """Raises ValueError "`what` must be divisible by 2**(levels - 1) = m, `fix`" unless each of `sides`
    (pixels) is: the down path halves the side levels - 1 times, and the up path must meet each skip at the
    side it left it (the constructor checks image_size with it, forward the input's height and width)."""
    multiple = 2 ** (levels - 1)
    if any(side % multiple for side in sides):
        raise ValueError(f"{what} must be divisible by 2**(levels - 1) = {multiple}, {fix}")
