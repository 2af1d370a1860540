"""`python -m ddpm.export`: our UNet as a diffusers DDPMPipeline folder, checked against diffusers itself
(UNet2DModel.from_pretrained computes our function to 1e-4, DDPMPipeline.from_pretrained samples), read back
by unet_from_diffusers, and refused, naming the option, where UNet2DModel cannot express the model."""

import json
import re
from pathlib import Path

import pytest
import torch
from test_unet import perturb  # pytest puts tests/ on sys.path

from ddpm.export import export_pipeline, main
from ddpm.interop.diffusers import (
    EXPORTED_UNET_OPTIONS,
    diffusers_unet_config,
    unet_from_diffusers,
    unet_kwargs_from_diffusers,
)
from ddpm.io import EMA, save_pretrained
from ddpm.models.classic import ClassicUNet
from ddpm.models.unet import UNet
from ddpm.run_dir import TRAINER_STATE, checkpoint_path
from ddpm.schedule import NoiseScheduler

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # in diffusers

BASE = dict(
    in_channels=3,
    out_channels=3,
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    image_size=8,
    norm_groups=4,
)
VARIANTS = {
    "defaults": {},  # scale_shift, [sin, cos], symmetric padding, one head
    "ddpm_paper": dict(
        time_injection="add", time_flip_sin_to_cos=True, time_freq_shift=1.0, downsample="conv_asymmetric"
    ),
    "classes_heads": dict(num_classes=3, head_channels=4, dropout=0.1, mid_attention=False),
    "equal_widths_two_heads": dict(channel_mult=(1, 1), attention_resolutions=(8, 4), num_heads=2),
    "classes_without_null_label": dict(num_classes=3, null_label=False, time_channels=8),
}


def tiny(seed: int = 0, **overrides) -> UNet:
    torch.manual_seed(seed)
    return perturb(UNet(**{**BASE, **overrides}), 0.1).eval()


def diffusers_output(unet, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        return unet(x, t, class_labels=y).sample


def inputs(model: UNet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 8, 8, generator=generator)
    null = model.null_class if model.null_class is not None else 1
    y = torch.tensor([0, 2, null]) if model.num_classes else None  # the null label too
    return x, torch.tensor([0, 17, 999]), y


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_exported_unet_computes_our_function_in_diffusers_and_comes_back(name, tmp_path):
    model = tiny(**VARIANTS[name])
    save_pretrained(tmp_path / "model", model, NoiseScheduler(beta_schedule="cosine"))
    export_pipeline(tmp_path / "model", tmp_path / "out")

    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "out" / "unet").eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        ours = model(x, t, y)
    torch.testing.assert_close(diffusers_output(theirs, x, t, y), ours, atol=1e-4, rtol=1e-4)
    # every tensor of UNet2DModel came from the file (none left at its initialisation)
    assert set(theirs.state_dict()) == set(
        diffusers.UNet2DModel(**diffusers_unet_config(model.config)).state_dict()
    )

    back = unet_from_diffusers(tmp_path / "out").eval()  # the pipeline folder, read by our importer
    # heads come back as head_channels, attention levels as their sides: the same network, checked below
    spelled_otherwise = ("num_heads", "head_channels", "attention_resolutions", "null_label", "time_channels")
    assert {k: v for k, v in back.config.items() if k not in spelled_otherwise} == {
        k: v for k, v in model.config.items() if k not in spelled_otherwise
    }
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, y), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("spacing", "scheduler_class"),
    [("trailing", "DDPMScheduler"), ("exponential", "DPMSolverMultistepScheduler")],
)
def test_ddpm_pipeline_loads_the_folder_and_samples_with_our_schedule(spacing, scheduler_class, tmp_path):
    scheduler = NoiseScheduler(
        num_train_timesteps=100,
        beta_schedule="cosine",
        prediction_type="v_prediction",
        timestep_spacing=spacing,
    )
    save_pretrained(tmp_path / "model", tiny(), scheduler)
    export_pipeline(tmp_path / "model", tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["scheduler"] == ["diffusers", scheduler_class]

    pipeline = diffusers.DDPMPipeline.from_pretrained(tmp_path / "out")
    assert type(pipeline.scheduler).__name__ == scheduler_class
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    assert pipeline.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 8, 8, 3) and ((images >= 0) & (images <= 1)).all()


def run_dir(root: Path) -> tuple[UNet, UNet]:
    """A run directory whose one checkpoint holds raw and (different) EMA weights."""
    raw, ema = tiny(seed=0), tiny(seed=1)
    checkpoint = checkpoint_path(root, 10)
    save_pretrained(checkpoint, raw, NoiseScheduler())
    save_pretrained(checkpoint / EMA, ema, NoiseScheduler())
    (checkpoint / TRAINER_STATE).write_text(json.dumps({"step": 10, "ema_updates": 10}))
    return raw, ema


@pytest.mark.parametrize("raw", [False, True])
def test_the_cli_exports_the_ema_weights_of_a_run_or_the_raw_ones(raw, tmp_path, capsys):
    raw_model, ema_model = run_dir(tmp_path / "run")
    main([str(tmp_path / "run"), str(tmp_path / "out")] + (["--raw"] if raw else []))
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "out")
    assert f"exported the {'raw' if raw else 'ema'} weights of {checkpoint_path(tmp_path / 'run', 10)}" in err
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "out" / "unet").eval()
    x, t, _ = inputs(raw_model)
    with torch.no_grad():
        expected = (raw_model if raw else ema_model)(x, t)
    torch.testing.assert_close(diffusers_output(theirs, x, t, None), expected, atol=1e-4, rtol=1e-4)
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        (dict(time_conditioning=False), "model.time_conditioning=False"),
        (dict(downsample="maxpool"), "model.downsample='maxpool'"),
        (dict(head_kernel_size=1), "model.head_kernel_size=1"),
        (dict(channel_mult=(2, 2)), r"model.channel_mult\[0\]=2"),
        (dict(time_scale=2.0), "model.time_scale=2.0"),
        (dict(resblock_updown=True), "model.resblock_updown=True"),
        (dict(num_heads=2), "model.num_heads=2"),  # attention 16 wide at 4x4, 16 in the middle: fine...
    ],
)
def test_what_unet2dmodel_cannot_express_is_refused_naming_the_option(overrides, option, tmp_path):
    if overrides == dict(num_heads=2):
        overrides = dict(num_heads=2, attention_resolutions=(8, 4))  # ...but 8 and 16 wide: no one head width
    save_pretrained(tmp_path / "model", tiny(**overrides), NoiseScheduler())
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "model"), str(tmp_path / "out")])
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert re.search(option, message) and "cannot be exported to diffusers" in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_an_existing_out_folder_and_a_classic_unet_are_refused(tmp_path):
    save_pretrained(tmp_path / "model", tiny(), NoiseScheduler())
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="exists; export into a new folder"):
        export_pipeline(tmp_path / "model", tmp_path / "out")
    classic = ClassicUNet(base_channels=4, channel_mult=(1, 2), image_size=8, time_conditioning=True)
    save_pretrained(tmp_path / "classic", classic, NoiseScheduler())
    with pytest.raises(ValueError, match="model.architecture=ClassicUNet cannot be exported"):
        export_pipeline(tmp_path / "classic", tmp_path / "out2")


def test_an_option_the_export_does_not_map_exports_only_at_its_default():
    """Options added to UNet later (or unknown here) are refused unless at their default, never dropped."""
    config = tiny().config
    assert set(config) > EXPORTED_UNET_OPTIONS
    with pytest.raises(ValueError, match="model.future_option=3 cannot be exported to diffusers"):
        diffusers_unet_config({**config, "future_option": 3})


def test_the_null_class_survives_the_round_trip_and_plain_diffusers_classes_get_a_zero_row():
    config = diffusers_unet_config(tiny(num_classes=3).config)
    assert config["num_class_embeds"] == 4 and config["_ddpm_null_class"] == 3
    assert unet_kwargs_from_diffusers(config)["num_classes"] == 3
    del config["_ddpm_null_class"]  # a UNet2DModel with 4 classes of its own
    assert unet_kwargs_from_diffusers(config)["num_classes"] == 4
