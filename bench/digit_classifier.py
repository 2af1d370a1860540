"""A small CNN classifier of the 16x16 digits, whose features stand in for Inception's in the kernel and
Frechet distances of bench/quality.py: Inception features of 16x16 grey digits blown up to 299x299 say little
about them, while this network trains in seconds on 2 CPU cores and knows what a digit looks like.

    conv3x3 (C -> 32), ReLU, maxpool 2      (N, C, S, S) -> (N, 32, S/2, S/2)
    conv3x3 (32 -> 64), ReLU, maxpool 2     -> (N, 64, S/4, S/4)
    (flattened: the convolutional features, `conv_features`, 1,024 at S = 16)
    linear (64 S^2 / 16 -> 64), ReLU        -> (N, 64): the hidden features, `features`
    linear (64 -> classes)                  -> (N, classes): the logits

Trained with Adam on a fixed 80% of the images; the accuracy on the other 20% is reported (and must exceed
95% for the features to be trusted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_DIM = 64
MIN_ACCURACY = 0.95  # held-out accuracy below which bench/quality.py refuses to score


class DigitClassifier(nn.Module):
    def __init__(self, *, channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.hidden = nn.Linear(64 * (image_size // 4) ** 2, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Images (N, C, S, S) in [-1, 1] -> features (N, FEATURE_DIM)."""
        return F.relu(self.hidden(self.conv_features(x)))

    def conv_features(self, x: Tensor) -> Tensor:
        """Images (N, C, S, S) in [-1, 1] -> the last convolution's pooled maps, flattened (N, 64 S^2 / 16):
        where in the image which strokes are, before the classifier's layer that keeps only the class."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, 32, S/2, S/2)
        return F.max_pool2d(F.relu(self.conv2(h)), 2).flatten(1)  # (N, 64, S/4, S/4) flattened

    def forward(self, x: Tensor) -> Tensor:
        """Images (N, C, S, S) -> logits (N, classes)."""
        return self.head(self.features(x))


def split(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The classifier's split of n images: (training indices, the held-out 20%), from a generator seeded with
    train_classifier's seed (which goes on to draw the batches from it)."""
    order = torch.randperm(n, generator=generator)
    return order[: int(0.8 * n)], order[int(0.8 * n) :]


def train_classifier(
    images: Tensor, labels: Tensor, *, epochs: int = 20, seed: int = 0
) -> tuple[DigitClassifier, float]:
    """Train on a seeded 80% of `images` (N, C, S, S) with `labels` (N,); returns the classifier in eval
    mode and its accuracy on the held-out 20%."""
    generator = torch.Generator().manual_seed(seed)
    train, held_out = split(len(images), generator)
    torch.manual_seed(seed)
    classifier = DigitClassifier(
        channels=images.shape[1], image_size=images.shape[2], num_classes=int(labels.max()) + 1
    )
    optimizer = torch.optim.Adam(classifier.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in train[torch.randperm(len(train), generator=generator)].split(64):
            loss = F.cross_entropy(classifier(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    classifier.eval().requires_grad_(False)
    accuracy = (classifier(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    return classifier, accuracy
