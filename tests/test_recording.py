"""SourceCallback on real Lightning training (CPU, tiny models): what lands in the store."""

from __future__ import annotations

import copy
import math
import threading
import time
import weakref
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from models import TinyClassifier, loader, make_dataset, trainer

from source_callback import SourceCallback, SourceCallbackError, open_run
from source_callback.optim import UpdateRule, WeightDecay
from source_callback.record.recorder import Recorder
from source_callback.store import schema
from source_callback.store.writer import StoreWriter


class Snapshots(pl.Callback):
    """Test-side ground truth: model and optimizer state before every step, rates as used."""

    def __init__(self) -> None:
        self.before: list[dict[str, Any]] = []
        self.lrs: list[list[float]] = []
        self.final: dict[str, Any] = {}

    @staticmethod
    def _grab(pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        return {
            "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in pl_module.named_buffers()},
            "state": {names[id(p)]: copy.deepcopy(s) for p, s in optimizer.state.items()},
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before.append(self._grab(pl_module, trainer.optimizers[0]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append([g["lr"] for g in optimizer.param_groups])

    def on_train_end(self, trainer, pl_module) -> None:
        self.final = self._grab(pl_module, trainer.optimizers[0])


def scheduler_lrs(model: TinyClassifier, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Replay the model's optimizer + scheduler without training: lr and β1 before each step."""
    fresh = TinyClassifier(
        optimizer=model.optimizer_factory, scheduler=model.scheduler_factory
    ).configure_optimizers()
    optimizer, scheduler = fresh["optimizer"], fresh["lr_scheduler"]["scheduler"]
    lrs, momenta = [], []
    for _ in range(steps):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        momenta.append(
            [g["betas"][0] if "betas" in g else g.get("momentum") for g in optimizer.param_groups]
        )
        optimizer.step()
        scheduler.step()
    return np.array(lrs), np.array(momenta, dtype=float)


def two_groups(factory):
    """Optimizer factory with two param groups of different base rates."""

    def make(params):
        params = list(params)
        return factory([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}])

    return make


def warmup_cosine(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)


def test_learning_rates_follow_warmup_cosine_step_by_step(tmp_path) -> None:
    model = TinyClassifier(
        optimizer=two_groups(lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.1)),
        scheduler=warmup_cosine(total=24, warmup=5),
    )
    trainer([SourceCallback(tmp_path / "run.zarr")], tmp_path, max_epochs=3).fit(
        model, loader(make_dataset(64))
    )
    run = open_run(tmp_path / "run.zarr")
    expected, _ = scheduler_lrs(model, 24)
    assert run.num_steps == 24
    np.testing.assert_allclose(run.learning_rates(), expected, rtol=0, atol=1e-15)
    steps = run.steps()
    np.testing.assert_allclose(steps["weight_decay"], 0.1)
    np.testing.assert_allclose(steps["beta2"], 0.999)
    assert run.stages[0].optimizer.update_rule is UpdateRule.ADAMW
    assert run.stages[0].optimizer.weight_decay is WeightDecay.DECOUPLED


def test_one_cycle_records_changing_momentum(tmp_path) -> None:
    total = 16
    model = TinyClassifier(
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        scheduler=lambda opt: torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.5, total_steps=total
        ),
    )
    trainer([SourceCallback(tmp_path / "run.zarr")], tmp_path).fit(model, loader(make_dataset(64)))
    run = open_run(tmp_path / "run.zarr")
    expected_lr, expected_momentum = scheduler_lrs(model, total)
    np.testing.assert_allclose(run.learning_rates(), expected_lr, rtol=1e-12)
    np.testing.assert_allclose(run.steps()["momentum"], expected_momentum, rtol=1e-12)
    assert np.ptp(expected_momentum) > 0.05  # the schedule really moved momentum
    np.testing.assert_allclose(run.steps()["dampening"], 0.0)


def test_epoch_interval_scheduler(tmp_path) -> None:
    model = TinyClassifier(
        optimizer=lambda p: torch.optim.SGD(p, lr=0.2),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        scheduler_interval="epoch",
    )
    trainer([SourceCallback(tmp_path / "run.zarr")], tmp_path, max_epochs=3).fit(
        model, loader(make_dataset(40))
    )
    run = open_run(tmp_path / "run.zarr")
    epochs = run.steps()["epoch"]
    assert epochs.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    np.testing.assert_allclose(run.learning_rates()[:, 0], 0.2 * 0.5**epochs)


def test_gradient_accumulation_one_row_per_optimizer_step(tmp_path) -> None:
    # lr = 0 keeps the parameters fixed, so each step's loss is computable independently.
    model = TinyClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    data = make_dataset(36)  # batches of 8: 8 8 8 8 4
    trainer(
        [SourceCallback(tmp_path / "run.zarr")], tmp_path, max_epochs=1, accumulate_grad_batches=2
    ).fit(model, loader(data))
    run = open_run(tmp_path / "run.zarr")
    assert run.num_steps == 3  # groups {0,1} {2,3} {4}: the incomplete last group steps too
    assert run.steps()["examples"].tolist() == [16, 16, 4]
    with torch.no_grad():
        batch_losses = [
            torch.nn.functional.cross_entropy(model(x), y).item() for x, y in loader(data)
        ]
    expected = [np.mean(batch_losses[0:2]), np.mean(batch_losses[2:4]), batch_losses[4]]
    np.testing.assert_allclose(run.steps()["loss"], expected, rtol=1e-6)
    stage = run.stages[0]
    assert (stage.accumulate_grad_batches, stage.batch_size, stage.num_examples) == (2, 8, 36)


def test_two_stages_checkpoints_equal_optimizer_state(tmp_path) -> None:
    """SGD+momentum then Adam: params and optimizer state at every checkpoint are exact."""
    store = tmp_path / "run.zarr"
    callback = SourceCallback(store, stage="pretrain", checkpoints_per_stage=4)
    model = TinyClassifier(
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
        batchnorm=True,
    )
    first, second = Snapshots(), Snapshots()
    trainer([callback, first], tmp_path, max_epochs=2).fit(model, loader(make_dataset(64)))
    model.optimizer_factory = lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4)
    callback.next_stage("finetune")
    finetune = make_dataset(40, seed=1)
    trainer([callback, second], tmp_path, max_epochs=3).fit(model, loader(finetune))

    run = open_run(store)
    assert run.status == "complete"
    pre, fine = run.stages
    assert (pre.name, pre.first_step, pre.last_step, pre.num_examples) == ("pretrain", 0, 15, 64)
    assert (fine.name, fine.first_step, fine.last_step, fine.num_examples) == (
        "finetune",
        16,
        30,
        40,
    )
    assert pre.complete and fine.complete and fine.num_steps == 15
    assert pre.optimizer.update_rule is UpdateRule.SGD_MOMENTUM
    assert fine.optimizer.update_rule is UpdateRule.ADAM
    assert fine.optimizer.weight_decay is WeightDecay.COUPLED
    assert run.optimizer == fine.optimizer
    assert pre.planned_checkpoints == [4, 8, 12] and fine.planned_checkpoints == [20, 24, 27]
    assert run.steps()["stage"].tolist() == [0] * 16 + [1] * 15
    assert fine.fingerprint != pre.fingerprint and len(fine.fingerprint) == 32

    roles = [(c.step, c.stage, c.role) for c in run.checkpoints]
    assert roles == [
        (0, 0, "stage-start"),
        (4, 0, "interior"),
        (8, 0, "interior"),
        (12, 0, "interior"),
        (16, 0, "stage-end"),
        (16, 1, "stage-start"),
        (20, 1, "interior"),
        (24, 1, "interior"),
        (27, 1, "interior"),
        (31, 1, "stage-end"),
    ]
    assert all(c.committed for c in run.checkpoints)
    for checkpoint in run.checkpoints:
        snaps = first if checkpoint.stage == 0 else second
        local = checkpoint.step - run.stages[checkpoint.stage].first_step
        truth = snaps.final if checkpoint.role == "stage-end" else snaps.before[local]
        _assert_tensors_equal(checkpoint.params(), truth["params"])
        _assert_tensors_equal(checkpoint.buffers(), truth["buffers"])
        state = checkpoint.optimizer_state()
        if checkpoint.role == "stage-start":
            assert state == {}
            continue
        for name, values in truth["state"].items():
            if checkpoint.stage == 0:
                assert set(state[name]) == {"momentum_buffer"}
                assert torch.equal(state[name]["momentum_buffer"], values["momentum_buffer"])
            else:
                assert set(state[name]) == {"exp_avg_sq", "step"}
                assert torch.equal(state[name]["exp_avg_sq"], values["exp_avg_sq"])
                assert state[name]["step"].item() == values["step"].item()
    # learning rates as used, from the snapshots taken in the optimizer hook
    np.testing.assert_allclose(run.learning_rates(), first.lrs + second.lrs)


def _assert_tensors_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), name


class _SpareBuffers(pl.Callback):
    """Where the recorder's reusable checkpoint buffers are at the start of batch ``batch``."""

    def __init__(self, source: SourceCallback, batch: int) -> None:
        self.source, self.batch = source, batch
        self.pointers: dict[str, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            recorder = self.source._session.recorder
            recorder.wait()
            self.pointers = {k: b.data_ptr() for k, b in recorder._spare.items()}


def test_first_interior_checkpoint_fills_buffers_allocated_after_the_first_step(tmp_path) -> None:
    """The stage-start checkpoint has no Adam state; its buffers are allocated in the background
    after the first step, not by the first interior checkpoint on the training thread."""
    callback = SourceCallback(tmp_path / "run.zarr", checkpoints_per_stage=2)
    model = TinyClassifier(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    # The stage has 8 steps, so its interior checkpoint is before step 4 (batch 4).
    before, after = _SpareBuffers(callback, 4), _SpareBuffers(callback, 4)
    trainer([before, callback, after], tmp_path, max_epochs=1).fit(model, loader(make_dataset()))
    run = open_run(tmp_path / "run.zarr")
    assert [c.step for c in run.checkpoints if c.role == "interior"] == [4]
    assert any("exp_avg_sq" in key for key in before.pointers), before.pointers
    # The same memory, refilled (the probe's few values get their own small buffers).
    assert {k: after.pointers[k] for k in before.pointers} == before.pointers
    state = run.checkpoints[1].optimizer_state()
    assert all(values["exp_avg_sq"].abs().sum() > 0 for values in state.values())


class _CopyCountingWriter(StoreWriter):
    """A store's writer that notes how many checkpoint copies are alive as each is written."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.copies: list[weakref.ref[torch.Tensor]] = []
        self.alive: list[int] = []

    def count(self) -> int:
        return len({id(copy()) for copy in self.copies if copy() is not None})

    def write_checkpoint(self, step: int, role: str, stage: int, snapshot: Any) -> str:
        self.copies += [weakref.ref(buffer) for buffer in snapshot.buffers.values()]
        self.alive.append(self.count())
        return super().write_checkpoint(step, role, stage, snapshot)


@pytest.mark.parametrize("max_snapshots", [1, 2])
def test_checkpoints_taken_during_slow_writes_hold_at_most_max_snapshots_copies(
    tmp_path, max_snapshots: int
) -> None:
    """Each write waits 0.2 s behind the writer thread (slow storage): the next checkpoint is
    copied into other buffers while fewer than ``max_snapshots`` copies are held, and else
    waits to refill the last one's."""
    url = str(tmp_path / "run.zarr")
    writer = _CopyCountingWriter.open(url)
    recorder = Recorder(writer, max_snapshots=max_snapshots)
    weight = torch.zeros(1000)
    for step in range(5):
        weight.fill_(step)
        recorder._submit(recorder._checkpoint_thread, time.sleep, 0.2)
        recorder.checkpoint(step, schema.ROLE_INTERIOR, {"w": weight}, {}, {})
        writer.alive.append(writer.count())
    recorder.close()
    assert max(writer.alive) == max_snapshots, writer.alive
    # No copy was refilled before its write: every checkpoint holds its own step's values.
    run = open_run(url)
    assert [c.step for c in run.checkpoints] == list(range(5))
    for checkpoint in run.checkpoints:
        values = checkpoint.params(include_frozen=False)["w"]
        assert torch.equal(values, torch.full((1000,), float(checkpoint.step)))


def test_new_callback_on_same_store_and_default_names(tmp_path) -> None:
    model = TinyClassifier()
    trainer([SourceCallback()], tmp_path, max_epochs=1).fit(model, loader(make_dataset(16)))
    trainer([SourceCallback()], tmp_path, max_epochs=1).fit(model, loader(make_dataset(24)))
    run = open_run(tmp_path / "source.zarr")  # default: under default_root_dir
    assert [(s.name, s.first_step, s.last_step) for s in run.stages] == [
        ("stage-0", 0, 1),
        ("stage-1", 2, 4),
    ]


def test_frozen_parameters_saved_once_per_stage(tmp_path) -> None:
    model = TinyClassifier(freeze_first=True)
    trainer([SourceCallback(tmp_path / "run.zarr")], tmp_path).fit(model, loader(make_dataset(32)))
    run = open_run(tmp_path / "run.zarr")
    stage = run.stages[0]
    assert stage.frozen == ["net.0.weight", "net.0.bias"]
    assert stage.trainable == ["net.2.weight", "net.2.bias"]
    last = run.checkpoints[-1]
    assert set(last.params(include_frozen=False)) == {"net.2.weight", "net.2.bias"}
    full = last.params()
    assert torch.equal(full["net.0.weight"], model.net[0].weight)
    assert torch.equal(full["net.2.weight"], model.net[2].weight)
    assert set(run.frozen_params(0)) == {"net.0.weight", "net.0.bias"}


def test_bfloat16_parameters_stay_bfloat16(tmp_path) -> None:
    model = TinyClassifier()
    trainer(
        [SourceCallback(tmp_path / "run.zarr")], tmp_path, max_epochs=1, precision="bf16-true"
    ).fit(model, loader(make_dataset(16)))
    run = open_run(tmp_path / "run.zarr")
    params = run.checkpoints[-1].params()
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    assert torch.equal(params["net.0.weight"], model.net[0].weight.detach())
    assert run.stages[0].precision == "bf16-true"
    assert {e["dtype"] for e in run.manifest} == {"torch.bfloat16"}


@pytest.mark.parametrize(
    ("optimizer", "eps"),
    [
        (torch.optim.Adagrad, 1e-10),
        (torch.optim.Adafactor, math.nan),  # a pair (None, 1e-3): it crashed the recording
    ],
)
def test_unknown_optimizer_is_recorded_with_a_warning(tmp_path, optimizer, eps) -> None:
    """Its learning rates and hyperparameters; one that is not one number is NaN."""
    model = TinyClassifier(optimizer=lambda p: optimizer(p, lr=0.1))
    with pytest.warns(UserWarning, match="optimizer_model"):
        trainer([SourceCallback(tmp_path / "run.zarr")], tmp_path, max_epochs=1).fit(
            model, loader(make_dataset(16))
        )
    run = open_run(tmp_path / "run.zarr")
    assert run.optimizer.update_rule is UpdateRule.UNKNOWN
    assert run.optimizer.class_name == f"{optimizer.__module__}.{optimizer.__qualname__}"
    assert run.num_steps == 2 and run.status == "complete"
    steps = run.steps()
    np.testing.assert_array_equal(steps["lr"], [[0.1], [0.1]])
    np.testing.assert_array_equal(steps["eps"], [[eps], [eps]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"checkpoints_per_stage": 0}, "checkpoints_per_stage"),
        ({"flush_every": 0}, "flush_every"),
        ({"stage": ""}, "stage name"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SourceCallback("x.zarr", **kwargs)


class TwoOptimizers(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        for optimizer in self.optimizers():
            optimizer.zero_grad()
            self.manual_backward(super().training_step(batch, batch_idx))
            optimizer.step()

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.1),
            torch.optim.SGD(self.net[2].parameters(), lr=0.1),
        ]


def test_several_optimizers_are_refused(tmp_path) -> None:
    with pytest.raises(SourceCallbackError, match="one optimizer; configure_optimizers"):
        trainer([SourceCallback(tmp_path / "run.zarr")], tmp_path, max_epochs=1).fit(
            TwoOptimizers(), loader(make_dataset(16))
        )


class _HeldRows(pl.Callback):
    """Holds every step-row write back until the interior checkpoint before ``batch`` is
    committed (waiting up to a minute for it), noting what the store held meanwhile."""

    def __init__(self, store: Any, batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.store, self.batch = store, batch
        self.release = threading.Event()
        self.started = 0
        self.seen: tuple[list[int], int, int] | None = None
        append = StoreWriter.append_steps

        def held(writer: StoreWriter, rows: Any) -> None:
            self.started += 1
            assert self.release.wait(120)
            append(writer, rows)

        monkeypatch.setattr(StoreWriter, "append_steps", held)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx != self.batch:
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            run = open_run(self.store)
            committed = [c.step for c in run.checkpoints if c.committed]
            if self.batch in committed:
                break
            time.sleep(0.05)
        self.seen = (committed, run.num_steps, self.started)
        self.release.set()


def test_checkpoints_are_not_queued_behind_step_rows(tmp_path, monkeypatch) -> None:
    """Step rows and checkpoints are written by separate threads: a slow write of rows does
    not hold up a checkpoint (the stage-end one would otherwise wait for the last rows). A
    stage's first row is written at once, and the stage closes only after both."""
    store = tmp_path / "run.zarr"
    held = _HeldRows(store, 4, monkeypatch)
    callback = SourceCallback(store, checkpoints_per_stage=2)
    trainer([callback, held], tmp_path, max_epochs=1).fit(TinyClassifier(), loader(make_dataset()))
    # The interior checkpoint before step 4 committed while the first row's write was held.
    assert held.seen == ([0, 4], 0, 1)
    run = open_run(store)
    assert run.status == "complete" and run.num_steps == 8
    assert [(c.step, c.role) for c in run.checkpoints] == [
        (0, "stage-start"),
        (4, "interior"),
        (8, "stage-end"),
    ]
    assert run.stages[0].last_step == 7
