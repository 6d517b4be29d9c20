"""Subset-removal evaluation: remove each query's top-k helpful examples, retrain, count flips."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from source_callback.analysis.inputs import batches, evaluate, on_device


def removal_masks(scores: np.ndarray, k: int) -> np.ndarray:
    """Per query, keep masks without its ``k`` highest-scoring (most helpful) examples.

    Parameters
    ----------
    scores
        ``[Q, N]`` scores (SOURCE-math §1 sign: positive helped the query).
    k
        Examples removed per query.

    Returns
    -------
    np.ndarray
        ``[Q, N]`` booleans, False for the removed examples.
    """
    scores = np.asarray(scores)
    if not 0 < k <= scores.shape[1]:
        raise ValueError(f"k must be in [1, {scores.shape[1]}], got {k}")
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    masks = np.ones(scores.shape, dtype=bool)
    np.put_along_axis(masks, top, False, axis=1)
    return masks


def flip_fraction(reference: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """How often each query's prediction changed when its own examples were removed.

    Parameters
    ----------
    reference
        ``[R, Q]`` predicted classes of models retrained on all data, one per seed.
    removed
        ``[Q, R, Q]`` predicted classes of the models retrained without query q's examples
        (row q), with the same seeds; only the diagonal (query q under its own removal) counts.

    Returns
    -------
    np.ndarray
        ``[Q]`` fraction of seeds whose prediction of the query flipped.
    """
    reference = np.asarray(reference)
    removed = np.asarray(removed)
    own = np.stack([removed[q, :, q] for q in range(removed.shape[0])])  # [Q, R]
    return (own != reference.T).mean(axis=1)


class ClassPredictions:
    """Predicted classes, a picklable measurement for :func:`retrain`.

    ``argmax`` of ``model(inputs)`` for every query, where batches are ``(inputs, targets)``.
    """

    def __init__(self, queries: Dataset, batch_size: int = 256) -> None:
        self.queries = queries
        self.batch_size = batch_size

    def __call__(self, model: torch.nn.Module) -> np.ndarray:
        """Predicted class of every query, ``[Q]``."""
        model.eval()
        device = next(model.parameters()).device
        loader = on_device(batches(self.queries, self.batch_size), device)
        return evaluate(_predicted_class, model, loader).cpu().numpy()


def _predicted_class(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return model(batch[0]).argmax(-1)
