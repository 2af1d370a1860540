"""What training does about a loss that is NaN or infinite (train.nan_policy): stop naming the step ("stop"),
or skip the step on every process ("skip"); and stop on an fp16 loss scale that keeps collapsing."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

# Below this the fp16 loss scale means gradients overflow even unscaled: stop (DeepSpeed's min_loss_scale).
MIN_LOSS_SCALE = 1.0


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite (or fp16 overflowed for good); nothing after the last good checkpoint
    was saved."""


def raise_if_nonfinite(
    accelerator: Accelerator, first_bad_step: torch.Tensor, *, step: int, last_saved: Path | None
) -> None:
    """Raise NonFiniteLossError when a finished step's loss was NaN/inf on some process (`first_bad_step`
    >= 0: `RunningLoss.first_bad_step`, a collective), or when the fp16 loss scale fell below MIN_LOSS_SCALE.
    """
    bad = int(accelerator.reduce(first_bad_step, "max"))
    if bad >= 0:
        raise NonFiniteLossError(
            f"the loss became NaN or infinite at step {bad}; nothing after it was saved "
            f"(last good checkpoint: {last_saved or 'none'}). Lower train.lr, raise train.warmup_steps, "
            "use mixed_precision=bf16 or no, or set train.nan_policy=skip"
        )
    # GradScaler halves the scale and skips the step whenever fp16 gradients overflow; below 1 they
    # overflow even unscaled, so training has stalled while the loss still looks finite.
    scaler = accelerator.scaler
    if scaler is not None and scaler.is_enabled() and scaler.get_scale() < MIN_LOSS_SCALE:
        raise NonFiniteLossError(
            f"the fp16 loss scale fell to {scaler.get_scale():g} by step {step}: gradients "
            "overflow fp16 at nearly every step and those steps are skipped (last good checkpoint: "
            f"{last_saved or 'none'}). Use train.mixed_precision=bf16 or no, or lower train.lr"
        )


def finite_on_every_process(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """Whether `loss` is finite on every process (a collective and a host sync)."""
    return bool(accelerator.reduce(torch.isfinite(loss).float(), "min"))


def skip_step(accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> None:
    """Drop the step's gradients without an optimizer step.

    Under fp16 the loss scaler must still end its step, as it does when it skips an overflowing step
    itself: update() lowers the scale (the unscale found the NaN) and lets the next step unscale again.
    The gradients must have been unscaled for that (they are on every step: `Trainer._optimizer_step`).
    """
    optimizer.zero_grad(set_to_none=True)
    if accelerator.scaler is not None:
        accelerator.scaler.update()
