"""The learning rate of each optimizer step: a linear warm-up, then constant, cosine or linear decay.

A pure function of the step (and the run's settings), never a stateful scheduler object, so that a resumed run
takes exactly the learning rates of an uninterrupted one without saving any scheduler state.
"""

import math

# The values of train.lr_schedule: what follows the warm-up.
LR_SCHEDULES = ("constant", "cosine", "linear")


def learning_rate(
    step: int,
    *,
    lr: float,
    steps: int,
    warmup_steps: int = 0,
    schedule: str = "constant",
    lr_min: float = 0.0,
) -> float:
    """The learning rate of the optimizer step taken after `step` steps (0 for the first).

    Warm-up (Goyal et al. 2017): lr * (step + 1) / warmup_steps while step < warmup_steps, so that the last
    warm-up step takes lr. Then, with p = (step - warmup_steps) / (steps - warmup_steps), the fraction of the
    steps after the warm-up that are done (0 at the first, 1 - 1/(steps - warmup_steps) at the last):

    - "constant": lr;
    - "cosine" (SGDR, Loshchilov & Hutter 2017, eq. 5, one cycle): lr_min + (lr - lr_min) (1 + cos(pi p)) / 2;
    - "linear": lr_min + (lr - lr_min) (1 - p).

    Both decays would reach lr_min at step == steps, one step after the last, so that no step is taken at a
    learning rate of 0 when lr_min is 0. Units: lr and lr_min are the optimizer's learning rate; steps and
    warmup_steps count optimizer steps (train.steps, train.warmup_steps).

    Raises ValueError for an unknown schedule, naming the valid ones.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    p = min(1.0, (step - warmup_steps) / max(steps - warmup_steps, 1))
    decay = (1 + math.cos(math.pi * p)) / 2 if schedule == "cosine" else 1 - p
    return lr_min + (lr - lr_min) * decay
