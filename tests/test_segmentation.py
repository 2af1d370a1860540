"""Segmentation, the seed's task: the digit_masks data set, its config and training, the ensemble command
(`ddpm.segment`), the Dice and AUROC helpers, and bench/segmentation.py's ClassicUNet loss."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import TINY_RUN
from torchvision.utils import save_image

import ddpm.digit_masks as dm
from ddpm import segment as segment_module
from ddpm.conditions import Conditions
from ddpm.config import ConfigError, load_config
from ddpm.data import DataError, DigitMasksDataset, batch_conditions, build_dataset, digit_masks, split_digits
from ddpm.inference import generate, load_for_sampling
from ddpm.segment import auroc, dice, segment
from ddpm.training import Trainer

ROOT = Path(__file__).resolve().parents[1]
SEGMENT_YAML = ROOT / "configs" / "segment_digits.yaml"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_segmentation", ROOT / "bench" / "segmentation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def test_pairs():
    return digit_masks("test")


def test_the_pairs_have_their_shapes_and_values(test_pairs):
    images, masks, labels = test_pairs
    n = 176 * dm.COPIES["test"]  # the digits' 176 held-out images
    assert images.shape == masks.shape == (n, 1, 16, 16) and labels.shape == (n,)
    assert images.min() >= -1 and images.max() <= 1
    assert set(masks.unique().tolist()) == {-1.0, 1.0}
    assert set(labels.unique().tolist()) == set(range(10))
    assert len(digit_masks("train", image_size=8)[0]) == 1621 * dm.COPIES["train"]
    with pytest.raises(DataError, match="digit_masks has the splits train, test, got 'all'"):
        digit_masks("all")


def test_the_pairs_are_deterministic_from_the_seed(test_pairs):
    again = digit_masks("test")
    assert all(torch.equal(a, b) for a, b in zip(test_pairs, again, strict=True))
    other = digit_masks("test", seed=1)
    assert torch.equal(other[1], test_pairs[1])  # the same digits, so the same masks
    assert not torch.equal(other[0], test_pairs[0])  # under other clutter and noise


def test_the_mask_is_the_target_digits_strokes(monkeypatch):
    digits, _ = split_digits("test", 16)
    target = digits.repeat(dm.COPIES["test"], 1, 1, 1)  # pair i is digit i % 176
    monkeypatch.setattr(dm, "NOISE_STD", 0.0)
    monkeypatch.setattr(dm, "CLUTTER_FRAGMENTS", 0)
    images, masks, _ = digit_masks("test")
    # Without clutter and noise the image is the clean digit, and the mask its pixels above the threshold
    assert torch.allclose(images, target * 2 - 1)
    assert torch.equal(masks > 0, target > dm.MASK_THRESHOLD)
    monkeypatch.setattr(dm, "CLUTTER_FRAGMENTS", 3)
    cluttered, same_masks, _ = digit_masks("test")
    assert torch.equal(same_masks, masks)
    # The clutter adds strokes and never erases the target's
    assert (cluttered >= images - 1e-6).all()
    added = (cluttered > images + 0.5).flatten(1).any(1)
    assert added.float().mean() > 0.9


def test_the_data_set_yields_the_mask_to_generate_and_the_image_as_its_condition(test_pairs):
    config = load_config(SEGMENT_YAML, ["data.split=test"])
    dataset = build_dataset(config.data)
    assert isinstance(dataset, DigitMasksDataset) and len(dataset) == len(test_pairs[0])
    mask, label, given = dataset[5]
    assert torch.equal(mask, test_pairs[1][5]) and torch.equal(given["image"], test_pairs[0][5])
    assert label.item() == -1  # data.labels: false


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["data.task=superres"], r"data\.dataset=digit_masks gives each image its own image condition"),
        (["model.cond_channels=null"], r"gives 1-channel masks .* model\.cond_channels=null: set"),
        (["train.fid_every=100"], r"train\.fid_every=100 with data\.dataset=digit_masks"),
        (["data.split=all"], r"data\.split=all but data\.dataset 'digit_masks' has no such split"),
    ],
)
def test_a_segmentation_config_that_cannot_work_is_refused_when_read(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(SEGMENT_YAML, overrides)


def tiny_segment_run(run_dir: Path) -> Path:
    """configs/segment_digits.yaml, tiny (8x8 pairs, 2 steps), trained: its run directory."""
    short = ["train.steps=2", "train.checkpoint_every=2", "train.sample_every=2"]
    config = load_config(
        SEGMENT_YAML, [*TINY_RUN, *short, "model.attention_resolutions=[4]", f"output_dir={run_dir}"]
    )
    trainer = Trainer(config)
    seen = []
    forward = trainer.forward
    trainer.forward = lambda x, t, y: seen.append(y) or forward(x, t, y)
    trainer.train()
    # The network got each batch's own images: the data set's pairs, the masks as x
    assert seen and all(isinstance(y, Conditions) and y.kinds == ("image",) for y in seen)
    images, masks, _ = digit_masks("train", image_size=8)
    first = seen[0]["image"][0]
    assert any(torch.equal(first, image) for image in images)
    return run_dir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tiny_segment_run(tmp_path_factory.mktemp("segment") / "run")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return run


def test_the_ensemble_writes_the_mean_and_variance_of_the_k_samples(tiny_run, tmp_path):
    pictures = digit_masks("test", image_size=8)[0][:3]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, picture in enumerate(pictures):
        save_image(picture.add(1).div(2), folder / f"{i}.png")
    k, out = 4, tmp_path / "out"
    result = segment(tiny_run, folder, k=k, out=out, seed=7, batch_size=5)
    # The K samples of each image, drawn directly: noise seeds 7 + i * K + j, the image's condition
    loaded = load_for_sampling(tiny_run)
    cond = Conditions({"image": result.images}).repeat_interleave(k)
    direct = generate(
        loaded.model,
        loaded.scheduler,
        3 * k,
        image_shape=(1, 8, 8),
        **loaded.sampling.sampler_settings(),
        cond=cond,
        seed=7,
    )
    samples = direct.add(1).div(2).view(3, k, 1, 8, 8)
    assert torch.allclose(result.samples, samples, atol=1e-5)
    assert torch.allclose(result.mean, samples.mean(1), atol=1e-5)
    assert torch.allclose(result.variance, samples.var(1, unbiased=False), atol=1e-6)
    assert result.variance.max() > 0  # the samples differ
    saved = load_file(out / "segmentation.safetensors")
    assert torch.equal(saved["mean"], result.mean) and torch.equal(saved["variance"], result.variance)
    assert saved["mean"].shape == (3, 1, 8, 8) and "truth" not in saved
    assert len(list((out / "mean").glob("*.png"))) == len(list((out / "variance").glob("*.png"))) == 3
    assert not (out / "metrics.json").exists()
    from PIL import Image

    with Image.open(out / "grid.png") as grid:  # 3 rows (image, mean, variance) of 3 images, padding 1
        assert grid.size == (3 * 9 + 1, 3 * 9 + 1)


def test_the_ensemble_of_a_test_split_scores_it_against_the_true_masks(tiny_run, tmp_path, capsys):
    out = tmp_path / "o"
    segment_module.main([str(tiny_run), "--images", "test", "--n", "6", "--k", "2", "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    saved = load_file(out / "segmentation.safetensors")
    truth = digit_masks("test", image_size=8)[1][:6].add(1).div(2)
    assert torch.equal(saved["truth"], truth)
    scores = json.loads((out / "metrics.json").read_text())
    prediction = saved["mean"] > 0.5
    assert scores["dice"] == pytest.approx(dice(prediction, truth > 0).mean().item())
    assert scores["images"] == len(truth) and scores["k"] == 2


def test_the_ensemble_refuses_bad_input(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="--k 1: the variance needs at least 2 samples"):
        segment(tiny_run, "test", k=1, out=tmp_path)
    with pytest.raises(SystemExit, match="error: .*nowhere: no such file or folder"):
        segment_module.main([str(tiny_run), "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path)])


def test_dice_against_hand_computed_values():
    prediction = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    truth = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    # 2 * 1 / (2 + 2); both empty: 1; disjoint: 0
    assert dice(prediction, truth).tolist() == [0.5, 1.0, 0.0]


def test_auroc_against_hand_computed_values():
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of the 4 pairs ranked right
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(torch.tensor([0.5, 0.5, 0.9]), torch.tensor([0, 1, 1])) == pytest.approx(0.75)  # a tie: 1/2
    with pytest.raises(ValueError, match="AUROC needs both positives and negatives"):
        auroc(torch.rand(4), torch.ones(4, dtype=torch.bool))


def test_the_classic_unet_loss_is_bce_plus_soft_dice():
    loss = _bench().bce_dice_loss
    targets = torch.tensor([1.0, 0, 0, 0]).view(1, 1, 2, 2)
    # logits 0: p = 1/2 everywhere; BCE ln 2; soft Dice (2 * 0.5 + 1) / (2 + 1 + 1) = 1/2
    assert loss(torch.zeros(1, 1, 2, 2), targets).item() == pytest.approx(math.log(2) + 0.5)
    assert loss(40 * (2 * targets - 1), targets).item() == pytest.approx(0.0, abs=1e-6)


def test_the_data_sets_conditions_join_the_labels():
    config = load_config(SEGMENT_YAML)
    masks, images, labels = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16), torch.tensor([3, 4])
    cond = batch_conditions(config.data, masks, labels, files=Conditions({"image": images}))
    assert cond.kinds == ("label", "image") and torch.equal(cond["image"], images)
    assert torch.equal(cond["label"], labels)
