"""The linear datamodeling score (LDS) with bootstrap confidence intervals.

A score ``τ(z_q, z_m)`` predicts that removing ``z_m`` changes the query's measurement by
``τ`` (SOURCE-math §1). A model retrained on the subset ``S_j`` misses the examples outside it,
so its measurement is predicted as ``f + Σ_{m∉S_j} τ = const − Σ_{m∈S_j} τ``. The LDS of a
query is the Spearman correlation, over subsets, between that prediction and the measurement of
models actually retrained on ``S_j``; the reported LDS is the mean over queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def random_subsets(num_examples: int, count: int, alpha: float, seed: int = 0) -> np.ndarray:
    """``count`` random subsets keeping ``round(alpha · num_examples)`` examples each.

    Returns
    -------
    np.ndarray
        Boolean masks ``[count, num_examples]``, True where an example is kept.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    rng = np.random.default_rng(seed)
    keep = round(alpha * num_examples)
    masks = np.zeros((count, num_examples), dtype=bool)
    for row in masks:
        row[rng.choice(num_examples, size=keep, replace=False)] = True
    return masks


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties sharing their average rank."""
    order = np.argsort(values, axis=-1, kind="stable")
    ranks = np.empty_like(values, dtype=np.float64)
    np.put_along_axis(ranks, order, np.arange(values.shape[-1], dtype=np.float64), axis=-1)
    out = np.empty_like(ranks)
    for index in np.ndindex(values.shape[:-1]):
        row, r = values[index], ranks[index]
        _, inverse, counts = np.unique(row, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        out[index] = (sums / counts)[inverse]
    return out


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of matching rows of ``a`` and ``b`` (NaN for constant rows)."""
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    denominator = np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(-1) / denominator


@dataclass(frozen=True)
class LDSResult:
    """An LDS estimate.

    Attributes
    ----------
    mean
        Mean over queries of the per-query Spearman correlation.
    low, high
        Bootstrap percentile interval of ``mean``, resampling subsets.
    per_query
        The per-query correlations, ``[Q]``.
    """

    mean: float
    low: float
    high: float
    per_query: np.ndarray


def linear_datamodeling_score(
    scores: np.ndarray,
    masks: np.ndarray,
    measured: np.ndarray,
    *,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> LDSResult:
    """LDS of attribution ``scores`` against models retrained on subsets.

    Parameters
    ----------
    scores
        ``[Q, N]`` scores, sign of SOURCE-math §1 (positive: removing the example raises f).
    masks
        ``[J, N]`` booleans, True for the examples each retrained model kept.
    measured
        ``[J, Q]`` measurement of each query under each retrained model, or ``[J, R, Q]`` for R
        retrainings (seeds) per subset, which are averaged.
    bootstrap
        Resamples of the subsets for the confidence interval (0 skips it).
    confidence
        Coverage of the interval.
    seed
        Seed of the resampling.
    """
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    measured = np.asarray(measured, dtype=np.float64)
    if measured.ndim == 3:
        measured = measured.mean(axis=1)
    if scores.shape[1] != masks.shape[1] or measured.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(
            f"shapes do not match: scores {scores.shape} [Q, N], masks {masks.shape} [J, N], "
            f"measured {measured.shape} [J, Q]"
        )
    predicted = -(masks.astype(np.float64) @ scores.T)  # [J, Q]
    per_query = spearman_rows(predicted.T, measured.T)
    mean = float(np.nanmean(per_query))
    low = high = float("nan")
    if bootstrap:
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, masks.shape[0], size=(bootstrap, masks.shape[0]))
        means = [np.nanmean(spearman_rows(predicted[d].T, measured[d].T)) for d in draws]
        tail = (1 - confidence) / 2 * 100
        low, high = (float(v) for v in np.nanpercentile(means, [tail, 100 - tail]))
    return LDSResult(mean, low, high, per_query)


def noise_ceiling(measured: np.ndarray, seed: int = 0) -> float:
    """The LDS a perfect attribution could reach against these retrained measurements.

    Retraining is random (initialisation, batch order), so the mean over R seeds is itself a
    noisy estimate of the expected measurement. The seeds are split into two halves; the mean
    over queries of the Spearman correlation (over subsets) between the halves' means, lifted
    to R seeds by the Spearman-Brown formula, estimates the reliability ρ of the R-seed mean.
    A perfect predictor correlates with it at about ``√ρ``.

    Parameters
    ----------
    measured
        ``[J, R, Q]`` measurements, R ≥ 2 seeds per subset.
    seed
        Seed of the random split of the seeds.
    """
    measured = np.asarray(measured, dtype=np.float64)
    if measured.ndim != 3 or measured.shape[1] < 2:
        raise ValueError(f"need [J, R >= 2, Q] measurements, got shape {measured.shape}")
    order = np.random.default_rng(seed).permutation(measured.shape[1])
    half = measured.shape[1] // 2
    a = measured[:, order[:half]].mean(1)
    b = measured[:, order[half:]].mean(1)
    split = float(np.nanmean(spearman_rows(a.T, b.T)))
    reliability = 2 * split / (1 + split) if split > 0 else 0.0
    return float(np.sqrt(reliability))
