"""Whether a state dict fits a module: the one check behind every load of saved weights (model folders,
diffusers conversions, training checkpoints), with its problems spelled out."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


def weight_mismatches(model: nn.Module, shapes: dict[str, Sequence[int]]) -> list[str]:
    """What keeps tensors with these names and shapes (name -> shape) from loading into `model`: the missing,
    unexpected and mis-shaped names, each as a short phrase; empty when they fit exactly."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in shapes]
    problems += [f"unexpected {k}" for k in shapes if k not in expected]
    problems += [
        f"{k}: file {tuple(shape)} vs model {expected[k]}"
        for k, shape in shapes.items()
        if k in expected and tuple(shape) != expected[k]
    ]
    return problems


def load_checked(model: nn.Module, state: dict[str, Tensor], mismatch: str, fix: str) -> None:
    """Loads `state` into `model`, or raises ValueError "<mismatch> (<problems>); <fix>" listing the missing,
    unexpected and mis-shaped tensors."""
    problems = weight_mismatches(model, {k: v.shape for k, v in state.items()})
    if problems:
        raise ValueError(f"{mismatch} ({len(problems)} problems, e.g. {problems[:5]}); {fix}")
    model.load_state_dict(state)
