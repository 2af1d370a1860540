"""Datasets: each yields `(image, label)`, image a float tensor (C, S, S) in [-1, 1], label a 0-d long tensor
(-1 when labels are off or the data set has none), and a data set that gives conditions with its images
(ddpm.config.DATASET_CONDITIONS) `(image, label, conditions)`, conditions a dict kind -> tensor.

- digits: the 1,797 8x8 handwritten digits that scikit-learn ships (values 0..16), resized once, one tensor;
  split "train" is 1,621 of them, "test" the other 176 (every tenth of each digit: `digits_split`), "all"
  both.
- digit_masks: the digits over clutter and noise with their masks (ddpm.digit_masks), for segmentation: each
  item is (mask, label, {"image": the cluttered digit}), the mask the image to generate, the cluttered digit
  its image condition; splits "train" and "test" (from the digits' own).
- digit_strips: one to three digits in the slots of an image, each with its token sequence
  (ddpm.digit_strips), for conditioning on a sequence: each item is (strip, -1, {"context": its tokens (L,
  13)}); splits "train" and "test" (from the digits' own).
- folder: any folder of images, searched recursively; labels from the first-level sub-folder names. It has
  only the split "train" (all of it).
- cifar10, mnist, fashion_mnist, celeba: torchvision's classes, read from data.root (downloaded there when
  data.download is true); split "train" or "test" (torchvision's train=False, CelebA's "test").

A built-in task (data.task) derives conditions from each batch of images, so that any data set serves it
(`batch_conditions`): "superres" gives the model the image area-downsampled by data.superres_factor
(`superres_condition`), "inpaint" the image with random holes and the mask of its known pixels
(`inpaint_masks`, `inpaint_condition`), "attributes" the vector of the image's measured attributes
(`ddpm.attributes`), in units of the training set's (`with_attribute_statistics`).
"""

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset, get_worker_info
from torchvision.transforms import v2
from tqdm.auto import tqdm

from ddpm import digit_strips as strips
from ddpm.attributes import attribute_statistics, measure_attributes, standardise_attributes
from ddpm.condition_files import (
    ARRAY_SUFFIXES,
    FILE_KINDS,
    SIZE_ARGUMENTS,
    ConditionFileError,
    find_beside,
    is_condition_file,
    read_array,
    shape_problem,
)
from ddpm.conditions import Conditions, collate_conditions
from ddpm.config import DATASETS, DataConfig, split_problem
from ddpm.digit_masks import COPIES, SPLIT_STREAM, clutter_pairs

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
INPUTS, TARGETS = "inputs", "targets"  # data.paired's folders: the image conditions, the images
# The most DataLoader workers that data.num_workers "auto" starts per process (the number the shipped configs
# asked for before "auto").
AUTO_WORKERS = 4
# The inpaint task's masks (`inpaint_masks`), in fractions of the side: a box's sides, and a brush stroke's
# segments' lengths and its width (at least BRUSH_MIN_WIDTH pixels, so that a stroke always covers the pixel
# it starts in: a pixel's centre lies within sqrt(2)/2 of any point of the pixel).
BOX_SIDES = (1 / 4, 3 / 4)
BRUSH_SEGMENTS = 3
BRUSH_LENGTHS = (1 / 6, 1 / 2)
BRUSH_WIDTHS = (1 / 10, 1 / 4)
BRUSH_MIN_WIDTH = 1.5
# The digits' held-out split takes each digit's every HELD_OUT_EVERY-th image (`digits_split`).
HELD_OUT_EVERY = 10


class DataError(ValueError):
    """The data named by the config cannot be used (missing, empty, unreadable); the message says the fix."""


def build_dataset(data: DataConfig, model: Mapping[str, Any] | None = None) -> Dataset:
    """The images described by `data`: data.dataset (one of ddpm.config.DATASETS), its split data.split
    (train, test or all, as ddpm.config.SPLITS allows for that data set). With condition files
    (data.conditions, data.paired) each item also holds the image's conditions, their sizes those of the
    network's config `model` (cond_channels, cond_dim, context_dim; required then)."""
    if data.dataset not in BUILDERS:
        raise DataError(f"unknown dataset '{data.dataset}'; valid: {', '.join(DATASETS)}")
    if problem := split_problem(data):
        raise DataError(problem)
    if data.dataset == "folder":
        return _folder(data, model)
    return BUILDERS[data.dataset](data)


def superres_condition(images: Tensor, factor: int) -> Tensor:
    """The image condition of super-resolution (SR3, Saharia et al. 2022): images (N, C, H, W), H and W
    divisible by `factor`, area-downsampled (each factor x factor block's mean) to (N, C, H/f, W/f), then
    upsampled back to (N, C, H, W) by repeating each pixel (nearest). Nearest rather than bicubic: the
    condition is the low-resolution image itself, with no interpolation's choices in it, and area-downsampling
    it gives that image back exactly."""
    return upsample_low_res(F.avg_pool2d(images, factor), factor)  # (N, C, H/f, W/f) -> (N, C, H, W)


def upsample_low_res(low: Tensor, factor: int) -> Tensor:
    """A low-resolution image (N, C, h, w) as super-resolution's image condition (`superres_condition`): each
    pixel repeated factor x factor times (nearest), (N, C, h * factor, w * factor). sample.py's --cond-image
    brings a given low-resolution image to the network this way, as training did."""
    return F.interpolate(low, scale_factor=factor, mode="nearest")


def inpaint_condition(images: Tensor, masks: Tensor) -> Tensor:
    """The image condition of trained inpainting (Palette, Saharia et al. 2022; LaMa's input, Suvorov et al.
    2022): images (N, C, H, W) in [-1, 1] with their holes set to 0, then the mask, (N, C + 1, H, W). masks
    (N, 1, H, W): 1 where a pixel is known (kept), 0 in the hole to fill in, as sample.py's --mask (white =
    keep). The one builder of the condition, for training (`batch_conditions`) and for sampling
    (`ddpm.inference.read_cond_images`): the hole's pixels never reach the network."""
    if masks.shape[1] != 1 or masks.shape[2:] != images.shape[2:] or masks.shape[0] != images.shape[0]:
        raise ValueError(
            f"masks must be (N, 1, H, W) for images {tuple(images.shape)}, got {tuple(masks.shape)}"
        )
    masks = masks.to(images.dtype)
    return torch.cat([images * masks, masks], dim=1)


def inpaint_masks(
    n: int, size: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """n random inpainting masks (n, 1, size, size) float on `device`: 1 known, 0 hole. Each is, with
    probability 1/2, a box (sides uniform in BOX_SIDES x size, anywhere in the image: the large contiguous
    hole of object removal, Palette's box masks) or a brush stroke (BRUSH_SEGMENTS straight segments from a
    uniform start, each of uniform direction and of length uniform in BRUSH_LENGTHS x size, of width uniform
    in BRUSH_WIDTHS x size, at least BRUSH_MIN_WIDTH pixels: the thin irregular holes of scratches and
    removed wires, LaMa's and DeepFill's free-form masks). Both are measured in fractions of the side, so
    they mean the same at 16x16 as at 256x256; at 16x16 a box hides 4 to 12 pixels a side (from part of a
    stroke to most of a digit) and a stroke is 1.6 to 4 pixels wide. A box always leaves known pixels, a
    stroke always hides one.

    The random numbers come from `generator` (None: the global CPU RNG, which training checkpoints restore),
    always on the CPU and always the same count for a given n (8 + 2 x BRUSH_SEGMENTS per mask, whatever each
    mask turns out to be), so that the masks are the same on every device and a resumed run draws what an
    uninterrupted one did; the pixels are then computed on `device`."""

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    is_box = uniform(n) < 0.5
    sides = uniform(n, 2, low=BOX_SIDES[0] * size, high=BOX_SIDES[1] * size).round().clamp(1, size)
    corner = (uniform(n, 2) * (size - sides + 1)).floor()  # (top, left): the box lies inside the image
    start = uniform(n, 2, high=size)  # (y, x) in pixels, pixel i spanning [i, i + 1)
    angle = uniform(n, BRUSH_SEGMENTS, high=2 * math.pi)
    length = uniform(n, BRUSH_SEGMENTS, low=BRUSH_LENGTHS[0] * size, high=BRUSH_LENGTHS[1] * size)
    width = uniform(n, low=BRUSH_WIDTHS[0] * size, high=BRUSH_WIDTHS[1] * size).clamp(min=BRUSH_MIN_WIDTH)
    steps = torch.stack([angle.sin(), angle.cos()], dim=-1) * length[..., None]  # (n, K, 2)
    vertices = torch.cat([start[:, None], start[:, None] + steps.cumsum(1)], dim=1).to(device)  # (n, K+1, 2)

    centres = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    pixels = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), dim=-1).reshape(1, 1, -1, 2)
    a, b = vertices[:, :-1, None], vertices[:, 1:, None]  # (n, K, 1, 2): each segment's ends
    along = ((pixels - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1).clamp(min=1e-12)
    nearest = a + along.clamp(0, 1)[..., None] * (b - a)  # (n, K, P, 2): each pixel's nearest point
    distance = (pixels - nearest).norm(dim=-1).amin(1)  # (n, P): to the stroke
    in_stroke = distance <= width.to(device)[:, None] / 2

    rows = centres.view(1, -1, 1)
    top, left = (c.to(device).view(-1, 1, 1) for c in corner.unbind(1))
    height, breadth = (s.to(device).view(-1, 1, 1) for s in sides.unbind(1))
    in_box = (rows >= top) & (rows < top + height) & (rows.mT >= left) & (rows.mT < left + breadth)
    hole = torch.where(is_box.to(device).view(-1, 1, 1), in_box, in_stroke.view(n, size, size))
    return (~hole).float().unsqueeze(1)


def batch_conditions(
    data: DataConfig,
    images: Tensor,
    labels: Tensor | None,
    *,
    generator: torch.Generator | None = None,
    files: Conditions | None = None,
) -> Conditions:
    """The conditions of a batch of images (N, C, H, W) in [-1, 1]: its labels (N,) (None: the model takes
    none), those read from files beside the images (`files`, the batch's third part: `collate_batch`), and
    what data.task derives from the images: as "image", "superres" `superres_condition`, "inpaint"
    `inpaint_condition` with fresh `inpaint_masks` drawn from `generator` (None: the global RNG); as
    "vector" (N, len(ATTRIBUTES)), "attributes" the images' `measure_attributes` standardised with
    data.attribute_mean and attribute_std (which must be set: `with_attribute_statistics`)."""
    values = {} if labels is None else {"label": labels}
    values.update(files.values if files is not None else {})
    if data.task == "attributes":
        if data.attribute_mean is None or data.attribute_std is None:
            raise ValueError(
                "data.task=attributes needs data.attribute_mean and attribute_std, the units of the vector: "
                "measure them on the training set (ddpm.data.with_attribute_statistics) or set them"
            )
        measured = measure_attributes(images)
        values["vector"] = standardise_attributes(measured, data.attribute_mean, data.attribute_std)
    elif data.task == "superres":
        values["image"] = superres_condition(images, data.superres_factor)
    elif data.task == "inpaint":
        masks = inpaint_masks(len(images), images.shape[-1], generator=generator, device=images.device)
        values["image"] = inpaint_condition(images, masks)
    return Conditions(values)


def item_conditions(
    data: DataConfig, dataset: Dataset, indices: Sequence[int], *, labels: bool, seed: int = 0
) -> tuple[Tensor, Tensor, Conditions]:
    """The items `indices` of `dataset` (built from `data`) with the conditions a network trained on them
    takes, for scoring or sampling it on the data: images (N, C, H, W) in [-1, 1], labels (N,) (-1: none),
    and `batch_conditions` of the batch (`collate_batch`: its condition files), with its labels when `labels`
    (the model takes them). data.task inpaint's mask of item i comes from a generator seeded by (seed, i), so
    an item's conditions depend neither on the items beside it nor on the training RNG."""
    images, item_labels, *files = collate_batch([dataset[i] for i in indices])
    task = dataclasses.replace(data, task="none") if data.task == "inpaint" else data
    cond = batch_conditions(task, images, item_labels if labels else None, files=files[0] if files else None)
    if data.task == "inpaint":
        masks = [
            inpaint_masks(1, images.shape[-1], generator=_item_generator(seed, i)) for i in indices
        ]  # each (1, 1, S, S)
        cond = Conditions({**cond.values, "image": inpaint_condition(images, torch.cat(masks))})
    return images, item_labels, cond


def _item_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator of its own for item `index`, seeded by a SeedSequence hash of (seed, index)."""
    entropy = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(entropy))


def with_attribute_statistics(data: DataConfig, dataset: Dataset, *, batch_size: int = 256) -> DataConfig:
    """`data` with data.attribute_mean and attribute_std measured on `dataset` (its images' mean and std of
    each attribute, `ddpm.attributes.attribute_statistics`) where data.task is attributes and they are
    unset; else `data` itself. The random transforms (data.hflip) draw from a fork of the global RNG, which
    is left as it was: the run's weights and noise do not depend on the measurement."""
    if data.task != "attributes" or data.attribute_mean is not None:
        return data
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_batch)
    with torch.random.fork_rng(devices=[]):
        measured = torch.cat([measure_attributes(images) for images, *_ in loader])  # (N, len(ATTRIBUTES))
    try:
        mean, std = attribute_statistics(measured)
    except ValueError as error:
        raise DataError(
            f"data.task=attributes: {error}; it cannot be standardised on this data set"
        ) from None
    return dataclasses.replace(data, attribute_mean=mean, attribute_std=std)


def digits_split(labels: Tensor, split: str) -> Tensor:
    """The indices (ascending) of the digits of `split`, from their labels (N,) in scikit-learn's order:
    "test" holds every HELD_OUT_EVERY-th image of each digit (its 10th, 20th, ...: 176 of the 1,797, each
    digit in proportion), "train" the others, "all" every one. Chosen by position rather than by a random
    draw, so that no change of a random stream can move an image from one side to the other."""
    rank = torch.empty_like(labels)  # each image's position among the images of its digit
    for digit in labels.unique():
        where = (labels == digit).nonzero().squeeze(1)
        rank[where] = torch.arange(len(where))
    held_out = rank % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    keep = {"train": ~held_out, "test": held_out, "all": torch.ones_like(held_out)}[split]
    return keep.nonzero().squeeze(1)


def split_digits(split: str, image_size: int) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits of `split` (`digits_split`), resized once to image_size (bilinear, antialiased):
    (M, 1, S, S) float in [0, 1], and their labels (M,) long."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn takes a second to import

    digits = load_digits()
    labels = torch.from_numpy(digits.target).long()
    keep = digits_split(labels, split)
    images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)[keep]  # (M, 1, 8, 8) in [0, 1]
    size = [image_size, image_size]
    images = v2.functional.resize(images, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    return images.clamp(0.0, 1.0), labels[keep]


def digit_masks(split: str, *, image_size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The digit_masks pairs of `split` ("train" or "test": made from the digits of that split, COPIES[split]
    pairs per digit, `ddpm.digit_masks.clutter_pairs`): images (N, 1, S, S) and masks (N, 1, S, S), both in
    [-1, 1] (masks exactly -1 or 1), and the targets' digit labels (N,) long. S = image_size; the same pairs
    for the same seed."""
    if split not in COPIES:
        raise DataError(f"digit_masks has the splits {', '.join(COPIES)}, got '{split}'")
    digits, labels = split_digits(split, image_size)
    generator = torch.Generator().manual_seed(seed * 2 + SPLIT_STREAM[split])
    images, masks, index = clutter_pairs(digits, COPIES[split], generator)
    return images, masks, labels[index]


def digit_strips(split: str, *, image_size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The digit_strips of `split` ("train" or "test": strips.STRIPS[split] strips of that split's digits,
    `ddpm.digit_strips`): images (N, 1, S, S) in [-1, 1], S = image_size (even), and their digit sequences
    (N, MAX_DIGITS) long, EMPTY (-1) after each strip's digits. The same strips for the same seed."""
    if split not in strips.STRIPS:
        raise DataError(f"digit_strips has the splits {', '.join(strips.STRIPS)}, got '{split}'")
    if image_size % strips.GRID:
        raise DataError(f"digit_strips needs an even image_size (a 2 x 2 grid of slots), got {image_size}")
    digits, labels = split_digits(split, image_size // strips.GRID)
    generator = torch.Generator().manual_seed(seed * 2 + strips.SPLIT_STREAM[split])
    sequences = strips.random_sequences(strips.STRIPS[split], generator)
    images, _ = strips.draw_strips(digits, labels, sequences, generator)
    return images, sequences


def num_classes_of(dataset: Dataset) -> int | None:
    """Number of classes of a dataset built here (None when it yields no labels), looking through Subsets."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return getattr(dataset, "num_classes", None)


def loader_workers(num_workers: int | str) -> int:
    """data.num_workers as a DataLoader takes it: an integer as it is; "auto" as min(AUTO_WORKERS, cores - 1),
    cores being `available_cores()`: 0 on one core, 1 on two. The main process keeps a core of its own, and a
    loader never starts more workers than the cores its process may run on (torch's DataLoader warns when it
    does)."""
    if num_workers != "auto":
        return num_workers
    return min(AUTO_WORKERS, available_cores() - 1)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, as torch's DataLoader counts them), shared
    among the processes launched on this machine (LOCAL_WORLD_SIZE, set by the launchers); at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


class ConditionFiles:
    """The condition files of every image of a folder data set, found and checked at construction.

    images: the image files (under `root`, or root/targets/ when `paired`); names: data.conditions, kind ->
    the name part of its files; sizes: kind -> the network's size of it (cond_channels, cond_dim,
    context_dim). `files[i]` maps each kind to image i's file. Raises ConditionFileError, one line naming the
    first bad file, the shape expected and how many more are bad, for missing or mis-shaped files.
    """

    def __init__(
        self,
        images: Sequence[Path],
        *,
        root: Path,
        names: Mapping[str, str],
        sizes: Mapping[str, int | None],
        paired: bool,
    ):
        self.kinds = tuple(kind for kind in FILE_KINDS if kind in names or (kind == "image" and paired))
        self.files: list[dict[str, Path]] = []
        problems = []
        inputs = image_files(root / INPUTS) if paired else []
        inputs = {f.relative_to(root / INPUTS).with_suffix(""): f for f in inputs}  # by path without suffix
        for image in images:
            found = {}
            for kind in self.kinds:
                if kind == "image" and paired:
                    key = image.relative_to(root / TARGETS).with_suffix("")
                    file, expected = inputs.get(key), f"{root / INPUTS / key}{{{','.join(IMAGE_EXTENSIONS)}}}"
                else:
                    suffixes = IMAGE_EXTENSIONS if kind == "image" else ARRAY_SUFFIXES
                    file, expected = find_beside(image, names[kind], suffixes)
                if file is None:
                    problems.append(f"{image}: no {kind} condition file; expected {expected}")
                    continue
                try:
                    size = sizes[SIZE_ARGUMENTS[kind]]
                    problem = None if kind == "image" else shape_problem(file, kind, size)
                except ConditionFileError as error:  # an unreadable file
                    problem = str(error)
                problems += [problem] if problem else []
                found[kind] = file
            self.files.append(found)
        if problems:
            more = f" ({len(problems) - 1} more are missing or mis-shaped)" if len(problems) > 1 else ""
            raise DataError(problems[0] + more)

    def read(self, index: int, image_reader: Callable[[Path], Tensor]) -> dict[str, Tensor]:
        """Image `index`'s conditions, kind -> tensor without the batch dimension; image files through
        `image_reader(path) -> (C, S, S) tensor` (as the data set reads its images)."""
        return {
            kind: image_reader(file) if kind == "image" else read_array(file)
            for kind, file in self.files[index].items()
        }


class TensorImageDataset(Dataset):
    """A data set held as one tensor: `images` (N, C, S, S) float in [-1, 1], `labels` (N,) long (-1: none).

    Indexing it costs a tensor slice (and a flip), so the DataLoader needs no worker processes for it.
    """

    def __init__(self, images: Tensor, labels: Tensor, *, num_classes: int | None, hflip: bool = False):
        self.images = images
        self.labels = labels
        self.num_classes = num_classes
        self.flip = v2.RandomHorizontalFlip() if hflip else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.flip is not None:
            image = self.flip(image)
        return image, self.labels[index]


class DigitMasksDataset(Dataset):
    """`digit_masks` as training data: item i is (mask (1, S, S), label (), {"image": image (1, S, S)}): the
    mask is what the diffusion model generates (x) and the image its condition (`batch_conditions`). Labels
    are the target digits, or -1 when `labels` is off."""

    def __init__(self, split: str, *, image_size: int, labels: bool, seed: int = 0):
        self.images, self.masks, digits = digit_masks(split, image_size=image_size, seed=seed)
        self.labels = digits if labels else torch.full_like(digits, -1)
        self.num_classes = 10 if labels else None

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        return self.masks[index], self.labels[index], {"image": self.images[index]}


class DigitStripsDataset(Dataset):
    """`digit_strips` as training data: item i is (strip (1, S, S), label -1 (), {"context": its tokens (L,
    CONTEXT_DIM)}), L its number of digits (`ddpm.digit_strips.sequence_tokens`; `collate_batch` pads a
    batch's sequences and gives their mask). A strip holds several digits, so it has no class label."""

    def __init__(self, split: str, *, image_size: int, seed: int = 0):
        self.images, self.sequences = digit_strips(split, image_size=image_size, seed=seed)
        self.tokens, self.mask = strips.sequence_tokens(self.sequences)
        self.num_classes = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        tokens = self.tokens[index][self.mask[index]]
        return self.images[index], torch.tensor(-1), {"context": tokens}


class ImageFolderDataset(Dataset):
    """Every image under `root` (recursive, hidden files and folders skipped, sorted paths), and with
    `conditions` or `paired` each one's conditions from files (`ConditionFiles`; `ddpm.condition_files`
    says how they are named): items are then (image, label, kind -> condition tensor), read with the image.

    With `labels`, images must sit in first-level sub-folders, one per class (class_to_idx: the sorted names
    of the sub-folders that hold images); without, every image has label -1. Images are converted to L
    (channels=1) or RGB (3), transparent pixels composited over white; the shorter side is resized to
    `image_size` (bilinear, antialiased) and the centre cropped square.

    Corrupt or truncated files are found lazily, when loaded: each is skipped with a warning naming it and
    replaced by the next readable file, because stopping a multi-hour run for one bad file loses more than
    a substitute sample costs (and checking every file up front would delay the start of large data sets).
    If no file can be read, DataError.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int,
        channels: int,
        labels: bool,
        hflip: bool = False,
        conditions: Mapping[str, str] | None = None,
        paired: bool = False,
        sizes: Mapping[str, int | None] | None = None,
    ):
        # conditions: data.conditions (kind -> name part of its files); paired: data.paired (root/targets/
        # the images, root/inputs/ their image conditions); sizes: the network's cond_channels, cond_dim and
        # context_dim, the conditions' expected sizes
        top = Path(root)
        self.root = top / TARGETS if paired else top
        if paired and not (self.root.is_dir() and (top / INPUTS).is_dir()):
            raise DataError(
                f"data.paired=true but data.root '{top}' lacks {TARGETS}/ or {INPUTS}/: put the images in "
                f"{top / TARGETS} and each one's image condition (same relative path and stem) in "
                f"{top / INPUTS}"
            )
        if not self.root.is_dir():
            raise DataError(
                f"data.root '{self.root}' is not a folder; expected a folder of images "
                f"({', '.join(IMAGE_EXTENSIONS)}), with one sub-folder per class when data.labels is true"
            )
        names = dict(conditions or {})
        files = [f for f in image_files(self.root) if not is_condition_file(f, names)]
        if not files:
            raise DataError(
                f"no images found under data.root '{self.root}'; expected files ending in "
                f"{', '.join(IMAGE_EXTENSIONS)} (searched recursively)"
            )
        if labels:
            loose = [f for f in files if f.parent == self.root]
            if loose:
                raise DataError(
                    f"{len(loose)} images sit directly in data.root '{self.root}' (e.g. {loose[0].name}), "
                    "but data.labels=true reads each label from the first-level sub-folder name: move them "
                    "into a sub-folder per class, or set data.labels=false (and model.num_classes=null: an "
                    "unconditional model)"
                )
            class_names = [f.relative_to(self.root).parts[0] for f in files]
            self.classes = sorted(set(class_names))
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
            targets = [self.class_to_idx[name] for name in class_names]
            self.num_classes: int | None = len(self.classes)
        else:
            targets = [-1] * len(files)
            self.num_classes = None
        self.files = files
        self.targets = torch.tensor(targets, dtype=torch.long)
        self.transform = _image_transform(image_size, channels, hflip)
        self.conditions = None
        if names or paired:
            sizes = dict(sizes or {})
            self.conditions = ConditionFiles(files, root=top, names=names, sizes=sizes, paired=paired)
            cond_channels = sizes.get("cond_channels") or channels
            self.cond_transform = _image_transform(image_size, cond_channels, hflip=False)
        self._unreadable: set[int] = set()  # per process: each DataLoader worker learns on its own

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict[str, Tensor]]:
        for i in (j % len(self.files) for j in range(index, index + len(self.files))):
            if i in self._unreadable:
                continue
            try:
                image = self.transform(_load_image(self.files[i]))
                if self.conditions is not None:
                    read = lambda file: self.cond_transform(_load_image(file))  # noqa: E731
                    return image, self.targets[i], self.conditions.read(i, read)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
                self._unreadable.add(i)
                files = " or its condition files" if self.conditions is not None else ""
                _warn(f"skipping unreadable image {self.files[i]}{files}: {error}")
                continue
            return image, self.targets[i]
        raise DataError(
            f"none of the {len(self.files)} images under data.root '{self.root}' can be read (see the "
            "warnings above); replace them with image files (Git LFS pointers, for one, are not images)"
        )


class TorchvisionDataset(Dataset):
    """A torchvision data set with our transform, and labels as 0-d long tensors (-1 when `labels` is off)."""

    def __init__(self, base: Dataset, *, labels: bool, num_classes: int | None):
        self.base = base
        self.labels = labels
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, target = self.base[index]
        return image, torch.tensor(target if self.labels else -1, dtype=torch.long)


def _digits(data: DataConfig) -> TensorImageDataset:
    images, labels = split_digits(data.split, data.image_size)
    images = images.mul(2.0).sub(1.0).expand(-1, data.channels, -1, -1).contiguous()
    labels = labels if data.labels else torch.full((len(images),), -1)
    return TensorImageDataset(images, labels, num_classes=10 if data.labels else None, hflip=data.hflip)


def _digit_masks(data: DataConfig) -> DigitMasksDataset:
    return DigitMasksDataset(data.split, image_size=data.image_size, labels=data.labels)


def _digit_strips(data: DataConfig) -> DigitStripsDataset:
    return DigitStripsDataset(data.split, image_size=data.image_size)


def _folder(data: DataConfig, model: Mapping[str, Any] | None = None) -> ImageFolderDataset:
    if (data.conditions or data.paired) and model is None:
        raise DataError("condition files are checked against the network: pass build_dataset(data, model)")
    return ImageFolderDataset(
        _root(data),
        image_size=data.image_size,
        channels=data.channels,
        labels=data.labels,
        hflip=data.hflip,
        conditions=data.conditions,
        paired=data.paired,
        sizes={name: (model or {}).get(name) for name in SIZE_ARGUMENTS.values()},
    )


def _cifar10(data: DataConfig) -> TorchvisionDataset:
    from torchvision.datasets import CIFAR10

    expected = "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)"
    return _torchvision(CIFAR10, data, expected, labels=data.labels, train=data.split == "train")


def _mnist(data: DataConfig) -> TorchvisionDataset:
    from torchvision.datasets import MNIST

    expected = "MNIST/raw/ (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, ...)"
    return _torchvision(MNIST, data, expected, labels=data.labels, train=data.split == "train")


def _fashion_mnist(data: DataConfig) -> TorchvisionDataset:
    from torchvision.datasets import FashionMNIST

    expected = "FashionMNIST/raw/ (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-..., ...)"
    return _torchvision(FashionMNIST, data, expected, labels=data.labels, train=data.split == "train")


def _celeba(data: DataConfig) -> TorchvisionDataset:
    """The aligned 178x218 faces, centre-cropped to 178x178 then resized (the usual recipe). CelebA has 40
    binary attributes rather than classes, so labels are always -1."""
    from torchvision.datasets import CelebA

    expected = "celeba/img_align_celeba/ and celeba/list_eval_partition.txt, list_attr_celeba.txt, ..."
    return _torchvision(CelebA, data, expected, labels=False, crop=178, split=data.split, target_type=[])


def _torchvision(
    cls: type, data: DataConfig, expected: str, *, labels: bool, crop: int | None = None, **split
) -> TorchvisionDataset:
    """Open torchvision's `cls` under data.root with our transform; `split` holds the arguments of `cls` that
    select data.split, `expected` the files it needs (for the error when they are missing)."""
    root = _root(data)
    transform = _image_transform(data.image_size, data.channels, data.hflip, crop=crop)
    try:
        base = cls(str(root), download=data.download, transform=transform, **split)
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
        if data.download:
            raise
        raise DataError(
            f"{cls.__name__} not found (or corrupted) under data.root '{root}': expected {root}/{expected}. "
            "Set data.download=true on a machine with internet access, or put the files there"
        ) from error
    return TorchvisionDataset(base, labels=labels, num_classes=len(base.classes) if labels else None)


def _root(data: DataConfig) -> Path:
    if data.root is None:
        raise DataError(f"data.root is required for data.dataset '{data.dataset}'")
    return Path(data.root).expanduser()


def _image_transform(image_size: int, channels: int, hflip: bool, *, crop: int | None = None) -> Callable:
    """PIL image -> float tensor (channels, image_size, image_size) in [-1, 1]."""
    steps = [partial(convert_image, mode="L" if channels == 1 else "RGB")]
    if crop is not None:
        steps.append(v2.CenterCrop(crop))
    steps += [
        v2.Resize(image_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),  # shorter side
        v2.CenterCrop(image_size),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),  # uint8 -> [0, 1]
        v2.Normalize([0.5] * channels, [0.5] * channels),  # [0, 1] -> [-1, 1]
        v2.ToPureTensor(),
    ]
    return v2.Compose(steps)


def read_images(path: str | Path, *, image_size: int, channels: int) -> tuple[Tensor, list[Path]]:
    """The image file `path`, or every image in the folder `path` (`image_files`: recursive, sorted), as
    training data are read (`convert_image` to L or RGB, the shorter side resized to `image_size`, the centre
    cropped, no flip): (N, channels, image_size, image_size) float32 in [-1, 1], and the files in that order.
    Raises DataError naming the path for a missing path, a folder without images or an unreadable file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; expected an image or a folder of images")
    files = image_files(path) if path.is_dir() else [path]
    if not files:
        raise DataError(f"no images under {path}; expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
    transform = _image_transform(image_size, channels, hflip=False)
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(transform(image))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise DataError(f"cannot read image {file}: {error}") from None
    return torch.stack(images), files


def convert_image(image: Image.Image, mode: str) -> Image.Image:
    """A PIL image of any mode (L, RGB, RGBA, LA, P with or without transparency, ...) in `mode` (L or RGB),
    size kept: how the training data and `ddpm.fid`'s folders of images are read.

    Transparent pixels are composited over white rather than dropped: dropping alpha shows whatever colour
    the transparent pixels happen to store, often black.
    """
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert(mode)


def image_files(root: Path) -> list[Path]:
    """The image files under `root` (names ending in IMAGE_EXTENSIONS, any case; hidden files and folders
    skipped), as a sorted list: the "folder" data set's files and `ddpm.fid`'s folders of images. Symbolic
    links are followed but each real folder is read once (the first name in sorted order), so that a link
    cycle ends and an aliased folder is not counted twice."""
    files, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        subfolders[:] = sorted(s for s in subfolders if not s.startswith("."))  # top-down, in sorted order
        names = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
        files += [Path(folder, n) for n in names]
    return sorted(files)


def _load_image(file: Path) -> Image.Image:
    """The image file decoded now, so that a truncated file fails here and not in a transform."""
    with Image.open(file) as image:
        image.load()
        return image.copy()


def collate_batch(items: Sequence[tuple]) -> tuple:
    """The DataLoader's batch of data set items: (images (N, C, H, W), labels (N,)), and for a data set
    with condition files their `Conditions` (`collate_conditions`: token sequences padded, with a mask)."""
    images = torch.stack([item[0] for item in items])
    labels = torch.stack([torch.as_tensor(item[1]) for item in items])
    if len(items[0]) == 2:
        return images, labels
    return images, labels, collate_conditions([item[2] for item in items])


def _warn(message: str) -> None:
    """Print `warning: message` on a line of its own on stderr, clear of the training progress bar."""
    if get_worker_info() is None:
        tqdm.write(f"warning: {message}", file=sys.stderr)  # clears the bar, prints, draws the bar again
    else:  # a DataLoader worker cannot clear the main process's bar: start a new line instead
        print(f"\nwarning: {message}", file=sys.stderr, flush=True)


# The builder of each name in ddpm.config.DATASETS (the values config accepts for data.dataset).
BUILDERS: dict[str, Callable[[DataConfig], Dataset]] = {
    "digits": _digits,
    "digit_masks": _digit_masks,
    "digit_strips": _digit_strips,
    "folder": _folder,
    "cifar10": _cifar10,
    "mnist": _mnist,
    "fashion_mnist": _fashion_mnist,
    "celeba": _celeba,
}
