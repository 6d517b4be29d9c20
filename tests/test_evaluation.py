"""LDS helpers against scipy and constructed ground truths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch.utils.data import TensorDataset

from source_callback.evaluation import (
    ClassPredictions,
    flip_fraction,
    linear_datamodeling_score,
    noise_ceiling,
    random_subsets,
    removal_masks,
)
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


def test_noise_ceiling_of_pure_noise_and_of_a_clean_signal() -> None:
    rng = np.random.default_rng(6)
    signal = rng.normal(size=(60, 1, 4))  # [J, 1, Q]
    clean = signal + rng.normal(scale=1e-6, size=(60, 4, 4))
    assert noise_ceiling(clean) == pytest.approx(1.0, abs=1e-3)
    # equal signal and noise variance per seed: the 2-seed half-means correlate at 1/2,
    # so the 4-seed mean has reliability 2/3 and the ceiling is about √(2/3)
    noisy = signal + rng.normal(size=(60, 4, 4))
    assert noise_ceiling(noisy) == pytest.approx(np.sqrt(2 / 3), abs=0.12)
    assert noise_ceiling(rng.normal(size=(60, 4, 4))) < 0.45
    with pytest.raises(ValueError, match="R >= 2"):
        noise_ceiling(signal)


def test_removal_masks_drop_each_querys_most_helpful() -> None:
    scores = np.array([[0.1, 5.0, -2.0, 3.0], [4.0, -1.0, 0.0, 0.5]])
    masks = removal_masks(scores, k=2)
    assert masks.tolist() == [[True, False, True, False], [False, True, True, False]]
    with pytest.raises(ValueError, match="k must be"):
        removal_masks(scores, k=5)


def test_flip_fraction_counts_each_query_under_its_own_removal() -> None:
    reference = np.array([[1, 2, 3], [1, 2, 0]])  # [R=2, Q=3]
    removed = np.stack([reference.copy() for _ in range(3)])  # [Q, R, Q], nothing flipped
    removed[0, 0, 0] = 7  # query 0 flips under its own removal for seed 0
    removed[1, :, 2] = 9  # query 2 flips under query 1's removal: does not count
    assert flip_fraction(reference, removed).tolist() == [0.5, 0.0, 0.0]


def test_class_predictions_are_the_argmax() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    queries = TensorDataset(torch.randn(7, 3), torch.zeros(7, dtype=torch.long))
    expected = model(queries.tensors[0]).argmax(1).numpy()
    np.testing.assert_array_equal(ClassPredictions(queries, batch_size=3)(model), expected)
