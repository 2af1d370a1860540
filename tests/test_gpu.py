"""On a GPU: no training step and no sampler step waits for the host (torch.cuda.set_sync_debug_mode("error")
turns every synchronising call into an error), compiled training and sampling with CUDA graphs, and noise
drawn on the CPU for the GPU. Skipped without CUDA (CI has none); `python bench/gpu.py` runs it on a lent
GPU (part syncfree), and so does `python -m pytest tests/test_gpu.py` there."""

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import TINY_MODEL

from ddpm.compiled import FixedBatchNetwork
from ddpm.config import load_config
from ddpm.edm import EDMScheduler
from ddpm.inference import generate
from ddpm.models.unet import UNet
from ddpm.samplers import SAMPLERS, denoiser, sample, sampling_timesteps
from ddpm.samplers.solvers import gaussian_noise
from ddpm.schedule import NoiseScheduler
from ddpm.training import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")
TINY = [
    *TINY_MODEL,
    "model.attention_resolutions=[4]",
    "model.dropout=0.1",
    "train.log_with=none",
    "train.sample_every=0",
    "train.steps=100",
]


@contextmanager
def no_host_sync():
    """Every call that makes the host wait for the GPU raises inside this block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture(autouse=True)
def fresh_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    torch._dynamo.reset()


def tiny_unet(**kwargs) -> UNet:
    torch.manual_seed(0)
    model = UNet(
        in_channels=1,
        out_channels=1,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        image_size=8,
        norm_groups=4,
        **kwargs,
    )
    with torch.no_grad():  # no zero-initialised output: samples that depend on the network
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(CUDA).eval()


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["train.grad_accum=2", "train.loss_weighting=min_snr"],
        ["model.out_channels=2", "train.learn_sigma=true", "diffusion.variance_type=learned_range"],
        ["train.compile=true", "train.compile_mode=reduce-overhead"],
    ],
    ids=["default", "accumulation-min-snr", "learned-variance", "compiled-cuda-graphs"],
)
def test_training_steps_wait_for_nothing(tmp_path, extra):
    config = load_config(
        ROOT / "configs" / "digits.yaml", [*TINY, "train.compile=false", *extra, f"output_dir={tmp_path}"]
    )
    trainer = Trainer(config)
    batches = trainer._batches()
    before = [p.detach().clone() for p in trainer.ema.module.parameters()]
    for _ in range(3 * config.train.grad_accum):  # first steps: tables to the GPU, optimizer state, compile
        trainer._step(*next(batches))
    with no_host_sync():
        for _ in range(3 * config.train.grad_accum):
            trainer._step(*next(batches))  # the loader's copy, the loss, clipping, AdamW, EMA, loss sums
    assert trainer.state.step == 6
    assert torch.isfinite(trainer.losses.total).item() and trainer.losses.first_bad_step.item() == -1
    after = list(trainer.ema.module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


SCHEDULES = {
    "ddpm": lambda: NoiseScheduler(),
    "karras": lambda: NoiseScheduler(timestep_spacing="karras"),  # continuous timesteps
    "zero-snr": lambda: NoiseScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True),
    "edm": lambda: EDMScheduler(),
}


@pytest.mark.parametrize("generator_device", ["cuda", "cpu"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_step_waits_for_nothing(sampler, schedule, generator_device):
    model, scheduler = tiny_unet(), SCHEDULES[schedule]()
    options = {"s_churn": 2.0} if sampler == "heun" else {}

    def run():
        generator = torch.Generator(generator_device).manual_seed(0)
        shape = (4, 1, 8, 8)
        return sample(
            model,
            scheduler,
            shape,
            sampler=sampler,
            steps=4,
            options=options,
            generator=generator,
            progress=False,
        )

    expected = run()  # first: the schedule's tables to the GPU, cuDNN's choices
    with no_host_sync():
        images = run()
    assert torch.isfinite(images).all()
    torch.testing.assert_close(images, expected)


def test_guided_sampling_steps_wait_for_nothing():
    # sample() checks the labels once, before its loop (one sync per call); the loop itself syncs nothing.
    model, scheduler = tiny_unet(num_classes=3), NoiseScheduler()
    y = torch.tensor([0, 1, 2, 3], device=CUDA)
    denoise = denoiser(model, scheduler, y=y, guidance_scale=2.0, null_class=model.null_class)
    timesteps = sampling_timesteps(scheduler, "unipc", 4)
    x = torch.randn(4, 1, 8, 8, device=CUDA)
    expected = SAMPLERS["unipc"](denoise, x, timesteps, scheduler, disable=True)
    with no_host_sync():
        images = SAMPLERS["unipc"](denoise, x, timesteps, scheduler, disable=True)
    torch.testing.assert_close(images, expected)


def test_noise_drawn_on_the_cpu_for_the_gpu_is_the_cpus():
    noise = gaussian_noise((3, 5), torch.float32, CUDA, torch.Generator().manual_seed(1))
    assert noise.device.type == "cuda"
    assert torch.equal(noise.cpu(), torch.randn((3, 5), generator=torch.Generator().manual_seed(1)))


def test_a_cuda_graph_network_pads_and_copies_its_outputs():
    model = tiny_unet()
    network = FixedBatchNetwork(model, 6)  # compiled with CUDA graphs ("reduce-overhead")
    x, t = torch.randn(6, 1, 8, 8, device=CUDA), torch.randint(0, 1000, (6,), device=CUDA)
    with torch.no_grad():
        outputs = [network(x[:n], t[:n]) for n in (6, 4, 6, 4)]  # each kept while the next ones run
        for n, out in zip((6, 4, 6, 4), outputs, strict=True):
            torch.testing.assert_close(out, model(x[:n], t[:n]), atol=1e-4, rtol=1e-4)
        with no_host_sync():
            network(x[:5], t[:5])


def test_compiled_sampling_draws_what_eager_sampling_draws():
    model, scheduler = tiny_unet(), NoiseScheduler()
    options = dict(image_shape=(1, 8, 8), sampler="unipc", steps=5, seed=2, device=CUDA)
    eager = generate(model, scheduler, 10, batch_size=10, compiled=False, **options)
    fast = generate(model, scheduler, 10, batch_size=4, compiled=True, **options)  # 4, 4 and 2 padded to 4
    torch.testing.assert_close(fast, eager, atol=1e-3, rtol=1e-3)
