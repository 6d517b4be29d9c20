"""``analyze``: segmented SOURCE scores and stage effects from a recorded run."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from source_callback.analysis.engine import Engine
from source_callback.analysis.gradients import per_example_grads
from source_callback.analysis.inputs import (
    average_states,
    check_datasets,
    checkpoint_state,
    prepare_model,
)
from source_callback.analysis.optimizers import AdamVariant, segment_operator
from source_callback.analysis.segments import SegmentSpec, plan_segments
from source_callback.analysis.source import dot, sweep
from source_callback.analysis.task import ExactFisherTask, Task, resolve_task
from source_callback.errors import AnalysisError
from source_callback.optim import UpdateRule
from source_callback.store.reader import open_run
from source_callback.store.schema import ROLE_END, ROLE_START
from source_callback.store.writer import write_analysis

Method = Literal["source", "fast-source"]


@dataclass(frozen=True)
class Attribution:
    """One training example's score for a query."""

    stage: str
    index: int
    score: float


@dataclass
class AnalysisResult:
    """Scores and stage effects of one analysis.

    Attributes
    ----------
    scores
        Per stage name, ``[n_queries, n_examples of the stage]``: the predicted change of the
        query's measurement if the example were removed (SOURCE-math §1: with a loss
        measurement, positive means the example helped).
    stage_names
        Stage names in training order (the columns of ``stage_effects``).
    stage_effects
        ``[n_queries, n_stages]``: predicted change of the measurement had each stage's updates
        never been executed.
    last_stage_exact
        ``[n_queries]``: the exact value of that change for the last stage, for comparison.
    config
        The settings the analysis ran with.
    """

    scores: dict[str, np.ndarray]
    stage_names: list[str]
    stage_effects: np.ndarray
    last_stage_exact: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)

    def top(self, query: int, k: int = 10) -> tuple[list[Attribution], list[Attribution]]:
        """The ``k`` most helpful and ``k`` most harmful training examples for one query.

        Returns
        -------
        helpful, harmful
            Highest and lowest scores across all stages, each best first.
        """
        flat = [
            (stage, index, float(score))
            for stage in self.stage_names
            for index, score in enumerate(self.scores[stage][query])
        ]
        flat.sort(key=lambda item: item[2])
        harmful = [Attribution(*item) for item in flat[:k]]
        helpful = [Attribution(*item) for item in reversed(flat[-k:])]
        return helpful, harmful


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
        ``"classification"``, ``"regression"`` or a :class:`Task`.
    train
        Each stage's training dataset by stage name, in the order it was trained on; checked
        against the recorded size and fingerprint.
    queries
        Dataset of query examples, batched like the training data.
    segments
        Segments per stage, or per stage name a count or the global steps where segments start.
    method
        ``"source"`` (EK-FAC and gradients at every checkpoint of a segment, averaged) or
        ``"fast-source"`` (once, at the segment's average parameters).
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
        Relative damping of the inverse curvature in the ``"diagonal"`` Adam variant.
    name
        The result is also written into the store under ``analyses/<name>/`` (replacing one of
        that name) and can be reopened with :func:`load_analysis`; ``None`` skips writing.
    verbose
        Show progress bars.

    Returns
    -------
    AnalysisResult
    """
    if method not in ("source", "fast-source"):
        raise ValueError(f"method must be 'source' or 'fast-source', got {method!r}")
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
        run, prepare_model(model, run), task, train, batch_size, fisher, seed, verbose, collate_fn
    )
    plan = plan_segments(
        run, segments, momentum_tail=momentum_tail, optimizer_model=optimizer_model
    )
    by_role = {(c.stage, c.role): c for c in run.checkpoints if c.committed}

    steps = run.steps()
    operators, segment_states = [], []
    for number, segment in enumerate(plan):
        stage = run.stages[segment.stage]
        rule = UpdateRule(optimizer_model) if optimizer_model else stage.optimizer.update_rule
        states = [checkpoint_state(c) for c in segment.checkpoints]
        if method == "fast-source":
            states = [average_states(states)]
        segment_states.append(states)
        label = f"segment {number + 1}/{len(plan)}"
        operators.append(
            segment_operator(
                work, segment, stage, rule, states, steps, label, adam_variant, damping
            )
        )

    final = by_role.get((len(run.stages) - 1, ROLE_END))
    if final is None:
        raise AnalysisError(f"{run.url} has no committed final checkpoint (stage-end)")
    final_state = checkpoint_state(final)
    work.load(final_state)
    query_grads = per_example_grads(
        work.model, work.modules, task.measurement, work.data(queries, "query gradients")
    )
    f_final = work.measurement(queries)
    responses, arrivals = sweep(operators, query_grads)

    scores: dict[str, np.ndarray] = {}
    for number, (segment, states) in enumerate(zip(plan, segment_states, strict=True)):
        stage = run.stages[segment.stage]
        part = work.scores(stage, states, responses[number], f"segment {number + 1}/{len(plan)}")
        scores[stage.name] = scores.get(stage.name, 0) + part / stage.num_examples

    effects = np.zeros((len(f_final), len(run.stages)))
    for stage in run.stages:
        last_segment = max(i for i, s in enumerate(plan) if s.stage == stage.index)
        start, end = by_role.get((stage.index, ROLE_START)), by_role.get((stage.index, ROLE_END))
        if start is None or end is None:
            raise AnalysisError(f"stage {stage.name!r} lacks a committed start or end checkpoint")
        before, after = (
            work.module_matrices(checkpoint_state(start)),
            work.module_matrices(checkpoint_state(end)),
        )
        delta = {n: after[n] - before[n] for n in after}
        effects[:, stage.index] = -dot(arrivals[last_segment], delta).cpu().numpy()
    last_start = by_role[(len(run.stages) - 1, ROLE_START)]
    work.load(checkpoint_state(last_start))
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
            {_EFFECTS: result.stage_effects, _LAST_EXACT: result.last_stage_exact},
            {"stage_names": result.stage_names, "config": config},
        )
    return result


_EFFECTS, _LAST_EXACT = "stage_effects", "last_stage_exact"


def load_analysis(
    store: str | os.PathLike[str],
    name: str = "default",
    storage_options: dict[str, Any] | None = None,
) -> AnalysisResult:
    """Reopen an analysis written into ``store`` by :func:`analyze`, without recomputing."""
    info, score_arrays, arrays = open_run(store, storage_options).analysis(name)
    names = list(info["stage_names"])
    scores = {n: a[...] for n, a in zip(names, score_arrays, strict=True)}
    return AnalysisResult(scores, names, arrays[_EFFECTS], arrays[_LAST_EXACT], info["config"])
