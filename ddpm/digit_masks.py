"""The digit_masks data set: image/mask pairs for segmentation that need no download, made from scikit-learn's
handwritten digits (the seed write-up's task, segmentation, at the digits' scale).

Each pair is one digit (the target) drawn over clutter and noise, and its mask:

    target  the digit at image_size x image_size in [0, 1], resized as the digits data set is (ddpm.data)
    clutter CLUTTER_FRAGMENTS fragments of other digits of the same split: a random window (a third to two
            thirds of the side each way) of another digit, shifted by up to half the side, drawn at the
            target's own intensity
    image   max(target, clutter) + N(0, NOISE_STD^2), clamped to [0, 1]
    mask    target > MASK_THRESHOLD: the target's strokes, 1 inside, 0 outside

Why this set: the clutter is made of the same strokes, at the same intensity, as the target, so no pixel-wise
rule (a threshold, a local filter) separates them. Telling which strokes are the digit takes the shape of a
whole digit, and where clutter crosses the target the answer is ambiguous, so that a segmentation ensemble has
real uncertainty to show. The noise hides the faint edge strokes, whose masking is uncertain too.

Deterministic: the pairs of a split depend only on `seed` (a generator per split), and the clutter of a split
is drawn from that split's digits alone, so no test digit appears in a training image. `ddpm.data.digit_masks`
makes a split's pairs, `ddpm.data.DigitMasksDataset` serves them as training data.
"""

from __future__ import annotations

import torch
from torch import Tensor

CLUTTER_FRAGMENTS = 3  # fragments of other digits over each target
NOISE_STD = 0.15  # of the Gaussian pixel noise, on the [0, 1] scale
MASK_THRESHOLD = 0.5  # a pixel of the clean digit above this is a stroke: in the mask
# Pairs made from each digit: training sees each digit under several clutters; the test split twice.
COPIES = {"train": 4, "test": 2}
SPLIT_STREAM = {"train": 0, "test": 1}  # each split's generator is seeded with seed * 2 + this


def clutter_pairs(digits: Tensor, copies: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """The pairs made from `digits` (M, 1, S, S) in [0, 1], `copies` per digit (pair i from digit i % M):
    images (M * copies, 1, S, S) and masks (the same shape), both float in [-1, 1] (masks exactly -1 or 1),
    and each pair's digit index (M * copies,). The clutter comes from the other `digits`, every draw from
    `generator`. See the module docstring for how they are made."""
    index = torch.arange(len(digits)).repeat(copies)
    targets = digits[index]
    images = targets.clone()
    for _ in range(CLUTTER_FRAGMENTS):
        images = torch.maximum(images, _fragments(digits, index, generator))
    images = (images + NOISE_STD * torch.randn(images.shape, generator=generator)).clamp(0.0, 1.0)
    masks = (targets > MASK_THRESHOLD).float()
    return images * 2 - 1, masks * 2 - 1, index


def _fragments(digits: Tensor, index: Tensor, generator: torch.Generator) -> Tensor:
    """One clutter fragment per pair, (N, 1, S, S): a window of a digit other than the pair's target
    (`index`, (N,)), shifted; zero elsewhere."""
    n, size = len(index), digits.shape[-1]
    # Another digit: the target's index plus 1..M-1, modulo M
    other = (index + torch.randint(1, len(digits), (n,), generator=generator)) % len(digits)
    low, high = max(1, size // 3), max(2, 2 * size // 3)
    height, width = (torch.randint(low, high + 1, (n,), generator=generator) for _ in range(2))
    top = (torch.rand(n, generator=generator) * (size - height + 1)).long()
    left = (torch.rand(n, generator=generator) * (size - width + 1)).long()
    pixels = torch.arange(size)[None, :]
    in_rows = (pixels >= top[:, None]) & (pixels < (top + height)[:, None])  # (N, S)
    in_cols = (pixels >= left[:, None]) & (pixels < (left + width)[:, None])
    fragments = digits[other] * (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (N, 1, S, S)
    shift = size // 2
    dy, dx = (torch.randint(-shift, shift + 1, (n,), generator=generator) for _ in range(2))
    return _shift(fragments, dy, dx)


def _shift(images: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Each image (N, C, S, S) moved by (dy[i], dx[i]) pixels (down, right), zeros shifted in."""
    n, _, size, _ = images.shape
    rows = torch.arange(size)[None, :] - dy[:, None]  # (N, S): the source row of each output row
    cols = torch.arange(size)[None, :] - dx[:, None]
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    batch = torch.arange(n)[:, None, None]
    moved = images[batch, :, rows.clamp(0, size - 1)[:, :, None], cols.clamp(0, size - 1)[:, None, :]]
    return moved.permute(0, 3, 1, 2) * inside[:, None]  # advanced indexing put C last: (N, S, S, C)
