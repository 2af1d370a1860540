"""bench/samplers.py end to end on the smallest problem: diffusers' schedulers get every option their
documentation lists (sigma spacings, final sigmas, lower-order final steps, solver types, thresholding, ...),
a combination diffusers raises on is reported with its message, the network calls reported are those made,
a budget no step count reaches is skipped and said so, the finalists are the screen's best, and the table,
grid and plot are written."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ddpm
from ddpm.schedule import TIMESTEP_SPACINGS

ROOT = Path(__file__).resolve().parents[1]
# Every sampler of ours; of diffusers', one that raises on some of its options, one order-1 solver (all the
# spacings, few options: a small grid) and Heun (2 * steps - 1 calls)
FAMILIES = [*ddpm.SAMPLERS, "DPM++ 1", "DPM 1 SDE", "Heun"]
DPM_OPTIONS = (
    "solver_type=heun",
    "lower_order_final=False",
    "final_sigmas_type=sigma_min",
    "euler_at_final=True",
    "thresholding=True",
)


def bench(*arguments: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(ROOT / "bench/samplers.py"), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def grid() -> dict[tuple[str, str, str], list[str]]:
    """--dry-run: {(schedule, library, family): its variants}, every family, nothing run."""
    variants: dict[tuple[str, str, str], list[str]] = {}
    for line in bench("--dry-run").splitlines():
        schedule, library, family, variant = line.split("\t")
        variants.setdefault((schedule, library, family), []).append(variant)
    return variants


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("samplers") / "grid"
    stdout = bench(
        *("--budgets", "2,3", "--seeds", "2", "--pixels", "1024", "--screen-pixels", "1024"),
        *("--finalists", "2", "--schedules", "linear,cosine", "--families", ",".join(FAMILIES)),
        *("--out", str(out)),
    )
    with out.with_suffix(".csv").open() as file:
        return out, stdout, list(csv.DictReader(file))


def test_every_sampler_and_diffusers_scheduler_is_in_the_grid(grid):
    for schedule in ("linear", "cosine"):
        ours = {family for s, library, family in grid if s == schedule and library == "ddpm"}
        assert ours == set(ddpm.SAMPLERS) - {"consistency"}  # not a diffusion model's solver
        assert grid[schedule, "ddpm", "unipc"] == [
            f"{spacing}{clip}" for spacing in TIMESTEP_SPACINGS for clip in ("", ", clip_sample")
        ]
        theirs = {family for s, library, family in grid if s == schedule and library == "diffusers"}
        assert {"DPM++ 2M", "DPM++ 3M", "DPM++ 3M SDE", "DPM 3M", "UniPC 3", "DEIS 3", "Euler a"} <= theirs


def test_diffusers_gets_every_option_its_documentation_lists(grid):
    """Every spacing (exponential and beta sigmas among them) and option, in every combination, less those
    that compute the same as another."""
    dpm = grid["linear", "diffusers", "DPM++ 2M"]
    spacings = ("linspace", "leading", "leading+1", "trailing", "karras", "exponential", "beta", "lu")
    assert {variant.split(", ")[0] for variant in dpm} == set(spacings)
    assert "exponential, " + ", ".join(DPM_OPTIONS) in dpm
    # 8 spacings x 2 solver types x 2 lower_order_final x (zero, sigma_min, sigma_min with euler_at_final)
    # x 2 thresholding; euler_at_final acts only with sigma_min
    assert len(dpm) == 8 * 2 * 2 * 3 * 2
    assert all("final_sigmas_type=sigma_min" in v for v in dpm if "euler_at_final=True" in v)
    # order 1: no solver type, nothing to lower
    assert not any(
        "solver_type" in v or "lower_order_final" in v for v in grid["linear", "diffusers", "DPM++ 1"]
    )
    unipc = grid["linear", "diffusers", "UniPC 3"]
    assert (
        "beta, solver_type=bh1, predict_x0=False, lower_order_final=False, final_sigmas_type=sigma_min"
        in unipc
    )
    assert not any("predict_x0=False" in v and "thresholding" in v for v in unipc)  # thresholds x0 only
    assert (
        "trailing, exponential, interpolation_type=log_linear, final_sigmas_type=sigma_min"
        in (grid["linear", "diffusers", "Euler"])
    )
    assert "leading+1, beta, clip_sample=True" in grid["linear", "diffusers", "Heun"]
    # lambda_min_clipped where it changes the grid: the cosine schedule's lambda_T = -9.9 < -5.1
    assert not any("lambda_min_clipped" in v for v in dpm)
    assert "trailing, lambda_min_clipped=-5.1" in grid["cosine", "diffusers", "DPM++ 2M"]


def test_a_combination_diffusers_raises_on_is_reported_with_its_message(run):
    out, _, rows = run
    message = (
        "raised ValueError: `final_sigmas_type` zero is not supported for `algorithm_type` sde-dpmsolver. "
        "Please choose `sigma_min` instead."
    )
    sde = [row for row in rows if row["sampler"] == "DPM 1 SDE"]
    refused = [row for row in sde if "final_sigmas_type=sigma_min" not in row["variant"]]
    assert refused and all(row["skipped"] == message and not row["w1_screen"] for row in refused)
    assert len(refused) == len(sde) / 2  # the other half, with sigma_min, ran
    assert all(row["w1_screen"] for row in sde if row not in refused)
    table = out.with_suffix(".md").read_text()
    # one line per kind: 16 variants on the linear schedule, 24 on the cosine one (lambda_min_clipped too)
    [line] = [
        line for line in table.splitlines() if line.startswith("- diffusers DPM 1 SDE, 24 variant(s) (")
    ]
    assert line.endswith(f"), 2, 3 calls, linear, cosine: {message}")


def test_the_loop_sets_the_begin_index_so_duplicate_first_timesteps_run(run):
    """On the cosine schedule 3 beta sigmas map to t = 998, 998, 0: without set_begin_index(0) step() takes
    its index from the second 998 and fails (IndexError); diffusers' later pipelines set it, and so does
    the benchmark."""
    _, _, rows = run
    beta = [
        r for r in rows if r["schedule"] == "cosine" and r["sampler"] == "DPM++ 1" and r["variant"] == "beta"
    ]
    assert [(r["calls"], r["steps"], r["skipped"]) for r in beta] == [("2", "2", ""), ("3", "3", "")]
    assert all(0 < float(r["w1_screen"]) < math.inf for r in beta)


def test_heun_calls_the_model_twice_per_step_but_once_on_the_last(run):
    """diffusers' Heun makes 2 * steps - 1 calls: 3 calls in 2 steps, and no step count makes 2."""
    out, stdout, rows = run
    heun = [row for row in rows if row["sampler"] == "Heun" and row["variant"] == "trailing"]
    by_budget = {(row["schedule"], int(row["calls"])): row for row in heun}
    assert by_budget["linear", 3]["steps"] == "2" and not by_budget["linear", 3]["skipped"]
    assert (
        by_budget["linear", 2]["skipped"]
        == "no step count makes exactly 2 calls (1 calls at 1 steps, 3 at 2)"
    )
    assert "Heun (trailing)" in stdout and "2 calls: skipped, no step count makes exactly 2 calls" in stdout
    assert "- diffusers Heun, 32 variant(s) (leading; leading+1; leading+1, beta; and 29 more), 2 calls" in (
        out.with_suffix(".md").read_text()
    )


def test_the_finalists_are_the_lowest_screening_errors_measured_on_every_seed(run):
    """Per library, budget and schedule the 2 lowest screening errors of the deterministic samplers and of
    the stochastic ones (whose output changes with their noise's seed) go to the final round."""
    out, _, rows = run
    table = out.with_suffix(".md").read_text()
    stochastic = {(r["library"], r["sampler"]) for r in rows if r["stochastic"] == "1"}
    assert {("ddpm", name) for name in ("ddpm", "euler_a", "dpm++2m_sde")} | {("diffusers", "DPM 1 SDE")} == (
        stochastic
    )
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["schedule"], row["calls"], row["library"]), []).append(row)
    assert len(groups) == 2 * 2 * 2
    for (schedule, calls, _), group in groups.items():
        named = {f"{r['sampler']} ({r['variant']})": r for r in group}
        final = [r for r in group if r["w1_mean"]]
        for kind in ("0", "1"):
            unique = [r for r in group if r["w1_screen"] and not r["same_as"] and r["stochastic"] == kind]
            lowest = sorted(unique, key=lambda r: float(r["w1_screen"]))[:2]
            assert [r for r in final if r["stochastic"] == kind] == [r for r in group if r in lowest]
        assert all(r["w1_seed0"] and r["w1_seed1"] for r in final)
        best = min(final, key=lambda r: float(r["w1_mean"]))
        mean, std = float(best["w1_mean"]), float(best["w1_std"])
        assert f"| {schedule} | {calls} |" in table
        assert f"{best['sampler']} ({best['variant']}) | {mean:.4f} +- {std:.4f}" in table
        # an output identical to an earlier one is that computation again: its error, counted once
        for r in group:
            if r["same_as"]:
                assert named[r["same_as"]]["w1_screen"] == r["w1_screen"] and not r["w1_mean"]


def test_the_table_and_the_plot_are_written(run):
    out, _, _ = run
    table = out.with_suffix(".md").read_text()
    assert (
        "| schedule | calls | best of ours | W1 | best of diffusers | W1 | ours / diffusers | verdict |"
        in table
    )
    assert "Noise floor: W1 of 1,024 exact draws" in table
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_the_export_mode_measures_what_ddpm_export_writes_against_ours(tmp_path):
    """--export: for a model of each spacing, the diffusers scheduler `python -m ddpm.export` writes (run in
    DDPMPipeline's loop to the end: on the cosine schedule its DPM-Solver raised IndexError before), beside
    our sampler of the same maths and sample.py's default."""
    out = tmp_path / "export"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable,
        str(ROOT / "bench/samplers.py"),
        "--export",
        "--budgets",
        "2,3",
        "--seeds",
        "1",
    ]
    command += ["--pixels", "1024", "--schedules", "cosine", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    with out.with_suffix(".csv").open() as file:
        rows = list(csv.DictReader(file))
    exported = {(row["sampler"], row["variant"]) for row in rows if row["library"] == "diffusers"}
    assert ("ddpm.export: DPMSolverMultistepScheduler", "exponential model, runs exponential") in exported
    assert ("ddpm.export: DDPMScheduler", "trailing model, runs linspace") in exported
    assert {(row["sampler"], row["variant"]) for row in rows if row["library"] == "ddpm"} >= {
        ("dpm++", "exponential"),
        ("ddpm", "trailing"),
        ("unipc", "exponential"),
    }
    assert all(not row["skipped"] and 0 < float(row["w1_mean"]) < math.inf for row in rows), rows
    assert "cosine schedule:" in out.with_suffix(".md").read_text()
