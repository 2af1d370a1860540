"""The digit_strips data set: images of one to three handwritten digits, each with its token sequence, for
conditioning a network on a sequence (cross-attention, model.context_dim), made from scikit-learn's digits
with no download.

Layout: a square image of side S (data.image_size, even) cut into a 2 x 2 grid of slots of side S/2. A strip
of L digits (L = 1, 2 or 3) fills slots 0 .. L-1 in reading order (top left, top right, bottom left); the
other slots, and slot 3 always, stay blank (0 on the [0, 1] scale). Each digit is one of the split's digits
resized to S/2 (bilinear, antialiased), as the digits data set resizes them: at S = 16 a slot holds the 8 x 8
digit exactly as scikit-learn ships it.

Why a folded square and not a 16 x 48 strip: the configs, the data and the samplers take one image side
(data.image_size, model.image_size), and three 8 x 8 digits fit a 16 x 16 square, the digits network's own
size and cost. Why from the first slot rather than centred: a token's position then names one slot whatever
the length, so the network learns one place per position and a reader cuts fixed slots.

Tokens: token k of a strip is [one-hot of its digit (10), one-hot of its position k (MAX_DIGITS)], CONTEXT_DIM
= 13 wide, fixed (nothing learned): the network's cross-attention projects it. A strip of L digits has L
tokens; a batch pads them to the longest with the padding mask context_mask (ddpm.conditions).

Deterministic: the strips of a split depend only on `seed` (a generator per split), and are made of that
split's digits alone (ddpm.data.digits_split), so no held-out digit appears in a training strip.
`ddpm.data.digit_strips` makes a split's strips, `ddpm.data.DigitStripsDataset` serves them as training data.
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_DIGITS = 3  # digits in the longest strip
GRID = 2  # slots per side: MAX_DIGITS of the GRID x GRID slots are used
CONTEXT_DIM = 10 + MAX_DIGITS  # a token: one-hot digit, one-hot position
EMPTY = -1  # the digit of an empty slot in a (N, MAX_DIGITS) sequence
# Strips made from each split: training sees each of its 1,621 digits about 7 times over.
STRIPS = {"train": 6000, "test": 600}
SPLIT_STREAM = {"train": 0, "test": 1}  # each split's generator is seeded with seed * 2 + this


def random_sequences(n: int, generator: torch.Generator) -> Tensor:
    """n random digit sequences (n, MAX_DIGITS) long: a length uniform in 1..MAX_DIGITS, digits uniform in
    0..9 in the first positions, EMPTY after."""
    lengths = torch.randint(1, MAX_DIGITS + 1, (n,), generator=generator)
    digits = torch.randint(0, 10, (n, MAX_DIGITS), generator=generator)
    return torch.where(torch.arange(MAX_DIGITS) < lengths[:, None], digits, EMPTY)


def draw_strips(
    digits: Tensor, labels: Tensor, sequences: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The strips of `sequences` (N, MAX_DIGITS) (EMPTY after each strip's digits): each digit d drawn
    uniformly from the `digits` (M, 1, s, s) in [0, 1] whose `labels` (M,) are d. Returns the strips (N, 1,
    2s, 2s) in [-1, 1] (`place`) and the index into `digits` of each slot's digit (N, MAX_DIGITS), EMPTY for
    an empty slot."""
    index = torch.full(sequences.shape, EMPTY)
    for digit in range(10):
        where = sequences == digit
        pool = (labels == digit).nonzero().squeeze(1)
        index[where] = pool[torch.randint(0, len(pool), (int(where.sum()),), generator=generator)]
    return place(digits, index), index


def place(digits: Tensor, index: Tensor) -> Tensor:
    """Strips of the `digits` (M, 1, s, s) in [0, 1] that `index` (N, MAX_DIGITS) picks for each slot
    (EMPTY: blank): (N, 1, GRID s, GRID s) in [-1, 1], slot k at grid row k // GRID, column k % GRID."""
    n, side = len(index), digits.shape[-1]
    slots = torch.zeros(n, GRID * GRID, 1, side, side)
    filled = index != EMPTY
    slots[:, :MAX_DIGITS][filled] = digits[index[filled]]
    return join_slots(slots) * 2 - 1


def join_slots(slots: Tensor) -> Tensor:
    """(N, GRID^2, C, s, s) slots in reading order -> (N, C, GRID s, GRID s) images."""
    n, _, c, s, _ = slots.shape
    grid = slots.reshape(n, GRID, GRID, c, s, s).permute(0, 3, 1, 4, 2, 5)  # (N, C, row, y, column, x)
    return grid.reshape(n, c, GRID * s, GRID * s)


def cut_slots(images: Tensor) -> Tensor:
    """The slots of images (N, C, S, S), S even, in reading order: (N, GRID^2, C, S/2, S/2); the inverse of
    `join_slots`."""
    n, c, size, _ = images.shape
    s = size // GRID
    grid = images.reshape(n, c, GRID, s, GRID, s).permute(0, 2, 4, 1, 3, 5)  # (N, row, column, C, y, x)
    return grid.reshape(n, GRID * GRID, c, s, s)


def sequence_tokens(sequences: Tensor) -> tuple[Tensor, Tensor]:
    """The token sequences of digit sequences (N, MAX_DIGITS) long (EMPTY after the digits): tokens (N,
    MAX_DIGITS, CONTEXT_DIM) float, token k = [one-hot digit, one-hot k], zero where EMPTY, and the padding
    mask (N, MAX_DIGITS) bool, True at the real tokens (ddpm.conditions' "context" and "context_mask")."""
    mask = sequences != EMPTY
    digit = torch.nn.functional.one_hot(sequences.clamp(min=0), 10).float()
    position = torch.eye(MAX_DIGITS).expand(len(sequences), -1, -1)
    return torch.cat([digit, position], dim=-1) * mask[..., None], mask
