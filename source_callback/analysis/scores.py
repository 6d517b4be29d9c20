"""Where an analysis's scores add up: arrays in memory, or the store's score arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import zarr


class ScoreSink(Protocol):
    """Receives blocks of scores: ``block[q, j]`` adds to example ``start + j`` of a stage."""

    #: Adding to a block already added to costs no more than its first addition (in memory);
    #: otherwise (in the store) it reads the block back, so each block is best added once.
    adds_in_place: bool

    def add(self, stage: int, start: int, block: np.ndarray) -> None:
        """Add ``block`` (``[queries, width]``, float64) to a stage's scores at ``start``."""
        ...


class MemoryScores:
    """Scores held in memory: one float64 ``[queries, examples]`` array per stage.

    Parameters
    ----------
    shapes
        ``(queries, examples)`` per stage, in stage order.
    """

    adds_in_place = True

    def __init__(self, shapes: Sequence[tuple[int, int]]) -> None:
        self.arrays = [np.zeros(shape) for shape in shapes]

    def add(self, stage: int, start: int, block: np.ndarray) -> None:
        """Add in place: ``[Q, N]`` can be large."""
        self.arrays[stage][:, start : start + block.shape[1]] += block


class StoredScores:
    """Scores added up in the store's score arrays, one block at a time (out of core).

    A block's first contribution is written as is; later ones (other segments, checkpoints)
    read the stored block back and add. Each caller must own whole chunks of the arrays.

    Parameters
    ----------
    arrays
        One Zarr array ``[queries, examples]`` per stage, in stage order.
    """

    adds_in_place = False

    def __init__(self, arrays: Sequence[zarr.Array]) -> None:
        self.arrays = list(arrays)
        self._written: set[tuple[int, int]] = set()

    def add(self, stage: int, start: int, block: np.ndarray) -> None:
        """Add ``block`` to the stored scores."""
        array = self.arrays[stage]
        region = (slice(None), slice(start, start + block.shape[1]))
        if (stage, start) in self._written:
            block = block + array[region]
        array[region] = block
        self._written.add((stage, start))
