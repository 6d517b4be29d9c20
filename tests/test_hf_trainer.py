"""SourceTrainerCallback on a real Hugging Face ``Trainer`` (CPU, a tiny Llama from a config).

What lands in the store is checked against the Trainer itself (its per-step log of the
learning rate and loss), a replay of its scheduler, snapshots of the model and optimizer taken
in the Trainer's own hooks, an uninterrupted run (resume), and the same two-stage run recorded
by Lightning (stages recorded by either framework, mixed in one store, analyze alike).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hf_models import LabelledSequences, SameNames, seeded_llama, trainer_arguments
from storeutil import assert_same_record
from torch.utils.data import DataLoader

from source_callback import (
    InterruptedStageError,
    SourceCallback,
    SourceCallbackError,
    SourceTrainerCallback,
    analyze,
    open_run,
)
from source_callback.cli import summarize

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import Trainer, TrainerCallback  # noqa: E402

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class Snapshots(TrainerCallback):
    """Ground truth: parameters and optimizer state before every step and at the end."""

    def __init__(self) -> None:
        self.before: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}

    @staticmethod
    def _grab(model, optimizer) -> dict[str, Any]:
        names = {id(p): n for n, p in model.named_parameters()}
        return {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "state": {names[id(p)]: copy.deepcopy(s) for p, s in optimizer.optimizer.state.items()},
        }

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.before.append(self._grab(model, optimizer))

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.final = self._grab(model, optimizer)


# -- two stages on the Trainer's defaults (AdamW, two parameter groups, warmup) --------------


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_stages")
    store = root / "run.zarr"
    model = seeded_llama()
    callback = SourceTrainerCallback(store, stage="pretrain", checkpoints_per_stage=3)
    snapshots, histories = [Snapshots(), Snapshots()], []
    stages = [
        (LabelledSequences(20, seed=1), {"num_train_epochs": 2, "gradient_accumulation_steps": 2,
                                         "lr_scheduler_type": "cosine", "warmup_steps": 2,
                                         "weight_decay": 0.1}),
        (LabelledSequences(12, seed=2), {"learning_rate": 0.005, "lr_scheduler_type": "linear"}),
    ]  # fmt: skip
    for k, (data, settings) in enumerate(stages):
        if k:
            callback.next_stage("sft")
        args = trainer_arguments(
            root / f"out{k}", logging_strategy="steps", logging_steps=1, **settings
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=data, callbacks=[callback, snapshots[k]]
        )
        trainer.train()
        histories.append([e for e in trainer.state.log_history if "learning_rate" in e])
    return open_run(store), snapshots, histories


def test_learning_rates_are_the_ones_each_step_used(two_stages) -> None:
    run, _, histories = two_stages
    lrs = run.learning_rates()
    assert lrs.shape == (9, 2)  # the Trainer's two groups: with and without weight decay
    # The Trainer logs the rate after the optimizer step and before the scheduler's.
    logged = [e["learning_rate"] for history in histories for e in history]
    np.testing.assert_allclose(lrs[:, 0], logged, rtol=1e-12)
    np.testing.assert_array_equal(lrs[:, 0], lrs[:, 1])
    # Replayed schedules: cosine with 2 warmup steps over 6, then linear decay over 3.
    opt = torch.optim.AdamW([torch.zeros(1)], lr=0.01)
    cosine = transformers.get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=6)
    expected = []
    for _ in range(6):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    expected += [0.005 * (1 - k / 3) for k in range(3)]
    assert lrs[0, 0] == 0.0  # warmup starts at 0: the first step's rate, not the second's
    np.testing.assert_allclose(lrs[:, 0], expected, rtol=1e-12, atol=1e-15)
    steps = run.steps()
    np.testing.assert_allclose(steps["weight_decay"], [[0.1, 0.0]] * 6 + [[0.0, 0.0]] * 3)
    np.testing.assert_allclose(steps["beta2"], 0.999)


def test_one_row_per_optimizer_step_with_its_examples_and_loss(two_stages) -> None:
    run, _, histories = two_stages
    steps = run.steps()
    # 20 examples in batches of 4, two per step: 8 8 4 per epoch (the last step is short).
    assert steps["examples"].tolist() == [8, 8, 4, 8, 8, 4, 4, 4, 4]
    assert steps["epoch"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert steps["stage"].tolist() == [0] * 6 + [1] * 3
    logged = [e["loss"] for history in histories for e in history]
    np.testing.assert_allclose(steps["loss"], logged, rtol=1e-5)
    pretrain, sft = run.stages
    assert (pretrain.first_step, pretrain.last_step, sft.first_step, sft.last_step) == (0, 5, 6, 8)
    assert (pretrain.accumulate_grad_batches, pretrain.batch_size, pretrain.world_size) == (2, 4, 1)
    assert (pretrain.num_examples, sft.num_examples) == (20, 12)
    assert pretrain.fingerprint != sft.fingerprint
    assert pretrain.planned_checkpoints == [2, 4] and sft.planned_checkpoints == [7, 8]
    assert pretrain.recorded_by == sft.recorded_by == "transformers"
    assert pretrain.precision == "32-true" and pretrain.estimated_steps == 6
    assert pretrain.optimizer.class_name == "torch.optim.adamw.AdamW"
    assert pretrain.probe is None and run.status == "complete"


def test_checkpoints_hold_the_parameters_and_adam_state(two_stages) -> None:
    run, snapshots, _ = two_stages
    layout = [(c.step, c.stage, c.role) for c in run.checkpoints]
    assert layout == [
        (0, 0, "stage-start"),
        (2, 0, "interior"),
        (4, 0, "interior"),
        (6, 0, "stage-end"),
        (6, 1, "stage-start"),
        (7, 1, "interior"),
        (8, 1, "interior"),
        (9, 1, "stage-end"),
    ]
    for checkpoint in run.checkpoints:
        assert checkpoint.committed
        snaps = snapshots[checkpoint.stage]
        local = checkpoint.step - run.stages[checkpoint.stage].first_step
        truth = snaps.final if checkpoint.role == "stage-end" else snaps.before[local]
        params = checkpoint.params()
        assert params.keys() == truth["params"].keys()
        for name, value in truth["params"].items():
            assert torch.equal(params[name], value), name
        state = checkpoint.optimizer_state()
        if checkpoint.role == "stage-start":
            assert state == {}  # each train() builds a new optimizer
            continue
        assert state.keys() == truth["state"].keys()
        for name, values in truth["state"].items():
            assert set(state[name]) == {"exp_avg_sq", "step"}
            assert torch.equal(state[name]["exp_avg_sq"], values["exp_avg_sq"]), name
            assert state[name]["step"].item() == values["step"].item()


# -- resume from a Trainer checkpoint after a crash ------------------------------------------


class CrashAt(TrainerCallback):
    """Raise when the given optimizer step is about to start."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def _train_resumable(out, callbacks, resume=None) -> None:
    """12 steps (24 examples, batches of 4, 2 epochs); a Trainer checkpoint every 4 steps."""
    args = trainer_arguments(
        out,
        num_train_epochs=2,
        lr_scheduler_type="linear",
        warmup_steps=3,
        save_strategy="steps",
        save_steps=4,
    )
    trainer = Trainer(
        model=seeded_llama(),
        args=args,
        train_dataset=LabelledSequences(24, seed=3),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)


def test_resume_from_a_trainer_checkpoint_equals_the_uninterrupted_run(tmp_path) -> None:
    reference = tmp_path / "reference.zarr"
    _train_resumable(tmp_path / "ref", [SourceTrainerCallback(reference, stage="lm")])

    store = tmp_path / "run.zarr"
    callback = SourceTrainerCallback(store, stage="lm")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train_resumable(tmp_path / "out", [callback, CrashAt(9)])  # checkpoints at 4 and 8
    callback.close()  # the Trainer has no hook for exceptions
    crashed, ref = open_run(store), open_run(reference)
    assert crashed.status == "recording" and not crashed.stages[0].complete
    assert crashed.num_steps == 9  # every step up to the crash, although the last save was at 8
    committed = [c for c in crashed.checkpoints if c.committed]
    assert [c.step for c in committed] == [0, 2, 4, 6, 8]
    for ours, theirs in zip(committed, ref.checkpoints, strict=False):
        for name, tensor in theirs.params().items():
            torch.testing.assert_close(ours.params()[name], tensor, rtol=0, atol=0)

    with pytest.raises(InterruptedStageError, match="resume_from_checkpoint"):
        _train_resumable(tmp_path / "other", [SourceTrainerCallback(store, stage="other")])

    # A new process: a new callback and model, the Trainer checkpoint of step 8 (mid-epoch).
    _train_resumable(
        tmp_path / "out",
        [SourceTrainerCallback(store, stage="lm")],
        resume=str(tmp_path / "out" / "checkpoint-8"),
    )
    run = open_run(store)
    assert run.status == "complete" and run.num_steps == 12
    assert_same_record(run, ref)


def test_label_smoothing_is_named_as_why_no_probe_is_recorded(tmp_path) -> None:
    args = trainer_arguments(tmp_path, label_smoothing_factor=0.1)
    callback = SourceTrainerCallback(tmp_path / "run.zarr", stage="s")
    trainer = Trainer(model=seeded_llama(), args=args, train_dataset=LabelledSequences(8, seed=1),
                      callbacks=[callback])  # fmt: skip
    reason = r"stage 's' from here on: the Trainer's loss with label smoothing \(label_smoo"
    with pytest.warns(UserWarning, match=reason):
        trainer.train()
    run = open_run(tmp_path / "run.zarr")
    assert all(c.probe() is None for c in run.checkpoints)
    assert "no probe in stage 's': the Trainer's loss with label smoothing" in summarize(run)


def test_fp16_without_a_loss_scaler_is_recorded_as_the_precision_it_trained_in(tmp_path) -> None:
    """On a CPU accelerate neither autocasts nor scales for fp16=True: the run is float32."""
    args = trainer_arguments(tmp_path, fp16=True)
    callback = SourceTrainerCallback(tmp_path / "run.zarr", stage="s")
    Trainer(model=seeded_llama(), args=args, train_dataset=LabelledSequences(8, seed=1),
            callbacks=[callback]).train()  # fmt: skip
    assert open_run(tmp_path / "run.zarr").stages[0].precision == "32-true"


def test_load_best_model_at_end_is_refused(tmp_path) -> None:
    args = trainer_arguments(
        tmp_path,
        load_best_model_at_end=True,
        eval_strategy="steps",
        save_strategy="steps",
        metric_for_best_model="loss",
    )
    data = LabelledSequences(8, seed=1)
    trainer = Trainer(
        model=seeded_llama(),
        args=args,
        train_dataset=data,
        eval_dataset=data,
        callbacks=[SourceTrainerCallback(tmp_path / "run.zarr")],
    )
    with pytest.raises(SourceCallbackError, match="load_best_model_at_end"):
        trainer.train()
    assert not (tmp_path / "run.zarr").exists()


# -- the same run recorded by either framework ----------------------------------------------

PRETRAIN, SFT, QUERIES = LabelledSequences(16, seed=1), LabelledSequences(8, seed=2), 3


def _sgd(params):
    return torch.optim.SGD(params, lr=0.3, momentum=0.9)


def _decay(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)


def _record_stage(framework: str, lm, store, stage: str, data, epochs: int, out) -> None:
    """One stage, in order, SGD with momentum and a per-step decay, recorded by ``framework``."""
    if framework == "lightning":
        pl.Trainer(
            accelerator="cpu",
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[SourceCallback(store, stage=stage, checkpoints_per_stage=2)],
        ).fit(SameNames(lm, _sgd, _decay), DataLoader(data, batch_size=4))
        return
    optimizer = _sgd(lm.parameters())
    args = trainer_arguments(
        out, num_train_epochs=epochs, train_sampling_strategy="sequential", max_grad_norm=0.0
    )
    Trainer(
        model=lm,
        args=args,
        train_dataset=data,
        optimizers=(optimizer, _decay(optimizer)),
        callbacks=[SourceTrainerCallback(store, stage=stage, checkpoints_per_stage=2)],
    ).train()


def _record(root, frameworks: tuple[str, str]):
    store = root / "-".join(frameworks) / "run.zarr"
    lm = seeded_llama()
    _record_stage(frameworks[0], lm, store, "pretrain", PRETRAIN, 2, root / "out0")
    _record_stage(frameworks[1], lm, store, "sft", SFT, 1, root / "out1")
    result = analyze(
        store,
        model=seeded_llama(),
        task="language_modeling",
        train={"pretrain": PRETRAIN, "sft": SFT},
        queries=LabelledSequences(QUERIES, seed=9),
        segments=1,
        batch_size=8,
        name=None,
        verbose=False,
    )
    return open_run(store), result


@pytest.fixture(scope="module")
def lightning_only(tmp_path_factory):
    return _record(tmp_path_factory.mktemp("lightning"), ("lightning", "lightning"))


@pytest.mark.parametrize(
    "frameworks",
    [
        ("transformers", "transformers"),
        ("lightning", "transformers"),
        ("transformers", "lightning"),
    ],
)
def test_either_framework_records_the_same_run_and_analyze_does_not_care(
    tmp_path, lightning_only, frameworks
) -> None:
    reference, expected = lightning_only
    run, result = _record(tmp_path, frameworks)
    assert [s.recorded_by for s in run.stages] == list(frameworks)
    assert [(s.name, s.first_step, s.last_step) for s in run.stages] == [
        (s.name, s.first_step, s.last_step) for s in reference.stages
    ]
    assert [s.planned_checkpoints for s in run.stages] == [
        s.planned_checkpoints for s in reference.stages
    ]
    steps, ref_steps = run.steps(), reference.steps()
    for name in ("lr", "momentum", "examples", "stage"):
        np.testing.assert_allclose(steps[name], ref_steps[name], rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(steps["loss"], ref_steps["loss"], rtol=1e-5)
    assert [c.key for c in run.checkpoints] == [c.key for c in reference.checkpoints]
    for ours, theirs in zip(run.checkpoints, reference.checkpoints, strict=True):
        for name, tensor in theirs.params().items():
            torch.testing.assert_close(ours.params()[name], tensor, rtol=1e-5, atol=1e-6)
        for name, values in theirs.optimizer_state().items():
            torch.testing.assert_close(
                ours.optimizer_state()[name]["momentum_buffer"],
                values["momentum_buffer"],
                rtol=1e-4,
                atol=1e-6,
            )
    scores, ref_scores = result.scores, expected.scores
    assert scores.keys() == ref_scores.keys() == {"pretrain", "sft"}
    for stage in scores:
        assert np.abs(ref_scores[stage]).max() > 0
        np.testing.assert_allclose(scores[stage], ref_scores[stage], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(result.stage_effects, expected.stage_effects, rtol=1e-3, atol=1e-6)
