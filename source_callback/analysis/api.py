"""``analyze``: segmented SOURCE scores and stage effects from a recorded run."""

from __future__ import annotations

import inspect
import os
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from source_callback.analysis import memory as footprint
from source_callback.analysis.cache import GradientCache
from source_callback.analysis.capture_check import check_capture
from source_callback.analysis.engine import Engine, ScoreTerm, State, StateSource
from source_callback.analysis.gradients import ModuleTensors
from source_callback.analysis.inputs import (
    Collate,
    Collation,
    average_states,
    check_datasets,
    check_first_batch,
    check_queries,
    checkpoint_state,
    partial_draws,
    unknown_scales,
)
from source_callback.analysis.namespace import RunView
from source_callback.analysis.optimizers import (
    AdamOptions,
    AdamVariant,
    module_rates,
    segment_operator,
    stage_modules,
)
from source_callback.analysis.options import AnalysisOptions, Fisher, Method, option_names
from source_callback.analysis.parallel import Workers
from source_callback.analysis.probes import check_probes
from source_callback.analysis.progress import PlannedPass, Progress
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
from source_callback.analysis.timing import Timer
from source_callback.analysis.units import MATRIX_LAYOUT, SelectionSpec
from source_callback.describe import format_table
from source_callback.errors import AnalysisError
from source_callback.optim import UpdateRule
from source_callback.store.analyses import AnalysisWriter, write_analysis
from source_callback.store.reader import open_run
from source_callback.store.schema import (
    CONFIG_COVERAGE,
    INFO_CONFIG,
    INFO_STAGE_NAMES,
    ROLE_END,
    ROLE_START,
)

if TYPE_CHECKING:
    from lightning.fabric import Fabric


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
    fisher: Fisher = "sampled",
    seed: int = 0,
    collate_fn: Collate | Mapping[str, Collate] = None,
    name: str | None = "default",
    adam_variant: AdamVariant = "factored",
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
    curvature_examples: int | float | None = None,
    options: AnalysisOptions | None = None,
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
    method, segments, batch_size, fisher, seed, optimizer_model, momentum_tail
        Settings of the computation: the fields of :class:`AnalysisOptions` of the same names,
        which document them (same defaults, same checks).
    adam_variant, damping, preconditioner_floor, modules, diagonal_above, curvature_examples
        More fields of :class:`AnalysisOptions`.
    out_of_core, cache, projection_dim
        More fields of :class:`AnalysisOptions`; ``out_of_core`` and ``cache`` need ``name``.
    options
        All of those settings in one object, instead of the keyword arguments (which then keep
        their defaults: a setting given both ways is refused).
    storage_options
        fsspec options for a remote store.
    collate_fn
        What collates a list of examples into a batch, as in training (a Hugging Face
        ``Trainer``'s ``data_collator``); ``None`` is torch's ``default_collate``. Stages
        trained with different ones: a mapping from every stage's name to its own (the
        queries take the last stage's).
    name
        The result is also written into the store under ``analyses/<name>/`` (replacing one of
        that name) and can be reopened with :func:`load_analysis`; ``None`` skips writing.
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
        Show progress bars and, at the end, a summary: stages, segments, units and the share
        of each stage's trained parameters they cover, time per pass, where the result is
        stored (rank 0 only).

    Returns
    -------
    AnalysisResult
        The same on every process of a distributed analysis (its ``timings`` are the
        process's own).

    Raises
    ------
    AnalysisError
        Among others: the estimate of the memory the analysis will hold on its device
        (:mod:`source_callback.analysis.memory`) exceeds what is available; the message names
        the largest units and settings that fit. The environment variable
        ``SOURCE_CALLBACK_MEMORY_LIMIT`` (bytes, or e.g. ``"8GiB"``) sets the limit.
    TypeError, ValueError
        A setting has the wrong type or value (see :class:`AnalysisOptions`).
    """
    given = {key: value for key, value in locals().items() if key in OPTION_NAMES}
    settings = _settings(options, given)
    timer = Timer()
    with timer("record checks"):
        check_queries(queries)
        run, models, task = _open_record(store, storage_options, model, task, train, settings)
        collation = Collation.of(collate_fn, [s.name for s in run.stages])
        if settings.method == "if":
            collation.pooled(settings.method)
    workers = start_workers(models[-1], fabric, accelerator, devices, num_nodes, strategy)
    if (settings.out_of_core or workers.distributed or settings.cache) and name is None:
        raise ValueError(
            "out-of-core, cached and distributed analyses write into the store: pass a name "
            "for the analysis (name='default')."
        )
    with Progress(verbose and workers.rank == 0) as progress:
        with timer("engines and probes"):
            stages = _build_engines(
                run, models, task, train, queries, settings, collation, progress, workers, timer
            )
        with timer("segment plan"):
            plan = _plan(run, stages, queries, settings)
        coverage = _coverage(stages)
        config = _stored_config(settings, plan, stages, coverage)
        info = {INFO_STAGE_NAMES: [s.name for s in run.stages], INFO_CONFIG: config}
        writer, sink = _open_sink(run, queries, settings, workers, name, storage_options, info)
        final_state = _read(stages.final, run, len(run.stages) - 1, ROLE_END)
        job = _Job(run, stages, plan, queries, settings, final_state, sink)
        arrivals = _attribute(job, config, name, storage_options)
        with timer("stage effects"):
            effects, last_exact = _stage_effects(job, arrivals)
    with timer("writing results"):
        if writer is None:
            result = _keep(job, info, effects, last_exact, name, storage_options)
        else:
            result = _commit(job, writer, workers, effects, last_exact, name, storage_options)  # type: ignore[arg-type]
    result.timings = dict(timer.seconds)
    if progress.shown:
        print(summary(job, coverage, result.timings, name))
    return result


OPTION_NAMES = option_names()


def _settings(options: AnalysisOptions | None, given: dict[str, Any]) -> AnalysisOptions:
    """The options of a call to :func:`analyze`: ``options``, or its keyword arguments.

    A keyword argument other than its default, beside ``options``, is refused.
    """
    if options is None:
        return AnalysisOptions(**given)
    defaults = inspect.signature(analyze).parameters
    both = [key for key, value in given.items() if value != defaults[key].default]
    if both:
        raise ValueError(
            f"analyze() got {', '.join(both)} both in options= and as keyword argument(s); "
            "give each setting once"
        )
    return options


Arrivals = dict[int, ModuleTensors]  # per stage index: the query vector at the stage's end


@dataclass
class _Job:
    """What the steps of one analysis share, once it is planned."""

    run: RunView
    stages: StageEngines
    plan: list[Segment]
    queries: Dataset
    options: AnalysisOptions
    final_state: State
    sink: ScoreSink


def _open_record(
    store: str | os.PathLike[str],
    storage_options: dict[str, Any] | None,
    model: ModelSpec,
    task: str | Task,
    train: Mapping[str, Dataset],
    options: AnalysisOptions,
) -> tuple[RunView, list[nn.Module], Task]:
    """Open the record and check it, the models, the task and the data against each other.

    Returns the run as the models name its tensors, the model of each stage and the task.
    """
    recorded = open_run(store, storage_options)
    recorded.require_intact()
    incomplete = [s.name for s in recorded.stages if not s.complete]
    if not recorded.stages or incomplete:
        raise AnalysisError(
            f"{recorded.url} has incomplete stage(s) {incomplete or 'none recorded'}; analyze "
            "needs every stage recorded to its end."
        )
    resolved = resolve_task(task)
    if options.fisher == "exact" and not isinstance(resolved, ExactFisherTask):
        raise AnalysisError("fisher='exact' needs a task with exact_pseudo_losses()")
    models = models_per_stage(model, recorded)
    run = run_view(recorded, models)
    if len(set(run.owners)) > 1 and (options.method in ("if", "tracin") or options.cache):
        raise ValueError(
            "with one model per stage, analyze supports method 'source' or 'fast-source' "
            "without a cache: influence and TracIn take every gradient at the final model "
            "(pass the last stage's model alone), and the projected cache is per model"
        )
    check_datasets(run, train)
    for problem in [*partial_draws(run), *unknown_scales(run)]:
        warnings.warn(problem, UserWarning, stacklevel=3)
    run.check_continuity()
    return run, models, resolved


def _build_engines(
    run: RunView,
    models: list[nn.Module],
    task: Task,
    train: Mapping[str, Dataset],
    queries: Dataset,
    options: AnalysisOptions,
    collation: Collation,
    progress: Progress,
    workers: Workers,
    timer: Timer,
) -> StageEngines:
    """One engine per distinct model, with its units; the first batches and probes checked."""
    stages = StageEngines.build(
        run,
        models,
        lambda copy, units: Engine(
            copy,
            task,
            train,
            options.batch_size,
            options.fisher,
            options.seed,
            progress,
            collation,
            workers,
            units,
            timer,
            options.curvature_examples,
        ),
        options.modules,
        options.diagonal_above,
        workers.device,
    )
    copies = [engine.model for engine in stages.engines]
    for stage, copy in zip(run.stages, copies, strict=True):
        what = f"the training set of stage {stage.name!r}, {type(task).__name__}.loss"
        collate = collation.stage(stage.name)
        workers.run(
            lambda m=copy, d=train[stage.name], c=collate, w=what: check_first_batch(
                task.loss, m, d, c, w
            )
        )
    what = f"the queries, {type(task).__name__}.measurement"
    workers.run(
        lambda: check_first_batch(task.measurement, copies[-1], queries, collation.queries, what)
    )
    workers.run(lambda: check_probes(run, copies, task, train, collation))  # errors shared
    for engine in stages.distinct:  # each model on the first stage it analyzes
        stage = run.stages[stages.engines.index(engine)]
        label = f"the model of stage {stage.name!r}"
        data, collate = train[stage.name], collation.stage(stage.name)
        workers.run(
            lambda e=engine, d=data, c=collate, label=label: check_capture(
                e.model, e.modules, task.loss, d, c, label
            )
        )
    return stages


def _plan(
    run: RunView, stages: StageEngines, queries: Dataset, options: AnalysisOptions
) -> list[Segment]:
    """The segments, in training order, once the memory they need is known to fit."""
    plan = plan_segments(
        run,
        options.segments,
        momentum_tail=options.momentum_tail,
        optimizer_model=options.optimizer_model,
    )
    model_bytes = sum(
        p.numel() * p.element_size() for e in stages.distinct for p in e.model.parameters()
    )
    needs = footprint.Plan(len(queries), len(plan), model_bytes)
    footprint.check(stages.units, needs, stages.final.device)  # type: ignore[arg-type]
    footprint.warn_large_sides(stages.units, needs)
    return plan


#: Options stored in an analysis's configuration as given (``segments`` and ``modules`` are
#: stored resolved: the segments' steps and the units' names).
STORED_AS_GIVEN = (
    "method",
    "momentum_tail",
    "fisher",
    "seed",
    "optimizer_model",
    "diagonal_above",
    "curvature_examples",
)


def _stored_config(
    options: AnalysisOptions,
    plan: list[Segment],
    stages: StageEngines,
    coverage: dict[str, tuple[float, dict[str, str]]],
) -> dict[str, Any]:
    """The configuration stored with the results (``AnalysisResult.config``), in the options' names.

    It also keys the projected cache: a cache is reused only where it is the same.
    """
    given = options.to_json()
    cache = {"kind": options.cache, "projection_dim": options.projection_dim}
    return {
        **{key: given[key] for key in STORED_AS_GIVEN},
        "segments": [[s.start, s.end] for s in plan],
        "modules": sorted(stages.units),
        CONFIG_COVERAGE: {name: share for name, (share, _) in coverage.items()},
        "cache": cache if options.cache else None,
    }


def _open_sink(
    run: RunView,
    queries: Dataset,
    options: AnalysisOptions,
    workers: Workers,
    name: str | None,
    storage_options: dict[str, Any] | None,
    info: dict[str, Any],
) -> tuple[AnalysisWriter | None, ScoreSink]:
    """Where the scores are added up: in the store (out of core, distributed), or in memory."""
    shapes = [(len(queries), s.num_examples or 0) for s in run.stages]  # type: ignore[arg-type]
    if options.out_of_core or workers.distributed:
        writer = _open_writer(workers, run.url, storage_options, name, shapes, info)  # type: ignore[arg-type]
        return writer, StoredScores(writer.scores)
    return None, MemoryScores(shapes)


def _read(engine: Engine, run: RunView, stage: int, role: str) -> State:
    """The state at the start or end (``role``) of a stage, timed as a checkpoint read."""
    return engine.read(lambda: checkpoint_state(run.boundary(stage, role)))


def _attribute(
    job: _Job, config: dict[str, Any], name: str | None, storage_options: dict[str, Any] | None
) -> Arrivals:
    """Score every training example by the method; each stage's query vector at its end."""
    if job.options.method == "if":
        return _influence(job)
    if job.options.method == "tracin":
        return _tracin(job)
    cache = _gradient_cache(job, config, name, storage_options) if job.options.cache else None  # type: ignore[arg-type]
    return _source(job, cache)


def _gradient_cache(
    job: _Job,
    config: dict[str, Any],
    name: str,
    storage_options: dict[str, Any] | None,
) -> GradientCache:
    """The projected cache of analysis ``name``, keyed by every setting that shapes it."""
    options, work = job.options, job.stages.final
    settings = {
        **config,
        "adam": [options.adam_variant, options.damping, options.preconditioner_floor],
        "batch_size": options.batch_size,
        "projection_dim": options.projection_dim,
        "matrix_layout": MATRIX_LAYOUT,
        "stages": [[s.name, s.num_examples, s.fingerprint] for s in job.run.stages],
    }
    projection = KroneckerProjection.for_modules(
        work.modules, options.projection_dim, options.seed, work.device
    )
    return GradientCache(job.run.url, storage_options, name, settings, projection)


def _stage_effects(job: _Job, arrivals: Arrivals) -> tuple[np.ndarray, np.ndarray]:
    """Each stage's effect on each query (SOURCE-math §5), and the last one's exact value."""
    work, run = job.stages.final, job.run
    work.load(job.final_state)
    f_final = work.measurement(job.queries)
    effects = np.zeros((len(f_final), len(run.stages)))
    for stage in run.stages:
        engine = job.stages.engines[stage.index]
        before = engine.module_matrices(_read(engine, run, stage.index, ROLE_START))
        after = engine.module_matrices(_read(engine, run, stage.index, ROLE_END))
        delta = {n: after[n] - before[n] for n in after}
        effects[:, stage.index] = -dot(arrivals[stage.index], delta).cpu().numpy()
    work.load(_read(work, run, len(run.stages) - 1, ROLE_START))
    return effects, work.measurement(job.queries) - f_final


def _keep(
    job: _Job,
    info: dict[str, Any],
    effects: np.ndarray,
    last_exact: np.ndarray,
    name: str | None,
    storage_options: dict[str, Any] | None,
) -> AnalysisResult:
    """The result of scores held in memory; written into the store unless ``name`` is None."""
    arrays = job.sink.arrays  # type: ignore[attr-defined]
    names = info[INFO_STAGE_NAMES]
    if name is not None:
        write_analysis(job.run.url, storage_options, name, arrays, effects, last_exact, info)
    return AnalysisResult(
        dict(zip(names, arrays, strict=True)), names, effects, last_exact, info[INFO_CONFIG]
    )


def _commit(
    job: _Job,
    writer: AnalysisWriter,
    workers: Workers,
    effects: np.ndarray,
    last_exact: np.ndarray,
    name: str,
    storage_options: dict[str, Any] | None,
) -> AnalysisResult:
    """Commit scores written into the store (once every rank has written its blocks)."""
    workers.barrier()  # every rank's blocks are written
    if workers.rank == 0:
        writer.commit(effects, last_exact)
    workers.barrier()
    result = load_analysis(job.run.url, name, storage_options)
    if not job.options.out_of_core:
        result.scores = {n: np.asarray(a[...]) for n, a in result.scores.items()}
    return result


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


def _state_sources(segment: Segment, averaged: bool) -> list[StateSource]:
    """Loaders of the segment's states: each checkpoint, or (Fast-SOURCE) their average."""
    if averaged:
        return [lambda: average_states([checkpoint_state(c) for c in segment.checkpoints])]
    return [lambda c=c: checkpoint_state(c) for c in segment.checkpoints]


def _last_segments(plan: list[Segment]) -> dict[int, int]:
    return {stage: numbers[-1] for stage, numbers in _stage_segments(plan).items()}


def _source(job: _Job, cache: GradientCache | None) -> Arrivals:
    """Segmented SOURCE (SOURCE-math §3): fit every segment, sweep the queries back, score.

    Each segment is fitted and scored by its stage's engine. With a cache (one model), the
    operators and training gradients come from it when it matches, and are written into it
    otherwise.
    """
    run, plan, options, work = job.run, job.plan, job.options, job.stages.final
    averaged = options.method == "fast-source"
    states = [_state_sources(segment, averaged) for segment in plan]
    datasets = [work.train[run.stages[segment.stage].name] for segment in plan]
    engines = [job.stages.engines[segment.stage] for segment in plan]
    operators = cache.stored_operators(work) if cache else None
    fitted = operators is None
    _show_plan(job, _source_passes(job, engines, datasets, states, fitted, cache is not None))
    if operators is None:
        adam = AdamOptions(options.adam_variant, options.damping, options.preconditioner_floor)
        steps = run.steps()
        operators = []
        for number, (segment, segment_states) in enumerate(zip(plan, states, strict=True)):
            stage = run.stages[segment.stage]
            rule = UpdateRule(options.optimizer_model or stage.optimizer.update_rule)
            label = f"segment {number + 1}/{len(plan)}"
            with work.timer("segment operators"):
                operators.append(
                    segment_operator(
                        engines[number], segment, stage, rule, segment_states, steps, label, adam
                    )
                )
    work.load(job.final_state)
    with work.timer("sweep"):
        responses, arrivals = sweep(
            operators, work.query_grads(job.queries), job.stages.crossings(plan)
        )
    indices = [segment.stage for segment in plan]
    weights = [1 / run.stages[index].num_examples for index in indices]  # type: ignore[operator]
    if cache is not None:
        if fitted:
            cache.build(work, datasets, operators, states)
        with work.timer("scoring"):
            cache.score(work, operators, responses, indices, weights, job.sink)
    else:
        for index, numbers in _stage_segments(plan).items():
            terms = [
                ScoreTerm(state, responses[n], weights[n] / len(states[n]))
                for n in numbers
                for state in states[n]
            ]
            engine = engines[numbers[0]]
            engine.scores(
                datasets[numbers[0]],
                terms,
                f"stage {index + 1}/{len(run.stages)}",
                job.sink,
                index,
                stage_modules(engine, run.stages[index]),
            )
    return {k: arrivals[n] for k, n in _last_segments(plan).items()}


def _stage_segments(plan: list[Segment]) -> dict[int, list[int]]:
    """The numbers of each stage's segments in ``plan``, by stage index (scored together)."""
    numbers: dict[int, list[int]] = {}
    for number, segment in enumerate(plan):
        numbers.setdefault(segment.stage, []).append(number)
    return numbers


def _source_passes(
    job: _Job,
    engines: list[Engine],
    datasets: list[Dataset],
    states: list[list[StateSource]],
    fitting: bool,
    cached: bool,
) -> list[PlannedPass]:
    """Each data pass :func:`_source` makes, segment ``ℓ`` on ``datasets[ℓ]``.

    ``fitting``: the segment operators are fitted (no stored cache holds them); ``cached``:
    scored through the projected cache.
    """
    work = job.stages.final
    passes: list[PlannedPass] = []
    segments = list(zip(job.plan, engines, datasets, states, strict=True))
    if fitting:
        for segment, engine, dataset, segment_states in segments:
            modules = stage_modules(engine, job.run.stages[segment.stage])
            passes += engine.curvature_passes(dataset, len(segment_states), modules)
    passes += work.query_passes(job.queries)
    if cached:
        if fitting:
            for _, _, dataset, segment_states in segments:
                passes += work.cache_passes(dataset, len(segment_states))
        return passes
    for numbers in _stage_segments(job.plan).values():
        terms = sum(len(states[n]) for n in numbers)
        passes += engines[numbers[0]].score_passes(datasets[numbers[0]], terms, job.sink)
    return passes


def _show_plan(job: _Job, passes: list[PlannedPass]) -> None:
    """Show the progress of the whole analysis: the method's ``passes``.

    The two measurements of :func:`_stage_effects` are added to them.
    """
    work = job.stages.final
    work.progress.plan(passes + work.measurement_passes(job.queries) * 2)


def _influence(job: _Job) -> Arrivals:
    """EK-FAC influence at the final parameters on all stages' data pooled (SOURCE-math §7).

    Damping is ``damping`` times each module's mean eigenvalue. Stage effects use the final
    query gradient without propagation (first order, no forgetting).
    """
    work, run, final_state = job.stages.final, job.run, job.final_state
    pooled = ConcatDataset([work.train[s.name] for s in run.stages])
    scoring = [p for s in run.stages for p in work.score_passes(work.train[s.name], 1, job.sink)]
    queries = work.query_passes(job.queries)
    _show_plan(job, work.curvature_passes(pooled, 1) + queries + scoring)
    curvature = work.curvature(pooled, [lambda: final_state], "influence")
    work.load(final_state)
    u = work.query_grads(job.queries)
    delta = {n: job.options.damping * float(c.eigenvalues.mean()) for n, c in curvature.items()}
    vectors = {
        n: c.apply(u[n], lambda lam, n=n: 1 / (lam + delta[n])) for n, c in curvature.items()
    }
    terms = [ScoreTerm(lambda: final_state, vectors, 1 / len(pooled))]
    for s in run.stages:
        work.scores(work.train[s.name], terms, "influence", job.sink, s.index)
    return {s.index: u for s in run.stages}


def _tracin(job: _Job) -> Arrivals:
    """TracInCP (SOURCE-math §7): ``Σ_c (τ_ℓ / C_ℓ N_s) ∇f(θ_c)ᵀ ∇L(z_m, θ_c)``.

    Stage effects use the final query gradient without propagation.
    """
    work, run, plan = job.stages.final, job.run, job.plan
    queries = work.query_passes(job.queries)
    per_checkpoint = [
        queries + work.score_passes(work.train[run.stages[segment.stage].name], 1, job.sink)
        for segment in plan
        for _ in segment.checkpoints
    ]
    _show_plan(job, [p for passes in per_checkpoint for p in passes] + queries)
    steps = run.steps()
    for number, segment in enumerate(plan):
        stage = run.stages[segment.stage]
        tau, _ = module_rates(work, segment, stage, steps)
        for checkpoint in segment.checkpoints:
            state = work.read(lambda c=checkpoint: checkpoint_state(c))
            work.load(state)
            label = f"segment {number + 1}/{len(plan)} query gradients"
            u = work.query_grads(job.queries, label)
            weight = {n: tau.get(n, 0.0) / len(segment.checkpoints) for n in u}
            vectors = {n: u[n] * weight[n] for n in u}
            work.scores(
                work.train[stage.name],
                [ScoreTerm(lambda s=state: s, vectors, 1 / stage.num_examples)],  # type: ignore[operator]
                "tracin",
                job.sink,
                stage.index,
                stage_modules(work, stage),
            )
    work.load(job.final_state)
    u = work.query_grads(job.queries)
    return {s.index: u for s in run.stages}


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


SHOWN_UNCOVERED = 5  # parameters the summary names per stage that no selected unit covers


def summary(
    job: _Job,
    coverage: dict[str, tuple[float, dict[str, str]]],
    timings: dict[str, float],
    name: str | None,
) -> str:
    """What :func:`analyze` prints when it is done (``verbose``, rank 0): one screen.

    The method and sizes; per stage its examples, segments and the share of its trained
    parameters the selected units cover (with the first parameters none covers, and why);
    the time each step took; where the result is stored.
    """
    segments = Counter(segment.stage for segment in job.plan)
    rows = [
        (
            stage.name,
            f"{stage.num_examples:,}",
            str(segments[stage.index]),
            f"{coverage[stage.name][0]:.1%}",
        )
        for stage in job.run.stages
    ]
    lines = [
        f"{job.options.method} analysis of {len(job.queries):,} queries: "  # type: ignore[arg-type]
        f"{len(job.run.stages)} stage(s), {len(job.plan)} segment(s), "
        f"{len(job.stages.units)} unit(s)",
        *format_table(("stage", "examples", "segments", "trained parameters covered"), rows),
    ]
    for stage, (_, why) in coverage.items():
        if why:
            shown = ", ".join(
                f"{p} ({reason})" for p, reason in list(why.items())[:SHOWN_UNCOVERED]
            )
            more = f" and {len(why) - SHOWN_UNCOVERED} more" if len(why) > SHOWN_UNCOVERED else ""
            lines.append(f"  not attributed in stage {stage!r}: {shown}{more}")
    lines.append(f"time per step ({sum(timings.values()):.2f} s in all):")
    times = [(step, f"{seconds:.2f} s") for step, seconds in timings.items()]
    lines += format_table(("step", "time"), times)[1:]
    where = f"stored in {job.run.url} under analyses/{name}" if name else "not stored (name=None)"
    return "\n".join([*lines, where])
