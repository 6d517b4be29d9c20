"""Stages that trained on part of their dataset are named when analyzed (SOURCE would score
the examples they never drew as if drawn)."""

from __future__ import annotations

from typing import Any

import pytest
from models import TinyClassifier, analyze_one_stage, loader, make_dataset, trainer
from torch.utils.data import DataLoader

from source_callback import SourceCallback, open_run
from source_callback.analysis.inputs import partial_draws

DATA = make_dataset(64)


def _record(tmp_path, data_loader: DataLoader, **fit: Any):
    store = tmp_path / "run.zarr"
    trainer([SourceCallback(store, stage="s")], tmp_path, **fit).fit(TinyClassifier(), data_loader)
    return store


def test_a_stage_stopped_within_its_first_epoch_is_named(tmp_path) -> None:
    store = _record(tmp_path, loader(DATA), max_steps=3, max_epochs=-1)
    [found] = partial_draws(open_run(store))
    assert found.startswith(
        "stage 's' drew 24 examples in its 3 optimizer steps, fewer than the 64"
    )
    with pytest.warns(UserWarning, match=r"examples never trained on get scores too"):
        analyze_one_stage(store, DATA)


def test_epochs_that_each_draw_part_of_the_data_are_named(tmp_path) -> None:
    store = _record(tmp_path, loader(DATA), max_epochs=2, limit_train_batches=4)
    [found] = partial_draws(open_run(store))
    assert "drew 32 examples per epoch, fewer than the 64 of its dataset" in found


def test_whole_epochs_and_drop_last_are_not_a_shortfall(tmp_path) -> None:
    whole = _record(tmp_path / "whole", loader(DATA), max_epochs=2)
    dropped = DataLoader(DATA, batch_size=10, shuffle=True, drop_last=True)  # 60 of 64 an epoch
    last = _record(tmp_path / "dropped", dropped, max_epochs=2)
    stopped = _record(tmp_path / "stopped", loader(DATA), max_steps=12, max_epochs=-1)  # 1.5
    for store in (whole, last, stopped):
        assert partial_draws(open_run(store)) == []
