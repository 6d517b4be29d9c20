"""A recording session: everything a training-framework adapter does that is not the framework's.

An adapter (:class:`~source_callback.lightning.SourceCallback` for Lightning,
:class:`~source_callback.hf.SourceTrainerCallback` for the Hugging Face ``Trainer``) translates
its framework's hooks into these calls and supplies what only the framework knows (the model,
the optimizer, the training set, how to compute one example's training loss, the process ranks):

=====================  ===============================  ======================================
session                Lightning                        Hugging Face ``Trainer``
=====================  ===============================  ======================================
``open``               ``on_fit_start``                 ``on_train_begin``
``start``              ``on_train_start``               ``on_train_begin``
``before_step``        ``on_train_batch_start``         ``on_step_begin``
``optimizer_step``     ``on_before_optimizer_step``     ``on_pre_optimizer_step``
``add_batch``          ``on_train_batch_end``           a forward hook on the model
``finish_steps``       ``on_train_batch_end``           ``on_step_end``
``end``                ``on_train_end``                 ``on_train_end``
``close``/``abort``    ``teardown``/``on_exception``    ``on_train_end``/next ``on_train_begin``
``state_dict``         ``state_dict``                   ``state()`` (saved in trainer_state.json)
=====================  ===============================  ======================================

The session holds the rules both share: one writer process (global rank 0) whose store errors
are raised on every rank, a stage begun or resumed from the state saved with the framework's
checkpoint, a checkpoint before each planned step, one step row per optimizer step with the
hyperparameters that step used, and the probe.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from source_callback import errors
from source_callback.fingerprint import dataset_fingerprint, example_digest
from source_callback.manifest import model_manifest, persistent_buffers
from source_callback.optim import (
    GradientClipping,
    GradientNorms,
    OptimizerRecord,
    UpdateRule,
    describe_optimizer,
    optimizer_state_by_name,
)
from source_callback.record.probe import ProbeUnavailable, probe_indices, probe_tensors
from source_callback.record.recorder import Recorder, step_hyperparameters
from source_callback.store import location, schema
from source_callback.store.shards import ShardGroup, is_sharded, unsupported_layout
from source_callback.store.writer import StepRow, StoreWriter

T = TypeVar("T")
#: The training losses of the given examples of the stage's training set, each alone, at the
#: current parameters (raises :class:`ProbeUnavailable` where the framework cannot say).
ProbeLosses = Callable[[Sequence[int]], list[float]]

STATE_VERSION = 1

# Sessions of this process with an open recorder, by store URL: a session left open by a
# training that raised (no hook told it) is closed before another writes the same store.
_OPEN: dict[str, RecordingSession] = {}
_OPEN_LOCK = threading.Lock()


class Ranks(Protocol):
    """The processes of a run as the session needs them."""

    @property
    def is_main(self) -> bool:
        """Whether this process writes the store (global rank 0)."""
        ...

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (a collective: every rank calls it)."""
        ...


class TorchRanks:
    """The ranks of ``torch.distributed``'s default group (one process when not initialised).

    Parameters
    ----------
    is_main
        Whether this process is global rank 0.
    """

    def __init__(self, is_main: bool) -> None:
        self.is_main = is_main

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def raise_on_all_ranks(ranks: Ranks, error: Exception | None) -> None:
    """Broadcast rank 0's error (or its absence) and raise it on every rank.

    Only rank 0 touches the store; raising there alone would leave the other ranks waiting in
    their next collective.
    """
    payload = ranks.broadcast(_payload(error))
    if payload is None:
        return
    if error is not None:
        raise error
    raise _rebuilt(payload)


def _payload(error: Exception | None) -> tuple[str, str] | None:
    """An error as it travels between ranks: its class's name and message."""
    return None if error is None else (type(error).__name__, str(error))


def _rebuilt(payload: tuple[str, str], where: str = "") -> Exception:
    """Another rank's error (:func:`_payload`) as an exception of its class where known."""
    kind = getattr(errors, payload[0], None)
    return (kind if isinstance(kind, type) else errors.SourceCallbackError)(where + payload[1])


def raise_on_any_rank(error: Exception | None) -> None:
    """Raise on every rank the first error any rank had (a collective of the default group).

    Where every rank touches the store (sharded runs), an error on one rank alone would leave
    the others waiting in their next collective.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return
    payloads: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(payloads, _payload(error))
    if error is not None:
        raise error
    for rank, payload in enumerate(payloads):
        if payload is not None:
            raise _rebuilt(payload, f"(on rank {rank}) ")


def sharded_parameters(module: nn.Module) -> list[str]:
    """Names of ``module``'s parameters that are sharded DTensors (FSDP2 ``fully_shard``).

    Each rank holds only its shard of these (and of their optimizer state): every rank writes
    its own shards of each checkpoint (:mod:`source_callback.store.shards`).
    """
    if not torch.distributed.is_available():
        return []
    from torch.distributed.tensor import DTensor

    return [name for name, p in module.named_parameters() if isinstance(p, DTensor)]


def unrecordable_shards(module: nn.Module) -> str | None:
    """Why ``module``'s sharded parameters cannot be recorded (``None``: they can, or none).

    Recorded: FSDP2's ``fully_shard`` layout, every sharded parameter split by rows over one
    mesh of all ranks. The answer depends only on the model, the same on every rank.
    """
    dist = torch.distributed
    params = dict(module.named_parameters())
    world = dist.get_world_size() if dist.is_initialized() else 1
    for name in sharded_parameters(module):
        reason = unsupported_layout(params[name], world)
        if reason is not None:
            return f"parameter {name!r} is a DTensor with {reason}"
    return None


def dataset_length(dataset: Any) -> int | None:
    """``len(dataset)``, or ``None`` for a dataset without a length."""
    try:
        return len(dataset)
    except TypeError:
        return None


@dataclass(frozen=True)
class StageSetup:
    """What the framework knows when a stage (one ``fit``/``train`` call) starts training.

    Attributes
    ----------
    model
        The module whose parameters are recorded (their names are the record's names).
    optimizer
        The (unwrapped) PyTorch optimizer.
    dataset
        The training set (map-style for its size, fingerprint, digests and probe).
    batch_size, accumulate_grad_batches, world_size
        Per-process batch size; batches and processes per optimizer step.
    precision
        Lightning's name of the precision (``32-true``, ``bf16-mixed``, ...).
    estimated_steps
        Optimizer steps the stage will take from its first (``inf``/``None``: unknown).
    global_step
        The framework's optimizer-step counter now.
    probe_losses
        Computes the probed examples' training losses; ``None`` when the framework cannot.
    no_probe
        Why ``probe_losses`` is ``None``, for the warning (by default: the framework gives no
        per-example loss).
    recorded_by
        The adapter's framework (``lightning``, ``transformers``).
    divides_loss_by
        What the framework divides every (micro-)batch's loss by before the backward pass
        (Lightning: ``accumulate_grad_batches``, in automatic optimization), also in a last
        accumulation window of fewer batches; 1 where it normalises by the window it has.
    loss_scaler
        The loss scaler of fp16 mixed precision (``torch.amp.GradScaler``), if any: it skips
        the optimizer step whose gradients are not finite, and lowers its scale then (its
        ``backoff_factor`` is below 1), which is how a skipped step is known.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    dataset: Any
    batch_size: int | None
    accumulate_grad_batches: int
    world_size: int
    precision: str
    estimated_steps: float | None
    global_step: int
    probe_losses: ProbeLosses | None
    recorded_by: str
    divides_loss_by: int = 1
    loss_scaler: Any = None
    no_probe: str | None = None


def _validate_stage_name(name: str | None) -> None:
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"a stage name must be a non-empty string, got {name!r}")


def _validate_renamed(renamed: dict[str, str | None] | None) -> None:
    if renamed is not None and not (
        isinstance(renamed, dict)
        and all(isinstance(k, str) and isinstance(v, str | None) for k, v in renamed.items())
    ):
        raise TypeError(
            "renamed must map tensor names of the new stage's model to names in the "
            f"previous stage's model (or None for a new tensor), got {renamed!r}"
        )


class RecordingSession:
    """Records the stages of one run into one store, driven by a framework adapter.

    Parameters
    ----------
    store
        Local path or fsspec URL; ``None`` lets :meth:`open` use the adapter's default.
    stage
        Name of the next stage (``stage-<index>`` when ``None``).
    checkpoints_per_stage
        Equal parts per stage; a checkpoint at each part's start and at the stage's end.
    storage_options
        fsspec options for URLs.
    flush_every
        Step rows buffered before a block is written.
    renamed
        Tensor matches for the next stage (see :meth:`next_stage`).
    adapter
        The adapter's class name, for messages.
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | None,
        *,
        stage: str | None,
        checkpoints_per_stage: int,
        storage_options: dict[str, Any] | None,
        flush_every: int,
        renamed: dict[str, str | None] | None,
        adapter: str,
    ) -> None:
        if not isinstance(checkpoints_per_stage, int) or checkpoints_per_stage < 1:
            raise ValueError(
                f"checkpoints_per_stage must be a positive integer, got {checkpoints_per_stage!r}"
            )
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be a positive integer, got {flush_every!r}")
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError("storage_options must be a dict of fsspec options")
        _validate_stage_name(stage)
        _validate_renamed(renamed)
        self.store = None if store is None else location.normalize(store)
        self.storage_options = storage_options
        self.checkpoints_per_stage = checkpoints_per_stage
        self.flush_every = flush_every
        self.adapter = adapter
        self.url: str | None = None
        self.recorder: Recorder | None = None  # the record's writer (rank 0)
        # A sharded run's other ranks: each writes its shards of every checkpoint.
        self._shard_recorder: Recorder | None = None
        self._sharded = False  # every rank writes its shards of each checkpoint
        self._next_name = stage
        self._renamed = renamed
        self._previous_tensors: dict[str, weakref.ref[torch.Tensor]] = {}
        self._resume: dict[str, Any] | None = None
        self._reset_stage()

    def _reset_stage(self) -> None:
        self.active = False
        self._stage_index = -1
        self._stage_name = ""
        self._first_step = 0
        self._origin = 0
        self._rows_in_stage = 0
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._rule = UpdateRule.UNKNOWN
        self._names: dict[int, str] = {}
        self._hyper: list[dict[str, float]] | None = None
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_count = 0
        self._loss_summed = False
        self._examples = 0
        self._clip_scale = 1.0  # the current step's (GradientClipping.scale)
        self._batches = 0  # the current step's (micro-)batches
        self._divides_loss_by = 1  # StageSetup.divides_loss_by
        self._loss_scaler: Any = None  # StageSetup.loss_scaler
        self._scale_before: float | None = None  # its scale before the current step
        self._unmodelled = 0  # steps of this process clipping changed by an unknown factor
        self._clip_steps = 0  # steps of this process whose clipping was checked
        self._clipping: GradientClipping | None = None
        self._checkpointed: set[int] = set()
        self._planned: frozenset[int] = frozenset()  # steps before which a checkpoint is taken
        self._prepared = False  # the checkpoints' buffers, once the optimizer state exists
        self._probe: tuple[list[int], ProbeLosses] | None = None
        self._probe_reason: str | None = None  # why there is none

    def next_stage(self, name: str, renamed: dict[str, str | None] | None) -> None:
        """Name the next stage and say how its tensors continue the last one's."""
        _validate_stage_name(name)
        _validate_renamed(renamed)
        self._next_name = name
        self._renamed = renamed

    # -- the store ---------------------------------------------------------------------------

    def open(
        self, default_store: str | os.PathLike[str], ranks: Ranks, *, sharded: bool = False
    ) -> None:
        """Agree on the store's URL (rank 0's) and open its writer on rank 0.

        ``sharded``: the model's parameters are sharded over the ranks (the same on every
        rank): every rank opens a writer for its shards of the checkpoints.
        """
        url = self.store or location.normalize(default_store)
        self.url = ranks.broadcast(url)
        self._sharded = sharded
        shard_group = ShardGroup.create() if sharded else None
        # A rank of a sharded run holds one copy of its shards, refilled in place (a checkpoint
        # waits for the last one's write when it has not finished): sharding is for memory.
        options = {"flush_every": self.flush_every, "max_snapshots": 1 if sharded else 2}
        error = None
        if ranks.is_main and self.recorder is None:
            with _OPEN_LOCK:
                stale = _OPEN.pop(self.url, None)
            if stale is not None and stale is not self:
                stale.abort()
            try:
                writer = StoreWriter.open(self.url, self.storage_options, shard_group)
                self.recorder = Recorder(writer, **options)
                with _OPEN_LOCK:
                    _OPEN[self.url] = self
            except errors.StoreError as exc:
                error = exc
        raise_on_all_ranks(ranks, error)
        if shard_group is None:
            return
        error = None
        if not ranks.is_main and self._shard_recorder is None:
            try:
                writer = StoreWriter.join(self.url, self.storage_options, shard_group)
                self._shard_recorder = Recorder(writer, **options)
            except errors.StoreError as exc:
                error = exc
        raise_on_any_rank(error)

    @property
    def _checkpointer(self) -> Recorder | None:
        """The recorder that writes this rank's checkpoints (or shards of them), if any."""
        return self.recorder or self._shard_recorder

    def close(self) -> None:
        """Write what is buffered, wait for the background writes and release the store."""
        if self._shard_recorder is not None:
            shard_recorder, self._shard_recorder = self._shard_recorder, None
            shard_recorder.close()
        if self.recorder is None:
            return
        recorder, self.recorder = self.recorder, None
        with _OPEN_LOCK:
            if _OPEN.get(recorder.writer.url) is self:
                del _OPEN[recorder.writer.url]
        recorder.close()

    def abort(self) -> None:
        """Keep what was recorded and release the store; the stage stays resumable."""
        self.close()
        self._reset_stage()

    # -- stages ------------------------------------------------------------------------------

    def _model_views(
        self,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Trainable parameters, frozen parameters and buffers, by name.

        Trainable means updated by the optimizer: in one of its groups *and* requiring grad (a
        parameter handed to the optimizer but frozen never moves).
        """
        trainable_ids = {
            id(p) for g in self._optimizer.param_groups for p in g["params"] if p.requires_grad
        }
        trainable, frozen = {}, {}
        for name, param in self._model.named_parameters():
            (trainable if id(param) in trainable_ids else frozen)[name] = param
        return trainable, frozen, persistent_buffers(self._model)

    def _identity(self) -> dict[str, str]:
        """Tensor names of the model -> the last recorded stage's names for the same objects."""
        alive = ((name, ref()) for name, ref in self._previous_tensors.items())
        previous = {id(t): name for name, t in alive if t is not None}
        current = {**dict(self._model.named_parameters()), **persistent_buffers(self._model)}
        return {name: previous[id(t)] for name, t in current.items() if id(t) in previous}

    def _optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return optimizer_state_by_name(self._optimizer, self._names, self._rule)

    def start(self, ranks: Ranks, setup: StageSetup) -> None:
        """Begin a new stage, or continue the one a loaded state was saved in.

        See :meth:`load_state_dict`.
        """
        self._model, self._optimizer = setup.model, setup.optimizer
        self._divides_loss_by = setup.divides_loss_by
        scaler = setup.loss_scaler
        self._loss_scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self._names = {id(p): n for n, p in setup.model.named_parameters()}
        description = describe_optimizer(setup.optimizer, self._names)
        self._rule = description.update_rule
        if self._rule is UpdateRule.UNKNOWN and ranks.is_main:
            warnings.warn(
                f"{self.adapter}: the analysis has no model of {description.class_name}; it is "
                "recorded as 'unknown' and analyze() will need an explicit optimizer_model=.",
                stacklevel=3,
            )
        if self._resume is not None:
            self._resume_stage(ranks, setup)
        else:
            self._begin_stage(ranks, setup, description)
        self.active = True

    def _begin_stage(self, ranks: Ranks, setup: StageSetup, description: OptimizerRecord) -> None:
        trainable, frozen, buffers = self._model_views()
        error, recorded = None, None
        if self.recorder is not None:
            num_examples = dataset_length(setup.dataset)
            if num_examples is None:
                warnings.warn(
                    f"{self.adapter} could not determine the training set's size (not a "
                    "map-style dataset); analyze() will not be able to attribute this stage.",
                    stacklevel=4,
                )
            name = self._next_name or f"stage-{len(self.recorder.writer.stages)}"
            self._choose_probe(setup, name)
            probe = self._take_probe(name)
            estimated = setup.estimated_steps
            template = schema.Stage(
                index=-1,
                name=name,
                status=schema.STAGE_RECORDING,
                first_step=-1,
                last_step=None,
                planned_checkpoints=[],
                num_examples=num_examples,
                fingerprint=None if num_examples is None else dataset_fingerprint(setup.dataset),
                batch_size=setup.batch_size,
                accumulate_grad_batches=setup.accumulate_grad_batches,
                world_size=setup.world_size,
                precision=setup.precision,
                estimated_steps=float(estimated)
                if estimated is not None and math.isfinite(estimated)
                else None,
                checkpoints_per_stage=self.checkpoints_per_stage,
                optimizer=description,
                trainable=list(trainable),
                frozen=list(frozen),
                manifest=model_manifest(setup.model),
                probe=self._probe_reason,
                recorded_by=setup.recorded_by,
            )
            try:
                recorded = self.recorder.begin_stage(
                    template,
                    frozen,
                    trainable,
                    buffers,
                    self._optimizer_state(),
                    identity=self._identity(),
                    renamed=self._renamed,
                    probe=probe,
                )
                if num_examples is not None:
                    self.recorder.digest_examples(setup.dataset)
            except errors.StoreError as exc:
                error = exc
        elif self._shard_recorder is not None:  # the probe's forward passes are collectives
            self._choose_probe(setup, self._next_name or "")
            self._take_probe("")
        raise_on_all_ranks(ranks, error)
        summary = None
        if recorded is not None:
            planned = sorted(self.recorder.planned)
            summary = (recorded.index, recorded.name, recorded.first_step, planned)
        self._stage_index, self._stage_name, self._first_step, planned = ranks.broadcast(summary)
        self._planned = frozenset(planned)
        if self._sharded:
            error = None
            if self._shard_recorder is not None:
                shard_recorder = self._shard_recorder
                shard_recorder.follow_stage(self._stage_index, self._first_step, self._planned)
                try:
                    shard_recorder.write_stage_start(
                        frozen, trainable, buffers, self._optimizer_state()
                    )
                except errors.StoreError as exc:
                    error = exc
            raise_on_any_rank(error)
        self._next_name = self._renamed = None
        self._origin = setup.global_step
        self._rows_in_stage = 0

    def _resume_stage(self, ranks: Ranks, setup: StageSetup) -> None:
        state, self._resume = self._resume, None
        error = None
        if self.recorder is not None:
            try:
                stages = self.recorder.writer.stages
                index = state["stage_index"]
                if index >= len(stages) or stages[index].name != state["stage_name"]:
                    raise errors.StoreError(
                        f"the checkpoint being resumed recorded stage {state['stage_name']!r} "
                        f"into {state['store']}, which {self.url} does not hold. Resume with "
                        f"{self.adapter} pointing at the store the run was recorded into."
                    )
                self.recorder.resume_stage(index, state["first_step"] + state["rows_in_stage"])
                if stages[index].probe is None:  # the same examples: they depend on N_s only
                    self._choose_probe(setup, stages[index].name)
                if dataset_length(setup.dataset) is not None:
                    self.recorder.digest_examples(setup.dataset)
            except errors.StoreError as exc:
                error = exc
        elif self._shard_recorder is not None:
            self._choose_probe(setup, state["stage_name"])
        raise_on_all_ranks(ranks, error)
        planned = sorted(self.recorder.planned) if self.recorder is not None else None
        self._planned = frozenset(ranks.broadcast(planned))
        next_step = state["first_step"] + state["rows_in_stage"]
        if self._shard_recorder is not None:
            self._shard_recorder.follow_stage(state["stage_index"], next_step, self._planned)
        self._stage_index = state["stage_index"]
        self._stage_name = state["stage_name"]
        self._first_step = state["first_step"]
        self._origin = state["origin"]
        self._rows_in_stage = state["rows_in_stage"]

    def end(self, ranks: Ranks) -> None:
        """Close the stage with its stage-end checkpoint (a no-op when none is active)."""
        if not self.active:
            return
        if self._unmodelled and self._clipping is not None and ranks.is_main:
            clipping = self._clipping
            warnings.warn(
                f"{self.adapter}: gradient clipping ({clipping.kind} at {clipping.limit:g}) "
                f"changed the gradients of {self._unmodelled} of the {self._clip_steps} "
                f"optimizer steps of stage {self._stage_name!r} in this process by a factor it "
                "could not measure. The analysis takes those steps at their recorded rates, "
                "though they moved less, and the scores and stage effects come out larger "
                "('Gradient clipping' in docs/limitations.md).",
                stacklevel=3,
            )
        error = None
        if self._checkpointer is not None:
            trainable, frozen, buffers = self._model_views()
            try:
                recorder = self.recorder
                if recorder is not None:

                    def probe() -> dict[str, torch.Tensor] | None:
                        taken = self._take_probe(self._stage_name)
                        if self._probe_reason is not None:  # probing stopped, or never started
                            recorder.note_no_probe(self._probe_reason)
                        return taken

                    recorder.end_stage(trainable, buffers, self._optimizer_state(), probe)
                    self._warn_notes()
                else:  # another rank of a sharded run: its shards of the stage-end checkpoint
                    self._take_probe(self._stage_name)  # a collective in sharded models
                    self._checkpointer.checkpoint(
                        self._first_step + self._rows_in_stage,
                        schema.ROLE_END,
                        trainable,
                        buffers,
                        self._optimizer_state(),
                    )
                    self._checkpointer.wait()
            except errors.StoreError as exc:
                error = exc
            # The next stage's tensors are matched to these by identity where they are the same.
            # Not sharded ones, by name only: FSDP2 moves a module's parameters by swapping
            # their contents (torch.utils.swap_tensors), which a weak reference forbids.
            self._previous_tensors = {
                name: weakref.ref(t)
                for name, t in {**trainable, **frozen, **buffers}.items()
                if not is_sharded(t)
            }
        self._reset_stage()
        if self._sharded:
            raise_on_any_rank(error)
        else:
            raise_on_all_ranks(ranks, error)

    # -- the probe ---------------------------------------------------------------------------

    def _choose_probe(self, setup: StageSetup, stage_name: str) -> None:
        """Pick the stage's probed examples, or warn why there are none (``_no_probe``)."""
        if setup.probe_losses is None:
            reason = setup.no_probe or f"{setup.recorded_by} gives no per-example loss"
            self._no_probe(stage_name, reason)
            return
        dataset = setup.dataset
        size = dataset_length(dataset)
        if not size:
            self._no_probe(stage_name, "the training set has no length or no examples")
            return
        indices = probe_indices(size)
        try:
            unstable = any(
                example_digest(dataset[i]) != example_digest(dataset[i]) for i in indices
            )
        except Exception as exc:
            self._no_probe(stage_name, f"its probed examples cannot be read ({exc!r})")
            return
        if unstable:
            self._no_probe(stage_name, "its examples change between reads (random transforms?)")
            return
        self._probe = (indices, setup.probe_losses)

    def _no_probe(self, stage_name: str, reason: str) -> None:
        self._probe, self._probe_reason = None, reason
        if self.recorder is None:  # another rank of a sharded run: rank 0 warns
            return
        warnings.warn(
            f"{self.adapter} records no probe losses for stage {stage_name!r} from here on: "
            f"{reason}. analyze() and retrain() will skip their check that the model and data "
            "they are given reproduce the training loss ('The probe' in docs/recording.md).",
            stacklevel=5,
        )

    def _take_probe(self, stage_name: str) -> dict[str, torch.Tensor] | None:
        """The probe at the current parameters: its indices and training losses."""
        if self._probe is None:
            return None
        indices, losses = self._probe
        try:
            return probe_tensors(indices, losses(indices))
        except ProbeUnavailable as exc:
            self._no_probe(stage_name, str(exc))
            return None

    # -- steps -------------------------------------------------------------------------------

    def before_step(self, global_step: int) -> None:
        """Take the checkpoint planned before the step after ``global_step`` completed steps.

        Called before the step's first micro-batch, which sees θ_t, the buffers and the
        optimizer state after step t-1: the state "before step t" (later, the step's forward
        pass may have changed buffers such as batch-norm statistics).
        """
        recorder = self._checkpointer
        if recorder is None or not self.active:
            return
        step = self._first_step + global_step - self._origin
        if step in self._planned and step not in self._checkpointed:
            self._checkpointed.add(step)
            trainable, _, buffers = self._model_views()
            probe = self._take_probe(self._stage_name)
            recorder.checkpoint(
                step, schema.ROLE_INTERIOR, trainable, buffers, self._optimizer_state(), probe
            )

    def optimizer_step(
        self,
        optimizer: torch.optim.Optimizer,
        clipping: GradientClipping | None = None,
        before: GradientNorms | None = None,
    ) -> None:
        """Right before ``optimizer`` steps: its hyperparameters are the ones this step uses.

        Schedulers step after the optimizer, and user code that sets the rate before the step
        has run by now. An optimizer other than the stage's (unwrapped) one is ignored. With
        ``clipping`` (the framework's), the factor it scales the step's gradients by goes into
        the step's row (``scale``); ``before`` are the gradients measured when the backward
        pass ended, for a framework that has clipped them by now (:meth:`GradientClipping.scale`;
        the loss scaler's scale is divided out here). A step clipping changed by a factor not
        known here is counted, and the stage's end warns.
        """
        if self.active and optimizer is self._optimizer:
            self._hyper = [step_hyperparameters(g) for g in self._optimizer.param_groups]
            if self._loss_scaler is not None:
                self._scale_before = float(self._loss_scaler.get_scale())
                if before is not None:  # measured on the gradients of the scaled loss
                    before = before.divided_by(self._scale_before)
            if clipping is not None:
                params = [p for g in self._optimizer.param_groups for p in g["params"]]
                self._clip_scale = clipping.scale(params, before)
                self._clipping = clipping

    def add_batch(
        self, loss: torch.Tensor | None, examples: int | None, *, summed: bool = False
    ) -> None:
        """Count one (micro-)batch of the current step.

        Parameters
        ----------
        loss
            The batch's training loss (a scalar tensor; ``None`` when unknown).
        examples
            Examples in the batch over all processes (``None`` when unknown: the step's count
            is then recorded as -1).
        summed
            The loss is the batch's share of the step's loss (the framework normalises by the
            step's total, so the step's loss is the sum of its batches'); otherwise the step's
            loss is the mean of its batches'.
        """
        if not self.active:
            return
        if isinstance(loss, torch.Tensor):
            # Tensor arithmetic costs microseconds per step (a division ~30 us on CPU): none
            # for the usual one batch per step.
            loss = loss.detach()
            self._loss_sum = loss if not self._loss_count else self._loss_sum + loss
            self._loss_count += 1
            self._loss_summed = summed
        self._batches += 1
        if examples is None:
            self._examples = -1
        elif self._examples >= 0:
            self._examples += examples

    def _warn_notes(self) -> None:
        """Raise, from the adapter's hook, what the recorder's background checks found."""
        if self.recorder is not None:
            for note in self.recorder.notes():
                warnings.warn(f"{self.adapter}: {note}", UserWarning, stacklevel=3)

    def _skipped(self) -> bool:
        """Whether the loss scaler skipped the step just taken (its scale fell during it)."""
        before, self._scale_before = self._scale_before, None
        return before is not None and float(self._loss_scaler.get_scale()) < before

    def finish_steps(self, global_step: int, epoch: int) -> None:
        """Emit a row for each optimizer step completed since the last row."""
        if not self.active:
            return
        while self._rows_in_stage < global_step - self._origin and self._hyper is not None:
            loss = self._loss_sum
            if not self._loss_count:
                loss = float("nan")
            elif not self._loss_summed and self._loss_count > 1:
                loss = loss / self._loss_count
            # A window of fewer micro-batches than the framework divided their losses by
            window = min(1.0, self._batches / self._divides_loss_by) if self._batches else 1.0
            scale = self._clip_scale * window
            if self._skipped():
                scale = 0.0  # the optimizer did not step: no rate, no decay (STEP_SCALE)
            elif self._clipping is not None:
                self._unmodelled += math.isnan(scale)
                self._clip_steps += 1
            row = StepRow(
                stage=self._stage_index,
                epoch=epoch,
                loss=loss,
                examples=self._examples,
                groups=self._hyper,
                scale=scale,
            )
            if self.recorder is not None:
                self.recorder.record_step(row)
            self._rows_in_stage += 1
            self._loss_sum, self._loss_count, self._examples = 0.0, 0, 0
            self._clip_scale, self._batches = 1.0, 0
        self._warn_notes()
        recorder = self._checkpointer
        if not self._prepared and recorder is not None and self._rows_in_stage:
            self._prepared = True
            trainable, _, buffers = self._model_views()
            recorder.prepare_checkpoints(trainable, buffers, self._optimizer_state())

    # -- resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the record stands, saved with the framework's checkpoint.

        ``{}`` between stages. Everything it vouches for is written before it returns.
        """
        if not self.active:
            return {}
        if self._checkpointer is not None:
            self._checkpointer.wait()
        return {
            "version": STATE_VERSION,
            "store": self.url,
            "stage_index": self._stage_index,
            "stage_name": self._stage_name,
            "first_step": self._first_step,
            "origin": self._origin,
            "rows_in_stage": self._rows_in_stage,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue, at the next :meth:`start`, the stage ``state`` was saved in."""
        if state.get("version") != STATE_VERSION:
            raise errors.SourceCallbackError(
                f"this checkpoint's {self.adapter} state has version {state.get('version')!r}; "
                f"this source-callback reads version {STATE_VERSION}."
            )
        self._resume = dict(state)


class RecordingCallback:
    """What every framework adapter's callback offers: its session, ``next_stage``, ``url``.

    The adapters (:class:`~source_callback.SourceCallback`,
    :class:`~source_callback.SourceTrainerCallback`) document the constructor's parameters
    in their own terms and call the session from their framework's hooks.
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | None = None,
        *,
        stage: str | None = None,
        checkpoints_per_stage: int = 6,
        storage_options: dict[str, Any] | None = None,
        flush_every: int = 256,
        renamed: dict[str, str | None] | None = None,
    ) -> None:
        self._session = RecordingSession(
            store,
            stage=stage,
            checkpoints_per_stage=checkpoints_per_stage,
            storage_options=storage_options,
            flush_every=flush_every,
            renamed=renamed,
            adapter=type(self).__name__,
        )

    def next_stage(self, name: str, *, renamed: dict[str, str | None] | None = None) -> None:
        """Name the stage that the next training run (``fit()``, ``train()``) records.

        The next stage's model may differ from the last one's: wrapped (``get_peft_model``,
        ``torch.compile``), with tensors added (adapters, a new head) or dropped. Its tensors
        are matched to the previous stage's by object identity (when this callback recorded
        that stage), by name, and by name without wrapper components (``base_model.model``,
        ``_orig_mod``, ``base_layer``); see :mod:`source_callback.lineage`.

        Parameters
        ----------
        name
            The stage's name, unique in the store.
        renamed
            Matches the rules cannot make or would make wrongly: a tensor name of the new
            model -> the previous stage's name, or ``None`` for a tensor that is new (e.g. a
            re-initialised head of the same name).
        """
        self._session.next_stage(name, renamed)

    @property
    def store(self) -> str | None:
        """The store given to the constructor (normalised), ``None`` for the default."""
        return self._session.store

    @property
    def url(self) -> str | None:
        """The store's location once training has started."""
        return self._session.url
