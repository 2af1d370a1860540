"""Speed settings that need no GPU to test: what `auto` means on each device, static shapes (a second epoch
compiles nothing), the fixed-batch network sampling runs (padding changes no image), the sampling batch and
the configuration keys. The GPU's own checks (no host syncs, CUDA graphs) are in test_gpu.py."""

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import TINY_MODEL
from torch._dynamo.testing import CompileCounter

from ddpm import compiled
from ddpm.compiled import FixedBatchNetwork, auto_batch_size, balanced_batch, enabled, sampling_compile_pays
from ddpm.config import ConfigError, load_config
from ddpm.inference import generate
from ddpm.models.unet import UNet
from ddpm.schedule import NoiseScheduler
from ddpm.source import load_pretrained
from ddpm.training import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def compile_counter(monkeypatch):
    """torch.compile made with a backend that counts the graphs it compiles (and runs them eagerly): fast on
    2 cores, and what recompiles is exactly what the real backend would recompile."""
    counter, real_compile = CompileCounter(), torch.compile

    def counting_compile(model, *, mode=None, dynamic=None, **kwargs):
        return real_compile(model, backend=counter, dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", counting_compile)
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()


def tiny_unet(**kwargs) -> UNet:
    torch.manual_seed(0)
    options = dict(in_channels=1, out_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1)
    return UNet(**options, attention_resolutions=(), image_size=8, norm_groups=4, **kwargs).eval()


@pytest.mark.parametrize(
    ("setting", "cpu", "cuda"), [("auto", False, True), (True, True, True), (False, False, False)]
)
def test_auto_is_on_with_cuda_and_off_on_the_cpu(setting, cpu, cuda):
    assert enabled(setting, "cpu") is cpu and enabled(setting, torch.device("cuda")) is cuda


def test_training_compiles_only_where_it_can_pay():
    steps = compiled.COMPILE_MIN_STEPS
    assert compiled.training_compile_pays("auto", steps=steps, device="cuda")
    assert not compiled.training_compile_pays("auto", steps=steps - 1, device="cuda")  # the digits' 1,500
    assert not compiled.training_compile_pays("auto", steps=800_000, device="cpu")
    assert compiled.training_compile_pays(True, steps=1, device="cpu")
    assert not compiled.training_compile_pays(False, steps=800_000, device="cuda")


def test_sampling_compiles_only_where_it_can_pay():
    big = compiled.COMPILE_MIN_IMAGE_CALLS
    assert sampling_compile_pays("auto", n=big, calls=1, device="cuda")
    assert not sampling_compile_pays("auto", n=big - 1, calls=1, device="cuda")
    assert not sampling_compile_pays("auto", n=50_000, calls=20, device="cpu")
    assert sampling_compile_pays(True, n=1, calls=1, device="cpu")
    assert not sampling_compile_pays(False, n=50_000, calls=20, device="cuda")


@pytest.mark.parametrize(
    ("n", "most", "expected"), [(50_000, 4096, 3847), (100, 64, 50), (10, 64, 10), (1, 8, 1)]
)
def test_balanced_batches_leave_the_last_nearly_full(n, most, expected):
    batch = balanced_batch(n, most)
    batches = -(-n // batch)
    assert batch == expected and batch <= most and batches == -(-n // most)
    assert n - (batches - 1) * batch > batch - batches  # the last batch is short by fewer than `batches`


def test_auto_batch_size_on_the_cpu():
    model = tiny_unet()
    # sample.py's batch on the CPU before auto: the same batches, so the same images from every sampler
    assert auto_batch_size(model, (1, 8, 8), 1000, device="cpu") == compiled.AUTO_BATCH_CPU == 64
    assert auto_batch_size(model, (1, 8, 8), 5, device="cpu") == 5


def test_the_fixed_batch_network_pads_without_changing_any_output(compile_counter):
    model = tiny_unet(num_classes=3)
    network = FixedBatchNetwork(model, 5, mode="default")
    assert network.num_classes == 3 and network.null_class == model.null_class
    assert list(network.parameters()) == list(model.parameters())  # the samplers read dtype and device there
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in (5, 2, 5, 1):
            x = torch.randn(n, 1, 8, 8, generator=generator)
            t = torch.randint(0, 1000, (n,), generator=generator)
            y = torch.randint(0, 4, (n,), generator=generator)
            torch.testing.assert_close(network(x, t, y), model(x, t, y))
    assert compile_counter.frame_count == 1  # one shape, one graph
    with pytest.raises(ValueError, match="6 images do not fit this network's fixed batch of 5"):
        network(torch.zeros(6, 1, 8, 8), torch.zeros(6, dtype=torch.long))


def test_compiled_sampling_draws_the_same_images(compile_counter):
    # 7 images in batches of 3 (the last padded): the images do not depend on the batch or on compilation.
    model, scheduler = tiny_unet(), NoiseScheduler()
    options = dict(image_shape=(1, 8, 8), sampler="unipc", steps=3, seed=4)
    plain = generate(model, scheduler, 7, batch_size=7, compiled=False, **options)
    fast = generate(model, scheduler, 7, batch_size=3, compiled=True, **options)
    torch.testing.assert_close(fast, plain)
    assert compile_counter.frame_count == 1


def test_a_second_epoch_compiles_nothing(tmp_path, compile_counter):
    # 1,797 digits in batches of 600: two full batches an epoch and 597 left over, which the loader drops.
    # Kept, that last batch would have another shape, and compile the network again at every epoch end.
    config = load_config(
        ROOT / "configs" / "digits.yaml",
        [
            "data.image_size=8",
            "model.image_size=8",
            "model.base_channels=8",
            "model.channel_mult=[1,2]",
            "model.norm_groups=4",
            "model.attention_resolutions=[]",
            "data.batch_size=600",
            "train.steps=5",
            "train.compile=true",
            "train.sample_every=0",
            "train.checkpoint_every=5",
            "train.log_every=5",
            "train.log_with=none",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(config)
    batches = trainer._batches()
    shapes = []
    for _ in range(config.train.steps):
        x0, labels = next(batches)
        shapes.append(tuple(x0.shape))
        trainer._step(x0, labels)
        if len(shapes) == 1:
            after_first = compile_counter.frame_count
    assert after_first >= 1 and compile_counter.frame_count == after_first  # epochs 2 and 3: no new graph
    assert set(shapes) == {(600, 1, 8, 8)} and trainer.state.step == 5


@pytest.mark.parametrize("key", ["compile", "channels_last"])
def test_the_speed_settings_take_true_false_or_auto(key):
    for value, expected in (("auto", "auto"), ("true", True), ("false", False)):
        assert getattr(load_config(None, [f"train.{key}={value}"]).train, key) == expected
    assert getattr(load_config(None).train, key) == "auto"
    expected = rf"invalid value 'fast' for 'train\.{key}'.*expected true, false or auto"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [f"train.{key}=fast"])


def test_compile_mode_is_one_of_torch_compiles():
    assert load_config(None, ["train.compile_mode=reduce-overhead"]).train.compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match=r"'train\.compile_mode'.*expected one of default, reduce-overhead"):
        load_config(None, ["train.compile_mode=fastest"])
    with pytest.raises(ValueError, match="unknown compile mode 'fastest'"):
        compiled.compile_network(tiny_unet(), mode="fastest")


def test_an_unknown_batch_size_word_is_refused():
    with pytest.raises(ValueError, match="--batch-size must be a positive integer or auto, got 'max'"):
        generate(tiny_unet(), NoiseScheduler(), 2, image_shape=(1, 8, 8), batch_size="max", steps=1)


def test_a_channels_last_run_trains_saves_and_resumes(tmp_path):
    # channels_last is on by default on a GPU: its non-contiguous weights must still save, load and resume.
    overrides = [
        *TINY_MODEL,
        "train.checkpoint_every=2",
        "train.sample_every=2",
        "sample.steps=2",
        "sample.n=4",
        "train.log_with=none",
        "train.channels_last=true",
        f"output_dir={tmp_path / 'run'}",
    ]
    trainer = Trainer(load_config(ROOT / "configs" / "digits.yaml", [*overrides, "train.steps=2"]))
    assert trainer.channels_last and trainer.model.conv_in.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    first = trainer.train()
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = Trainer(
        load_config(ROOT / "configs" / "digits.yaml", [*overrides, "train.steps=4"]), resume="latest"
    )
    assert resumed.state.step == 2 and resumed.train().name == "step-0000004"
    model, _ = load_pretrained(first / "ema")
    torch.testing.assert_close(model.conv_in.weight, trainer.ema.module.conv_in.weight.contiguous())
