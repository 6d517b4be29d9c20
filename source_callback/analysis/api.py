"""``analyze``: segmented SOURCE scores and stage effects from a recorded run."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from source_callback.analysis.engine import Engine, State, StateSource
from source_callback.analysis.gradients import ModuleTensors
from source_callback.analysis.inputs import (
    average_states,
    check_datasets,
    checkpoint_state,
    prepare_model,
)
from source_callback.analysis.optimizers import (
    AdamOptions,
    AdamVariant,
    module_rates,
    segment_operator,
)
from source_callback.analysis.results import AnalysisResult
from source_callback.analysis.segments import Segment, SegmentSpec, plan_segments
from source_callback.analysis.source import dot, sweep
from source_callback.analysis.task import ExactFisherTask, Task, resolve_task
from source_callback.errors import AnalysisError
from source_callback.optim import UpdateRule
from source_callback.store.reader import Run, open_run
from source_callback.store.schema import ROLE_END, ROLE_START, Stage
from source_callback.store.writer import write_analysis

Method = Literal["source", "fast-source", "if", "tracin"]
METHODS = ("source", "fast-source", "if", "tracin")


def analyze(
    store: str | os.PathLike[str],
    *,
    model: nn.Module,
    task: str | Task,
    train: Mapping[str, Dataset],
    queries: Dataset,
    segments: SegmentSpec = 3,
    method: Method = "source",
    storage_options: dict[str, Any] | None = None,
    batch_size: int = 64,
    optimizer_model: UpdateRule | str | None = None,
    momentum_tail: bool = True,
    fisher: Literal["sampled", "exact"] = "sampled",
    seed: int = 0,
    collate_fn: Any = None,
    name: str | None = "default",
    adam_variant: AdamVariant = "preconditioned",
    damping: float = 0.1,
    preconditioner_floor: float = 0.01,
    verbose: bool = True,
) -> AnalysisResult:
    """Attribute the queries' measurements to training examples and stages with SOURCE.

    Parameters
    ----------
    store
        The record written by :class:`~source_callback.SourceCallback` (path or fsspec URL).
    model
        An instance of the trained architecture; weights come from the store (the instance
        itself is not modified).
    task
        ``"classification"``, ``"regression"``, ``"language_modeling"`` or a :class:`Task`.
    train
        Each stage's training dataset by stage name, in the order it was trained on; checked
        against the recorded size and fingerprint.
    queries
        Dataset of query examples, batched like the training data.
    segments
        Segments per stage, or per stage name a count or the global steps where segments start
        (a stage the mapping does not name gets one segment).
    method
        ``"source"`` (EK-FAC and gradients at every checkpoint of a segment, averaged),
        ``"fast-source"`` (once, at the segment's average parameters), ``"if"`` (EK-FAC
        influence at the final parameters, damped) or ``"tracin"`` (TracInCP over the
        segments' checkpoints, weighted by their learning-rate mass).
    storage_options
        fsspec options for a remote store.
    batch_size
        Examples per batch in every pass over data.
    optimizer_model
        Update rule to assume instead of the recorded one (needed for unknown optimizers).
    momentum_tail
        Cut each gradient's momentum tail at its stage's end (SOURCE-math §4).
    fisher
        ``"sampled"`` pseudo-labels (one per example and pass), or ``"exact"`` Gauss-Newton
        Hessian blocks (one backward pass per output: small outputs only).
    seed
        Seed of the pseudo-label sampling.
    collate_fn
        Passed to the DataLoaders (as used in training).
    adam_variant
        How Adam's preconditioner enters (SOURCE-math §4): ``"preconditioned"`` (EK-FAC of
        ``P^{1/2} H P^{1/2}``, exact for a constant P) or ``"diagonal"`` (the paper's App. D.2).
    damping
        Damping of inverse curvatures, relative to each module's mean eigenvalue: the
        ``"diagonal"`` Adam variant's, and influence functions' (``method="if"``).
    preconditioner_floor
        Adam/AdamW: each parameter's √v̂ is floored at this fraction of its median, bounding
        the amplification of coordinates that never received gradient (see
        :func:`source_callback.analysis.optimizers.adam_preconditioner`).
    name
        The result is also written into the store under ``analyses/<name>/`` (replacing one of
        that name) and can be reopened with :func:`load_analysis`; ``None`` skips writing.
    verbose
        Show progress bars.

    Returns
    -------
    AnalysisResult
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if fisher not in ("sampled", "exact"):
        raise ValueError(f"fisher must be 'sampled' or 'exact', got {fisher!r}")
    run = open_run(store, storage_options)
    incomplete = [s.name for s in run.stages if not s.complete]
    if not run.stages or incomplete:
        raise AnalysisError(
            f"{run.url} has incomplete stage(s) {incomplete or 'none recorded'}; analyze needs "
            "every stage recorded to its end."
        )
    task = resolve_task(task)
    if fisher == "exact" and not isinstance(task, ExactFisherTask):
        raise AnalysisError("fisher='exact' needs a task with exact_pseudo_losses()")
    check_datasets(run, train)
    work = Engine(
        prepare_model(model, run), task, train, batch_size, fisher, seed, verbose, collate_fn
    )
    plan = plan_segments(
        run, segments, momentum_tail=momentum_tail, optimizer_model=optimizer_model
    )
    by_role = {(c.stage, c.role): c for c in run.checkpoints if c.committed}
    for stage in run.stages:
        for role in (ROLE_START, ROLE_END):
            if (stage.index, role) not in by_role:
                raise AnalysisError(
                    f"stage {stage.name!r} has no committed {role} checkpoint in {run.url}"
                )
    last = len(run.stages) - 1
    final_state = checkpoint_state(by_role[last, ROLE_END])

    if method in ("source", "fast-source"):
        adam = AdamOptions(adam_variant, damping, preconditioner_floor)
        scores, arrivals = _source(
            work, run, plan, queries, final_state, method, optimizer_model, adam
        )
    elif method == "if":
        scores, arrivals = _influence(work, run, queries, final_state, damping)
    else:
        scores, arrivals = _tracin(work, run, plan, queries, final_state)

    work.load(final_state)
    f_final = work.measurement(queries)
    effects = np.zeros((len(f_final), len(run.stages)))
    for stage in run.stages:
        before = work.module_matrices(checkpoint_state(by_role[stage.index, ROLE_START]))
        after = work.module_matrices(checkpoint_state(by_role[stage.index, ROLE_END]))
        delta = {n: after[n] - before[n] for n in after}
        effects[:, stage.index] = -dot(arrivals[stage.index], delta).cpu().numpy()
    work.load(checkpoint_state(by_role[last, ROLE_START]))
    last_exact = work.measurement(queries) - f_final

    config = {
        "method": method,
        "segments": [[s.start, s.end] for s in plan],
        "momentum_tail": momentum_tail,
        "fisher": fisher,
        "seed": seed,
        "optimizer_model": None
        if optimizer_model is None
        else str(UpdateRule(optimizer_model).value),
        "modules": sorted(work.modules),
    }
    result = AnalysisResult(scores, [s.name for s in run.stages], effects, last_exact, config)
    if name is not None:
        write_analysis(
            run.url,
            storage_options,
            name,
            [result.scores[n] for n in result.stage_names],
            result.stage_effects,
            result.last_stage_exact,
            {"stage_names": result.stage_names, "config": config},
        )
    return result


Scores = dict[str, np.ndarray]
Arrivals = dict[int, ModuleTensors]  # per stage index: the query vector at the stage's end


def _state_sources(segment: Segment, averaged: bool) -> list[StateSource]:
    """Loaders of the segment's states: each checkpoint, or (Fast-SOURCE) their average."""
    if averaged:
        return [lambda: average_states([checkpoint_state(c) for c in segment.checkpoints])]
    return [lambda c=c: checkpoint_state(c) for c in segment.checkpoints]


def _accumulate(scores: Scores, stage: Stage, part: np.ndarray) -> None:
    """Add one segment's ``part`` to its stage's scores, divided by N_s, in place.

    In place because scores can be large (``[Q, N_s]``).
    """
    part /= stage.num_examples
    if stage.name in scores:
        scores[stage.name] += part
    else:
        scores[stage.name] = part


def _last_segments(plan: list[Segment]) -> dict[int, int]:
    return {segment.stage: number for number, segment in enumerate(plan)}


def _source(
    work: Engine,
    run: Run,
    plan: list[Segment],
    queries: Dataset,
    final_state: State,
    method: str,
    optimizer_model: UpdateRule | str | None,
    adam: AdamOptions,
) -> tuple[Scores, Arrivals]:
    """Segmented SOURCE (SOURCE-math §3): fit every segment, sweep the queries back, score."""
    steps = run.steps()
    operators, segment_states = [], []
    for number, segment in enumerate(plan):
        stage = run.stages[segment.stage]
        rule = UpdateRule(optimizer_model) if optimizer_model else stage.optimizer.update_rule
        states = _state_sources(segment, averaged=method == "fast-source")
        segment_states.append(states)
        label = f"segment {number + 1}/{len(plan)}"
        operators.append(segment_operator(work, segment, stage, rule, states, steps, label, adam))
    work.load(final_state)
    responses, arrivals = sweep(operators, work.query_grads(queries))
    scores: Scores = {}
    for number, (segment, states) in enumerate(zip(plan, segment_states, strict=True)):
        stage = run.stages[segment.stage]
        label = f"segment {number + 1}/{len(plan)}"
        part = work.scores(work.train[stage.name], states, responses[number], label)
        _accumulate(scores, stage, part)
    return scores, {k: arrivals[n] for k, n in _last_segments(plan).items()}


def _influence(
    work: Engine, run: Run, queries: Dataset, final_state: State, damping: float
) -> tuple[Scores, Arrivals]:
    """EK-FAC influence at the final parameters on all stages' data pooled (SOURCE-math §7).

    Damping is ``damping`` times each module's mean eigenvalue. Stage effects use the final
    query gradient without propagation (first order, no forgetting).
    """
    pooled = ConcatDataset([work.train[s.name] for s in run.stages])
    curvature = work.curvature(pooled, [lambda: final_state], "influence")
    work.load(final_state)
    u = work.query_grads(queries)
    delta = {n: damping * float(c.eigenvalues.mean()) for n, c in curvature.items()}
    vectors = {
        n: c.apply(u[n], lambda lam, n=n: 1 / (lam + delta[n])) for n, c in curvature.items()
    }
    scores = {
        s.name: work.scores(work.train[s.name], [lambda: final_state], vectors, "influence")
        / len(pooled)
        for s in run.stages
    }
    return scores, {s.index: u for s in run.stages}


def _tracin(
    work: Engine, run: Run, plan: list[Segment], queries: Dataset, final_state: State
) -> tuple[Scores, Arrivals]:
    """TracInCP (SOURCE-math §7): ``Σ_c (τ_ℓ / C_ℓ N_s) ∇f(θ_c)ᵀ ∇L(z_m, θ_c)``.

    Stage effects use the final query gradient without propagation.
    """
    steps = run.steps()
    scores: Scores = {}
    for number, segment in enumerate(plan):
        stage = run.stages[segment.stage]
        tau, _ = module_rates(work, segment, stage, steps)
        for checkpoint in segment.checkpoints:
            state = checkpoint_state(checkpoint)
            work.load(state)
            u = work.query_grads(queries, f"segment {number + 1}/{len(plan)} query gradients")
            weight = {n: tau.get(n, 0.0) / len(segment.checkpoints) for n in u}
            vectors = {n: u[n] * weight[n] for n in u}
            part = work.scores(work.train[stage.name], [lambda s=state: s], vectors, "tracin")
            _accumulate(scores, stage, part)
    work.load(final_state)
    u = work.query_grads(queries)
    return scores, {s.index: u for s in run.stages}
