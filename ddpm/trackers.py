"""The experiment trackers a run logs to (train.log_with): which exist, which are installed, what "auto" is.

Only their names are handled here, with the standard library, so that the config can check train.log_with
(`ddpm.config.tracker_names`); the run's Accelerator starts the trackers and `ddpm.training.run_log` writes to
them.
"""

import importlib.util
import netrc
import os
from urllib.parse import urlparse

# Accelerate's names of the trackers we support -> the pip package that provides each.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}
# The values of train.log_with: "auto" is every installed tracker that can log without asking anything
# (`auto_trackers`), "all" every tracker (each must be installed), "none" no tracker.
LOG_WITH = ("auto", "all", "none", *TRACKERS)


def trackers(log_with: str) -> list[str]:
    """The names of the trackers train.log_with=`log_with` means, in Accelerate's spelling.

    Raises ValueError for a value not in LOG_WITH, and when a tracker named (or "all") is not installed, with
    the pip command that installs it.
    """
    if log_with not in LOG_WITH:
        raise ValueError(f"unknown log_with {log_with!r}; valid: {', '.join(LOG_WITH)}")
    if log_with == "auto":
        return auto_trackers()
    wanted = [] if log_with == "none" else list(TRACKERS) if log_with == "all" else [log_with]
    missing = [TRACKERS[name] for name in wanted if not installed(name)]
    if missing:
        packages = " ".join(missing)
        raise ValueError(
            f"train.log_with={log_with} but {packages} {'is' if len(missing) == 1 else 'are'} not installed: "
            f'pip install {packages} (or pip install "ddpm[track]"), or set train.log_with=auto or none'
        )
    return wanted


def auto_trackers() -> list[str]:
    """What train.log_with=auto logs to: TensorBoard when installed, and Weights & Biases when installed and
    set up (`wandb_ready`), since otherwise wandb would stop the run at its start to ask for an account."""
    found = ["tensorboard"] if installed("tensorboard") else []
    return found + (["wandb"] if installed("wandb") and wandb_ready() else [])


def installed(tracker: str) -> bool:
    """Whether the package of `tracker` can be imported (found without importing it)."""
    return importlib.util.find_spec(TRACKERS[tracker]) is not None


def wandb_ready() -> bool:
    """Whether wandb can start a run without a prompt: WANDB_API_KEY or WANDB_MODE set (offline, disabled,
    ...), or the API key that `wandb login` stores in ~/.netrc (or $NETRC) for its server."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
