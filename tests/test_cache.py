"""The projected-gradient cache on real local Zarr stores: operators, gradient arrays, config."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from models import TinyClassifier
from torch import nn
from torch.nn import functional as F

from source_callback.analysis.cache import (
    add_cached_scores,
    cache_differences,
    cache_info,
    create_gradients,
    gradients,
    read_operators,
    read_rows,
    stored_projection,
    write_operators,
)
from source_callback.analysis.ekfac import ModuleCurvature, tracked_modules
from source_callback.analysis.gradients import contract
from source_callback.analysis.projection import KroneckerProjection, projected_grads
from source_callback.analysis.scores import MemoryScores
from source_callback.analysis.source import DiagonalExpOperator, EkfacOperator, sweep
from source_callback.errors import StoreError
from source_callback.store import schema
from source_callback.store.analyses import (
    commit_cache,
    create_cache,
    open_cache,
    reopen_cache,
    write_analysis,
)
from source_callback.store.reader import open_run
from source_callback.store.writer import StoreWriter

SHAPES = {"net.0": (8, 7), "net.2": (3, 9), "": (2, 5)}


def _store(tmp_path: Path) -> str:
    url = str(tmp_path / "run.zarr")
    StoreWriter.open(url)
    return url


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def _curvature(g: torch.Generator) -> dict[str, ModuleCurvature]:
    return {
        name: ModuleCurvature(
            _orthogonal(fan_in, g),
            _orthogonal(out, g),
            torch.rand(out, fan_in, generator=g, dtype=torch.float64) * 3,
        )
        for name, (out, fan_in) in SHAPES.items()
    }


def _operators() -> list[Any]:
    g = torch.Generator().manual_seed(0)
    positive = {
        n: torch.rand(*s, generator=g, dtype=torch.float64) + 0.5 for n, s in SHAPES.items()
    }
    return [
        # SGD: float shifts, one of them zero; awkward floats that must come back bit for bit.
        EkfacOperator(
            _curvature(g),
            {"net.0": 0.1 + 0.2, "net.2": 1 / 3, "": 1e-300},
            {"net.0": 1e-4, "net.2": 0.0, "": math.pi},
        ),
        # Adam, preconditioned: a tensor shift for one module, sqrt_p tensors.
        EkfacOperator(
            _curvature(g),
            {"net.0": 0.7, "net.2": 2.5, "": 0.01},
            {"net.0": torch.rand(8, 7, generator=g, dtype=torch.float64), "net.2": 0.01, "": 0.0},
            {n: t.sqrt() for n, t in positive.items()},
        ),
        DiagonalExpOperator(
            _curvature(g),
            {"net.0": 0.3, "net.2": 0.9, "": 1.1},
            positive,
            coupled={"net.0": 1e-3, "net.2": 0.0, "": 0.0},
            decoupled={"net.0": 0.0, "net.2": 1e-2, "": 0.0},
            damping={"net.0": 0.05, "net.2": 0.5, "": math.inf},
        ),
        # A segment that trains only some modules.
        EkfacOperator({"net.2": _curvature(g)["net.2"]}, {"net.2": 0.4}, {"net.2": 0.0}),
    ]


def _assert_identical(a: Any, b: Any) -> None:
    """Recursive equality: same types, tensors equal in value, dtype, shape and layout (BLAS
    rounding depends on it: qr and eigh give column-major matrices), floats exact."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            _assert_identical(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _assert_identical(a[key], b[key])
    else:
        assert a == b


def test_operators_round_trip_exactly_and_act_identically(tmp_path: Path) -> None:
    url = _store(tmp_path)
    operators = _operators()
    group = create_cache(url, None, "default", cache_info({}, {}))
    write_operators(group[schema.CACHE_OPERATORS], operators)
    commit_cache(group)

    reopened = open_cache(url, None, "default")
    assert reopened is not None
    back = read_operators(reopened[schema.CACHE_OPERATORS])
    assert len(back) == len(operators)
    for original, restored in zip(operators, back, strict=True):
        _assert_identical(original, restored)
    assert back[0].sqrt_p is None
    assert back[1].shift["net.0"].dtype == torch.float64
    assert back[2].damping[""] == math.inf

    g = torch.Generator().manual_seed(1)
    u = {n: torch.randn(4, *s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}
    for original, restored in zip(operators, back, strict=True):
        for method in ("propagate", "respond"):
            expected, got = getattr(original, method)(u), getattr(restored, method)(u)
            assert list(expected) == list(got)
            for name in expected:
                assert torch.equal(expected[name], got[name])
    responses, arrivals = sweep(operators, u)
    responses_back, arrivals_back = sweep(back, u)
    for x, y in zip([*responses, *arrivals], [*responses_back, *arrivals_back], strict=True):
        _assert_identical(x, y)


def test_operator_storage_holds_no_pickle_and_refuses_unknown_types(tmp_path: Path) -> None:
    url = _store(tmp_path)
    group = create_cache(url, None, "default", cache_info({}, {}))
    operators_group = group[schema.CACHE_OPERATORS]
    write_operators(operators_group, _operators()[:1])
    spec = operators_group[schema.segment_key(0)].attrs[schema.ATTR_OPERATOR]
    assert spec[schema.SPEC_DATACLASS][schema.SPEC_TYPE] == "EkfacOperator"

    @dataclasses.dataclass
    class Other:
        x: float

    with pytest.raises(TypeError, match="cannot store"):
        write_operators(operators_group, [Other(1.0)])
    operators_group[schema.segment_key(0)].attrs[schema.ATTR_OPERATOR] = {
        schema.SPEC_DATACLASS: {schema.SPEC_TYPE: "Popen", schema.SPEC_FIELDS: {}}
    }
    with pytest.raises(StoreError, match="unknown operator type"):
        read_operators(operators_group)


@pytest.mark.parametrize("width", [1, 300, 2048, 2049, 5000, 100_000])
def test_cache_arrays_are_float32_zstd_and_chunked_within_4096_row_blocks(
    tmp_path: Path, width: int
) -> None:
    url = _store(tmp_path)
    group = create_cache(url, None, "default", cache_info({}, {}))
    array = create_gradients(group, 2, rows=10_000, width=width)
    rows, cols = array.chunks
    assert array.dtype == np.float32
    assert array.shape == (10_000, width)
    assert schema.SCORE_CHUNK[1] % rows == 0
    assert cols == width
    assert rows * cols * 4 <= schema.CACHE_CHUNK_BYTES
    assert rows * 2 * cols * 4 > schema.CACHE_CHUNK_BYTES or rows == schema.SCORE_CHUNK[1]
    (codec,) = array.compressors
    assert isinstance(codec, zarr.codecs.BloscCodec) and codec.cname.value == "zstd"
    assert gradients(reopen_cache(url, None, "default"), 2).chunks == (rows, cols)


def test_a_row_wider_than_the_chunk_limit_is_split_into_columns() -> None:
    rows, cols = schema.cache_chunks(10 * 2**20)
    assert rows == 1 and cols * 4 == schema.CACHE_CHUNK_BYTES


def test_blocks_written_by_separate_writers_touch_only_their_chunks(tmp_path: Path) -> None:
    url = _store(tmp_path)
    group = create_cache(url, None, "default", cache_info({}, {}))
    width = 5000  # chunks of 1024 rows
    create_gradients(group, 0, rows=9000, width=width)
    block = np.random.default_rng(0).standard_normal((4096, width)).astype(np.float32)
    # A second "process": opens the store on its own and writes rows 4096..8191 only.
    writer = gradients(reopen_cache(url, None, "default"), 0)
    writer[4096:8192] = block
    stored = sorted(
        int(p.parent.name) for p in (Path(url) / writer.path / "c").rglob("*") if p.is_file()
    )
    assert stored == [4, 5, 6, 7]
    commit_cache(group)
    array = gradients(open_cache(url, None, "default"), 0)
    np.testing.assert_array_equal(read_rows(array, 4096, 8192), block)
    with pytest.raises(StoreError, match="never"):
        read_rows(array, 0, 4096)


def test_a_truncated_cache_chunk_is_damage_not_values(tmp_path: Path) -> None:
    """c-blosc decodes by the sizes in a chunk's header: a chunk cut short read past its end."""
    url = _store(tmp_path)
    group = create_cache(url, None, "default", cache_info({}, {}))
    array = create_gradients(group, 0, rows=100, width=8)
    array[...] = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    commit_cache(group)
    [chunk] = [p for p in (Path(url) / array.path / "c").rglob("*") if p.is_file()]
    chunk.write_bytes(chunk.read_bytes()[:-4])
    with pytest.raises(StoreError, match=r"cache at .*gradients/0000 cannot be read.*truncated"):
        read_rows(gradients(open_cache(url, None, "default"), 0), 0, 100)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def test_cached_scores_equal_contractions_of_training_gradients(tmp_path: Path) -> None:
    """Write projected gradients in blocks, read them back, score: matches ⟨v, ∇L(z_m)⟩."""
    torch.manual_seed(0)
    model = TinyClassifier().double()
    modules = tracked_modules(model)
    x, y = torch.randn(50, 6, dtype=torch.float64), torch.randint(0, 3, (50,))
    projection = KroneckerProjection.for_modules(modules, k=16, seed=0)  # exact: k ≥ every dim
    url = _store(tmp_path)
    group = create_cache(url, None, "default", cache_info({}, projection.describe()))
    array = create_gradients(group, 0, rows=50, width=projection.dim)
    for start in range(0, 50, 16):
        batch = (x[start : start + 16], y[start : start + 16])
        rows = projected_grads(model, modules, _loss, batch, projection)
        array[start : start + len(rows)] = rows.float().numpy()
    commit_cache(group)

    g = torch.Generator().manual_seed(2)
    vectors = {
        n: torch.randn(3, *s, generator=g, dtype=torch.float64)
        for n, s in projection.shapes.items()
    }
    reopened = open_cache(url, None, "default")
    rebuilt = KroneckerProjection.from_description(stored_projection(reopened))
    sink = MemoryScores([(3, 50)])
    blocks = [(0, 16), (16, 32), (32, 48), (48, 50)]
    add_cached_scores(gradients(reopened, 0), rebuilt.project(vectors), blocks, sink, 0, 1.0)
    scores = sink.arrays[0]
    exact = torch.cat(
        [contract(model, modules, _loss, (x[i : i + 25], y[i : i + 25]), vectors) for i in (0, 25)]
    ).T
    assert scores.shape == (3, 50) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, exact.numpy(), rtol=1e-5, atol=1e-5 * exact.abs().max())


def test_cache_differences_report_mismatches(tmp_path: Path) -> None:
    url = _store(tmp_path)
    projection = KroneckerProjection(SHAPES, k=4, seed=1).describe()
    config = {"method": "source", "segments": [(0, 10), (10, 20)], "projection_dim": 4}
    assert cache_differences(open_cache(url, None, "default"), config, projection) == [
        "no cache is stored"
    ]
    group = create_cache(url, None, "default", cache_info(config, projection))
    assert "never committed" in cache_differences(group, config, projection)[0]
    commit_cache(group)
    reopened = open_cache(url, None, "default")
    assert cache_differences(reopened, config, projection) == []
    assert cache_differences(reopened, {**config, "method": "fast-source"}, projection) == [
        "method: stored 'source', wanted 'fast-source'"
    ]
    other = KroneckerProjection(SHAPES, k=4, seed=2).describe()
    assert cache_differences(reopened, config, other)[0].startswith("projection:")
    assert stored_projection(reopened) == projection


def test_cache_lives_beside_the_analysis_and_leaves_it_intact(tmp_path: Path) -> None:
    url = _store(tmp_path)
    scores = [np.arange(6.0).reshape(2, 3)]
    write_analysis(url, None, "default", scores, np.zeros((2, 1)), np.zeros(2), {"config": {}})
    group = create_cache(url, None, "default", cache_info({"a": 1}, {}))
    create_gradients(group, 0, rows=3, width=2)
    commit_cache(group)
    # A new cache is written beside the committed one, which stays readable until it commits.
    group = create_cache(url, None, "default", cache_info({"a": 2}, {}))
    assert list(group[schema.CACHE_GRADIENTS].array_keys()) == []
    old = open_cache(url, None, "default")
    assert old.attrs[schema.ATTR_CACHE]["config"] == {"a": 1}
    assert list(old[schema.CACHE_GRADIENTS].array_keys()) == [schema.segment_key(0)]
    commit_cache(group)
    assert open_cache(url, None, "default").attrs[schema.ATTR_CACHE]["config"] == {"a": 2}
    assert old.path not in zarr.open_group(url, mode="r")  # the superseded version is deleted
    run = open_run(url)
    assert run.analyses == ["default"]
    _, arrays, others = run.analysis("default")
    np.testing.assert_array_equal(arrays[0][...], scores[0])
    assert set(others) == {schema.ANALYSIS_EFFECTS, schema.ANALYSIS_LAST_EXACT}
    assert group.path.startswith(f"{schema.ANALYSES}/default/{schema.CACHE_VERSION}-")
