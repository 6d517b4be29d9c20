"""The progress of a whole analysis: the passes and batches it plans are the ones it runs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from models import TinyClassifier, adamw, loader, query_set, sgd_momentum, trainer, two_stage_sets

from source_callback import SourceCallback, analyze
from source_callback.analysis.progress import Progress

#: The bar over the whole analysis: pass at, passes planned, batches done, batches planned.
OVERALL = re.compile(r"analysis, pass (\d+)/(\d+): +\d+%\|[^|]*\| (\d+)/(\d+) batches")


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two stages: SGD with momentum on the whole model (48 examples), then AdamW on the last
    layer only (40 examples), four checkpoints each."""
    root = tmp_path_factory.mktemp("progress")
    path = root / "run.zarr"
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier(optimizer=sgd_momentum)
    callback = SourceCallback(path, stage="pretrain", checkpoints_per_stage=4)
    data = two_stage_sets()
    trainer([callback], root, max_epochs=2).fit(model, loader(data["pretrain"]))
    model.net[0].requires_grad_(False)
    model.optimizer_factory = adamw
    callback.next_stage("finetune")
    trainer([callback], root, max_epochs=2).fit(model, loader(data["finetune"]))
    return path


@pytest.fixture
def store(record: Path, tmp_path: Path) -> Path:
    """A copy of the record, for the analyses that write into it."""
    copy = tmp_path / "run.zarr"
    shutil.copytree(record, copy)
    return copy


def _analyze(store: Path, capsys: pytest.CaptureFixture[str], **kwargs: Any) -> tuple[int, ...]:
    """Analyze ``store``; the overall bar's pass, passes, batches done and planned at its end."""
    analyze(
        store,
        model=TinyClassifier(),
        task="classification",
        train=two_stage_sets(),
        queries=query_set(),
        segments=2,
        batch_size=16,  # 48 and 40 examples: batches of 16, 16, 16 and 16, 16, 8
        **kwargs,
    )
    err = capsys.readouterr().err
    return tuple(int(n) for n in OVERALL.findall(err)[-1])


@pytest.mark.parametrize(
    "settings",
    [
        {"name": None},
        {"name": None, "diagonal_above": 1},  # no Kronecker factor to fit: no factor passes
        {"name": None, "method": "fast-source", "adam_variant": "diagonal"},
        {"name": None, "method": "if"},
        {"name": None, "method": "tracin"},
        {"out_of_core": True},
        {"name": None, "curvature_examples": 0.5},
        {"name": None, "method": "if", "curvature_examples": 30},
    ],
    ids=["source", "diagonal", "fast-source", "if", "tracin", "out-of-core", "subset", "if-subset"],
)
def test_the_plan_is_what_runs(store: Path, capsys, settings: dict[str, Any]) -> None:
    at, passes, done, planned = _analyze(store, capsys, **settings)
    assert (at, done) == (passes, planned)
    assert passes >= 3  # at least the query gradients and the two measurements


def test_passes_a_cache_serves_are_not_planned(store: Path, capsys) -> None:
    built = _analyze(store, capsys, cache="projected")
    assert built[0] == built[1] and built[2] == built[3]
    # reused: the query gradients and the two measurements, one batch each (3 queries)
    assert _analyze(store, capsys, cache="projected") == (3, 3, 3, 3)
    assert built[3] > 3
    # a curvature fitted on other examples is not the cached one: fitted again, in fewer batches
    refitted = _analyze(store, capsys, cache="projected", curvature_examples=0.5)
    assert 3 < refitted[3] < built[3]


def test_nothing_is_shown_without_verbose(record: Path, capsys) -> None:
    analyze(
        record,
        model=TinyClassifier(),
        task="classification",
        train=two_stage_sets(),
        queries=query_set(),
        name=None,
        verbose=False,
    )
    assert capsys.readouterr() == ("", "")


def test_time_left_weighs_each_kind_of_pass_by_its_own_time_per_batch(capsys) -> None:
    """A kind of pass measured is estimated at its own pace; one not yet run at the mean."""
    now = [0.0]
    progress = Progress(shown=True, clock=lambda: now[0])
    with progress:
        progress.plan([("factors", 2), ("scores", 2), ("factors", 2)])
        assert progress.time_left() is None  # nothing measured yet: shown as "?"
        with progress.data_pass("segment 1/1 factors 1/2", 2) as advance:
            for _ in range(2):
                now[0] += 1.0  # a factor batch takes 1 s
                advance()
        assert progress.time_left() == 2 * 1.0 + 2 * 1.0  # scores unmeasured: the mean
        with progress.data_pass("segment 1/1 scores 1/1", 2) as advance:
            now[0] += 4.0  # a scoring batch takes 4 s
            advance()
            assert progress.time_left() == 1 * 4.0 + 2 * 1.0
            now[0] += 4.0
            advance()
        assert progress.time_left() == 2 * 1.0
        with progress.data_pass("segment 1/1 factors 2/2", 2) as advance:
            now[0] += 2.0  # the pause before it (an eigendecomposition) counts here
            advance()
            assert progress.time_left() == 1 * (4.0 / 3)  # 1 s, 1 s, then 2 s
            now[0] += 1.0
            advance()
        assert progress.time_left() == 0.0
    shown = capsys.readouterr().err
    assert "batches [00:00<?]" in shown  # the bar as planned, before any batch
    assert OVERALL.findall(shown)[-1] == ("3", "3", "6", "6")
