"""Crash safety under SIGKILL: a killed run leaves a readable store that resumes exactly.

``tests/scripts/train_forever.py`` records one long stage with a checkpoint every few steps into
a store and saves Lightning checkpoints; a real process is killed with SIGKILL at several moments
(twice while a store checkpoint is being written, once at an arbitrary point), resumed from its
Lightning checkpoint each time, and finally compared with an uninterrupted reference run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from processes import load_script, subprocess_env
from storeutil import tree_digest

from source_callback import InterruptedStageError, Run, SourceCallback, StoreError, open_run

SCRIPT = Path(__file__).parent / "scripts" / "train_forever.py"
START_TIMEOUT_S = 120  # process start (imports) plus training to the kill point, on a busy CI box
FINISH_TIMEOUT_S = 180


train = load_script(SCRIPT)


class Training:
    """``train_forever.py`` in a subprocess, its ``STEP`` lines followed on a reader thread."""

    def __init__(self, store: Path, ckpt_dir: Path, log: Path, resume: Path | None) -> None:
        args = [sys.executable, str(SCRIPT), str(store), str(ckpt_dir)]
        if resume is not None:
            args += ["--resume", str(resume)]
        self.log = log
        self._stderr = log.open("w")
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=subprocess_env(),
            start_new_session=True,
        )
        self.last_step = -1
        self.finished = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("STEP "):
                self.last_step = max(self.last_step, int(line.split()[1]))
            elif line.startswith("FINISHED"):
                self.finished = True

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                self.close()
                pytest.fail(f"training exited ({self.proc.returncode}) before {what}:\n{self.logs}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} within {timeout} s:\n{self.logs}")
            time.sleep(0.001)

    def kill(self) -> None:
        """SIGKILL, then collect what it printed before dying."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.close()

    def close(self) -> None:
        self.proc.wait(timeout=60)
        self._reader.join(timeout=60)
        self._stderr.close()

    @property
    def logs(self) -> str:
        return self.log.read_text()[-6000:]


def lightning_step(ckpt: Path) -> int:
    """Global step of a Lightning checkpoint (0 when there is none yet)."""
    if not ckpt.exists():
        return 0
    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])


def newest_checkpoint_uncommitted(store: Path) -> bool:
    """Whether the newest store checkpoint is being written right now (read off the disk)."""
    folder = store / "checkpoints"
    try:
        newest = max(name for name in os.listdir(folder) if name[:1].isdigit())
        metadata = json.loads((folder / newest / "zarr.json").read_bytes())
    except (OSError, ValueError):  # nothing yet, or the group's folder is being created
        return False
    return metadata.get("attributes", {}).get("committed") is False


@pytest.fixture
def reference(tmp_path_factory) -> Run:
    """The same training, uninterrupted, in this process (one thread, like the subprocesses)."""
    root = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = train.make_trainer(
            root, [train.make_callback(root / "run.zarr")], enable_checkpointing=False
        )
        trainer.fit(train.make_model(), train.make_loader())
    finally:
        torch.set_num_threads(threads)
    run = open_run(root / "run.zarr")
    assert run.status == "complete" and run.num_steps == train.TOTAL_STEPS
    return run


def check_interrupted(store: Path, reference: Run, trained: int, saved: int) -> int:
    """What a killed run must leave behind; returns the number of uncommitted checkpoints.

    ``trained``: steps the killed process reported; ``saved``: the step of its last Lightning
    checkpoint, whose rows the callback had waited for.
    """
    run = open_run(store)
    assert run.status == "recording"
    [stage] = run.stages
    assert (stage.name, stage.status, stage.last_step) == (train.STAGE, "recording", None)
    assert not stage.complete and stage.num_steps is None

    assert saved <= run.num_steps <= trained
    steps = run.steps()
    assert all(len(column) == run.num_steps for column in steps.values())
    lrs = run.learning_rates()
    assert np.isfinite(lrs).all() and np.isfinite(steps["loss"]).all()
    np.testing.assert_allclose(lrs, reference.learning_rates()[: run.num_steps])
    assert (steps["examples"] == train.BATCH).all() and (steps["stage"] == 0).all()

    shapes = {e["name"]: e["shape"] for e in run.manifest if e["kind"] == "parameter"}
    allowed = {0, *stage.planned_checkpoints}
    by_key = {c.key: c for c in reference.checkpoints}
    uncommitted = 0
    for checkpoint in run.checkpoints:
        assert checkpoint.step in allowed and checkpoint.role in ("stage-start", "interior")
        if not checkpoint.committed:
            uncommitted += 1
            with pytest.raises(StoreError, match="committed"):
                checkpoint.params()
            with pytest.raises(StoreError, match="committed"):
                checkpoint.optimizer_state()
            continue
        params = checkpoint.params()
        assert {n: list(t.shape) for n, t in params.items()} == shapes
        assert all(torch.isfinite(t).all() for t in params.values())
        state = checkpoint.optimizer_state()
        if checkpoint.role == "interior":
            assert {n: list(s["exp_avg_sq"].shape) for n, s in state.items()} == shapes
        # A committed checkpoint holds the uninterrupted run's parameters at that step.
        expected = by_key[checkpoint.key].params()
        for name, tensor in expected.items():
            torch.testing.assert_close(params[name], tensor, rtol=1e-5, atol=1e-6)
    return uncommitted


def test_sigkill_mid_write_leaves_a_readable_store_that_resumes(tmp_path, reference) -> None:
    store, ckpt_dir = tmp_path / "run.zarr", tmp_path / "lightning"
    last = ckpt_dir / "last.ckpt"
    # (steps past the next Lightning checkpoint, kill while a store checkpoint is being written)
    kills = [(8, True), (5, False), (2, True)]
    uncommitted_seen = []
    resume: Path | None = None
    for attempt, (extra, mid_checkpoint) in enumerate(kills):
        start = lightning_step(last)
        proc = Training(store, ckpt_dir, tmp_path / f"attempt{attempt}.log", resume)
        target = start + train.CKPT_EVERY + extra
        proc.wait_for(lambda p=proc, t=target: p.last_step >= t, f"step {target}", START_TIMEOUT_S)
        if mid_checkpoint:
            proc.wait_for(lambda: newest_checkpoint_uncommitted(store), "checkpoint write", 30)
        else:
            time.sleep(0.037)
        proc.kill()
        assert proc.proc.returncode == -signal.SIGKILL
        assert not proc.finished

        saved = lightning_step(last)
        assert saved > start  # the kill came after a new Lightning checkpoint
        uncommitted_seen.append(check_interrupted(store, reference, proc.last_step, saved))

        if attempt == 0:
            # A new stage (no resume) must refuse the interrupted store and change nothing.
            before = tree_digest(store)
            callback = SourceCallback(store, stage="another")
            trainer = train.make_trainer(
                tmp_path / "refused", [callback], enable_checkpointing=False, max_epochs=1
            )
            with pytest.raises(InterruptedStageError, match="interrupted"):
                trainer.fit(train.make_model(), train.make_loader())
            assert tree_digest(store) == before
        resume = last

    print("uncommitted checkpoints after each kill:", uncommitted_seen)
    # Each kill-while-writing attempt almost always catches a write; demand that one did.
    assert sum(uncommitted_seen[i] for i, (_, mid) in enumerate(kills) if mid) >= 1, (
        uncommitted_seen
    )

    proc = Training(store, ckpt_dir, tmp_path / "final.log", resume)
    proc.wait_for(lambda: proc.finished, "finished training", FINISH_TIMEOUT_S)
    proc.close()
    assert proc.proc.returncode == 0, proc.logs

    run = open_run(store)
    assert run.status == "complete"
    [stage] = run.stages
    assert stage.complete and (stage.first_step, stage.last_step) == (0, train.TOTAL_STEPS - 1)
    assert stage.planned_checkpoints == reference.stages[0].planned_checkpoints
    assert run.num_steps == reference.num_steps == train.TOTAL_STEPS
    got, want = run.steps(), reference.steps()
    for name in ("stage", "epoch", "examples"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for name in ("lr", "momentum", "beta2", "eps", "loss"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)

    keys = [c.key for c in run.checkpoints]
    assert keys == [c.key for c in reference.checkpoints]  # no duplicates, none missing
    steps = [c.step for c in run.checkpoints]
    assert len(set(steps)) == len(steps) == train.CHECKPOINTS + 1
    assert all(c.committed for c in run.checkpoints)
    for got_ckpt, want_ckpt in zip(run.checkpoints, reference.checkpoints, strict=True):
        got_params, want_params = got_ckpt.params(), want_ckpt.params()
        for name, tensor in want_params.items():
            torch.testing.assert_close(got_params[name], tensor, rtol=1e-5, atol=1e-6)
