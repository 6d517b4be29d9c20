"""SourceCallback under real DDP on CPU (2 processes, gloo): one writer, no hang on errors.

Lightning's DDP launcher re-executes the training script once per extra rank, so the training
lives in ``tests/scripts/train_ddp.py`` and runs in a subprocess here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from processes import SCRIPTS, load_script, subprocess_env
from storeutil import tree_digest

from source_callback import Run, open_run

TRAIN_DDP = SCRIPTS / "train_ddp.py"
WORLD_SIZE = 2
HANG_TIMEOUT_S = 240  # generous for a loaded 2-core CI machine; a run takes ~20 s


def run_script(args: list[str], timeout: float = HANG_TIMEOUT_S) -> tuple[int, str]:
    """Run a script in its own process group; kill the whole group if it hangs."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(),
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
        output, _ = proc.communicate()
        pytest.fail(f"DDP run did not finish in {timeout} s (deadlock?). Output:\n{output}")
    finally:
        # Ranks left behind by a crashed launcher would keep the machine busy.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, output


def single_process_reference(tmp_path: Path) -> Run:
    """``train_ddp.py``'s two stages on one process, each batch the ranks' batches together."""
    script = load_script(TRAIN_DDP)
    reference = tmp_path / "single.zarr"
    script.train(
        str(reference), 1, script.PER_PROCESS_BATCH * WORLD_SIZE, str(tmp_path / "lightning")
    )
    return open_run(reference)


def test_ddp_two_stages_written_once_like_a_single_process_run(tmp_path) -> None:
    store = tmp_path / "ddp.zarr"
    code, output = run_script([str(TRAIN_DDP), str(store), str(WORLD_SIZE)])
    assert code == 0, output
    assert "DONE rank=0" in output and "DONE rank=1" in output, output  # both ranks, both stages

    # Reference: one process whose batch is the DDP global batch (per-process batch x 2), drawn in
    # the order Lightning's DistributedSampler deals it out (see the script), so each step sees
    # the same 16 examples and the averaged DDP gradient equals the single-process one.
    script = load_script(TRAIN_DDP)
    ddp, single = open_run(store), single_process_reference(tmp_path)
    assert ddp.status == single.status == "complete"
    assert [s.name for s in ddp.stages] == ["pretrain", "finetune"]
    for got, want in zip(ddp.stages, single.stages, strict=True):
        assert (got.name, got.index, got.status) == (want.name, want.index, want.status)
        assert (got.first_step, got.last_step) == (want.first_step, want.last_step)
        assert got.planned_checkpoints == want.planned_checkpoints
        assert (got.num_examples, got.fingerprint) == (want.num_examples, want.fingerprint)
        assert got.optimizer == want.optimizer
        assert (got.world_size, got.batch_size) == (WORLD_SIZE, script.PER_PROCESS_BATCH)
        assert (want.world_size, want.batch_size) == (1, script.PER_PROCESS_BATCH * WORLD_SIZE)
    pretrain, finetune = ddp.stages
    assert (pretrain.first_step, pretrain.last_step) == (0, 7)  # 64 / 16 = 4 steps x 2 epochs
    assert (finetune.first_step, finetune.last_step) == (8, 10)  # 48 / 16 = 3 steps

    # Exactly one writer: as many rows as optimizer steps, not twice as many, none lost.
    assert ddp.num_steps == single.num_steps == 11
    got_steps, want_steps = ddp.steps(), single.steps()
    assert got_steps.keys() == want_steps.keys()
    assert got_steps["examples"].tolist() == [script.PER_PROCESS_BATCH * WORLD_SIZE] * 11
    for name in ("stage", "epoch", "examples"):
        np.testing.assert_array_equal(got_steps[name], want_steps[name], err_msg=name)
    for name in ("lr", "momentum", "beta2", "weight_decay", "dampening", "eps"):
        np.testing.assert_allclose(got_steps[name], want_steps[name], err_msg=name)
    # Clipped by the averaged gradients' norm (float32 sums in another order: rounding).
    np.testing.assert_allclose(got_steps["scale"], want_steps["scale"], rtol=1e-6)
    assert 0 < (got_steps["scale"] < 1).sum() < 11
    assert np.isfinite(got_steps["loss"]).all()  # rank 0's mean loss, not comparable to single

    layout = [(c.key, c.step, c.stage, c.role) for c in ddp.checkpoints]
    assert layout == [(c.key, c.step, c.stage, c.role) for c in single.checkpoints]
    assert [c.role for c in ddp.checkpoints].count("stage-start") == 2
    assert all(c.committed for c in ddp.checkpoints)
    for got, want in zip(ddp.checkpoints, single.checkpoints, strict=True):
        got_params, want_params = got.params(), want.params()
        assert got_params.keys() == want_params.keys()
        for name in want_params:
            torch.testing.assert_close(got_params[name], want_params[name], rtol=1e-4, atol=1e-5)
        got_state, want_state = got.optimizer_state(), want.optimizer_state()
        assert {k: set(v) for k, v in got_state.items()} == {
            k: set(v) for k, v in want_state.items()
        }
        for name, values in want_state.items():
            for key, value in values.items():
                torch.testing.assert_close(got_state[name][key], value, rtol=1e-4, atol=1e-6)
    # No stray files from a second writer (e.g. interrupted partial writes).
    assert not [p for p in tree_digest(store) if p.endswith(".partial")]


def test_ddp_not_a_store_fails_every_rank_without_touching_it(tmp_path) -> None:
    target = tmp_path / "notes"
    target.mkdir()
    (target / "notes.txt").write_text("my notes, not a store\n")
    before = tree_digest(target)

    code, output = run_script([str(TRAIN_DDP), str(target), str(WORLD_SIZE)])

    assert code != 0, output
    assert "NotAStoreError" in output, output
    assert "DONE" not in output, output
    assert tree_digest(target) == before
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
