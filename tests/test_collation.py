"""Stages trained with different collate functions: ``collate_fn`` as a mapping from each
stage's name to its own, for ``analyze`` (and the queries take the last stage's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import TinyClassifier, make_dataset, trainer
from torch.utils.data import DataLoader, Dataset, default_collate

from source_callback import ClassificationTask, SourceCallback, analyze
from source_callback.errors import AnalysisError
from source_callback.evaluation import TaskMeasurement, retrain


class Records(Dataset):
    """``make_dataset``'s examples as dicts (as a tokenizer's rows are), which the default
    collate function turns into a dict batch the classifier cannot take."""

    def __init__(self, n: int, seed: int) -> None:
        self.data = make_dataset(n, seed=seed)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {"features": x, "label": y}


def records_collate(items: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([i["features"] for i in items]), torch.stack([i["label"] for i in items])


def either_collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    """One function for both forms, also mixed in one batch: the ground truth the mapping must
    reproduce, and what a pass over all stages' examples together needs."""
    pairs = [(i["features"], i["label"]) if isinstance(i, dict) else i for i in items]
    return default_collate(pairs)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Stage 'tensors' on (x, y) pairs, stage 'records' on dicts with their own collate."""
    root = tmp_path_factory.mktemp("collation")
    store = root / "run.zarr"
    callback = SourceCallback(store, stage="tensors", checkpoints_per_stage=2)
    torch.manual_seed(0)
    model = TinyClassifier()
    tensors, records = make_dataset(32, seed=1), Records(24, seed=2)
    trainer([callback], root, max_epochs=2).fit(model, DataLoader(tensors, batch_size=8))
    callback.next_stage("records")
    loader = DataLoader(records, batch_size=8, collate_fn=records_collate)
    trainer([callback], root, max_epochs=2).fit(model, loader)
    return store, {"tensors": tensors, "records": records}


def _analyze(recorded, collate_fn, method: str = "source"):
    store, train = recorded
    return analyze(
        store,
        model=TinyClassifier(),
        task="classification",
        train=train,
        queries=Records(4, seed=7),  # the last stage's form
        collate_fn=collate_fn,
        method=method,
        segments=1,
        name=None,
        verbose=False,
    )


def test_each_stage_is_collated_by_its_own_function(recorded) -> None:
    mapped = _analyze(recorded, {"tensors": None, "records": records_collate})
    truth = _analyze(recorded, either_collate)
    for stage in ("tensors", "records"):
        assert mapped.scores[stage].shape == truth.scores[stage].shape
        np.testing.assert_array_equal(mapped.scores[stage], truth.scores[stage])
    np.testing.assert_array_equal(mapped.stage_effects, truth.stage_effects)


def test_one_function_for_stages_of_two_forms_fails_on_the_first_batch(recorded) -> None:
    with pytest.raises(AnalysisError, match=r"the training set of stage 'tensors'.*collated"):
        _analyze(recorded, records_collate)


@pytest.mark.parametrize(
    ("collate_fn", "error", "message"),
    [
        ({"records": records_collate}, ValueError, r"collate_fn lacks \['tensors'\]"),
        (
            {"tensors": None, "records": records_collate, "sft": None},
            ValueError,
            r"names stage\(s\) \['sft'\] not in the record",
        ),
        ({"tensors": None, "records": "records_collate"}, TypeError, r"\['records'\] is not a"),
        ([records_collate], TypeError, "or a mapping from each stage's name to one; got list"),
    ],
)
def test_a_wrong_mapping_is_refused_by_name(recorded, collate_fn, error, message) -> None:
    with pytest.raises(error, match=message):
        _analyze(recorded, collate_fn)


def test_influence_pools_the_stages_and_needs_one_function(recorded) -> None:
    with pytest.raises(AnalysisError, match="method='if' pools every stage's examples"):
        _analyze(recorded, {"tensors": None, "records": records_collate}, method="if")
    result = _analyze(recorded, either_collate, method="if")
    assert result.scores["records"].shape == (4, 24)


def test_retrain_collates_each_stage_with_its_own_function(recorded) -> None:
    store, train = recorded
    # The queries of the analysis, in the last stage's form, collated as analyze did.
    measure = TaskMeasurement(ClassificationTask(), Records(4, seed=7), 4, records_collate)
    common = {"module": TinyClassifier, "train": train, "measure": measure, "seeds": [3]}
    mapped = retrain(store, **common, collate_fn={"tensors": None, "records": records_collate})
    truth = retrain(store, **common, collate_fn=either_collate)
    assert mapped.shape == (1, 1, 4) and np.isfinite(mapped).all()
    np.testing.assert_array_equal(mapped, truth)
