"""What stops a run from outside: a stop signal (SIGINT, SIGTERM), agreed on by all processes, or another
process that crashed or hangs."""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path

import torch
from accelerate import Accelerator

# With several processes, how often (in steps, at most) they agree on whether a stop signal arrived.
STOP_CHECK_EVERY = 10
# What a run prints before it starts, where the signals can stop it: what Ctrl-C does and how to continue.
STOP_HINT = (
    "Ctrl-C or SIGTERM saves a checkpoint of the current step and stops; continue with the same command and "
    "--resume"
)
# How gloo and NCCL word a collective that timed out or lost its peer.
_PEER_FAILURE = re.compile(r"timed? ?out|connection (closed|reset)", re.I)


class DistributedTimeoutError(RuntimeError):
    """A process waited longer than train.dist_timeout_s for the others: one of them crashed or hangs."""


class StopSignals:
    """While entered, SIGINT and SIGTERM ask training to stop at the end of a step instead of ending it.

    Repeats are ignored: launchers pass on the signal that the terminal or the cluster already sent to every
    process, and the save that follows must not be cut short (SIGKILL stops at once). The previous handlers
    come back on exit. Python lets only the main thread set signal handlers, and delivers signals there: in
    another thread (a Trainer run by a harness or a notebook thread) nothing is installed and no signal stops
    the run; stopping it is then up to whoever runs that thread.

    Args:
        accelerator: the run's Accelerator; with several processes `stop_requested` is a collective.
        check_every: with several processes, agree every min(check_every, STOP_CHECK_EVERY) steps.
    """

    def __init__(self, accelerator: Accelerator, *, check_every: int):
        self.accelerator = accelerator
        self.check_every = min(check_every, STOP_CHECK_EVERY)
        self.stopped_by: signal.Signals | None = None  # the stop signal, once the processes agreed on it
        self._received: signal.Signals | None = None  # the stop signal this process received
        self._previous: dict = {}

    def hint(self) -> str | None:
        """STOP_HINT, the line to print before the run starts; None where no handler can be installed (not
        the main thread), since a signal then does not stop the run."""
        return STOP_HINT if threading.current_thread() is threading.main_thread() else None

    def __enter__(self) -> StopSignals:
        def request_stop(signum, frame):
            self._received = self._received or signal.Signals(signum)

        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, request_stop)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def stop_requested(self, step: int) -> bool:
        """True once SIGINT/SIGTERM arrived on any process; sets `stopped_by`.

        With several processes they agree (one collective) at every `check_every`-th step, so that all stop
        at the same step, each with the same signal. Every process must call this at every step.
        """
        if self.accelerator.num_processes == 1:
            self.stopped_by = self._received
        elif step % self.check_every == 0:
            received = torch.tensor(int(self._received or 0), device=self.accelerator.device)
            agreed = int(self.accelerator.reduce(received, "max"))
            self.stopped_by = signal.Signals(agreed) if agreed else None
        return self.stopped_by is not None


def raise_if_peer_failed(
    error: RuntimeError, accelerator: Accelerator, *, timeout_s: float, step: int, last_saved: Path | None
) -> None:
    """Raise DistributedTimeoutError from `error` when it says that another process timed out or went away
    (gloo raises a plain RuntimeError, NCCL a DistError), naming the step and where to resume from."""
    peer_failed = isinstance(error, torch.distributed.DistError) or (
        type(error) is RuntimeError and bool(_PEER_FAILURE.search(str(error)))
    )
    if accelerator.num_processes == 1 or not peer_failed:
        return
    if re.search(r"timed? ?out", str(error), re.I):
        what = f"got no answer from the others within train.dist_timeout_s={timeout_s:g} s"
    else:
        what = "lost the connection to the others"
    then = f"continue from {last_saved} with --resume" if last_saved else "no checkpoint was saved yet"
    raise DistributedTimeoutError(
        f"process {accelerator.process_index} {what} at step {step}: another process crashed or hangs "
        f"(see its messages); {then}"
    ) from error
