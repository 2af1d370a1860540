"""Measurable attributes of an image, the vector condition of the built-in task data.task=attributes.

`measure_attributes` computes, for each image, ATTRIBUTES in their own units from its ink p in [0, 1] (the
image's value (x + 1) / 2, its channels averaged: bright strokes on a dark ground, as the digits and MNIST
are drawn):

- ink: the mean intensity of the strokes, sum p^2 / sum p (each pixel's intensity weighted by its ink): 1
  for strokes at full intensity, v for strokes all of intensity v, whatever their area or shape.
- thickness: the strokes' width in pixels, 2 sum p / sum |grad p| (twice the ink mass over its perimeter,
  the perimeter being the anisotropic total variation |dp/dx| + |dp/dy| with forward differences, the image
  padded with no ink). A w x L bar measures w L / (w + L) exactly, close to w for a long stroke, whatever its
  intensity; a stroke at an angle theta to the axes reads thinner by 1 / (|cos theta| + |sin theta|) (at
  most by 1/sqrt(2), on the diagonals).
- slant: the shear of the ink, mu11 / mu02 from its second central moments (weights p, x to the right and
  y upwards, in pixels): a stroke x = x0 + s y measures s exactly, positive for one leaning right, as
  italics do; 0 for upright strokes.

An image with no ink measures 0 on each (no 0/0). The same function serves the data pipeline
(`ddpm.data.batch_conditions`, with each attribute standardised by `standardise_attributes` with the
training set's mean and std, `attribute_statistics`) and the measurement of generated images
(bench/vector_condition.py). Deterministic; nothing here is differentiated.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

ATTRIBUTES = ("ink", "thickness", "slant")  # the order of the vector's entries


def measure_attributes(images: Tensor) -> Tensor:
    """The ATTRIBUTES of images (N, C, H, W) in [-1, 1], in their own units (see the module's docstring):
    (N, len(ATTRIBUTES)) float32 on the images' device. Computed in float64."""
    p = ((images.double().mean(1) + 1) / 2).clamp(0, 1)  # (N, H, W): each pixel's ink
    mass = p.sum((1, 2))  # (N,)
    ink = _ratio(p.square().sum((1, 2)), mass)
    # forward differences over the image padded with one pixel of no ink on each side
    padded = F.pad(p, (1, 1, 1, 1))  # (N, H + 2, W + 2)
    perimeter = padded.diff(dim=1).abs().sum((1, 2)) + padded.diff(dim=2).abs().sum((1, 2))
    thickness = _ratio(2 * mass, perimeter)
    height, width = p.shape[1:]
    x = torch.arange(width, dtype=p.dtype, device=p.device) + 0.5  # pixel centres, to the right
    y = -(torch.arange(height, dtype=p.dtype, device=p.device) + 0.5)  # upwards: row 0 is the top
    x_bar = _ratio((p * x).sum((1, 2)), mass)  # (N,)
    y_bar = _ratio((p * y[:, None]).sum((1, 2)), mass)
    dx = x - x_bar[:, None, None]  # (N, 1, W)
    dy = y[:, None] - y_bar[:, None, None]  # (N, H, 1)
    mu11 = (p * dx * dy).sum((1, 2))
    mu02 = (p * dy.square()).sum((1, 2))
    slant = _ratio(mu11, mu02)
    return torch.stack([ink, thickness, slant], dim=1).float()


def attribute_statistics(values: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and standard deviation (unbiased) of each attribute over a set of images' measured values
    (N, len(ATTRIBUTES)), N >= 2: the units `standardise_attributes` divides by. Raises ValueError when an
    attribute does not vary (its std is 0): it could not be standardised."""
    if values.ndim != 2 or values.shape[1] != len(ATTRIBUTES) or len(values) < 2:
        raise ValueError(
            f"expected (N >= 2, {len(ATTRIBUTES)}) measured attributes, got {tuple(values.shape)}"
        )
    mean, std = values.double().mean(0), values.double().std(0)
    flat = [name for name, s in zip(ATTRIBUTES, std.tolist(), strict=True) if s == 0]
    if flat:
        raise ValueError(f"the attribute(s) {', '.join(flat)} do not vary over these {len(values)} images")
    return tuple(mean.tolist()), tuple(std.tolist())


def standardise_attributes(values: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Measured attributes (N, len(ATTRIBUTES)) in their own units as the vector condition: (values - mean)
    / std per attribute (0 a typical image of the training set, 1 one standard deviation above), float32."""
    mean_, std_ = (torch.tensor(v, dtype=torch.float64, device=values.device) for v in (mean, std))
    return ((values.double() - mean_) / std_).float()


def unstandardise_attributes(vector: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """The inverse of `standardise_attributes`: a vector condition (N, len(ATTRIBUTES)) back in each
    attribute's own units, float32."""
    mean_, std_ = (torch.tensor(v, dtype=torch.float64, device=vector.device) for v in (mean, std))
    return (vector.double() * std_ + mean_).float()


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, 0 where the denominator is 0 (an image with no ink)."""
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator))
