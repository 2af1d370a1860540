"""The classic U-Net (Ronneberger et al. 2015, with padded convolutions), exactly as the project's seed
write-up builds it, and the same plain topology as a time-conditioned diffusion backbone.

    per level (channels base_channels * channel_mult[i]): ConvBlock, kept as a skip, then a 2x2 max-pool
    bottleneck (the last channel_mult): ConvBlock
    per level, deepest first: 2x2 stride-2 ConvTranspose2d (halving the channels), concatenate the skip,
        ConvBlock
    head: 1x1 conv

ConvBlock is conv3x3, ReLU, conv3x3, ReLU: no normalisation, no residual. With the defaults (channels
32-64-128-256, a 512 bottleneck, in_channels=3, out_channels=1) it is the write-up's network, 7,760,097
parameters, (1, 3, 256, 256) -> (1, 1, 256, 256); `ClassicUNet.from_classic_state_dict` loads its weights.

As a diffusion backbone (`time_conditioning=True`), emb = MLP(sinusoid(t)) + label_embedding(y), as in `UNet`
(label `null_class` = num_classes is classifier-free guidance's "no label"), goes through SiLU once, and each
ConvBlock of the down path, the bottleneck and the up path adds its own linear projection of it, per channel,
after its first conv (and that conv's GroupNorm, when there is one) and before the ReLU. Added rather than
scale-shift (AdaGN): without normalisation the activations have no fixed scale for (1 + scale) to act on, so a
multiplicative term would scale the block's output by a factor that changes with t and compounds through the
layers; a per-channel bias is DDPM's own injection (Ho et al. 2020, appendix B) and keeps the block the plain
one at any t. `norm_groups` adds a GroupNorm after each conv.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.models.hub_model import HubModel
from ddpm.models.unet import TimestepEmbedding, check_divisible, conditioning
from ddpm.models.weights import load_checked


class ClassicUNet(nn.Module, HubModel):
    """The classic segmentation U-Net, `model(x)`, or (time_conditioning=True) a denoiser `model(x, t, y)`.

    `config` holds the constructor's keyword arguments (JSON-able), as `UNet.config` does, and is saved
    beside the weights in a model folder (`ClassicUNet.from_pretrained`, `save_pretrained`: the Hub model API
    of `ddpm.models.hub_model`). In a run config, `model: {architecture: classic, ...}` builds this class.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,  # channels of x
        out_channels: int = 1,  # channels of the output (segmentation logits, or the diffusion prediction)
        base_channels: int = 32,  # channels of the first level; the time embedding has 4x as many
        channel_mult: Sequence[int] = (1, 2, 4, 8, 16),  # level i: base_channels * mult[i]; last: bottleneck
        image_size: int = 256,  # the input side it is built for (checked against the poolings); others work
        norm_groups: int | None = None,  # None: no normalisation (the write-up's); G: GroupNorm(G) per conv
        time_conditioning: bool = False,  # True: a diffusion backbone, model(x, t, y)
        num_classes: int | None = None,  # class-conditional with labels 0..num_classes-1 (+ the null label)
    ) -> None:
        config = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        super().__init__()
        self.config = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in config.items()}
        _check_config(self.config)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_classes = num_classes
        # Label id num_classes means "no label": training drops labels to it, guidance samples with it.
        self.null_class = num_classes
        self.time_conditioning = time_conditioning

        emb_channels = 4 * base_channels if time_conditioning else None
        self.time_embedding = (
            TimestepEmbedding(base_channels, emb_channels, False, 0.0) if time_conditioning else None
        )
        self.class_embedding = (
            nn.Embedding(num_classes + 1, emb_channels) if num_classes is not None else None
        )

        widths = [base_channels * m for m in channel_mult]
        self.pool = nn.MaxPool2d(2)
        self.encoders = nn.ModuleList(
            ConvBlock(cin, cout, emb_channels, norm_groups)
            for cin, cout in zip([in_channels, *widths[:-2]], widths[:-1], strict=True)
        )
        self.bottleneck = ConvBlock(widths[-2], widths[-1], emb_channels, norm_groups)
        # Level i's up-sampler and decoder (the write-up's upconv{i+1}, decoder{i+1}); run deepest first.
        self.upconvs = nn.ModuleList(
            nn.ConvTranspose2d(cin, cout, 2, stride=2)
            for cin, cout in zip(widths[1:], widths[:-1], strict=True)
        )
        self.decoders = nn.ModuleList(
            ConvBlock(2 * width, width, emb_channels, norm_groups) for width in widths[:-1]
        )
        self.output = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: Tensor, t: Tensor | float | int | None = None, y: Tensor | None = None) -> Tensor:
        """x: (N, in_channels, H, W), H and W divisible by 2**(levels - 1); t: None (time-free) or an (N,) or
        scalar timestep; y: (N,) long labels in [0, num_classes]. Returns (N, out_channels, H, W)."""
        emb = conditioning(self, x, t, y, len(self.encoders) + 1)  # (N, 4 * base_channels) or None
        if emb is not None:
            emb = F.silu(emb)  # every block's projection starts with SiLU: apply it once here
        h, skips = x, []
        for encoder in self.encoders:
            h = encoder(h, emb)  # (N, C_i, H_i, W_i)
            skips.append(h)
            h = self.pool(h)  # (N, C_i, H_i / 2, W_i / 2)
        h = self.bottleneck(h, emb)
        for upconv, decoder in zip(reversed(self.upconvs), reversed(self.decoders), strict=True):
            h = decoder(torch.cat([upconv(h), skips.pop()], dim=1), emb)  # on (N, 2 C_i, H_i, W_i)
        return self.output(h)

    @classmethod
    def from_classic_state_dict(cls, state_dict: Mapping[str, Tensor]) -> ClassicUNet:
        """The time-free ClassicUNet holding the weights of the seed write-up's `UNet` (keys
        encoder1.0.weight ... bottleneck.2.bias, upconv4.weight ..., decoder1.0.weight ..., output.bias): it
        computes that network's function.

        The channels are read from the shapes (any number of levels; every width a multiple of the first).
        Raises ValueError for keys of another network or widths that do not fit, naming them.
        """
        names = {key: _classic_name(key) for key in state_dict}
        unknown = sorted(key for key, name in names.items() if name is None)
        if unknown or "encoder1.0.weight" not in state_dict or "output.weight" not in state_dict:
            raise ValueError(
                f"not a classic U-Net state dict (keys encoder1.0.weight ... output.bias): unknown keys "
                f"{unknown[:5]}, {len(state_dict)} keys in all"
            )
        first = state_dict["encoder1.0.weight"]
        levels = sum(1 for key in state_dict if re.fullmatch(r"encoder\d+\.0\.weight", key))
        widths = [state_dict[f"encoder{i}.0.weight"].shape[0] for i in range(1, levels + 1)]
        widths.append(state_dict["bottleneck.0.weight"].shape[0])
        base = widths[0]
        if any(width % base for width in widths):
            raise ValueError(f"the level widths {widths} are not multiples of the first, {base}")
        model = cls(
            in_channels=first.shape[1],
            out_channels=state_dict["output.weight"].shape[0],
            base_channels=base,
            channel_mult=[width // base for width in widths],
        )
        load_checked(
            model,
            {names[key]: value for key, value in state_dict.items()},
            f"the classic U-Net state dict does not fit a ClassicUNet with channels {widths}",
            "pass the state dict of the write-up's UNet (model.state_dict())",
        )
        return model


class ConvBlock(nn.Module):
    """conv3x3, [GroupNorm], [+ proj(emb)], ReLU, conv3x3, [GroupNorm], ReLU: (N, C_in, H, W) ->
    (N, C_out, H, W).

    With no norm_groups and no emb_channels it is the write-up's `down_conv_block`.
    """

    def __init__(
        self, in_channels: int, out_channels: int, emb_channels: int | None, norm_groups: int | None
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(norm_groups, out_channels) if norm_groups else nn.Identity()
        self.time_emb_proj = nn.Linear(emb_channels, out_channels) if emb_channels else None
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels) if norm_groups else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None) -> Tensor:
        """x: (N, C_in, H, W); emb: (N, E), already through SiLU, or None. Returns (N, C_out, H, W)."""
        h = self.norm1(self.conv1(x))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(emb)[:, :, None, None]
        return F.relu(self.norm2(self.conv2(F.relu(h))))


def _classic_name(key: str) -> str | None:
    """The write-up's parameter name -> ours (encoder2.2.bias -> encoders.1.conv2.bias); None if unknown."""
    block = re.fullmatch(r"(encoder|decoder)(\d+)\.([02])\.(weight|bias)", key)
    if block:
        return f"{block[1]}s.{int(block[2]) - 1}.conv{1 if block[3] == '0' else 2}.{block[4]}"
    middle = re.fullmatch(r"bottleneck\.([02])\.(weight|bias)", key)
    if middle:
        return f"bottleneck.conv{1 if middle[1] == '0' else 2}.{middle[2]}"
    up = re.fullmatch(r"upconv(\d+)\.(weight|bias)", key)
    if up:
        return f"upconvs.{int(up[1]) - 1}.{up[2]}"
    return key if re.fullmatch(r"output\.(weight|bias)", key) else None


def _check_config(config: dict) -> None:
    """Raises ValueError for a ClassicUNet configuration that cannot be built, saying what is expected."""
    mult, groups = config["channel_mult"], config["norm_groups"]
    if groups is not None and groups < 1:
        raise ValueError(f"norm_groups must be a positive int, or None for no normalisation, got {groups}")
    if len(mult) < 2 or any(m <= 0 for m in mult):
        raise ValueError(
            f"channel_mult must list at least two positive ints (the levels, then the bottleneck), got {mult}"
        )
    if config["num_classes"] is not None and not config["time_conditioning"]:
        raise ValueError(
            "num_classes needs time_conditioning=True: the label embedding is added to the time one"
        )
    if config["num_classes"] is not None and config["num_classes"] < 1:
        raise ValueError(f"num_classes must be a positive int or None, got {config['num_classes']}")
    if config["time_conditioning"] and config["base_channels"] % 2:
        raise ValueError(f"base_channels must be even (sin/cos halves), got {config['base_channels']}")
    bad = sorted(
        {config["base_channels"] * m for m in mult if groups and config["base_channels"] * m % groups}
    )
    if bad:
        raise ValueError(
            f"channel counts {bad} (base_channels * channel_mult) are not divisible by norm_groups={groups}"
        )
    size = config["image_size"]
    fix = f"for channel_mult={mult}: use another image_size or fewer levels"
    check_divisible(f"image_size={size}", (size,), len(mult), fix)
