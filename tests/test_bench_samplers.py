"""bench/samplers.py end to end on the smallest problem: the network calls it reports are those made, a
budget no step count reaches is skipped and said so, and the table, grid and plot are written."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ddpm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("samplers") / "grid"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(ROOT / "bench/samplers.py"), "--budgets", "2,3", "--seeds", "2"]
    command += ["--pixels", "1024", "--schedules", "linear", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    with out.with_suffix(".csv").open() as file:
        return out, done.stdout, list(csv.DictReader(file))


def test_every_sampler_and_diffusers_scheduler_is_measured_at_every_budget(run):
    _, _, rows = run
    ours = {row["sampler"] for row in rows if row["library"] == "ddpm"}
    assert ours == set(ddpm.SAMPLERS)
    assert {"DPM++ 2M", "DPM++ 3M", "UniPC", "DEIS", "Heun", "Euler", "Euler a"} <= {
        r["sampler"] for r in rows
    }
    for row in rows:
        if not row["skipped"]:
            errors = [float(row["w1_seed0"]), float(row["w1_seed1"])]
            assert row["w1_mean"] and all(0 < e < math.inf for e in errors), row


def test_heun_calls_the_model_twice_per_step_but_once_on_the_last(run):
    """diffusers' Heun makes 2 * steps - 1 calls: 3 calls in 2 steps, and no step count makes 2."""
    _, stdout, rows = run
    heun = [row for row in rows if row["sampler"] == "Heun" and row["variant"] == "trailing"]
    by_budget = {int(row["calls"]): row for row in heun}
    assert by_budget[3]["steps"] == "2" and not by_budget[3]["skipped"]
    assert by_budget[2]["skipped"] == "no step count makes exactly 2 calls (1 calls at 1 steps, 3 at 2)"
    assert "Heun (trailing), 2 calls: no step count makes exactly 2 calls" in stdout


def test_the_table_and_the_plot_are_written(run):
    out, stdout, _ = run
    table = out.with_suffix(".md").read_text()
    assert "| linear | 3 |" in table and "Noise floor: W1 of 1,024 exact draws" in table
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
