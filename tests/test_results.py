"""Stored results read one block of training examples at a time: ``top``, ``top_many`` and
``stage_totals`` over Zarr chunks equal the same over arrays in memory, and an independent full
sort."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from source_callback import AnalysisResult, load_analysis
from source_callback.analysis.results import column_blocks
from source_callback.store.analyses import AnalysisWriter
from source_callback.store.reader import open_run
from source_callback.store.schema import SCORE_CHUNK
from source_callback.store.writer import StoreWriter

WIDTH = SCORE_CHUNK[1]
#: Stage sizes: two chunks and a partial one, less than one chunk, exactly one chunk.
SIZES = {"pretrain": 2 * WIDTH + 5, "sft": 3, "rl": WIDTH}
QUERIES = 4


def _synthetic_scores() -> dict[str, np.ndarray]:
    """Rounded scores (many ties), with ties planted across chunk and stage boundaries."""
    rng = np.random.default_rng(0)
    scores = {
        name: np.round(rng.standard_normal((QUERIES, n)), 1).astype(np.float32)
        for name, n in SIZES.items()
    }
    for name, index in (("pretrain", WIDTH - 1), ("pretrain", WIDTH), ("sft", 2), ("rl", 0)):
        scores[name][0, index] = 9.0
        scores[name][1, index] = -9.0
    scores["pretrain"][2, -1] = 7.5  # the last, partial chunk
    return scores


def _store(url: str, scores: dict[str, np.ndarray], options: dict[str, Any] | None) -> None:
    """A store holding only an analysis ``synthetic``, written one chunk of columns at a time."""
    StoreWriter.open(url, options)
    writer = AnalysisWriter(
        url,
        options,
        "synthetic",
        [s.shape for s in scores.values()],
        np.float32,
        {"stage_names": list(scores), "config": {"method": "synthetic"}},
    )
    for target, values in zip(writer.scores, scores.values(), strict=True):
        for start, stop in column_blocks(target):
            target[:, start:stop] = values[:, start:stop]
    writer.commit(np.zeros((QUERIES, len(scores))), np.zeros(QUERIES))


def _reference_top(scores: dict[str, np.ndarray], query: int, k: int) -> tuple[list, list]:
    """``(stage, index, score)`` by a full sort: best first, ties to the earlier example."""
    stage = np.concatenate([np.full(s.shape[1], i) for i, s in enumerate(scores.values())])
    index = np.concatenate([np.arange(s.shape[1]) for s in scores.values()])
    values = np.concatenate([s[query] for s in scores.values()]).astype(np.float64)
    names = list(scores)
    best = [
        [(names[stage[i]], int(index[i]), float(values[i])) for i in order[:k]]
        for order in (np.lexsort((index, stage, -values)), np.lexsort((index, stage, values)))
    ]
    return best[0], best[1]


def _as_tuples(items: list) -> list[tuple[str, int, float]]:
    return [(a.stage, a.index, a.score) for a in items]


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    scores = _synthetic_scores()
    path = tmp_path_factory.mktemp("results") / "run.zarr"
    _store(str(path), scores, None)
    return path, scores


def test_stored_scores_are_lazy_and_chunked_by_training_index(stored) -> None:
    path, scores = stored
    result = load_analysis(path, "synthetic")
    assert result.stage_names == list(SIZES)
    for name, values in scores.items():
        assert isinstance(result.scores[name], zarr.Array)
        assert result.scores[name].chunks[1] == min(WIDTH, SIZES[name])
        np.testing.assert_array_equal(result.scores[name][...], values)
    assert list(column_blocks(result.scores["pretrain"])) == [
        (0, WIDTH),
        (WIDTH, 2 * WIDTH),
        (2 * WIDTH, 2 * WIDTH + 5),
    ]


@pytest.mark.parametrize("k", [1, 3, 5, 40])
def test_streamed_top_equals_eager_and_a_full_sort(stored, k: int) -> None:
    path, scores = stored
    lazy = load_analysis(path, "synthetic")
    eager = AnalysisResult(scores, list(scores), lazy.stage_effects, lazy.last_stage_exact)
    for query in range(QUERIES):
        expected = _reference_top(scores, query, k)
        for result in (lazy, eager):
            helpful, harmful = result.top(query, k)
            assert (_as_tuples(helpful), _as_tuples(harmful)) == expected


def test_ties_across_chunks_and_stages_go_to_the_earlier_example(stored) -> None:
    path, _ = stored
    result = load_analysis(path, "synthetic")
    planted = [("pretrain", WIDTH - 1), ("pretrain", WIDTH), ("sft", 2), ("rl", 0)]
    helpful, _ = result.top(0, k=3)
    assert [(a.stage, a.index, a.score) for a in helpful] == [(*p, 9.0) for p in planted[:3]]
    _, harmful = result.top(1, k=4)
    assert [(a.stage, a.index, a.score) for a in harmful] == [(*p, -9.0) for p in planted]
    assert _as_tuples(result.top(2, k=1)[0]) == [("pretrain", 2 * WIDTH + 4, 7.5)]
    with pytest.raises(ValueError, match="k must be at least 1"):
        result.top(0, k=0)


@pytest.mark.parametrize("k", [1, 4, 40])
def test_top_many_equals_top_and_a_full_sort(stored, k: int) -> None:
    """Several queries in one pass, asked in any order, repeated or negative."""
    path, scores = stored
    lazy = load_analysis(path, "synthetic")
    eager = AnalysisResult(scores, list(scores), lazy.stage_effects, lazy.last_stage_exact)
    # Rows read as one slice (all of them, one) or picked out (3 and 1, 0 and 2).
    for asked in ([3, 0, 2, 0, -1, 1], [3, 1], [2], [0, -2]):
        for result in (lazy, eager):
            answers = result.top_many(asked, k)
            assert len(answers) == len(asked)
            for query, (helpful, harmful) in zip(asked, answers, strict=True):
                expected = _reference_top(scores, query % QUERIES, k)
                assert (_as_tuples(helpful), _as_tuples(harmful)) == expected
                assert (helpful, harmful) == result.top(query, k)
    assert lazy.top_many([], k) == []


def _scores_from(values: np.ndarray, sizes: list[int]) -> dict[str, np.ndarray]:
    """``values`` ``[queries, sum(sizes)]`` cut into stages ``s0, s1, ...`` of ``sizes``."""
    edges = np.cumsum([0, *sizes])
    return {f"s{i}": values[:, a:b] for i, (a, b) in enumerate(itertools.pairwise(edges))}


@pytest.mark.parametrize("k", [1, 2, 7, WIDTH + 3])
def test_top_many_ties_at_chunk_edges_and_stage_boundaries(k: int) -> None:
    """Few distinct values, runs of equal scores across chunk edges and stages, brute-forced."""
    sizes = [WIDTH + 1, 2, WIDTH - 1, 1]
    rng = np.random.default_rng(1)
    values = rng.integers(-2, 3, (6, sum(sizes))).astype(np.float32)
    values[0] = 1.0  # a query whose scores all tie
    values[1, WIDTH - 2 : WIDTH + 4] = 5.0  # ties across the first chunk edge and a stage end
    values[2, :] = -1.0
    values[2, -4:] = [-3.0, -3.0, 4.0, 4.0]  # extremes at the very end
    scores = _scores_from(values, sizes)
    result = AnalysisResult(scores, list(scores), np.zeros((6, len(sizes))), np.zeros(6))
    answers = result.top_many(range(6), k)
    for query, (helpful, harmful) in enumerate(answers):
        assert (_as_tuples(helpful), _as_tuples(harmful)) == _reference_top(scores, query, k)
    everything = result.top_many([0], sum(sizes) + 5)[0][0]
    assert [(a.stage, a.index) for a in everything] == [
        (name, i) for name, n in zip(scores, sizes, strict=True) for i in range(n)
    ]


def test_top_many_ranks_nan_last_on_both_sides() -> None:
    values = np.array([[np.nan, 1.0, np.nan, -1.0, 0.0]])
    result = AnalysisResult({"s": values}, ["s"], np.zeros((1, 1)), np.zeros(1))
    helpful, harmful = result.top(0, k=4)
    assert [(a.index, a.score) for a in helpful[:3]] == [(1, 1.0), (4, 0.0), (3, -1.0)]
    assert [(a.index, a.score) for a in harmful[:3]] == [(3, -1.0), (4, 0.0), (1, 1.0)]
    assert helpful[3].index == harmful[3].index == 0 and np.isnan(helpful[3].score)


def test_top_many_rejects_bad_arguments(stored) -> None:
    path, _ = stored
    result = load_analysis(path, "synthetic")
    with pytest.raises(ValueError, match="k must be at least 1"):
        result.top_many([0, 1], k=0)
    for query in (QUERIES, -QUERIES - 1):
        with pytest.raises(IndexError, match="out of range"):
            result.top_many([0, query], k=2)


def test_top_many_reads_each_chunk_once(stored) -> None:
    """One pass for all queries: as many chunk reads as chunks, whatever the number of queries."""
    path, scores = stored
    store = zarr.storage.LoggingStore(zarr.storage.LocalStore(path, read_only=True))
    stored_arrays = open_run(path).analysis("synthetic")[1]
    arrays = {
        name: zarr.open_array(store, path=array.path, mode="r")
        for name, array in zip(scores, stored_arrays, strict=True)
    }
    chunks = sum(len(list(column_blocks(a))) for a in arrays.values())
    assert chunks == 5
    result = AnalysisResult(arrays, list(arrays), np.zeros((QUERIES, 3)), np.zeros(QUERIES))
    for asked in (range(QUERIES), [3, 0, 2]):  # a slice of rows, rows picked out
        store.counter.clear()
        answers = result.top_many(asked, k=3)
        assert store.counter["get"] == chunks
        for query, (helpful, harmful) in zip(asked, answers, strict=True):
            expected = _reference_top(scores, query, 3)
            assert (_as_tuples(helpful), _as_tuples(harmful)) == expected


def test_stage_totals_stream_and_match_the_sums(stored) -> None:
    path, scores = stored
    lazy = load_analysis(path, "synthetic")
    expected = np.stack([s.astype(np.float64).sum(axis=1) for s in scores.values()], axis=1)
    np.testing.assert_allclose(lazy.stage_totals(), expected, rtol=1e-12, atol=1e-9)
    eager = AnalysisResult(scores, list(scores), lazy.stage_effects, lazy.last_stage_exact)
    np.testing.assert_array_equal(eager.stage_totals(), lazy.stage_totals())


def test_remote_stored_results_stream(s3: tuple[str, dict[str, Any]], stored) -> None:
    prefix, options = s3
    _, scores = stored
    url = f"{prefix}/run.zarr"
    _store(url, scores, options)
    result = load_analysis(url, "synthetic", storage_options=options)
    assert isinstance(result.scores["pretrain"], zarr.Array)
    for query, (helpful, harmful) in enumerate(result.top_many(range(QUERIES), 5)):
        assert (_as_tuples(helpful), _as_tuples(harmful)) == _reference_top(scores, query, 5)
    assert _as_tuples(result.top(2, 5)[0]) == _reference_top(scores, 2, 5)[0]
    expected = np.stack([s.astype(np.float64).sum(axis=1) for s in scores.values()], axis=1)
    np.testing.assert_allclose(result.stage_totals(), expected, rtol=1e-12, atol=1e-9)
