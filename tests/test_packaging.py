"""Installed commands: the wheel holds every module, the configs and the console scripts (`ddpm COMMAND` and
the `ddpm-COMMAND` names), and `--config NAME` finds a bundled config whether ddpm runs from a clone or from
an installed wheel."""

import importlib
import inspect
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ddpm.cli import COMMANDS
from ddpm.config import BUNDLED_CONFIGS, DEFAULT_CONFIG, ConfigError, load_config, resolve_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(path.name for path in (ROOT / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a copy of the source (a build writes build/ and egg-info/ beside it)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    for name in ("ddpm", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
    ]
    result = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (built,) = out.glob("ddpm-*.whl")
    return built


def test_the_wheel_holds_every_module_the_configs_and_the_commands(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "ddpm").rglob("*.py")}
    assert modules - names == set(), "modules missing from the wheel: add their package to pyproject.toml"
    assert {f"ddpm/configs/{name}" for name in CONFIGS} <= names
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for line in (
        "ddpm = ddpm.cli:main",
        "ddpm-train = ddpm.train:main",
        "ddpm-sample = ddpm.sample_cli:main",
        "ddpm-export = ddpm.export:main",
        "ddpm-fid = ddpm.fid.__main__:main",
        "ddpm-nll = ddpm.nll:main",
        "ddpm-ema = ddpm.ema.__main__:main",
        "ddpm-distill = ddpm.distill:main",
        "ddpm-segment = ddpm.segment:main",
    ):
        assert line in scripts


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The folder the wheel is installed in (pip install --target): its modules, and its commands in bin/."""
    target = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)]
    assert subprocess.run(pip, capture_output=True, timeout=300).returncode == 0
    return target


def test_installed_commands_find_the_bundled_configs_outside_a_clone(installed, tmp_path):
    target, cwd = installed, tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed ddpm, not this clone's
    code = "import ddpm.config as c; print(c.__file__); print(c.resolve_config('cifar10'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.stdout.split() == [
        str(target / "ddpm" / "config.py"),
        str(target / "ddpm" / "configs" / "cifar10.yaml"),
    ], result.stderr
    result = subprocess.run(
        [str(target / "bin" / "ddpm-train"), "--help"], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and "cifar10, cifar10_v, digits, folder" in " ".join(result.stdout.split())
    result = subprocess.run(
        [str(target / "bin" / "ddpm-sample"), "--checkpoint", "nothing"], cwd=cwd, env=env, text=True,
        capture_output=True,
    )  # fmt: skip
    assert result.returncode == 1 and result.stderr.startswith("error: nothing: no such file or folder")


def test_the_ddpm_command_lists_its_commands_and_hands_each_its_arguments_outside_a_clone(
    installed, tmp_path
):
    target, cwd = installed, tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed ddpm, not this clone's

    def ddpm(*args: str) -> subprocess.CompletedProcess:
        command = [str(target / "bin" / "ddpm"), *args]
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)

    listed = ddpm("--help")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    for name in COMMANDS:  # one line each: the name and what it does
        assert any(line.split()[:1] == [name] and len(line.split()) > 2 for line in lines), listed.stdout
    sample = ddpm("sample", "--help")
    assert sample.returncode == 0 and sample.stdout.startswith(
        "usage: ddpm sample [-h] [--n N] [--checkpoint"
    )
    assert "--openai-flags FLAGS" in sample.stdout and "Sample images from a trained model" in sample.stdout
    train = ddpm("train", "--help")
    assert train.returncode == 0 and "cifar10, cifar10_v, digits, folder" in " ".join(train.stdout.split())
    missing = ddpm("sample", "--checkpoint", "nothing")  # the command's own errors, as ddpm-sample's
    assert missing.returncode == 1 and missing.stderr.startswith("error: nothing: no such file or folder")
    unknown = ddpm("bogus")
    assert (
        unknown.returncode == 2
        and "unknown command 'bogus': the commands are train, sample" in unknown.stderr
    )


def test_every_command_of_ddpm_has_a_main_taking_its_arguments():
    for name, (module, _) in COMMANDS.items():
        main = importlib.import_module(module).main
        assert list(inspect.signature(main).parameters) == ["argv"], name


def test_a_config_name_finds_the_bundled_file_and_an_existing_file_wins(tmp_path, monkeypatch):
    assert BUNDLED_CONFIGS == ROOT / "configs" and DEFAULT_CONFIG == ROOT / "configs" / "digits.yaml"
    assert resolve_config("cifar10") == resolve_config("cifar10.yaml") == ROOT / "configs" / "cifar10.yaml"
    assert load_config("cifar10").model["base_channels"] == 128
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar10.yaml").write_text("train:\n  steps: 7\n")
    assert resolve_config("cifar10.yaml") == Path("cifar10.yaml")  # the file given, not the bundled one
    assert load_config("cifar10.yaml").train.steps == 7 and load_config("cifar10").train.steps == 800000
    with pytest.raises(
        ConfigError,
        match=r"config file cifar100 not found; .*bundled config: attributes_digits, cifar10, cifar10_v, "
        r"digits, folder",
    ):
        load_config("cifar100")
    with pytest.raises(ConfigError, match=r"config file sub/digits.yaml not found"):
        resolve_config("sub/digits.yaml")  # a path with a folder is a path, never a bundled name


def test_python_m_ddpm_train_lists_the_bundled_configs():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "ddpm.train", "--help"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    bundled = ", ".join(name.removesuffix(".yaml") for name in CONFIGS)
    assert f"bundled one: {bundled}" in " ".join(result.stdout.split())
