"""What an analysis shows while it runs: a bar per data pass, and one over the whole analysis."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from tqdm.auto import tqdm

#: A planned data pass: its kind (what it computes; passes of a kind cost about the same per
#: batch) and its number of batches.
PlannedPass = tuple[str, int]

#: The bar over the whole analysis: the pass it is at, batches done of those planned, the time
#: elapsed and the estimated time left (:meth:`Progress.time_left`).
OVERALL_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} batches [{elapsed}<{left}]"


class _OverallBar(tqdm):  # type: ignore[misc]
    """A tqdm bar that shows the time left it is given (``{left}``) instead of its own."""

    def __init__(self, *args: Any, left: Callable[[], float | None], **kwargs: Any) -> None:
        self._left = left  # before tqdm's constructor, which may draw the bar
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        values = super().format_dict
        left = self._left()
        values["left"] = "?" if left is None else self.format_interval(left)
        return values


class Progress:
    """The progress display of one analysis, shown only where ``shown`` (``verbose``, rank 0).

    Each data pass shows a bar of its own, named by what it computes (``"segment 2/6 factors
    1/3"``). Once the analysis knows which passes it will make (:meth:`plan`, after looking for
    a stored cache: passes a cache makes unneeded are not planned), a bar over the whole of it
    shows the pass it is at of those planned, the batches done of those planned, the time
    elapsed and the time left (:meth:`time_left`). It counts batches rather than passes because
    passes differ in size (a stage's data, the queries, one block of the cache).

    Used as a context manager: leaving it closes the overall bar, also when the analysis raises.

    Parameters
    ----------
    shown
        Whether anything is displayed.
    clock
        Seconds, for the time left (``time.monotonic``).
    """

    def __init__(self, shown: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.shown = shown
        self._clock = clock
        self._plan: list[PlannedPass] = []
        self._started = 0
        self._in_pass = 0  # batches done in the pass at ``_started - 1``
        self._spent: defaultdict[str, float] = defaultdict(float)
        self._done: Counter[str] = Counter()
        self._tick = clock()
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

    def plan(self, passes: Sequence[PlannedPass]) -> None:
        """Show the bar over the whole analysis: the passes it will make, in order."""
        self._plan = list(passes)
        self._tick = self._clock()
        self._overall = _OverallBar(
            total=sum(batches for _, batches in self._plan),
            desc=self._description(),
            bar_format=OVERALL_FORMAT,
            disable=not self.shown,
            left=self.time_left,
        )

    def time_left(self) -> float | None:
        """Seconds the planned batches not yet done will take; ``None`` before the first batch.

        Each at the mean time per batch of the passes of its kind so far (a kind not yet
        started: of all batches so far). The time between batches — a checkpoint read, an
        eigendecomposition between two kinds of pass — counts towards the batch after it.
        """
        done = sum(self._done.values())
        if not done:
            return None
        mean = sum(self._spent.values()) / done
        left = 0.0
        for index, (kind, batches) in enumerate(self._plan):
            if index < self._started - 1:
                continue
            if index == self._started - 1:
                batches -= self._in_pass
            rate = self._spent[kind] / self._done[kind] if self._done[kind] else mean
            left += max(batches, 0) * rate
        return left

    @contextmanager
    def data_pass(self, desc: str, batches: int) -> Iterator[Callable[[], None]]:
        """Show a pass of ``batches`` batches while in the ``with`` block.

        The block calls what it is given once per batch done. Passes come in the planned order.
        """
        index = self._started
        self._started += 1
        self._in_pass = 0
        kind = self._plan[index][0] if index < len(self._plan) else desc
        bar = tqdm(total=batches, desc=desc, disable=not self.shown, leave=False)
        overall = self._overall
        if overall is not None:
            overall.set_description_str(self._description(), refresh=False)

        def advance() -> None:
            now = self._clock()
            self._spent[kind] += now - self._tick
            self._done[kind] += 1
            self._tick = now
            self._in_pass += 1
            bar.update()
            if overall is not None:
                overall.update()

        try:
            yield advance
        finally:
            bar.close()

    def _description(self) -> str:
        return f"analysis, pass {self._started}/{len(self._plan)}"
