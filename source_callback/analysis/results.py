"""An analysis's results, in memory or stored, read one block of training examples at a time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from source_callback.store.reader import open_run
from source_callback.store.schema import ANALYSIS_EFFECTS, ANALYSIS_LAST_EXACT, SCORE_CHUNK

#: One stage's scores ``[queries, examples]``: in memory, or a stored array read on demand.
ScoreArray = np.ndarray | zarr.Array


@dataclass(frozen=True)
class Attribution:
    """One training example's score for a query."""

    stage: str
    index: int
    score: float


def column_blocks(scores: ScoreArray) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of blocks of training examples, each one chunk of ``scores`` wide.

    An array in memory is cut as if stored (``SCORE_CHUNK``).
    """
    width = scores.chunks[1] if isinstance(scores, zarr.Array) else SCORE_CHUNK[1]
    total = scores.shape[1]
    for start in range(0, total, width):
        yield start, min(start + width, total)


def _largest(values: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest ``values`` and their positions, largest first, ties to the smaller."""
    if values.size > k:
        cut = values.size - k
        keep = values >= np.partition(values, cut)[cut]
        values, positions = values[keep], positions[keep]
    order = np.lexsort((positions, -values))[:k]
    return values[order], positions[order]


def _attributions(
    stage_names: list[str], ends: np.ndarray, values: np.ndarray, positions: np.ndarray
) -> list[Attribution]:
    """Attributions of positions among the stages' examples laid end to end.

    ``ends`` holds the cumulative stage sizes.
    """
    starts = np.concatenate([[0], ends[:-1]])
    stages = np.searchsorted(ends, positions, side="right")
    return [
        Attribution(stage_names[s], int(p - starts[s]), float(v))
        for s, p, v in zip(stages, positions, values, strict=True)
    ]


@dataclass
class AnalysisResult:
    """Scores and stage effects of one analysis.

    Attributes
    ----------
    scores
        Per stage name, ``[n_queries, n_examples of the stage]``: the predicted change of the
        query's measurement if the example were removed (SOURCE-math §1: with a loss
        measurement, positive means the example helped). A numpy array as returned by
        :func:`~source_callback.analyze`; a Zarr array, read only where sliced, as reopened by
        :func:`load_analysis` (``scores[stage][q]`` is one query's row as numpy,
        ``np.asarray(scores[stage])`` reads it all).
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

    scores: dict[str, ScoreArray]
    stage_names: list[str]
    stage_effects: np.ndarray
    last_stage_exact: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)

    def top(self, query: int, k: int = 10) -> tuple[list[Attribution], list[Attribution]]:
        """The ``k`` most helpful and ``k`` most harmful training examples for one query.

        The query's scores are read one block of training examples at a time, keeping a
        running top ``k``, so memory does not grow with the number of training examples.

        Returns
        -------
        helpful, harmful
            Highest and lowest scores across all stages, each best first; among equal scores
            the earlier stage, then the smaller index, comes first.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        empty = (np.empty(0), np.empty(0, dtype=np.int64))
        high, low = empty, empty
        offset = 0
        for stage in self.stage_names:
            array = self.scores[stage]
            for start, stop in column_blocks(array):
                values = np.asarray(array[query, start:stop], dtype=np.float64)
                positions = np.arange(offset + start, offset + stop)
                high = _largest(
                    np.concatenate([high[0], values]), np.concatenate([high[1], positions]), k
                )
                low = _largest(
                    np.concatenate([low[0], -values]), np.concatenate([low[1], positions]), k
                )
            offset += array.shape[1]
        ends = np.cumsum([self.scores[s].shape[1] for s in self.stage_names])
        return (
            _attributions(self.stage_names, ends, *high),
            _attributions(self.stage_names, ends, -low[0], low[1]),
        )

    def stage_totals(self) -> np.ndarray:
        """Each query's scores summed over each stage's training examples.

        Scores add up (SOURCE-math §1), so this is the first-order prediction of the change of
        the measurement had all of a stage's examples been removed (``stage_effects`` removes
        the stage's updates altogether instead). Read one block of training
        examples at a time.

        Returns
        -------
        np.ndarray
            ``[n_queries, n_stages]``, float64.
        """
        totals = np.zeros((len(self.stage_effects), len(self.stage_names)))
        for column, stage in enumerate(self.stage_names):
            array = self.scores[stage]
            for start, stop in column_blocks(array):
                totals[:, column] += array[:, start:stop].sum(axis=1, dtype=np.float64)
        return totals


def load_analysis(
    store: str | os.PathLike[str],
    name: str = "default",
    storage_options: dict[str, Any] | None = None,
) -> AnalysisResult:
    """Reopen an analysis written into ``store`` by :func:`analyze`, without recomputing.

    The scores stay in the store: each stage's is a Zarr array read only where sliced, and
    :meth:`AnalysisResult.top` and :meth:`AnalysisResult.stage_totals` read them one block of
    training examples at a time.
    """
    info, score_arrays, arrays = open_run(store, storage_options).analysis(name)
    names = list(info["stage_names"])
    return AnalysisResult(
        dict(zip(names, score_arrays, strict=True)),
        names,
        arrays[ANALYSIS_EFFECTS],
        arrays[ANALYSIS_LAST_EXACT],
        info["config"],
    )
