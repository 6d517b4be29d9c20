"""Wall-clock time per named step of an analysis, for its summary."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Timer:
    """Seconds spent in each named step, exclusive of the steps timed inside it.

    A step timed while another runs (a data pass inside a segment's fit) counts for itself
    only: the enclosing step's time leaves it out, so the times add up to the time timed.

    Examples
    --------
    >>> timer = Timer()
    >>> with timer("fit"):
    ...     with timer("covariance factors"):
    ...         pass
    >>> sorted(timer.seconds)
    ['covariance factors', 'fit']
    """

    def __init__(self) -> None:
        #: Seconds per step name, in the order the steps first ran.
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per running step: seconds of the steps inside it

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as step ``name`` (added to earlier runs of that step)."""
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            inner = self._inner.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - inner
            if self._inner:
                self._inner[-1] += elapsed
