"""Optimizer steps fp16's loss scaler skipped (non-finite gradients): recorded with ``scale`` 0,
and the analysis takes neither their learning rate nor their weight decay.

fp16 mixed precision needs a GPU; the scaler (``torch.amp.GradScaler``) runs on CPU, given to
the framework as fp16 would. A scale of 2^20 (2^127 for float32 gradients) makes the first
steps overflow, as fp16's 65536 does on real models: the scaler halves itself after each.
"""

from __future__ import annotations

import os
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from models import TinyClassifier, loader, make_dataset, trainer

from source_callback import SourceCallback, SourceTrainerCallback, open_run
from source_callback.analysis.segments import plan_segments
from source_callback.cli import summarize


class Taken:
    """Ground truth: whether each step changed the parameters. (Not whether ``step`` ran: a
    fused optimizer runs, given the scaler's verdict, and skips inside.)"""

    def __init__(self) -> None:
        self.taken: list[bool] = []
        self._before: list[torch.Tensor] = []

    def step_begins(self, model: torch.nn.Module) -> None:
        self._before = [p.detach().clone() for p in model.parameters()]

    def step_ended(self, model: torch.nn.Module) -> None:
        pairs = zip(self._before, model.parameters(), strict=True)
        self.taken.append(any(not torch.equal(a, b) for a, b in pairs))


class LightningTaken(pl.Callback):
    def __init__(self) -> None:
        self.truth = Taken()

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        self.truth.step_begins(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.truth.step_ended(pl_module)


def test_lightning_steps_the_scaler_skipped_are_recorded_and_not_taken(tmp_path) -> None:
    taken = LightningTaken()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    fit = trainer(
        [SourceCallback(tmp_path / "run.zarr", stage="s"), taken],
        tmp_path,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    torch.manual_seed(0)
    model = TinyClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01))
    fit.fit(model, loader(make_dataset(64)))
    truth = np.array(taken.truth.taken)
    assert len(truth) == 16 and 0 < (~truth).sum() < 16
    run = open_run(tmp_path / "run.zarr")
    scale = run.steps()["scale"]
    np.testing.assert_array_equal(scale, truth.astype(float))
    assert f"  s  {(~truth).sum()} skipped (fp16's loss scaler) of 16 steps" in summarize(run)

    # The analysis: the rate and decay masses count the steps taken only.
    (segment,) = plan_segments(run, 1, momentum_tail=False)
    np.testing.assert_allclose(segment.lr_mass[0], 0.1 * truth.sum())
    np.testing.assert_allclose(segment.decay_mass[0], 0.1 * truth.sum())


def test_trainer_steps_the_scaler_skipped_are_recorded(tmp_path) -> None:
    """With the Trainer's clipping binding on the steps taken: their factor is against the
    unscaled gradients (measured times a loss scale of 2^127, in float64); a skipped step's
    gradients are not finite, and it is not counted as clipped by an unknown factor."""
    transformers = pytest.importorskip("transformers")
    from hf_models import LabelledSequences, loss_scaled_trainer, seeded_llama, trainer_arguments

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    truth = Taken()

    class Watch(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs) -> None:
            truth.step_begins(model)

        def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
            truth.step_ended(model)

    limit = 0.5  # below every step's norm here
    args = trainer_arguments(tmp_path / "out", max_grad_norm=limit, num_train_epochs=2,
                             logging_strategy="steps", logging_steps=1)  # fmt: skip
    callback = SourceTrainerCallback(tmp_path / "run.zarr", stage="s")
    run = loss_scaled_trainer(2.0**127)(
        model=seeded_llama(),
        args=args,
        train_dataset=LabelledSequences(16, seed=1),
        callbacks=[callback, Watch()],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.train()
    taken = np.array(truth.taken)
    assert len(taken) == 8 and 0 < (~taken).sum() < 8
    scale = open_run(tmp_path / "run.zarr").steps()["scale"]
    assert (scale[~taken] == 0).all()
    norms = np.array([e["grad_norm"] for e in run.state.log_history if "grad_norm" in e])
    assert (norms[taken] > limit).all()
    np.testing.assert_allclose(scale[taken], limit / (norms[taken] + 1e-6), rtol=1e-5)
    assert not [w for w in caught if "gradient clipping" in str(w.message)]
