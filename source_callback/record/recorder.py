"""Framework-free recording: stages, step rows and checkpoints, written off the training thread.

A framework adapter (``source_callback.lightning``, ``source_callback.hf``), through its
:class:`~source_callback.record.session.RecordingSession`, calls the recorder at the right moments;
the recorder decides what goes where, buffers step rows into blocks, and hands every store write
to a background thread so that training does not wait on storage: checkpoints go to one, the
rest of the record (step rows, example digests, stage entries) to another, so that the
stage-end checkpoint is not queued behind the last block of rows. Each keeps its writes in
order; the two touch different parts of the store.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from source_callback.errors import InterruptedStageError, StoreError, listed
from source_callback.fingerprint import UnstableItemsError, example_digests
from source_callback.lineage import Continuation, match_stages
from source_callback.record.plan import interior_steps
from source_callback.store import integrity, schema
from source_callback.store.writer import (
    CheckpointSnapshot,
    LateProbe,
    StepRow,
    StoreWriter,
    TensorDict,
    checkpoint_layout,
    snapshot_checkpoint,
    snapshot_frozen,
)


def step_hyperparameters(group: Mapping[str, Any]) -> dict[str, float]:
    """An optimizer param group's per-step fields (``schema.STEP_GROUP_FIELDS``), NaN if absent.

    Adam's ``betas`` are stored as ``momentum`` (β1) and ``beta2``; SGD's ``momentum`` as is.
    """
    betas = group.get("betas")
    values = {
        schema.STEP_LR: group.get("lr"),
        schema.STEP_MOMENTUM: betas[0] if betas is not None else group.get("momentum"),
        schema.STEP_BETA2: betas[1] if betas is not None else None,
        schema.STEP_WEIGHT_DECAY: group.get("weight_decay"),
        schema.STEP_DAMPENING: group.get("dampening"),
        schema.STEP_EPS: group.get("eps"),
    }
    return {k: _number(v) for k, v in values.items()}


def _number(value: Any) -> float:
    """A hyperparameter as a number: NaN where absent or not one number (Adafactor's eps pair)."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return math.nan


def materialize_losses(rows: list[StepRow]) -> None:
    """Turn tensor losses into floats with one device transfer per block, not one per step."""
    tensors = [r.loss for r in rows if isinstance(r.loss, torch.Tensor)]
    if not tensors:
        return
    values = iter(torch.stack([t.detach().float().reshape(()) for t in tensors]).cpu().tolist())
    for row in rows:
        if isinstance(row.loss, torch.Tensor):
            row.loss = next(values)


class Recorder:
    """Records one run into a store, stage after stage.

    Parameters
    ----------
    writer
        The store's writer (already validated).
    flush_every
        Step rows buffered before a block is written.
    max_snapshots
        Checkpoint copies held at once, each the size of the tensors a checkpoint copies: a
        checkpoint waits, before it copies, while that many are being written. With 1, it
        refills the buffers of the last one, waiting for its write when it has not finished;
        with 2, it is taken into other buffers meanwhile.

    """

    def __init__(
        self, writer: StoreWriter, *, flush_every: int = 256, max_snapshots: int = 2
    ) -> None:
        self.writer = writer
        self.flush_every = flush_every
        self.max_snapshots = max_snapshots
        self._rows: list[StepRow] = []
        self._pending: list[concurrent.futures.Future[Any]] = []  # of both threads
        self._checkpoint_thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="source-callback-writer"
        )
        self._record_thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="source-callback-records"
        )
        # Digests every training example while the stage trains: one read of the dataset,
        # off the training thread and apart from the writer, whose order it must not hold up.
        self._digester = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="source-callback-digests"
        )
        self._digests: concurrent.futures.Future[np.ndarray | None] | None = None
        # The buffers of the last checkpoint written, refilled by the next (set by the writer
        # before its write counts as done), and the checkpoint writes in flight.
        self._spare: dict[str, torch.Tensor] = {}
        self._spare_lock = threading.Lock()
        self._writing: list[concurrent.futures.Future[Any]] = []
        self._notes: list[concurrent.futures.Future[str | None]] = []  # see notes()
        self.stage_index = -1
        self.first_step = 0
        self.next_step = writer.num_steps
        self.planned: frozenset[int] = frozenset()

    # -- background writes -------------------------------------------------------------------

    def _wait_for_snapshot(self) -> None:
        """Block while ``max_snapshots`` checkpoints are being written (and none failed)."""
        self._raise_failed()
        while len(self._writing) >= self.max_snapshots:
            concurrent.futures.wait(self._writing, return_when=concurrent.futures.FIRST_COMPLETED)
            self._writing = [f for f in self._writing if not f.done()]
            self._raise_failed()

    def _submit(
        self, thread: concurrent.futures.Executor, fn: Callable[..., Any], *args: Any
    ) -> concurrent.futures.Future[Any]:
        """Run a write on ``thread`` (``_checkpoint_thread``: checkpoint data; else the rest)."""
        self._raise_failed()
        future = thread.submit(fn, *args)
        self._pending.append(future)
        return future

    def _raise_failed(self) -> None:
        for future in [f for f in self._pending if f.done()]:
            self._pending.remove(future)
            error = future.exception()
            if error is not None:
                raise StoreError(
                    f"writing the record to {self.writer.url} failed: {error!r}. Committed "
                    "checkpoints and flushed steps are intact."
                ) from error

    def wait(self) -> None:
        """Write buffered rows and wait for every background write; raise the first failure."""
        self.flush()
        concurrent.futures.wait(self._pending)
        self._raise_failed()

    def close(self) -> None:
        """Wait for pending writes, then stop the background thread."""
        try:
            self.wait()
        finally:
            self._checkpoint_thread.shutdown(wait=True)
            self._record_thread.shutdown(wait=True)
            self._spare = {}
            self._digester.shutdown(wait=False, cancel_futures=True)

    # -- stages ------------------------------------------------------------------------------

    def check_can_begin(
        self,
        stage: schema.Stage,
        identity: Mapping[str, str] | None = None,
        renamed: Mapping[str, str | None] | None = None,
    ) -> Continuation | None:
        """Raise if ``stage`` cannot be appended; writes nothing.

        Returns how the stage's model (``stage.manifest``) continues the last recorded stage's
        (``None`` for a run's first stage); see :func:`source_callback.lineage.match_stages`
        for ``identity`` and ``renamed``.
        """
        stages = self.writer.stages
        if stages and not stages[-1].complete:
            last = stages[-1]
            raise InterruptedStageError(
                f"stage {last.name!r} in {self.writer.url} was interrupted after "
                f"{self.writer.num_steps - last.first_step} recorded steps. Resume it from "
                "the last training checkpoint with the same store (Lightning: trainer.fit(..., "
                "ckpt_path=...); Hugging Face: trainer.train(resume_from_checkpoint=...)), or "
                "record the new run into a new store; the store was not modified."
            )
        if stage.name in [s.name for s in stages]:
            raise StoreError(
                f"stage {stage.name!r} is already recorded in {self.writer.url}. Give the new "
                "stage another name (the callback's stage=... or callback.next_stage(...))."
            )
        if not stages:
            return None
        previous = schema.stage_manifest(stages[-1], self.writer.root)
        return match_stages(
            previous, stage.manifest or [], identity=identity, renamed=renamed, stage=stage.name
        )

    def begin_stage(
        self,
        stage: schema.Stage,
        frozen: TensorDict,
        params: TensorDict,
        buffers: TensorDict,
        optimizer_state: Mapping[str, TensorDict],
        *,
        identity: Mapping[str, str] | None = None,
        renamed: Mapping[str, str | None] | None = None,
        probe: TensorDict | None = None,
    ) -> schema.Stage:
        """Start a stage: its entry, its frozen parameters and its stage-start checkpoint.

        ``stage`` carries what the training framework knows, including the model's manifest
        and why it has no probe (``probe``: the stage-start checkpoint's, if any);
        its position in the run (index, first step, checkpoint plan, status) and how its model
        continues the previous stage's are filled in here. Returns the recorded stage.
        """
        continuation = self.check_can_begin(stage, identity, renamed)
        self.stage_index = len(self.writer.stages)
        self.first_step = self.next_step = self.writer.num_steps
        local = interior_steps(stage.estimated_steps or math.inf, stage.checkpoints_per_stage)
        planned = [self.first_step + s for s in local]
        self.planned = frozenset(planned)
        stage = dataclasses.replace(
            stage,
            index=self.stage_index,
            status=schema.STAGE_RECORDING,
            first_step=self.first_step,
            last_step=None,
            planned_checkpoints=planned,
            continues=None if continuation is None else continuation.to_json(),
        )
        self.writer.add_stage(stage)
        self.write_stage_start(frozen, params, buffers, optimizer_state, probe)
        if continuation is not None and self.writer.shard_group is None:
            # after the stage-start writes, on their thread
            check = self._submit(self._checkpoint_thread, self._changed, stage, continuation)
            self._notes.append(check)
        return stage

    def notes(self) -> list[str]:
        """Warnings the background checks have found since the last call (their text).

        For the training thread to raise: raised on the writer's thread, a warning would show
        its location instead of the caller's.
        """
        done = [f for f in self._notes if f.done() and f.exception() is None]
        self._notes = [f for f in self._notes if not f.done()]
        return [note for note in (f.result() for f in done) if note is not None]

    def _changed(self, stage: schema.Stage, continuation: Continuation) -> str | None:
        """What to warn of where the stage starts from other values than the last one ended with.

        Compares the recorded digests of the tensors it continues (the previous stage's end
        checkpoint and frozen group, this one's start checkpoint and frozen group): a model
        built afresh for the new stage, without the trained weights, is found here rather than
        by ``analyze`` after the stage has trained.
        """
        previous = self.writer.stages[stage.index - 1]
        sections = (schema.SECTION_PARAMS, schema.SECTION_BUFFERS)

        def digests(stage_index: int, key: str) -> dict[str, str]:
            root = self.writer.root
            found = integrity.tensor_digests(root[schema.CHECKPOINTS][key], sections)
            frozen = root[schema.FROZEN].get(schema.frozen_key(stage_index))
            if frozen is not None:
                found.update(integrity.tensor_digests(frozen, sections))
            return found

        ended = digests(previous.index, schema.checkpoint_key(stage.first_step, schema.ROLE_END))
        started = digests(stage.index, schema.checkpoint_key(stage.first_step, schema.ROLE_START))
        pairs = [
            (new, old)
            for new, old in continuation.previous.items()
            if new in started and old in ended
        ]
        changed = sorted(new for new, old in pairs if started[new] != ended[old])
        if not changed:
            return None
        return (
            f"stage {stage.name!r} starts from other values than stage {previous.name!r} "
            f"ended with, in {len(changed)} of the {len(pairs)} tensors it continues "
            f"({listed(changed, 5)}): a model built afresh instead of the trained one (load "
            "the previous stage's weights), or tensors changed between the stages outside "
            "training. analyze() will refuse the run unless they are declared "
            "(renamed={name: None} makes a tensor new in this stage)."
        )

    def follow_stage(self, stage_index: int, next_step: int, planned: frozenset[int]) -> None:
        """On a rank other than 0 of a sharded run: write the shards of this stage's checkpoints.

        Rank 0 recorded (or resumed) stage ``stage_index``; the next optimizer step is
        ``next_step`` and the interior checkpoints are planned before ``planned``.
        """
        self.stage_index = stage_index
        self.first_step = self.next_step = next_step
        self.planned = planned

    def write_stage_start(
        self,
        frozen: TensorDict,
        params: TensorDict,
        buffers: TensorDict,
        optimizer_state: Mapping[str, TensorDict],
        probe: TensorDict | None = None,
    ) -> None:
        """Write the stage's frozen parameters and its stage-start checkpoint."""
        if frozen:
            packed = snapshot_frozen(frozen, self.writer.shard_group)
            self._submit(
                self._checkpoint_thread, self.writer.write_frozen, self.stage_index, packed
            )
        self.checkpoint(self.first_step, schema.ROLE_START, params, buffers, optimizer_state, probe)

    def resume_stage(self, stage_index: int, next_step: int) -> None:
        """Continue stage ``stage_index`` at global step ``next_step`` after a restart.

        Step rows and checkpoints recorded after ``next_step`` (a crash after the last
        Lightning checkpoint) are dropped: those steps are about to be trained again. Returns
        once they are (in a sharded run, the other ranks then write into the same checkpoints).
        """
        stages = self.writer.stages
        if stage_index != len(stages) - 1:
            raise InterruptedStageError(
                f"cannot resume stage {stage_index} of {self.writer.url}: the store holds "
                f"{len(stages)} stage(s) and only the last one can be resumed. Resume into the "
                "store that this checkpoint was recorded with."
            )
        if next_step > self.writer.num_steps:
            raise StoreError(
                f"the checkpoint resumes at global step {next_step} but {self.writer.url} "
                f"holds only {self.writer.num_steps} step rows; the store does not belong to "
                "this checkpoint. Resume with the store it was recorded into."
            )
        self.stage_index = stage_index
        self.first_step = stages[stage_index].first_step
        self.next_step = next_step
        self.planned = frozenset(stages[stage_index].planned_checkpoints)
        self._submit(self._record_thread, self._truncate_for_resume, stage_index, next_step)
        self.wait()

    def _truncate_for_resume(self, stage_index: int, next_step: int) -> None:
        self.writer.truncate_steps(next_step)
        for key in self.writer.checkpoint_keys():
            step, role = schema.parse_checkpoint_key(key)
            if step >= next_step and role != schema.ROLE_START:
                attrs = self.writer.root[schema.CHECKPOINTS][key].attrs
                if attrs.get(schema.ATTR_STAGE) == stage_index:
                    self.writer.delete_checkpoint(key)
        self.writer.update_stage(stage_index, status=schema.STAGE_RECORDING, last_step=None)
        self.writer.set_status(schema.STATUS_RECORDING)

    def digest_examples(self, dataset: Any) -> None:
        """Start digesting every example of the stage's training set in the background.

        The digests are written before the stage is closed (:meth:`end_stage`), so that the
        analysis can find a changed example anywhere. A dataset without a length, or whose
        items change between reads, gets none (with a warning for the latter).
        """
        self._digests = self._digester.submit(example_digests, dataset)

    def _write_digests(self, *, if_ready: bool = False) -> None:
        """Wait for the stage's example digests, then hand them to the writer.

        ``if_ready``: only if they are done, without waiting (they are then written during the
        stage rather than in the stage-end wait).
        """
        if self._digests is None or (if_ready and not self._digests.done()):
            return
        future, self._digests = self._digests, None
        try:
            digests = future.result()
        except UnstableItemsError as exc:
            warnings.warn(
                f"the training set of stage {self.stage_index} gives different items for the "
                f"same index ({exc}; random transforms?): its examples cannot be digested, so "
                "analyze() will check only its size and a sample fingerprint.",
                stacklevel=3,
            )
            return
        except Exception as exc:
            warnings.warn(
                f"digesting the examples of stage {self.stage_index} failed ({exc!r}); "
                "analyze() will check only the dataset's size and a sample fingerprint.",
                stacklevel=3,
            )
            return
        if digests is not None:
            self._submit(
                self._record_thread, self.writer.write_example_digests, self.stage_index, digests
            )

    def note_no_probe(self, reason: str) -> None:
        """Record in the stage's entry why (some of) its checkpoints hold no probe."""
        self._submit(self._record_thread, self._note_no_probe, self.stage_index, reason)

    def _note_no_probe(self, stage_index: int, reason: str) -> None:
        self.writer.update_stage(stage_index, probe=reason)

    def end_stage(
        self,
        params: TensorDict,
        buffers: TensorDict,
        optimizer_state: Mapping[str, TensorDict],
        probe: Callable[[], TensorDict | None] = lambda: None,
    ) -> None:
        """Write the last rows, the example digests and the stage-end checkpoint; close the stage.

        ``probe`` takes the probe at the stage's final parameters (see :meth:`checkpoint`). It
        runs once the last rows are handed to the writer and, unless the run is sharded (where
        every rank's layout must hold the probe), once the tensors are copied, while they are
        written: the stage-end wait is then the checkpoint's copy and write. Returns once the
        stage is closed.
        """
        self._write_digests()
        self.flush()
        step, role = self.next_step, schema.ROLE_END
        if self.writer.shard_group is not None:
            self.checkpoint(step, role, params, buffers, optimizer_state, probe())
        else:
            late: LateProbe = concurrent.futures.Future()
            self.checkpoint(step, role, params, buffers, optimizer_state, late_probe=late)
            try:
                late.set_result(probe())
            except BaseException:
                late.cancel()  # the write stops before its commit rather than waiting
                raise
        self.wait()  # the stage is complete only once everything in it is
        self._submit(self._record_thread, self._close_stage, self.stage_index, self.next_step)
        self.wait()

    def _close_stage(self, stage_index: int, next_step: int) -> None:
        self.writer.update_stage(stage_index, status=schema.STAGE_COMPLETE, last_step=next_step - 1)
        self.writer.set_status(schema.STATUS_COMPLETE)

    # -- steps and checkpoints ---------------------------------------------------------------

    def record_step(self, row: StepRow) -> int:
        """Buffer one optimizer step's row; returns its global step index.

        A stage's first row is written at once: the step arrays are created (or widened to the
        stage's parameter groups) early in the stage, not in its stage-end wait.
        """
        self._rows.append(row)
        step = self.next_step
        self.next_step += 1
        if len(self._rows) >= self.flush_every or step == self.first_step:
            self.flush()
        return step

    def flush(self) -> None:
        """Hand buffered step rows to the background writer."""
        if self._rows:
            rows, self._rows = self._rows, []
            materialize_losses(rows)
            self._submit(self._record_thread, self.writer.append_steps, rows)
        self._write_digests(if_ready=True)

    def checkpoint(
        self,
        step: int,
        role: str,
        params: TensorDict,
        buffers: TensorDict,
        optimizer_state: Mapping[str, TensorDict],
        probe: TensorDict | None = None,
        *,
        late_probe: LateProbe | None = None,
    ) -> None:
        """Copy the tensors to CPU now and write them as a checkpoint in the background.

        ``probe``: the probe's indices and losses at this checkpoint
        (:func:`source_callback.record.probe.probe_tensors`), if any; or ``late_probe``, the
        probe to come (:class:`~source_callback.store.writer.CheckpointSnapshot`). The copy
        goes into the buffers of the last checkpoint written, when its layout still fits.
        Before copying, it waits while ``max_snapshots`` checkpoints are being written: the
        copies held are those and the buffers kept for reuse, never more than ``max_snapshots``
        sets.
        """
        self._wait_for_snapshot()
        self._write_digests(if_ready=True)
        with self._spare_lock:
            spare, self._spare = self._spare, {}
        snapshot = snapshot_checkpoint(
            params, buffers, optimizer_state, probe, spare, self.writer.shard_group, late_probe
        )
        self._writing.append(
            self._submit(
                self._checkpoint_thread,
                self._write_checkpoint,
                step,
                role,
                self.stage_index,
                snapshot,
            )
        )

    def _write_checkpoint(
        self, step: int, role: str, stage_index: int, snapshot: CheckpointSnapshot
    ) -> None:
        """Write a checkpoint, then keep its buffers for the next one (one set at most).

        Kept before the write counts as done, so that a checkpoint waiting for it refills them.
        """
        self.writer.write_checkpoint(step, role, stage_index, snapshot)
        with self._spare_lock:
            self._spare = snapshot.buffers

    def prepare_checkpoints(
        self,
        params: TensorDict,
        buffers: TensorDict,
        optimizer_state: Mapping[str, TensorDict],
    ) -> None:
        """Allocate the next checkpoint's buffers in the background, if it will need new ones.

        Called once the optimizer state exists (after a stage's first step): the stage-start
        checkpoint was taken before it did, so without this the first interior checkpoint would
        allocate and fault in the optimizer state's buffers on the training thread (about 2 s
        for 0.8 GB). Does nothing when no interior checkpoint is planned after ``next_step``.
        """
        if not any(step >= self.next_step for step in self.planned):
            return
        layout = checkpoint_layout(params, buffers, optimizer_state, self.writer.shard_group)
        self._submit(self._checkpoint_thread, self._allocate_spare, layout)

    def _allocate_spare(self, target: integrity.Layout) -> None:
        with self._spare_lock:
            self._spare = integrity.allocate(target, self._spare, touch=True)
