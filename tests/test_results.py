"""Stored results read one block of training examples at a time: ``top`` and ``stage_totals``
over Zarr chunks equal the same over arrays in memory, and an independent full sort."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from source_callback import AnalysisResult, load_analysis
from source_callback.analysis.results import column_blocks
from source_callback.store.schema import SCORE_CHUNK
from source_callback.store.writer import AnalysisWriter, StoreWriter

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
    for query in range(QUERIES):
        helpful, harmful = result.top(query, 5)
        assert (_as_tuples(helpful), _as_tuples(harmful)) == _reference_top(scores, query, 5)
    expected = np.stack([s.astype(np.float64).sum(axis=1) for s in scores.values()], axis=1)
    np.testing.assert_allclose(result.stage_totals(), expected, rtol=1e-12, atol=1e-9)
