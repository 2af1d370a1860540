"""Training on Accelerate: `Trainer`, its checkpoints and resume."""

from ddpm.training.trainer import DistributedTimeoutError, NonFiniteLossError, Trainer

__all__ = ["DistributedTimeoutError", "NonFiniteLossError", "Trainer"]
