"""A new analysis replaces one of the same name only when it commits (SIGKILL at every point)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from models import TinyClassifier, loader, trainer
from processes import SCRIPTS, load_script, subprocess_env

from source_callback import SourceCallback, load_analysis, open_run
from source_callback.store.analyses import open_cache
from source_callback.store.schema import ATTR_CACHE

SCRIPT = SCRIPTS / "analyze_killed.py"
POINTS = ("created", "scoring", "commit", "swapped")


@pytest.fixture(scope="module")
def script():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def analyzed_once(tmp_path_factory, script):
    """A one-stage record with a committed analysis ``default`` of 3 queries (and a cache)."""
    root = tmp_path_factory.mktemp("atomic")
    store = root / "run.zarr"
    callback = SourceCallback(store, stage="pretrain", checkpoints_per_stage=2)
    trainer([callback], root, max_epochs=2).fit(
        TinyClassifier(), loader(script.TRAIN["pretrain"], batch_size=16)
    )
    script.run(store, count=3, projection_dim=4)
    result = load_analysis(store)
    result.scores = {name: np.asarray(array[...]) for name, array in result.scores.items()}
    return store, result


@pytest.fixture
def analyzed(tmp_path, analyzed_once):
    """A copy of :func:`analyzed_once`'s store, for one test to kill an analysis in."""
    store, result = analyzed_once
    copy = tmp_path / "run.zarr"
    shutil.copytree(store, copy)
    return copy, result


def _killed(store: Path, point: str, *extra: str) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(store), point, *extra],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=240,
    )
    assert done.returncode == -9, done.stdout + done.stderr
    return done.stdout


def _same(a, b) -> None:
    assert a.config == b.config
    for name in a.scores:
        np.testing.assert_array_equal(np.asarray(a.scores[name][...]), b.scores[name][...])
    np.testing.assert_array_equal(a.stage_effects, b.stage_effects)


#: (cache rebuilt too, point killed at) -> (the results are the new ones, the cache is)
CASES = {
    (False, "created"): (False, False),
    (False, "scoring"): (False, False),
    (False, "commit"): (False, False),
    (False, "swapped"): (True, False),
    # with a cache, the first version created and committed is the cache's; it is complete
    # before scoring starts and commits on its own
    (True, "created"): (False, False),
    (True, "scoring"): (False, True),
    (True, "swapped"): (False, True),
}


@pytest.mark.slow
@pytest.mark.parametrize(("with_cache", "point"), list(CASES), ids=[f"{c}-{p}" for c, p in CASES])
def test_a_killed_analysis_leaves_a_committed_one(tmp_path, analyzed, script, with_cache, point):
    store, old = analyzed
    old_cache = open_cache(store, None, "default").attrs[ATTR_CACHE]
    assert "KILLED" in _killed(store, point, *(["cache"] if with_cache else []))
    new_results, new_cache = CASES[with_cache, point]
    run = open_run(store)
    assert run.analyses == ["default"]
    found = load_analysis(store)
    if new_results:
        assert found.scores["pretrain"].shape == (5, 48)
    else:
        _same(found, old)  # bit for bit
    (entry,) = run.stored_analyses()
    # an uncommitted version was left, unless the results' own commit was the one killed
    assert entry.committed and entry.writing == (not new_results)
    cache = open_cache(store, None, "default").attrs[ATTR_CACHE]
    assert (cache["projection"]["k"] == 8) if new_cache else (cache == old_cache)
    script.run(store, count=3, projection_dim=4)
    (entry,) = open_run(store).stored_analyses()
    assert entry.committed and not entry.writing  # the next write cleared what was left
    _same(load_analysis(store), old)
