"""Datasets: each yields `(image, label)`, image a float tensor (C, S, S) in [-1, 1], label a 0-d long tensor
(-1 when labels are off or the data set has none), and a data set that gives conditions with its images
(ddpm.config.DATASET_CONDITIONS) `(image, label, conditions)`, conditions a dict kind -> tensor.

- digits: the 1,797 8x8 handwritten digits that scikit-learn ships (values 0..16), resized once, one tensor;
  split "train" is 1,621 of them, "test" the other 176 (every tenth of each digit: `digits_split`), "all"
  both.
- digit_masks: the digits over clutter and noise with their masks (ddpm.digit_masks), for segmentation: each
  item is (mask, label, {"image": the cluttered digit}), the mask the image to generate, the cluttered digit
  its image condition; splits "train" and "test" (from the digits' own).
- folder: any folder of images, searched recursively; labels from the first-level sub-folder names. It has
  only the split "train" (all of it).
- cifar10, mnist, fashion_mnist, celeba: torchvision's classes, read from data.root (downloaded there when
  data.download is true); split "train" or "test" (torchvision's train=False, CelebA's "test").

A built-in task (data.task) derives conditions from each batch of images, so that any data set serves it
(`batch_conditions`): "superres" gives the model the image area-downsampled by data.superres_factor
(`superres_condition`).
"""

import os
import sys
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset, get_worker_info
from torchvision.transforms import v2
from tqdm.auto import tqdm

from ddpm.conditions import Conditions
from ddpm.config import DATASETS, DataConfig, split_problem
from ddpm.digit_masks import COPIES, SPLIT_STREAM, clutter_pairs

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
# The most DataLoader workers that data.num_workers "auto" starts per process (the number the shipped configs
# asked for before "auto").
AUTO_WORKERS = 4
# The digits' held-out split takes each digit's every HELD_OUT_EVERY-th image (`digits_split`).
HELD_OUT_EVERY = 10


class DataError(ValueError):
    """The data named by the config cannot be used (missing, empty, unreadable); the message says the fix."""


def build_dataset(data: DataConfig) -> Dataset:
    """The images described by `data`: data.dataset (one of ddpm.config.DATASETS), its split data.split
    (train, test or all, as ddpm.config.SPLITS allows for that data set)."""
    if data.dataset not in BUILDERS:
        raise DataError(f"unknown dataset '{data.dataset}'; valid: {', '.join(DATASETS)}")
    if problem := split_problem(data):
        raise DataError(problem)
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


def batch_conditions(
    data: DataConfig, images: Tensor, labels: Tensor | None, given: Mapping[str, Tensor] | None = None
) -> Conditions:
    """The conditions of a batch of images (N, C, H, W) in [-1, 1]: its labels (N,) (None: the model takes
    none), the conditions the data set gave with the images (`given`, kind -> (N, ...): digit_masks' "image")
    and what data.task derives from the images ("superres": `superres_condition` as "image")."""
    values = {} if labels is None else {"label": labels}
    values.update(given or {})
    if data.task == "superres":
        values["image"] = superres_condition(images, data.superres_factor)
    return Conditions(values)


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


class ImageFolderDataset(Dataset):
    """Every image under `root` (recursive, hidden files and folders skipped, sorted paths).

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
        self, root: str | Path, *, image_size: int, channels: int, labels: bool, hflip: bool = False
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(
                f"data.root '{self.root}' is not a folder; expected a folder of images "
                f"({', '.join(IMAGE_EXTENSIONS)}), with one sub-folder per class when data.labels is true"
            )
        files = image_files(self.root)
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
        self._unreadable: set[int] = set()  # per process: each DataLoader worker learns on its own

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        for i in (j % len(self.files) for j in range(index, index + len(self.files))):
            if i in self._unreadable:
                continue
            try:
                with Image.open(self.files[i]) as image:
                    image.load()  # decode now, so that a truncated file fails here and not in a transform
                    image = image.copy()
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
                self._unreadable.add(i)
                _warn(f"skipping unreadable image {self.files[i]}: {error}")
                continue
            return self.transform(image), self.targets[i]
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


def _folder(data: DataConfig) -> ImageFolderDataset:
    return ImageFolderDataset(
        _root(data), image_size=data.image_size, channels=data.channels, labels=data.labels, hflip=data.hflip
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
    "folder": _folder,
    "cifar10": _cifar10,
    "mnist": _mnist,
    "fashion_mnist": _fashion_mnist,
    "celeba": _celeba,
}
