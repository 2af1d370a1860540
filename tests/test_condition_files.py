"""Conditions read from files: the folder data set's files beside each image (data.conditions) and the
paired layout (data.paired), found and checked when the data set is built; their batches (sequences padded,
each row with its own image); the config's checks; the trainer feeding them; sample.py --cond."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import save_file
from test_superres import run_sample_cli, write_png
from test_train import TINY_RUN, weights
from test_unet import perturb, tiny

import ddpm
from ddpm.condition_files import ConditionFileError, read_cond_files
from ddpm.conditions import Conditions, collate_conditions
from ddpm.config import ConfigError, load_config
from ddpm.data import DataError, build_dataset, collate_batch, read_images
from ddpm.inference import generate, load_for_sampling
from ddpm.schedule import NoiseScheduler
from ddpm.training import Trainer

DIGITS_YAML = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
NAMES = "{image: cond, vector: emb, context: text}"
SIZES = ["model.cond_channels=1", "model.cond_dim=3", "model.context_dim=4"]


def make_folder(root: Path, n: int = 6, *, lengths=(1, 2, 3)) -> dict[str, list]:
    """n 8x8 grey images in root/a and root/b with, beside each, an image condition (STEM.cond.png), a
    vector (STEM.emb.npy, (3,)) and a token sequence (STEM.text.safetensors, (L, 4), L cycling over
    `lengths`); returns what was written, by kind, in the data set's (sorted) order."""
    rng = np.random.default_rng(0)
    written = {"file": [], "vector": [], "context": []}
    for i in range(n):
        image = root / ("a" if i < n // 2 else "b") / f"{i}.png"
        write_png(image, rng.integers(0, 256, (8, 8)))
        write_png(image.with_name(f"{i}.cond.png"), rng.integers(0, 256, (8, 8)))
        vector = rng.normal(size=3).astype(np.float32)
        np.save(image.with_name(f"{i}.emb.npy"), vector)
        context = torch.randn(lengths[i % len(lengths)], 4, generator=torch.Generator().manual_seed(i))
        save_file({"tokens": context}, image.with_name(f"{i}.text.safetensors"))
        written["file"].append(image)
        written["vector"].append(torch.from_numpy(vector))
        written["context"].append(context)
    return written


def folder_config(root: Path, *extra: str, names: str = NAMES, run: Path | None = None):
    overrides = [
        *TINY_RUN,
        "model.attention_resolutions=[4]",
        "data.dataset=folder",
        f"data.root={root}",
        "data.labels=false",
        "model.num_classes=null",
        f"data.conditions={names}",
        "data.batch_size=4",
        *SIZES,
        *extra,
    ]
    return load_config(DIGITS_YAML, [*overrides, f"output_dir={run or root.parent / 'run'}"])


def test_each_image_reads_its_own_condition_files(tmp_path):
    written = make_folder(tmp_path / "data")
    config = folder_config(tmp_path / "data")
    dataset = build_dataset(config.data, config.model)
    assert dataset.files == written["file"]  # the condition images are no training images
    for i in range(6):
        image, label, cond = dataset[i]
        assert sorted(cond) == ["context", "image", "vector"] and int(label) == -1
        own, _ = read_images(written["file"][i].with_name(f"{i}.cond.png"), image_size=8, channels=1)
        torch.testing.assert_close(cond["image"], own[0], rtol=0, atol=0)
        torch.testing.assert_close(cond["vector"], written["vector"][i], rtol=0, atol=0)
        torch.testing.assert_close(cond["context"], written["context"][i], rtol=0, atol=0)


def test_a_batch_keeps_each_row_with_its_image_and_pads_the_sequences(tmp_path):
    written = make_folder(tmp_path / "data")
    config = folder_config(tmp_path / "data")
    dataset = build_dataset(config.data, config.model)
    order = [4, 0, 2, 1]  # as a shuffled loader takes them
    images, labels, cond = collate_batch([dataset[i] for i in order])
    assert images.shape == (4, 1, 8, 8) and isinstance(cond, Conditions)
    assert cond.kinds == ("image", "vector", "context") and cond["context"].shape == (4, 3, 4)
    lengths = [written["context"][i].shape[0] for i in order]  # 2, 1, 3, 2
    assert cond["context_mask"].tolist() == [[j < length for j in range(3)] for length in lengths]
    for row, i in enumerate(order):
        torch.testing.assert_close(images[row], dataset[i][0], rtol=0, atol=0)
        torch.testing.assert_close(cond["vector"][row], written["vector"][i], rtol=0, atol=0)
        length = lengths[row]
        torch.testing.assert_close(cond["context"][row, :length], written["context"][i], rtol=0, atol=0)
        assert (cond["context"][row, length:] == 0).all()
    # Sequences of one length need no mask
    same = collate_conditions([{"context": torch.ones(2, 4)}, {"context": torch.zeros(2, 4)}])
    assert "context_mask" not in same and same["context"].shape == (2, 2, 4)


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (
            lambda root: (root / "a" / "1.emb.npy").unlink(),
            r"^\S+/a/1\.png: no vector condition file; expected \S+/a/1\.emb\{\.npy,\.safetensors\}$",
        ),
        (
            lambda root: np.save(root / "b" / "4.emb.npy", np.zeros((3, 1), np.float32)),
            r"^\S+/b/4\.emb\.npy: shape \(3, 1\), expected \(3,\) \(model\.cond_dim\)$",
        ),
        (
            lambda root: save_file({"t": torch.zeros(2, 5)}, root / "a" / "0.text.safetensors"),
            r"^\S+/a/0\.text\.safetensors: shape \(2, 5\), expected \(L, 4\) \(L >= 1, model\.context_dim\)$",
        ),
        (
            lambda root: (root / "b" / "3.emb.npy").write_bytes(b"not an array"),
            r"^cannot read \S+/b/3\.emb\.npy: ",
        ),
        (
            lambda root: [(root / "a" / f"{i}.cond.png").unlink() for i in range(3)],
            r"^\S+/a/0\.png: no image condition file; expected \S+/a/0\.cond\{\.png,.*\} \(2 more are "
            r"missing or mis-shaped\)$",
        ),
    ],
)
def test_a_missing_or_mis_shaped_file_stops_the_data_set_when_built(tmp_path, damage, pattern):
    make_folder(tmp_path / "data")
    damage(tmp_path / "data")
    config = folder_config(tmp_path / "data")
    with pytest.raises(DataError, match=pattern):
        build_dataset(config.data, config.model)


def test_the_paired_layout_reads_each_targets_image_condition_from_inputs(tmp_path):
    rng = np.random.default_rng(1)
    inputs = []
    for name in ("x/cat", "x/dog", "owl"):
        write_png(tmp_path / "pairs" / "targets" / f"{name}.png", rng.integers(0, 256, (8, 8)))
        inputs.append(write_png(tmp_path / "pairs" / "inputs" / f"{name}.jpg", rng.integers(0, 256, (8, 8))))
    config = folder_config(
        tmp_path / "pairs", "data.paired=true", "model.cond_dim=null", "model.context_dim=null", names="{}"
    )
    dataset = build_dataset(config.data, config.model)
    assert [f.relative_to(tmp_path / "pairs" / "targets").as_posix() for f in dataset.files] == [
        "owl.png",
        "x/cat.png",
        "x/dog.png",
    ]
    expected, _ = read_images(tmp_path / "pairs" / "inputs", image_size=8, channels=1)  # owl, cat, dog
    for i in range(3):
        torch.testing.assert_close(dataset[i][2]["image"], expected[i], rtol=0, atol=0)
    (tmp_path / "pairs" / "inputs" / "x" / "dog.jpg").unlink()
    with pytest.raises(DataError, match=r"x/dog\.png: no image condition file; expected \S+inputs/x/dog\{"):
        build_dataset(config.data, config.model)


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["data.dataset=digits"], r"data\.conditions / data\.paired read files .* set data\.dataset=folder"),
        (
            ["data.conditions={shape: s}"],
            r"'data\.conditions'.*expected a mapping from image, vector, context",
        ),
        (["data.conditions={vector: a.b}"], r"'data\.conditions'.*a name part of file names"),
        (["model.cond_dim=null"], r"condition files give each image a vector, but model\.cond_dim=null"),
        (
            ["data.conditions={image: cond, context: text}"],
            r"model\.cond_dim=3 takes a vector, which no condition file gives: add vector to "
            r"data\.conditions",
        ),
        (["data.hflip=true"], r"data\.hflip=true would flip the images but not their condition files"),
        (
            ["data.paired=true"],
            r"data\.paired=true reads each image condition from inputs/, and data\.conditions",
        ),
        (["model.cond_channels=2"], r"condition image files are read as 1 \(grey\) or 3 \(RGB\) channels"),
        (["train.fid_every=10"], r"train\.fid_every=10 with condition files"),
    ],
)
def test_condition_files_that_cannot_work_are_refused_when_the_config_is_read(tmp_path, extra, pattern):
    with pytest.raises(ConfigError, match=pattern):
        folder_config(tmp_path / "data", *extra)


def test_the_trainer_feeds_each_batch_its_conditions_from_files(tmp_path):
    written = make_folder(tmp_path / "data", n=8)
    trainer = Trainer(folder_config(tmp_path / "data", "train.label_dropout=0"))
    seen = []
    forward = trainer.forward
    trainer.forward = lambda x, t, y: seen.append((x, y)) or forward(x, t, y)
    x0, labels, files = next(iter(trainer.loader))  # shuffled
    trainer._loss(x0, labels, files)
    (_, cond), rows = seen[0], []
    assert cond.kinds == ("image", "vector", "context") and "context_mask" in cond
    for row in range(4):  # find each row's image, then check its conditions are its own files
        i = next(i for i in range(8) if torch.equal(trainer.dataset[i][0], x0[row]))
        rows.append(i)
        torch.testing.assert_close(cond["vector"][row], written["vector"][i], rtol=0, atol=0)
        torch.testing.assert_close(cond["image"][row], trainer.dataset[i][2]["image"], rtol=0, atol=0)
    assert len(set(rows)) == 4  # four different images, each with its own files
    # The grid's conditions: the first images' files
    grid = trainer.evaluation.grid_cond
    torch.testing.assert_close(grid["vector"], torch.stack(written["vector"][:4]), rtol=0, atol=0)


def test_sample_cli_draws_one_image_per_cond_file(tmp_path, capsys):
    model = perturb(tiny(cond_dim=3, context_dim=4)).eval()
    ddpm.save_pretrained(tmp_path / "model", model, NoiseScheduler(num_train_timesteps=50))
    vectors = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    contexts = [
        torch.randn(length, 4, generator=torch.Generator().manual_seed(length)) for length in (2, 1, 3)
    ]
    (tmp_path / "conds").mkdir()
    for i in range(3):
        save_file({"vector": vectors[i], "context": contexts[i]}, tmp_path / "conds" / f"{i}.safetensors")
    out = tmp_path / "grid.png"
    argv = ["--checkpoint", str(tmp_path / "model"), "--cond", str(tmp_path / "conds"), "--steps", "2"]
    code, stdout, _ = run_sample_cli([*argv, "--sampler", "ddim", "--out", str(out)], capsys)
    assert code is None and stdout.strip() == str(out)
    cond = read_cond_files(tmp_path / "conds", {"cond_dim": 3, "context_dim": 4})
    assert cond["context_mask"].tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    torch.testing.assert_close(cond["vector"], vectors, rtol=0, atol=0)
    loaded = load_for_sampling(tmp_path / "model")
    images = generate(
        loaded.model, loaded.scheduler, 3, image_shape=(3, 8, 8), cond=cond, sampler="ddim", steps=2
    )
    grid = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32) / 127.5 - 1
    assert grid.shape == (2 * 9 + 1, 2 * 9 + 1, 3)  # the plain grid, 2 to a row
    for i in range(3):
        top, left = 1 + 9 * (i // 2), 1 + 9 * (i % 2)
        cell = grid[top : top + 8, left : left + 8]
        np.testing.assert_allclose(cell, images[i].permute(1, 2, 0).numpy(), atol=1.5 / 255)
    # Each image follows its own file: another row's vector, or its sequence cut short, draws another image
    for other in (
        Conditions({**cond.values, "vector": cond["vector"][[1, 0, 2]]}),
        Conditions({**cond.values, "context_mask": torch.tensor([[True, False, False]] * 3)}),
    ):
        moved = generate(
            loaded.model, loaded.scheduler, 3, image_shape=(3, 8, 8), cond=other, sampler="ddim", steps=2
        )
        assert not torch.allclose(moved[0], images[0], atol=1e-4)


@pytest.mark.parametrize(
    ("model", "argv", "pattern"),
    [
        (
            "plain",
            ["--cond", "conds"],
            r"^error: --cond \S+conds: this model takes no vector or token sequence",
        ),
        (
            "vector",
            [],
            r"^error: this model is conditioned on a vector or a token sequence \(model\.cond_dim=3\): "
            r"pass --cond FILE",
        ),
        (
            "vector",
            ["--cond", "conds", "--n", "2"],
            r"^error: --n 2 with --cond: one image is drawn per condition file; drop --n$",
        ),
        (
            "vector",
            ["--cond", "wrong"],
            r"^error: --cond \S+wrong/0\.npy: holds \{'vector': \(4,\)\}; the model takes vector \(3,\) "
            r"\(model\.cond_dim\)$",
        ),
    ],
)
def test_a_cond_file_the_model_cannot_take_is_refused_before_sampling(
    tmp_path, capsys, monkeypatch, model, argv, pattern
):
    models = {"plain": tiny(), "vector": tiny(cond_dim=3)}
    ddpm.save_pretrained(tmp_path / "model", models[model], NoiseScheduler(num_train_timesteps=50))
    (tmp_path / "conds").mkdir()
    np.save(tmp_path / "conds" / "0.npy", np.zeros(3, np.float32))
    (tmp_path / "wrong").mkdir()
    np.save(tmp_path / "wrong" / "0.npy", np.zeros(4, np.float32))
    sampled = []
    monkeypatch.setattr(ddpm.inference, "generate", lambda *args, **kwargs: sampled.append(args))
    argv = [str(tmp_path / arg) if arg in ("conds", "wrong") else arg for arg in argv]
    code, _, err = run_sample_cli(["--checkpoint", str(tmp_path / "model"), *argv, "--steps", "2"], capsys)
    assert isinstance(code, str) and re.search(pattern, code), code
    assert sampled == [] and err == ""


def test_read_cond_files_tells_vectors_from_sequences_by_shape(tmp_path):
    np.save(tmp_path / "v.npy", np.arange(3, dtype=np.float32))
    assert read_cond_files(tmp_path / "v.npy", {"cond_dim": 3, "context_dim": None})["vector"].tolist() == [
        [0, 1, 2]
    ]
    np.save(tmp_path / "s.npy", np.ones((5, 4), np.float32))
    cond = read_cond_files(tmp_path / "s.npy", {"cond_dim": None, "context_dim": 4})
    assert cond.kinds == ("context",) and cond["context"].shape == (1, 5, 4)
    with pytest.raises(
        ConditionFileError, match=r"the model takes vector \(3,\) \(model\.cond_dim\) and context"
    ):
        read_cond_files(tmp_path / "s.npy", {"cond_dim": 3, "context_dim": 4})


def test_cond_files_go_with_cond_images_row_by_row(tmp_path, capsys, monkeypatch):
    model = tiny(cond_channels=1, cond_dim=3, num_classes=2)
    ddpm.save_pretrained(tmp_path / "model", model, NoiseScheduler(num_train_timesteps=50))
    for i in range(2):
        write_png(tmp_path / "images" / f"{i}.png", np.full((8, 8), 100 * i))
    (tmp_path / "conds").mkdir()
    for i in range(3):
        np.save(tmp_path / "conds" / f"{i}.npy", np.full(3, i, np.float32))
    calls = []  # what sample.py asks generate for; it draws zeros
    fake = lambda *args, **kwargs: calls.append(kwargs) or torch.zeros(2, 3, 8, 8)  # noqa: E731
    monkeypatch.setattr(ddpm.inference, "generate", fake)
    argv = ["--checkpoint", str(tmp_path / "model"), "--cond-image", str(tmp_path / "images"), "--steps", "2"]
    code, _, _ = run_sample_cli([*argv, "--cond", str(tmp_path / "conds")], capsys)
    assert (
        code == f"error: --cond {tmp_path / 'conds'}: 3 conditions for 2 --cond-image images; give as many "
        "(paired in sorted order)"
    )
    (tmp_path / "conds" / "2.npy").unlink()
    run_sample_cli([*argv, "--cond", str(tmp_path / "conds"), "--out", str(tmp_path / "grid.png")], capsys)
    (kwargs,) = calls
    cond = kwargs["cond"]
    assert cond.kinds == ("label", "image", "vector") and cond["label"].tolist() == [0, 1]
    assert cond["vector"].tolist() == [[0.0] * 3, [1.0] * 3]
    torch.testing.assert_close(cond["image"][:, 0, 0, 0], torch.tensor([-1.0, 100 / 127.5 - 1]))


def test_a_resumed_run_with_condition_files_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path):
    # Each kind's dropout draws are restored with the RNG and each row keeps its own files after the resume:
    # a condition lost, reordered or dropped differently on resume changes the weights
    make_folder(tmp_path / "data", n=8)
    extra = (
        "train.label_dropout=0",
        "train.cond_dropout={image: 0.3, vector: 0.5, context: 0.5}",
        "train.sample_every=0",
    )
    straight = Trainer(folder_config(tmp_path / "data", *extra, run=tmp_path / "a")).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    Trainer(folder_config(tmp_path / "data", *extra, "train.steps=3", run=tmp_path / "b")).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = Trainer(folder_config(tmp_path / "data", *extra, run=tmp_path / "b"), resume="latest").train()
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
