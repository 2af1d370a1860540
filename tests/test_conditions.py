"""ddpm.conditions.Conditions: batching, slicing, dropping and the checks, on small tensors whose rows can
be told apart (row i holds the value i), so that a mis-ordered or mis-batched row shows."""

import pytest
import torch
from torch.utils import _pytree as pytree

from ddpm.conditions import Conditions, as_conditions, collate_conditions, conditions_of, network_argument


def conditions(n: int = 4, offset: int = 0) -> Conditions:
    rows = torch.arange(offset, offset + n)
    return Conditions(
        {
            "label": rows,
            "image": rows.float()[:, None, None, None].expand(n, 2, 3, 3),
            "vector": rows.float()[:, None].expand(n, 5),
            "context": rows.float()[:, None, None].expand(n, 7, 6),
            "context_mask": torch.arange(7)[None].expand(n, 7) < (rows[:, None] % 7 + 1),
        }
    )


def row_ids(cond: Conditions) -> dict[str, list[int]]:
    """The row each entry's rows came from (every entry holds its row id everywhere)."""
    return {
        "label": cond["label"].tolist(),
        "image": cond["image"][:, 0, 0, 0].long().tolist(),
        "vector": cond["vector"][:, 0].long().tolist(),
        "context": cond["context"][:, 0, 0].long().tolist(),
        "context_mask": (cond["context_mask"].sum(1) - 1).tolist(),
    }


def test_batch_size_kinds_and_the_empty_conditions():
    cond = conditions(4)
    assert cond.batch_size == 4 and cond.kinds == ("label", "image", "vector", "context") and cond
    assert Conditions().batch_size is None and not Conditions() and Conditions().kinds == ()
    assert not cond.is_dropped("vector").any() and cond.is_dropped("vector").shape == (4,)


def test_rows_by_slice_indices_and_mask_keep_every_entry_aligned():
    cond = conditions(6).drop({"label": torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool)})
    for index, expected in [
        (slice(1, 4), [1, 2, 3]),
        (torch.tensor([5, 0, 4]), [5, 0, 4]),
        ([2, 2], [2, 2]),
        (torch.tensor([1, 0, 0, 0, 0, 1], dtype=torch.bool), [0, 5]),
    ]:
        part = cond.rows(index)
        ids = row_ids(part)
        assert ids["label"] == expected and all(
            v == [i % 7 if k == "context_mask" else i for i in expected] for k, v in ids.items()
        ), (index, ids)
        assert part.is_dropped("label").tolist() == [i in (1, 4) for i in expected]


def test_cat_and_null_give_the_guidance_batch():
    cond = conditions(3)
    both = Conditions.cat([cond, cond.null()])
    assert both.batch_size == 6 and row_ids(both)["label"] == [0, 1, 2, 0, 1, 2]
    for kind in cond.kinds:
        assert both.is_dropped(kind).tolist() == [False] * 3 + [True] * 3
    assert "context_mask" not in both.dropped  # an auxiliary entry is never dropped itself


def test_cat_mixes_dropped_and_undropped_kinds_and_refuses_different_entries():
    a = conditions(2).drop({"vector": torch.tensor([True, False])})
    b = conditions(2, offset=2)
    both = Conditions.cat([a, b])
    assert both.is_dropped("vector").tolist() == [True, False, False, False]
    assert not both.is_dropped("label").any()
    with pytest.raises(ValueError, match="different entries"):
        Conditions.cat([a, Conditions.from_labels(torch.tensor([1, 2]))])


def test_drop_ors_with_what_is_dropped_and_refuses_absent_kinds():
    cond = conditions(3).drop({"image": torch.tensor([True, False, False])})
    cond = cond.drop({"image": torch.tensor([False, False, True])})
    assert cond.is_dropped("image").tolist() == [True, False, True]
    with pytest.raises(ValueError, match=r"cannot drop \['colour'\]"):
        cond.drop({"colour": torch.ones(3, dtype=torch.bool)})


def test_repeat_interleave_repeats_each_row_in_place():
    cond = conditions(3).drop({"label": torch.tensor([False, True, False])}).repeat_interleave(2)
    assert row_ids(cond)["vector"] == [0, 0, 1, 1, 2, 2]
    assert cond.is_dropped("label").tolist() == [False, False, True, True, False, False]


def test_to_moves_values_and_masks_and_keeps_dtypes():
    cond = conditions(2).null().to("meta")
    assert all(v.device.type == "meta" for v in [*cond.values.values(), *cond.dropped.values()])
    assert cond["label"].dtype == torch.long and cond.dropped["label"].dtype == torch.bool


def test_labels_tensors_and_none_become_conditions():
    labels = torch.tensor([3, 1])
    assert as_conditions(labels)["label"] is labels and as_conditions(None).batch_size is None
    cond = conditions(2)
    assert as_conditions(cond) is cond
    with pytest.raises(TypeError, match="Conditions, a label tensor or None"):
        as_conditions([3, 1])


def test_collate_stacks_per_image_dicts():
    batch = [{"label": torch.tensor(i), "vector": torch.full((5,), float(i))} for i in range(3)]
    cond = collate_conditions(batch)
    assert cond["label"].tolist() == [0, 1, 2] and cond["vector"].shape == (3, 5)
    with pytest.raises(ValueError, match="hold different conditions"):
        collate_conditions([{"label": torch.tensor(0)}, {"vector": torch.zeros(5)}])


@pytest.mark.parametrize(
    ("values", "dropped", "message"),
    [
        ({"colour": torch.zeros(2)}, {}, r"unknown condition \['colour'\]; valid: label, image"),
        ({"context_mask": torch.ones(2, 3, dtype=torch.bool)}, {}, "'context_mask' goes with 'context'"),
        ({"label": torch.zeros(2), "vector": torch.zeros(3, 4)}, {}, "same batch dimension first"),
        ({"label": torch.tensor(1)}, {}, "same batch dimension first"),
        ({"label": torch.zeros(2)}, {"vector": torch.zeros(2, dtype=torch.bool)}, "not a condition present"),
        ({"label": torch.zeros(2)}, {"label": torch.zeros(2)}, r"must be an \(2,\) bool tensor"),
        ({"label": torch.zeros(2)}, {"label": torch.zeros(3, dtype=torch.bool)}, r"must be an \(2,\) bool"),
    ],
)
def test_malformed_conditions_are_refused_with_what_is_wrong(values, dropped, message):
    with pytest.raises(ValueError, match=message):
        Conditions(values, dropped=dropped)


def test_a_pytree_round_trip_gives_the_same_tensors():
    cond = conditions(3).drop({"context": torch.tensor([True, False, True])})
    leaves, spec = pytree.tree_flatten(cond)
    assert len(leaves) == 6  # five entries and one mask: torch.compile and torch.export see each tensor
    again = pytree.tree_unflatten(leaves, spec)
    assert isinstance(again, Conditions) and set(again.values) == set(cond.values)
    assert all(again[name] is cond[name] for name in cond.values)
    assert again.is_dropped("context").tolist() == [True, False, True]


def test_conditions_of_takes_cond_or_labels_once():
    labels = torch.tensor([1, 2])
    assert conditions_of(y=labels)["label"] is labels and not conditions_of()
    cond = conditions(2)
    assert conditions_of(cond) is cond
    with pytest.raises(ValueError, match="not both"):
        conditions_of(cond, labels)
    with pytest.raises(TypeError, match="labels go in y"):
        conditions_of(labels)


def test_network_argument_gives_labels_alone_as_a_tensor_with_the_null_label():
    labels = Conditions.from_labels(torch.tensor([4, 5, 6]))
    assert network_argument(Conditions()) is None
    assert torch.equal(network_argument(labels, null_class=10), torch.tensor([4, 5, 6]))
    dropped = labels.drop({"label": torch.tensor([False, True, False])})
    assert torch.equal(network_argument(dropped, null_class=10), torch.tensor([4, 10, 6]))
    # Without a null label id the drop stays marked, for the network's own null label
    kept = network_argument(dropped)
    assert isinstance(kept, Conditions) and kept.is_dropped("label").tolist() == [False, True, False]
    # With other kinds: a Conditions, the labels resolved, the other drops kept
    both = Conditions.cat([conditions(2), conditions(2).null()])
    given = network_argument(both, null_class=10)
    assert given["label"].tolist() == [0, 1, 10, 10] and "label" not in given.dropped
    assert given.is_dropped("image").tolist() == [False, False, True, True]
    assert torch.equal(given["image"], both["image"])
