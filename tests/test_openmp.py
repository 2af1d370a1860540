"""The OpenMP wait policy that ddpm's processes start torch with (ddpm/openmp.py).

Each check runs a fresh Python (libgomp reads the variables once, when torch loads) with
OMP_DISPLAY_ENV=verbose, which makes the runtime print the spin count it took: the setting is read from inside
torch's runtime, not from the environment alone.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm.openmp import DEFAULT_WAIT, WAIT_VARIABLES, openmp_defaults

ROOT = Path(__file__).resolve().parents[1]
PASSIVE_SPINS = "0"  # libgomp's spin count under OMP_WAIT_POLICY=PASSIVE
LIBGOMP_DEFAULT_SPINS = "300000"  # libgomp's spin count when neither variable is set
ACTIVE_SPINS = "30000000000"


def test_the_default_is_passive_waiting_unless_the_user_chose():
    assert openmp_defaults({}) == DEFAULT_WAIT == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_defaults({"OMP_WAIT_POLICY": "", "PATH": "/bin"}) == DEFAULT_WAIT  # empty is unset
    for name, value in [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "10000")]:
        assert openmp_defaults({name: value}) == {}, name


@pytest.mark.parametrize(
    "command",
    [
        ["-c", "import ddpm; import torch"],  # ddpm loads torch on first use: code importing both
        [str(ROOT / "train.py"), "--help"],
        ["-m", "ddpm.sample_cli", "--help"],  # as `ddpm-sample` and sample.py run it
    ],
    ids=lambda c: " ".join(Path(a).name for a in c),
)
def test_every_entry_point_starts_torch_with_passive_waiting(tmp_path, command):
    assert spin_counts([sys.executable, *command], cwd=tmp_path) == [PASSIVE_SPINS]


def test_the_processes_of_accelerate_launch_wait_passively(tmp_path):
    # The launcher loads torch itself, before any ddpm code, and keeps libgomp's default; the process it
    # starts runs train.py, which imports ddpm before torch.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    found = spin_counts([*launch, str(ROOT / "train.py"), "--help"], cwd=tmp_path)
    assert found == [LIBGOMP_DEFAULT_SPINS, PASSIVE_SPINS]


@pytest.mark.parametrize(
    ("variable", "value", "spins"),
    [("GOMP_SPINCOUNT", "1234", "1234"), ("OMP_WAIT_POLICY", "ACTIVE", ACTIVE_SPINS)],
)
def test_a_users_own_setting_is_kept(tmp_path, variable, value, spins):
    found = spin_counts(
        [sys.executable, str(ROOT / "train.py"), "--help"], cwd=tmp_path, env={variable: value}
    )
    assert found == [spins]


def test_a_process_that_loaded_torch_first_keeps_its_policy_and_says_so(tmp_path):
    # Too late to change how its threads wait: the environment is left alone rather than claim a policy
    # that is not in force (and its children, importing ddpm themselves, set it then).
    code = "import torch, ddpm, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    result = run([sys.executable, "-c", code], cwd=tmp_path)
    assert result.stdout.strip() == "None"
    assert reported_spin_counts(result.stderr) == [LIBGOMP_DEFAULT_SPINS]


def spin_counts(command: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> list[str]:
    """The spin count each OpenMP runtime started by `command` reported, in order."""
    return reported_spin_counts(run(command, cwd=cwd, env=env).stderr)


def run(command: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`command` in `cwd`, in clean_env(env); it must succeed."""
    result = subprocess.run(command, cwd=cwd, env=clean_env(env), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def clean_env(extra: dict[str, str] | None) -> dict[str, str]:
    """This environment without the wait variables (the test process may have set them by importing ddpm),
    with `extra`, the checkout on the path, and the runtime's report on."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["OMP_DISPLAY_ENV"] = "verbose"
    return {**env, **(extra or {})}


def reported_spin_counts(stderr: str) -> list[str]:
    """The GOMP_SPINCOUNT values of libgomp's OMP_DISPLAY_ENV reports in `stderr`, in order."""
    lines = [line.strip() for line in stderr.splitlines()]
    return [line.split("=", 1)[1].strip().strip("'") for line in lines if line.startswith("GOMP_SPINCOUNT =")]
