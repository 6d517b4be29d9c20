"""``SourceCallback``: the Lightning adapter over the framework-free :class:`Recorder`."""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size
from torch.utils.data import default_collate

from source_callback import errors
from source_callback.fingerprint import dataset_fingerprint, example_digest
from source_callback.manifest import model_manifest, persistent_buffers
from source_callback.optim import (
    OptimizerRecord,
    UpdateRule,
    describe_optimizer,
    optimizer_state_by_name,
)
from source_callback.record.probe import preserved_rng, probe_indices, probe_tensors
from source_callback.record.recorder import Recorder, step_hyperparameters
from source_callback.store import location, schema
from source_callback.store.writer import StepRow, StoreWriter

DEFAULT_STORE_NAME = "source.zarr"
_STATE_VERSION = 1


def _raise_on_all_ranks(trainer: pl.Trainer, error: Exception | None) -> None:
    """Broadcast rank 0's error (or its absence) and raise it on every rank.

    Only rank 0 touches the store; raising there alone would leave the other ranks waiting in
    their next collective.
    """
    payload = None if error is None else (type(error).__name__, str(error))
    payload = trainer.strategy.broadcast(payload, src=0)
    if payload is None:
        return
    if error is not None:
        raise error
    kind = getattr(errors, payload[0], None)
    raise (kind if isinstance(kind, type) else errors.SourceCallbackError)(payload[1])


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


class ProbeUnavailable(Exception):
    """``training_step`` cannot give the probe's losses; the message says why."""


@contextmanager
def _probing(module: pl.LightningModule) -> Iterator[None]:
    """Eval mode, no gradients, ``self.log`` silenced, the generators and buffers preserved.

    ``training_step`` may update buffers (a batch counter, a running average): their values
    are put back, so that the probe leaves the model as training left it.
    """
    modes = [(m, m.training) for m in module.modules()]
    buffers = [(name, b, b.clone()) for name, b in module.named_buffers()]
    module.eval()
    module.log = module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        with torch.no_grad(), preserved_rng():
            yield
    finally:
        del module.log, module.log_dict
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for name, original, value in buffers:
                original.copy_(value)
                owner, _, attribute = name.rpartition(".")
                setattr(module.get_submodule(owner), attribute, original)


def training_step_losses(
    module: pl.LightningModule,
    dataset: Any,
    indices: Sequence[int],
    collate_fn: Callable[[list[Any]], Any] | None,
    device: torch.device,
    convert_input: Callable[[Any], Any] | None = None,
) -> list[float]:
    """The loss ``module.training_step`` returns for each example of ``indices`` alone.

    Each example is collated into a batch of one, put on ``device`` through the module's batch
    transfer hooks, and passed to ``training_step(batch, 0)`` in eval mode (dropout off,
    batch-norm running statistics), without gradients, with ``self.log`` silenced and the
    random generators seeded and then restored, so that training continues exactly as it
    would have. ``convert_input`` (the trainer's precision plugin's) casts the batch as
    training does under ``16-true``/``bf16-true``; no autocast is applied. The same
    computation serves recording and :func:`~source_callback.retrain`.

    Raises
    ------
    ProbeUnavailable
        Manual optimization (``training_step`` steps the optimizer itself), a
        ``training_step`` that returns no scalar loss, or one that fails on a batch of one.
    """
    if not module.automatic_optimization:
        raise ProbeUnavailable(
            "the module uses manual optimization (its training_step steps the optimizer)"
        )
    collate = collate_fn or default_collate
    losses = []
    with _probing(module):
        for index in indices:
            try:
                batch = module.on_before_batch_transfer(collate([dataset[index]]), 0)
                batch = module.transfer_batch_to_device(batch, device, 0)
                batch = module.on_after_batch_transfer(batch, 0)
                if convert_input is not None:
                    batch = convert_input(batch)
                out = module.training_step(batch, 0)
            except Exception as exc:
                raise ProbeUnavailable(
                    f"training_step failed on a batch of example {index} alone ({exc!r})"
                ) from exc
            loss = out.get("loss") if isinstance(out, dict) else out
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ProbeUnavailable(
                    f"training_step returned {type(out).__name__}, not a scalar loss tensor "
                    "(or a dict with one under 'loss')"
                )
            losses.append(float(loss.detach().double()))
    return losses


class SourceCallback(Callback):
    """Record everything SOURCE needs from a (multi-stage) Lightning training run.

    Each ``trainer.fit()`` records one *stage*: the learning rate and optimizer hyperparameters
    used at every optimizer step, the loss and number of examples of each step, the optimizer's
    description, the training set's size and fingerprint, and checkpoints (parameters, buffers
    and the optimizer state the analysis needs) at the stage's start, at evenly spaced interior
    steps, and at its end. Stages recorded into the same store form one run.

    Parameters
    ----------
    store
        Where to record: a local path or an fsspec URL (``s3://bucket/run.zarr``,
        ``memory://run.zarr``). Defaults to ``<trainer.default_root_dir>/source.zarr``.
    stage
        Name of the next stage (unique in the store). Defaults to ``stage-<index>``. Use
        :meth:`next_stage` to name later stages when reusing the callback object.
    checkpoints_per_stage
        The stage is cut into this many equal parts by optimizer steps; the parameters are saved
        at the start of each part and at the stage's end (``checkpoints_per_stage + 1``
        checkpoints per stage).
    storage_options
        Passed to fsspec for URLs (credentials, ``endpoint_url``, ...).
    flush_every
        Step rows buffered in memory before a block is appended to the store.
    renamed
        For the first stage this callback records into a store that already holds stages:
        which tensors of the model continue which of the previous stage's, where the matching
        rules cannot tell (see :meth:`next_stage`).

    Examples
    --------
    >>> from lightning.pytorch import Trainer
    >>> callback = SourceCallback("runs/exp.zarr", stage="pretrain")
    >>> trainer = Trainer(max_epochs=2, callbacks=[callback])  # doctest: +SKIP
    >>> trainer.fit(model, pretrain_data)  # doctest: +SKIP
    >>> callback.next_stage("sft")  # doctest: +SKIP
    >>> Trainer(max_epochs=1, callbacks=[callback]).fit(model, sft_data)  # doctest: +SKIP

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
        if not isinstance(checkpoints_per_stage, int) or checkpoints_per_stage < 1:
            raise ValueError(
                f"checkpoints_per_stage must be a positive integer, got {checkpoints_per_stage!r}"
            )
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be a positive integer, got {flush_every!r}")
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError("storage_options must be a dict of fsspec options")
        self._validate_stage_name(stage)
        self._validate_renamed(renamed)
        self.store = None if store is None else location.normalize(store)
        self.storage_options = storage_options
        self.checkpoints_per_stage = checkpoints_per_stage
        self.flush_every = flush_every
        self._next_name = stage
        self._renamed = renamed
        self._previous_tensors: dict[str, weakref.ref[torch.Tensor]] = {}
        self._url: str | None = None
        self._recorder: Recorder | None = None
        self._resume: dict[str, Any] | None = None
        self._reset_stage()

    @staticmethod
    def _validate_stage_name(name: str | None) -> None:
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ValueError(f"a stage name must be a non-empty string, got {name!r}")

    @staticmethod
    def _validate_renamed(renamed: dict[str, str | None] | None) -> None:
        if renamed is not None and not (
            isinstance(renamed, dict)
            and all(
                isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in renamed.items()
            )
        ):
            raise TypeError(
                "renamed must map tensor names of the new stage's model to names in the "
                f"previous stage's model (or None for a new tensor), got {renamed!r}"
            )

    def _reset_stage(self) -> None:
        self._active = False
        self._stage_index = -1
        self._stage_name = ""
        self._first_step = 0
        self._origin = 0
        self._rows_in_stage = 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._rule = UpdateRule.UNKNOWN
        self._names: dict[int, str] = {}
        self._hyper: list[dict[str, float]] | None = None
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_count = 0
        self._examples = 0
        self._checkpointed: set[int] = set()
        self._probe: tuple[Any, list[int], Any] | None = None  # dataset, indices, collate_fn
        self._probe_reason: str | None = None  # why there is none

    # -- public API --------------------------------------------------------------------------

    def next_stage(self, name: str, *, renamed: dict[str, str | None] | None = None) -> None:
        """Name the stage that the next ``trainer.fit()`` records.

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
        self._validate_stage_name(name)
        self._validate_renamed(renamed)
        self._next_name = name
        self._renamed = renamed

    @property
    def url(self) -> str | None:
        """The store's location once a fit has started."""
        return self._url

    # -- setup and teardown ------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        url = self.store or location.normalize(
            os.path.join(trainer.default_root_dir, DEFAULT_STORE_NAME)
        )
        self._url = trainer.strategy.broadcast(url, src=0)
        error = None
        if trainer.is_global_zero and self._recorder is None:
            try:
                writer = StoreWriter.open(self._url, self.storage_options)
                self._recorder = Recorder(writer, flush_every=self.flush_every)
            except errors.StoreError as exc:
                error = exc
        _raise_on_all_ranks(trainer, error)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._recorder is None:
            return
        recorder, self._recorder = self._recorder, None
        recorder.close()

    # -- stages ------------------------------------------------------------------------------

    def _model_views(
        self, pl_module: pl.LightningModule
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Trainable parameters, frozen parameters and buffers, by name.

        Trainable means updated by the optimizer: in one of its groups *and* requiring grad (a
        parameter handed to the optimizer but frozen never moves).
        """
        trainable_ids = {
            id(p) for g in self._optimizer.param_groups for p in g["params"] if p.requires_grad
        }
        trainable, frozen = {}, {}
        for name, param in pl_module.named_parameters():
            (trainable if id(param) in trainable_ids else frozen)[name] = param
        return trainable, frozen, persistent_buffers(pl_module)

    def _identity(self, pl_module: pl.LightningModule) -> dict[str, str]:
        """Tensor names of ``pl_module`` -> the last recorded stage's names for the same objects."""
        alive = ((name, ref()) for name, ref in self._previous_tensors.items())
        previous = {id(t): name for name, t in alive if t is not None}
        current = {**dict(pl_module.named_parameters()), **persistent_buffers(pl_module)}
        return {name: previous[id(t)] for name, t in current.items() if id(t) in previous}

    def _optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return optimizer_state_by_name(self._optimizer, self._names, self._rule)

    # -- the probe ---------------------------------------------------------------------------

    def _choose_probe(self, trainer: pl.Trainer, stage_name: str) -> None:
        """Pick the stage's probed examples, or warn why there are none (``_no_probe``)."""
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        size = _length(dataset)
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
        self._probe = (dataset, indices, getattr(loader, "collate_fn", None))

    def _no_probe(self, stage_name: str, reason: str) -> None:
        self._probe, self._probe_reason = None, reason
        warnings.warn(
            f"SourceCallback records no probe losses for stage {stage_name!r} from here on: "
            f"{reason}. analyze() and retrain() will skip their check that the model and data "
            "they are given reproduce the training loss ('The probe' in docs/recording.md).",
            stacklevel=4,
        )

    def _take_probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage_name: str
    ) -> dict[str, torch.Tensor] | None:
        """The probe at the current parameters: its indices and ``training_step`` losses."""
        if self._probe is None:
            return None
        dataset, indices, collate_fn = self._probe
        try:
            losses = training_step_losses(
                pl_module,
                dataset,
                indices,
                collate_fn,
                trainer.strategy.root_device,
                trainer.precision_plugin.convert_input,
            )
        except ProbeUnavailable as exc:
            self._no_probe(stage_name, str(exc))
            return None
        return probe_tensors(indices, losses)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.optimizers:
            raise errors.SourceCallbackError(
                "SourceCallback needs an optimizer: configure_optimizers() returned none."
            )
        if len(trainer.optimizers) > 1:
            # Steps, checkpoints and the analysis all follow one update rule; recording one of
            # several optimizers would misclassify the others' parameters as frozen.
            raise errors.SourceCallbackError(
                f"SourceCallback records runs with one optimizer; configure_optimizers() "
                f"returned {len(trainer.optimizers)}. Remove the callback from this run, or "
                "train with a single optimizer (param groups can carry different settings)."
            )
        self._optimizer = trainer.optimizers[0]
        self._names = {id(p): n for n, p in pl_module.named_parameters()}
        description = describe_optimizer(self._optimizer, self._names)
        self._rule = description.update_rule
        if self._rule is UpdateRule.UNKNOWN and trainer.is_global_zero:
            warnings.warn(
                f"SourceCallback: the analysis has no model of {description.class_name}; it is "
                "recorded as 'unknown' and analyze() will need an explicit optimizer_model=.",
                stacklevel=2,
            )
        if self._resume is not None:
            self._resume_stage(trainer)
        else:
            self._begin_stage(trainer, pl_module, description)
        self._active = True

    def _begin_stage(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, description: OptimizerRecord
    ) -> None:
        trainable, frozen, buffers = self._model_views(pl_module)
        error, recorded = None, None
        if self._recorder is not None:
            loader = trainer.train_dataloader
            dataset = getattr(loader, "dataset", None)
            num_examples = _length(dataset)
            if num_examples is None:
                warnings.warn(
                    "SourceCallback could not determine the training set's size (not a "
                    "map-style dataset); analyze() will not be able to attribute this stage.",
                    stacklevel=3,
                )
            name = self._next_name or f"stage-{len(self._recorder.writer.stages)}"
            self._choose_probe(trainer, name)
            probe = self._take_probe(trainer, pl_module, name)
            template = schema.Stage(
                index=-1,
                name=name,
                status=schema.STAGE_RECORDING,
                first_step=-1,
                last_step=None,
                planned_checkpoints=[],
                num_examples=num_examples,
                fingerprint=None if num_examples is None else dataset_fingerprint(dataset),
                batch_size=getattr(loader, "batch_size", None),
                accumulate_grad_batches=trainer.accumulate_grad_batches,
                world_size=trainer.world_size,
                precision=str(trainer.precision),
                estimated_steps=_finite_or_none(trainer.estimated_stepping_batches),
                checkpoints_per_stage=self.checkpoints_per_stage,
                optimizer=description,
                trainable=list(trainable),
                frozen=list(frozen),
                manifest=model_manifest(pl_module),
                probe=self._probe_reason,
            )
            try:
                recorded = self._recorder.begin_stage(
                    template,
                    frozen,
                    trainable,
                    buffers,
                    self._optimizer_state(),
                    identity=self._identity(pl_module),
                    renamed=self._renamed,
                    probe=probe,
                )
                if num_examples is not None:
                    self._recorder.digest_examples(dataset)
            except errors.StoreError as exc:
                error = exc
        _raise_on_all_ranks(trainer, error)
        summary = None if recorded is None else (recorded.index, recorded.name, recorded.first_step)
        self._stage_index, self._stage_name, self._first_step = trainer.strategy.broadcast(summary)
        self._next_name = self._renamed = None
        self._origin = trainer.global_step
        self._rows_in_stage = 0

    def _resume_stage(self, trainer: pl.Trainer) -> None:
        state, self._resume = self._resume, None
        error = None
        if self._recorder is not None:
            try:
                stages = self._recorder.writer.stages
                index = state["stage_index"]
                if index >= len(stages) or stages[index].name != state["stage_name"]:
                    raise errors.StoreError(
                        f"the checkpoint being resumed recorded stage {state['stage_name']!r} "
                        f"into {state['store']}, which {self._url} does not hold. Resume with "
                        "SourceCallback pointing at the store the run was recorded into."
                    )
                self._recorder.resume_stage(index, state["first_step"] + state["rows_in_stage"])
                if stages[index].probe is None:  # the same examples: they depend on N_s only
                    self._choose_probe(trainer, stages[index].name)
                dataset = getattr(trainer.train_dataloader, "dataset", None)
                if _length(dataset) is not None:
                    self._recorder.digest_examples(dataset)
            except errors.StoreError as exc:
                error = exc
        _raise_on_all_ranks(trainer, error)
        self._stage_index = state["stage_index"]
        self._stage_name = state["stage_name"]
        self._first_step = state["first_step"]
        self._origin = state["origin"]
        self._rows_in_stage = state["rows_in_stage"]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        error = None
        if self._recorder is not None:
            trainable, frozen, buffers = self._model_views(pl_module)
            probe = self._take_probe(trainer, pl_module, self._stage_name)
            try:
                if self._probe_reason is not None:  # probing stopped, or never started
                    self._recorder.note_no_probe(self._probe_reason)
                self._recorder.end_stage(trainable, buffers, self._optimizer_state(), probe)
            except errors.StoreError as exc:
                error = exc
            # The next stage's tensors are matched to these by identity where they are the same.
            self._previous_tensors = {
                name: weakref.ref(t) for name, t in {**trainable, **frozen, **buffers}.items()
            }
        self._reset_stage()
        _raise_on_all_ranks(trainer, error)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Keep what was recorded so far; the stage stays 'recording' so that it can be resumed.
        if self._recorder is not None:
            recorder, self._recorder = self._recorder, None
            recorder.close()
        self._reset_stage()

    # -- steps -------------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._recorder is None or not self._active:
            return
        # The first micro-batch of step t sees θ_t, the buffers and optimizer state after step
        # t-1: the state "before step t". (In on_before_optimizer_step the forward pass of
        # step t would already have updated buffers such as batch-norm statistics.)
        step = self._first_step + trainer.global_step - self._origin
        if step in self._recorder.planned and step not in self._checkpointed:
            self._checkpointed.add(step)
            trainable, _, buffers = self._model_views(pl_module)
            probe = self._take_probe(trainer, pl_module, self._stage_name)
            self._recorder.checkpoint(
                step, schema.ROLE_INTERIOR, trainable, buffers, self._optimizer_state(), probe
            )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self._active and getattr(optimizer, "_optimizer", optimizer) is self._optimizer:
            # Schedulers step after the optimizer, and user code that sets the rate in
            # optimizer_step() has run by now: these are the values this step uses.
            self._hyper = [step_hyperparameters(g) for g in self._optimizer.param_groups]

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._active:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            if pl_module.automatic_optimization:
                loss = loss.detach() * trainer.accumulate_grad_batches  # undo Lightning's 1/k
            self._loss_sum = self._loss_sum + loss.detach()
            self._loss_count += 1
        try:
            if self._examples >= 0:  # -1: a batch of this step had no inferable size
                self._examples += extract_batch_size(batch) * trainer.world_size
        except Exception:
            self._examples = -1
        self._finish_steps(trainer)

    def _finish_steps(self, trainer: pl.Trainer) -> None:
        """Emit a row for each optimizer step completed since the last row."""
        while self._rows_in_stage < trainer.global_step - self._origin and self._hyper is not None:
            loss = self._loss_sum / self._loss_count if self._loss_count else float("nan")
            row = StepRow(
                stage=self._stage_index,
                epoch=trainer.current_epoch,
                loss=loss,
                examples=self._examples,
                groups=self._hyper,
            )
            if self._recorder is not None:
                self._recorder.record_step(row)
            self._rows_in_stage += 1
            self._loss_sum, self._loss_count, self._examples = 0.0, 0, 0

    # -- resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if not self._active:
            return {}
        if self._recorder is not None:
            # The Lightning checkpoint vouches for these rows: they must be in the store.
            self._recorder.wait()
        return {
            "version": _STATE_VERSION,
            "store": self._url,
            "stage_index": self._stage_index,
            "stage_name": self._stage_name,
            "first_step": self._first_step,
            "origin": self._origin,
            "rows_in_stage": self._rows_in_stage,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != _STATE_VERSION:
            raise errors.SourceCallbackError(
                f"this checkpoint's SourceCallback state has version {state_dict.get('version')!r}"
                f"; this source-callback reads version {_STATE_VERSION}."
            )
        self._resume = dict(state_dict)
