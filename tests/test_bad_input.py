"""Bad input: a clear error naming the problem, and nothing already recorded is modified."""

from __future__ import annotations

import json

import pytest
import torch
import zarr
from models import TinyClassifier, loader, make_dataset, trainer
from storeutil import tree_digest

from source_callback import (
    FormatVersionError,
    ManifestMismatchError,
    NotAStoreError,
    SourceCallback,
    StoreError,
    open_run,
)


def _fit(tmp_path, store, model=None, **callback_kwargs) -> None:
    trainer([SourceCallback(store, **callback_kwargs)], tmp_path, max_epochs=1).fit(
        model or TinyClassifier(), loader(make_dataset(16))
    )


@pytest.fixture
def recorded(tmp_path):
    store = tmp_path / "run.zarr"
    _fit(tmp_path, store, stage="pretrain")
    return store


def test_directory_that_is_not_a_store(tmp_path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    before = tree_digest(folder)
    with pytest.raises(NotAStoreError, match="not a Zarr store"):
        _fit(tmp_path, folder)
    with pytest.raises(NotAStoreError):
        open_run(folder)
    assert tree_digest(folder) == before


def test_foreign_zarr_group(tmp_path) -> None:
    foreign = tmp_path / "other.zarr"
    zarr.open_group(foreign, mode="w").attrs["owner"] = "someone else"
    before = tree_digest(foreign)
    with pytest.raises(NotAStoreError, match="not a source-callback store"):
        _fit(tmp_path, foreign)
    with pytest.raises(NotAStoreError, match="not a source-callback store"):
        open_run(foreign)
    assert tree_digest(foreign) == before


def test_store_path_under_a_regular_file_or_at_one(tmp_path) -> None:
    file = tmp_path / "results"
    file.write_text("precious")
    with pytest.raises(StoreError, match=r"could not create a store at .*results/run.zarr: Not a"):
        _fit(tmp_path, file / "run.zarr")
    with pytest.raises(NotAStoreError, match=r"results exists and is not a Zarr store"):
        _fit(tmp_path, file)
    assert file.read_text() == "precious"


def test_missing_store(tmp_path) -> None:
    with pytest.raises(StoreError, match="no store at"):
        open_run(tmp_path / "nothing.zarr")


def test_newer_format_version(tmp_path, recorded) -> None:
    meta_path = recorded / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["source_callback"]["version"] = 99
    meta_path.write_text(json.dumps(meta))
    before = tree_digest(recorded)
    with pytest.raises(FormatVersionError, match=r"version 99.*Upgrade"):
        open_run(recorded)
    with pytest.raises(FormatVersionError):
        _fit(tmp_path, recorded, stage="finetune")
    assert tree_digest(recorded) == before


def test_model_that_does_not_continue_the_last_stage(tmp_path, recorded) -> None:
    before = tree_digest(recorded)
    shape = r"net\.0\.weight \(continues net\.0\.weight by name\): shape \[8, 6\] in the previous"
    with pytest.raises(ManifestMismatchError, match=shape):
        _fit(tmp_path, recorded, model=TinyClassifier(hidden=5), stage="finetune")
    assert tree_digest(recorded) == before
    # a float64 copy of the same architecture is a different model too
    with pytest.raises(ManifestMismatchError, match=r"dtype torch\.float32 in the previous stage"):
        _fit(tmp_path, recorded, model=TinyClassifier().double(), stage="finetune")
    assert tree_digest(recorded) == before


def test_duplicate_stage_name(tmp_path, recorded) -> None:
    before = tree_digest(recorded)
    with pytest.raises(StoreError, match="'pretrain' is already recorded"):
        _fit(tmp_path, recorded, stage="pretrain")
    assert tree_digest(recorded) == before
    assert [s.name for s in open_run(recorded).stages] == ["pretrain"]


def test_reading_is_read_only(tmp_path, recorded) -> None:
    before = tree_digest(recorded)
    run = open_run(recorded)
    for checkpoint in run.checkpoints:
        checkpoint.params()
        checkpoint.optimizer_state()
    run.steps()
    assert tree_digest(recorded) == before
    with pytest.raises(KeyError, match="recorded stages: 'pretrain'"):
        run.stage("sft")
    assert torch.is_tensor(run.checkpoints[0].params()["net.0.weight"])
