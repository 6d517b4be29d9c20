"""``write_report``: one self-contained HTML page about a recorded run and an analysis of it."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from source_callback.analysis.inputs import check_dataset
from source_callback.analysis.results import AnalysisResult, load_analysis
from source_callback.report.page import Section, document
from source_callback.report.render import Renderer, default_renderer
from source_callback.report.sections import (
    analysis_section,
    model_changes_section,
    run_section,
    stages_section,
    top_examples_section,
    training_section,
)
from source_callback.store.reader import Run, open_run
from source_callback.store.schema import STEP_LOSS, STEP_STAGE

#: Queries whose top examples are listed when none are chosen (the first ones).
DEFAULT_QUERIES = 3


def _choose_queries(result: AnalysisResult, queries: Sequence[int] | None) -> list[int]:
    count = result.stage_effects.shape[0]
    if queries is None:
        return list(range(min(count, DEFAULT_QUERIES)))
    for query in queries:
        if not 0 <= query < count:
            raise ValueError(f"query {query} is out of range: the analysis has {count} queries")
    return list(queries)


def _check_examples(run: Run, examples: Mapping[str, Dataset]) -> None:
    """Each dataset is the one its stage trained on (size and fingerprint), so indices match."""
    for name, dataset in examples.items():
        check_dataset(run.stage(name), dataset)


def write_report(
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    analysis: str | AnalysisResult | None = None,
    examples: Mapping[str, Dataset] | None = None,
    renderer: Renderer = default_renderer,
    queries: Sequence[int] | None = None,
    top: int = 5,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """Write one self-contained HTML page about a recorded run and, optionally, an analysis.

    The page shows the stages, the learning-rate schedule per parameter group (with stage
    boundaries, checkpoints and the analysis's segments), the loss curve and, for an analysis,
    the stage effects per query, the score distribution of each stage and the most helpful and
    harmful training examples of some queries. Figures are embedded PNGs; the page loads
    nothing else.

    Parameters
    ----------
    store
        The record (local path or fsspec URL).
    out
        Path of the HTML file to write (replaced if it exists).
    analysis
        Name of an analysis stored in the record (``analyze(..., name=...)``), or an
        :class:`~source_callback.AnalysisResult`; ``None`` reports the run only.
    examples
        Training datasets by stage name (any subset of the stages), to show the top examples
        themselves next to their indices; each is checked against its stage's recorded size
        and fingerprint.
    renderer
        ``renderer(stage_name, index, dataset[index]) -> str``: the HTML fragment showing an
        example (see :data:`~source_callback.report.render.Renderer`). The default shows images
        as thumbnails and anything else as escaped text.
    queries
        Queries whose top examples are listed; by default the first three.
    top
        Number of most helpful and of most harmful examples listed per query.
    storage_options
        fsspec options for a remote store.

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    StoreError
        No readable store at ``store``.
    KeyError
        No analysis named ``analysis`` in the store, or a stage in ``examples`` that is not.
    AnalysisError
        A dataset in ``examples`` differs from its stage's training set.
    ValueError
        ``queries``, ``examples`` without an analysis, a query out of range, ``top < 1``.
    FileNotFoundError
        The directory of ``out`` does not exist.

    """
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    if analysis is None and (examples is not None or queries is not None):
        raise ValueError("examples and queries are shown with an analysis: pass analysis= too")
    path = Path(out)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"no directory {path.parent} to write the report into")
    run = open_run(store, storage_options)
    result = (
        load_analysis(run.url, analysis, storage_options) if isinstance(analysis, str) else analysis
    )
    if examples is not None:
        _check_examples(run, examples)

    steps = run.steps()  # empty until the first block of steps is written
    segments = [] if result is None else result.config.get("segments", [])
    sections: list[Section] = [
        run_section(run),
        stages_section(run, steps.get(STEP_STAGE, np.empty(0, dtype=np.int32))),
        *filter(None, [model_changes_section(run)]),
    ]
    if run.num_steps:
        sections.append(training_section(run, run.learning_rates(), steps[STEP_LOSS], segments))
    if result is not None:
        chosen = _choose_queries(result, queries)
        sections += [
            analysis_section(result, analysis if isinstance(analysis, str) else None),
            top_examples_section(result, chosen, top, examples, renderer),
        ]
    path.write_text(document(f"source-callback report: {run.url}", sections), encoding="utf-8")
    return path
