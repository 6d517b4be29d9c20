"""How much the frameworks scaled each step's gradient (``scale`` in the step rows: clipping by
norm, a short last accumulation window), against the gradients they saw; clipping by a factor
the callback cannot see (by value; the Trainer's, seen after it) is counted and warned about."""

from __future__ import annotations

import os
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from models import TinyClassifier, loader, make_dataset, trainer

from source_callback import SourceCallback, SourceTrainerCallback, open_run

CLIPPING = r"gradient clipping \((norm|value) at [0-9.e-]+\) changed the gradients of (\d+) "


class Norms(pl.Callback):
    """Ground truth: each step's gradient norm and largest entry, before Lightning clips."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.largest: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)))
        self.largest.append(max(float(g.abs().max()) for g in grads))


def _fit(tmp_path, **clipping) -> tuple[Norms, list[str]]:
    norms = Norms()
    torch.manual_seed(0)
    fit = trainer([SourceCallback(tmp_path / "run.zarr", stage="s"), norms], tmp_path, **clipping)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(TinyClassifier(), loader(make_dataset(64)))
    return norms, [str(w.message) for w in caught if "gradient clipping" in str(w.message)]


def test_lightning_norm_clipping_is_recorded_as_each_steps_scale(tmp_path) -> None:
    seen, _ = _fit(tmp_path / "free")
    limit = sorted(seen.norms)[len(seen.norms) // 2]  # about half the steps go over it
    norms, messages = _fit(tmp_path / "clipped", gradient_clip_val=limit)
    scale = open_run(tmp_path / "clipped" / "run.zarr").steps()["scale"]
    expected = [min(1.0, limit / (n + 1e-6)) for n in norms.norms]
    assert 0 < sum(e < 1 for e in expected) < len(expected) == 16
    np.testing.assert_allclose(scale, expected, rtol=1e-6)
    assert messages == []  # modelled: nothing to warn about


def test_lightning_value_clipping_is_counted_and_warned_about(tmp_path) -> None:
    seen, _ = _fit(tmp_path / "free")
    limit = sorted(seen.largest)[len(seen.largest) // 2]
    norms, [message] = _fit(tmp_path / "clipped", gradient_clip_val=limit,
                            gradient_clip_algorithm="value")  # fmt: skip
    over = [v > limit for v in norms.largest]
    assert 0 < sum(over) < len(over) == 16
    assert (
        f"(value at {limit:g}) changed the gradients of {sum(over)} of the 16 optimizer" in message
    )
    assert "stage 's'" in message
    scale = open_run(tmp_path / "clipped" / "run.zarr").steps()["scale"]
    np.testing.assert_array_equal(np.isnan(scale), over)  # unknown factors
    assert (scale[~np.isnan(scale)] == 1).all()


def test_a_short_last_accumulation_window_is_scaled(tmp_path) -> None:
    """Lightning divides every batch's loss by accumulate_grad_batches, also in an epoch's last
    window of fewer batches: 8 batches in windows of 3 make steps of 3, 3 and 2 batches."""
    _fit(tmp_path, accumulate_grad_batches=3)
    steps = open_run(tmp_path / "run.zarr").steps()
    np.testing.assert_allclose(steps["scale"], [1, 1, 2 / 3] * 2)
    np.testing.assert_array_equal(steps["examples"], [24, 24, 16] * 2)


def test_clipping_that_never_binds_is_not_warned_about(tmp_path) -> None:
    norms, messages = _fit(tmp_path, gradient_clip_val=1e6)
    assert len(norms.norms) == 16 and messages == []
    assert (open_run(tmp_path / "run.zarr").steps()["scale"] == 1).all()


def test_the_trainer_counts_the_steps_max_grad_norm_clipped(tmp_path) -> None:
    """The Trainer's callbacks see the gradients clipped; its log has each step's norm before."""
    pytest.importorskip("transformers")
    from hf_models import LabelledSequences, seeded_llama, trainer_arguments
    from transformers import Trainer

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    def train(limit: float) -> tuple[list[float], list[str]]:
        args = trainer_arguments(
            tmp_path / f"out{limit}", max_grad_norm=limit, logging_strategy="steps",
            logging_steps=1, num_train_epochs=2,
        )  # fmt: skip
        callback = SourceTrainerCallback(tmp_path / f"run{limit}.zarr", stage="s")
        run = Trainer(model=seeded_llama(), args=args, train_dataset=LabelledSequences(16, seed=1),
                      callbacks=[callback])  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run.train()
        norms = [e["grad_norm"] for e in run.state.log_history if "grad_norm" in e]
        return norms, [str(w.message) for w in caught if "gradient clipping" in str(w.message)]

    free, none = train(1e6)
    assert len(free) == 8 and none == []
    limit = sorted(free)[len(free) // 2]
    norms, [message] = train(limit)
    over = sum(n > limit for n in norms)
    assert 0 < over < len(norms)
    assert f"(norm at {limit:g}) changed the gradients of {over} of the 8 optimizer" in message
