"""The `ddpm` command in this process: `ddpm --help` lists every command, `ddpm COMMAND --help` is the
command's own help under the name `ddpm COMMAND`, a command that does not exist is named with the list, and
the names each command's usage line shows however it was started. tests/test_packaging.py runs the command
from an installed wheel."""

import importlib
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm.cli import COMMANDS, main
from ddpm.prog import command_name

ROOT = Path(__file__).resolve().parents[1]
# The commands whose own module names itself in its usage line when run with python -m (the other two, train
# and sample, are run in a clone as train.py and sample.py, the names argparse shows by default).
MODULE_COMMANDS = ("export", "fid", "nll", "ema", "distill", "segment")

# `ddpm --help`, then whether it loaded torch
HELP = """
import sys
from ddpm.cli import main
try:
    main(["--help"])
except SystemExit:
    print("torch" in sys.modules)
"""


def help_of(run, capsys) -> str:
    """What `run()`, a --help, printed before it exited with status 0."""
    with pytest.raises(SystemExit) as exited:
        run()
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_ddpm_help_lists_every_command_with_its_summary_on_one_line_without_loading_torch():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", HELP], capture_output=True, text=True, env=env, cwd=ROOT)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[-1] == "False", result.stderr  # quick: torch is not imported
    rows = [line.split(maxsplit=1) for line in lines]
    listed = {row[0]: row[1] for row in rows if len(row) == 2 and row[0] in COMMANDS}
    assert listed == {name: summary for name, (_, summary) in COMMANDS.items()}  # whole: no line wrapped


@pytest.mark.parametrize("name", list(COMMANDS))
def test_ddpm_command_help_is_the_commands_own_under_its_ddpm_name(name, capsys, monkeypatch):
    program = sys.argv[0]
    ours = help_of(lambda: main([name, "--help"]), capsys)
    assert ours.startswith(f"usage: ddpm {name} [-h]") and sys.argv[0] == program  # the name put back
    monkeypatch.setattr(sys, "argv", [f"ddpm-{name}"])  # as the console script ddpm-NAME runs it
    own = help_of(lambda: importlib.import_module(COMMANDS[name][0]).main(["--help"]), capsys)
    assert own.startswith(f"usage: ddpm-{name} [-h]")
    # after the usage block (wrapped at the name's width): the description and every option, word for word
    assert ours.split("\n\n", 1)[1] == own.split("\n\n", 1)[1]


def test_ddpm_sample_help_has_the_options_of_python_sample_py(capsys, monkeypatch):
    ours = help_of(lambda: main(["sample", "--help"]), capsys)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "sample.py"), "--help"])  # python sample.py --help
    clone = help_of(lambda: runpy.run_path(str(ROOT / "sample.py"), run_name="__main__"), capsys)
    assert clone.startswith("usage: sample.py [-h] [--n N] [--checkpoint CHECKPOINT]")
    assert ours.split("\n\n", 1)[1] == clone.split("\n\n", 1)[1] and "--openai-flags FLAGS" in ours


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["bogus"], "unknown command 'bogus'"),
        (["--resume"], "unknown command '--resume'"),
        ([], "no command"),
    ],
)
def test_a_missing_or_unknown_command_is_named_with_the_list_of_commands(argv, said, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"ddpm: error: {said}: the commands are train, sample, export, fid, nll, ema, distill, segment "
        "(`ddpm --help` says what each does)"
    )


@pytest.mark.parametrize(
    ("argv0", "shown"),
    [
        ("ddpm export", "ddpm export"),  # set by ddpm.cli
        ("/venv/bin/ddpm-export", "ddpm-export"),  # the console script
        ("/clone/ddpm/export.py", "python -m ddpm.export"),  # python -m ddpm.export
        ("-c", "python -m ddpm.export"),
    ],
)
def test_a_command_names_itself_as_it_was_started(argv0, shown, monkeypatch):
    monkeypatch.setattr(sys, "argv", [argv0])
    assert command_name("ddpm.export") == shown


@pytest.mark.parametrize("name", MODULE_COMMANDS)
def test_python_m_shows_python_m_module_in_the_usage_line(name, capsys, monkeypatch):
    module = COMMANDS[name][0].removesuffix(".__main__")
    monkeypatch.setattr(sys, "argv", [str(ROOT / (module.replace(".", "/") + ".py"))])
    own = help_of(lambda: importlib.import_module(COMMANDS[name][0]).main(["--help"]), capsys)
    assert own.startswith(f"usage: python -m {module} [-h]")
