"""Curvature fitted on a subset of the data (``curvature_examples``): which examples, and that
the fit is exactly the curvature of those examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import TinyClassifier, make_dataset
from torch import nn
from torch.utils.data import Subset, TensorDataset

from source_callback.analysis.ekfac import tracked_modules
from source_callback.analysis.engine import Engine, curvature_subset
from source_callback.analysis.inputs import Collation
from source_callback.analysis.progress import Progress
from source_callback.analysis.task import ClassificationTask, RegressionTask
from source_callback.errors import NonFiniteError


def test_the_subset_is_seeded_spread_and_nested() -> None:
    assert curvature_subset(1000, None, 0) is None
    assert curvature_subset(1000, 1000, 0) is None and curvature_subset(1000, 1.0, 0) is None
    quarter = curvature_subset(1000, 0.25, 0)
    assert quarter == curvature_subset(1000, 250, 0) == curvature_subset(1000, 0.25, 0)
    assert quarter != curvature_subset(1000, 0.25, 1)  # the seed draws it
    assert len(quarter) == len(set(quarter)) == 250 and quarter == sorted(quarter)
    assert quarter[0] >= 0 and quarter[-1] < 1000
    # spread over the data: about a quarter of each tenth of it, not its beginning
    per_tenth = np.bincount(np.array(quarter) // 100, minlength=10)
    assert per_tenth.min() >= 10 and per_tenth.max() <= 40
    assert set(curvature_subset(1000, 0.1, 0)) < set(quarter) < set(curvature_subset(1000, 0.5, 0))
    assert len(curvature_subset(24, 0.3, 0)) == 7 and len(curvature_subset(24, 0.01, 0)) == 1


def _engine(model: nn.Module, task, fisher: str, examples: int | float | None) -> Engine:
    return Engine(
        model, task, {}, 8, fisher, seed=3, progress=Progress(False),
        collation=Collation.of(None, []), curvature_examples=examples,
    )  # fmt: skip


def test_a_subset_curvature_is_the_exact_curvature_of_those_examples() -> None:
    """One linear layer, squared error: EK-FAC is the exact Gauss-Newton Hessian (§8.2), here
    that of the mean loss over the subset's examples only."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    data = TensorDataset(torch.randn(40, 4, dtype=torch.float64), torch.randn(40, 3).double())
    engine = _engine(layer, RegressionTask(), "exact", 0.25)
    curvature = engine.curvature(data, [lambda: layer.state_dict()], "test")[""]
    chosen = curvature_subset(40, 0.25, seed=3)
    x, y = data.tensors[0][chosen], data.tensors[1][chosen]

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        matrix = flat.reshape(3, 5)
        return ((x @ matrix[:, :4].T + matrix[:, 4] - y) ** 2).mean()

    unit = tracked_modules(layer)[""]
    flat = unit.matrix(dict(layer.named_parameters())).detach().reshape(-1)
    exact = torch.autograd.functional.hessian(mean_loss, flat)
    torch.testing.assert_close(curvature.dense(), exact, rtol=1e-10, atol=1e-12)
    # and not that of all examples
    everything = _engine(layer, RegressionTask(), "exact", None)
    full = everything.curvature(data, [lambda: layer.state_dict()], "test")[""]
    assert not torch.allclose(full.dense(), exact, rtol=1e-3)


def test_sampled_curvature_equals_the_full_path_on_the_subset() -> None:
    """With sampled pseudo-labels, two checkpoints: the same fit as the full-data path run on a
    dataset of exactly the chosen examples (the draws follow positions in the pass)."""
    torch.manual_seed(0)
    model = TinyClassifier().double()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    moved = {k: v + 0.1 * torch.randn_like(v) for k, v in start.items()}
    states = [lambda: start, lambda: moved]
    data = make_dataset(50)
    data = TensorDataset(data.tensors[0].double(), data.tensors[1])
    subset = _engine(model, ClassificationTask(), "sampled", 13).curvature(data, states, "test")
    chosen = Subset(data, curvature_subset(50, 13, seed=3))
    by_hand = _engine(model, ClassificationTask(), "sampled", None).curvature(chosen, states, "t")
    for name, fitted in subset.items():
        torch.testing.assert_close(fitted.dense(), by_hand[name].dense(), rtol=1e-12, atol=0)


def test_a_non_finite_example_is_named_by_its_index_in_the_dataset() -> None:
    model = TinyClassifier().double()
    x, y = make_dataset(50).tensors
    chosen = curvature_subset(50, 0.5, seed=3)
    x = x.double()
    x[chosen[9]] = torch.nan
    engine = _engine(model, ClassificationTask(), "sampled", 0.5)
    engine.train = {"pretrain": (data := TensorDataset(x, y))}
    with pytest.raises(NonFiniteError, match=f"example {chosen[9]} of stage 'pretrain'"):
        engine.curvature(data, [lambda: model.state_dict()], "segment 1/1")
