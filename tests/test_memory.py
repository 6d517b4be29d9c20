"""The memory estimate: what it counts, the error that names the units and what would fit, and the
warning of sides too long to eigendecompose."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import TinyClassifier, analyze_one_stage, loader, make_dataset, trainer
from torch import nn

from source_callback import SourceCallback
from source_callback.analysis import memory
from source_callback.analysis.units import find_units
from source_callback.errors import AnalysisError


class BigHead(nn.Module):
    """A 50,000-token output layer: its ``[out, out]`` factor alone is 20 GB in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50_000, 64)
        self.lm_head = nn.Linear(64, 50_000)


def test_the_estimate_counts_factors_query_vectors_and_chunks() -> None:
    units = find_units(nn.Linear(3, 5)).units  # one unit [5, 3+1]
    plan = memory.Plan(queries=7, segments=2, model_bytes=80)
    factors = 8 * (2 * (16 + 25 + 2 * 20) + 16 + 25)
    queries = 8 * 7 * 20 * (1 + 2 * 2)
    chunks = 2 * 8 * 2**24
    assert memory.estimate(units, plan) == factors + queries + chunks + 160


def test_a_unit_that_does_not_fit_is_named_with_the_options_that_fit(monkeypatch) -> None:
    units = find_units(BigHead()).units
    plan = memory.Plan(queries=4, segments=1, model_bytes=0)
    monkeypatch.setenv(memory.ENV_LIMIT, "8GiB")
    with pytest.raises(AnalysisError) as error:
        memory.check(units, plan, torch.device("cpu"))
    message = str(error.value)
    assert "'lm_head' [50000, 65]" in message
    assert "modules={'exclude': ['lm_head']}" in message
    assert "diagonal_above=" in message
    # the embedding's token side is already an identity side: the head's output side is not
    assert units["embed"].identity == (False, True) and units["lm_head"].identity == (False, False)
    assert memory.check(find_units(BigHead(), diagonal_above=65).units, plan, torch.device("cpu"))


def test_limits_parse_with_binary_suffixes() -> None:
    assert memory.parse_size("3000") == 3000
    assert memory.parse_size("2GiB") == memory.parse_size("2G") == 2 * 2**30
    assert memory.parse_size("512 MiB") == 512 * 2**20
    with pytest.raises(ValueError, match=memory.ENV_LIMIT):
        memory.parse_size("lots")


def test_a_dense_side_too_long_to_eigendecompose_is_warned_of() -> None:
    plan = memory.Plan(queries=4, segments=3, model_bytes=0)
    with pytest.warns(UserWarning) as caught:
        memory.warn_large_sides(find_units(BigHead()).units, plan)
    [warning] = caught  # the embedding's token side is an identity side: only the head's
    message = str(warning.message)
    assert message.startswith("unit 'lm_head' [50,000, 65] has a dense side of 50,000")
    assert "once per segment (3 here) at 1819x the cost of a 4,096 side" in message
    assert "diagonal_above=16384" in message and "modules={'exclude': ['lm_head']}" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memory.warn_large_sides(find_units(BigHead(), diagonal_above=16384).units, plan)


def test_analyze_warns_of_a_long_side_before_its_first_pass(tmp_path, monkeypatch) -> None:
    data = make_dataset(32)
    trainer([SourceCallback(tmp_path / "run.zarr", stage="s")], tmp_path, max_epochs=1).fit(
        TinyClassifier(), loader(data)
    )
    monkeypatch.setattr(memory, "LARGE_SIDE", 5)  # the first layer: 8 outputs, 6 inputs and a bias
    with pytest.warns(UserWarning, match=r"unit 'net.0' \[8, 7\] has a dense side of 8") as got:
        analyze_one_stage(tmp_path / "run.zarr", data)
    # the warning points at the line that called analyze (in models.py)
    assert any(w.filename.endswith("models.py") for w in got if "dense side" in str(w.message))
