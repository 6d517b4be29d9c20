"""LDS helpers against scipy and constructed ground truths."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from source_callback.evaluation import linear_datamodeling_score, random_subsets
from source_callback.evaluation.lds import spearman_rows


def test_spearman_rows_matches_scipy_with_ties() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(4, 30)).astype(float)  # many ties
    b = rng.normal(size=(4, 30))
    expected = [spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(spearman_rows(a, b), expected, rtol=1e-12)


def test_random_subsets_keep_the_fraction() -> None:
    masks = random_subsets(40, count=25, alpha=0.5, seed=1)
    assert masks.shape == (25, 40) and (masks.sum(1) == 20).all()
    assert len({m.tobytes() for m in masks}) == 25
    with pytest.raises(ValueError, match="alpha"):
        random_subsets(40, 3, alpha=0.0)


def test_lds_of_exact_and_negated_scores() -> None:
    """Retrained measurements that are exactly linear in the kept set: LDS 1, negated −1."""
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(3, 50))
    masks = random_subsets(50, count=60, alpha=0.5, seed=3)
    # removing the examples outside S_j adds their scores to the full-data measurement
    measured = 1.0 + (~masks).astype(float) @ scores.T  # [J, Q]
    exact = linear_datamodeling_score(scores, masks, measured, bootstrap=200)
    assert exact.mean == pytest.approx(1.0) and exact.low == pytest.approx(1.0)
    assert linear_datamodeling_score(-scores, masks, measured, bootstrap=0).mean == pytest.approx(
        -1
    )


def test_lds_with_noise_has_an_interval_around_it() -> None:
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(5, 80))
    masks = random_subsets(80, count=100, alpha=0.5, seed=5)
    clean = (~masks).astype(float) @ scores.T
    seeds = clean[:, None, :] + rng.normal(scale=8.0, size=(100, 3, 5))  # 3 seeds per subset
    result = linear_datamodeling_score(scores, masks, seeds, bootstrap=500)
    assert 0.3 < result.mean < 0.95
    assert result.low < result.mean < result.high
    assert result.per_query.shape == (5,)
    with pytest.raises(ValueError, match="shapes do not match"):
        linear_datamodeling_score(scores, masks[:, :10], seeds)
