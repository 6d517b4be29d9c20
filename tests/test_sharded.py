"""Sharded runs: FSDP2 (``fully_shard``) recorded shard by shard; FSDP1 and DeepSpeed refused.

The two-process runs use Lightning's ModelParallelStrategy with ``fully_shard`` on CPU (gloo),
in ``tests/scripts/train_ddp.py`` (``sharded``) and ``tests/scripts/train_sharded.py``, since
Lightning's launcher re-executes the script per rank. Each rank writes its own rows of every
parameter and optimizer state; the record must read back as the unsharded run's.
"""

from __future__ import annotations

import json
import shutil
import tracemalloc

import numpy as np
import pytest
import torch
import torch.distributed as dist
import zarr
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from models import TinyClassifier, loader, make_dataset, trainer
from processes import SCRIPTS, load_script
from storeutil import assert_same_record
from test_ddp import TRAIN_DDP, WORLD_SIZE, run_script, single_process_reference
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from source_callback import SourceCallback, analyze, open_run
from source_callback.errors import DamagedStoreError, SourceCallbackError
from source_callback.lightning import check_sharding
from source_callback.record.recorder import Recorder
from source_callback.store import schema
from source_callback.store.shards import ShardGroup, shard_rows
from source_callback.store.writer import StoreWriter

TRAIN_SHARDED = SCRIPTS / "train_sharded.py"


def test_shard_rows_split_as_torch_chunk_does() -> None:
    for rows in range(10):
        for world in range(1, 5):
            chunks = torch.arange(rows).chunk(world) if rows else ()
            expected = [(int(c[0]), int(c[-1]) + 1) for c in chunks]
            got = [shard_rows(rows, world, r) for r in range(world)]
            assert [(a, b) for a, b in got if b > a] == expected, (rows, world)
            assert got[0][0] == 0 and got[-1][1] == rows


def test_fsdp2_on_two_processes_records_what_one_process_does(tmp_path) -> None:
    store = tmp_path / "sharded.zarr"
    code, output = run_script([str(TRAIN_DDP), str(store), str(WORLD_SIZE), "sharded"])
    assert code == 0, output
    assert "DONE rank=0" in output and "DONE rank=1" in output, output

    # The same optimizer steps on one process, unsharded (see train_ddp.py's docstring).
    script = load_script(TRAIN_DDP)
    reference = tmp_path / "single.zarr"
    run, single = open_run(store), single_process_reference(tmp_path)
    assert run.status == single.status == "complete"
    assert run.verify() == []
    for got, want in zip(run.stages, single.stages, strict=True):
        assert (got.name, got.first_step, got.last_step) == (
            want.name,
            want.first_step,
            want.last_step,
        )
        assert got.planned_checkpoints == want.planned_checkpoints
        assert got.optimizer == want.optimizer and got.manifest == want.manifest
        assert (got.world_size, want.world_size) == (WORLD_SIZE, 1)
    got_steps, want_steps = run.steps(), single.steps()
    names = ("stage", "epoch", "examples", "lr", "momentum", "beta2", "weight_decay", "scale")
    for name in names:
        np.testing.assert_allclose(got_steps[name], want_steps[name], rtol=1e-6, err_msg=name)
    # Clipped by the norm of all the shards' gradients together, as on one process.
    assert 0 < (got_steps["scale"] < 1).sum() < 11

    assert [c.key for c in run.checkpoints] == [c.key for c in single.checkpoints]
    for got, want in zip(run.checkpoints, single.checkpoints, strict=True):
        # Every rank wrote its own rows: the index lists pieces of both.
        index = got._group.attrs[schema.ATTR_SHARDED]
        pieces = [p for rows in index["tensors"].values() for *_, ps in rows for p in ps]
        assert index["ranks"] == WORLD_SIZE and {p[0] for p in pieces} == {0, 1}
        # Around the pieces, the regions' padding is written as zeros.
        padding = {key: np.ones(length, bool) for key, length in index["arrays"].items()}
        for section, rows in index["tensors"].items():
            for _, dtype, _, pieces in rows:
                for _, offset, _, count, _ in pieces:
                    padding[schema.packed_array_key(section, dtype)][offset : offset + count] = 0
        assert any(outside.any() for outside in padding.values())
        for key, outside in padding.items():
            assert not got._group[key][:][outside].any(), key
        got_params, want_params = got.params(), want.params()
        assert got_params.keys() == want_params.keys()
        for name, value in want_params.items():
            assert got_params[name].shape == value.shape
            torch.testing.assert_close(got_params[name], value, rtol=1e-5, atol=1e-6)
        got_state, want_state = got.optimizer_state(), want.optimizer_state()
        assert {k: set(v) for k, v in got_state.items()} == {
            k: set(v) for k, v in want_state.items()
        }
        for name, values in want_state.items():
            for key, value in values.items():
                torch.testing.assert_close(got_state[name][key], value, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got.probe()[1], want.probe()[1], rtol=1e-5)

    # The analysis reads the sharded record as the unsharded one: the same scores.
    train = {
        "pretrain": make_dataset(script.PRETRAIN["n"], seed=script.PRETRAIN["seed"]),
        "finetune": make_dataset(script.FINETUNE["n"], seed=script.FINETUNE["seed"]),
    }
    scores = [
        analyze(
            path,
            model=TinyClassifier(),
            task="classification",
            train=train,
            queries=make_dataset(5, seed=7),
            segments=1,
            name=None,
            verbose=False,
        ).scores
        for path in (store, reference)
    ]
    for name in train:
        got, want = np.asarray(scores[0][name]), np.asarray(scores[1][name])
        assert got.shape == (5, len(train[name]))
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())

    # A byte flipped in rank 1's region is found and named, never read as valid.
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(store, damaged)
    key = run.checkpoints[1].key
    index = open_run(damaged).checkpoints[1]._group.attrs[schema.ATTR_SHARDED]
    name, dtype, _, pieces = index["tensors"]["params"][0]
    offset = next(p[1] for p in pieces if p[0] == 1)
    array = damaged / "checkpoints" / key / f"params.{dtype}"
    (length,) = zarr.open_array(array, mode="r").chunks
    chunk = array / "c" / str(offset // length)
    data = bytearray(chunk.read_bytes())
    data[(offset % length) * 4] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(DamagedStoreError, match=rf"{name} \(rank 1's rows\)"):
        open_run(damaged).checkpoints[1].params()


def test_fsdp2_records_into_s3(tmp_path, s3, monkeypatch) -> None:
    """Every rank writes its shards through fsspec (moto's S3 server), rank 0 the metadata."""
    prefix, options = s3
    url = f"{prefix}/sharded.zarr"
    script = load_script(TRAIN_DDP)
    monkeypatch.setenv(script.STORAGE_OPTIONS, json.dumps(options))
    code, output = run_script([str(TRAIN_DDP), url, str(WORLD_SIZE), "sharded"])
    assert code == 0 and "DONE rank=1" in output, output

    run, single = open_run(url, options), single_process_reference(tmp_path)
    assert run.status == "complete" and run.verify() == []
    assert [c.key for c in run.checkpoints] == [c.key for c in single.checkpoints]
    last, want = run.checkpoints[-1], single.checkpoints[-1]
    pieces = [
        p
        for rows in last._group.attrs[schema.ATTR_SHARDED]["tensors"].values()
        for *_, ps in rows
        for p in ps
    ]
    assert {p[0] for p in pieces} == {0, 1}
    for name, value in want.params().items():
        torch.testing.assert_close(last.params()[name], value, rtol=1e-5, atol=1e-6)
    for name, values in want.optimizer_state().items():
        for key, value in values.items():
            got = last.optimizer_state()[name][key]
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-7)


def test_rank_killed_while_writing_its_shards_leaves_the_committed_record_intact(
    tmp_path,
) -> None:
    store = tmp_path / "killed.zarr"
    code, output = run_script([str(TRAIN_SHARDED), str(store), str(WORLD_SIZE), "kill"])

    assert code != 0 and "DONE" not in output, output  # it failed, and no rank hung
    run = open_run(store)
    script = load_script(TRAIN_SHARDED)
    killed = schema.checkpoint_key(script.KILL_STEP, schema.ROLE_INTERIOR)
    committed = {c.key: c.committed for c in run.checkpoints}
    assert committed.pop(killed) is False  # rank 0 wrote its part, but nothing committed it
    assert committed and all(committed.values())
    assert run.verify() == []
    assert run.num_steps >= script.KILL_STEP  # rank 0 may take a step before it notices
    for checkpoint in run.checkpoints:
        if checkpoint.committed:
            assert checkpoint.params()  # reads back, verified


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_sharded_run_resumed_after_a_crash_equals_the_uninterrupted_run(tmp_path) -> None:
    def run(folder: str, *args: str) -> tuple[int, str]:
        store = tmp_path / folder / "run.zarr"
        return run_script([str(TRAIN_SHARDED), str(store), str(WORLD_SIZE), *args])

    code, output = run("reference", "record")
    assert code == 0, output
    code, output = run("crashed", "crash")
    assert code == 3 and "CRASHED rank=0" in output and "CRASHED rank=1" in output, output
    crashed = open_run(tmp_path / "crashed" / "run.zarr")
    assert crashed.status == "recording" and crashed.num_steps == 9

    code, output = run(
        "crashed", "resume", str(tmp_path / "crashed" / "ckpt" / "epoch=1-step=8.ckpt")
    )
    assert code == 0 and "DONE rank=1" in output, output
    resumed, reference = (
        open_run(tmp_path / "crashed" / "run.zarr"),
        open_run(tmp_path / "reference" / "run.zarr"),
    )
    assert resumed.status == "complete" and resumed.verify() == []
    assert_same_record(resumed, reference)


class _HandSharded(TinyClassifier):
    """FSDP2 applied by hand under the default single-device strategy."""

    def configure_model(self) -> None:
        fully_shard(self.net, mesh=init_device_mesh("cpu", (1,)))


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fully_shard_by_hand_is_recorded_as_the_plain_model_is(tmp_path, one_process_group) -> None:
    """One process: the sharded layout with one rank, frozen parameters included."""

    def record(store, model_class: type[TinyClassifier]) -> None:
        torch.manual_seed(0)
        model = model_class(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), freeze_first=True)
        trainer([SourceCallback(store, checkpoints_per_stage=2)], tmp_path, max_epochs=1).fit(
            model, loader(make_dataset(32))
        )

    record(tmp_path / "sharded.zarr", _HandSharded)
    record(tmp_path / "plain.zarr", TinyClassifier)
    sharded, plain = open_run(tmp_path / "sharded.zarr"), open_run(tmp_path / "plain.zarr")
    assert all(schema.ATTR_SHARDED in c._group.attrs for c in sharded.checkpoints)
    assert_same_record(sharded, plain)
    assert schema.ATTR_SHARDED in sharded._root[schema.FROZEN][schema.frozen_key(0)].attrs
    frozen, expected = sharded.frozen_params(0), plain.frozen_params(0)
    assert sorted(frozen) == sorted(expected) == ["net.0.bias", "net.0.weight"]
    for name, value in expected.items():
        torch.testing.assert_close(frozen[name], value)


def test_shards_are_written_from_the_snapshot_without_copies(tmp_path, one_process_group) -> None:
    """A 36 MB region (over one 32 MiB chunk) is cut into two equal chunks, written from the
    snapshot's buffers: no chunk is copied (numpy's allocations, traced, stay under 1 MiB)."""
    mesh = init_device_mesh("cpu", (1,))
    weight = distribute_tensor(torch.zeros(3000, 3000), mesh, [Shard(0)])
    url = str(tmp_path / "run.zarr")
    recorder = Recorder(StoreWriter.open(url, shard_group=ShardGroup.create()), max_snapshots=1)
    for step in range(2):
        weight.to_local().fill_(step + 1)
        tracemalloc.start()
        recorder.checkpoint(step, schema.ROLE_INTERIOR, {"w": weight}, {}, {})
        recorder.wait()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 2**20, peak
    recorder.close()
    run = open_run(url)
    for step, checkpoint in enumerate(run.checkpoints):
        array = checkpoint._group["params.float32"]
        assert (array.shape, array.chunks) == ((9_000_000,), (4_500_000,))
        values = checkpoint.params(include_frozen=False)["w"]
        assert torch.equal(values, torch.full((3000, 3000), step + 1.0))


@pytest.mark.parametrize("kind", [FSDPStrategy, DeepSpeedStrategy])
def test_fsdp1_and_deepspeed_strategies_are_refused(kind: type[Strategy]) -> None:
    # Neither can be constructed on this machine (FSDP refuses the CPU, DeepSpeed is not
    # installed): the refusal looks at the strategy's class only.
    strategy = kind.__new__(kind)
    with pytest.raises(SourceCallbackError, match=f"the trainer's strategy is {kind.__name__}"):
        check_sharding(strategy, TinyClassifier())


def test_model_parallel_strategy_without_sharded_parameters_is_refused() -> None:
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    with pytest.raises(SourceCallbackError, match="ModelParallelStrategy and no parameter"):
        check_sharding(strategy, TinyClassifier())


def test_dtensor_laid_out_other_than_by_fully_shard_is_refused(one_process_group) -> None:
    model = TinyClassifier()
    mesh = init_device_mesh("cpu", (1,))
    replicated = distribute_tensor(model.net[0].weight.detach(), mesh, [Replicate()])
    model.net[0].weight = torch.nn.Parameter(replicated)
    with pytest.raises(SourceCallbackError, match=r"'net.0.weight' is a DTensor with placements"):
        check_sharding(SingleDeviceStrategy(torch.device("cpu")), model)


def test_plain_parameters_are_not_sharded() -> None:
    assert check_sharding(DDPStrategy(), TinyClassifier()) is False
    assert check_sharding(SingleDeviceStrategy(torch.device("cpu")), TinyClassifier()) is False


def test_trainer_with_fully_shard_by_hand_is_refused(tmp_path, one_process_group) -> None:
    """The Hugging Face adapter does not record sharded runs yet: it refuses before the store."""
    pytest.importorskip("transformers")
    from hf_models import LabelledSequences, seeded_llama, trainer_arguments
    from transformers import Trainer

    from source_callback import SourceTrainerCallback

    model = seeded_llama()
    for layer in model.model.layers:
        fully_shard(layer, mesh=init_device_mesh("cpu", (1,)))
    store = tmp_path / "run.zarr"
    fit = Trainer(
        model=model,
        args=trainer_arguments(tmp_path / "out"),
        train_dataset=LabelledSequences(16, seed=0),
        callbacks=[SourceTrainerCallback(store)],
    )
    with pytest.raises(SourceCallbackError, match="is a sharded DTensor") as info:
        fit.train()
    assert "'model.layers.0." in str(info.value)
    assert not store.exists() and not list(tmp_path.rglob("*.zarr"))
