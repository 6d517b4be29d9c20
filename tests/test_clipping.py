"""How much the frameworks scaled each step's gradient (``scale`` in the step rows: clipping by
norm, Lightning's seen before it clips, the Trainer's measured when the backward pass ends; a
short last accumulation window), against the norms the frameworks saw; clipping by a factor the
callback cannot know (by value; the Trainer's after other changes to the gradients) is counted
and warned about."""

from __future__ import annotations

import os
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from models import TinyClassifier, loader, make_dataset, trainer

from source_callback import SourceCallback, SourceTrainerCallback, open_run
from source_callback.analysis.inputs import unknown_scales
from source_callback.cli import summarize

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
    run = open_run(tmp_path / "clipped" / "run.zarr")
    scale = run.steps()["scale"]
    np.testing.assert_array_equal(np.isnan(scale), over)  # unknown factors
    assert (scale[~np.isnan(scale)] == 1).all()
    # Whoever analyzes the record is told too.
    [told] = unknown_scales(run)
    assert f"stage 's': {sum(over)} of its 16 optimizer steps were scaled by a factor" in told
    assert unknown_scales(open_run(tmp_path / "free" / "run.zarr")) == []
    assert f"  s  {sum(over)} by an unknown factor (analyzed as 1) of 16 steps" in summarize(run)
    assert "gradient scales" not in summarize(open_run(tmp_path / "free" / "run.zarr"))


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


def _train_hf(
    tmp_path, limit: float, trainer_class=None, model=None, **arguments
) -> tuple[list[float], list[str]]:
    """A Trainer run clipping at ``limit``: the norms before clipping its log holds for every
    step, and the clipping warnings."""
    pytest.importorskip("transformers")
    from hf_models import LabelledSequences, seeded_llama, trainer_arguments
    from transformers import Trainer

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = trainer_arguments(
        tmp_path / f"out{limit}", max_grad_norm=limit, logging_strategy="steps",
        logging_steps=1, num_train_epochs=2, **arguments,
    )  # fmt: skip
    callback = SourceTrainerCallback(tmp_path / f"run{limit}.zarr", stage="s")
    run = (trainer_class or Trainer)(model=model or seeded_llama(), args=args,
                                     train_dataset=LabelledSequences(16, seed=1),
                                     callbacks=[callback])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.train()
    norms = [e["grad_norm"] for e in run.state.log_history if "grad_norm" in e]
    return norms, [str(w.message) for w in caught if "gradient clipping" in str(w.message)]


def _lora_checkpointed() -> dict:
    """LoRA adapters inside layers recomputed in nested backward passes (reentrant activation
    checkpointing): no gradient of the outer pass is trainable."""
    from hf_models import add_lora, seeded_llama

    model = add_lora(seeded_llama(), ["q_proj", "v_proj"])
    model.enable_input_require_grads()
    return {
        "model": model,
        "activation_checkpointing": True,
        "activation_checkpointing_kwargs": {"use_reentrant": True},
    }


@pytest.mark.parametrize("setting", [dict, _lora_checkpointed], ids=["full", "lora-checkpointed"])
def test_the_trainers_clipping_is_recorded_from_the_norms_before_it_clipped(
    tmp_path, setting
) -> None:
    """The Trainer's callbacks see the gradients clipped; the callback measures them when the
    backward pass ends. The Trainer's log has each step's norm before clipping."""
    free, none = _train_hf(tmp_path, 1e6, **setting())
    assert len(free) == 8 and none == []
    limit = sorted(free)[len(free) // 2]
    norms, messages = _train_hf(tmp_path, limit, **setting())
    expected = [min(1.0, limit / (n + 1e-6)) for n in norms]
    assert 0 < sum(e < 1 for e in expected) < len(expected) == 8
    np.testing.assert_allclose(open_run(tmp_path / f"run{limit}.zarr").steps()["scale"],
                               expected, rtol=1e-5)  # fmt: skip
    assert messages == []


def _editing_trainer(edit):
    """A Trainer that changes the gradients with ``edit(model)`` between the backward pass and
    its clipping (its log's norms are then those of the changed gradients)."""
    transformers = pytest.importorskip("transformers")

    class Editing(transformers.Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            edit(model)
            return loss

    return Editing


def _halve(model) -> None:
    for param in model.parameters():
        param.grad.mul_(0.5)


def _zero_embeddings(model) -> None:
    model.get_input_embeddings().weight.grad.zero_()


def test_any_one_factor_between_backward_and_step_is_recorded(tmp_path) -> None:
    """The recorded factor is what the gradient of the examples was scaled by before the step,
    whatever scaled it: here halved by the user's code, then clipped by the Trainer."""
    halving = _editing_trainer(_halve)
    free, _ = _train_hf(tmp_path, 1e6, halving)
    limit = sorted(free)[len(free) // 2]
    norms, messages = _train_hf(tmp_path, limit, halving)  # the halved gradients' norms
    expected = [0.5 * min(1.0, limit / (n + 1e-6)) for n in norms]
    assert 0 < sum(n > limit for n in norms) < len(norms) == 8
    scale = open_run(tmp_path / f"run{limit}.zarr").steps()["scale"]
    np.testing.assert_allclose(scale, expected, rtol=1e-5)
    assert messages == []


def test_a_change_no_one_factor_describes_is_counted_as_unknown(tmp_path) -> None:
    """Zeroing one tensor's gradient is no scaling: where the Trainer clipped after it, the
    factor is not known, and counted; elsewhere the step is taken as unscaled, as before."""
    zeroing = _editing_trainer(_zero_embeddings)
    free, _ = _train_hf(tmp_path, 1e6, zeroing)
    limit = sorted(free)[len(free) // 2]
    norms, [message] = _train_hf(tmp_path, limit, zeroing)
    over = [n > limit for n in norms]
    assert 0 < sum(over) < len(norms)
    assert f"(norm at {limit:g}) changed the gradients of {sum(over)} of the 8 optimizer" in message
    scale = open_run(tmp_path / f"run{limit}.zarr").steps()["scale"]
    np.testing.assert_array_equal(np.isnan(scale), over)
    assert (scale[~np.isnan(scale)] == 1).all()


def test_a_loss_scale_is_divided_out(tmp_path) -> None:
    """fp16 training scales the loss by accelerate's GradScaler, which unscales the gradients
    before the Trainer clips them: the factor is against the unscaled gradient."""
    pytest.importorskip("transformers")
    from hf_models import loss_scaled_trainer

    scaled = loss_scaled_trainer(2.0**10)
    free, _ = _train_hf(tmp_path, 1e6, scaled)
    limit = sorted(free)[len(free) // 2]
    norms, messages = _train_hf(tmp_path, limit, scaled)
    expected = [min(1.0, limit / (n + 1e-6)) for n in norms]
    assert 0 < sum(e < 1 for e in expected) < len(expected) == 8
    scale = open_run(tmp_path / f"run{limit}.zarr").steps()["scale"]
    np.testing.assert_allclose(scale, expected, rtol=1e-5)
    assert messages == []
