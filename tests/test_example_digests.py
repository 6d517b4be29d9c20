"""Every training example is digested while its stage trains; analyze finds any change."""

from __future__ import annotations

import hashlib
import shutil
from collections import UserList

import numpy as np
import pytest
import torch
from models import TinyClassifier, analyze_one_stage, loader, make_dataset, trainer
from torch.utils.data import Dataset, TensorDataset

from source_callback import AnalysisError, SourceCallback, open_run
from source_callback.fingerprint import example_digest, example_digests, sample_indices


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("digests")
    data = make_dataset(512)
    trainer([SourceCallback(root / "run.zarr", stage="s")], root, max_epochs=1).fit(
        TinyClassifier(), loader(data, batch_size=64)
    )
    return root / "run.zarr", data


def test_the_record_holds_a_digest_of_every_example(recorded) -> None:
    store, data = recorded
    digests = open_run(store).example_digests(0)
    assert digests.dtype == np.uint64 and len(digests) == 512
    assert all(digests[i] == example_digest(data[i]) for i in (0, 17, 511))
    assert open_run(store).verify() == []


def test_labels_changed_outside_the_sample_are_found_and_located(recorded) -> None:
    store, data = recorded
    x, y = data.tensors
    sampled = set(sample_indices(len(data)))
    changed = [i for i in range(len(data)) if i not in sampled]  # 496 of 512, as reported
    relabelled = y.clone()
    relabelled[changed] = (relabelled[changed] + 1) % 3
    with pytest.raises(AnalysisError, match=r"496 of its 512 examples differ.*first at index 1\b"):
        analyze_one_stage(store, TensorDataset(x, relabelled))
    one = y.clone()
    one[300] = (one[300] + 1) % 3
    with pytest.raises(AnalysisError, match=r"1 of its 512 examples differ.*first at index 300"):
        analyze_one_stage(store, TensorDataset(x, one))
    analyze_one_stage(store, data)  # the data trained on passes


class Jittered(Dataset):
    """A dataset with a random transform: every read of an index gives another item."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y = self.data[i]
        return x + 0.01 * torch.randn_like(x), y


def test_random_items_are_not_digested_and_say_so(tmp_path) -> None:
    data = Jittered(make_dataset(64))
    store = tmp_path / "run.zarr"
    with pytest.warns(UserWarning, match=r"different items for the same index"):
        trainer([SourceCallback(store, stage="s")], tmp_path, max_epochs=1).fit(
            TinyClassifier(), loader(data)
        )
    run = open_run(store)
    assert run.example_digests(0) is None and run.stages[0].complete


def test_damaged_digests_are_reported(recorded, tmp_path) -> None:
    store, _ = recorded
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    chunk = next(p for p in (copy / "examples" / "0000").rglob("c/*") if p.is_file())
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    problems = open_run(copy).verify()
    assert [p.where for p in problems] == ["example digests of stage 's'"]


class Batched(Dataset):
    """``make_dataset``'s examples, read a batch at a time by ``__getitems__`` as well.

    ``batch`` is what ``__getitems__`` answers: ``"items"`` a list of the indices' items (the
    contract ``DataLoader`` relies on), ``"collated"`` one stacked ``(x, y)`` batch, ``"other"``
    a list of other items. It counts both kinds of read.
    """

    def __init__(self, data: TensorDataset, batch: str = "items") -> None:
        self.data, self.batch = data, batch
        self.item_reads = self.batch_reads = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        self.item_reads += 1
        return self.data[i]

    def __getitems__(self, indices: list[int]):
        self.batch_reads += 1
        x, y = self.data.tensors[0][indices], self.data.tensors[1][indices]
        if self.batch == "collated":
            return x, y
        if self.batch == "other":
            return [(row,) for row in x]
        return list(zip(x.unbind(), y.unbind(), strict=True))


@pytest.mark.parametrize(
    ("batch", "batch_reads", "item_reads"),
    [("items", 3, 2), ("collated", 1, 2 + 2500), ("other", 1, 2 + 2500)],
)
def test_digests_read_batches_where_the_dataset_gives_its_items_by_batch(
    batch: str, batch_reads: int, item_reads: int
) -> None:
    """``__getitems__`` serves the digests where it answers item by item, as it must."""
    data = make_dataset(2500)
    expected = np.array([example_digest(data[i]) for i in range(len(data))], dtype=np.uint64)
    batched = Batched(data, batch)
    np.testing.assert_array_equal(example_digests(batched), expected)
    assert (batched.batch_reads, batched.item_reads) == (batch_reads, item_reads)


#: An item as a tokenized Hugging Face dataset gives it, and its digest as every earlier version
#: of the library computed it (stores hold such digests, so they must not change).
TOKENIZED_ROW = {
    "input_ids": [101, 7592, 102],
    "attention_mask": [1, 1, 1],
    "labels": [-100, 7592, 102],
    "scores": (0.25, 1.5),
    "flags": [True, False],
}
TOKENIZED_ROW_DIGEST = 0x39ADF975880E5A69


@pytest.mark.parametrize(
    "values",
    [[3, 0, -7, 2**70], [0.5, float("nan"), -0.0, 1e300], [True, False], (4, 5), [1, 2.0], []],
)
def test_lists_of_scalars_digest_as_value_by_value(values) -> None:
    """A list of one scalar type, fed in one piece, gives the digest of its values one by one."""
    by_value = hashlib.blake2b(digest_size=8)
    by_value.update(b"[")
    for value in values:
        by_value.update(f"V{type(value).__name__}:{value!r}".encode())
    by_value.update(b"]")
    assert example_digest(values) == int.from_bytes(by_value.digest(), "little")
    nested = {"ids": values, "rows": [values, list(values)]}
    user_lists = {"ids": UserList(values), "rows": UserList([UserList(values)] * 2)}
    assert example_digest(nested) == example_digest(user_lists)  # UserList: value by value


def test_the_digest_of_a_tokenized_row_is_the_one_stores_hold() -> None:
    assert example_digest(TOKENIZED_ROW) == TOKENIZED_ROW_DIGEST
