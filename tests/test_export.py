"""`python -m ddpm.export`: our UNet as a diffusers pipeline folder, checked against diffusers itself
(UNet2DModel.from_pretrained computes our function to 1e-4; DDPMPipeline, and for a class-conditional model
our ClassConditionalPipeline, load the folder and sample to the end; the exported scheduler runs diffusers'
own loop to the end at every step count on every shipped config's schedule), read back by
unet_from_diffusers, and refused, naming the option, where UNet2DModel cannot express the model."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from test_config import DIGITS_YAML, SHIPPED_CONFIGS  # pytest puts tests/ on sys.path
from test_unet import perturb

import ddpm
from ddpm.conditions import Conditions
from ddpm.config import build_schedule
from ddpm.export import export_pipeline, main
from ddpm.interop.diffusers import (
    COND_CHANNELS_KEY,
    CONDITIONAL_PIPELINE,
    EXPORTED_UNET_OPTIONS,
    NULL_CLASS_KEY,
    PIPELINE_SPACINGS,
    diffusers_unet_config,
    save_diffusers_unet,
    unet_from_diffusers,
    unet_kwargs_from_diffusers,
)
from ddpm.io import EMA, save_pretrained
from ddpm.models.classic import ClassicUNet
from ddpm.models.unet import UNet, image_condition_input
from ddpm.run_dir import TRAINER_STATE, checkpoint_path
from ddpm.schedule import TIMESTEP_SPACINGS, NoiseScheduler

diffusers = pytest.importorskip("diffusers")
class_conditional_pipeline = pytest.importorskip("ddpm.interop.class_conditional_pipeline")
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


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: on a shared machine more threads only wait for each other (30x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    ("spacing", "scheduler_class", "runs_as"),
    [
        ("trailing", "DDPMScheduler", {"timestep_spacing": "linspace"}),
        ("exponential", "DPMSolverMultistepScheduler", {"use_lu_lambdas": True}),
    ],
)
def test_ddpm_pipeline_loads_the_folder_and_samples_with_our_schedule(
    spacing, scheduler_class, runs_as, tmp_path
):
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
    assert {key: pipeline.scheduler.config[key] for key in runs_as} == runs_as
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


@pytest.mark.parametrize("classes", [None, 3])
def test_an_image_conditioned_unet_computes_our_function_in_diffusers_on_x_image_and_flag(classes, tmp_path):
    """in_channels = 3 + 2 + 1, the sample [x, image, flag]: rows 0 and 1 have their image, row 2 the null one
    (flag 0, image zeros), each equal to ours; with labels, they go in class_labels (the null label too)."""
    model = tiny(cond_channels=2, num_classes=classes)
    save_diffusers_unet(tmp_path / "unet", model)
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["in_channels"] == 6 and config[COND_CHANNELS_KEY] == 2
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet").eval()

    x, t, y = inputs(model)
    image = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    dropped = torch.tensor([False, False, True])
    values = {"image": image, **({"label": y} if classes else {})}
    with torch.no_grad():
        ours = model(x, t, Conditions(values, dropped={"image": dropped}))
    sample = image_condition_input(x, image, dropped)
    assert torch.equal(sample[:, :3], x) and torch.equal(sample[:2, 3:5], image[:2])
    assert torch.equal(sample[2, 3:], torch.zeros(3, 8, 8))
    assert torch.equal(sample[:2, 5], torch.ones(2, 8, 8))
    torch.testing.assert_close(diffusers_output(theirs, sample, t, y), ours, atol=1e-5, rtol=1e-5)
    # the image matters: with every image dropped, rows 0 and 1 change and row 2 does not
    with torch.no_grad():
        unconditional = model(x, t, Conditions(values, dropped={"image": torch.ones(3, dtype=torch.bool)}))
    assert (ours[:2] - unconditional[:2]).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    torch.testing.assert_close(ours[2], unconditional[2])

    back = unet_from_diffusers(tmp_path / "unet").eval()
    assert back.cond_channels == 2 and back.in_channels == 3 and back.num_classes == classes
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, Conditions(values, dropped={"image": dropped})), ours)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(cond_dim=5), r"model\.cond_dim=5 cannot be exported to diffusers: .*never a projection"),
        (dict(num_classes=3, cond_dim=5), r"model\.cond_dim=5 cannot be exported to diffusers"),
        (dict(context_dim=6), r"model\.context_dim=6 cannot be exported to diffusers: .*no cross-attention"),
    ],
)
def test_vector_and_sequence_conditions_are_refused_by_name_with_the_reason(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        save_diffusers_unet(tmp_path / "unet", tiny(**overrides))
    assert not (tmp_path / "unet").exists()


def test_an_image_conditioned_pipeline_is_refused_by_name(tmp_path):
    save_pretrained(tmp_path / "model", tiny(cond_channels=2), NoiseScheduler())
    refusal = r"model\.cond_channels=2 cannot be exported as a diffusers pipeline: .*save_diffusers_unet"
    with pytest.raises(ValueError, match=refusal):
        export_pipeline(tmp_path / "model", tmp_path / "out")
    assert not (tmp_path / "out").exists()


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


# --- diffusers' own loop and pipelines, run to the end ------------------------------------------------------


def shipped_schedules() -> dict[str, dict]:
    """Each distinct `diffusion:` section of the shipped configs that has discrete timesteps (the EDM one has
    none: its export is refused, below), by the first config that has it."""
    found = {}
    for path in SHIPPED_CONFIGS:
        section = yaml.safe_load(path.read_text())["diffusion"]
        if section.get("formulation") != "edm" and section not in found.values():
            found[f"{path.parent.name}/{path.name}"] = section
    return found


SHIPPED_SCHEDULES = shipped_schedules()
# Every count to 40; those at which diffusers' "trailing" lays out one timestep too many (61, 103); and
# N = T, DDPMPipeline's default, where DPM-Solver's "leading" and "linspace" repeat one.
STEP_COUNTS = [*range(1, 41), 61, 100, 103, 250, 1000]


def point_mass_unet(scheduler, c: float):
    """unet(x, t) for data that is the constant c, as diffusers' loop calls it, and the list of the t it was
    called at: the exact prediction (in the scheduler's prediction type) at timestep t clamped to 0..T-1,
    the only ones a network is trained on. Every sampler that keeps to its timesteps ends exactly at c."""
    alpha_bar = scheduler.alphas_cumprod.double()
    calls = []

    def unet(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(int(t))
        ab = alpha_bar[min(max(int(t), 0), len(alpha_bar) - 1)]
        eps = (x.double() - ab.sqrt() * c) / (1 - ab).sqrt()
        out = {
            "epsilon": eps,
            "sample": torch.full_like(eps, c),
            "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * c,
        }[scheduler.config.prediction_type]
        return out.float()

    return unet, calls


def test_the_shipped_schedules_are_those_of_the_configs():
    """digits, cifar10_v and folder share one (cosine, v, exponential); cifar10 is linear and epsilon; the
    seed write-up's is trailing: every spacing a shipped config saves is exported and run below."""
    assert len(SHIPPED_SCHEDULES) == 3, list(SHIPPED_SCHEDULES)
    assert {section["timestep_spacing"] for section in SHIPPED_SCHEDULES.values()} == {
        "exponential",
        "trailing",
    }


@pytest.mark.parametrize("scheduler_class", list(PIPELINE_SPACINGS))
@pytest.mark.parametrize("config", list(SHIPPED_SCHEDULES))
def test_the_exported_scheduler_runs_diffusers_loop_to_the_end_at_every_step_count(
    config, scheduler_class, tmp_path
):
    """The exported scheduler/ in the loop of DDPMPipeline and diffusers' docs (`for t in
    scheduler.timesteps: x = scheduler.step(unet(x, t), t, x).prev_sample`), with nothing else called:
    exactly N network calls, each at a timestep in 0..T-1, ending at the data. Before, a DPMSolverMultistep
    Scheduler with use_exponential_sigmas raised IndexError at 6 and more steps on the cosine schedule, and
    the "trailing" spacing made N + 1 calls, the last at t = -1, at 61 or 103 steps."""
    save_pretrained(tmp_path / "model", tiny(), build_schedule(SHIPPED_SCHEDULES[config]))
    export_pipeline(tmp_path / "model", tmp_path / "out", scheduler_class=scheduler_class)
    scheduler = getattr(diffusers, scheduler_class).from_pretrained(tmp_path / "out" / "scheduler")
    top = scheduler.config.num_train_timesteps - 1
    for steps in STEP_COUNTS:
        unet, calls = point_mass_unet(scheduler, 0.5)
        scheduler.set_timesteps(steps)
        x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(steps))
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t), t, x).prev_sample
        assert len(calls) == steps and min(calls) >= 0 and max(calls) <= top, (steps, calls[:3], calls[-3:])
        torch.testing.assert_close(x, torch.full_like(x, 0.5), atol=1e-4, rtol=0, msg=f"{steps} steps")


@pytest.mark.parametrize("config", list(SHIPPED_SCHEDULES))
def test_ddpm_pipeline_samples_an_unconditional_export_to_the_end(config, tmp_path):
    """`DDPMPipeline.from_pretrained(OUT)(...)` as a user calls it, at the step counts of the issue (before:
    IndexError at 10 steps and more for the digits config's schedule)."""
    save_pretrained(tmp_path / "model", tiny(), build_schedule(SHIPPED_SCHEDULES[config]))
    export_pipeline(tmp_path / "model", tmp_path / "out")
    pipeline = diffusers.DDPMPipeline.from_pretrained(tmp_path / "out")
    pipeline.set_progress_bar_config(disable=True)
    for steps in (1, 10, 20, 25, 50, 100):
        images = pipeline(num_inference_steps=steps, generator=torch.manual_seed(0), output_type="pt").images
        assert images.shape == (1, 3, 8, 8) and bool(((images >= 0) & (images <= 1)).all()), steps


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """diffusers copies the code a folder brings into HF_MODULES_CACHE before importing it: a fresh one."""
    import diffusers.utils.dynamic_modules_utils as dynamic_modules

    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))


def test_a_conditional_export_samples_its_labels_with_guidance_as_ddpm_does(tmp_path, modules_cache, capsys):
    """The documented way: DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True) gives our
    ClassConditionalPipeline, whose labels and classifier-free guidance compute what ddpm.sample computes
    (DDIM on the same grid, the same x_T). Before, the folder was a DDPMPipeline, which passes no labels."""
    model = tiny(num_classes=3)
    # the digits schedule (cosine, v-prediction) with its clip_sample: the pipeline asks DDIM for the
    # eps of the clamped x0 (use_clipped_model_output), which ddpm's DDIM uses (before: the model's own eps)
    digits = yaml.safe_load(DIGITS_YAML.read_text())["diffusion"]
    assert digits["clip_sample"] is True
    digits = build_schedule(digits)
    save_pretrained(tmp_path / "model", model, digits)
    main([str(tmp_path / "model"), str(tmp_path / "out"), "--scheduler", "DDIMScheduler"])
    said = capsys.readouterr().err
    assert "as a diffusers ClassConditionalPipeline (labels 0-2, and 3 for none;" in said
    assert "trust_remote_code=True" in said and "with a DDIMScheduler, 'leading' spacing" in said
    assert "(the model's is 'exponential', which DDIMScheduler does not run correctly" in said
    module, name = CONDITIONAL_PIPELINE
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"] == [module, name]
    copied = (tmp_path / "out" / f"{module}.py").read_text()
    assert copied == Path(class_conditional_pipeline.__file__).read_text()

    pipeline = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert type(pipeline).__name__ == name and pipeline.null_class == 3
    pipeline.set_progress_bar_config(disable=True)
    labels, shape = [0, 2, 1], (3, 3, 8, 8)
    images = pipeline(
        labels, guidance_scale=3.0, num_inference_steps=10, generator=torch.manual_seed(0), output_type="pt"
    ).images
    leading = NoiseScheduler(**{**digits.config, "timestep_spacing": "leading"})
    x0 = ddpm.sample(
        model,
        leading,
        noise=torch.randn(shape, generator=torch.manual_seed(0)),
        sampler="ddim",
        steps=10,
        y=torch.tensor(labels),
        guidance_scale=3.0,
        progress=False,
    )
    torch.testing.assert_close(images, (x0 / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=0)


def test_a_conditional_export_in_plain_ddpm_pipeline_says_what_to_do(tmp_path, modules_cache):
    """DDPMPipeline.from_pretrained on a conditional folder names trust_remote_code (diffusers' own message),
    instead of failing at the first UNet call with "class_labels should be provided"; with it, the folder's
    pipeline draws unconditional images (the null label) when called without labels, as DDPMPipeline is."""
    save_pretrained(tmp_path / "model", tiny(num_classes=3), NoiseScheduler(timestep_spacing="exponential"))
    export_pipeline(tmp_path / "model", tmp_path / "out")
    with pytest.raises(
        ValueError, match="(?s)custom code in class_conditional_pipeline.py.*trust_remote_code=True"
    ):
        diffusers.DDPMPipeline.from_pretrained(tmp_path / "out")
    pipeline = diffusers.DDPMPipeline.from_pretrained(tmp_path / "out", trust_remote_code=True)
    pipeline.set_progress_bar_config(disable=True)
    for steps in (1, 10, 20, 25):
        images = pipeline(batch_size=2, num_inference_steps=steps, output_type="np").images
        assert images.shape == (2, 8, 8, 3), steps
    with pytest.raises(ValueError, match=r"class_labels must lie in 0..3 \(3: no label\), got \[4\]"):
        pipeline([0, 4], num_inference_steps=2)


def test_the_pipeline_class_refuses_what_the_unet_cannot_do(tmp_path):
    """Without a null label there are no unconditional images and no guidance; said, not crashed."""
    save_pretrained(tmp_path / "model", tiny(num_classes=3, null_label=False), NoiseScheduler())
    export_pipeline(tmp_path / "model", tmp_path / "out")
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "out" / "unet")
    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path / "out" / "scheduler")
    pipeline = class_conditional_pipeline.ClassConditionalPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.null_class is None
    with pytest.raises(ValueError, match=r"class_labels are needed: .* pass labels in 0..2"):
        pipeline(num_inference_steps=2)
    with pytest.raises(ValueError, match="guidance_scale=2.0 needs a null label"):
        pipeline([1], guidance_scale=2.0, num_inference_steps=2)
    assert pipeline(1, batch_size=2, num_inference_steps=2, output_type="np").images.shape == (2, 8, 8, 3)


def test_the_pipeline_module_reads_the_null_label_under_our_key():
    assert class_conditional_pipeline.NULL_CLASS_KEY == NULL_CLASS_KEY


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
def test_every_spacing_exports_to_one_its_scheduler_runs(spacing, tmp_path):
    """The default scheduler keeps the spacing where it runs it correctly ('exponential', 'leading',
    'linspace') and says which it runs instead otherwise; an EDM model is refused, naming the formulation."""
    save_pretrained(tmp_path / "model", tiny(), NoiseScheduler(timestep_spacing=spacing))
    said = export_pipeline(tmp_path / "model", tmp_path / "out")
    cls = "DPMSolverMultistepScheduler" if spacing in ("karras", "exponential") else "DDPMScheduler"
    runs = spacing if spacing in PIPELINE_SPACINGS[cls] else PIPELINE_SPACINGS[cls][0]
    assert said.endswith(
        f"with a {cls}, {runs!r} spacing"
        + (
            f" (the model's is {spacing!r}, which {cls} does not run correctly at every step count)"
            if runs != spacing
            else ""
        )
    )


def test_an_edm_model_is_refused_naming_its_formulation(tmp_path):
    edm = next(p for p in SHIPPED_CONFIGS if yaml.safe_load(p.read_text())["diffusion"].get("formulation"))
    save_pretrained(tmp_path / "model", tiny(), build_schedule(yaml.safe_load(edm.read_text())["diffusion"]))
    with pytest.raises(ValueError, match=r"diffusion.formulation=edm\) has no DPMSolverMultistepScheduler"):
        export_pipeline(tmp_path / "model", tmp_path / "out")
