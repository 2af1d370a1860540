"""Training on Accelerate: `Trainer` (the loop), checkpoints and resume, run log, stop signals, NaN policy,
the importance sampler of t."""

from ddpm.training.interruption import DistributedTimeoutError
from ddpm.training.nan_policy import NonFiniteLossError
from ddpm.training.trainer import Trainer

__all__ = ["DistributedTimeoutError", "NonFiniteLossError", "Trainer"]
