"""The processes an analysis runs on: one, or the ranks of a ``torch.distributed`` group.

Every data pass is split the same way: the examples are cut into blocks of consecutive
indices and block ``b`` goes to rank ``b mod world_size``. Sums (covariance factors, corrected
eigenvalues) are all-reduced; rows (query gradients, measurements) are all-gathered; score
blocks are written by the rank that computed them, chunk-aligned so that no two ranks write one
chunk. A failure on one rank is shared at the next collective, so every rank raises instead of
waiting forever for the one that died.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from source_callback.errors import RankFailedError

T = TypeVar("T")
Blocks = list[tuple[int, int]]


class Workers:
    """The place of this process among the analysis's processes.

    Parameters
    ----------
    device
        The device this rank computes on.
    distributed
        Use the default ``torch.distributed`` process group (initialised by Lightning Fabric,
        ``torchrun`` or the user); ``False`` for a single process.
    """

    def __init__(self, device: torch.device, distributed: bool = False) -> None:
        self.device = device
        self.distributed = distributed and dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1

    def blocks(self, count: int, width: int) -> Blocks:
        """The blocks of ``width`` consecutive indices among ``count`` that this rank takes."""
        return self._blocks_of(self.rank, count, width)

    def run(self, work: Callable[[], T]) -> T:
        """Run this rank's part of a pass, then learn whether every rank's part succeeded.

        A rank whose part raised re-raises its own error; the others raise
        :class:`RankFailedError` naming it, so that no rank waits at the next collective for
        one that will never arrive.
        """
        try:
            result, error = work(), None
        except Exception as exc:  # shared with the other ranks below, then re-raised
            result, error = None, exc
        self.check(error)
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    def check(self, error: BaseException | None = None) -> None:
        """Raise :class:`RankFailedError` if another rank reports an error (``None``: fine)."""
        if not self.distributed:
            return
        reports: list[Any] = [None] * self.world_size
        dist.all_gather_object(
            reports, None if error is None else f"{type(error).__name__}: {error}"
        )
        failed = [(rank, text) for rank, text in enumerate(reports) if text is not None]
        if error is None and failed:
            rank, text = failed[0]
            raise RankFailedError(f"rank {rank} of the distributed analysis failed: {text}")

    def sum(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Element-wise sums over ranks (in place)."""
        if self.distributed:
            for name in sorted(tensors):
                dist.all_reduce(tensors[name])
        return tensors

    def gather(self, local: torch.Tensor, count: int, width: int) -> torch.Tensor:
        """The rows of every rank, in order: ``local`` holds this rank's :meth:`blocks` rows."""
        if not self.distributed:
            return local
        longest = max(
            sum(stop - start for start, stop in self._blocks_of(rank, count, width))
            for rank in range(self.world_size)
        )
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        out = local.new_empty((count, *local.shape[1:]))
        for rank, part in enumerate(parts):
            row = 0
            for start, stop in self._blocks_of(rank, count, width):
                out[start:stop] = part[row : row + stop - start]
                row += stop - start
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.distributed:
            dist.barrier()

    def _blocks_of(self, rank: int, count: int, width: int) -> Blocks:
        starts = range(rank * width, count, self.world_size * width)
        return [(start, min(start + width, count)) for start in starts]
