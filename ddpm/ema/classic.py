"""An exponential moving average (EMA) of a network's weights, the weights that samples are drawn from."""

from __future__ import annotations

import copy

import torch


class EMA:
    """A copy of a network whose parameters follow the training weights as an exponential moving average.

    After update n (n = 1, 2, ...) with training parameters theta_n:
        ema_n = d_n * ema_{n-1} + (1 - d_n) * theta_n,   ema_0 = theta_0 (the weights at construction),
        d_n = min(decay, (1 + n) / (10 + n)) with `warmup`, else decay,
    the warm-up of Tarvainen & Valpola 2017 that DDPM-style trainers use, so early averages are not dominated
    by the random initial weights. Only parameters are averaged; buffers are copied (an average of, say, a
    step counter or a precomputed table means nothing).

    The update count lives on the host (an int, saved with each checkpoint as `ema_updates`), so an update
    queues device work and never waits for the device.

    Args:
        model: the network to follow (not the DDP wrapper); it is deep-copied into `module`.
        decay: the decay after the warm-up, in [0, 1).
        warmup: whether the decay warms up as above.
    """

    def __init__(self, model: torch.nn.Module, decay: float, *, warmup: bool = True):
        self.module = copy.deepcopy(model).requires_grad_(False).eval()  # only ever sampled from and saved
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    def decay_at(self, n: int) -> float:
        """d_n, the weight that update n gives the previous average."""
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards `model`'s current parameters and copy its buffers (update n + 1)."""
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)  # a Python float: nothing is read back from the device
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), weight)
        for mine, theirs in zip(self.module.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)
