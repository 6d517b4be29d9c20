"""What an analysis shows while it runs: a bar per data pass, and one over the whole analysis."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType

from tqdm.auto import tqdm

#: The bar over the whole analysis: the pass it is at, batches done of those planned, the time
#: elapsed and the estimated time left.
OVERALL_FORMAT = (
    "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} batches [{elapsed}<{remaining}]"
)


class Progress:
    """The progress display of one analysis, shown only where ``shown`` (``verbose``, rank 0).

    Each data pass shows a bar of its own, named by what it computes (``"segment 2/6 factors
    1/3"``). Once the analysis knows which passes it will make (:meth:`plan`, after looking for
    a stored cache: passes a cache makes unneeded are not planned), a bar over the whole of it
    shows the pass it is at of those planned, the batches done of those planned, the time
    elapsed and the time left: the batches left at the mean time per batch so far. It counts
    batches rather than passes because passes differ in size (a stage's data, the queries, one
    block of the cache); the time between passes (checkpoint reads, eigendecompositions) is
    spread over the batches.

    Used as a context manager: leaving it closes the overall bar, also when the analysis raises.

    Parameters
    ----------
    shown
        Whether anything is displayed.
    """

    def __init__(self, shown: bool) -> None:
        self.shown = shown
        self._planned = 0
        self._started = 0
        self._overall: tqdm | None = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._overall is not None:
            self._overall.close()

    def plan(self, passes: Sequence[int]) -> None:
        """Show the bar over the whole analysis; ``passes`` holds each planned pass's batches."""
        self._planned = len(passes)
        self._overall = tqdm(
            total=sum(passes),
            desc=self._description(),
            bar_format=OVERALL_FORMAT,
            smoothing=0,  # the mean over all batches so far: passes differ in cost per batch
            disable=not self.shown,
        )

    @contextmanager
    def data_pass(self, desc: str, batches: int) -> Iterator[Callable[[], None]]:
        """Show a pass of ``batches`` batches while in the ``with`` block.

        The block calls what it is given once per batch done.
        """
        self._started += 1
        bar = tqdm(total=batches, desc=desc, disable=not self.shown, leave=False)
        overall = self._overall
        if overall is not None:
            overall.set_description_str(self._description(), refresh=False)

        def advance() -> None:
            bar.update()
            if overall is not None:
                overall.update()

        try:
            yield advance
        finally:
            bar.close()

    def _description(self) -> str:
        return f"analysis, pass {self._started}/{self._planned}"
