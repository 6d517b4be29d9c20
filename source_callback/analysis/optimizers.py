"""How each recorded optimizer becomes a segment operator (SOURCE-math §4).

SGD (with momentum, dampening, coupled weight decay) enters through the learning-rate mass and
a curvature shift. Adam and AdamW add a diagonal preconditioner ``P = 1/(√v̂ + eps)`` read from
the second moments saved in the segment's checkpoints; it enters either through EK-FAC fitted to
``P^{1/2}``-scaled pseudo-gradients (``"preconditioned"``; ``"factored"`` with ``P^{1/2}``
replaced by its best rank-one approximation, which keeps the Kronecker structure) or, as in the
paper's App. D.2, through per-coordinate exponentials (``"diagonal"``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from source_callback.analysis import ekfac
from source_callback.analysis.engine import Engine, StateSource
from source_callback.analysis.segments import Segment
from source_callback.analysis.source import DiagonalExpOperator, EkfacOperator, SegmentOperator
from source_callback.analysis.units import Unit
from source_callback.errors import AnalysisError
from source_callback.optim import UpdateRule, WeightDecay
from source_callback.store.schema import STEP_BETA2, STEP_EPS, STEP_WEIGHT_DECAY, Stage

AdamVariant = Literal["preconditioned", "factored", "diagonal"]


@dataclass(frozen=True)
class AdamOptions:
    """How Adam-family segments are modelled.

    :class:`~source_callback.AnalysisOptions` checks these values as its fields.

    Attributes
    ----------
    variant
        ``"preconditioned"`` (EK-FAC of ``P^{1/2} H P^{1/2}``), ``"factored"`` (the same with
        ``P^{1/2}`` replaced by its best rank-one approximation per unit, see
        :func:`rank_one`) or ``"diagonal"`` (App. D.2).
    damping
        For ``"diagonal"``: δ of the inverse curvature, relative to each module's mean
        eigenvalue.
    floor
        Floor of √v̂ relative to its median per parameter (see :func:`adam_preconditioner`).
    """

    variant: AdamVariant = "factored"
    damping: float = 0.1
    floor: float = 0.01


ADAM_RULES = (UpdateRule.ADAM, UpdateRule.ADAMW)


def group_of(stage: Stage, param: str) -> int:
    """Index of the optimizer group that holds ``param`` in ``stage``."""
    for index, group in enumerate(stage.optimizer.groups):
        if param in group.params:
            return index
    raise AnalysisError(f"parameter {param} is not in stage {stage.name!r}'s optimizer groups")


def stage_modules(engine: Engine, stage: Stage) -> dict[str, Unit]:
    """The units whose first parameter ``stage`` trained (the others stay fixed in it)."""
    return {
        name: unit for name, unit in engine.modules.items() if unit.params[0] in stage.trainable
    }


def adam_preconditioner(
    engine: Engine,
    segment: Segment,
    stage: Stage,
    steps: dict[str, np.ndarray],
    floor: float = 0.01,
) -> dict[str, torch.Tensor]:
    """``P̄ = mean_c 1/(max(√v̂_c, floor·median √v̂_c) + eps)`` per unit as ``[out, in]``.

    ``v̂ = v / (1 − β2^k)`` is the bias-corrected second moment (``max_exp_avg_sq`` under
    AMSGrad) after k optimizer steps, from the segment's checkpoints; checkpoints without
    optimizer state (a stage's start) do not contribute. A segment whose only checkpoint is the
    stage's start (a short stage cut into several segments) takes the first later checkpoint's:
    that state is the one after the stage's first steps, whose ``v̂`` those steps used.

    Coordinates whose gradient has (nearly) always been zero — dead units, inputs that are
    constant zero in this stage's data — have ``v̂ ≈ 0`` and ``P ≈ 1/eps``. Adam moves such a
    coordinate by at most about the learning rate per step whatever its gradient, but the
    fixed-P linearisation would amplify any gradient there by ``1/eps``; the floor, relative to
    the parameter's median, bounds that amplification.

    A parameter whose ``v̂`` is zero everywhere at a checkpoint has received no gradient yet
    (LoRA's ``A`` while ``B`` is still zero): that checkpoint says nothing about its scale and
    does not contribute. Where no checkpoint of the segment has one, the first later checkpoint
    of the stage that does gives it (``segment.later``).
    """
    modules = stage_modules(engine, stage)
    params = [param for unit in modules.values() for param in unit.params]
    roots: dict[str, list[tuple[torch.Tensor, float]]] = {p: [] for p in params}

    def collect(checkpoint: Any, wanted: list[str]) -> bool:
        """Add the checkpoint's scale of each ``wanted`` parameter; False without state."""
        state = checkpoint.optimizer_state()
        if not state:
            return False
        row = checkpoint.step - 1  # the state is the one after the previous step
        for param in wanted:
            group = group_of(stage, param)
            entry = state[param]
            if "exp_avg_sq" not in entry:
                raise AnalysisError(
                    f"stage {stage.name!r} is analyzed as Adam, but its recorded optimizer "
                    f"state ({stage.optimizer.class_name}: {sorted(entry)} for {param}) has no "
                    "second moments (exp_avg_sq). Pass an optimizer_model without them "
                    "('sgd' or 'sgd-momentum'), or none to use the recorded optimizer's."
                )
            v = entry.get("max_exp_avg_sq", entry["exp_avg_sq"]).double()
            beta2 = steps[STEP_BETA2][row, group]
            root = (v / (1 - beta2 ** entry["step"].double())).sqrt()
            if root.any():
                roots[param].append((root, float(steps[STEP_EPS][row, group])))
        return True

    stated = sum(collect(c, params) for c in segment.checkpoints)
    for checkpoint in segment.later:
        pending = [p for p in params if not roots[p]]
        if not pending:
            break
        stated += collect(checkpoint, pending)
    if not stated:
        raise AnalysisError(
            f"stage {stage.name!r} has no checkpoint with Adam state from step {segment.start} "
            "on, so the preconditioner of its steps is unknown. Analyze it as another update "
            "rule (optimizer_model='sgd'), or record the stage again."
        )
    per_param = {}
    shapes = {n: p.shape for n, p in engine.model.named_parameters(remove_duplicate=False)}
    for param, found in roots.items():
        if not found:  # no gradient all stage long: v̂ = 0, P = 1/eps as Adam has it
            eps = float(steps[STEP_EPS][segment.start, group_of(stage, param)])
            found = [(torch.zeros(shapes[param], dtype=torch.float64), eps)]
        per_param[param] = sum(
            1 / (root.clamp_min(floor * float(root.median())) + eps) for root, eps in found
        ) / len(found)
    return {name: unit.matrix(per_param).to(engine.device) for name, unit in modules.items()}


def rank_one(matrix: torch.Tensor, tol: float = 1e-12, iterations: int = 200) -> ekfac.RankOne:
    """The best rank-one approximation ``r cᵀ`` of a positive matrix in Frobenius norm (float64).

    Power iteration on ``M Mᵀ`` from the column means: for a positive matrix the leading
    singular vectors are positive (Perron-Frobenius), and so is every iterate, so ``r`` and
    ``c`` are positive. It stops when ``c`` changes by less than ``tol`` (relative) or after
    ``iterations``; ``√σ`` is put on each side.
    """
    m = matrix.double()
    cols = m.mean(0)
    cols = cols / cols.norm()
    for _ in range(iterations):
        rows = m @ cols
        rows = rows / rows.norm()
        updated = m.T @ rows
        sigma = updated.norm()
        updated = updated / sigma
        converged = (updated - cols).norm() <= tol
        cols = updated
        if converged:
            break
    root = sigma.sqrt()
    return ekfac.RankOne(rows * root, cols * root)


def module_rates(
    engine: Engine, segment: Segment, stage: Stage, steps: dict[str, np.ndarray]
) -> tuple[dict[str, float], dict[str, float]]:
    """Per module the stage trains: the segment's learning-rate mass τ and mean weight decay λ.

    The operators apply ``exp(−τ(H + λ))``: where the steps' gradients were scaled (clipping)
    and the decay was not, λ is rescaled so that ``τλ`` is the decay's own mass.
    """
    tau, decay = {}, {}
    for name, unit in stage_modules(engine, stage).items():
        group = group_of(stage, unit.params[0])
        tau[name] = float(segment.lr_mass[group])
        decay[name] = float(np.mean(steps[STEP_WEIGHT_DECAY][segment.start : segment.end, group]))
        if segment.decay_mass is not None and tau[name] > 0:
            decay[name] *= float(segment.decay_mass[group]) / tau[name]
    return tau, decay


def warn_if_unstable(
    engine: Engine,
    segment: Segment,
    stage: Stage,
    curvature: dict[str, ekfac.ModuleCurvature],
    shift: dict[str, float | torch.Tensor],
    label: str,
) -> None:
    """Warn when ``η̃·σ_max > 2``: the trajectory oscillates and the model degrades (§9)."""
    worst, where = 0.0, ""
    for name, c in curvature.items():
        group = group_of(stage, engine.modules[name].params[0])
        sigma = float((c.eigenvalues + shift[name]).max())
        product = float(segment.max_rate[group]) * sigma
        if product > worst:
            worst, where = product, name
    if worst > 2:
        warnings.warn(
            f"{label} of stage {stage.name!r}: the largest effective learning rate times the "
            f"largest curvature eigenvalue is {worst:.3g} (module {where!r}), above 2. Training "
            "oscillated along those directions, which SOURCE's stationary approximation does "
            "not model (SOURCE-math §9); expect less accurate scores for this segment.",
            stacklevel=4,
        )


def segment_operator(
    engine: Engine,
    segment: Segment,
    stage: Stage,
    rule: UpdateRule,
    states: list[StateSource],
    steps: dict[str, np.ndarray],
    label: str,
    adam: AdamOptions,
) -> SegmentOperator:
    """Fit the segment's curvature and wrap it in the operator for ``rule``."""
    tau, decay = module_rates(engine, segment, stage, steps)
    dataset, modules = engine.train[stage.name], stage_modules(engine, stage)
    coupled = stage.optimizer.weight_decay is WeightDecay.COUPLED
    if rule not in ADAM_RULES:
        curvature = engine.curvature(dataset, states, label, modules=modules)
        shift = {n: decay[n] if coupled else 0.0 for n in decay}
        warn_if_unstable(engine, segment, stage, curvature, shift, label)
        return EkfacOperator(curvature, tau, shift)
    p = adam_preconditioner(engine, segment, stage, steps, adam.floor)
    decoupled = rule is UpdateRule.ADAMW or not coupled
    if adam.variant in ("preconditioned", "factored"):
        scale: dict[str, ekfac.Scale] = {n: m.sqrt() for n, m in p.items()}
        if adam.variant == "factored":
            scale = {n: rank_one(m) for n, m in scale.items()}
            p = {n: f.matrix().square() for n, f in scale.items()}
        sqrt_p = {n: p[n].sqrt() for n in p}
        curvature = engine.curvature(dataset, states, label, scale=scale, modules=modules)
        shift = {
            # AdamW: exp(−τ(PH + λI)); Adam: λP inside, approximated by its eigenbasis diagonal
            n: decay[n] if decoupled else decay[n] * curvature[n].in_basis(p[n])
            for n in curvature
        }
        warn_if_unstable(engine, segment, stage, curvature, shift, label)
        return EkfacOperator(curvature, tau, shift, sqrt_p)
    curvature = engine.curvature(dataset, states, label, modules=modules)
    return DiagonalExpOperator(
        curvature,
        tau,
        p,
        coupled={n: 0.0 if decoupled else decay[n] for n in curvature},
        decoupled={n: decay[n] if decoupled else 0.0 for n in curvature},
        damping={n: adam.damping * float(c.eigenvalues.mean()) for n, c in curvature.items()},
    )
