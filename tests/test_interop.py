"""Interop with diffusers and torch.export: unet_from_diffusers against UNet2DModel, our schedule as each
diffusers scheduler's config and back, each library's samplers driving the other's network, and the exported
UNet against eager.

Models are tiny versions of the published layouts (4-16 channels, 8x8 or 16x16 inputs); every parameter is
perturbed so that zero-initialised layers cannot hide a wrong mapping.
"""

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from test_unet import TINY, perturb  # pytest puts tests/ on sys.path

from ddpm.inference import load_for_sampling
from ddpm.interop.diffusers import (
    DIFFUSERS_DEFAULTS,
    DIFFUSERS_RENAMES,
    SIGMA_SPACING_FLAGS,
    diffusers_scheduler_config,
    scheduler_from_diffusers,
    unet_from_diffusers,
    unet_kwargs_from_diffusers,
)
from ddpm.io import save_pretrained, save_unet
from ddpm.models.unet import UNet
from ddpm.samplers import sample
from ddpm.schedule import NoiseScheduler

diffusers = pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[1]
# The pages whose checked code blocks run here: README.md and the documentation site's pages (docs/).
DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# config.json of google/ddpm-cifar10-32 as published (by diffusers 0.0.4: no dropout, add_attention...).
DDPM_CIFAR10 = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# google/ddpm-cat-256: the 256x256 layout, attention at 16x16.
DDPM_256 = {
    **DDPM_CIFAR10,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    "sample_size": 256,
}
TINY_CIFAR10 = {
    **DDPM_CIFAR10,
    "block_out_channels": [8, 16, 16, 16],
    "norm_num_groups": 4,
    "sample_size": 16,
}
TINY_2_LEVELS = {
    "sample_size": 8,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
}
VARIANTS = {
    # The published CIFAR-10 layout, saved as the early DDPM files were (see save_diffusers).
    "ddpm_cifar10": (TINY_CIFAR10, "legacy"),
    # diffusers' own defaults (flip_sin_to_cos, freq_shift 0, symmetric padding) and several heads.
    "diffusers_defaults": (
        {
            **TINY_2_LEVELS,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": 4,
        },
        "full",
    ),
    # AdaGN time injection, class labels, dropout (eval mode), act_fn's alias.
    "class_scale_shift": (
        {
            **TINY_2_LEVELS,
            "down_block_types": ["AttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "AttnUpBlock2D"],
            "resnet_time_scale_shift": "scale_shift",
            "attn_norm_num_groups": 4,
            "num_class_embeds": 3,
            "dropout": 0.1,
            "act_fn": "swish",
            "downsample_padding": 0,
        },
        "full",
    ),
}


def save_diffusers(folder: Path, config: dict, form: str = "full") -> torch.nn.Module:
    """A perturbed UNet2DModel saved to `folder`; returns it. form "full": as save_pretrained writes it;
    "legacy": as the early DDPM files, config.json holding only `config`'s keys and the weights in
    diffusion_pytorch_model.bin with the attention tensors under their names before diffusers 0.14."""
    torch.manual_seed(0)
    reference = diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    perturb(reference).eval()
    reference.save_pretrained(folder, safe_serialization=form == "full")
    if form == "legacy":
        (folder / "config.json").write_text(json.dumps(config))
        weights = folder / "diffusion_pytorch_model.bin"
        old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
        state = {}
        for key, value in torch.load(weights, weights_only=True).items():
            for new, old in old_names.items():
                key = key.replace(new, old)
            state[key] = value
        assert any(".proj_attn." in key for key in state)
        torch.save(state, weights)
    return reference


def inputs(config: dict, n: int = 2) -> torch.Tensor:
    size = config["sample_size"]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(2))


def tiny_unet(scale: float = 0.1, **overrides) -> UNet:
    torch.manual_seed(0)
    return perturb(UNet(**{**TINY, **overrides}), scale).eval()


@pytest.fixture(scope="module")
def cifar10_folder(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("ddpm-cifar10-32")
    return folder, save_diffusers(folder, *VARIANTS["ddpm_cifar10"])


# --- unet_from_diffusers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_from_diffusers_computes_the_same_function(name, tmp_path, cifar10_folder):
    config, form = VARIANTS[name]
    if name == "ddpm_cifar10":
        folder, reference = cifar10_folder
    else:
        folder, reference = tmp_path, save_diffusers(tmp_path, config, form)
    model = unet_from_diffusers(folder).eval()
    x, t = inputs(config, n=4), torch.tensor([0, 1, 500, 999])
    y = torch.tensor([0, 2, 1, 0]) if "num_class_embeds" in config else None
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference(x, t, class_labels=y).sample, rtol=0, atol=1e-4)
    if y is not None:  # the null label has a zero embedding: no class term
        assert model.null_class == 3 and torch.count_nonzero(model.class_embedding.weight[3]) == 0


def test_ddpm_padding_is_needed(cifar10_folder):
    """The same tensors in the symmetric-padding UNet compute something else: the option is not cosmetic."""
    folder, reference = cifar10_folder
    loaded = unet_from_diffusers(folder).eval()
    assert loaded.config["downsample"] == "conv_asymmetric"
    symmetric = UNet(**{**loaded.config, "downsample": "conv"}).eval()
    symmetric.load_state_dict(loaded.state_dict())
    x, t = inputs(TINY_CIFAR10), torch.tensor([10, 10])
    with torch.no_grad():
        assert (symmetric(x, t) - reference(x, t).sample).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("config", "params"),
    [(DDPM_CIFAR10, 35_746_307), (DDPM_256, 113_673_219)],
    ids=["cifar10-32", "256"],
)
def test_published_configs_map_to_the_same_tensors(config, params):
    """Full-size published layouts, built on the meta device (no memory, no compute): our mapped UNet has
    exactly the renamed tensors of UNet2DModel, with the same shapes."""
    kwargs = unet_kwargs_from_diffusers(config)
    with torch.device("meta"):
        ours = UNet(**kwargs)
        reference = diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    expected = {}
    for key, value in reference.state_dict().items():
        for old, new in DIFFUSERS_RENAMES.items():
            key = key.replace(old, new)
        expected[key] = value.shape
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected
    assert sum(p.numel() for p in ours.parameters()) == params
    assert kwargs["downsample"] == "conv_asymmetric" and kwargs["time_injection"] == "add"
    assert kwargs["attention_resolutions"] == [16] and kwargs["image_size"] == config["sample_size"]


def test_diffusers_defaults_are_those_of_the_installed_diffusers():
    signature = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    installed = {
        name: list(p.default) if isinstance(p.default, tuple) else p.default
        for name, p in signature.items()
        if name != "self"
    }
    assert installed == DIFFUSERS_DEFAULTS


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]},
            r"down_block_types \['CrossAttnDownBlock2D'\] not supported; supported: \['DownBlock2D', 'Attn",
        ),
        ({"up_block_types": ["UpBlock2D"] * 4}, "attention at different levels"),
        ({"time_embedding_type": "fourier"}, r"time_embedding_type='fourier' is not supported.*positional"),
        ({"class_embed_type": "timestep"}, "class_embed_type='timestep' is not supported"),
        ({"center_input_sample": True}, "center_input_sample=True is not supported"),
        ({"resnet_time_scale_shift": "ada_group"}, r"resnet_time_scale_shift='ada_group'.*'scale_shift'"),
        ({"resnet_time_scale_shift": "scale_shift"}, "middle attention block normalises with None groups"),
        ({"downsample_padding": 2}, r"downsample_padding=2 is not supported; supported: \[0, 1\]"),
        ({"block_out_channels": [128, 192, 256, 256]}, "must all be multiples of the first, 128"),
        ({"cross_attention_dim": 768}, r"unknown UNet2DModel option\(s\) \['cross_attention_dim'\]"),
    ],
)
def test_unsupported_options_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        unet_kwargs_from_diffusers({**DDPM_CIFAR10, **overrides})


def test_from_diffusers_folder_errors(tmp_path, cifar10_folder):
    with pytest.raises(FileNotFoundError, match="no diffusers model.*ddpm.load_pretrained"):
        unet_from_diffusers(tmp_path)
    save_unet(tmp_path / "ours", UNet(**unet_kwargs_from_diffusers(TINY_CIFAR10)))
    with pytest.raises(FileNotFoundError, match="no diffusers model"):
        unet_from_diffusers(tmp_path / "ours")

    pipeline = tmp_path / "pipeline"  # a pipeline folder: the UNet in unet/
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "unet" / "config.json").write_text(json.dumps({**DDPM_CIFAR10, "_class_name": "UNet2DCond"}))
    with pytest.raises(FileNotFoundError, match="no weights in .*unet"):
        unet_from_diffusers(pipeline)
    folder, _ = cifar10_folder
    weights = (folder / "diffusion_pytorch_model.bin").read_bytes()
    (pipeline / "unet" / "diffusion_pytorch_model.bin").write_bytes(weights)
    with pytest.raises(ValueError, match="describes a UNet2DCond; .* UNet2DModel"):
        unet_from_diffusers(pipeline)
    (pipeline / "unet" / "config.json").write_text(json.dumps({**TINY_CIFAR10, "layers_per_block": 1}))
    with pytest.raises(ValueError, match="do not fit the UNet2DModel.*unexpected down_blocks.0.resnets.1"):
        unet_from_diffusers(pipeline)


# --- each library's samplers with the other's network -------------------------------------------------------


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
def test_diffusers_schedulers_drive_our_unet():
    """The README loop (set_timesteps, then step(model(x, t), t, x)) gives our samplers' results."""
    model = tiny_unet(scale=0.02)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    # DDIMScheduler has set_alpha_to_one=True by default; DPM-Solver's "leading" spacing differs from ours
    # (and from DDIM's), its "trailing" does not.
    for diffusers_scheduler, sampler, spacing in [
        (diffusers.DDIMScheduler, "ddim", "leading"),
        (diffusers.DPMSolverMultistepScheduler, "dpm++", "trailing"),
    ]:
        scheduler = NoiseScheduler(beta_schedule="cosine", timestep_spacing=spacing)
        ref = diffusers_scheduler.from_config(diffusers_scheduler_config(scheduler))
        ref.set_timesteps(10)
        x = noise
        with torch.no_grad():
            for t in ref.timesteps:
                x = ref.step(model(x, t), t, x).prev_sample
        ours = sample(model, scheduler, noise=noise, sampler=sampler, steps=10, progress=False)
        assert torch.isfinite(x).all()
        torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
def test_with_clip_sample_diffusers_ddim_matches_ours_only_with_the_clipped_models_eps():
    """README: with clip_sample, DDIMScheduler keeps the network's eps unless step() is given
    use_clipped_model_output=True; ddpm's DDIM re-derives eps from the clamped x0, as that option does."""
    model = tiny_unet(scale=0.02)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    scheduler = NoiseScheduler(beta_schedule="cosine", timestep_spacing="leading", clip_sample=True)
    ours = sample(model, scheduler, noise=noise, sampler="ddim", steps=10, progress=False)
    results = {}
    for clipped_eps in (False, True):
        ref = diffusers.DDIMScheduler.from_config(diffusers_scheduler_config(scheduler))
        assert ref.config.clip_sample is True
        ref.set_timesteps(10)
        x = noise
        with torch.no_grad():
            for t in ref.timesteps:
                x = ref.step(model(x, t), t, x, use_clipped_model_output=clipped_eps).prev_sample
        results[clipped_eps] = x
    torch.testing.assert_close(ours, results[True], rtol=1e-4, atol=1e-4)
    assert (ours - results[False]).abs().max() > 1e-2


def test_our_sampler_drives_a_diffusers_unet(cifar10_folder):
    """ddpm.sample with UNet2DModel behind a lambda equals ddpm.sample with the converted UNet."""
    folder, reference = cifar10_folder
    scheduler, noise = NoiseScheduler(), inputs(TINY_CIFAR10)
    with torch.no_grad():
        images = sample(
            lambda x, t, y: reference(x, t).sample, scheduler, noise=noise, steps=5, progress=False
        )
    assert torch.isfinite(images).all()
    converted = unet_from_diffusers(folder).eval()
    expected = sample(converted, scheduler, noise=noise, steps=5, progress=False)
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)


# --- torch.export -------------------------------------------------------------------------------------------


def test_torch_export_with_dynamic_batch_matches_eager():
    model = tiny_unet(num_classes=3, downsample="conv_asymmetric")
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 3])
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (x, t, y), dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    exported = program.module()
    for n in (2, 3, 1):
        x, t, y = torch.randn(n, 3, 8, 8), torch.randint(0, 1000, (n,)), torch.randint(0, 4, (n,))
        with torch.no_grad():
            torch.testing.assert_close(exported(x, t, y), model(x, t, y), rtol=0, atol=1e-5)


def test_load_for_sampling_takes_a_diffusers_pipeline_folder(tmp_path):
    unet = save_diffusers(tmp_path / "model", TINY_CIFAR10)
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    x, t = inputs(TINY_CIFAR10), torch.tensor([3, 700])
    for folder in (tmp_path / "pipe", tmp_path / "pipe" / "unet"):
        loaded = load_for_sampling(folder)
        model, ours = loaded.model, loaded.scheduler
        assert loaded.weights == "diffusers" and loaded.folder == folder and loaded.run_dir is None
        assert ours.config["beta_schedule"] == "cosine" and ours.config["prediction_type"] == "v_prediction"
        assert ours.config["clip_sample"] is True  # DDPMScheduler's default, kept
        torch.testing.assert_close(ours.alphas_cumprod.float(), scheduler.alphas_cumprod, rtol=0, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(model(x, t), unet(x, t).sample, rtol=0, atol=1e-4)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])  # DDIM has no sigmoid
def test_scheduler_from_diffusers_and_back(schedule):
    theirs = diffusers.DDIMScheduler(beta_schedule=schedule, timestep_spacing="trailing", clip_sample=False)
    ours = scheduler_from_diffusers(dict(theirs.config))
    assert ours.config["timestep_spacing"] == "trailing" and ours.config["clip_sample"] is False
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="thresholding"):
        scheduler_from_diffusers({**theirs.config, "thresholding": True, "sample_max_value": 2.0})
    # and back: our config as diffusers kwargs builds their scheduler with our alpha_bar
    again = diffusers.DDIMScheduler(**diffusers_scheduler_config(ours, "DDIMScheduler"))
    assert again.config.beta_schedule == schedule
    torch.testing.assert_close(ours.alphas_cumprod.float(), again.alphas_cumprod, rtol=0, atol=1e-6)
    assert scheduler_from_diffusers(diffusers_scheduler_config(ours)).config == ours.config


# --- diffusers scheduler configs ----------------------------------------------------------------------------

DIFFUSERS_SCHEDULERS = [
    diffusers.DDPMScheduler,
    diffusers.DDIMScheduler,
    diffusers.DPMSolverMultistepScheduler,
]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize("by_name", [False, True])
@pytest.mark.parametrize("cls", DIFFUSERS_SCHEDULERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("clip_sample", [False, True])
def test_diffusers_scheduler_config_builds_each_diffusers_scheduler_and_round_trips(
    cls, by_name, clip_sample
):
    ours = NoiseScheduler(
        beta_schedule="cosine",
        prediction_type="v_prediction",
        timestep_spacing="linspace",
        steps_offset=1,
        clip_sample=clip_sample,
    )
    kwargs = diffusers_scheduler_config(ours, cls.__name__ if by_name else cls)
    for theirs in (cls(**kwargs), cls.from_config(kwargs)):
        assert type(theirs) is cls and theirs.config.beta_schedule == "squaredcos_cap_v2"
        assert (
            theirs.config.prediction_type == "v_prediction" and theirs.config.timestep_spacing == "linspace"
        )
        torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=0, atol=1e-6)
        assert scheduler_from_diffusers(dict(theirs.config)).config == ours.config
    assert scheduler_from_diffusers(kwargs).config == ours.config


def test_diffusers_scheduler_config_sets_the_samplers_maths():
    """DDIM steps to alpha_bar = 1 at the end; DPM-Solver is DPM-Solver++(2M) ending at sigma = 0; clipping
    to [-1, 1] is DPM-Solver's thresholding with sample_max_value = 1 (its clamp is then exactly [-1, 1])."""
    scheduler = NoiseScheduler(clip_sample=True)
    assert diffusers_scheduler_config(scheduler, "DDIMScheduler")["set_alpha_to_one"] is True
    dpm = diffusers_scheduler_config(scheduler, "DPMSolverMultistepScheduler")
    assert "clip_sample" not in dpm and "clip_sample_range" not in dpm
    assert dpm["thresholding"] is True and dpm["sample_max_value"] == 1.0
    assert (dpm["algorithm_type"], dpm["solver_order"], dpm["final_sigmas_type"]) == (
        "dpmsolver++",
        2,
        "zero",
    )
    assert diffusers_scheduler_config(scheduler) == diffusers_scheduler_config(scheduler, "DDPMScheduler")


def test_diffusers_scheduler_config_refuses_what_the_target_cannot_express():
    with pytest.raises(ValueError, match="clip_sample_range=0.5 .*DPMSolverMultistepScheduler"):
        diffusers_scheduler_config(
            NoiseScheduler(clip_sample=True, clip_sample_range=0.5), diffusers.DPMSolverMultistepScheduler
        )
    with pytest.raises(ValueError, match="unknown diffusers scheduler 'EulerDiscreteScheduler'; valid: DDPM"):
        diffusers_scheduler_config(NoiseScheduler(), "EulerDiscreteScheduler")


def test_scheduler_from_diffusers_reads_thresholding_at_one_as_clipping():
    """_threshold_sample clamps its percentile s to [1, sample_max_value]: at 1 that is x0.clamp(-1, 1)."""
    base = dict(diffusers.DDPMScheduler(clip_sample=False).config)
    clipped = scheduler_from_diffusers({**base, "thresholding": True, "sample_max_value": 1.0})
    assert clipped.config["clip_sample"] is True and clipped.config["clip_sample_range"] == 1.0
    both = {**base, "thresholding": True, "clip_sample": True, "clip_sample_range": 0.5}
    assert scheduler_from_diffusers(both).config["clip_sample_range"] == 0.5
    with pytest.raises(ValueError, match="thresholding with sample_max_value=2.0"):
        scheduler_from_diffusers({**base, "thresholding": True, "sample_max_value": 2.0})


# --- the docs' code blocks ---------------------------------------------------------------------------------


def checked_doc_blocks() -> dict[str, str]:
    """The ```python blocks of README.md and docs/ whose first line is `# checked`, by page and the heading
    above them."""
    blocks = {}
    for page in DOC_PAGES:
        heading = ""
        for part in re.split(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M):
            if part.startswith("# checked\n"):
                name = f"{page.relative_to(ROOT)}: {heading}"
                blocks[name if name not in blocks else f"{name} ({len(blocks)})"] = part
            else:
                heading = (re.findall(r"^#+ (.*)$", part, flags=re.M) or [heading])[-1]
    return blocks


CHECKED_BLOCKS = checked_doc_blocks()


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize("name", list(CHECKED_BLOCKS))
def test_each_checked_docs_block_runs_alone_as_written(name, tmp_path, monkeypatch):
    """Each block in a fresh namespace and folder holding only the folders the docs name: a (tiny)
    download of google/ddpm-cifar10-32, a (tiny) CIFAR-10 run's EMA weights and a (tiny) class-conditional
    digits run's; diffusers copies the code of an exported folder into a fresh modules cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(diffusers.utils.dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    smallest = {**TINY_2_LEVELS, "block_out_channels": [4, 4], "norm_num_groups": 2, "add_attention": False}
    smallest |= {"down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2}
    save_diffusers(tmp_path / "ddpm-cifar10-32", smallest)
    diffusers.DDPMScheduler().save_config(tmp_path / "ddpm-cifar10-32")  # as published: clip_sample=True
    model = tiny_unet(
        base_channels=4, channel_mult=(1,), attention_resolutions=(), mid_attention=False, norm_groups=2
    )
    save_pretrained(tmp_path / "runs/cifar10/checkpoints/step-0500000/ema", model, NoiseScheduler())
    digits = tiny_unet(
        in_channels=1, out_channels=1, base_channels=4, channel_mult=(1,), attention_resolutions=(),
        mid_attention=False, norm_groups=2, num_classes=10,
    )  # fmt: skip
    schedule = NoiseScheduler(
        beta_schedule="cosine", prediction_type="v_prediction", timestep_spacing="exponential"
    )
    save_pretrained(tmp_path / "runs/digits/checkpoints/step-0000060/ema", digits, schedule)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only wait for each other on a shared machine
    try:
        exec(compile(CHECKED_BLOCKS[name], name, "exec"), {"__name__": "docs"})
    finally:
        torch.set_num_threads(threads)


def test_the_docs_have_their_checked_blocks():
    assert len(CHECKED_BLOCKS) == 9, list(CHECKED_BLOCKS)  # the parser finds them all


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize("spacing", ["karras", "exponential"])
def test_sigma_spacings_export_as_dpm_solver_sigma_flags_and_come_back(spacing):
    """diffusers has no timestep_spacing "karras": DPMSolverMultistepScheduler takes use_karras_sigmas (or,
    for "exponential", use_lu_lambdas: uniform in log-SNR is uniform in log sigma), with sigmas between the
    same ends (to its float32 table's precision); reading the config back gives our spacing, and so does
    diffusers' use_exponential_sigmas."""
    ours = NoiseScheduler(timestep_spacing=spacing)
    kwargs = diffusers_scheduler_config(ours, "DPMSolverMultistepScheduler")
    assert kwargs[SIGMA_SPACING_FLAGS[spacing]] is True and kwargs["timestep_spacing"] == "linspace"
    theirs = diffusers.DPMSolverMultistepScheduler(**kwargs)
    theirs.set_timesteps(10)
    ab = ours.alpha_bar(ours.inference_timesteps(10))
    torch.testing.assert_close(theirs.sigmas[:-1].double(), ((1 - ab) / ab).sqrt(), rtol=3e-4, atol=0)
    assert scheduler_from_diffusers(dict(theirs.config)).config == ours.config
    with pytest.raises(ValueError, match=f"timestep_spacing='{spacing}' has no equivalent in DDIMScheduler"):
        diffusers_scheduler_config(ours, "DDIMScheduler")
    exponential = {**kwargs, SIGMA_SPACING_FLAGS[spacing]: False, "use_exponential_sigmas": True}
    assert scheduler_from_diffusers(exponential).config["timestep_spacing"] == "exponential"


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
def test_exponential_spacing_runs_where_diffusers_exponential_sigmas_repeat_the_first_timestep():
    """On the cosine schedule use_exponential_sigmas gives timesteps 998, 998, 998, ... and its step raises
    IndexError past the end (diffusers #12771); the same grid as use_lu_lambdas starts at 999 and runs."""
    kwargs = diffusers_scheduler_config(
        NoiseScheduler(beta_schedule="cosine", timestep_spacing="exponential"), "DPMSolverMultistepScheduler"
    )
    for flags, raises in [({"use_lu_lambdas": False, "use_exponential_sigmas": True}, True), ({}, False)]:
        scheduler = diffusers.DPMSolverMultistepScheduler(**{**kwargs, **flags})
        scheduler.set_timesteps(20)
        x = torch.zeros(1, 1, 2, 2)
        try:
            for t in scheduler.timesteps:
                x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
        except IndexError:
            assert raises and scheduler.timesteps[:2].tolist() == [998, 998]
        else:
            assert not raises and scheduler.timesteps[0] == 999
