"""``analyze`` on a store in S3 (a moto server on 127.0.0.1): checkpoints read through fsspec,
scores added up out of core and a projected-gradient cache written and reused there, with the
result of analyzing the same record on a local path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from models import TinyClassifier, make_dataset
from test_remote import record_two_stages

from source_callback import analyze, load_analysis, open_run

TRAIN = {"pretrain": make_dataset(48, seed=0), "finetune": make_dataset(40, seed=1)}
QUERIES = make_dataset(4, seed=7)


def _analyze(store: str | Path, **kwargs: Any):
    return analyze(
        store,
        model=TinyClassifier(),
        task="classification",
        train=TRAIN,
        queries=QUERIES,
        segments={"pretrain": 2, "finetune": 1},  # the run records 2 checkpoints per stage
        verbose=False,
        **kwargs,
    )


def test_s3_analysis_out_of_core_and_cached_equals_local(
    s3: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    local = tmp_path / "run.zarr"
    record_two_stages(local, tmp_path)
    expected = _analyze(local, name=None)
    prefix, options = s3
    url = f"{prefix}/run.zarr"
    # The same bytes in S3 (recording to S3 itself is tested in test_remote.py).
    fsspec.filesystem("s3", **options).put(str(local), url, recursive=True)

    cached = {"cache": "projected", "projection_dim": 16}  # exact: 16 covers every layer
    built = _analyze(url, storage_options=options, out_of_core=True, **cached)
    built_scores = {name: np.asarray(built.scores[name][...]) for name in expected.stage_names}
    again = _analyze(url, storage_options=options, **cached)  # scored from the S3 cache
    for name in expected.stage_names:
        scale = np.abs(expected.scores[name]).max()
        for scores in (built_scores[name], again.scores[name]):
            np.testing.assert_allclose(scores, expected.scores[name], rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(again.stage_effects, expected.stage_effects, rtol=1e-12)
    assert open_run(url, storage_options=options).analyses == ["default"]
    stored = load_analysis(url, storage_options=options)
    assert stored.config["cache"] == {"kind": "projected", "projection_dim": 16}
    np.testing.assert_array_equal(
        np.asarray(stored.scores["finetune"][...]), again.scores["finetune"]
    )
