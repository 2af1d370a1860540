"""Progressive distillation (ddpm.losses.progressive_target, ddpm.training.distiller, ddpm.distill): the
target against the exact-score mixture, whose exact denoiser makes the ideal student known (for every
prediction type and the EDM formulation), then tiny runs on the digits: the loss falls, the student (of a
teacher of either formulation) is a run folder that sample.py samples with no flags, resume is exact, and bad
settings are refused with one line."""

import json
import multiprocessing
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from conftest import TINY_MODEL, TINY_TEACHER
from safetensors.torch import load_file, save_file
from test_condition_files import folder_config, make_folder
from test_edm import exact_edm_network
from test_superres import run_sample_cli, write_png

from ddpm import sample
from ddpm.config import ConfigError, build_model, load_config
from ddpm.data import build_dataset, item_conditions, superres_condition
from ddpm.digit_strips import EMPTY, sequence_tokens
from ddpm.distill import main as ddpm_distill
from ddpm.edm import EDMScheduler
from ddpm.exact_score import MIXTURE, GaussianMixture, exact_predictor
from ddpm.inference import generate, load_for_sampling
from ddpm.losses import progressive_distillation_losses, progressive_target
from ddpm.samplers import denoiser
from ddpm.schedule import NoiseScheduler
from ddpm.training import Trainer
from ddpm.training.distiller import Distiller, _check_guidance, start_distillation
from ddpm.training.interruption import STOP_HINT


def distill_main(argv: list[str]) -> None:
    """`python -m ddpm.distill` with --method progressive, these tests' method (the default is consistency,
    tests/test_consistency.py)."""
    ddpm_distill(["--method", "progressive", *argv])


ROOT = Path(__file__).resolve().parents[1]


# ---- the target, on the exact-score mixture ----------------------------------------------------------------


def schedule(prediction_type: str) -> NoiseScheduler | EDMScheduler:
    """The digits' cosine schedule on the trailing grid; linear for epsilon, since at the cosine's
    alpha_bar_{T-1} = 2.4e-9 the x0 of an epsilon prediction, (x - s eps) / a, loses 7 digits to cancellation
    (the exact teacher's own x0 errs by 4e-4 there: why ddpm.distill refuses epsilon teachers). "edm": the
    EDM formulation (its defaults) on its trailing grid, a distilled student's."""
    if prediction_type == "edm":
        return EDMScheduler(timestep_spacing="trailing")
    beta_schedule = "linear" if prediction_type == "epsilon" else "cosine"
    return NoiseScheduler(
        beta_schedule=beta_schedule, prediction_type=prediction_type, timestep_spacing="trailing"
    )


def exact_network(scheduler: NoiseScheduler | EDMScheduler):
    """The exact network of MIXTURE's data under `scheduler`: `exact_predictor`, or EDM's F (test_edm)."""
    if isinstance(scheduler, EDMScheduler):
        return exact_edm_network(MIXTURE, scheduler)
    return exact_predictor(MIXTURE, scheduler)


def ideal_student(teacher_denoise, scheduler: NoiseScheduler, student_steps: int):
    """The network whose one DDIM step is two of the teacher's at every timestep of the student's grid: the
    target x~ of the step it stands at, written as the scheduler's prediction (x0, eps, v or EDM's F, all in
    the samplers' frame)."""
    grid = scheduler.inference_timesteps(2 * student_steps)
    abars = torch.cat([scheduler.alpha_bar(grid), torch.ones(1, dtype=torch.float64)])

    def model(x, t, y=None):
        i = (t[:, None] == grid[None, :]).long().argmax(dim=1)  # (N,) each row's place in the teacher grid
        ab_t, ab_mid, ab_next = (abars[j].reshape(-1, 1, 1, 1) for j in (i, i + 1, i + 2))
        t_mid = grid[i + 1]
        x0 = progressive_target(teacher_denoise, x, t, t_mid, ab_t, ab_mid, ab_next)
        eps = (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()
        return {
            "sample": x0,
            "epsilon": eps,
            "v_prediction": ab_t.sqrt() * eps - (1 - ab_t).sqrt() * x0,
            "edm": (x0 - ab_t.sqrt() * x) / (1 - ab_t).sqrt(),  # x0 = a x + s F (ddpm.edm)
        }[scheduler.prediction_type]

    return model


@pytest.mark.parametrize("num_train_timesteps", [100, 1000, 1024, 4000])
def test_the_students_trailing_grid_is_every_other_timestep_of_its_teachers(num_train_timesteps):
    # The student samples with DDIM on the trailing grid of n steps: the timesteps it was trained on
    scheduler = NoiseScheduler(num_train_timesteps=num_train_timesteps, timestep_spacing="trailing")
    n = 1
    while 2 * n <= num_train_timesteps:
        assert torch.equal(scheduler.inference_timesteps(2 * n)[::2], scheduler.inference_timesteps(n)), n
        n *= 2


def test_an_edm_students_trailing_grid_nests_in_its_teachers_and_ends_above_sigma_min():
    # EDM's "trailing": the Karras grid of n + 1 levels without sigma_min, so that n's is every other of 2n's
    scheduler = EDMScheduler(timestep_spacing="trailing")
    n = 1
    while 2 * n <= scheduler.num_train_timesteps:
        grid = scheduler.inference_timesteps(n)
        torch.testing.assert_close(scheduler.inference_timesteps(2 * n)[::2], grid, rtol=0, atol=1e-12)
        karras = EDMScheduler().inference_timesteps(n + 1)
        torch.testing.assert_close(grid, karras[:n], rtol=0, atol=0)
        sigmas = scheduler.sigma(grid)
        assert sigmas[0].item() == pytest.approx(80) and sigmas[-1].item() > 0.002
        n *= 2


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction", "edm"])
@pytest.mark.parametrize("student_steps", [1, 4])
def test_the_ideal_student_at_n_steps_samples_what_the_exact_teacher_does_at_2n(
    prediction_type, student_steps
):
    scheduler = schedule(prediction_type)
    teacher = exact_network(scheduler)
    noise = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    student = ideal_student(denoiser(teacher, scheduler, dtype=torch.float64), scheduler, student_steps)

    by_teacher = sample(teacher, scheduler, noise=noise, sampler="ddim", steps=2 * student_steps)
    by_student = sample(student, scheduler, noise=noise, sampler="ddim", steps=student_steps)

    torch.testing.assert_close(by_student, by_teacher, rtol=0, atol=1e-9)
    # and one step of the exact teacher alone does not (the target is not the teacher's own estimate)
    alone = sample(teacher, scheduler, noise=noise, sampler="ddim", steps=student_steps)
    assert (alone - by_teacher).abs().max() > 1e-2


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction", "edm"])
def test_the_loss_is_zero_at_the_ideal_student_and_weighted_by_the_truncated_snr(prediction_type):
    # (epsilon teachers are refused by ddpm.distill, but the loss is right for them too; for EDM the x0 and
    # SNR are the samplers' frame's, the data over sigma_data)
    scheduler = schedule(prediction_type)
    teacher = denoiser(exact_network(scheduler), scheduler, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x0 = MIXTURE.sample((8, 1, 4, 4), g)
    noise = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    grid = scheduler.inference_timesteps(8)
    index = torch.arange(8) % 4

    ideal = progressive_distillation_losses(
        ideal_student(teacher, scheduler, 4), teacher, scheduler, x0, noise, index, grid
    )
    # float64 round-off, which the epsilon form amplifies near x_T (x0 from eps divides by sqrt(alpha_bar)):
    # 1.2e-10 on some CPUs, against losses of 1e-2 and more for a student off by 0.1 below
    assert ideal.abs().max() < 1e-9

    def off_by(delta):  # a student whose x0 estimate is the ideal one + delta everywhere
        student = ideal_student(teacher, scheduler, 4)

        def model(x, t, y=None):
            out = student(x, t)
            ab = scheduler.alpha_bar(t).reshape(-1, 1, 1, 1)
            a, s = ab.sqrt(), (1 - ab).sqrt()  # x0 = out, (x - s eps) / a, a x - s v, a x + s F: + delta
            return {
                "sample": out + delta,
                "epsilon": out - delta * a / s,
                "v_prediction": out - delta / s,
                "edm": out + delta / s,
            }[prediction_type]

        return model

    losses = progressive_distillation_losses(off_by(0.1), teacher, scheduler, x0, noise, index, grid)
    snr = scheduler.snr(grid[2 * index])
    torch.testing.assert_close(losses, (0.01 * snr.clamp(min=1)).float(), rtol=1e-4, atol=0)


def test_an_edm_student_is_trained_on_edms_network_input_and_weighted_by_the_frames_snr():
    # The student sees F's input c_in (x0 + sigma eps) for data x0 (Karras et al. 2022, Table 1), and the
    # SNR of the frame of the data over sigma_data is sigma_data^2 / sigma^2
    scheduler = schedule("edm")
    teacher = denoiser(exact_network(scheduler), scheduler, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    x0 = MIXTURE.sample((8, 1, 4, 4), g)
    noise = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    grid, index = scheduler.inference_timesteps(8), torch.arange(8) % 4
    seen = []

    def student(x, t, y=None):
        seen.append((x, t))
        return torch.zeros_like(x)

    progressive_distillation_losses(student, teacher, scheduler, x0, noise, index, grid)
    (x, t), sigma = seen[0], scheduler.sigma(grid[2 * index]).reshape(-1, 1, 1, 1)
    assert torch.equal(t, grid[2 * index])
    torch.testing.assert_close(x, (x0 + sigma * noise) / (sigma**2 + 0.25).sqrt(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scheduler.snr(t), 0.25 / sigma.flatten() ** 2, rtol=1e-12, atol=0)


def test_the_loss_leaves_a_learned_variance_out():
    # The student of a learned-variance teacher outputs (N, 2C, H, W): its prediction, then variance values
    # that DDIM never reads. The ideal prediction with any variance values beside it has a zero loss.
    scheduler = NoiseScheduler(
        beta_schedule="cosine",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        variance_type="learned_range",
    )
    fixed = NoiseScheduler(
        beta_schedule="cosine", prediction_type="v_prediction", timestep_spacing="trailing"
    )
    teacher = denoiser(exact_predictor(MIXTURE, fixed), fixed, dtype=torch.float64)
    ideal = ideal_student(teacher, fixed, 2)
    g = torch.Generator().manual_seed(3)
    x0 = MIXTURE.sample((8, 1, 4, 4), g)
    noise = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    variance = torch.rand(8, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1

    def student(x, t, y=None):
        return torch.cat([ideal(x, t), variance], dim=1)

    grid, index = scheduler.inference_timesteps(4), torch.arange(8) % 2
    losses = progressive_distillation_losses(student, teacher, scheduler, x0, noise, index, grid)
    assert losses.shape == (8,) and losses.abs().max() < 1e-10


def test_guidance_is_baked_in_the_ideal_student_samples_what_the_guided_teacher_does():
    # A class-conditional exact teacher: label 0 one mixture, label 1 another, the null label 2 their blend
    mixtures = [
        GaussianMixture((0.5, 0.5), (-0.6, 0.2), (0.1, 0.1)),
        GaussianMixture((0.3, 0.7), (0.1, 0.7), (0.05, 0.1)),
        GaussianMixture((0.4, 0.3, 0.3), (-0.6, 0.1, 0.7), (0.1, 0.05, 0.1)),
    ]
    scheduler = schedule("v_prediction")
    by_label = [exact_predictor(m, scheduler) for m in mixtures]

    def teacher(x, t, y):
        outs = torch.stack([predict(x, t) for predict in by_label])  # (3, N, ...)
        return outs[y, torch.arange(x.shape[0])]

    y = torch.arange(16) % 2
    noise = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    guided = denoiser(teacher, scheduler, y=y, guidance_scale=3.0, null_class=2, dtype=torch.float64)
    student = ideal_student(guided, scheduler, 2)

    by_teacher = sample(
        teacher, scheduler, noise=noise, steps=4, sampler="ddim", y=y, guidance_scale=3.0, null_class=2
    )
    by_student = sample(student, scheduler, noise=noise, steps=2, sampler="ddim", y=y)

    torch.testing.assert_close(by_student, by_teacher, rtol=0, atol=1e-9)
    unguided = sample(teacher, scheduler, noise=noise, steps=4, sampler="ddim", y=y)
    assert (unguided - by_teacher).abs().max() > 1e-2


# ---- tiny distillations of the digits ----------------------------------------------------------------------


def evaluation_loss(distiller, stage: int) -> float:
    """The distillation loss of the raw student on a fixed batch at `stage`."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.stack([distiller.dataset[i][0] for i in range(32)])
    labels = torch.tensor([distiller.dataset[i][1] for i in range(32)])
    noise = torch.randn(x0.shape, generator=g)
    grid = distiller.scheduler.inference_timesteps(2 * distiller.settings.student_steps(stage))
    index = torch.randint(0, len(grid) // 2, (32,), generator=g)
    student = distiller.accelerator.unwrap_model(distiller.model)
    teacher = denoiser(distiller.teacher, distiller.scheduler, y=labels)
    with torch.no_grad():
        losses = progressive_distillation_losses(
            student, teacher, distiller.scheduler, x0, noise, index, grid, labels
        )
    return losses.mean().item()


def test_the_loss_falls_on_a_tiny_run(teacher, tmp_path):
    distiller = start_distillation(
        teacher, tmp_path / "student", calls=1, teacher_steps=2, stage_steps=20, lr=2e-3
    )
    before = evaluation_loss(distiller, 0)
    distiller.train()
    after = evaluation_loss(distiller, 0)
    assert after < 0.5 * before, (before, after)


def test_the_student_is_a_run_folder_that_sample_py_samples_at_its_calls_with_no_flags(teacher, tmp_path):
    student = tmp_path / "student"
    distiller = start_distillation(
        teacher, student, calls=2, teacher_steps=8, stage_steps=3, guidance_scale=2.0
    )
    distiller.train()

    loaded = load_for_sampling(student)
    assert (loaded.sampling.sampler, loaded.sampling.steps, loaded.sampling.eta) == ("ddim", 2, 0.0)
    assert loaded.sampling.calls is None and loaded.sampling.guidance_scale == 1.0  # guidance baked in
    teacher_schedule = load_for_sampling(teacher).scheduler.config
    assert loaded.scheduler.config == {**teacher_schedule, "timestep_spacing": "trailing"}
    # DDIM at 2 steps visits every other timestep of the last stage's 4-step teacher: those trained on
    assert torch.equal(loaded.scheduler.inference_timesteps(2), loaded.scheduler.inference_timesteps(4)[::2])
    # The first teacher is the teacher run's EMA weights; each next one the student at the end of a stage
    first = load_file(student / "teachers" / "steps-0008" / "model.safetensors")
    ema = load_file(teacher / "checkpoints" / "step-0000010" / "ema" / "model.safetensors")
    assert all(torch.equal(first[k], ema[k]) for k in ema)
    second = load_file(student / "teachers" / "steps-0004" / "model.safetensors")
    at_stage_end = load_file(student / "checkpoints" / "step-0000003" / "ema" / "model.safetensors")
    assert all(torch.equal(second[k], at_stage_end[k]) for k in second)
    assert not all(torch.equal(first[k], second[k]) for k in first)
    assert yaml.safe_load((student / "distill.json").read_text())["guidance_scale"] == 2.0

    grid = sample_py(student, "ddim: 2 steps, 2 network calls")
    assert grid == student / "samples" / "sample-step-0000006-ema-ddim2-seed0-n4.png"


def sample_py(student: Path, announced: str) -> Path:
    """Run `sample.py --checkpoint STUDENT --n 4`, no other flag; check that it announced `announced` and
    wrote a grid of 4 images. Returns the grid's path."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(student), "--n", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert announced in result.stderr
    grid = Path(result.stdout.strip())
    assert grid.is_file()
    return grid


@pytest.mark.parametrize(
    "kind",
    [
        ["diffusion.prediction_type=sample"],
        ["train.learn_sigma=true", "diffusion.variance_type=learned_range", "model.out_channels=2"],
    ],
    ids=["x0-prediction", "learned-variance"],
)
def test_a_teacher_of_each_kind_distils_into_a_student_that_sample_py_samples(tmp_path, kind):
    # (v prediction with class labels and guidance: the fixture `teacher`, distilled in the test above)
    run = tmp_path / "teacher"
    Trainer(
        load_config(ROOT / "configs" / "digits.yaml", [*TINY_TEACHER, *kind, f"output_dir={run}"])
    ).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    student = tmp_path / "student"
    distill_main(
        [str(run), "--out", str(student), "--calls", "1", "--teacher-steps", "2", "--stage-steps", "2"]
    )

    assert load_config(student / "config.yaml").diffusion == {
        **load_config(run / "config.yaml").diffusion,
        "timestep_spacing": "trailing",
    }
    sample_py(student, "ddim: 1 steps, 1 network calls")


def test_an_edm_teacher_distils_into_a_student_that_sample_py_samples_at_its_calls(edm_teacher, tmp_path):
    student = tmp_path / "student"
    distill_main(
        [str(edm_teacher), "--out", str(student), "--calls", "2", "--teacher-steps", "4"]
        + ["--stage-steps", "2"]
    )

    loaded = load_for_sampling(student)
    assert isinstance(loaded.scheduler, EDMScheduler)
    teacher_schedule = load_for_sampling(edm_teacher).scheduler.config
    assert loaded.scheduler.config == {**teacher_schedule, "timestep_spacing": "trailing"}
    sampling = loaded.sampling
    assert (sampling.sampler, sampling.steps, sampling.guidance_scale) == ("ddim", 2, 1.0)
    images = generate(
        loaded.model, loaded.scheduler, 4, image_shape=(1, 8, 8), sampler="ddim", steps=loaded.sampling.steps
    )
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    sample_py(student, "ddim: 2 steps, 2 network calls")


# ---- teachers conditioned on what their data gives ---------------------------------------------------------

# Tiny teachers conditioned on more than labels (configs/*_digits.yaml, TINY_TEACHER), kind -> the config and
# its overrides: data.task's image (superres; inpaint's masked image and mask) and vector (attributes), a
# data set's token sequences (digit_strips) and images (digit_masks: the cluttered digit to segment); "files",
# an image, a vector and a token sequence read from files, is test_condition_files' folder.
CONDITIONED = {
    "superres": ("superres_digits.yaml", ["data.superres_factor=4"]),
    "inpaint": ("inpaint_digits.yaml", []),
    "attributes": ("attributes_digits.yaml", []),
    "digit_strips": ("strips_digits.yaml", []),
    "digit_masks": ("segment_digits.yaml", []),
}
CONDITIONED_KINDS = [*CONDITIONED, "files"]


def conditioned_teacher(kind: str, folder: Path) -> tuple[Path, list[str]]:
    """A tiny teacher run of `kind` (CONDITIONED_KINDS) in folder/teacher, and the sample.py options that give
    it two different conditions of its kind, written in `folder` (--cond-image, --mask, --cond)."""
    run = folder / "teacher"
    rng = np.random.default_rng(0)
    if kind == "files":  # an image, a vector and a token sequence beside each image of a folder
        make_folder(folder / "data")
        config = folder_config(folder / "data", "train.sample_every=0", run=run)
    else:
        name, overrides = CONDITIONED[kind]
        config = load_config(ROOT / "configs" / name, [*TINY_TEACHER, *overrides, f"output_dir={run}"])
    Trainer(config).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    if kind in ("superres", "inpaint", "digit_masks", "files"):  # superres': the 8x8 model's 2x2 images
        side = 2 if kind == "superres" else 8
        for i in range(2):
            write_png(folder / "images" / f"{i}.png", rng.integers(0, 256, (side, side)))
    if kind == "inpaint":  # white: keep; one keeps the top half, the other the left
        for i, keep in enumerate((np.s_[:4, :], np.s_[:, :4])):
            mask = np.zeros((8, 8))
            mask[keep] = 255
            write_png(folder / "masks" / f"{i}.png", mask)
    (folder / "conds").mkdir()
    if kind == "attributes":  # standardised ink, thickness, slant
        for i, vector in enumerate(([0.0, 0.0, 0.0], [2.0, -1.0, 1.5])):
            np.save(folder / "conds" / f"{i}.npy", np.array(vector, dtype=np.float32))
    if kind == "digit_strips":  # the tokens of "1 2" and of "5"
        tokens, mask = sequence_tokens(torch.tensor([[1, 2, EMPTY], [5, EMPTY, EMPTY]]))
        for i in range(2):
            np.save(folder / "conds" / f"{i}.npy", tokens[i, mask[i]].numpy())
    if kind == "files":
        for i in range(2):
            cond = {"vector": torch.randn(3), "context": torch.randn(i + 1, 4)}
            save_file(cond, folder / "conds" / f"{i}.safetensors")
    options = {
        "superres": ["--cond-image", folder / "images"],
        "inpaint": ["--cond-image", folder / "images", "--mask", folder / "masks"],
        "digit_masks": ["--cond-image", folder / "images"],
        "attributes": ["--cond", folder / "conds"],
        "digit_strips": ["--cond", folder / "conds"],
        "files": ["--cond-image", folder / "images", "--cond", folder / "conds"],
    }
    return run, [str(option) for option in options[kind]]


def distils_into_a_student_that_samples_with_its_conditions(
    kind: str, folder: Path, method_args: list[str], announced: str, capsys
) -> None:
    """A tiny teacher of `kind` (`conditioned_teacher`, in `folder`) distilled to 1 call by `python -m
    ddpm.distill` with `method_args` (--method and its options) at guidance 2 (every kind dropped to its
    learned null in the unconditional half) gives a student whose data section is the teacher's, and:
    sample.py --checkpoint STUDENT with the conditions' options draws a grid with no other flag, announcing
    `announced`; the student's images under the conditions of the data's first two images (`item_conditions`:
    what it was distilled on) are finite, of the data's shape, and follow their conditions: the first image's
    noise under the second's condition gives another image."""
    run, options = conditioned_teacher(kind, folder)
    student = folder / "student"
    ddpm_distill([str(run), "--out", str(student), "--calls", "1", "--guidance-scale", "2", *method_args])
    AcceleratorState._reset_state(reset_partial_state=True)
    assert load_config(student / "config.yaml").data == load_config(run / "config.yaml").data

    out = student / "conditioned.png"
    code, stdout, stderr = run_sample_cli(["--checkpoint", str(student), *options, "--out", str(out)], capsys)
    assert code is None and stdout.strip() == str(out) and out.is_file(), stderr
    assert announced in stderr
    loaded = load_for_sampling(student)
    config = load_config(student / "config.yaml")
    dataset = build_dataset(config.data, config.model)
    _, _, cond = item_conditions(config.data, dataset, [0, 1], labels=False)
    shape = (config.data.channels, config.data.image_size, config.data.image_size)
    settings = {"sampler": loaded.sampling.sampler, "steps": loaded.sampling.steps}
    images = generate(loaded.model, loaded.scheduler, 2, image_shape=shape, cond=cond, **settings)
    assert images.shape == (2, *shape) and torch.isfinite(images).all()
    swapped = generate(
        loaded.model, loaded.scheduler, 2, image_shape=shape, cond=cond.rows([1, 0]), **settings
    )
    # (above rounding, 1e-7 here: the tiny strips teacher's cross-attention moves its images by 1e-5 only)
    assert (swapped[0] - images[0]).abs().max() > 1e-6


@pytest.mark.parametrize("kind", CONDITIONED_KINDS)
def test_a_teacher_conditioned_on_what_its_data_gives_distils_into_a_student_that_samples_with_it(
    tmp_path, kind, capsys
):
    progressive = ["--method", "progressive", "--teacher-steps", "2", "--stage-steps", "2"]
    distils_into_a_student_that_samples_with_its_conditions(
        kind, tmp_path, progressive, "ddim: 1 steps, 1 network calls", capsys
    )


def recorded(call, seen: list):
    """`call` (x, t, y) -> output, recording each y in `seen`."""
    return lambda x, t, y: seen.append(y) or call(x, t, y)


def test_the_student_and_the_guided_teacher_get_the_batchs_conditions(tmp_path):
    run, _ = conditioned_teacher("superres", tmp_path)
    distiller = start_distillation(run, tmp_path / "student", calls=1, teacher_steps=2, guidance_scale=2.0)
    student, teacher = [], []
    distiller.forward = recorded(distiller.forward, student)
    distiller.teacher = recorded(distiller.teacher, teacher)
    x0 = torch.stack([distiller.dataset[i][0] for i in range(4)])
    distiller._loss(x0, torch.full((4,), -1))

    low = superres_condition(x0, 4)  # the superres condition of the batch's images
    (given,) = student
    assert given.kinds == ("image",) and torch.equal(given["image"], low)
    assert not given.is_dropped("image").any()
    assert len(teacher) == 2  # the teacher's two DDIM steps, each one guided call on [cond, cond.null()]
    for guided in teacher:
        assert torch.equal(guided["image"], torch.cat([low, low]))
        assert guided.is_dropped("image").tolist() == [False] * 4 + [True] * 4


def test_the_learning_rate_decays_linearly_to_zero_within_each_stage_and_restarts(teacher, tmp_path):
    student = tmp_path / "student"
    start_distillation(teacher, student, calls=1, teacher_steps=4, stage_steps=4, lr=1e-3).train()
    log = [json.loads(line) for line in (student / "log.jsonl").read_text().splitlines()]
    lrs = {record["step"]: record["lr"] for record in log if "lr" in record}
    # steps 1-4 the first stage, 5-8 the second: linear decay from lr over each stage's 4 steps, no warm-up
    assert lrs == pytest.approx({step: 1e-3 * (1 - ((step - 1) % 4) / 4) for step in range(1, 9)}), lrs


RESUMED = {"calls": 1, "teacher_steps": 4, "stage_steps": 2, "lr": 1e-3}  # a checkpoint every 2 steps


def final_weights(student: Path) -> dict[str, torch.Tensor]:
    last = student / "checkpoints" / "step-0000004"
    return load_file(last / "model.safetensors") | {
        f"ema.{k}": v for k, v in load_file(last / "ema" / "model.safetensors").items()
    }


@pytest.fixture(scope="module")
def uninterrupted(teacher, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of a distillation of two stages run straight through."""
    student = tmp_path_factory.mktemp("straight") / "student"
    start_distillation(teacher, student, **RESUMED).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    return final_weights(student)


@pytest.mark.parametrize("stop_at", [2, 3], ids=["at-the-stage-end", "inside-the-second-stage"])
def test_a_resumed_distillation_ends_with_the_same_weights_as_an_uninterrupted_one(
    teacher, uninterrupted, tmp_path, stop_at
):
    interrupted = start_distillation(teacher, tmp_path / "student", **RESUMED)
    interrupted.signals.stop_requested = lambda step: step == stop_at  # as SIGTERM there would
    interrupted.train()
    AcceleratorState._reset_state(reset_partial_state=True)
    assert (tmp_path / "student" / "checkpoints" / f"step-{stop_at:07d}").is_dir()
    # a stop inside the second stage resumes with its teacher, teachers/steps-0002, the first stage's student
    start_distillation(teacher, tmp_path / "student", **RESUMED, resume=True).train()

    resumed = final_weights(tmp_path / "student")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0, msg=key)


# Two stages of 4 steps with a checkpoint every 2 steps (the teacher run's train.checkpoint_every).
KILLED = ["--calls", "1", "--teacher-steps", "4", "--stage-steps", "4", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def teacher_every_2(teacher, tmp_path_factory) -> Path:
    """The tiny teacher run, checkpointing every 2 steps: the distillations of it do too."""
    return edited_run(teacher, tmp_path_factory.mktemp("every2"), **{"train.checkpoint_every": 2})


@pytest.fixture(scope="module")
def uninterrupted_killed(teacher_every_2, tmp_path_factory) -> Path:
    """The last checkpoint of the distillation KILLED, run straight through in this process."""
    student = tmp_path_factory.mktemp("straight") / "student"
    distill_main([str(teacher_every_2), "--out", str(student), *KILLED])
    AcceleratorState._reset_state(reset_partial_state=True)
    return student / "checkpoints" / "step-0000008"


def distil_until_killed(teacher: str, student: str, point: str, ready: str, threads: int) -> None:
    """In a child process: `python -m ddpm.distill TEACHER --out STUDENT KILLED`, which at `point` creates
    the file `ready` and waits to be killed. "inside a stage": in step 7's loss, after the checkpoint of step
    6 (the second stage's middle); "at a stage's end": step 4 done and its student written as the next
    stage's teacher, its checkpoint not yet."""

    def hang() -> None:
        Path(ready).touch()
        time.sleep(600)

    torch.set_num_threads(threads)  # the test process's: the same float operations in the same order
    if point == "inside a stage":
        loss = Distiller._loss

        def loss_and_hang(self, x0, labels):
            if self.state.step == 6:
                hang()
            return loss(self, x0, labels)

        Distiller._loss = loss_and_hang
    else:
        next_stage = Distiller._next_stage

        def next_stage_and_hang(self):
            next_stage(self)
            hang()

        Distiller._next_stage = next_stage_and_hang
    distill_main([teacher, "--out", student, *KILLED])


@pytest.mark.parametrize(("point", "resumed_at"), [("inside a stage", 6), ("at a stage's end", 2)])
def test_a_distillation_killed_and_resumed_ends_with_the_weights_of_an_uninterrupted_one(
    teacher_every_2, uninterrupted_killed, tmp_path, capsys, point, resumed_at
):
    # A real SIGKILL to a distillation in another process; it resumes from its last whole checkpoint (with
    # that stage's teacher, written before the kill or again at the stage's end) and must end bit for bit
    # where the uninterrupted run did: same process count and threads on the CPU, so the same operations in
    # the same order, from the same weights, optimizer state, data position, RNG state and learning rate.
    student, ready = tmp_path / "student", tmp_path / "ready"
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["ddpm.training.distiller", "sklearn.datasets", "test_distill"])
    args = (str(teacher_every_2), str(student), point, str(ready), torch.get_num_threads())
    child = context.Process(target=distil_until_killed, args=args)
    child.start()
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert child.is_alive() and time.monotonic() < deadline, f"the child ended early ({child.exitcode})"
        time.sleep(0.05)
    child.kill()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (student / "checkpoints").glob("step-*"))
    assert checkpoints[-1] == f"step-{resumed_at:07d}"
    assert (student / "teachers" / "steps-0002").is_dir() == (point == "at a stage's end" or resumed_at > 4)

    distill_main([str(teacher_every_2), "--out", str(student), *KILLED, "--resume"])
    out = capsys.readouterr().out
    assert f"resumed from {student / 'checkpoints' / f'step-{resumed_at:07d}'} at step {resumed_at}" in out

    last = student / "checkpoints" / "step-0000008"
    for folder in ("", "ema"):
        resumed, expected = (
            load_file(last / folder / "model.safetensors"),
            load_file(uninterrupted_killed / folder / "model.safetensors"),
        )
        assert resumed.keys() == expected.keys()
        for key in resumed:
            torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=f"{folder} {key}")
    log = [json.loads(line) for line in (student / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))  # steps logged before the kill are not repeated


def edited_run(teacher: Path, folder: Path, **changes) -> Path:
    """A copy of the teacher run whose config.yaml has `changes` ({"section.key": value})."""
    run = folder / "edited"
    shutil.copytree(teacher, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split(".")
        config[section][name] = value
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--calls", "3"], "--calls 3: expected a power of two (1, 2, 4, ...)"),
        (["--calls", "4", "--teacher-steps", "4"], "--calls 4 must be below --teacher-steps 4: each stage"),
        (["--calls", "1", "--teacher-steps", "24"], "--teacher-steps 24: expected a power of two of at most"),
        (
            ["--calls", "1", "--teacher-steps", "2048"],
            "--teacher-steps 2048: expected a power of two of at most num_train_timesteps=1000",
        ),
        (["--calls", "1", "--stage-steps", "0"], "--stage-steps 0: expected a positive integer"),
    ],
)
def test_bad_settings_are_refused_with_one_line(teacher, tmp_path, args, message):
    with pytest.raises(SystemExit) as stopped:
        distill_main([str(teacher), "--out", str(tmp_path / "student"), *args])
    assert str(stopped.value.code).startswith(f"error: {message}")
    assert "\n" not in str(stopped.value.code)
    assert not (tmp_path / "student").exists()


def test_a_teacher_that_cannot_be_distilled_is_refused_with_one_line(teacher, tmp_path):
    def refusal(run, *args) -> str:
        with pytest.raises(SystemExit) as stopped:
            distill_main([str(run), "--calls", "1", "--out", str(tmp_path / "student"), *args])
        assert not (tmp_path / "student").exists()
        return str(stopped.value.code)

    assert refusal(tmp_path / "missing").startswith(f"error: {tmp_path / 'missing'}: no such file or folder")
    eps = edited_run(teacher, tmp_path / "eps", **{"diffusion.prediction_type": "epsilon"})
    assert "predicts epsilon" in refusal(eps) and "diffusion.prediction_type=v_prediction" in refusal(eps)
    with pytest.raises(SystemExit) as stopped:
        distill_main([str(teacher), "--calls", "1", "--out", str(teacher)])
    assert "is the teacher's run directory: name a new folder" in str(stopped.value.code)


def test_guidance_is_refused_for_a_teacher_without_conditions_or_without_a_null_label():
    def network(*overrides: str, name: str = "digits.yaml") -> torch.nn.Module:
        return build_model(load_config(ROOT / "configs" / name, [*TINY_MODEL, *overrides]).model)

    unconditional = network("model.num_classes=null")
    with pytest.raises(ConfigError) as refused:
        _check_guidance(unconditional, 2.0)
    assert str(refused.value) == (
        "--guidance-scale 2 needs a conditioned teacher; this one takes no conditions: pass "
        "--guidance-scale 1"
    )
    _check_guidance(unconditional, 1.0)
    with pytest.raises(ConfigError, match=r"^--guidance-scale 3 needs a null label to drop the labels to; "):
        _check_guidance(network("model.null_label=false", "train.label_dropout=0"), 3.0)
    _check_guidance(network(name="superres_digits.yaml"), 2.0)  # the low-resolution image's learned null


def test_a_model_folder_outside_a_run_is_refused(teacher, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(teacher / "checkpoints" / "step-0000010" / "ema", folder)
    with pytest.raises(SystemExit) as stopped:
        distill_main([str(folder), "--calls", "1", "--out", str(tmp_path / "student")])
    assert str(stopped.value.code).startswith(f"error: {folder} is a model folder outside a run")


def test_a_fresh_start_into_a_distillation_and_a_resume_of_another_are_refused(teacher, tmp_path, capsys):
    student = tmp_path / "student"
    common = [str(teacher), "--out", str(student), "--teacher-steps", "2", "--stage-steps", "1"]
    with pytest.raises(SystemExit) as stopped:
        distill_main([*common, "--calls", "1", "--resume"])
    assert (
        str(stopped.value.code)
        == f"error: no distillation to resume in {student}: start one without --resume"
    )
    capsys.readouterr()
    distill_main([*common, "--calls", "1"])
    AcceleratorState._reset_state(reset_partial_state=True)
    assert capsys.readouterr().err.splitlines()[0] == STOP_HINT  # before the first step

    with pytest.raises(SystemExit) as stopped:
        distill_main([*common, "--calls", "1"])
    assert str(stopped.value.code) == (
        f"error: {student} already holds a distillation: continue it with --resume, or pass another --out"
    )
    with pytest.raises(SystemExit) as stopped:
        distill_main([*common, "--calls", "1", "--guidance-scale", "3", "--resume"])
    assert str(stopped.value.code).startswith("error: --guidance-scale 3.0 differs from the 1.0 that")
