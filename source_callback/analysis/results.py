"""An analysis's results, in memory or stored, read one block of training examples at a time."""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from source_callback.store.reader import open_run
from source_callback.store.schema import (
    ANALYSIS_EFFECTS,
    ANALYSIS_LAST_EXACT,
    CONFIG_COVERAGE,
    INFO_CONFIG,
    INFO_STAGE_NAMES,
    SCORE_CHUNK,
)

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


def _read_rows(array: ScoreArray, rows: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``array[rows, start:stop]`` as float64 for sorted, distinct ``rows``.

    Of a Zarr array only the chunks holding it are read.
    """
    if rows[-1] - rows[0] + 1 == len(rows):  # a range: a plain slice, the cheapest selection
        block = array[rows[0] : rows[-1] + 1, start:stop]
    elif isinstance(array, zarr.Array):
        block = array.get_orthogonal_selection((rows, slice(start, stop)))
    else:
        block = array[rows, start:stop]
    return np.asarray(block, dtype=np.float64)


#: Per query row, the best ``m <= k`` entries so far, best first: ``(keys, values, positions)``,
#: each ``[rows, m]``.
_Top = tuple[np.ndarray, np.ndarray, np.ndarray]


def _nan_lowest(keys: np.ndarray) -> np.ndarray:
    """``keys`` with NaN as -inf: NaN scores rank last instead of breaking the comparisons."""
    return np.fmax(keys, -np.inf)


def _merge_block(top: _Top, keys: np.ndarray, values: np.ndarray, first: int, k: int) -> _Top:
    """``top`` with a block of ``keys`` and ``values`` ``[rows, width]`` merged in.

    The block's columns are positions ``first, first + 1, ...``, all after ``top``'s; among
    equal keys the smaller position ranks first.
    """
    top_keys, top_values, top_positions = top
    rows, m = top_keys.shape
    width = keys.shape[1]
    if m == k:
        # An entry must beat the k-th best so far outright: on a tie its position loses.
        candidate = keys > top_keys[:, -1:]
    elif width > k:
        # Below the k-th largest of its row in the block, an entry has k better ones already.
        candidate = keys >= np.partition(keys, width - k, axis=1)[:, width - k, None]
    else:
        candidate = np.ones(keys.shape, dtype=bool)
    row, column = np.nonzero(candidate)  # few, once the top k has filled
    if not row.size:
        return top
    merged_rows = np.concatenate([np.repeat(np.arange(rows), m), row])
    merged = [
        np.concatenate([top_keys.ravel(), keys[row, column]]),
        np.concatenate([top_values.ravel(), values[row, column]]),
        np.concatenate([top_positions.ravel(), first + column]),
    ]
    order = np.lexsort((merged[2], -merged[0], merged_rows))
    ranked_rows = merged_rows[order]
    place = np.arange(order.size) - np.searchsorted(ranked_rows, ranked_rows)  # within its row
    order = order[place < k]
    # Every row had at least k entries, or all of its m + width: each keeps the same number.
    kept = min(k, m + width)
    keys, values, positions = (a[order].reshape(rows, kept) for a in merged)
    return keys, values, positions


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
        The settings the analysis ran with: the :class:`~source_callback.AnalysisOptions`
        that shape the scores, by the same names (``segments`` as the steps ``[start, end)``
        of each segment, ``modules`` as the names of the units attributed through), and
        ``coverage``.
    timings
        Seconds spent in each step of the analysis, as :func:`~source_callback.analyze`'s
        summary shows them; empty for an analysis reopened by :func:`load_analysis`.
    """

    scores: dict[str, ScoreArray]
    stage_names: list[str]
    stage_effects: np.ndarray
    last_stage_exact: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def coverage(self) -> dict[str, float]:
        """Per stage name, the share of its trained parameters the scores attribute through.

        Counted in parameters (elements); ``config["coverage"]``, empty for analyses stored
        before it was recorded.
        """
        return dict(self.config.get(CONFIG_COVERAGE, {}))

    def top(self, query: int, k: int = 10) -> tuple[list[Attribution], list[Attribution]]:
        """The ``k`` most helpful and ``k`` most harmful training examples for one query.

        The query's scores are read one block of training examples at a time, keeping a
        running top ``k``, so memory does not grow with the number of training examples.
        To ask for several queries, :meth:`top_many` reads the blocks once for all of them.

        Returns
        -------
        helpful, harmful
            Highest and lowest scores across all stages, each best first; among equal scores
            the earlier stage, then the smaller index, comes first. NaN scores come last.
        """
        return self.top_many([query], k)[0]

    def top_many(
        self, queries: Sequence[int], k: int = 10
    ) -> list[tuple[list[Attribution], list[Attribution]]]:
        """:meth:`top` for several queries in one pass over the scores.

        Each block of training examples is read once, for the asked queries' rows only (of a
        stored array, the chunks that hold them), and a running top ``k`` is kept per query:
        memory grows with ``len(queries)`` times the block width, not with the number of
        training examples.

        Parameters
        ----------
        queries
            Query indices (rows of the scores); negative ones count from the end, repeats are
            answered again.
        k
            How many examples to return on each side.

        Returns
        -------
        list[tuple[list[Attribution], list[Attribution]]]
            ``(helpful, harmful)`` per asked query, in the order asked, each as :meth:`top`
            returns it.

        Raises
        ------
        ValueError
            ``k`` is less than 1.
        IndexError
            A query is out of range.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        num_queries = len(self.stage_effects)
        asked = [operator.index(q) for q in queries]
        for query in asked:
            if not -num_queries <= query < num_queries:
                raise IndexError(f"query {query} is out of range for {num_queries} queries")
        if not asked:
            return []
        rows, answer_row = np.unique(np.mod(asked, num_queries), return_inverse=True)
        empty = np.empty((len(rows), 0))
        high = low = (empty, empty, empty.astype(np.int64))
        offset = 0
        for stage in self.stage_names:
            array = self.scores[stage]
            for start, stop in column_blocks(array):
                values = _read_rows(array, rows, start, stop)
                first = offset + start
                high = _merge_block(high, _nan_lowest(values), values, first, k)
                low = _merge_block(low, _nan_lowest(-values), values, first, k)
            offset += array.shape[1]
        ends = np.cumsum([self.scores[s].shape[1] for s in self.stage_names])
        answers = [
            (
                _attributions(self.stage_names, ends, high[1][row], high[2][row]),
                _attributions(self.stage_names, ends, low[1][row], low[2][row]),
            )
            for row in range(len(rows))
        ]
        return [answers[row] for row in answer_row]

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
    :meth:`AnalysisResult.top`, :meth:`AnalysisResult.top_many` and
    :meth:`AnalysisResult.stage_totals` read them one block of training examples at a time.
    """
    info, score_arrays, arrays = open_run(store, storage_options).analysis(name)
    names = list(info[INFO_STAGE_NAMES])
    return AnalysisResult(
        dict(zip(names, score_arrays, strict=True)),
        names,
        arrays[ANALYSIS_EFFECTS],
        arrays[ANALYSIS_LAST_EXACT],
        info[INFO_CONFIG],
    )
