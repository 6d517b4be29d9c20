"""Non-finite values in an analysis's data: a clear error naming the dataset, the example and the
pass, and nothing stored (the previous analysis of the name stays as it was)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from models import TinyClassifier, loader, make_dataset, trainer
from torch import nn
from torch.utils.data import TensorDataset

from source_callback import (
    AnalysisResult,
    ClassificationTask,
    NonFiniteError,
    SourceCallback,
    analyze,
    load_analysis,
)
from source_callback.analysis.finite import RowFlags, require_finite
from source_callback.record.probe import probe_indices

#: Marks an input on which the models and tasks below misbehave (a finite input).
MARK = 1234.0


def _with(data: TensorDataset, index: int, value: float) -> TensorDataset:
    """A copy of ``data`` whose example ``index`` has ``value`` as its first feature."""
    x, y = (t.clone() for t in data.tensors)
    x[index, 0] = value
    return TensorDataset(x, y)


CLEAN = {"pretrain": make_dataset(24)}
# The faulty examples are not among the probed ones (source_callback.record.probe): recording
# and the analysis's probe check see the same losses whichever Guarded flags analyze them.
FAULTY = {
    "pretrain": _with(make_dataset(24), 4, MARK),
    "finetune": _with(make_dataset(20, seed=1), 13, float("nan")),
}
QUERIES = make_dataset(4, seed=7)


class Guarded(TinyClassifier):
    """Trains on inputs with NaN replaced by 0. In eval mode, with ``raw`` it takes the inputs as
    they are, and with ``overflow`` its logits are infinite on inputs marked ``MARK``."""

    def __init__(self, raw: bool = True, overflow: bool = True) -> None:
        super().__init__()
        self.raw, self.overflow = raw, overflow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x if self.raw and not self.training else torch.nan_to_num(x))
        if self.overflow and not self.training:
            return torch.where(x[:, :1] == MARK, torch.inf, logits)
        return logits


class NanMeasurement(ClassificationTask):
    """A measurement that is NaN on queries marked ``MARK``."""

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        values = super().measurement(model, batch)
        return torch.where(batch[0][:, 0] == MARK, torch.nan, values)


class RawSampling(ClassificationTask):
    """Pseudo-labels drawn with ``torch.multinomial`` on probabilities nobody checked."""

    def pseudo_loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        logits = model(batch[0])
        probs = torch.softmax(logits.detach().double(), dim=1)
        sampled = torch.multinomial(probs, 1, generator=generator)[:, 0]
        return nn.functional.cross_entropy(logits, sampled, reduction="none")


def _record(root: Path, stages: dict[str, TensorDataset]) -> Path:
    store = root / "run.zarr"
    model = Guarded()
    callback = SourceCallback(store, stage=next(iter(stages)), checkpoints_per_stage=2)
    for number, (stage, data) in enumerate(stages.items()):
        if number:
            callback.next_stage(stage)
        trainer([callback], root, max_epochs=1).fit(model, loader(data))
    return store


def _analyze(store: Path, train: dict[str, TensorDataset], **kwargs: Any) -> AnalysisResult:
    options: dict[str, Any] = {
        "model": Guarded(),
        "task": "classification",
        "queries": QUERIES,
        "segments": 1,
        "batch_size": 8,
        "verbose": False,
        **kwargs,
    }
    result = analyze(store, train=train, **options)
    result.scores = {name: np.asarray(array[...]) for name, array in result.scores.items()}
    return result


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, AnalysisResult]]:
    """Per kind of data: a record and the analysis stored in it as ``default``.

    ``clean``: one stage of clean data. ``faulty``: two stages, the first with a marked example
    at 4, the second with a NaN in example 13 (analyzed here by a model that cleans both).
    """
    assert 4 not in probe_indices(24) and 13 not in probe_indices(20)  # see FAULTY
    root = tmp_path_factory.mktemp("nonfinite")
    out = {}
    for kind, train in (("clean", CLEAN), ("faulty", FAULTY)):
        store = _record(root / kind, train)
        out[kind] = store, _analyze(store, train, model=Guarded(raw=False, overflow=False))
    return out


def _store(recorded: dict[str, tuple[Path, AnalysisResult]], kind: str, tmp_path: Path) -> Path:
    """A copy of the record of ``kind`` (the tests write into it)."""
    copy = tmp_path / "run.zarr"
    shutil.copytree(recorded[kind][0], copy)
    return copy


def _assert_unchanged(store: Path, before: AnalysisResult) -> None:
    """``analyses/default`` still reads as ``before``, bit for bit."""
    after = load_analysis(store)
    assert after.config == before.config
    for stage in before.stage_names:
        np.testing.assert_array_equal(np.asarray(after.scores[stage][...]), before.scores[stage])
    np.testing.assert_array_equal(after.stage_effects, before.stage_effects)
    np.testing.assert_array_equal(after.last_stage_exact, before.last_stage_exact)


@pytest.mark.parametrize("out_of_core", [False, True])
def test_nan_in_a_query(recorded, tmp_path, out_of_core: bool) -> None:
    store = _store(recorded, "clean", tmp_path)
    queries = _with(QUERIES, 2, float("nan"))
    with pytest.raises(NonFiniteError) as caught:
        _analyze(store, CLEAN, queries=queries, out_of_core=out_of_core)
    error = caught.value
    assert (error.dataset, error.index, error.pass_name) == ("queries", 2, "query gradients")
    assert error.in_input
    assert str(error).startswith(
        "the measurement of query 2 is not finite (NaN or infinite) in the pass 'query "
        "gradients': that example's input itself holds NaN or infinite values."
    )
    assert "Fix that query or leave it out" in str(error)
    _assert_unchanged(store, recorded["clean"][1])


def test_measurement_that_is_nan(recorded, tmp_path) -> None:
    store = _store(recorded, "clean", tmp_path)
    with pytest.raises(NonFiniteError, match=r"the measurement of query 3 .*input is finite"):
        _analyze(
            store,
            CLEAN,
            queries=_with(QUERIES, 3, MARK),
            task=NanMeasurement(),
            model=Guarded(overflow=False),
        )
    _assert_unchanged(store, recorded["clean"][1])


@pytest.mark.parametrize("task", ["classification", RawSampling()], ids=["builtin", "custom"])
def test_nan_in_a_training_example(recorded, tmp_path, task: Any) -> None:
    store = _store(recorded, "faulty", tmp_path)
    with pytest.raises(NonFiniteError) as caught:
        _analyze(store, FAULTY, task=task, model=Guarded(overflow=False))
    error = caught.value
    assert (error.dataset, error.index, error.in_input) == ("finetune", 13, True)
    assert error.pass_name == "segment 2/2 factors 1/2"
    quantity = "pseudo-label probabilities" if task == "classification" else "pseudo-loss"
    assert str(error).startswith(
        f"the {quantity} of example 13 of stage 'finetune' is not finite (NaN or infinite) in "
        "the pass 'segment 2/2 factors 1/2': that example's input itself holds NaN"
    )
    assert "retrain" in str(error)
    _assert_unchanged(store, recorded["faulty"][1])


def test_infinite_loss_of_a_training_example(recorded, tmp_path) -> None:
    store = _store(recorded, "faulty", tmp_path)
    with pytest.raises(NonFiniteError) as caught:  # TracIn: the loss is the first value taken
        _analyze(store, FAULTY, method="tracin", model=Guarded(raw=False))
    error = caught.value
    assert (error.quantity, error.dataset, error.index) == ("loss", "pretrain", 4)
    assert not error.in_input
    assert error.pass_name == "tracin scores 1/1"
    assert "its input is finite, so the model or the task overflows" in str(error)
    _assert_unchanged(store, recorded["faulty"][1])


def test_influence_names_the_stage_within_the_pooled_data(recorded, tmp_path) -> None:
    store = _store(recorded, "faulty", tmp_path)
    with pytest.raises(NonFiniteError) as caught:
        _analyze(store, FAULTY, method="if", model=Guarded(overflow=False))
    error = caught.value
    assert (error.dataset, error.index, error.pass_name) == (
        "finetune",
        13,
        "influence factors 1/1",
    )
    _assert_unchanged(store, recorded["faulty"][1])


def test_a_failed_pass_leaves_no_batch_behind(recorded, tmp_path) -> None:
    store = _store(recorded, "faulty", tmp_path)
    with pytest.raises(NonFiniteError) as failed:
        _analyze(store, FAULTY, model=Guarded(overflow=False))
    # ``failed`` holds the traceback, and with it the frames of the pass that raised
    with pytest.raises(NonFiniteError) as caught:
        require_finite(torch.tensor([1.0, float("nan")]), "loss")
    error = caught.value
    assert (error.dataset, error.index, error.pass_name, error.in_input) == (None, 1, None, False)
    assert failed.value.pass_name == "segment 2/2 factors 1/2"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_row_flags_find_the_first_example_with_a_non_finite_value(value: float) -> None:
    flags = RowFlags()
    wide = torch.randn(5, 3, 4)
    wide[3, 2, 1] = value
    flags.add(wide.transpose(1, 2))  # a view, as the hooks' sides often are
    flags.add(torch.randn(5))
    flags.add(torch.tensor(value))  # no examples' axis: ignored
    flags.add(torch.empty(5, 0))  # no values: ignored
    assert [f.tolist() for f in flags.flags] == [[True, True, True, False, True], [True] * 5]
    narrow = torch.randn(5)
    narrow[1] = value
    flags.add(narrow)
    with pytest.raises(NonFiniteError) as caught:
        flags.check("gradient")
    assert (caught.value.quantity, caught.value.index) == ("gradient", 1)
    flags.check("gradient")  # the flags are cleared by a check
