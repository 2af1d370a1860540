"""Token-sequence conditioning on digit strips: the digit_strips data set (ddpm.digit_strips), its token
encoding, its config checks, a tiny training run that feeds the tokens to the network, and
bench/sequence_condition.py's reading of strips."""

import importlib.util
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from test_train import TINY_RUN

import ddpm.digit_strips as ds
from ddpm import segment as segment_module
from ddpm.conditions import Conditions
from ddpm.config import ConfigError, load_config, save_config
from ddpm.data import DataError, DigitStripsDataset, build_dataset, collate_batch, digit_strips, split_digits
from ddpm.inference import generate, load_for_sampling
from ddpm.run_dir import RUN_CONFIG
from ddpm.training import Trainer

ROOT = Path(__file__).resolve().parents[1]
STRIPS_YAML = ROOT / "configs" / "strips_digits.yaml"


@pytest.fixture(scope="module")
def test_strips():
    return digit_strips("test")


def test_the_strips_have_their_shapes_lengths_and_values(test_strips):
    images, sequences = test_strips
    assert images.shape == (ds.STRIPS["test"], 1, 16, 16) and sequences.shape == (ds.STRIPS["test"], 3)
    assert images.min() >= -1 and images.max() <= 1
    lengths = (sequences != ds.EMPTY).sum(1)
    assert set(lengths.tolist()) == {1, 2, 3}
    # the digits come first, the padding after: no EMPTY before a digit
    assert torch.equal(sequences != ds.EMPTY, torch.arange(3) < lengths[:, None])
    assert set(sequences[sequences != ds.EMPTY].tolist()) == set(range(10))
    with pytest.raises(DataError, match="digit_strips has the splits train, test, got 'all'"):
        digit_strips("all")
    with pytest.raises(DataError, match="digit_strips needs an even image_size"):
        digit_strips("test", image_size=15)


def test_each_slot_holds_a_held_out_digit_of_its_token_or_is_blank(test_strips):
    images, sequences = test_strips
    digits, labels = split_digits("test", 8)  # the 176 held-out digits, as the slots hold them
    slots = ds.cut_slots(images.add(1).div(2))  # (N, 4, 1, 8, 8) in [0, 1]
    assert (slots[:, 3] == 0).all()  # the fourth slot is always blank
    for k in range(3):
        filled = sequences[:, k] != ds.EMPTY
        assert (slots[~filled, k] == 0).all()
        # every filled slot is exactly one of the held-out digits, of the digit its token asks for
        distance = (slots[filled, k].flatten(1)[:, None] - digits.flatten(1)[None]).abs().amax(-1)
        nearest = distance.min(1)
        assert nearest.values.max() < 1e-6
        assert torch.equal(labels[nearest.indices], sequences[filled, k])


def test_the_strips_are_deterministic_from_the_seed(test_strips):
    again = digit_strips("test")
    assert all(torch.equal(a, b) for a, b in zip(test_strips, again, strict=True))
    other = digit_strips("test", seed=1)
    assert not torch.equal(other[1], test_strips[1])
    train = digit_strips("train", image_size=8)
    assert train[0].shape == (ds.STRIPS["train"], 1, 8, 8)


def test_cut_slots_inverts_join_slots():
    slots = torch.randn(5, 4, 2, 3, 3)
    images = ds.join_slots(slots)
    assert images.shape == (5, 2, 6, 6)
    assert torch.equal(images[:, :, 3:, :3], slots[:, 2])  # slot 2: bottom left
    assert torch.equal(ds.cut_slots(images), slots)


def test_a_token_is_its_one_hot_digit_then_its_one_hot_position():
    tokens, mask = ds.sequence_tokens(torch.tensor([[3, 7, ds.EMPTY], [0, ds.EMPTY, ds.EMPTY]]))
    assert tokens.shape == (2, 3, ds.CONTEXT_DIM) and ds.CONTEXT_DIM == 13
    assert mask.tolist() == [[True, True, False], [True, False, False]]
    expected = torch.zeros(2, 3, 13)
    expected[0, 0, 3] = expected[0, 0, 10] = 1  # digit 3 at position 0
    expected[0, 1, 7] = expected[0, 1, 11] = 1  # digit 7 at position 1
    expected[1, 0, 0] = expected[1, 0, 10] = 1
    assert torch.equal(tokens, expected)  # padding tokens are zero


def test_the_data_set_yields_each_strip_with_its_tokens_and_a_batch_pads_them(test_strips):
    config = load_config(STRIPS_YAML, ["data.split=test"])
    dataset = build_dataset(config.data)
    assert isinstance(dataset, DigitStripsDataset) and len(dataset) == ds.STRIPS["test"]
    images, sequences = test_strips
    index = next(i for i in range(20) if (sequences[i] != ds.EMPTY).sum() == 2)
    image, label, given = dataset[index]
    assert torch.equal(image, images[index]) and label.item() == -1
    assert torch.equal(given["context"], ds.sequence_tokens(sequences[index : index + 1])[0][0, :2])
    lengths = (sequences[:8] != ds.EMPTY).sum(1)
    assert len(set(lengths.tolist())) > 1
    _, _, cond = collate_batch([dataset[i] for i in range(8)])
    assert cond["context"].shape == (8, int(lengths.max()), 13)
    assert cond["context_mask"].sum(1).tolist() == lengths.tolist()


def test_the_strips_config_is_valid():
    config = load_config(STRIPS_YAML)
    assert config.data.dataset == "digit_strips" and config.model["context_dim"] == ds.CONTEXT_DIM


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (
            ["model.context_dim=null"],
            r"gives each image a sequence of 13-wide tokens, but model\.context_dim",
        ),
        (["model.context_dim=12"], r"model\.context_dim=12: set model\.context_dim=13"),
        (["data.labels=true"], r"has no class labels .* set data\.labels=false and model\.num_classes=null"),
        (
            ["data.image_size=9", "model.channel_mult=[1]", "model.attention_resolutions=[9]"],
            r"data\.image_size=9 is odd: choose an even side",
        ),
        (["data.hflip=true"], r"data\.hflip=true would mirror the digits and their order"),
        (["train.fid_every=100"], r"train\.fid_every=100 with data\.dataset=digit_strips"),
        (["data.task=superres", "model.cond_channels=1"], r"digit_strips gives its own conditions"),
        (["data.split=all"], r"data\.split=all but data\.dataset 'digit_strips' has no such split"),
    ],
)
def test_a_strips_config_that_cannot_work_is_refused_when_read(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(STRIPS_YAML, overrides)


def test_training_feeds_each_strip_its_tokens_and_sampling_takes_them(tmp_path):
    short = ["train.steps=2", "train.checkpoint_every=2", "train.sample_every=2"]
    config = load_config(
        STRIPS_YAML, [*TINY_RUN, *short, "model.attention_resolutions=[4]", f"output_dir={tmp_path / 'run'}"]
    )
    trainer = Trainer(config)
    seen = []
    forward = trainer.forward
    trainer.forward = lambda x, t, y: seen.append(y) or forward(x, t, y)
    checkpoint = trainer.train()
    AcceleratorState._reset_state(reset_partial_state=True)
    assert seen and all(isinstance(y, Conditions) and y.kinds == ("context",) for y in seen)
    # the in-training grid's tokens: those of the first sample.n training strips
    grid = trainer.evaluation.grid_cond
    tokens, mask = ds.sequence_tokens(trainer.dataset.sequences[: config.sample.n])
    width = grid["context"].shape[1]
    assert torch.equal(grid["context"], tokens[:, :width])
    assert torch.equal(grid.get("context_mask", torch.ones_like(mask[:, :width])), mask[:, :width])
    # a sampled strip depends on its tokens
    loaded = load_for_sampling(checkpoint)
    sequences = torch.tensor([[1, 2, ds.EMPTY], [5, ds.EMPTY, ds.EMPTY]])
    tokens, mask = ds.sequence_tokens(sequences)

    def draw(sequence_tokens):
        cond = Conditions({"context": sequence_tokens, "context_mask": mask})
        return generate(loaded.model, loaded.scheduler, 2, image_shape=(1, 8, 8), cond=cond, steps=2)

    assert not torch.equal(draw(tokens), draw(tokens.flip(0)))


@pytest.fixture
def bench(monkeypatch):
    """bench/sequence_condition.py, imported as the script runs: bench/ on the path for its own modules."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    path = ROOT / "bench" / "sequence_condition.py"
    spec = importlib.util.spec_from_file_location("sequence_condition", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bench_scores_strips_slot_by_slot(bench):
    sequences = torch.tensor([[1, 2, ds.EMPTY], [4, ds.EMPTY, ds.EMPTY], [7, 8, 9]])
    read = torch.tensor([[1, 2, ds.EMPTY, ds.EMPTY], [4, 3, ds.EMPTY, ds.EMPTY], [7, 8, 9, 0]])
    result = bench.score(read, sequences)
    assert result["strips"]["mean"] == pytest.approx(1 / 3)  # a digit in an empty slot, or the fourth
    assert result["digits"] == 1.0 and result["empty"] == pytest.approx(4 / 6)
    assert result["by_length"] == {"1": 0.0, "2": 1.0, "3": 0.0}
    interval = bench.wilson(1, 3)
    assert interval["low"] < 1 / 3 < interval["high"]


def test_the_reader_reads_blank_slots_as_empty_and_faint_ink_as_a_digit(bench):

    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), 6), 10).float()

    reader = object.__new__(bench.Reader)
    reader.classifier = Constant()
    strips = torch.full((1, 1, 16, 16), -1.0)
    strips[0, 0, :8, 8:] = 2 * bench.INK_EMPTY * 2 - 1  # slot 1: twice the threshold's ink
    strips[0, 0, 8:, 8:] = 0.5 * bench.INK_EMPTY * 2 - 1  # slot 3: half of it
    assert reader.read(strips).tolist() == [[ds.EMPTY, 6, ds.EMPTY, ds.EMPTY]]


def test_segment_refuses_a_split_of_a_strips_run(tmp_path):
    # digit_strips gives each image a condition too, but no masks: a split of its data is not for segment
    save_config(load_config(STRIPS_YAML), tmp_path / RUN_CONFIG)
    with pytest.raises(ValueError, match=r"not trained on image/mask pairs \(data\.dataset: digit_masks\)"):
        segment_module._read("test", tmp_path, 16)
