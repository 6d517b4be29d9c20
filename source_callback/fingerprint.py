"""Fingerprints of a map-style dataset: a cheap one of a sample, and one per example.

Recording stores both with each stage; analysis recomputes them on the dataset the user passes
and refuses data that differs. :func:`dataset_fingerprint` hashes the size and a fixed sample of
items (a few item reads whatever the dataset's size); :func:`example_digests` hashes every item
(one read of the whole dataset, made off the training thread while a stage trains), so that a
change anywhere is found and located. Both are stable across processes and machines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

SAMPLE_SIZE = 16
#: Indices per ``__getitems__`` call of :func:`example_digests`.
ITEMS_PER_READ = 1024


def sample_indices(size: int, count: int = SAMPLE_SIZE) -> list[int]:
    """Evenly spaced indices over ``range(size)``, first and last included."""
    if size <= count:
        return list(range(size))
    return sorted({round(i * (size - 1) / (count - 1)) for i in range(count)})


def _feed(h: Any, item: Any) -> None:
    """Feed a canonical byte form of ``item`` into hash ``h``."""
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu()
        h.update(f"T{item.dtype}{tuple(item.shape)}".encode())
        if item.dtype == torch.bfloat16:
            item = item.view(torch.uint16)
        h.update(item.contiguous().numpy().tobytes())
    elif isinstance(item, np.ndarray):
        h.update(f"N{item.dtype.str}{item.shape}".encode())
        h.update(np.ascontiguousarray(item).tobytes())
    elif isinstance(item, (bytes, bytearray)):
        h.update(b"B" + bytes(item))
    elif isinstance(item, str):
        h.update(b"S" + item.encode())
    elif isinstance(item, (bool, int, float, complex, np.generic)) or item is None:
        h.update(f"V{type(item).__name__}:{item!r}".encode())
    elif isinstance(item, Mapping):
        h.update(b"{")
        for key in sorted(item, key=str):
            _feed(h, str(key))
            _feed(h, item[key])
        h.update(b"}")
    elif isinstance(item, Sequence):
        h.update(b"[")
        scalars = _scalars(item) if type(item) in (list, tuple) else None
        if scalars is not None:
            h.update(scalars)
        else:
            for value in item:
                _feed(h, value)
        h.update(b"]")
    else:
        # Objects without a canonical form (e.g. PIL images) contribute their type only;
        # the size and the other items still distinguish datasets.
        h.update(f"O{type(item).__qualname__}".encode())


#: The scalar types whose lists :func:`_scalars` feeds in one piece, with each value's prefix.
_SCALAR_PREFIXES = {int: "Vint:", float: "Vfloat:", bool: "Vbool:"}


def _scalars(items: list[Any] | tuple[Any, ...]) -> bytes | None:
    """The bytes :func:`_feed` gives the values of ``items``, if all are of one scalar type.

    Tokenized Hugging Face datasets give their items as lists of Python ints: fed one value at
    a time they cost about 1 us per token, joined by ``str.join`` about 30 times less, with the
    same bytes (so the same digests) as value by value.
    """
    types = set(map(type, items))
    prefix = _SCALAR_PREFIXES.get(types.pop()) if len(types) == 1 else None
    if prefix is None:
        return None
    return (prefix + prefix.join(map(repr, items))).encode()


def example_digest(item: Any) -> int:
    """A 64-bit digest of one item's canonical bytes."""
    h = hashlib.blake2b(digest_size=8)
    _feed(h, item)
    return int.from_bytes(h.digest(), "little")


class UnstableItemsError(ValueError):
    """The dataset returns a different item each time the same index is read."""


def example_digests(dataset: Any) -> np.ndarray | None:
    """Per-example digests ``[N]`` (uint64) of a map-style dataset, in index order.

    ``None`` for a dataset without a length or integer indexing.

    Raises
    ------
    UnstableItemsError
        Reading the first item twice gave two different items (random transforms): no
        digest could recognise the examples later.
    """
    try:
        size = len(dataset)
        first = [example_digest(dataset[0]) for _ in range(2)] if size else []
    except (TypeError, NotImplementedError, KeyError):
        return None
    if first and first[0] != first[1]:
        raise UnstableItemsError("reading item 0 twice gave two different items")
    return np.fromiter(
        (example_digest(item) for item in _items(dataset, size, first[0] if size else 0)),
        dtype=np.uint64,
        count=size,
    )


def _items(dataset: Any, size: int, first: int) -> Iterator[Any]:
    """Every item of ``dataset`` in index order: by ``__getitems__`` where it gives them.

    ``DataLoader`` reads a batch with one ``__getitems__`` call where a dataset defines it
    (Hugging Face ``datasets`` do, and datasets that build batches vectorized), at a fraction
    of the cost of as many ``__getitem__`` calls. Its answers are taken while each is a list of
    one item per index, the first of them the item ``dataset[0]`` is (digest ``first``); from
    the first answer that is not (a collated batch, say), the items are read one by one.
    """
    getitems = getattr(dataset, "__getitems__", None)
    start = 0
    while callable(getitems) and start < size:
        stop = min(size, start + ITEMS_PER_READ)
        chunk = getitems(list(range(start, stop)))
        if not isinstance(chunk, list) or len(chunk) != stop - start:
            break
        if not start and example_digest(chunk[0]) != first:
            break
        yield from chunk
        start = stop
    for index in range(start, size):
        yield dataset[index]


def dataset_fingerprint(dataset: Any) -> str | None:
    """Fingerprint of a map-style dataset (``len`` and integer indexing), else ``None``.

    Parameters
    ----------
    dataset
        The dataset; typically ``trainer.train_dataloader.dataset``.

    Returns
    -------
    str or None
        A hex digest of the size and ``SAMPLE_SIZE`` evenly spaced items, or ``None`` when the
        dataset has no length or cannot be indexed (an ``IterableDataset``).

    """
    try:
        size = len(dataset)
    except TypeError:
        return None
    h = hashlib.blake2b(digest_size=16)
    h.update(f"size={size}".encode())
    try:
        for index in sample_indices(size):
            _feed(h, dataset[index])
    except (TypeError, NotImplementedError, KeyError):
        return None
    return h.hexdigest()
