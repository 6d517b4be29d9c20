"""``analyze`` at scale, in one process: out-of-core scores and cached projected gradients.

Ground truth is the plain in-memory analysis of the same record: out-of-core scores must equal
it, and cached scores must equal it where the projection is exact (``projection_dim`` at least
every dimension of the model), up to the cache's float32 storage.
"""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from models import TinyClassifier, adamw, loader, make_dataset, sgd_momentum, trainer
from scipy.stats import spearmanr
from torch.utils.data import Dataset, TensorDataset

from source_callback import AnalysisResult, SourceCallback, analyze, load_analysis, open_run
from source_callback.analysis import capture_check, memory
from source_callback.analysis.inputs import FIRST_BATCH
from source_callback.analysis.scores import StoredScores
from source_callback.analysis.units import MATRIX_LAYOUT
from source_callback.fingerprint import example_digests
from source_callback.record.probe import probe_indices
from source_callback.store.analyses import open_cache
from source_callback.store.schema import ATTR_CACHE, ATTR_COMMITTED, CACHE_INFO_CONFIG

EXACT_K = 16  # at least every side of TinyClassifier's layers (6+1, 8+1, 8, 3)


class Counting(Dataset):
    """A dataset that counts the items read from it."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data
        self.reads = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        self.reads += 1
        return self.data[index]


def _sets() -> dict[str, TensorDataset]:
    return {"pretrain": make_dataset(120, seed=0), "finetune": make_dataset(72, seed=1)}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Two stages: SGD with momentum, then AdamW."""
    root = tmp_path_factory.mktemp("scaling")
    path = str(root / "run.zarr")
    torch.manual_seed(0)  # the same run whatever ran before (test_a_small_projection... needs it)
    model = TinyClassifier(optimizer=sgd_momentum)
    callback = SourceCallback(path, stage="pretrain", checkpoints_per_stage=4)
    sets = _sets()
    trainer([callback], root, max_epochs=2).fit(model, loader(sets["pretrain"], 16))
    model.optimizer_factory = adamw
    callback.next_stage("finetune")
    trainer([callback], root, max_epochs=2).fit(model, loader(sets["finetune"], 16))
    return path


def _analyze(store: str, queries: Dataset, **kwargs: Any) -> AnalysisResult:
    options: dict[str, Any] = {"train": _sets(), "name": None, "verbose": False}
    options.update(kwargs)
    return analyze(store, model=TinyClassifier(), task="classification", queries=queries, **options)


@pytest.fixture(scope="module")
def exact(store) -> AnalysisResult:
    return _analyze(store, make_dataset(5, seed=7))


def _assert_scores_close(result: AnalysisResult, expected: AnalysisResult, rtol: float) -> None:
    for name in expected.stage_names:
        scale = np.abs(expected.scores[name]).max()
        np.testing.assert_allclose(
            np.asarray(result.scores[name][...]), expected.scores[name], atol=rtol * scale, rtol=0
        )


def test_out_of_core_scores_equal_in_memory_and_stay_in_the_store(store, exact) -> None:
    result = _analyze(store, make_dataset(5, seed=7), name="ooc", out_of_core=True)
    assert all(isinstance(a, zarr.Array) for a in result.scores.values())
    _assert_scores_close(result, exact, rtol=1e-12)
    np.testing.assert_allclose(result.stage_effects, exact.stage_effects, rtol=1e-12)
    assert result.top(0, k=4) == exact.top(0, k=4)
    reopened = load_analysis(store, "ooc")
    _assert_scores_close(reopened, exact, rtol=1e-12)
    assert reopened.config == exact.config


TWO_BLOCKS: dict[str, Any] = {"train": {"pretrain": make_dataset(4200, seed=3)}, "segments": 2}


@pytest.fixture(scope="module")
def two_blocks(tmp_path_factory) -> tuple[str, AnalysisResult]:
    """One AdamW stage on 4,200 examples (two blocks of scores: 4,096 and 104 examples).

    The store, and its analysis in memory (``TWO_BLOCKS``' settings, 3 queries).
    """
    root = tmp_path_factory.mktemp("two-blocks")
    path = str(root / "run.zarr")
    torch.manual_seed(0)
    callback = SourceCallback(path, stage="pretrain", checkpoints_per_stage=4)
    data = TWO_BLOCKS["train"]["pretrain"]
    trainer([callback], root, max_epochs=2).fit(TinyClassifier(optimizer=adamw), loader(data, 1050))
    return path, _analyze(path, make_dataset(3, seed=7), **TWO_BLOCKS)


def _room_for_states(monkeypatch: pytest.MonkeyPatch, states: float) -> None:
    """Let the states held together take ``states`` times a ``TinyClassifier``'s state."""
    state_bytes = sum(t.numel() * t.element_size() for t in TinyClassifier().state_dict().values())
    machine = memory.available(torch.device("cpu"))
    monkeypatch.setattr(memory, "HELD_STATES_SHARE", states * state_bytes / machine)


@pytest.mark.parametrize(("share", "adds_per_block"), [(None, 1), (3.5, 2), (1.0, 4)])
def test_out_of_core_writes_each_block_once_per_group_of_states_held(
    two_blocks, monkeypatch, share: float | None, adds_per_block: int
) -> None:
    """Held together, a stage's states all go into a block before it is written.

    Two segments, 4 states in all. ``share``: room for that many states in
    the memory their rule allows (``None``: the machine's, all of them); the blocks are then
    written once per group of that many states, equal to the in-memory scores bit for bit.
    """
    store, expected = two_blocks
    if share is not None:
        _room_for_states(monkeypatch, share)
    adds: list[tuple[int, int]] = []
    add = StoredScores.add

    def counted(sink: StoredScores, stage: int, start: int, block: np.ndarray) -> None:
        adds.append((stage, start))
        add(sink, stage, start, block)

    monkeypatch.setattr(StoredScores, "add", counted)
    queries = make_dataset(3, seed=7)
    result = _analyze(store, queries, name="blocks", out_of_core=True, **TWO_BLOCKS)
    assert sorted(adds) == sorted([(0, 0), (0, 4096)] * adds_per_block)
    np.testing.assert_array_equal(
        np.asarray(result.scores["pretrain"][...]), expected.scores["pretrain"]
    )
    np.testing.assert_array_equal(result.stage_effects, expected.stage_effects)


def test_a_damaged_score_chunk_is_an_error_not_a_wrong_score(store, tmp_path) -> None:
    copy = tmp_path / "run.zarr"
    shutil.copytree(store, copy)
    _analyze(str(copy), make_dataset(5, seed=7), name="kept", out_of_core=True)
    (chunk,) = [p for p in copy.glob("analyses/kept/*/scores/0000/c/**/*") if p.is_file()]
    data = bytearray(chunk.read_bytes())
    data[17] ^= 0x01  # a bit of the first query's third score
    chunk.write_bytes(bytes(data))
    scores = load_analysis(str(copy), "kept").scores["pretrain"]
    with pytest.raises(ValueError, match="checksum"):
        scores[...]


def test_cache_with_an_exact_projection_equals_exact_scores(store, exact) -> None:
    result = _analyze(
        store, make_dataset(5, seed=7), name="cached", cache="projected", projection_dim=EXACT_K
    )
    _assert_scores_close(result, exact, rtol=1e-6)  # float32 cache
    np.testing.assert_allclose(result.stage_effects, exact.stage_effects, rtol=1e-12)


def test_a_cache_built_one_state_at_a_time_equals_one_built_at_once(store, monkeypatch) -> None:
    """Without room for two states, each cached block gets its states one at a time."""
    queries = make_dataset(5, seed=7)
    kwargs: dict[str, Any] = {"cache": "projected", "projection_dim": EXACT_K}
    together = _analyze(store, queries, name="held-together", **kwargs)
    _room_for_states(monkeypatch, 1.5)
    apart = _analyze(store, queries, name="held-apart", **kwargs)
    _assert_scores_close(apart, together, rtol=1e-6)  # the float32 sums of the read-backs
    assert not all(np.array_equal(apart.scores[n], together.scores[n]) for n in apart.scores)


def test_new_queries_are_scored_from_the_cache_without_reading_training_data(store) -> None:
    kwargs = {"name": "reuse", "cache": "projected", "projection_dim": EXACT_K}
    _analyze(store, make_dataset(5, seed=7), **kwargs)
    new_queries = make_dataset(4, seed=11)
    counted = {name: Counting(data) for name, data in _sets().items()}
    result = _analyze(store, new_queries, train=counted, **kwargs)
    for name, data in counted.items():  # only the data, first-batch, probe and capture checks
        baseline = Counting(data.data)
        example_digests(baseline)  # the data check reads every example once (plus one)
        probed = 2 * len(probe_indices(len(data)))  # at the stage's start and end
        captured = capture_check.EXAMPLES if name == "pretrain" else 0  # the model's first
        assert data.reads == baseline.reads + FIRST_BATCH + probed + captured, name
    _assert_scores_close(result, _analyze(store, new_queries), rtol=1e-6)
    assert load_analysis(store, "reuse").scores["pretrain"].shape == (4, 120)


def test_a_cache_of_other_settings_is_rebuilt(store) -> None:
    queries = make_dataset(5, seed=7)
    _analyze(store, queries, name="rebuilt", cache="projected", projection_dim=EXACT_K)
    result = _analyze(
        store, queries, name="rebuilt", cache="projected", projection_dim=EXACT_K, segments=2
    )
    _assert_scores_close(result, _analyze(store, queries, segments=2), rtol=1e-6)


def test_a_cache_of_an_earlier_matrix_layout_is_rebuilt_not_reused(store) -> None:
    """A cache written before units recorded their matrix layout holds other coordinates."""
    kwargs = {"name": "layout", "cache": "projected", "projection_dim": EXACT_K}
    _analyze(store, make_dataset(5, seed=7), **kwargs)
    cache = open_cache(store, None, "layout")
    assert cache is not None
    info = dict(cache.attrs[ATTR_CACHE])
    config = dict(info[CACHE_INFO_CONFIG])
    assert config.pop("matrix_layout") == MATRIX_LAYOUT
    writable = zarr.open_group(store, mode="r+")[cache.path]
    writable.attrs[ATTR_CACHE] = {**info, CACHE_INFO_CONFIG: config}  # as an earlier version wrote
    new_queries = make_dataset(4, seed=11)
    counted = {name: Counting(data) for name, data in _sets().items()}
    result = _analyze(store, new_queries, train=counted, **kwargs)
    for name, data in counted.items():  # more than the data and probe checks read: rebuilt
        assert data.reads > 2 * len(data) + 2 * len(probe_indices(len(data))), name
    rebuilt = open_cache(store, None, "layout")
    assert rebuilt is not None
    assert rebuilt.attrs[ATTR_CACHE][CACHE_INFO_CONFIG]["matrix_layout"] == MATRIX_LAYOUT
    _assert_scores_close(result, _analyze(store, new_queries), rtol=1e-6)


def test_a_small_projection_approximates_and_improves_with_its_dimension(store, exact) -> None:
    rho = {}
    for k in (1, 4):
        result = _analyze(
            store, make_dataset(5, seed=7), name=f"k{k}", cache="projected", projection_dim=k
        )
        rho[k] = spearmanr(result.scores["pretrain"].ravel(), exact.scores["pretrain"].ravel())[0]
    print(f"projected cache: Spearman k=1 {rho[1]:.3f}, k=4 {rho[4]:.3f}")
    assert 0 < rho[1] < rho[4] < 1


class FailsAfter(Counting):
    """A counting dataset that raises once more than ``limit`` items have been read."""

    def __init__(self, data: TensorDataset, limit: int) -> None:
        super().__init__(data)
        self.limit = limit

    def __getitem__(self, index: int) -> Any:
        if self.reads >= self.limit:
            raise RuntimeError("the disk went away")
        return super().__getitem__(index)


def test_an_interrupted_analysis_keeps_the_committed_one_and_its_cache(store) -> None:
    queries = make_dataset(5, seed=7)
    kwargs = {"name": "crash", "cache": "projected", "projection_dim": EXACT_K, "out_of_core": True}
    counted = {name: Counting(data) for name, data in _sets().items()}
    _analyze(store, queries, train=counted, **{**kwargs, "name": "counted"})
    before = _analyze(store, queries, **{**kwargs, "segments": 2})
    assert "crash" in open_run(store).analyses
    # Pretraining's last reads write the cached gradients of its last segment: fail there, in
    # rebuilding the cache for other settings.
    sets = _sets()
    failing = {**sets, "pretrain": FailsAfter(sets["pretrain"], counted["pretrain"].reads - 10)}
    with pytest.raises(RuntimeError, match="the disk went away"):
        _analyze(store, queries, train=failing, **kwargs)
    run = open_run(store)
    (entry,) = [e for e in run.stored_analyses() if e.name == "crash"]
    assert entry.committed and entry.writing and entry.cache  # the new versions were left
    kept = load_analysis(store, "crash")
    assert kept.config["segments"] == before.config["segments"]
    for name in before.scores:  # the committed analysis reads back bit for bit
        np.testing.assert_array_equal(np.asarray(kept.scores[name][...]), before.scores[name][...])
    cache = open_cache(store, None, "crash")
    assert cache is not None and cache.attrs[ATTR_COMMITTED]  # the old settings' cache
    result = _analyze(store, queries, **kwargs)
    _assert_scores_close(result, _analyze(store, queries), rtol=1e-6)
    assert "crash" in open_run(store).analyses


def test_cache_and_out_of_core_need_a_name_and_cache_needs_source(store) -> None:
    queries = make_dataset(2, seed=7)
    with pytest.raises(ValueError, match="pass a name"):
        _analyze(store, queries, cache="projected")
    with pytest.raises(ValueError, match="pass a name"):
        _analyze(store, queries, out_of_core=True)
    with pytest.raises(ValueError, match="serves method 'source' or 'fast-source'"):
        _analyze(store, queries, cache="projected", method="tracin", name="x")
    with pytest.raises(ValueError, match="cache must be None or 'projected'"):
        _analyze(store, queries, cache="exact", name="x")
