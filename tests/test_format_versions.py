"""Format versions: a store of format 1 (``tests/fixtures/v1_store.zarr``) reads back exactly as
with the library that wrote it and analyzes as it did (the expected analysis re-made only where
the analysis's own results changed on purpose: ``make_v1_store.py --analysis-only``), and one of
the first format-2 writer (``tests/fixtures/v2_sha256_store.zarr``) reads back as written; new
stores are format 2; format 1 is not written to."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from processes import load_script
from storeutil import tree_digest

from source_callback import DamagedStoreError, FormatVersionError, open_run
from source_callback.store import integrity, schema
from source_callback.store.writer import StoreWriter

FIXTURES = Path(__file__).parent / "fixtures"
v1 = load_script(FIXTURES / "make_v1_store.py")
EXPECTED = json.loads(v1.EXPECTED.read_text())
first_v2 = load_script(FIXTURES / "make_v2_sha256_store.py")


def test_format_1_store_reads_back_what_format_1_returned() -> None:
    run = open_run(v1.STORE)
    assert run.format_version == 1 < schema.FORMAT_VERSION == 2
    got = v1.contents(v1.STORE)
    for key in ("format_version", "num_steps", "stages", "steps"):
        assert got[key] == EXPECTED[key], key
    assert list(got["checkpoints"]) == list(EXPECTED["checkpoints"])
    for key, want in EXPECTED["checkpoints"].items():
        assert got["checkpoints"][key] == want, key
    # The fixture covers what format 1 held: a frozen group, buffers, Adam and SGD state.
    last = run.checkpoints[-1]
    assert run.stages[1].frozen == ["net.0.weight", "net.0.bias"]
    assert set(run.frozen_params(1)) == {"net.0.weight", "net.0.bias"}
    assert set(last.buffers()) == {"scale", "seen"}
    assert set(last.optimizer_state()["net.2.weight"]) == {"exp_avg_sq", "step"}
    assert "momentum_buffer" in run.checkpoints[2].optimizer_state()["net.0.weight"]


@pytest.mark.parametrize("keep", [5, -4], ids=["within-the-header", "header-intact"])
def test_format_1_store_verifies_by_reading(tmp_path: Path, keep: int) -> None:
    """A truncated blosc chunk fails its read, also with its header intact: c-blosc trusts the
    header's sizes, so that chunk used to read past its end (values changing between reads)."""
    assert open_run(v1.STORE).verify() == []
    copy = tmp_path / "v1.zarr"
    shutil.copytree(v1.STORE, copy)
    params = copy / "checkpoints" / "0000000002_interior" / "params"
    chunk = next(p for p in sorted(params.rglob("c/*")) if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:keep])
    [problem] = open_run(copy).verify()
    assert problem.where == "checkpoint 0000000002_interior"
    assert "cannot be read" in problem.reason
    [damaged] = [c for c in open_run(copy).checkpoints if c.key == "0000000002_interior"]
    with pytest.raises(DamagedStoreError, match="0000000002_interior"):
        damaged.params()


def test_analyze_on_a_format_1_store_gives_the_format_1_result() -> None:
    # format 1 recorded no probe: the functional check is skipped, and said so
    with pytest.warns(UserWarning, match=r"no probe was recorded for stage 'pretrain' at step 0"):
        got = v1.analysis(v1.STORE)
    want = EXPECTED["analysis"]

    def assert_close(got: Any, want: Any) -> None:
        # float32 products since the expected values were written: to 1e-6 of the largest value
        # (a score near zero may differ by more than 1e-6 of itself)
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * scale)

    for name in v1.STAGES:
        assert_close(got["scores"][name], want["scores"][name])
    assert_close(got["stage_effects"], want["stage_effects"])


def test_new_stores_are_format_2_and_format_1_is_not_written(tmp_path: Path) -> None:
    v1.record(tmp_path / "new.zarr")
    assert open_run(tmp_path / "new.zarr").format_version == 2
    copy = tmp_path / "v1.zarr"
    shutil.copytree(v1.STORE, copy)
    before = tree_digest(copy)
    with pytest.raises(FormatVersionError, match="reads but does not write"):
        StoreWriter.open(str(copy))
    assert tree_digest(copy) == before


def test_first_format_2_store_reads_back_and_its_damage_is_found(tmp_path: Path) -> None:
    """SHA-256 digests and LZ4 + CRC-32C chunks, as the first format-2 writer stored them."""
    assert v1.contents(first_v2.STORE) == json.loads(first_v2.EXPECTED.read_text())
    assert open_run(first_v2.STORE).verify() == []
    copy = tmp_path / "v2.zarr"
    shutil.copytree(first_v2.STORE, copy)
    first, second, third, *_ = sorted((copy / schema.CHECKPOINTS).iterdir())
    chunk = Path(schema.packed_array_key(schema.SECTION_PARAMS, "float32")) / "c" / "0"
    shutil.copy(first / chunk, second / chunk)  # decodes, but fails the SHA-256 digests
    data = bytearray((third / chunk).read_bytes())
    data[len(data) // 2] ^= 0x10  # fails the chunk's CRC-32C
    (third / chunk).write_bytes(bytes(data))
    problems = open_run(copy).verify()
    assert {(p.where, p.reason) for p in problems} == {
        (f"checkpoint {second.name}", integrity.MISMATCH),
        (f"checkpoint {third.name}", integrity.UNREADABLE),
    }
