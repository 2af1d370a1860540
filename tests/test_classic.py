"""ClassicUNet: the seed write-up's network exactly, its weights, and the topology as a diffusion backbone."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from ddpm import NoiseScheduler, sample
from ddpm.config import build_model
from ddpm.models import ClassicUNet, UNet

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WRITE_UP_PARAMETERS = 7_760_097  # UNet(in_channels=3, out_channels=1) of the seed write-up


class WriteUpUNet(nn.Module):
    """The seed write-up's class (../shared/seeds/000_e4bd06dd725c21dc.txt), as written there."""

    def __init__(self, in_channels, out_channels):
        super().__init__()

        def down_conv_block(in_channels, out_channels):
            return nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
            )

        def up_conv_block(in_channels, out_channels):
            return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)

        self.pool = nn.MaxPool2d(kernel_size=2)
        self.encoder1 = down_conv_block(in_channels, 32)
        self.encoder2 = down_conv_block(32, 64)
        self.encoder3 = down_conv_block(64, 128)
        self.encoder4 = down_conv_block(128, 256)
        self.bottleneck = down_conv_block(256, 512)
        self.upconv4 = up_conv_block(512, 256)
        self.decoder4 = down_conv_block(512, 256)
        self.upconv3 = up_conv_block(256, 128)
        self.decoder3 = down_conv_block(256, 128)
        self.upconv2 = up_conv_block(128, 64)
        self.decoder2 = down_conv_block(128, 64)
        self.upconv1 = up_conv_block(64, 32)
        self.decoder1 = down_conv_block(64, 32)
        self.output = nn.Conv2d(32, out_channels, kernel_size=1)

    def forward(self, x):
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(self.pool(enc1))
        enc3 = self.encoder3(self.pool(enc2))
        enc4 = self.encoder4(self.pool(enc3))
        bottleneck = self.bottleneck(self.pool(enc4))
        dec4 = self.decoder4(torch.cat((self.upconv4(bottleneck), enc4), dim=1))
        dec3 = self.decoder3(torch.cat((self.upconv3(dec4), enc3), dim=1))
        dec2 = self.decoder2(torch.cat((self.upconv2(dec3), enc2), dim=1))
        dec1 = self.decoder1(torch.cat((self.upconv1(dec2), enc1), dim=1))
        return self.output(dec1)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(**overrides) -> ClassicUNet:
    kwargs = {
        "in_channels": 1,
        "out_channels": 1,
        "base_channels": 8,
        "channel_mult": (1, 2),
        "image_size": 8,
    }
    return ClassicUNet(**{**kwargs, **overrides})


def test_the_defaults_and_seed_unet_yaml_are_the_write_ups_network():
    assert count(WriteUpUNet(3, 1)) == WRITE_UP_PARAMETERS
    assert count(ClassicUNet()) == WRITE_UP_PARAMETERS
    model = build_model(yaml.safe_load((CONFIGS / "seed_unet.yaml").read_text())["model"])
    assert type(model) is ClassicUNet and count(model) == WRITE_UP_PARAMETERS
    assert model.time_embedding is None and not any(
        "time_emb" in name for name, _ in model.named_parameters()
    )
    with torch.no_grad():
        assert model(torch.randn(1, 3, 256, 256)).shape == (1, 1, 256, 256)


def test_the_write_ups_weights_load_and_compute_the_same_function():
    torch.manual_seed(0)
    theirs = WriteUpUNet(3, 1).eval()
    ours = ClassicUNet.from_classic_state_dict(theirs.state_dict()).eval()
    assert ours.config["channel_mult"] == [1, 2, 4, 8, 16] and count(ours) == WRITE_UP_PARAMETERS
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert got.shape == (2, 1, 64, 48)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_state_dict_of_another_network_is_refused_naming_its_keys():
    with pytest.raises(ValueError, match=r"not a classic U-Net state dict.*'conv_in.weight'"):
        ClassicUNet.from_classic_state_dict(UNet(base_channels=8, norm_groups=4).state_dict())
    state = WriteUpUNet(1, 2).state_dict()
    state["encoder2.0.weight"] = torch.zeros(48, 32, 3, 3)
    with pytest.raises(ValueError, match=r"widths \[32, 48, 128, 256, 512\] are not multiples"):
        ClassicUNet.from_classic_state_dict(state)


@pytest.mark.parametrize("norm_groups", [None, 4])
def test_the_diffusion_backbone_depends_on_t_and_y_in_every_block(norm_groups):
    torch.manual_seed(0)
    model = tiny(time_conditioning=True, num_classes=3, norm_groups=norm_groups)
    projections = [name for name, _ in model.named_modules() if name.endswith("time_emb_proj")]
    assert projections == ["encoders.0.time_emb_proj", "bottleneck.time_emb_proj", "decoders.0.time_emb_proj"]
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == (6 if norm_groups else 0)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 3])  # 3: the null label
    out = model(x, torch.tensor([1, 500]), y)
    assert out.shape == (2, 1, 8, 8)
    assert not torch.allclose(out, model(x, torch.tensor([2, 500]), y))
    assert not torch.allclose(out, model(x, torch.tensor([1, 500]), torch.tensor([1, 3])))
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize(
    ("overrides", "call", "message"),
    [
        (
            {},
            lambda m: m(torch.randn(1, 1, 8, 8), 1),
            "ClassicUNet has time_conditioning=False.*model\\(x\\)",
        ),
        ({}, lambda m: m(torch.randn(1, 1, 8, 7)), "divisible by 2\\*\\*\\(levels - 1\\) = 2"),
        ({"time_conditioning": True}, lambda m: m(torch.randn(1, 1, 8, 8)), "pass the timestep t"),
    ],
)
def test_forward_errors(overrides, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny(**overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"channel_mult": [1]}, "at least two positive ints"),
        ({"norm_groups": 3}, r"channel counts \[8, 16\].*not divisible by norm_groups=3"),
        ({"norm_groups": 0}, "norm_groups must be a positive int, or None"),
        ({"num_classes": 3}, "num_classes needs time_conditioning=True"),
        ({"image_size": 7}, "image_size=7 must be divisible"),
    ],
)
def test_constructor_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


@pytest.mark.parametrize("cls", [ClassicUNet, UNet])
def test_the_samplers_refuse_a_time_free_network_saying_what_it_is(cls):
    unet = {"base_channels": 8, "attention_resolutions": [], "norm_groups": 4, "image_size": 8}
    model = UNet(in_channels=1, time_conditioning=False, **unet) if cls is UNet else tiny()
    scheduler = NoiseScheduler(num_train_timesteps=10)
    shape = (1, model.in_channels, 8, 8)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args))
    with pytest.raises(ValueError, match="time_conditioning=False: it is a segmentation network"):
        sample(model, scheduler, shape, sampler="ddim", steps=2)
    assert calls == []  # refused before any network call
