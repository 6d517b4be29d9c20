"""Damaged stores are refused, never read as zeros: chunks of committed checkpoints and step rows
deleted, truncated, altered or swapped, on a local disk and on S3 (moto); a write that fails
mid-checkpoint leaves it uncommitted and everything committed before it intact."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import zarr
from models import TinyClassifier, loader, make_dataset, trainer
from processes import load_script

from source_callback import DamagedStoreError, SourceCallback, StoreError, open_run
from source_callback.cli import EXIT_DAMAGED, main
from source_callback.store import integrity, schema
from source_callback.store.writer import (
    StepRow,
    StoreWriter,
    snapshot_checkpoint,
    snapshot_frozen,
)

v1 = load_script(Path(__file__).parent / "fixtures" / "make_v1_store.py")

KEYS = ("0000000000_stage-start", "0000000003_interior")


def _params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "a.bias": torch.randn(4, generator=g),
        "b.weight": torch.randn(2, 4, generator=g).to(torch.bfloat16),
    }


def write_store(url: str, options: dict[str, Any] | None) -> None:
    """Two committed checkpoints (parameters, a buffer, Adam state), frozen ones and 7 steps."""
    writer = StoreWriter.open(url, options)
    writer.write_frozen(0, snapshot_frozen({"frozen.weight": torch.arange(6.0).reshape(2, 3)}))
    for seed, key in enumerate(KEYS):
        step, role = schema.parse_checkpoint_key(key)
        params = _params(seed)
        state = {
            "exp_avg_sq": {n: p.float().square() + 1 for n, p in params.items()},
            "step": {n: torch.tensor(float(step)) for n in params},
        }
        buffers = {"count": torch.tensor(step)}
        writer.write_checkpoint(step, role, 0, snapshot_checkpoint(params, buffers, state))
    rows = [row(0, 1.0 / (t + 1), 0.1 * (t + 1)) for t in range(7)]
    writer.append_steps(rows[:4])
    writer.append_steps(rows[4:])


def row(stage: int, loss: float, *lrs: float) -> StepRow:
    """A step row with learning rates ``lrs`` (one per parameter group), other fields NaN."""
    groups = [{**dict.fromkeys(schema.STEP_GROUP_FIELDS, np.nan), "lr": lr} for lr in lrs]
    return StepRow(stage, 0, loss, 8, groups)


def delete(data: bytes) -> bytes | None:
    return None


def truncate(data: bytes) -> bytes | None:
    return data[: len(data) - 7]


def flip(data: bytes) -> bytes | None:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1 :]


DAMAGES: dict[str, Callable[[bytes], bytes | None]] = {
    "deleted": delete,
    "truncated": truncate,
    "flipped": flip,
}
# (chunk, what fails to read, the tensors the chunk holds, the one holding its middle byte)
PARTS = {
    "params": (
        f"checkpoints/{KEYS[1]}/params.float32/c/0",
        "params",
        ("a.bias", "a.weight"),  # 4 + 12 floats: byte 32 is a.weight's
        ("a.weight",),
    ),
    "optimizer": (
        f"checkpoints/{KEYS[1]}/optimizer.exp_avg_sq.float32/c/0",
        "optimizer_state",
        tuple(f"optimizer.exp_avg_sq/{n}" for n in ("a.bias", "a.weight", "b.weight")),
        ("optimizer.exp_avg_sq/a.weight",),  # 4 + 12 + 8 floats: byte 48 is a.weight's
    ),
    "steps": ("steps/lr/c/0/0", "steps", ("lr",), ("lr",)),
}


def expected_problem(part: str, how: str) -> tuple[tuple[str, ...], str]:
    """The tensors named and the reason given for one damaged chunk.

    A step chunk carries a CRC-32C: altered or truncated, it cannot be decoded. A checkpoint
    chunk is stored as it is: a missing, truncated or altered one is found by the digests of
    the tensors it holds, and a flipped byte changes only the tensor it belongs to.
    """
    _, _, names, flipped = PARTS[part]
    if how == "deleted":
        return names, integrity.MISMATCH
    if part == "steps" or how == "truncated":
        return names, integrity.UNREADABLE
    return flipped, integrity.MISMATCH


def damage(url: str, options: dict[str, Any] | None, chunk: str, how: str) -> None:
    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    path = f"{root}/{chunk}"
    changed = DAMAGES[how](fs.cat_file(path))
    if changed is None:
        fs.rm(path)
    else:
        fs.pipe_file(path, changed)


def read(url: str, options: dict[str, Any] | None, what: str) -> Any:
    run = open_run(url, storage_options=options)
    return run.steps() if what == "steps" else getattr(run.checkpoints[1], what)()


def check_damage(url: str, options: dict[str, Any] | None, part: str, how: str) -> None:
    """Damage one chunk: reading it raises, naming it; everything else reads as written."""
    chunk, what, *_ = PARTS[part]
    names, reason = expected_problem(part, how)
    intact = open_run(url, storage_options=options)
    before = {
        "params": [c.params() for c in intact.checkpoints],
        "optimizer_state": [c.optimizer_state() for c in intact.checkpoints],
        "steps": intact.steps(),
    }
    damage(url, options, chunk, how)
    with pytest.raises(DamagedStoreError) as raised:
        read(url, options, what)
    where = "steps" if part == "steps" else f"checkpoint {KEYS[1]}"
    [problem] = raised.value.problems
    assert (problem.where, problem.names) == (where, names)
    if part == "steps":  # the chunk file to copy again (checkpoints': test below)
        assert problem.files == (chunk,)
    assert problem.reason.endswith(reason)
    assert where in str(raised.value) and names[0] in str(raised.value)

    run = open_run(url, storage_options=options)
    assert [str(p) for p in run.verify()] == [str(problem)]
    # Nothing else is lost: the other parts, and every part of the other checkpoint.
    for other in ("params", "optimizer_state", "steps"):
        if other == what:
            continue
        got = run.steps() if other == "steps" else run.checkpoints[1].__getattribute__(other)()
        want = before[other] if other == "steps" else before[other][1]
        _assert_equal(got, want)
    _assert_equal(run.checkpoints[0].params(), before["params"][0])
    _assert_equal(run.checkpoints[0].optimizer_state(), before["optimizer_state"][0])


def _assert_equal(got: Any, want: Any) -> None:
    assert type(got) is type(want)
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            _assert_equal(got[key], want[key])
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("part", PARTS)
def test_damaged_chunk_on_disk_is_refused(tmp_path: Path, part: str, how: str) -> None:
    url = str(tmp_path / "run.zarr")
    write_store(url, None)
    check_damage(url, None, part, how)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store of :func:`write_store`, written once, to be copied to S3 by each test."""
    store = tmp_path_factory.mktemp("integrity") / "run.zarr"
    write_store(str(store), None)
    return store


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("part", ["params", "steps"])
def test_damaged_chunk_on_s3_is_refused(
    s3: tuple[str, dict[str, Any]], written: Path, part: str, how: str
) -> None:
    """On S3 a missing object and a short one are read through s3fs, not the file system.

    The store is uploaded rather than written there (the S3 writer is tested in
    test_remote.py). A checkpoint's chunk and a step chunk (two codecs); the optimizer state's
    packed arrays are read as the parameters' are.
    """
    prefix, options = s3
    url = f"{prefix}/run.zarr"
    fs, root = fsspec.core.url_to_fs(url, **options)
    fs.put(str(written), root, recursive=True)
    check_damage(url, options, part, how)


def test_chunk_of_another_checkpoint_is_refused(tmp_path: Path) -> None:
    """A chunk copied from another checkpoint reads, but fails the digests of its tensors."""
    store = tmp_path / "run.zarr"
    write_store(str(store), None)
    chunk = "params.float32/c/0"
    shutil.copy(store / "checkpoints" / KEYS[0] / chunk, store / "checkpoints" / KEYS[1] / chunk)
    with pytest.raises(DamagedStoreError, match=f"checkpoint {KEYS[1]}") as raised:
        open_run(store).checkpoints[1].params()
    assert raised.value.problems[0].reason == integrity.MISMATCH


def test_missing_packed_array_and_frozen_chunk(tmp_path: Path) -> None:
    store = tmp_path / "run.zarr"
    write_store(str(store), None)
    shutil.rmtree(store / "checkpoints" / KEYS[1] / "buffers.int64")
    (store / "frozen" / "0000" / "params.float32" / "c" / "0").unlink()
    run = open_run(store)
    with pytest.raises(DamagedStoreError, match=r"packed array buffers\.int64 is missing"):
        run.checkpoints[1].buffers()
    with pytest.raises(DamagedStoreError, match=r"frozen parameters of stage 0.*frozen\.weight"):
        run.checkpoints[0].params()  # the frozen parameters come with every checkpoint's
    assert run.checkpoints[0].params(include_frozen=False).keys() == _params(0).keys()
    assert {(p.where, p.names) for p in run.verify()} == {
        (f"checkpoint {KEYS[1]}", ("buffers/count",)),
        ("frozen parameters of stage 0", ("frozen.weight",)),
    }


def test_damage_names_only_the_tensors_of_the_damaged_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensors span 16-byte chunks of a packed array: a lost chunk names the ones it held, and
    the files to copy again: the chunk that fails to decode, or every chunk of a tensor whose
    digest fails (which of them is wrong is not known)."""
    monkeypatch.setattr(schema, "TENSOR_CHUNK_BYTES", 16)
    store = tmp_path / "run.zarr"
    write_store(str(store), None)
    params = store / "checkpoints" / KEYS[1] / "params.float32" / "c"
    assert len(list(params.iterdir())) == 4  # a.bias (4 floats), a.weight (12), sorted by name
    (params / "0").unlink()  # elements 0..3: a.bias
    (params / "3").write_bytes(b"")  # elements 12..15: the last third of a.weight, truncated
    problems = open_run(store).verify()
    chunk = f"checkpoints/{KEYS[1]}/params.float32/c/"
    assert {(p.where, p.names, p.reason, p.files) for p in problems} == {
        (f"checkpoint {KEYS[1]}", ("a.bias",), integrity.MISMATCH, (f"{chunk}0",)),
        (f"checkpoint {KEYS[1]}", ("a.weight",), integrity.UNREADABLE, (f"{chunk}3",)),
    }
    _assert_equal(open_run(store).checkpoints[0].params(include_frozen=False), _params(0))


def test_damaged_step_rows_name_their_chunk_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of three blocks of rows, the one that fails to decode or to match its digest is named."""
    monkeypatch.setattr(schema, "STEP_ROW_CHUNK", 3)
    store = tmp_path / "run.zarr"
    StoreWriter.open(str(store)).append_steps([row(0, float(t), 0.1 * t) for t in range(8)])
    damage(str(store), None, "steps/loss/c/1", "truncated")
    damage(str(store), None, "steps/lr/c/2/0", "deleted")
    problems = open_run(store).verify()
    assert {(p.names, p.reason, p.files) for p in problems} == {
        (("loss",), integrity.UNREADABLE, ("steps/loss/c/1",)),
        (("lr",), f"rows 6..7: {integrity.MISMATCH}", ("steps/lr/c/2/0",)),
    }


def test_rows_appended_after_damage_are_refused(tmp_path: Path) -> None:
    """The writer checks the rows it continues from: it never blesses damaged ones."""
    store = tmp_path / "run.zarr"
    write_store(str(store), None)
    damage(str(store), None, "steps/loss/c/0", "flipped")
    writer = StoreWriter.open(str(store))
    with pytest.raises(DamagedStoreError, match="steps"):
        writer.append_steps([row(0, 0.5, 0.1)])
    assert writer.num_steps == 7


def test_rows_survive_truncation_widening_and_new_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row digests follow appends across blocks, a resume's truncation and new param groups."""
    monkeypatch.setattr(schema, "STEP_ROW_CHUNK", 3)
    store = str(tmp_path / "run.zarr")
    writer = StoreWriter.open(store)
    rows = [row(0, float(t), 0.1 * t) for t in range(8)]
    writer.append_steps(rows[:2])
    writer.append_steps(rows[2:7])
    writer.truncate_steps(5)
    writer.append_steps([row(1, 9.0, 1.0, 2.0)])
    reopened = StoreWriter.open(store)  # no rows cached: the next append reads them back
    reopened.append_steps(rows[7:])
    steps = open_run(store).steps()
    np.testing.assert_array_equal(steps["loss"], [0, 1, 2, 3, 4, 9, 7])
    np.testing.assert_array_equal(steps["lr"][:, 1], [np.nan] * 5 + [2.0, np.nan])
    assert open_run(store).verify() == []


def test_failure_mid_checkpoint_leaves_it_uncommitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error while writing (here: the optimizer state's array) commits nothing of it."""
    store = tmp_path / "run.zarr"
    write_store(str(store), None)
    before = [c.params() for c in open_run(store).checkpoints]
    original = zarr.storage.LocalStore.set

    async def failing(store: zarr.storage.LocalStore, key: str, value: Any) -> None:
        if "/optimizer." in key:
            raise OSError("disk full")
        await original(store, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing)
    writer = StoreWriter.open(str(store))
    with pytest.raises(OSError, match="disk full"):
        snapshot = snapshot_checkpoint(_params(5), {}, {"exp_avg_sq": _params(6)})
        writer.write_checkpoint(5, schema.ROLE_INTERIOR, 0, snapshot)
    run = open_run(store)
    *committed, interrupted = run.checkpoints
    assert interrupted.key == "0000000005_interior" and not interrupted.committed
    with pytest.raises(StoreError, match="never committed"):
        interrupted.params()
    for checkpoint, params in zip(committed, before, strict=True):
        _assert_equal(checkpoint.params(), params)
    assert run.verify() == []  # an uncommitted checkpoint is not damage: it is never read


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real two-stage Lightning run (buffers, a frozen layer, AdamW), format 2."""
    store = tmp_path_factory.mktemp("recorded") / "run.zarr"
    v1.record(store)
    return store


def test_verify_command_and_analyze_refuse_a_damaged_record(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(recorded)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"{recorded}: intact: 8 committed checkpoint(s), 1 frozen group(s), 12 step row(s) and "
        "the example digests of 2 stage(s) checked against their checksums and digests"
    ]
    store = tmp_path / "run.zarr"
    shutil.copytree(recorded, store)
    key = open_run(store).checkpoints[2].key
    damage(str(store), None, f"checkpoints/{key}/params.float32/c/0", "deleted")
    damage(str(store), None, "steps/stage/c/0", "truncated")
    assert main(["verify", str(store)]) == EXIT_DAMAGED
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == [
        f"damaged: checkpoint {key}: {integrity.MISMATCH} (4: net.0.bias, net.0.weight, "
        f"net.2.bias, net.2.weight) in checkpoints/{key}/params.float32/c/0",
        f"damaged: steps: {integrity.UNREADABLE} (1: stage) in steps/stage/c/0",
    ]
    assert lines[-1].startswith(f"{store}: 2 problem(s): 8 committed checkpoint(s)")
    with pytest.raises(DamagedStoreError, match=f"checkpoint {key}"):
        v1.analysis(store)
    # inspect reads no checkpoint; it still summarizes the run, without the damaged rows
    assert main(["inspect", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"warning: the step rows are damaged (steps: {integrity.UNREADABLE}" in out
    assert "checkpoints (8, 8 committed)" in out


def test_inspect_does_not_vouch_for_contents(
    recorded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(recorded)]) == 0
    out = capsys.readouterr().out
    assert "verified" not in out
    assert "committed); contents not checked here: source-callback verify STORE checks them" in out


def test_uncommitted_frozen_group_is_a_problem(tmp_path: Path) -> None:
    """Unlike an uncommitted checkpoint, the stage's checkpoints need their frozen parameters."""
    store = tmp_path / "run.zarr"
    write_store(str(store), None)
    zarr.open_group(store / "frozen" / "0000", mode="r+").attrs["committed"] = False
    run = open_run(store)
    assert [str(p) for p in run.verify()] == [
        "frozen parameters of stage 0: were never committed (the write was interrupted)"
    ]
    with pytest.raises(StoreError, match="never committed"):
        run.checkpoints[0].params()


class _StopAfter(pl.Callback):
    """Stops training after ``steps`` optimizer steps, as early stopping would."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, *args) -> None:
        trainer.should_stop = trainer.global_step >= self.steps


def test_a_checkpoint_missing_from_a_complete_stage_is_damage(tmp_path: Path) -> None:
    """A deleted checkpoint folder is found (the stage's plan says it was taken); the planned
    checkpoints a stage stopped early never reached are not."""
    stopped, whole = tmp_path / "stopped.zarr", tmp_path / "whole.zarr"
    for store, callbacks in ((stopped, [_StopAfter(3)]), (whole, [])):
        trainer([SourceCallback(store, stage="s"), *callbacks], tmp_path, max_epochs=1).fit(
            TinyClassifier(), loader(make_dataset(64))
        )
    early = open_run(stopped)
    assert early.stages[0].last_step == 2 and max(early.stages[0].planned_checkpoints) > 3
    assert early.verify() == []

    run = open_run(whole)
    assert run.verify() == []
    interior = [c.key for c in run.checkpoints if c.role == schema.ROLE_INTERIOR]
    shutil.rmtree(whole / schema.CHECKPOINTS / interior[1])
    [problem] = open_run(whole).verify()
    assert (problem.where, problem.names) == ("stage 's'", (interior[1],))
    assert problem.reason.startswith(f"1 of its {len(interior) + 2} checkpoints is missing")
    assert problem.files == (f"{schema.CHECKPOINTS}/{interior[1]}",)
    with pytest.raises(DamagedStoreError, match=rf"stage 's': 1 of its .* \(1: {interior[1]}\)"):
        open_run(whole).require_intact()


def _edit_attributes(group: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Change a group's attributes in its ``zarr.json`` by hand, as a user or a bad sync might."""
    document = json.loads((group / "zarr.json").read_text())
    edit(document["attributes"])
    (group / "zarr.json").write_text(json.dumps(document))


def test_edited_metadata_is_damage(recorded: Path, tmp_path: Path) -> None:
    """The stage records, a checkpoint's commit record and the step rows' count each carry a
    digest: an edit that stays valid JSON (another last step, another checkpoint step, fewer
    rows) is damage, and nothing is read through it."""
    edits = {
        "stage records": ("stages", lambda a: a["stages"][0].update(last_step=3)),
        "steps": ("steps", lambda a: a.update(num_steps=a["num_steps"] - 1)),
    }
    key = open_run(recorded).checkpoints[2].key

    def later(attributes: dict[str, Any]) -> None:
        attributes[schema.ATTR_STEP] += 1  # the parameters before another step

    edits[f"checkpoint {key}"] = (f"checkpoints/{key}", later)
    for where, (path, edit) in edits.items():
        store = tmp_path / where.replace(" ", "-") / "run.zarr"
        shutil.copytree(recorded, store)
        _edit_attributes(store / path, edit)
        damaged = open_run(store)
        assert [(p.where, p.reason, p.files) for p in damaged.verify()] == [
            (where, integrity.METADATA_MISMATCH, (f"{path}/zarr.json",))
        ], where
        with pytest.raises(DamagedStoreError, match=where):
            if where == "steps":
                damaged.steps()
            elif where.startswith("checkpoint"):
                damaged.checkpoints[2].optimizer_state()
            else:
                damaged.require_intact()


def test_metadata_that_is_not_json_is_named(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A zarr.json cut short (a partial copy) is damage named by its file, wherever it is."""
    key = open_run(recorded).checkpoints[2].key
    cut = {
        "group": f"checkpoints/{key}/zarr.json",
        "array": f"checkpoints/{key}/params.float32/zarr.json",
        "stages": "stages/zarr.json",
        "root": "zarr.json",
    }
    stores = {}
    for what, path in cut.items():
        stores[what] = tmp_path / what / "run.zarr"
        shutil.copytree(recorded, stores[what])
        document = stores[what] / path
        document.write_text(document.read_text()[:-20])

    # A checkpoint's group: the others read; verify and inspect say which.
    [problem] = open_run(stores["group"]).verify()
    assert (problem.where, problem.files) == (f"checkpoint {key}", (cut["group"],))
    assert problem.reason.startswith("its metadata cannot be read (")
    assert main(["inspect", str(stores["group"])]) == 0
    assert main(["verify", str(stores["group"])]) == EXIT_DAMAGED
    assert f"in {cut['group']}" in capsys.readouterr().out
    # One of its arrays: inspect shows the checkpoint as unreadable, verify names it.
    assert main(["inspect", str(stores["array"])]) == 0
    assert "unreadable" in capsys.readouterr().out
    assert main(["verify", str(stores["array"])]) == EXIT_DAMAGED
    # The stage records: nothing that depends on them can be read; verify still reports.
    with pytest.raises(DamagedStoreError, match=r"stages: its metadata cannot be read .* in "):
        _ = open_run(stores["stages"]).stages
    assert main(["verify", str(stores["stages"])]) == EXIT_DAMAGED
    assert f"in {cut['stages']}" in capsys.readouterr().out
    # The root: not recognised as a store, and the message says how to mend a record.
    with pytest.raises(StoreError, match=r"no readable zarr.json at its root.*restore it"):
        open_run(stores["root"])
