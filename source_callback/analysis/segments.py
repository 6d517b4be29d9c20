"""Segments of a recorded run and their learning-rate masses (SOURCE-math §3–4).

A segment is a contiguous range of optimizer steps inside one stage, together with the
committed checkpoints saved inside it. Its learning-rate mass ``τ = Σ η̃_t`` sums the
*effective* rate of every step: the recorded rate, scaled for momentum, and (optionally) cut
where the stage ends before a gradient's momentum tail is delivered.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from source_callback.analysis.namespace import CheckpointView, RunView
from source_callback.errors import AnalysisError, UnsupportedOptimizerError
from source_callback.optim import UpdateRule
from source_callback.store.reader import Checkpoint, Run
from source_callback.store.schema import (
    ROLE_END,
    STEP_DAMPENING,
    STEP_LR,
    STEP_MOMENTUM,
    STEP_SCALE,
    Stage,
)

#: ``segments=`` accepts a count per stage, or per stage name a count or interior cut steps.
SegmentSpec = int | Mapping[str, int | Sequence[int]]


@dataclass(frozen=True)
class Segment:
    """Steps ``[start, end)`` of one stage, the checkpoints inside them, and their τ.

    Attributes
    ----------
    stage
        Index of the stage.
    start, end
        First global step and one past the last.
    checkpoints
        Committed checkpoints with ``start <= step < end`` (stage-end checkpoints excluded:
        they hold the parameters after the stage).
    lr_mass
        τ per parameter group: the sum of effective learning rates over the segment's steps.
    max_rate
        The largest effective learning rate of a step in the segment, per parameter group.
    later
        The stage's committed checkpoints after the segment, stage-end included: where a
        parameter's optimizer state comes from when none inside the segment has one yet.
    decay_mass
        The sum of the effective learning rates that weight decay moves by, per parameter
        group: ``lr_mass`` without the steps' gradient scales (clipping and short accumulation
        windows scale the gradient, not the decay the optimizer adds; a skipped step has
        neither); ``None``: ``lr_mass``.

    """

    stage: int
    start: int
    end: int
    checkpoints: tuple[Checkpoint | CheckpointView, ...]
    lr_mass: np.ndarray
    max_rate: np.ndarray
    later: tuple[Checkpoint | CheckpointView, ...] = ()
    decay_mass: np.ndarray | None = None

    @property
    def num_steps(self) -> int:
        """Optimizer steps in the segment."""
        return self.end - self.start


def effective_rates(
    steps: Mapping[str, np.ndarray],
    stage: Stage,
    rule: UpdateRule,
    momentum_tail: bool = True,
) -> np.ndarray:
    """Effective learning rate of each of the stage's steps, ``[steps, param groups]``.

    SGD with momentum β and dampening d moves the parameters by ``η(1−d)/(1−β)`` per unit of
    gradient once its momentum tail is delivered (Nesterov: ``η/(1−β)``); Adam's β1 average
    has weights summing to 1. With ``momentum_tail`` the part of the tail cut off by the end of
    the stage is removed: a gradient of step t, n steps before the stage ends, moves the
    parameters by ``(1 − β^n)`` of the full amount (Nesterov: ``1 − β^(n+1)``).

    Parameters
    ----------
    steps
        The run's per-step arrays (``Run.steps()``).
    stage
        The stage, which must be complete.
    rule
        The update rule to assume.
    momentum_tail
        Whether to cut the momentum tail at the stage's end (SOURCE-math §4).

    """
    if stage.last_step is None:
        raise AnalysisError(
            f"stage {stage.name!r} was not recorded to its end; only complete stages can be "
            "analyzed. Resume its training, or analyze a store whose stages completed."
        )
    rows = slice(stage.first_step, stage.last_step + 1)
    groups = len(stage.optimizer.groups)
    lr = steps[STEP_LR][rows, :groups]
    if rule in (UpdateRule.SGD, UpdateRule.UNKNOWN):
        return lr.copy()
    beta = np.nan_to_num(steps[STEP_MOMENTUM][rows, :groups])
    remaining = (stage.last_step + 1 - np.arange(stage.first_step, stage.last_step + 1))[:, None]
    if rule is UpdateRule.SGD_MOMENTUM:
        nesterov = np.array(
            [bool(g.hyperparameters.get("nesterov")) for g in stage.optimizer.groups]
        )
        dampening = np.where(nesterov, 0.0, np.nan_to_num(steps[STEP_DAMPENING][rows, :groups]))
        scale = (1 - dampening) / (1 - beta)
        tail = 1 - beta ** (remaining + nesterov)
    else:  # Adam, AdamW: β1's weights sum to 1
        scale = np.ones_like(lr)
        tail = 1 - beta**remaining
    return lr * scale * (tail if momentum_tail else 1.0)


def gradient_scales(steps: Mapping[str, np.ndarray], stage: Stage) -> np.ndarray:
    """The factor the framework scaled each of the stage's steps' gradient by, ``[steps]``.

    Clipping by norm and a short last accumulation window (``schema.STEP_SCALE``); 0 for a
    step the optimizer did not take (a loss scaler skipped it); 1 where unknown (NaN: clipping
    by value, or seen after the fact) or not recorded (older stores).
    """
    rows = slice(stage.first_step, stage.last_step + 1)  # type: ignore[operator]
    recorded = steps.get(STEP_SCALE)
    if recorded is None:
        return np.ones(rows.stop - rows.start)
    return np.nan_to_num(recorded[rows], nan=1.0)


def _assumed_rule(stage: Stage, optimizer_model: UpdateRule | str | None) -> UpdateRule:
    if optimizer_model is not None:
        return UpdateRule(optimizer_model)
    rule = stage.optimizer.update_rule
    if rule is UpdateRule.UNKNOWN:
        raise UnsupportedOptimizerError(
            f"stage {stage.name!r} was trained with {stage.optimizer.class_name}, which the "
            "analysis has no model of. Pass optimizer_model='sgd' (or another of "
            f"{[r.value for r in UpdateRule if r is not UpdateRule.UNKNOWN]}) to analyze it "
            "as that update rule."
        )
    return rule


def _boundaries(stage: Stage, spec: int | Sequence[int]) -> list[int]:
    """Global step boundaries ``[first, ..., last + 1]`` of a stage's segments."""
    first, end = stage.first_step, stage.last_step + 1
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"segments must be >= 1, got {spec} for stage {stage.name!r}")
        if spec > end - first:
            raise AnalysisError(
                f"stage {stage.name!r} has {end - first} steps, fewer than the {spec} "
                "segments requested. Use fewer segments."
            )
        return sorted({first + round(i * (end - first) / spec) for i in range(spec + 1)})
    cuts = sorted(int(c) for c in spec)
    outside = [c for c in cuts if not first < c < end]
    if outside or len(set(cuts)) != len(cuts):
        raise AnalysisError(
            f"segment boundaries {cuts} for stage {stage.name!r} must be distinct global steps "
            f"strictly inside the stage's steps {first}..{end - 1}."
        )
    return [first, *cuts, end]


def plan_segments(
    run: Run | RunView,
    segments: SegmentSpec = 3,
    *,
    momentum_tail: bool = True,
    optimizer_model: UpdateRule | str | None = None,
) -> list[Segment]:
    """Cut every stage of ``run`` into segments, in training order.

    Parameters
    ----------
    run
        The recorded run.
    segments
        Segments per stage (an int), or per stage name a count or the global steps at which
        new segments start. Segments never cross a stage boundary.
    momentum_tail
        See :func:`effective_rates`.
    optimizer_model
        Update rule to assume instead of the recorded one (required for optimizers recorded
        as unknown).

    Raises
    ------
    AnalysisError
        A stage is incomplete, a boundary is outside its stage, or a segment holds no committed
        checkpoint (ask for fewer segments, or record more checkpoints per stage).

    """
    if isinstance(segments, Mapping):
        unknown = set(segments) - {s.name for s in run.stages}
        if unknown:
            raise AnalysisError(
                f"segments names stage(s) {sorted(unknown)} not in the record; recorded "
                f"stages: {[s.name for s in run.stages]}"
            )
    steps = run.steps()
    every = [c for c in run.checkpoints if c.committed]
    committed = [c for c in every if c.role != ROLE_END]
    out = []
    for stage in run.stages:
        spec = segments.get(stage.name, 1) if isinstance(segments, Mapping) else segments
        rates = effective_rates(steps, stage, _assumed_rule(stage, optimizer_model), momentum_tail)
        scales = gradient_scales(steps, stage)[:, None]
        scaled, taken = rates * scales, rates * (scales != 0)  # a skipped step decays nothing
        bounds = _boundaries(stage, spec)
        for start, end in itertools.pairwise(bounds):
            inside = tuple(c for c in committed if c.stage == stage.index and start <= c.step < end)
            if not inside:
                stored = [c.step for c in committed if c.stage == stage.index]
                raise AnalysisError(
                    f"segment of steps {start}..{end - 1} in stage {stage.name!r} holds no "
                    f"committed checkpoint (checkpoints at steps {stored}). Request fewer "
                    "segments, or record with a larger checkpoints_per_stage."
                )
            part = slice(start - stage.first_step, end - stage.first_step)
            rows, decay = scaled[part], taken[part].sum(0)
            later = tuple(c for c in every if c.stage == stage.index and c.step >= end)
            out.append(
                Segment(stage.index, start, end, inside, rows.sum(0), rows.max(0), later, decay)
            )
    return out
