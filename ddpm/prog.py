"""The name a command shows in its usage line and its errors (argparse's `prog`), however it was started."""

import os
import sys


def command_name(module: str) -> str:
    """`ddpm COMMAND` when the `ddpm` command runs it (`ddpm.cli` puts that name in sys.argv[0]), the console
    script's name when one runs it (`ddpm-export`), and `python -m MODULE` when Python runs the module's
    file (sys.argv[0] ends in .py, or is "-c"), where argparse's default would show the file's name."""
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    return f"python -m {module}" if name in ("", "-c") or name.endswith(".py") else name
