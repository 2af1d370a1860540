"""Conditions: the one batched structure in which everything a diffusion model is conditioned on travels.

A `Conditions` holds, for a batch of N images, one (N, ...) tensor per kind of condition the network takes
(`KINDS`: class labels, an image concatenated with x, a vector added to the time embedding, a token sequence
read by cross-attention), auxiliary tensors that go with a kind (the token sequence's padding mask), and for
each kind an (N,) bool mask of the rows dropped to the network's learned null of that kind. Training drops
rows at random (classifier-free guidance's condition dropout, Ho & Salimans 2022, Algorithm 1) and guidance
calls the network on `cond.null()` for its unconditional half, so the loss, the samplers, guidance and the
editing functions handle a `Conditions` as a whole (batch it, slice it, repeat it, move it, drop it) and
never look inside: a new kind touches the network and the data, not every solver.

Shapes, by kind (`KINDS`; the network checks each against its configuration):
    "label":   (N,) long class ids in [0, num_classes - 1]
    "image":   (N, cond_channels, H, W) float, at x's side
    "vector":  (N, cond_dim) float
    "context": (N, L, context_dim) float, with "context_mask" (N, L) bool (True: a real token), optional
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

KINDS = ("label", "image", "vector", "context")
# Entries that travel with a kind but are not conditions themselves (no null of their own, never dropped).
AUXILIARY = {"context_mask": "context"}


class Conditions:
    """A batch of conditions: `values`, kind (or auxiliary entry) -> (N, ...) tensor, and `dropped`, kind ->
    (N,) bool, True where that row's condition of that kind is replaced by the network's learned null.

    Immutable by convention: every method returns a new Conditions sharing the unchanged tensors. An empty
    Conditions (no values) is the unconditional case and has batch_size None. A kind without a `dropped`
    entry has no row dropped. Raises ValueError for an unknown name, a tensor without the shared batch
    dimension, a mask that is not (N,) bool, or an auxiliary entry without its kind.
    """

    __slots__ = ("values", "dropped")

    def __init__(
        self, values: Mapping[str, Tensor] | None = None, *, dropped: Mapping[str, Tensor] | None = None
    ):
        self.values: dict[str, Tensor] = dict(values or {})
        self.dropped: dict[str, Tensor] = {kind: mask for kind, mask in (dropped or {}).items()}
        _check(self.values, self.dropped)

    @classmethod
    def from_labels(cls, labels: Tensor | None) -> Conditions:
        """The conditions of class labels alone, (N,) long (a label equal to the network's null class is its
        null already); None gives the empty Conditions."""
        return cls() if labels is None else cls({"label": labels})

    @property
    def batch_size(self) -> int | None:
        """N, or None for the empty Conditions."""
        return next(iter(self.values.values())).shape[0] if self.values else None

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of condition present, in `KINDS` order (auxiliary entries left out)."""
        return tuple(kind for kind in KINDS if kind in self.values)

    def __bool__(self) -> bool:
        return bool(self.values)

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def __getitem__(self, name: str) -> Tensor:
        return self.values[name]

    def get(self, name: str, default: Tensor | None = None) -> Tensor | None:
        return self.values.get(name, default)

    def is_dropped(self, kind: str) -> Tensor:
        """(N,) bool: the rows whose `kind` is replaced by the learned null (all False when none is)."""
        if kind in self.dropped:
            return self.dropped[kind]
        value = self.values[kind]
        return torch.zeros(value.shape[0], dtype=torch.bool, device=value.device)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Conditions:
        """The same conditions on `device` (dtypes kept)."""
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def rows(self, index: slice | Tensor | Sequence[int]) -> Conditions:
        """The conditions of the rows `index` picks (a slice, (M,) long indices or an (N,) bool mask)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index)
        return self._map(
            lambda tensor: tensor[index.to(tensor.device) if isinstance(index, Tensor) else index]
        )

    def repeat_interleave(self, repeats: int) -> Conditions:
        """Each row `repeats` times in a row: (N, ...) -> (N * repeats, ...), row i at i * repeats ... ."""
        return self._map(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def drop(self, masks: Mapping[str, Tensor]) -> Conditions:
        """These conditions with more rows dropped: masks, kind -> (N,) bool, or-ed with what is dropped."""
        unknown = sorted(set(masks) - set(self.kinds))
        if unknown:
            raise ValueError(f"cannot drop {unknown}: the conditions hold {list(self.kinds)}")
        dropped = dict(self.dropped)
        for kind, mask in masks.items():
            dropped[kind] = self.is_dropped(kind) | mask.to(device=self.values[kind].device, dtype=torch.bool)
        return Conditions(self.values, dropped=dropped)

    def null(self) -> Conditions:
        """Every row of every kind dropped: the unconditional input of classifier-free guidance."""
        n = self.batch_size
        return self.drop({kind: torch.ones(n, dtype=torch.bool) for kind in self.kinds}) if n else self

    @staticmethod
    def cat(conditions: Sequence[Conditions]) -> Conditions:
        """Concatenate along the batch: each must hold the same entries (e.g. [cond, cond.null()])."""
        names = {tuple(sorted(c.values)) for c in conditions}
        if len(names) != 1:
            raise ValueError(f"cannot concatenate conditions holding different entries: {sorted(names)}")
        first = conditions[0]
        if not first:
            return first
        values = {name: torch.cat([c.values[name] for c in conditions]) for name in first.values}
        dropped_kinds = {kind for c in conditions for kind in c.dropped}
        dropped = {kind: torch.cat([c.is_dropped(kind) for c in conditions]) for kind in dropped_kinds}
        return Conditions(values, dropped=dropped)

    def __repr__(self) -> str:
        entries = ", ".join(f"{name}: {tuple(value.shape)}" for name, value in self.values.items())
        drops = ", ".join(f"{kind}: {int(mask.sum())}" for kind, mask in self.dropped.items())
        return f"Conditions({{{entries}}}" + (f", dropped={{{drops}}})" if drops else ")")

    def _map(self, function) -> Conditions:
        return Conditions(
            {name: function(value) for name, value in self.values.items()},
            dropped={kind: function(mask) for kind, mask in self.dropped.items()},
        )


def as_conditions(cond: Conditions | Tensor | None) -> Conditions:
    """A Conditions from what a network or sampler was given: a Conditions as it is, an (N,) tensor as class
    labels (the form every `model(x, t, y)` call took before conditions beyond labels), None as empty."""
    if isinstance(cond, Conditions):
        return cond
    if cond is None or isinstance(cond, Tensor):
        return Conditions.from_labels(cond)
    raise TypeError(
        f"conditions must be a ddpm.conditions.Conditions, a label tensor or None, got {type(cond)}"
    )


def conditions_of(cond: Conditions | None = None, y: Tensor | None = None) -> Conditions:
    """The conditions of a call that takes them as `cond` or, as every call did before conditions beyond
    labels, as class labels `y` (N,) (`Conditions.from_labels`); neither: the empty Conditions. Raises
    ValueError when both are given, and TypeError for a cond that is not a Conditions."""
    if cond is not None and y is not None:
        raise ValueError("pass the conditions once: cond=Conditions(...) or class labels y, not both")
    if cond is None:
        return Conditions.from_labels(y)
    if not isinstance(cond, Conditions):
        raise TypeError(f"cond must be a ddpm.conditions.Conditions, got {type(cond)}; labels go in y")
    return cond


def network_argument(cond: Conditions, null_class: int | None = None) -> Conditions | Tensor | None:
    """What a network call `model(x, t, y)` is given for `cond`: None for the empty conditions, the (N,) label
    tensor for labels alone (so that any network taking labels as a tensor works as it did), else the
    Conditions. With a `null_class`, dropped labels become that label id (the label's null is a label id);
    without, they stay marked dropped and the network (a UNet) takes its own null label. The other kinds stay
    marked dropped, for the network's learned nulls."""
    if "label" in cond.dropped and null_class is not None:
        labels = torch.where(cond.dropped["label"], null_class, cond["label"])
        dropped = {kind: mask for kind, mask in cond.dropped.items() if kind != "label"}
        cond = Conditions({**cond.values, "label": labels}, dropped=dropped)
    if not cond:
        return None
    if set(cond.values) == {"label"} and not cond.dropped:
        return cond["label"]
    return cond


def collate_conditions(batch: Iterable[Mapping[str, Tensor]]) -> Conditions:
    """The Conditions of a batch of per-image condition dicts (name -> tensor without the batch dimension),
    as a data set yields them: stacked along a new first dimension. Token sequences ("context", (L_i, D))
    of different lengths are padded with zeros at the end to the longest, L, and given the padding mask
    "context_mask" (N, L) bool, True at each row's real tokens; of one length they need none."""
    batch = list(batch)
    names = {tuple(sorted(item)) for item in batch}
    if len(names) != 1:
        raise ValueError(f"the images of a batch hold different conditions: {sorted(names)}")
    values = {name: torch.stack([item[name] for item in batch]) for name in batch[0] if name != "context"}
    if "context" in batch[0]:
        lengths = torch.tensor([item["context"].shape[0] for item in batch])
        values["context"] = torch.nn.utils.rnn.pad_sequence(
            [item["context"] for item in batch], batch_first=True
        )
        if (lengths != lengths[0]).any():
            values["context_mask"] = torch.arange(int(lengths.max())) < lengths[:, None]
    return Conditions(values)


def _check(values: dict[str, Tensor], dropped: dict[str, Tensor]) -> None:
    known = set(KINDS) | set(AUXILIARY)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown condition {unknown}; valid: {', '.join(KINDS)} (and {', '.join(AUXILIARY)})"
        )
    for name, kind in AUXILIARY.items():
        if name in values and kind not in values:
            raise ValueError(f"'{name}' goes with '{kind}', which is missing")
    sizes = {name: value.shape[0] if value.ndim else None for name, value in values.items()}
    first = next(iter(sizes.values()), None)
    # Compared, not put in a set: under torch.export a batch size is a SymInt, which cannot be hashed.
    if any(size is None or size != first for size in sizes.values()):
        raise ValueError(f"every condition needs the same batch dimension first, got shapes {sizes}")
    for kind, mask in dropped.items():
        if kind not in values or kind in AUXILIARY:
            raise ValueError(f"dropped names '{kind}', which is not a condition present: {sorted(values)}")
        n = sizes[kind]
        if mask.dtype != torch.bool or mask.shape != (n,):
            raise ValueError(
                f"dropped['{kind}'] must be an ({n},) bool tensor, got {mask.dtype} {tuple(mask.shape)}"
            )


# Conditions are a pytree node, so that torch.compile and torch.export see through them to their tensors.
pytree.register_pytree_node(
    Conditions,
    lambda c: (
        [*c.values.values(), *c.dropped.values()],
        (tuple(c.values), tuple(c.dropped)),
    ),
    lambda leaves, context: Conditions(
        dict(zip(context[0], leaves[: len(context[0])], strict=True)),
        dropped=dict(zip(context[1], leaves[len(context[0]) :], strict=True)),
    ),
    serialized_type_name="ddpm.conditions.Conditions",
)
