"""How torch's CPU threads wait for each other: the OpenMP wait policy a ddpm process starts with.

torch's CPU wheels run their parallel loops on GNU OpenMP (libgomp). Between two parallel regions a worker
thread that has finished its share waits for the next one: by default it spins on its core for 300,000
iterations (about a millisecond) before it sleeps (libgomp's GOMP_SPINCOUNT; OMP_WAIT_POLICY=PASSIVE
makes it 0, ACTIVE about five minutes). Alone on the machine that spinning costs little; beside another
process it takes the core the other process's threads were to run on, and both stall: two default training
runs at once on two cores each took several times a fair share (BENCHMARKS.md, "Training beside other
work"). libgomp reads these variables once, when torch loads, so they must be in the environment before
that: `ddpm/__init__.py` calls `apply_openmp_defaults` first thing, ahead of every import of torch, so that
every ddpm command (and `accelerate launch`'s processes, which run one) starts with them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# The variables that decide how long a waiting libgomp thread spins; a user who sets either keeps theirs.
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# ddpm's default: waiting threads sleep at once (bench/cpu_load.py measures it against the others).
DEFAULT_WAIT = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_openmp_defaults() -> dict[str, str]:
    """Add `openmp_defaults(os.environ)` to this process's environment, which the processes it starts
    inherit, and return what was added; nothing when torch is loaded already (its runtime has read the
    variables: setting them now would change what the environment says, not how the threads wait)."""
    if "torch" in sys.modules:
        return {}
    added = openmp_defaults(os.environ)
    os.environ.update(added)
    return added


def openmp_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to `environ` (a process's environment) before torch loads: DEFAULT_WAIT unless
    the user set one of WAIT_VARIABLES (to any non-empty value), else none."""
    if any(environ.get(name) for name in WAIT_VARIABLES):
        return {}
    return dict(DEFAULT_WAIT)
