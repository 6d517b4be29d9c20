"""``analyze``: segmented SOURCE scores and stage effects from a recorded run."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from source_callback.analysis import memory as footprint
from source_callback.analysis.cache import GradientCache
from source_callback.analysis.engine import Engine, State, StateSource
from source_callback.analysis.gradients import ModuleTensors
from source_callback.analysis.inputs import average_states, check_datasets, checkpoint_state
from source_callback.analysis.namespace import RunView
from source_callback.analysis.optimizers import (
    AdamOptions,
    AdamVariant,
    module_rates,
    segment_operator,
)
from source_callback.analysis.parallel import Workers
from source_callback.analysis.probes import check_probes
from source_callback.analysis.projection import KroneckerProjection
from source_callback.analysis.results import AnalysisResult, load_analysis
from source_callback.analysis.scores import MemoryScores, ScoreSink, StoredScores
from source_callback.analysis.segments import Segment, SegmentSpec, plan_segments
from source_callback.analysis.source import dot, sweep
from source_callback.analysis.stage_models import (
    ModelSpec,
    StageEngines,
    models_per_stage,
    run_view,
)
from source_callback.analysis.task import ExactFisherTask, Task, resolve_task
from source_callback.analysis.units import SelectionSpec
from source_callback.errors import AnalysisError
from source_callback.optim import UpdateRule
from source_callback.store.analyses import AnalysisWriter, write_analysis
from source_callback.store.reader import open_run
from source_callback.store.schema import ROLE_END, ROLE_START

if TYPE_CHECKING:
    from lightning.fabric import Fabric

Method = Literal["source", "fast-source", "if", "tracin"]
METHODS = ("source", "fast-source", "if", "tracin")


def analyze(
    store: str | os.PathLike[str],
    *,
    model: ModelSpec,
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
    out_of_core: bool = False,
    cache: Literal["projected"] | None = None,
    projection_dim: int = 32,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    fabric: Fabric | None = None,
    verbose: bool = True,
    modules: SelectionSpec = None,
    diagonal_above: int | None = None,
) -> AnalysisResult:
    """Attribute the queries' measurements to training examples and stages with SOURCE.

    Parameters
    ----------
    store
        The record written by :class:`~source_callback.SourceCallback` (path or fsspec URL).
    model
        An instance of the last stage's architecture; weights come from the store (the
        instance itself is not modified). Or one instance per stage name, each the
        architecture that stage trained: for runs whose later stages drop tensors that earlier
        ones trained (an old head), which the last stage's model cannot compute their losses
        with (``method`` ``"source"`` or ``"fast-source"``, no cache).
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
    out_of_core
        Add the scores up in the store, one block of training examples at a time, instead of
        in memory; the returned scores are then Zarr arrays read where sliced (as from
        :func:`load_analysis`). Memory no longer grows with the number of training examples.
        Needs ``name``; a later analysis of the same name replaces what those arrays read.
    cache
        ``"projected"``: keep what scoring needs besides the queries under
        ``analyses/<name>/cache/`` — the segment operators and every training example's
        gradient, averaged over its segment's checkpoints and compressed by a per-module
        Kronecker random projection (float32) — and score from it. A later call with the same
        settings and any queries reuses it and makes no pass over the training data. Needs
        ``name``; ``method`` ``"source"`` or ``"fast-source"``.
    projection_dim
        With ``cache="projected"``: each module's ``[out, in]`` gradient is projected to
        ``[min(k, out), min(k, in)]`` with ``k = projection_dim`` (exact where ``k`` covers a
        side). Larger is more accurate and takes more disk; Adam stages need a larger ``k``
        than SGD ones for the same accuracy (see the benchmarks).
    accelerator, devices, num_nodes, strategy
        Run every data pass data-parallel on Lightning Fabric (``Fabric(accelerator=...,
        devices=..., num_nodes=..., strategy=...)``, launched here): each process takes a share
        of the data, and writes its own blocks of the scores into the store (needs ``name``).
        ``strategy="ddp"`` re-runs the calling script once per extra device, as Lightning's
        ``Trainer`` does. The defaults run in this process; see the "Scaling out" guide.
    fabric
        An already launched :class:`lightning.fabric.Fabric` to run on instead. Without one,
        a ``torch.distributed`` process group that is already initialised (``torchrun``,
        SLURM) is used as it is.
    verbose
        Show progress bars and the coverage (rank 0 only).
    modules
        The units to attribute through (a unit: a module's parameters with their own
        curvature; a parameter tied between modules is one unit named ``"a+b"``): a
        :class:`~source_callback.ModuleSelection`, a list of ``fnmatch`` include patterns, or
        ``{"include": [...], "exclude": [...]}``; all by default. The share of each stage's
        trained parameters covered is ``result.coverage``.
    diagonal_above
        Sides of a unit's gradient matrix longer than this (e.g. a 50,000-token output layer)
        get an identity eigenbasis instead of a dense ``[n, n]`` factor; ``None``: only
        embeddings' token sides and units of norm weights and standalone biases are diagonal.

    Returns
    -------
    AnalysisResult
        The same on every process of a distributed analysis.

    Raises
    ------
    AnalysisError
        Among others: the estimate of the memory the analysis will hold on its device
        (:mod:`source_callback.analysis.memory`) exceeds what is available; the message names
        the largest units and settings that fit. The environment variable
        ``SOURCE_CALLBACK_MEMORY_LIMIT`` (bytes, or e.g. ``"8GiB"``) sets the limit.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if cache not in (None, "projected"):
        raise ValueError(f"cache must be None or 'projected', got {cache!r}")
    if cache and method not in ("source", "fast-source"):
        raise ValueError(
            f"cache='projected' serves method 'source' or 'fast-source', not {method!r}"
        )
    if fisher not in ("sampled", "exact"):
        raise ValueError(f"fisher must be 'sampled' or 'exact', got {fisher!r}")
    recorded = open_run(store, storage_options)
    recorded.require_intact()
    incomplete = [s.name for s in recorded.stages if not s.complete]
    if not recorded.stages or incomplete:
        raise AnalysisError(
            f"{recorded.url} has incomplete stage(s) {incomplete or 'none recorded'}; analyze "
            "needs every stage recorded to its end."
        )
    task = resolve_task(task)
    if fisher == "exact" and not isinstance(task, ExactFisherTask):
        raise AnalysisError("fisher='exact' needs a task with exact_pseudo_losses()")
    models = models_per_stage(model, recorded)
    run = run_view(recorded, models)
    if len(set(run.owners)) > 1 and (method in ("if", "tracin") or cache):
        raise ValueError(
            "with one model per stage, analyze supports method 'source' or 'fast-source' "
            "without a cache: influence and TracIn take every gradient at the final model "
            "(pass the last stage's model alone), and the projected cache is per model"
        )
    check_datasets(run, train)
    run.check_continuity()
    workers = start_workers(models[-1], fabric, accelerator, devices, num_nodes, strategy)
    if (out_of_core or workers.distributed or cache) and name is None:
        raise ValueError(
            "out-of-core, cached and distributed analyses write into the store: pass a name "
            "for the analysis (name='default')."
        )
    stages = StageEngines.build(
        run,
        models,
        lambda copy, units: Engine(
            copy,
            task,
            train,
            batch_size,
            fisher,
            seed,
            verbose,
            collate_fn,
            workers,
            units,
        ),
        modules,
        diagonal_above,
        workers.device,
    )
    copies = [engine.model for engine in stages.engines]
    workers.run(lambda: check_probes(run, copies, task, train, collate_fn))  # errors shared
    work = stages.final
    plan = plan_segments(
        run, segments, momentum_tail=momentum_tail, optimizer_model=optimizer_model
    )
    model_bytes = sum(
        p.numel() * p.element_size() for e in stages.distinct for p in e.model.parameters()
    )
    footprint.check(stages.units, footprint.Plan(len(queries), len(plan), model_bytes), work.device)  # type: ignore[arg-type]
    coverage = _coverage(stages)
    last = len(run.stages) - 1
    final_state = checkpoint_state(run.boundary(last, ROLE_END))
    config = {
        "method": method,
        "segments": [[s.start, s.end] for s in plan],
        "momentum_tail": momentum_tail,
        "fisher": fisher,
        "seed": seed,
        "optimizer_model": None
        if optimizer_model is None
        else str(UpdateRule(optimizer_model).value),
        "modules": sorted(stages.units),
        "diagonal_above": diagonal_above,
        "coverage": {name: share for name, (share, _) in coverage.items()},
        "cache": {"kind": cache, "projection_dim": projection_dim} if cache else None,
    }
    if work.verbose:
        _print_coverage(coverage)
    stage_names = [s.name for s in run.stages]
    shapes = [(len(queries), s.num_examples or 0) for s in run.stages]  # type: ignore[arg-type]
    info = {"stage_names": stage_names, "config": config}
    writer: AnalysisWriter | None = None
    sink: ScoreSink
    if out_of_core or workers.distributed:
        writer = _open_writer(workers, run.url, storage_options, name, shapes, info)  # type: ignore[arg-type]
        sink = StoredScores(writer.scores)
    else:
        sink = memory = MemoryScores(shapes)

    if method in ("source", "fast-source"):
        adam = AdamOptions(adam_variant, damping, preconditioner_floor)
        gradient_cache = None
        if cache:
            settings = {
                **config,
                "adam": [adam_variant, damping, preconditioner_floor],
                "batch_size": batch_size,
                "projection_dim": projection_dim,
                "stages": [[s.name, s.num_examples, s.fingerprint] for s in run.stages],
            }
            projection = KroneckerProjection.for_modules(
                work.modules, projection_dim, seed, work.device
            )
            gradient_cache = GradientCache(run.url, storage_options, name, settings, projection)  # type: ignore[arg-type]
        arrivals = _source(
            stages,
            run,
            plan,
            queries,
            final_state,
            method,
            optimizer_model,
            adam,
            sink,
            gradient_cache,
        )
    elif method == "if":
        arrivals = _influence(work, run, queries, final_state, damping, sink)
    else:
        arrivals = _tracin(work, run, plan, queries, final_state, sink)

    work.load(final_state)
    f_final = work.measurement(queries)
    effects = np.zeros((len(f_final), len(run.stages)))
    for stage in run.stages:
        engine = stages.engines[stage.index]
        before = engine.module_matrices(checkpoint_state(run.boundary(stage.index, ROLE_START)))
        after = engine.module_matrices(checkpoint_state(run.boundary(stage.index, ROLE_END)))
        delta = {n: after[n] - before[n] for n in after}
        effects[:, stage.index] = -dot(arrivals[stage.index], delta).cpu().numpy()
    work.load(checkpoint_state(run.boundary(last, ROLE_START)))
    last_exact = work.measurement(queries) - f_final

    if writer is None:
        result = AnalysisResult(
            dict(zip(stage_names, memory.arrays, strict=True)),
            stage_names,
            effects,
            last_exact,
            config,
        )
        if name is not None:
            write_analysis(run.url, storage_options, name, memory.arrays, effects, last_exact, info)
        return result
    workers.barrier()  # every rank's blocks are written
    if workers.rank == 0:
        writer.commit(effects, last_exact)
    workers.barrier()
    result = load_analysis(run.url, name, storage_options)  # type: ignore[arg-type]
    if not out_of_core:
        result.scores = {n: np.asarray(a[...]) for n, a in result.scores.items()}
    return result


def _coverage(stages: StageEngines) -> dict[str, tuple[float, dict[str, str]]]:
    """Per stage: the share of its trained parameters (elements) in selected units.

    With it, why each of the stage's other trained parameters is in none, in the stage's order.
    """
    out = {}
    for stage, engine, found in zip(stages.run.stages, stages.engines, stages.found, strict=True):
        covered = {p for unit in engine.modules.values() for p in unit.params}
        trained = [p for p in stage.trainable if p in found.numel]
        total = sum(found.numel[p] for p in trained)
        share = sum(found.numel[p] for p in trained if p in covered) / total if total else 1.0
        why = {p: found.uncovered.get(p, "not selected") for p in trained if p not in covered}
        out[stage.name] = (share, why)
    return out


def _print_coverage(coverage: dict[str, tuple[float, dict[str, str]]]) -> None:
    """One line per stage; the first parameters no selected unit covers, with the reason."""
    for stage, (share, why) in coverage.items():
        line = f"coverage of stage {stage!r}: {share:.1%} of its trained parameters"
        if why:
            shown = ", ".join(f"{p} ({reason})" for p, reason in list(why.items())[:5])
            more = f" and {len(why) - 5} more" if len(why) > 5 else ""
            line += f"; not attributed: {shown}{more}"
        print(line)


def start_workers(
    model: nn.Module,
    fabric: Fabric | None,
    accelerator: str,
    devices: int | str,
    num_nodes: int,
    strategy: str,
) -> Workers:
    """The processes to analyze on: a given Fabric, one launched here, or an existing group."""
    if fabric is None and (accelerator, devices, num_nodes, strategy) != ("auto", 1, 1, "auto"):
        from lightning.fabric import Fabric

        fabric = Fabric(
            accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy
        )
        fabric.launch()
    if fabric is not None:
        return Workers(fabric.device, distributed=fabric.world_size > 1)
    return Workers(next(model.parameters()).device, distributed=True)


def _open_writer(
    workers: Workers,
    url: str,
    storage_options: dict[str, Any] | None,
    name: str,
    shapes: list[tuple[int, int]],
    info: dict[str, Any],
) -> AnalysisWriter:
    """Rank 0 creates the analysis's arrays; the other ranks open them once they exist."""
    created = workers.run(
        lambda: (
            AnalysisWriter(url, storage_options, name, shapes, np.float64, info)
            if workers.rank == 0
            else None
        )
    )
    return workers.run(lambda: created or AnalysisWriter.reopen(url, storage_options, name))


Arrivals = dict[int, ModuleTensors]  # per stage index: the query vector at the stage's end


def _state_sources(segment: Segment, averaged: bool) -> list[StateSource]:
    """Loaders of the segment's states: each checkpoint, or (Fast-SOURCE) their average."""
    if averaged:
        return [lambda: average_states([checkpoint_state(c) for c in segment.checkpoints])]
    return [lambda c=c: checkpoint_state(c) for c in segment.checkpoints]


def _last_segments(plan: list[Segment]) -> dict[int, int]:
    return {segment.stage: number for number, segment in enumerate(plan)}


def _source(
    stages: StageEngines,
    run: RunView,
    plan: list[Segment],
    queries: Dataset,
    final_state: State,
    method: str,
    optimizer_model: UpdateRule | str | None,
    adam: AdamOptions,
    sink: ScoreSink,
    cache: GradientCache | None,
) -> Arrivals:
    """Segmented SOURCE (SOURCE-math §3): fit every segment, sweep the queries back, score.

    Each segment is fitted and scored by its stage's engine. With a cache (one model), the
    operators and training gradients come from it when it matches, and are written into it
    otherwise.
    """
    work = stages.final
    states = [_state_sources(segment, averaged=method == "fast-source") for segment in plan]
    datasets = [work.train[run.stages[segment.stage].name] for segment in plan]
    engines = [stages.engines[segment.stage] for segment in plan]
    operators = cache.stored_operators(work) if cache else None
    fitted = operators is None
    if operators is None:
        steps = run.steps()
        operators = []
        for number, (segment, segment_states) in enumerate(zip(plan, states, strict=True)):
            stage = run.stages[segment.stage]
            rule = UpdateRule(optimizer_model) if optimizer_model else stage.optimizer.update_rule
            label = f"segment {number + 1}/{len(plan)}"
            operators.append(
                segment_operator(
                    engines[number], segment, stage, rule, segment_states, steps, label, adam
                )
            )
    work.load(final_state)
    responses, arrivals = sweep(operators, work.query_grads(queries), stages.crossings(plan))
    indices = [segment.stage for segment in plan]
    weights = [1 / run.stages[index].num_examples for index in indices]  # type: ignore[operator]
    if cache is not None:
        if fitted:
            cache.build(work, datasets, operators, states)
        cache.score(work, operators, responses, indices, weights, sink)
    else:
        for number, (segment_states, dataset) in enumerate(zip(states, datasets, strict=True)):
            label = f"segment {number + 1}/{len(plan)}"
            engines[number].scores(
                dataset,
                segment_states,
                responses[number],
                label,
                sink,
                indices[number],
                weights[number],
            )
    return {k: arrivals[n] for k, n in _last_segments(plan).items()}


def _influence(
    work: Engine,
    run: RunView,
    queries: Dataset,
    final_state: State,
    damping: float,
    sink: ScoreSink,
) -> Arrivals:
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
    for s in run.stages:
        states = [lambda: final_state]
        work.scores(
            work.train[s.name], states, vectors, "influence", sink, s.index, 1 / len(pooled)
        )
    return {s.index: u for s in run.stages}


def _tracin(
    work: Engine,
    run: RunView,
    plan: list[Segment],
    queries: Dataset,
    final_state: State,
    sink: ScoreSink,
) -> Arrivals:
    """TracInCP (SOURCE-math §7): ``Σ_c (τ_ℓ / C_ℓ N_s) ∇f(θ_c)ᵀ ∇L(z_m, θ_c)``.

    Stage effects use the final query gradient without propagation.
    """
    steps = run.steps()
    for number, segment in enumerate(plan):
        stage = run.stages[segment.stage]
        tau, _ = module_rates(work, segment, stage, steps)
        for checkpoint in segment.checkpoints:
            state = checkpoint_state(checkpoint)
            work.load(state)
            u = work.query_grads(queries, f"segment {number + 1}/{len(plan)} query gradients")
            weight = {n: tau.get(n, 0.0) / len(segment.checkpoints) for n in u}
            vectors = {n: u[n] * weight[n] for n in u}
            work.scores(
                work.train[stage.name],
                [lambda s=state: s],
                vectors,
                "tracin",
                sink,
                stage.index,
                1 / stage.num_examples,  # type: ignore[operator]
            )
    work.load(final_state)
    u = work.query_grads(queries)
    return {s.index: u for s in run.stages}
