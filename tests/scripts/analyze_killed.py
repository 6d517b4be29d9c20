"""Analyze a recorded run and SIGKILL this process at a chosen point of writing the result.

Usage: ``python analyze_killed.py STORE POINT [cache]``, for ``tests/test_atomic_analyses.py``.
``POINT`` is where the process kills itself:

- ``created``: right after the new results (or cache) version is created;
- ``scoring``: in the middle of adding scores into the store (out of core);
- ``commit``: every array written, before the version is marked committed;
- ``swapped``: after the analysis name points at the new version, before the old is deleted;
- ``none``: not at all.

With ``cache``, the analysis also builds a projected-gradient cache (other settings than the
committed one), so that the points apply to the cache version first.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import TinyClassifier, make_dataset

from source_callback import analyze
from source_callback.analysis import scores
from source_callback.store import analyses

TRAIN = {"pretrain": make_dataset(48, seed=1)}


def queries(count: int):
    return make_dataset(count, seed=11)


def run(store: Path, count: int, projection_dim: int | None) -> None:
    cached = (
        {} if projection_dim is None else {"cache": "projected", "projection_dim": projection_dim}
    )
    analyze(
        store,
        model=TinyClassifier(),
        task="classification",
        train=TRAIN,
        queries=queries(count),
        segments=1,
        batch_size=16,
        out_of_core=True,
        verbose=False,
        **cached,
    )


def die(*_: object, **__: object) -> None:
    print("KILLED", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def after(function, calls: int = 1):
    """``function``, and death once it has been called ``calls`` times."""
    seen = []

    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        seen.append(1)
        if len(seen) >= calls:
            die()
        return result

    return wrapped


def main() -> None:
    store, point = Path(sys.argv[1]), sys.argv[2]
    cache = len(sys.argv) > 3 and sys.argv[3] == "cache"
    if point == "created":
        analyses._new_version = after(analyses._new_version)
    elif point == "scoring":
        scores.StoredScores.add = after(scores.StoredScores.add, calls=1)
    elif point == "commit":
        analyses._commit = die
    elif point == "swapped":
        commit = analyses._commit

        def swap_then_die(version, kind):
            zarr.Group.__delitem__ = die  # the first deletion after the pointer swap
            commit(version, kind)

        analyses._commit = swap_then_die
    run(store, count=5, projection_dim=8 if cache else None)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
