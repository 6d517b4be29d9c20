"""Segments and learning-rate masses from a real record, against closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import TinyClassifier, loader, make_dataset, trainer

from source_callback import SourceCallback, open_run
from source_callback.analysis.segments import plan_segments
from source_callback.errors import AnalysisError, UnsupportedOptimizerError


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    """Stage 'sgd': 16 steps, SGD momentum 0.9, lr 0.1, dampening 0.5. Stage 'adam': 10
    steps, Adam β1 0.8 with lr halving every 2 steps."""
    root = tmp_path_factory.mktemp("segments")
    store = root / "run.zarr"
    callback = SourceCallback(store, stage="sgd", checkpoints_per_stage=6)
    model = TinyClassifier(
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5)
    )
    trainer([callback], root, max_epochs=2).fit(model, loader(make_dataset(64)))
    model.optimizer_factory = lambda p: torch.optim.Adam(p, lr=0.08, betas=(0.8, 0.99))
    model.scheduler_factory = lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5)
    callback.next_stage("adam")
    trainer([callback], root, max_epochs=2).fit(model, loader(make_dataset(40)))
    return open_run(store)


def test_segments_follow_stages_and_checkpoints(two_stage_run) -> None:
    segments = plan_segments(two_stage_run, 3)
    assert [(s.stage, s.start, s.end) for s in segments] == [
        (0, 0, 5),
        (0, 5, 11),
        (0, 11, 16),
        (1, 16, 19),
        (1, 19, 23),
        (1, 23, 26),
    ]
    assert [[c.step for c in s.checkpoints] for s in segments] == [
        [0, 3],
        [5, 8],
        [11, 13],
        [16, 18],
        [19, 21],
        [23, 24],
    ]
    assert all(c.role != "stage-end" for s in segments for c in s.checkpoints)


def test_lr_mass_sgd_momentum_closed_form(two_stage_run) -> None:
    no_tail = plan_segments(two_stage_run, 3, momentum_tail=False)
    # η(1−d)/(1−β) = 0.1 · 0.5 / 0.1 = 0.5 per step
    np.testing.assert_allclose([s.lr_mass[0] for s in no_tail[:3]], [2.5, 3.0, 2.5])
    tail = plan_segments(two_stage_run, 3)
    # the gradient of step t has n = 16 − t steps left: (1 − 0.9^n) of the full 0.5
    full = [0.5 * (1 - 0.9 ** (16 - t)) for t in range(16)]
    np.testing.assert_allclose(
        [s.lr_mass[0] for s in tail[:3]], [sum(full[0:5]), sum(full[5:11]), sum(full[11:16])]
    )


def test_lr_mass_adam_closed_form(two_stage_run) -> None:
    lrs = [0.08 * 0.5 ** (k // 2) for k in range(10)]  # StepLR(2, 0.5), as used per step
    np.testing.assert_allclose(two_stage_run.learning_rates()[16:, 0], lrs)
    no_tail = plan_segments(two_stage_run, 3, momentum_tail=False)
    np.testing.assert_allclose(
        [s.lr_mass[0] for s in no_tail[3:]], [sum(lrs[0:3]), sum(lrs[3:7]), sum(lrs[7:10])]
    )
    tail = plan_segments(two_stage_run, 3)
    cut = [lr * (1 - 0.8 ** (10 - k)) for k, lr in enumerate(lrs)]
    np.testing.assert_allclose(
        [s.lr_mass[0] for s in tail[3:]], [sum(cut[0:3]), sum(cut[3:7]), sum(cut[7:10])]
    )


def test_explicit_boundaries_and_per_stage_counts(two_stage_run) -> None:
    segments = plan_segments(two_stage_run, {"sgd": [8], "adam": 1})
    assert [(s.start, s.end) for s in segments] == [(0, 8), (8, 16), (16, 26)]
    assert len(segments[2].checkpoints) == 6


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (10, "holds no committed checkpoint"),
        (30, "fewer than the 30 segments"),
        ({"sgd": [0]}, "strictly inside"),
        ({"sgd": [20]}, "strictly inside"),
        ({"pretrain": 2}, r"not in the record; recorded stages: \['sgd', 'adam'\]"),
    ],
)
def test_bad_segment_requests(two_stage_run, spec, message) -> None:
    with pytest.raises(AnalysisError, match=message):
        plan_segments(two_stage_run, spec)


def test_unknown_optimizer_needs_an_explicit_model(tmp_path) -> None:
    model = TinyClassifier(optimizer=lambda p: torch.optim.RMSprop(p, lr=0.01))
    with pytest.warns(UserWarning, match="unknown"):
        trainer([SourceCallback(tmp_path / "r.zarr")], tmp_path, max_epochs=1).fit(
            model, loader(make_dataset(32))
        )
    run = open_run(tmp_path / "r.zarr")
    with pytest.raises(UnsupportedOptimizerError, match=r"RMSprop.*optimizer_model='sgd'"):
        plan_segments(run, 1)
    (segment,) = plan_segments(run, 1, optimizer_model="sgd")
    assert segment.lr_mass[0] == pytest.approx(4 * 0.01)
