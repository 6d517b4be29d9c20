"""The functional check of model, data and task: they must reproduce the probe's recorded losses.

Every checkpoint holds the training loss of a few fixed examples of its stage (the *probe*,
``source_callback.record.probe``), as the LightningModule's ``training_step`` computed it. The
parameter manifest says the model has the trained tensors and the example digests say the data
is the trained data; only recomputing a loss says that the model computes what was trained (the
same activations and forward) and that the task is the training objective. :func:`check_probes`
does so for :func:`~source_callback.analyze` with the task's per-example loss, and
:func:`check_module_probes` for :func:`~source_callback.retrain` with the module's own
``training_step``, at the stage-start and stage-end checkpoints of every stage.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from source_callback.analysis.inputs import Collation, checkpoint_state, to_device
from source_callback.analysis.namespace import RunView
from source_callback.analysis.task import Task
from source_callback.errors import AnalysisError, listed
from source_callback.manifest import model_manifest
from source_callback.record.probe import ProbeUnavailable, preserved_rng
from source_callback.store.reader import Checkpoint, Run
from source_callback.store.schema import ROLE_END, ROLE_START, Stage

#: Relative and absolute tolerance of a recomputed probe loss: float32 noise (another device,
#: batch of one vs. fused kernels), far below what a changed model, label or task does.
TOLERANCE_32 = (1e-3, 1e-5)
#: The same for stages with 16-bit floating-point parameters: the bfloat16 rounding of logits
#: moves a well-fitted example's loss by up to about 5e-3 (recomputed in float32).
TOLERANCE_16 = (3e-2, 1e-2)

LossFn = Callable[[Any], torch.Tensor]  # a batch of one example on the device -> its loss


def tolerance(stage: Stage) -> tuple[float, float]:
    """``(rtol, atol)`` for stage ``stage``: looser where its parameters are 16-bit floats."""
    dtypes = {entry.get("dtype") for entry in stage.manifest or []}
    low = bool(dtypes & {"torch.bfloat16", "torch.float16"})
    return TOLERANCE_16 if low else TOLERANCE_32


def differing(recorded: np.ndarray, recomputed: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    """Positions where ``recomputed`` is not ``recorded`` up to the tolerance (NaN equals NaN)."""
    return np.flatnonzero(~np.isclose(recomputed, recorded, rtol=rtol, atol=atol, equal_nan=True))


def _losses(loss: LossFn, dataset: Dataset, indices: Sequence[int], collate_fn: Any) -> np.ndarray:
    """``loss`` of each example alone, without gradients and with the generators preserved."""
    collate = collate_fn or default_collate
    with torch.no_grad(), preserved_rng():
        return np.array(
            [float(loss(collate([dataset[int(i)]])).double().reshape(-1)[0]) for i in indices]
        )


def _trained_by(stage: Stage) -> str:
    """What computed the stage's training loss, as its recording framework calls it."""
    if stage.recorded_by == "transformers":
        return "the Trainer's loss, the model's own"
    return "the LightningModule's training_step"


def _mismatch(
    stage: Stage,
    checkpoint: Checkpoint,
    indices: np.ndarray,
    recorded: np.ndarray,
    recomputed: np.ndarray,
    bad: np.ndarray,
    computed_by: str,
    causes: str,
    remedy: str,
) -> str:
    first = bad[0]
    rtol, atol = tolerance(stage)
    return (
        f"stage {stage.name!r}: the model and data given do not reproduce the training loss "
        f"recorded at its {checkpoint.role} checkpoint (step {checkpoint.step}). Example "
        f"{int(indices[first])} of the stage's training set had loss {recorded[first]:.6g} in "
        f"training ({_trained_by(stage)}, in eval mode) but {computed_by} gives "
        f"{recomputed[first]:.6g} here; {len(bad)} of the {len(indices)} probed examples "
        f"{'differs' if len(bad) == 1 else 'differ'} beyond float noise (rtol {rtol:g}, atol "
        f"{atol:g}). Likely causes: the model is not the trained one (another activation, "
        "normalisation or forward with the same parameter "
        f"names and shapes), the preprocessing or labels of these examples differ, or {causes}. "
        f"{remedy}"
    )


def check_probes(
    run: RunView,
    models: Sequence[nn.Module],
    task: Task,
    train: Mapping[str, Dataset],
    collation: Collation,
) -> list[str]:
    """Refuse a model, dataset or task that does not reproduce the recorded probe losses.

    At the stage-start and stage-end checkpoints of every stage, the probed examples' losses
    are recomputed with ``task`` (its ``probe_loss(model, batch)`` where it has one, else its
    ``loss``) on ``model`` in eval mode, each example alone, and compared with the recorded
    ``training_step`` losses.

    Parameters
    ----------
    run
        The record as named by ``models``.
    models
        Per stage, the analysis's copy of the model that analyzes it (in eval mode); each is
        left holding the last state checked.
    task
        The analysis's task.
    train
        Each stage's training set by name (already checked against the digests).
    collation
        What collates each stage's examples into a batch.

    Returns
    -------
    list[str]
        What could not be checked (stores or stages without a probe); also warned.

    Raises
    ------
    AnalysisError
        A recomputed loss differs from the recorded one beyond float noise; the message names
        the stage, checkpoint step, example, both losses, and the likely causes.
    """
    loss_fn = getattr(task, "probe_loss", task.loss)
    name = "task.probe_loss" if hasattr(task, "probe_loss") else f"{type(task).__name__}.loss"
    skipped = []
    for stage in run.stages:
        model = models[stage.index].eval()
        device = next(model.parameters()).device
        for role in (ROLE_START, ROLE_END):
            view = run.boundary(stage.index, role)
            probe = view.checkpoint.probe()
            if probe is None:
                skipped.append(_unchecked(stage, view.checkpoint))
                continue
            indices, recorded = probe
            state = checkpoint_state(view)
            model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
            recomputed = _losses(
                lambda batch, m=model, d=device: loss_fn(m, to_device(batch, d)),
                train[stage.name],
                indices,
                collation.stage(stage.name),
            )
            bad = differing(recorded, recomputed, *tolerance(stage))
            if len(bad):
                raise AnalysisError(
                    _mismatch(
                        stage,
                        view.checkpoint,
                        indices,
                        recorded,
                        recomputed,
                        bad,
                        name,
                        f"the task is not the training objective ({name} is not "
                        f"{_trained_by(stage)}, e.g. 'regression' for a classifier)",
                        "Pass the model class, data pipeline and task the run was trained "
                        "with. If the training loss legitimately differs from the task's "
                        "per-example loss (a regularisation term, label smoothing, another "
                        "reduction), give the task a probe_loss(model, batch) method returning "
                        "the training loss of each example ('The probe' in "
                        "docs/recording.md). Nothing was computed or written.",
                    )
                )
    _warn_unchecked(skipped)
    return skipped


def check_module_probes(
    run: Run,
    module: Callable[[], Any],
    train: Mapping[str, Dataset],
    before_stage: Callable[[Any, str], None] | None,
    collation: Collation,
    error: type[Exception],
) -> list[str]:
    """As :func:`check_probes`, for :func:`~source_callback.retrain`'s module factory.

    A fresh module, prepared for each stage by ``before_stage`` in turn, recomputes the
    probe with its own ``training_step`` (as recording did) at each stage's boundaries.
    Raises ``error`` on a mismatch, or where the module does not hold the recorded tensors;
    returns (and warns) what could not be checked.
    """
    skipped = []
    with preserved_rng():
        model = module()
    device = next(model.parameters()).device
    for stage in run.stages:
        if before_stage is not None:
            before_stage(model, stage.name)
        aliases = {a for e in model_manifest(model) for a in e.get("aliases", [])}
        for checkpoint in (c for c in run.checkpoints if c.committed and c.stage == stage.index):
            if checkpoint.role not in (ROLE_START, ROLE_END):
                continue
            probe = checkpoint.probe()
            if probe is None:
                skipped.append(_unchecked(stage, checkpoint))
                continue
            indices, recorded = probe
            state = {**checkpoint.params(), **checkpoint.buffers()}
            try:
                loaded = model.load_state_dict(state, strict=False)
            except RuntimeError as exc:
                raise error(
                    f"stage {stage.name!r}: the module does not hold the recorded tensors "
                    f"({exc}). Pass a module factory of the trained LightningModule."
                ) from exc
            wrong = [k for k in loaded.missing_keys if k not in aliases] + list(
                loaded.unexpected_keys
            )
            if wrong:
                raise error(
                    f"stage {stage.name!r}: the module's tensors are not the recorded ones "
                    f"(missing or unexpected: {wrong[:5]}). Pass a module factory of the "
                    "trained LightningModule; before_stage= must prepare it for each stage."
                )
            # Imported here: Lightning takes seconds to import, and reading a store, the
            # command line and analyses of plain modules do not need it.
            from source_callback.lightning import training_step_losses

            try:
                losses = training_step_losses(
                    model, train[stage.name], indices.tolist(), collation.stage(stage.name), device
                )
            except ProbeUnavailable as exc:
                raise error(
                    f"stage {stage.name!r}: the module cannot recompute the training loss "
                    f"recorded for the probe at its {checkpoint.role} checkpoint: {exc}. Pass "
                    "a module factory of the trained LightningModule, and the collate_fn the "
                    "stage trained with where its examples need one."
                ) from exc
            recomputed = np.array(losses)
            bad = differing(recorded, recomputed, *tolerance(stage))
            if len(bad):
                raise error(
                    _mismatch(
                        stage,
                        checkpoint,
                        indices,
                        recorded,
                        recomputed,
                        bad,
                        "the module's training_step",
                        "training_step itself changed",
                        "Pass a module factory of the trained LightningModule (the same "
                        "forward and training_step) and the stage's exact training set; "
                        "before_stage= must prepare the module as the original script did.",
                    )
                )
    _warn_unchecked(skipped)
    return skipped


def _unchecked(stage: Stage, checkpoint: Checkpoint) -> str:
    why = stage.probe or "recorded before probes were"
    return f"{stage.name!r} at step {checkpoint.step} ({why})"


def _warn_unchecked(skipped: list[str]) -> None:
    if skipped:
        warnings.warn(
            f"no probe was recorded for stage {listed(skipped, 4)}: there the model, data and "
            "task were not checked against a recorded training loss, only the parameter names "
            "and shapes and the data's size and digests (or fingerprint).",
            stacklevel=3,
        )
