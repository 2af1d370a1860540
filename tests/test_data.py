import hashlib
import os
import pickle
import struct
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import Subset
from tqdm import tqdm

from ddpm.config import DataConfig
from ddpm.data import DataError, build_dataset, digits_split, num_classes_of


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 255], the scale of the files written below."""
    return (x + 1) / 2 * 255


@pytest.fixture(scope="module")
def digits():
    return build_dataset(DataConfig())


def test_digits(digits):
    assert len(digits) == 1621 and num_classes_of(digits) == 10  # the training split
    image, label = digits[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert label.dtype == torch.long and label.ndim == 0
    assert digits.images.min() == -1 and digits.images.max() == 1  # both ends used, nothing beyond
    assert set(digits.labels.tolist()) == set(range(10))


def test_digits_at_their_own_size_are_the_original_pixels():
    dataset = build_dataset(DataConfig(image_size=8, split="all"))
    reference = torch.from_numpy(load_digits().images).float()
    torch.testing.assert_close((dataset.images[:, 0] + 1) / 2 * 16, reference)
    assert dataset.labels.tolist() == load_digits().target.tolist()


def test_the_held_out_digits_are_a_fixed_tenth_of_each_digit_that_training_never_sees():
    """split test: every tenth image of each digit (176), pinned by its indices; train: the other 1,621 (the
    default); all: the 1,797 in scikit-learn's order. Each split's images and labels are those indices'."""
    splits = {
        split: build_dataset(DataConfig(image_size=8, split=split)) for split in ("train", "test", "all")
    }
    assert build_dataset(DataConfig(image_size=8)).images.shape == splits["train"].images.shape
    target = torch.from_numpy(load_digits().target).long()
    test, train = digits_split(target, "test"), digits_split(target, "train")
    assert (len(test), len(train)) == (176, 1621) and len(splits["all"]) == 1797
    assert not set(test.tolist()) & set(train.tolist())
    assert sorted(test.tolist() + train.tolist()) == list(range(1797))
    assert test[:6].tolist() == [78, 84, 88, 89, 90, 94] and test[-1].item() == 1795
    assert hashlib.sha256(str(test.tolist()).encode()).hexdigest()[:16] == "4186eca7cb5f1b21"
    counts = torch.bincount(target[test], minlength=10)
    assert counts.tolist() == (torch.bincount(target, minlength=10) // 10).tolist()  # each digit's tenth
    for split, indices in [("train", train), ("test", test)]:
        torch.testing.assert_close(splits[split].images, splits["all"].images[indices])
        assert torch.equal(splits[split].labels, target[indices])
    unlabelled = build_dataset(DataConfig(image_size=8, split="test", labels=False))
    torch.testing.assert_close(unlabelled.images, splits["test"].images)  # split by digit, labels or not


def test_a_split_the_data_set_lacks_is_refused():
    with pytest.raises(
        DataError, match=r"^data\.split=test but data\.dataset 'folder' has no such split; valid"
    ):
        build_dataset(DataConfig(dataset="folder", root="anywhere", split="test"))
    with pytest.raises(
        DataError, match=r"data\.split=all but data\.dataset 'cifar10' .* valid there: train, test"
    ):
        build_dataset(DataConfig(dataset="cifar10", root="anywhere", split="all"))


def test_digits_other_size_channels_and_no_labels():
    dataset = build_dataset(DataConfig(image_size=32, channels=3, labels=False))
    image, label = dataset[5]
    assert image.shape == (3, 32, 32) and label.item() == -1
    assert torch.equal(image[0], image[2])
    assert num_classes_of(dataset) is None and num_classes_of(Subset(dataset, [0])) is None
    assert dataset.images.min() >= -1 and dataset.images.max() <= 1


def write_folder(root):
    """Mixed modes, sizes and extensions, nested one level deeper; plus files that must be ignored."""
    (root / "cat" / "sub").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / ".cache").mkdir()
    Image.new("RGB", (12, 20), (255, 0, 0)).save(root / "cat" / "red.png")
    Image.new("L", (10, 10), 0).save(root / "cat" / "sub" / "black.jpg")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(root / "dog" / "clear.PNG")
    palette = Image.new("P", (9, 9), 0)
    palette.putpalette([0, 0, 255] + [0] * 765)
    palette.save(root / "dog" / "blue.gif")
    palette.putpixel((4, 4), 1)
    palette.save(root / "dog" / "hole.png", transparency=1)  # palette index 1 transparent
    Image.new("RGB", (8, 8), (0, 255, 0)).save(root / "dog" / "green.webp", lossless=True)
    Image.new("RGB", (8, 8)).save(root / ".cache" / "hidden.png")
    (root / "dog" / "notes.txt").write_text("not an image")


def test_folder_labels_modes_and_recursion(tmp_path):
    write_folder(tmp_path)
    dataset = build_dataset(DataConfig(dataset="folder", root=str(tmp_path), image_size=8, channels=3))
    names = ["red.png", "black.jpg", "blue.gif", "clear.PNG", "green.webp", "hole.png"]
    assert [f.name for f in dataset.files] == names
    assert dataset.class_to_idx == {"cat": 0, "dog": 1} and num_classes_of(dataset) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's about palette transparency
        items = [dataset[i] for i in range(len(dataset))]
    assert [label.item() for _, label in items] == [0, 0, 1, 1, 1, 1]
    assert all(image.shape == (3, 8, 8) and image.dtype == torch.float32 for image, _ in items)
    expected_rgb = [(255, 0, 0), (0, 0, 0), (0, 0, 255), (255, 255, 255), (0, 255, 0)]  # transparent -> white
    for (image, _), rgb in zip(items, expected_rgb, strict=False):
        torch.testing.assert_close(to_unit(image), torch.tensor(rgb).float()[:, None, None].expand(3, 8, 8))
    hole = to_unit(items[-1][0])  # 9x9 resized to 8x8: the white pixel blurs into its blue neighbours
    assert hole[0].max() > 0 and hole[2].min() > 200


def test_folder_grayscale_and_no_labels(tmp_path):
    write_folder(tmp_path)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "loose.png")  # allowed without labels
    dataset = build_dataset(DataConfig(dataset="folder", root=str(tmp_path), image_size=4, labels=False))
    assert len(dataset) == 7 and num_classes_of(dataset) is None
    image, label = dataset[0]
    assert image.shape == (1, 4, 4) and label.item() == -1
    assert image.min() >= -1 and image.max() <= 1
    red_as_l = round(0.299 * 255)  # ITU-R 601-2 luma, what PIL's convert("L") computes
    loose = dataset[dataset.files.index(tmp_path / "loose.png")][0]
    torch.testing.assert_close(to_unit(loose), torch.full((1, 4, 4), float(red_as_l)), atol=0.5, rtol=0)


def test_folder_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    (tmp_path / "a").mkdir()
    wide = np.zeros((8, 16), np.uint8)
    wide[:, 8:] = 255  # left half black, right half white
    Image.fromarray(wide).save(tmp_path / "a" / "wide.png")
    dataset = build_dataset(DataConfig(dataset="folder", root=str(tmp_path), image_size=8))
    expected = torch.tensor([0.0] * 4 + [255.0] * 4).expand(1, 8, 8)  # the middle 8 of 16 columns
    torch.testing.assert_close(to_unit(dataset[0][0]), expected)


def test_folder_hflip(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))).save(tmp_path / "a" / "ramp.png")
    data = DataConfig(dataset="folder", root=str(tmp_path), image_size=8)
    original = build_dataset(data)[0][0]
    flipping = build_dataset(DataConfig(**{**vars(data), "hflip": True}))
    torch.manual_seed(0)
    draws = [flipping[0][0] for _ in range(20)]
    assert any(torch.equal(d, original) for d in draws)
    assert any(torch.equal(d, original.flip(-1)) for d in draws)
    assert all(torch.equal(d, original) or torch.equal(d, original.flip(-1)) for d in draws)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match=r"data\.root '\S*missing' is not a folder; expected a folder"):
        build_dataset(DataConfig(dataset="folder", root=str(tmp_path / "missing")))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("")
    with pytest.raises(DataError, match=r"no images found under data\.root '\S*empty'; expected .*\.png"):
        build_dataset(DataConfig(dataset="folder", root=str(tmp_path / "empty")))
    write_folder(tmp_path / "loose")
    Image.new("L", (4, 4)).save(tmp_path / "loose" / "x.png")
    with pytest.raises(DataError, match=r"1 images sit directly in data\.root .*x\.png.*data\.labels=false"):
        build_dataset(DataConfig(dataset="folder", root=str(tmp_path / "loose")))


def test_folder_skips_corrupt_and_truncated_files_with_a_warning(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1_garbage.png").write_bytes(b"this is not a png" * 10)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "a" / "2_truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("L", (8, 8), 255).save(tmp_path / "a" / "3_white.png")
    (tmp_path / "full.png").unlink()
    dataset = build_dataset(DataConfig(dataset="folder", root=str(tmp_path), image_size=8))
    assert len(dataset) == 3
    bar = tqdm(total=10, file=sys.stderr, desc="train")  # as the Trainer draws it: no newline after it
    bar.update(3)
    capsys.readouterr()
    image, label = dataset[0]  # both bad files are tried, then replaced by the next readable one
    bar.close()
    # Each warning on a line of its own (the bar cleared before it), naming the file, not a torch module.
    lines = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n")]
    assert [line.split(": ")[:2] for line in lines if line.startswith("warning")] == [
        ["warning", f"skipping unreadable image {tmp_path / 'a' / '1_garbage.png'}"],
        ["warning", f"skipping unreadable image {tmp_path / 'a' / '2_truncated.png'}"],
    ]
    assert torch.equal(image, torch.ones(1, 8, 8)) and label.item() == 0
    (tmp_path / "a" / "3_white.png").write_bytes(b"broken too")
    with pytest.raises(DataError, match=r"none of the 3 images under data\.root '\S+' can be read"):
        dataset[2]
    assert f"warning: skipping unreadable image {tmp_path / 'a' / '3_white.png'}: " in capsys.readouterr().err


def test_folder_reads_each_real_folder_once_through_symlink_cycles(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("L", (8, 8), 255).save(tmp_path / "a" / "b" / "white.png")
    # a/b/up/b/up/... without end (one cycle, not two: two would make today's walk exponential, not finite)
    (tmp_path / "a" / "b" / "up").symlink_to(tmp_path / "a")
    (tmp_path / "c").symlink_to(tmp_path / "a" / "b")  # a second name for a/b: read once, as a/b
    dataset = build_dataset(DataConfig(dataset="folder", root=str(tmp_path), image_size=8))
    assert dataset.files == [tmp_path / "a" / "b" / "white.png"] and dataset.classes == ["a"]


def write_cifar10(root, n: int = 2) -> list[tuple[np.ndarray, list[int]]]:
    """torchvision's layout: pickled dicts of uint8 rows (n, 3 * 32 * 32) in CHW order, n images per batch.
    Returns (data, labels) of the five training batches."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
        if name != "test_batch":
            train.append((data, labels))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return train


@pytest.fixture
def skip_md5(monkeypatch):
    """torchvision's CIFAR10 checks every file against the md5 of the real CIFAR-10, which a tiny file cannot
    match: here only that check is replaced by "the file exists"; the real class reads the files."""
    import torchvision.datasets.cifar

    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path)
    )


def test_cifar10(tmp_path, skip_md5):
    train = write_cifar10(tmp_path)
    dataset = build_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), image_size=32, channels=3))
    assert len(dataset) == 10 and num_classes_of(dataset) == 10
    image, label = dataset[3]  # second image of data_batch_2
    data, labels = train[1]
    torch.testing.assert_close(to_unit(image), torch.from_numpy(data[1]).float().reshape(3, 32, 32))
    assert label.dtype == torch.long and label.item() == labels[1]
    small = build_dataset(
        DataConfig(dataset="cifar10", root=str(tmp_path), image_size=16, channels=1, labels=False)
    )
    image, label = small[0]
    assert image.shape == (1, 16, 16) and label.item() == -1 and num_classes_of(small) is None


def test_cifar10_test_split_reads_the_test_batch(tmp_path, skip_md5):
    write_cifar10(tmp_path)
    dataset = build_dataset(
        DataConfig(dataset="cifar10", root=str(tmp_path), image_size=32, channels=3, split="test")
    )
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        test = pickle.load(f)
    assert len(dataset) == 2
    for i in range(2):
        image, label = dataset[i]
        torch.testing.assert_close(
            to_unit(image), torch.from_numpy(test["data"][i]).float().reshape(3, 32, 32)
        )
        assert label.item() == test["labels"][i]


def test_cifar10_md5_is_checked(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match=r"CIFAR10 not found \(or corrupted\) under data\.root"):
        build_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), image_size=32, channels=3))


def write_idx(path, array: np.ndarray) -> None:
    """The MNIST file format: magic (0, 0, type 0x08 = uint8, ndim), big-endian dims, then the bytes."""
    path.write_bytes(struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
    with open(path, "ab") as f:
        f.write(array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_and_fashion_mnist(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28))
    held_out = np.random.default_rng(1).integers(0, 256, (2, 28, 28))
    write_idx(raw / "train-images-idx3-ubyte", images)
    write_idx(raw / "train-labels-idx1-ubyte", np.array([7, 0, 9]))
    write_idx(raw / "t10k-images-idx3-ubyte", held_out)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([3, 4]))
    dataset = build_dataset(DataConfig(dataset=name, root=str(tmp_path), image_size=28, channels=3))
    assert len(dataset) == 3 and num_classes_of(dataset) == 10
    image, label = dataset[2]
    assert label.item() == 9
    torch.testing.assert_close(to_unit(image), torch.from_numpy(images[2]).float().expand(3, 28, 28))
    assert build_dataset(DataConfig(dataset=name, root=str(tmp_path)))[0][0].shape == (1, 16, 16)
    test = build_dataset(DataConfig(dataset=name, root=str(tmp_path), image_size=28, split="test"))
    assert len(test) == 2 and test[1][1].item() == 4  # the t10k files
    torch.testing.assert_close(to_unit(test[1][0][0]), torch.from_numpy(held_out[1]).float())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cifar10", "cifar-10-batches-py/"),
        ("mnist", "MNIST/raw/"),
        ("fashion_mnist", "FashionMNIST/raw/"),
        ("celeba", "celeba/img_align_celeba/"),
    ],
)
def test_torchvision_missing_data(tmp_path, name, expected):
    root = tmp_path / "nothing here"
    with pytest.raises(DataError, match=rf"under data\.root '{root}': expected {root}/{expected}") as e:
        build_dataset(DataConfig(dataset=name, root=str(root)))
    assert "data.download=true" in str(e.value)


@pytest.mark.parametrize("split", ["train", "test"])
def test_celeba_reads_the_split_asked_for(monkeypatch, split):
    """CelebA's files are large: here torchvision's class is replaced by one that records its arguments."""
    import torchvision.datasets

    seen = {}

    class CelebA(torch.utils.data.Dataset):
        classes = []

        def __init__(self, root, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(torchvision.datasets, "CelebA", CelebA)
    build_dataset(DataConfig(dataset="celeba", root="faces", split=split))
    assert seen["split"] == split and seen["target_type"] == []
