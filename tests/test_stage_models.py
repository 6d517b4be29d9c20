"""One model per stage: runs whose later stages drop tensors that earlier ones trained.

Ground truth: exact unrolled differentiation through both stages, the body's parameters carrying
their first-stage graph into the second stage's model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import TinyClassifier, loader, make_dataset, trainer
from storeutil import tree_digest
from test_analyze import FEATURES, OUTPUTS, Regressor, _data, _fit, _measure, _replay_steps
from test_analyze import _spearman as spearman
from test_lineage import WithHead
from torch import nn
from unroll import call, leave_one_out_effects, sgd_replay

from source_callback import SourceCallback, analyze, open_run
from source_callback.errors import AnalysisError, ManifestMismatchError

HIDDEN, LR, EPOCHS = 6, 0.01, 5


class Headed(Regressor):
    """A tanh body and an output head whose attribute name says which one it is."""

    def __init__(self, head: str) -> None:
        super().__init__(LR, hidden=0)
        del self.net
        self.body = nn.Linear(FEATURES, HIDDEN)
        self.head = head
        self.add_module(head, nn.Linear(HIDDEN, OUTPUTS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.head)(torch.tanh(self.body(x)))


def _loss(data):
    x, y = data.tensors
    return lambda m, params, idx: ((call(m, params, x[idx]) - y[idx]) ** 2).mean(1)


@pytest.fixture(scope="module")
def dropped_head(tmp_path_factory):
    """Stage 'first' trains body + head 'old'; stage 'second' drops it for a new head 'new'."""
    root = tmp_path_factory.mktemp("dropped")
    torch.manual_seed(0)
    data_a, data_b, queries = _data(24, seed=1), _data(16, seed=2), _data(5, seed=99)
    first = Headed("old").double()
    start_a = {n: p.detach().clone() for n, p in first.named_parameters()}
    _fit(first, root / "run.zarr", data_a, batch_size=8, epochs=EPOCHS, stage="first")
    second = Headed("new").double()
    second.body.load_state_dict(first.body.state_dict())
    start_b = {n: p.detach().clone() for n, p in second.named_parameters()}
    _fit(second, root / "run.zarr", data_b, batch_size=8, epochs=EPOCHS, stage="second")
    lrs = open_run(root / "run.zarr").learning_rates()[:, 0]
    steps = len(_replay_steps(24, 8, EPOCHS))

    def final(weights):
        after = sgd_replay(
            first, start_a, _replay_steps(24, 8, EPOCHS), _loss(data_a), lrs[:steps], weights[:24]
        )
        carried = {**start_b, "body.weight": after["body.weight"], "body.bias": after["body.bias"]}
        return sgd_replay(
            second, carried, _replay_steps(16, 8, EPOCHS), _loss(data_b), lrs[steps:], weights[24:]
        )

    truth = leave_one_out_effects(second, final, _measure(queries), 40).numpy()
    return root / "run.zarr", {"first": data_a, "second": data_b}, queries, truth


def test_the_record_says_which_tensors_were_dropped_and_added(dropped_head) -> None:
    store, *_ = dropped_head
    change = open_run(store).model_changes()[1]
    assert sorted(change.dropped) == ["old.bias", "old.weight"]
    assert sorted(change.added) == ["new.bias", "new.weight"]


def test_the_last_stage_model_alone_is_refused_and_says_to_pass_one_per_stage(
    dropped_head,
) -> None:
    store, train, queries, _ = dropped_head
    before = tree_digest(store)
    with pytest.raises(AnalysisError, match=r"stage 'first'.*old\.weight.*model=\{'first'"):
        analyze(
            store, model=Headed("new").double(), task="regression", train=train, queries=queries
        )
    assert tree_digest(store) == before


def test_one_model_per_stage_matches_unrolling(dropped_head) -> None:
    store, train, queries, truth = dropped_head
    result = analyze(
        store,
        model={"first": Headed("old").double(), "second": Headed("new").double()},
        task="regression",
        train=train,
        queries=queries,
        fisher="exact",
        name="default",
        verbose=False,
    )
    rho_a = spearman(result.scores["first"], truth[:, :24])
    rho_b = spearman(result.scores["second"], truth[:, 24:])
    print(f"dropped head: Spearman stage 1 {rho_a:.3f}, stage 2 {rho_b:.3f}")  # 0.907, 1.000
    assert rho_a > 0.85 and rho_b > 0.95
    assert result.config["modules"] == ["body", "new", "old"]
    assert result.coverage == {"first": 1.0, "second": 1.0}
    # the stage effects are those of the scores: first order, summed over the stage's examples
    assert np.isfinite(result.stage_effects).all()


@pytest.mark.parametrize(
    ("models", "method", "message"),
    [
        ({"second": None}, "source", r"lacks \['first'\]"),
        ({"first": "old", "second": "new", "third": "x"}, "source", r"\['third'\] not in"),
        ({"first": "old", "second": "new"}, "tracin", "one model per stage"),
    ],
)
def test_bad_model_mappings_are_refused(dropped_head, models, method, message) -> None:
    store, train, queries, _ = dropped_head
    built = {k: Headed(v or "new").double() for k, v in models.items()}
    with pytest.raises((AnalysisError, ValueError), match=message):
        analyze(store, model=built, task="regression", train=train, queries=queries, method=method)


def test_per_stage_models_equal_the_final_model_where_both_apply(tmp_path) -> None:
    """A head added in stage 2: the first stage's own model gives the scores the final one does
    (the added head is zero and constant in stage 1, so the forward and gradients agree)."""
    torch.manual_seed(0)
    store, data = tmp_path / "run.zarr", make_dataset(16)
    model, grown = TinyClassifier(), WithHead()
    for stage, module in (("first", model), ("second", grown)):
        if stage == "second":
            grown.load_state_dict(model.state_dict(), strict=False)
        callback = SourceCallback(store, stage=stage, checkpoints_per_stage=2)
        trainer([callback], tmp_path, max_epochs=1).fit(module, loader(data))
    common = {
        "task": "classification",
        "train": {"first": data, "second": data},
        "queries": make_dataset(3, seed=5),
        "segments": 2,
        "name": None,
        "verbose": False,
    }
    final = analyze(store, model=WithHead(), **common)
    per_stage = analyze(store, model={"first": TinyClassifier(), "second": WithHead()}, **common)
    close = {"rtol": 1e-5, "atol": 1e-9}
    for stage in ("first", "second"):
        np.testing.assert_allclose(per_stage.scores[stage], final.scores[stage], **close)
    np.testing.assert_allclose(per_stage.stage_effects, final.stage_effects, **close)
    assert per_stage.config["modules"] == final.config["modules"]
    with pytest.raises(ManifestMismatchError, match=r"given for 'first'.*unexpected extra\.bias"):
        analyze(store, model={"first": WithHead(), "second": WithHead()}, **common)
