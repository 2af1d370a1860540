"""Training on Accelerate: `Trainer` (the loop), checkpoints and resume, run log, stop signals, NaN policy,
the importance sampler of t; progressive distillation on the same loop (`.distiller`)."""

from ddpm.config import ConfigError
from ddpm.data import DataError
from ddpm.io import CheckpointError
from ddpm.training.interruption import DistributedTimeoutError
from ddpm.training.nan_policy import NonFiniteLossError
from ddpm.training.trainer import Trainer

# Errors whose message says all a user needs: the training commands print them as one line, no traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError, DistributedTimeoutError, OSError)

__all__ = ["USER_ERRORS", "DistributedTimeoutError", "NonFiniteLossError", "Trainer"]
