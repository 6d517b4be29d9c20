"""The report's sections, each as HTML: the run, its training curves, and an analysis."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from source_callback.analysis.results import AnalysisResult, Attribution
from source_callback.describe import batch_label, optimizer_label, stage_span
from source_callback.errors import listed
from source_callback.report import plots
from source_callback.report.page import Section, paragraph, png_image, table
from source_callback.report.render import Renderer
from source_callback.store.reader import Run
from source_callback.store.schema import STATUS_COMPLETE

#: Queries shown in the stage-effects chart (the first ones).
MAX_CHART_QUERIES = 40
MAX_CONFIG_TEXT = 200


#: How a NaN or infinite value is shown: never as a number.
NOT_FINITE = "n/a (not finite)"


def _signed(value: float) -> str:
    return f"{value:+.3e}" if math.isfinite(value) else NOT_FINITE


def _mean(values: np.ndarray) -> str:
    """The mean of ``values``, or how many of them are not finite."""
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        return f"n/a ({bad} of {values.size} not finite)"
    return _signed(float(np.mean(values)))


def _not_finite_note(result: AnalysisResult, left_out: Mapping[str, int]) -> str | None:
    """A warning naming the analysis's non-finite scores and stage effects; ``None``: none."""
    parts = []
    total = sum(left_out.values())
    if total:
        stages = ", ".join(f"{stage} {count:,}" for stage, count in left_out.items() if count)
        parts.append(f"{total:,} scores ({stages}) are left out of the histograms")
    finite = np.isfinite(result.stage_effects).all(1) & np.isfinite(result.last_stage_exact)
    queries = np.flatnonzero(~finite)
    if queries.size:
        shown = listed([str(q) for q in queries], 10)
        parts.append(f"the stage effects of queries {shown} are not all drawn")
    if not parts:
        return None
    return (
        "This analysis holds NaN or infinite values, shown as "
        + NOT_FINITE
        + ": "
        + "; ".join(parts)
        + ". They come from an analysis stored before analyze refused non-finite values, or "
        "from score blocks an interrupted analysis never wrote. Analyze again: the error then "
        "names the example and the pass where they enter."
    )


def run_section(run: Run) -> Section:
    """Where the store is, its status, and what it holds."""
    committed = sum(c.committed for c in run.checkpoints)
    versions = ", ".join(f"{k} {v}" for k, v in run.library_versions.items()) or "unknown"
    rows = [
        ("store", run.url),
        ("status", run.status),
        ("format version", str(run.format_version)),
        ("optimizer steps", f"{run.num_steps:,}"),
        ("checkpoints", f"{len(run.checkpoints)} ({committed} committed)"),
        ("stored analyses", ", ".join(run.analyses) or "none"),
        ("libraries", versions),
    ]
    parts = [table([], [(escape(k), escape(v)) for k, v in rows])]
    if run.status != STATUS_COMPLETE:
        parts.append(
            paragraph("The store is still recording, or its last stage was interrupted.", "warning")
        )
    return Section("run", "Run", parts)


def stages_section(run: Run, stage_column: np.ndarray) -> Section:
    """One table row per stage: steps, examples, optimizer, batch size, checkpoints."""
    rows = []
    for stage in run.stages:
        span, count = stage_span(stage, stage_column)
        examples = "?" if stage.num_examples is None else f"{stage.num_examples:,}"
        own = [c for c in run.checkpoints if c.stage == stage.index]
        steps = ", ".join(str(c.step) for c in own if c.committed)
        uncommitted = sum(not c.committed for c in own)
        checkpoints = f"{len(own)}: {steps}" + (
            f" ({uncommitted} uncommitted)" if uncommitted else ""
        )
        cells = (str(stage.index), stage.name, stage.status, span, str(count), examples)
        cells += (optimizer_label(stage), batch_label(stage), checkpoints)
        rows.append([escape(c) for c in cells])
    headers = (
        "#",
        "name",
        "status",
        "first..last step",
        "steps",
        "examples",
        "optimizer",
        "batch x accum x world",
        "checkpoints",
    )
    body = table(headers, rows, numeric=(0, 4, 5)) if rows else paragraph("No stage recorded.")
    return Section("stages", "Stages", [body])


def model_changes_section(run: Run) -> Section | None:
    """Which tensors continue which, were added or dropped, per stage that changed the model.

    ``None`` when no stage changed it.
    """
    parts = []
    for index, change in run.model_changes().items():
        parts.append(paragraph(f"Stage {index} ({run.stages[index].name}): {change.summary()}."))
        details = []
        if change.renamed:
            rows = [[escape(old), escape(new), escape(by)] for old, new, by in change.renamed]
            details.append(table(("previous stage", "this stage", "matched by"), rows))
        for label, names in (("added", change.added), ("dropped", change.dropped)):
            if names:
                details.append(paragraph(f"{label}: " + ", ".join(names)))
        if details:
            parts.append(f"<details><summary>tensors</summary>{''.join(details)}</details>")
    if not parts:
        return None
    note = (
        "A stage's model may be wrapped, renamed or extended (LoRA adapters, a new head). The "
        "analysis follows each tensor through the stages in which it existed."
    )
    return Section(
        "model-changes", "Model changes between stages", [*parts, paragraph(note, "note")]
    )


def training_section(
    run: Run,
    learning_rates: np.ndarray,
    losses: np.ndarray,
    segments: Sequence[Sequence[int]],
) -> Section:
    """The learning-rate schedule (with stages, segments, checkpoints) and the loss curve."""
    lr_note = (
        "Learning rate used at every optimizer step, per parameter group. Dashed lines: stage "
        "starts; triangles: checkpoints (parameters before that step)"
        + ("; shaded: the analysis's segments." if segments else ".")
    )
    parts = [
        "<h3>Learning rate</h3>",
        png_image(
            plots.learning_rate_figure(learning_rates, run.stages, run.checkpoints, segments),
            "learning rate per parameter group over global steps",
        ),
        paragraph(lr_note, "note"),
        "<h3>Loss</h3>",
        png_image(plots.loss_figure(losses, run.stages), "training loss over global steps"),
        paragraph("Training loss of every optimizer step, as logged by the training step.", "note"),
    ]
    return Section("training", "Training", parts)


def _config_rows(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key, value in config.items():
        text = json.dumps(value)
        if len(text) > MAX_CONFIG_TEXT:
            text = text[: MAX_CONFIG_TEXT - 1] + "…"
        rows.append((escape(str(key)), f'<span class="text">{escape(text)}</span>'))
    return rows


def analysis_section(result: AnalysisResult, name: str | None) -> Section:
    """The analysis's settings, stage effects (chart and means) and score distributions."""
    n_queries = result.stage_effects.shape[0]
    shown = min(n_queries, MAX_CHART_QUERIES)
    stage_rows = [
        (
            escape(stage),
            f"{result.scores[stage].shape[1]:,}",
            _mean(result.stage_effects[:, k]),
        )
        for k, stage in enumerate(result.stage_names)
    ]
    exact = _mean(result.last_stage_exact)
    histograms, left_out = plots.score_histograms_figure(result.scores, result.stage_names)
    warning = _not_finite_note(result, left_out)
    parts = [
        paragraph(("" if name is None else f"Stored as {name!r}; ") + f"{n_queries} queries."),
        *([] if warning is None else [paragraph(warning, "warning")]),
        table(["setting", "value"], _config_rows(result.config)),
        "<h3>Stage effects</h3>",
        png_image(
            plots.stage_effects_figure(
                result.stage_effects[:shown],
                range(shown),
                result.stage_names,
                result.last_stage_exact[:shown],
            ),
            "predicted effect of removing each stage, per query",
        ),
        paragraph(
            "Predicted change of each query's measurement had the stage's updates never run"
            + (f" (the first {shown} of {n_queries} queries)" if shown < n_queries else "")
            + f"; the black bar is the exact change for the last stage (mean {exact}).",
            "note",
        ),
        table(["stage", "examples", "mean effect over queries"], stage_rows, numeric=(1, 2)),
        "<h3>Score distributions</h3>",
        png_image(histograms, "histogram of the finite scores of each stage"),
        paragraph(
            "Scores of every (query, training example) pair, per stage: the predicted change of "
            "the query's measurement if the example were removed (with a loss measurement, "
            "positive: the example helped).",
            "note",
        ),
    ]
    return Section("analysis", "Analysis", parts)


def _attribution_table(
    items: Sequence[Attribution],
    examples: Mapping[str, Dataset] | None,
    renderer: Renderer,
) -> str:
    headers = ["rank", "stage", "index", "score"]
    rows = []
    for rank, item in enumerate(items, start=1):
        cells = [str(rank), escape(item.stage), str(item.index), _signed(item.score)]
        if examples is not None:
            shown = item.stage in examples
            cells.append(
                renderer(item.stage, item.index, examples[item.stage][item.index]) if shown else ""
            )
        rows.append(cells)
    if examples is not None:
        headers.append("example")
    return table(headers, rows, numeric=(0, 2, 3))


def top_examples_section(
    result: AnalysisResult,
    queries: Sequence[int],
    top: int,
    examples: Mapping[str, Dataset] | None,
    renderer: Renderer,
) -> Section:
    """For each query, the ``top`` most helpful and most harmful training examples."""
    parts = []
    if examples is None:
        parts.append(
            paragraph(
                "Training examples are identified by stage and index into the stage's training "
                "set (pass the datasets to show them: write_report(examples=...) or "
                "source-callback report --data MODULE:FUNCTION).",
                "note",
            )
        )
    for query, (helpful, harmful) in zip(queries, result.top_many(queries, k=top), strict=True):
        effects = ", ".join(
            f"{stage} {_signed(value)}"
            for stage, value in zip(result.stage_names, result.stage_effects[query], strict=True)
        )
        parts += [
            f"<h3>Query {query}</h3>",
            paragraph(
                f"Stage effects: {effects}; exact for {result.stage_names[-1]}: "
                f"{_signed(float(result.last_stage_exact[query]))}."
            ),
            '<div class="side-by-side">',
            f"<div><h4>Most helpful</h4>{_attribution_table(helpful, examples, renderer)}</div>",
            f"<div><h4>Most harmful</h4>{_attribution_table(harmful, examples, renderer)}</div>",
            "</div>",
        ]
    return Section("top-examples", "Top examples per query", parts)
