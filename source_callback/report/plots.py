"""The report's figures as PNG bytes, drawn on matplotlib's Agg canvas.

Figures are built with :class:`matplotlib.figure.Figure` and rendered by ``FigureCanvasAgg``
directly, never through ``pyplot``: no display is needed and the caller's matplotlib backend
(a notebook's, say) is left alone.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from source_callback.analysis.results import ScoreArray, column_blocks
from source_callback.store.reader import Checkpoint
from source_callback.store.schema import Stage

WIDTH, HEIGHT, DPI = 9.0, 3.2, 100
HISTOGRAM_BINS = 50
#: The learning-rate axis is logarithmic when the largest rate is this many times the smallest.
LOG_SCALE_RATIO = 10.0

#: Most query labels on the stage-effects chart's axis.
MAX_TICKS = 20


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _new_axes(height: float = HEIGHT) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    return figure, figure.add_subplot()


def _mark_stages(axes: Axes, stages: Sequence[Stage]) -> None:
    """A dashed line where each stage starts, with its name at the top."""
    for stage in stages:
        axes.axvline(stage.first_step, color="0.35", linestyle="--", linewidth=0.8)
        axes.text(
            stage.first_step,
            0.98,
            f" {stage.name}",
            transform=axes.get_xaxis_transform(),
            ha="left",
            va="top",
            fontsize=8,
        )


def _legend_outside(axes: Axes) -> None:
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def learning_rate_figure(
    learning_rates: np.ndarray,
    stages: Sequence[Stage],
    checkpoints: Sequence[Checkpoint],
    segments: Sequence[Sequence[int]] = (),
) -> bytes:
    """The learning rate of every step per parameter group, stages, segments and checkpoints.

    Parameters
    ----------
    learning_rates
        ``[steps, param groups]``, NaN where a stage has fewer groups.
    stages
        The run's stages (a dashed line where each starts).
    checkpoints
        The run's checkpoints (triangles on the step axis; hollow red: uncommitted).
    segments
        ``[start, end)`` global steps of an analysis's segments (alternately shaded).

    Returns
    -------
    bytes
        A PNG image; the rate axis is logarithmic when the rates are all positive and span a
        factor of ``LOG_SCALE_RATIO`` or more.

    """
    figure, axes = _new_axes()
    for number, (start, end) in enumerate(segments):
        axes.axvspan(
            start,
            end,
            color="tab:orange",
            alpha=0.1 if number % 2 else 0.22,
            linewidth=0,
            label="segment" if number == 0 else None,
        )
    steps = np.arange(len(learning_rates))
    for group in range(learning_rates.shape[1]):
        axes.plot(steps, learning_rates[:, group], drawstyle="steps-post", label=f"group {group}")
    _mark_stages(axes, stages)
    for committed, style in (
        (True, {"color": "black", "label": "checkpoint"}),
        (False, {"facecolors": "none", "edgecolors": "red", "label": "uncommitted checkpoint"}),
    ):
        marked = [c.step for c in checkpoints if c.committed == committed]
        if marked:
            axes.scatter(
                marked,
                np.zeros(len(marked)),
                transform=axes.get_xaxis_transform(),
                marker="^",
                s=40,
                clip_on=False,
                zorder=3,
                **style,
            )
    rates = learning_rates[np.isfinite(learning_rates)]
    if rates.size and rates.min() > 0 and rates.max() >= LOG_SCALE_RATIO * rates.min():
        axes.set_yscale("log")  # e.g. SGD at 0.05, then AdamW at 2e-3: both schedules visible
    axes.set_xlabel("global optimizer step")
    axes.set_ylabel("learning rate")
    _legend_outside(axes)
    return _png(figure)


def loss_figure(losses: np.ndarray, stages: Sequence[Stage]) -> bytes:
    """The training loss recorded at every optimizer step, with stage boundaries.

    Parameters
    ----------
    losses
        ``[steps]``.
    stages
        The run's stages.

    Returns
    -------
    bytes
        A PNG image.

    """
    figure, axes = _new_axes()
    axes.plot(np.arange(len(losses)), losses, linewidth=1.0, color="tab:blue")
    _mark_stages(axes, stages)
    axes.set_xlabel("global optimizer step")
    axes.set_ylabel("training loss")
    return _png(figure)


def stage_effects_figure(
    effects: np.ndarray,
    queries: Sequence[int],
    stage_names: Sequence[str],
    last_stage_exact: np.ndarray,
) -> bytes:
    """Grouped bars: each query's predicted effect of removing each stage.

    Parameters
    ----------
    effects
        ``[len(queries), stages]``.
    queries
        The queries' indices (tick labels).
    stage_names
        Stage names, in training order.
    last_stage_exact
        ``[len(queries)]``: the exact effect of removing the last stage (a black bar on it).

    Returns
    -------
    bytes
        A PNG image.

    """
    figure, axes = _new_axes()
    positions = np.arange(len(queries))
    width = 0.8 / len(stage_names)
    offsets = (np.arange(len(stage_names)) - (len(stage_names) - 1) / 2) * width
    for k, name in enumerate(stage_names):
        axes.bar(positions + offsets[k], effects[:, k], width, color=f"C{k}", label=name)
    axes.scatter(
        positions + offsets[-1],
        last_stage_exact,
        marker="_",
        s=max(20.0, 400 * width),
        linewidths=2,
        color="black",
        zorder=3,
        label=f"exact, {stage_names[-1]}",
    )
    axes.axhline(0, color="0.35", linewidth=0.8)
    step = -(-len(queries) // MAX_TICKS)  # label every step-th query so labels never overlap
    axes.set_xticks(positions[::step], [str(q) for q in queries][::step])
    axes.set_xlabel("query")
    axes.set_ylabel("change if the stage\nhad not run")
    _legend_outside(axes)
    return _png(figure)


def _finite_blocks(scores: ScoreArray) -> Iterator[np.ndarray]:
    """The finite scores of each block of training examples, as float64."""
    for start, stop in column_blocks(scores):
        values = np.asarray(scores[:, start:stop], dtype=np.float64).ravel()
        yield values[np.isfinite(values)]


def streamed_histogram(
    scores: ScoreArray, bins: int = HISTOGRAM_BINS
) -> tuple[np.ndarray, np.ndarray, int]:
    """``np.histogram`` of the finite scores, read one block of training examples at a time.

    A first pass finds the range and a second counts into ``bins`` equal bins over it, so
    memory stays one block whatever the size of ``scores``.

    Parameters
    ----------
    scores
        ``[queries, examples]``: in memory, or a stored Zarr array (read twice, block by block).
    bins
        Number of equal-width bins.

    Returns
    -------
    counts, edges, size
        As ``np.histogram(finite, bins)`` gives them for all finite scores ``finite`` at once
        (``bins + 1`` edges), and how many finite scores there are.

    """
    size, low, high = 0, np.inf, -np.inf
    for values in _finite_blocks(scores):
        if values.size:
            size += values.size
            low, high = min(low, values.min()), max(high, values.max())
    # np.histogram's own choice of edges: (0, 1) when empty, ±0.5 around a single value.
    edges = np.histogram_bin_edges(np.empty(0), bins, range=(low, high) if size else None)
    counts = np.zeros(bins, dtype=np.int64)
    if size:
        for values in _finite_blocks(scores):
            counts += np.histogram(values, edges)[0]
    return counts, edges, size


def score_histograms_figure(
    scores: Mapping[str, ScoreArray], stage_names: Sequence[str]
) -> tuple[bytes, dict[str, int]]:
    """One histogram per stage of its finite scores over all queries and training examples.

    Parameters
    ----------
    scores
        ``[queries, examples of the stage]`` per stage name, in memory or stored (read one block
        of training examples at a time, see :func:`streamed_histogram`).
    stage_names
        The stages to draw, in order.

    Returns
    -------
    png, left_out
        A PNG image (counts on a log scale, so that the tails show; each title says how many
        scores are drawn and how many are left out as not finite), and per stage the number of
        scores left out because they are NaN or infinite.

    """
    columns = min(len(stage_names), 3)
    rows = math.ceil(len(stage_names) / columns)
    figure = Figure(figsize=(WIDTH, 2.6 * rows), dpi=DPI, layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    left_out = {}
    for k, (axes, name) in enumerate(zip(grid.flat, stage_names, strict=False)):
        counts, edges, size = streamed_histogram(scores[name])
        left_out[name] = math.prod(scores[name].shape) - size
        # One weighted sample per bin draws the same bars as hist() of the scores themselves.
        axes.hist(edges[:-1], bins=edges, weights=counts, color=f"C{k}", log=True)
        axes.axvline(0, color="0.35", linewidth=0.8)
        title = f"{name} ({size:,} scores"
        if left_out[name]:
            title += f"; {left_out[name]:,} not finite, left out"
        axes.set_title(title + ")", fontsize=9)
        axes.set_xlabel("score", fontsize=8)
        axes.tick_params(labelsize=7)
    for axes in grid.flat[len(stage_names) :]:
        axes.set_visible(False)
    return _png(figure), left_out
