"""Recording to fsspec URLs (S3 on a local moto server, ``memory://``, ``file://``) gives the
same record as recording to a local path."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import zarr
from models import TinyClassifier, loader, make_dataset, trainer

from source_callback import Run, SourceCallback, open_run
from source_callback.store import schema
from source_callback.store.reader import read_tensors
from source_callback.store.writer import StoreWriter, snapshot_checkpoint, write_tensors

STAGES = ("pretrain", "finetune")


def _sgd_momentum(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def record_two_stages(
    store: str | Path, root: Path, storage_options: dict[str, Any] | None = None
) -> None:
    """A deterministic two-stage run: SGD with momentum on one dataset, then AdamW on another."""
    pl.seed_everything(1234, verbose=False)
    model = TinyClassifier(optimizer=_sgd_momentum)
    callback = SourceCallback(
        store, stage=STAGES[0], checkpoints_per_stage=2, storage_options=storage_options
    )
    trainer([callback], root, max_epochs=2).fit(model, loader(make_dataset(48, seed=0)))
    callback.next_stage(STAGES[1])
    model.optimizer_factory = _adamw
    trainer([callback], root, max_epochs=1).fit(model, loader(make_dataset(40, seed=1)))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The reference: the two-stage run recorded to a local path."""
    root = tmp_path_factory.mktemp("local")
    record_two_stages(root / "run.zarr", root)
    return open_run(root / "run.zarr")


def assert_same_run(run: Run, expected: Run) -> None:
    """Every recorded value of ``run`` equals ``expected``'s (the URL aside)."""
    assert run.status == expected.status == "complete"
    assert run.format_version == expected.format_version
    assert run.manifest == expected.manifest
    assert run.library_versions == expected.library_versions
    assert [s.name for s in run.stages] == list(STAGES)
    assert len(run.stages) == len(expected.stages)
    for got, want in zip(run.stages, expected.stages, strict=True):
        assert dataclasses.asdict(got) == dataclasses.asdict(want)
    assert run.num_steps == expected.num_steps > 0
    got_steps, want_steps = run.steps(), expected.steps()
    assert got_steps.keys() == want_steps.keys()
    for name, values in want_steps.items():
        np.testing.assert_array_equal(got_steps[name], values, err_msg=name)
    np.testing.assert_array_equal(run.learning_rates(), expected.learning_rates())
    assert [(c.key, c.step, c.stage, c.role, c.committed) for c in run.checkpoints] == [
        (c.key, c.step, c.stage, c.role, c.committed) for c in expected.checkpoints
    ]
    for got, want in zip(run.checkpoints, expected.checkpoints, strict=True):
        _assert_tensors_equal(got.params(), want.params(), got.key)
        _assert_tensors_equal(got.buffers(), want.buffers(), got.key)
        got_state, want_state = got.optimizer_state(), want.optimizer_state()
        assert got_state.keys() == want_state.keys(), got.key
        for name in want_state:
            _assert_tensors_equal(got_state[name], want_state[name], f"{got.key}/{name}")
        assert got.nbytes() == want.nbytes()


def _assert_tensors_equal(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str
) -> None:
    assert got.keys() == want.keys(), where
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, f"{where}/{name}"
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=f"{where}/{name}")


def test_reference_run_is_meaningful(local_run: Run) -> None:
    """Guard: the comparison below covers both optimizers, optimizer state and checkpoints."""
    first, second = local_run.stages
    assert first.optimizer.update_rule == "sgd-momentum"
    assert second.optimizer.update_rule == "adamw"
    assert first.num_steps == 12 and second.num_steps == 5
    roles = {c.role for c in local_run.checkpoints}
    assert roles == {"stage-start", "interior", "stage-end"}
    end_of_finetune = local_run.checkpoints[-1]
    assert set(end_of_finetune.optimizer_state()["net.0.weight"]) == {"exp_avg_sq", "step"}


def test_s3_record_matches_local(
    s3: tuple[str, dict[str, Any]], local_run: Run, tmp_path: Path
) -> None:
    prefix, storage_options = s3
    url = f"{prefix}/run.zarr"
    record_two_stages(url, tmp_path, storage_options)
    run = open_run(url, storage_options=storage_options)
    assert run.url == url
    assert_same_run(run, local_run)


def test_s3_missing_store_is_an_error(s3: tuple[str, dict[str, Any]]) -> None:
    from source_callback import StoreError

    prefix, storage_options = s3
    with pytest.raises(StoreError, match="no store"):
        open_run(f"{prefix}/absent.zarr", storage_options=storage_options)


def test_memory_url_record_matches_local(local_run: Run, tmp_path: Path) -> None:
    url = f"memory://{uuid.uuid4().hex}/run.zarr"
    record_two_stages(url, tmp_path)
    run = open_run(url)
    assert run.url == url
    assert_same_run(run, local_run)


def test_file_url_record_matches_local(local_run: Run, tmp_path: Path) -> None:
    url = (tmp_path / "run.zarr").as_uri()
    assert url.startswith("file://")
    record_two_stages(url, tmp_path)
    assert (tmp_path / "run.zarr" / "zarr.json").is_file()
    assert_same_run(open_run(url), local_run)
    assert_same_run(open_run(tmp_path / "run.zarr"), local_run)


def _many_tensors(count: int, seed: int) -> dict[str, torch.Tensor]:
    """``count`` small tensors cycling through dtypes and shapes (0-d and empty included)."""
    generator = torch.Generator().manual_seed(seed)
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool)
    shapes = ((3, 4), (5,), (), (2, 3, 2), (0, 4), (7, 1))
    tensors = {}
    for i in range(count):
        dtype, shape = dtypes[i % len(dtypes)], shapes[(i // len(dtypes)) % len(shapes)]
        values = torch.randn(shape, generator=generator) * 10
        tensors[f"layers.{i}.weight"] = (values > 0) if dtype == torch.bool else values.to(dtype)
    return tensors


def test_s3_checkpoint_of_many_tensors_reads_back_identically(
    s3: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """60 tensors (and Adam-like state) are read concurrently from S3, equal to a local copy."""
    prefix, storage_options = s3
    params = _many_tensors(60, seed=0)
    buffers = {"bn.running_mean": torch.randn(4), "bn.num_batches_tracked": torch.tensor(7)}
    float_names = [n for n, t in params.items() if t.is_floating_point()][:4]
    optimizer_state = {
        "exp_avg": {n: torch.randn_like(params[n], dtype=torch.float32) for n in float_names},
        "exp_avg_sq": {n: torch.rand_like(params[n], dtype=torch.float32) for n in float_names},
        "step": {n: torch.tensor(3.0) for n in float_names},
    }
    checkpoints = []
    for url, options in ((f"{prefix}/many.zarr", storage_options), (tmp_path / "many.zarr", None)):
        writer = StoreWriter.open(str(url), options)
        snapshot = snapshot_checkpoint(params, buffers, optimizer_state)
        writer.write_checkpoint(0, schema.ROLE_START, 0, snapshot)
        (checkpoint,) = open_run(url, storage_options=options).checkpoints
        checkpoints.append(checkpoint)
    remote, local = checkpoints
    _assert_tensors_equal(remote.params(), local.params(), "params")
    _assert_tensors_equal(remote.params(), params, "params")
    assert list(remote.params()) == sorted(params)
    _assert_tensors_equal(remote.buffers(), buffers, "buffers")
    remote_state, local_state = remote.optimizer_state(), local.optimizer_state()
    assert remote_state.keys() == local_state.keys() == set(float_names)
    for name in float_names:
        _assert_tensors_equal(remote_state[name], local_state[name], name)
        expected = {key: values[name] for key, values in optimizer_state.items()}
        _assert_tensors_equal(remote_state[name], expected, name)
    with zarr.config.set({"async.concurrency": 1}):
        _assert_tensors_equal(remote.params(), params, "params, one read at a time")


def test_s3_checkpoint_write_takes_a_few_requests_whatever_its_tensor_count(
    s3: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group, each packed array's metadata and chunk, the commit: 12 or 60 tensors alike.

    Counted at the store (each call one S3 request, a deletion a listing and its deletes).
    Zarr's own ``create_group``/``create_array`` look for existing nodes and read every parent
    first: 67 requests for this checkpoint before.
    """
    prefix, storage_options = s3
    calls: list[str] = []
    for method in ("get", "set", "exists", "delete", "delete_dir", "list_dir", "list_prefix"):
        original = getattr(zarr.storage.FsspecStore, method)

        def counted(*args: Any, _original: Any = original, _name: str = method, **kw: Any) -> Any:
            calls.append(_name)
            return _original(*args, **kw)

        monkeypatch.setattr(zarr.storage.FsspecStore, method, counted)
    counts = []
    for count in (12, 60):
        writer = StoreWriter.open(f"{prefix}/{count}.zarr", storage_options)
        params = _many_tensors(count, seed=count)
        state = {"exp_avg_sq": {n: p.float() for n, p in params.items() if p.is_floating_point()}}
        snapshot = snapshot_checkpoint(params, {}, state)
        calls.clear()
        writer.write_checkpoint(0, schema.ROLE_START, 0, snapshot)
        counts.append(sorted(calls))
        (checkpoint,) = open_run(
            f"{prefix}/{count}.zarr", storage_options=storage_options
        ).checkpoints
        _assert_tensors_equal(checkpoint.params(), params, "params")
    arrays = 7  # packed: the parameters' 6 dtypes and the float32 state, one chunk each
    assert counts[0] == counts[1] == sorted(["delete_dir"] + ["set"] * (1 + 2 * arrays + 1))


def test_s3_read_tensors_equals_one_read_per_array(s3: tuple[str, dict[str, Any]]) -> None:
    """Concurrent reads equal the arrays read one by one, multi-chunk arrays included."""
    prefix, storage_options = s3
    root = zarr.open_group(f"{prefix}/group.zarr", mode="w", storage_options=storage_options)
    group = root.create_group("tensors")
    write_tensors(group, _many_tensors(12, seed=1))
    chunked = torch.randn(10, 6).to(torch.bfloat16)
    encoded = schema.encode_tensor(chunked)
    group.create_array(
        "chunked",
        data=encoded.array,
        chunks=(3, 4),
        attributes={schema.ATTR_TORCH_DTYPE: encoded.torch_dtype},
    )
    reopened = zarr.open_group(f"{prefix}/group.zarr", mode="r", storage_options=storage_options)[
        "tensors"
    ]
    assert isinstance(reopened, zarr.Group)
    one_by_one = {
        name: schema.decode_array(array[...], array.attrs[schema.ATTR_TORCH_DTYPE])
        for name, array in sorted(reopened.arrays())
    }
    assert len(one_by_one) == 13
    concurrent = read_tensors(reopened)
    assert list(concurrent) == list(one_by_one)
    _assert_tensors_equal(concurrent, one_by_one, "tensors")
    torch.testing.assert_close(concurrent["chunked"], chunked, rtol=0, atol=0)
