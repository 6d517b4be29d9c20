"""The probe: training losses of a few examples per checkpoint, recomputed by analyze, retrain."""

from __future__ import annotations

import shutil
import signal
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from models import TinyClassifier, loader, make_dataset, trainer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from source_callback import AnalysisError, SourceCallback, analyze, open_run
from source_callback.analysis.task import ClassificationTask
from source_callback.evaluation import RetrainError, TaskMeasurement, retrain
from source_callback.fingerprint import sample_indices
from source_callback.record.probe import PROBE_SIZE, probe_indices
from source_callback.store import schema

DATA = make_dataset(64)
QUERIES = make_dataset(2, seed=9)


class ReLUClassifier(TinyClassifier):
    """The same parameter names and shapes as TinyClassifier, with ReLU instead of Tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.net[1] = nn.ReLU()


class Smoothed(TinyClassifier):
    """Trained with label smoothing: its training loss is not plain cross-entropy."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, label_smoothing=0.1)


class SmoothedTask(ClassificationTask):
    """The classification task, with the probe loss that Smoothed's training_step computes."""

    def probe_loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y, label_smoothing=0.1, reduction="none")


class Dropout(TinyClassifier):
    """Dropout between the layers, shuffled data, and a training_step that logs and counts."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def training_step(self, batch, batch_idx):
        self.seen += 1
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss


class Manual(TinyClassifier):
    """Manual optimization: its training_step steps the optimizer, so it cannot be probed."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        optimizer.step()


def _record(root, model: pl.LightningModule, data=DATA, **kwargs):
    store = root / "run.zarr"
    trainer([SourceCallback(store, stage="s", checkpoints_per_stage=2)], root, **kwargs).fit(
        model, loader(data, shuffle=True)
    )
    return store


def _analyze(store, model, task="classification", data=DATA):
    return analyze(
        store,
        model=model,
        task=task,
        train={"s": data},
        queries=QUERIES,
        segments=1,
        name=None,
        verbose=False,
    )


@pytest.fixture(scope="module")
def tanh_store(tmp_path_factory):
    torch.manual_seed(0)
    return _record(tmp_path_factory.mktemp("tanh"), TinyClassifier())


def test_every_checkpoint_holds_the_probe(tanh_store) -> None:
    run = open_run(tanh_store)
    indices = probe_indices(len(DATA))
    assert len(indices) == PROBE_SIZE and run.stages[0].probe is None
    model, x, y = TinyClassifier().eval(), *DATA.tensors
    for checkpoint in run.checkpoints:
        got, losses = checkpoint.probe()
        assert got.tolist() == indices and losses.dtype == np.float64
        model.load_state_dict(checkpoint.params())
        expected = [F.cross_entropy(model(x[[i]]), y[[i]]).item() for i in indices]
        np.testing.assert_allclose(losses, expected, rtol=1e-6)
    assert run.verify() == []


def test_another_activation_is_refused_by_analyze_and_retrain(tanh_store) -> None:
    message = r"stage 's'.*stage-start checkpoint \(step 0\)\. Example \d+ .*activation"
    with pytest.raises(AnalysisError, match=message):
        _analyze(tanh_store, ReLUClassifier())
    measure = TaskMeasurement(ClassificationTask(), QUERIES)
    with pytest.raises(RetrainError, match=message + r".*training_step"):
        retrain(tanh_store, module=ReLUClassifier, train={"s": DATA}, measure=measure)
    _analyze(tanh_store, TinyClassifier())  # the trained architecture passes


def test_labels_of_a_probed_example_are_refused_without_digests(tanh_store, tmp_path) -> None:
    # Without example digests (a store recorded before them) only the fingerprint of a sample
    # checks the data; the probe finds a relabelled example outside that sample.
    copy = tmp_path / "copy.zarr"
    shutil.copytree(tanh_store, copy)
    shutil.rmtree(copy / schema.EXAMPLES)
    index = next(i for i in probe_indices(len(DATA)) if i not in sample_indices(len(DATA)))
    x, y = DATA.tensors
    relabelled = y.clone()
    relabelled[index] = (relabelled[index] + 1) % 3
    with pytest.raises(AnalysisError, match=rf"Example {index} .*labels"):
        _analyze(copy, TinyClassifier(), data=TensorDataset(x, relabelled))


def test_a_task_other_than_the_training_loss_is_refused_and_probe_loss_settles_it(
    tmp_path,
) -> None:
    store = _record(tmp_path, Smoothed(), max_epochs=1)
    with pytest.raises(AnalysisError, match=r"ClassificationTask\.loss gives .*probe_loss"):
        _analyze(store, Smoothed())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning that something went unchecked
        _analyze(store, Smoothed(), task=SmoothedTask())


def test_dropout_is_recorded_and_analyzed_and_training_is_unchanged(tmp_path) -> None:
    runs = {}
    for recorded in (True, False):
        pl.seed_everything(3, verbose=False)
        model = Dropout()
        callbacks = [SourceCallback(tmp_path / "run.zarr", stage="s")] if recorded else []
        fit = trainer(callbacks, tmp_path / str(recorded), max_epochs=2)
        fit.fit(model, loader(DATA, shuffle=True))
        runs[recorded] = (model, fit.callback_metrics)
    # Bit-identical training (the probe's calls of training_step leave no count in ``seen``),
    # and the user's logged metrics untouched by the probe.
    for (name, ours), theirs in zip(
        runs[True][0].state_dict().items(), runs[False][0].state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs), name
    assert runs[True][1].keys() == runs[False][1].keys()
    for key, value in runs[True][1].items():
        assert torch.equal(value, runs[False][1][key]), key
    # eval mode: dropout is off in the probe, so the analysis reproduces it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _analyze(tmp_path / "run.zarr", Dropout())


def test_no_probe_with_manual_optimization_is_said_and_skipped(tmp_path) -> None:
    with pytest.warns(UserWarning, match=r"no probe losses for stage 's'.*manual optimization"):
        store = _record(tmp_path, Manual(), max_epochs=1)
    run = open_run(store)
    assert "manual optimization" in run.stages[0].probe
    assert all(c.probe() is None for c in run.checkpoints)
    with pytest.warns(UserWarning, match=r"no probe was recorded for stage 's' at step 0 \(.*man"):
        _analyze(store, ReLUClassifier())  # not caught: nothing to compare with


def test_a_damaged_probe_is_reported(tanh_store, tmp_path) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(tanh_store, copy)
    key = open_run(copy).checkpoints[-1].key
    array = copy / schema.CHECKPOINTS / key / f"{schema.SECTION_PROBE}.float64"
    chunk = next(p for p in array.rglob("c/*") if p.is_file())
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    assert [p.where for p in open_run(copy).verify()] == [f"checkpoint {key}"]


class FailsAtStageEnd(TinyClassifier):
    """Its forward raises ``error`` once ``broken`` is set (by :class:`Break`, at train end)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error, self.broken = error, False

    def forward(self, x):
        if self.broken:
            raise self.error
        return super().forward(x)


class Break(pl.Callback):
    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.broken = True


def _break_at_stage_end(root, error: BaseException):
    """Record a stage whose stage-end probe raises ``error``; the store and its checkpoints."""
    store = root / "run.zarr"
    callbacks = [Break(), SourceCallback(store, stage="s", checkpoints_per_stage=2)]
    trainer(callbacks, root, max_epochs=1).fit(FailsAtStageEnd(error), loader(DATA))
    return store


def test_a_probe_failing_at_stage_end_is_recorded_as_missing(tmp_path) -> None:
    """The stage-end probe runs while that checkpoint is written (after its copy); a failure
    is noted in the stage and that checkpoint is committed without a probe."""
    with pytest.warns(UserWarning, match=r"no probe losses.*forward broke"):
        store = _break_at_stage_end(tmp_path, RuntimeError("forward broke"))
    run = open_run(store)
    assert run.stages[0].status == schema.STAGE_COMPLETE and "forward broke" in run.stages[0].probe
    assert [(c.role, c.committed, c.probe() is None) for c in run.checkpoints] == [
        (schema.ROLE_START, True, False),
        (schema.ROLE_INTERIOR, True, False),
        (schema.ROLE_END, True, True),
    ]
    assert run.verify() == []


def test_an_interrupt_in_the_stage_end_probe_leaves_that_checkpoint_uncommitted(tmp_path):
    """Ctrl-C while the stage-end checkpoint is written: its write is not committed (rather
    than waiting for a probe that never comes), and what was committed before stays valid."""
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT from then on
    try:
        with pytest.raises(SystemExit):
            _break_at_stage_end(tmp_path, KeyboardInterrupt())
    finally:
        signal.signal(signal.SIGINT, handler)
    run = open_run(tmp_path / "run.zarr")
    assert run.stages[0].status == schema.STAGE_RECORDING
    assert [(c.step, c.role) for c in run.checkpoints if c.committed] == [
        (0, schema.ROLE_START),
        (4, schema.ROLE_INTERIOR),
    ]
    assert run.num_steps == 8 and run.verify() == []
