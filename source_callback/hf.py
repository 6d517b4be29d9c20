"""``SourceTrainerCallback``: the Hugging Face ``Trainer`` adapter over the recording session.

The same store, stage for stage, as :class:`~source_callback.lightning.SourceCallback` records
from Lightning (the framework-free part is :mod:`source_callback.record.session`); TRL's
trainers are ``Trainer`` subclasses and are recorded the same way (see "Recording a Hugging
Face Trainer run" in the docs for what each needs at analysis time).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import nn
from torch.utils.data import default_collate
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from source_callback import errors
from source_callback.optim import GradientClipping
from source_callback.record.grad_norms import BackwardEndNorms
from source_callback.record.probe import ProbeUnavailable, probing
from source_callback.record.session import (
    RecordingCallback,
    StageSetup,
    TorchRanks,
    sharded_parameters,
)

DEFAULT_STORE_NAME = "source.zarr"
#: TRL's argument classes of trainers whose loss is not a per-example loss of the trained model
#: alone (preference pairs through a reference model, generated samples, reward models).
REFUSED_CONFIGS = (
    "DPOConfig",
    "KTOConfig",
    "ORPOConfig",
    "CPOConfig",
    "BCOConfig",
    "RewardConfig",
    "GRPOConfig",
    "RLOOConfig",
    "PPOConfig",
    "OnlineDPOConfig",
)
#: Keys of a batch whose first dimension counts the examples, in order of preference.
_BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")


def model_losses(
    model: nn.Module,
    dataset: Any,
    indices: Sequence[int],
    collate_fn: Callable[[list[Any]], Any] | None,
    device: torch.device,
) -> list[float]:
    """The loss the model itself returns (``model(**batch).loss``) for each example alone.

    This is the ``Trainer``'s training loss without a ``compute_loss`` override, label
    smoothing or ``compute_loss_func``: each example is collated into a batch of one with the
    Trainer's data collator and passed to the model in eval mode, without gradients, with the
    random generators seeded and then restored.

    Raises
    ------
    ProbeUnavailable
        The model returns no scalar loss for a batch of one (no labels in the batch), or fails.
    """
    collate = collate_fn or default_collate
    losses = []
    with probing(model):
        for index in indices:
            try:
                batch = send_to_device(collate([dataset[index]]), device)
                out = model(**batch)
            except Exception as exc:
                raise ProbeUnavailable(
                    f"the model failed on a batch of example {index} alone ({exc!r})"
                ) from exc
            loss = _loss_of(out)
            if loss is None or loss.numel() != 1:
                raise ProbeUnavailable(
                    "the model returns no loss for a batch of one example (the collated batch "
                    "has no 'labels'?)"
                )
            losses.append(float(loss.detach().double()))
    return losses


def _loss_of(output: Any) -> torch.Tensor | None:
    """A model output's ``loss`` (a ``ModelOutput``, a dict, or ``None``)."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def _examples_in(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
    """Examples in a forward call's batch: the first dimension of its inputs."""
    candidates = [kwargs.get(key) for key in _BATCH_KEYS] + list(args)
    for value in candidates:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def _precision(args: TrainingArguments, model: nn.Module, loss_scaler: Any) -> str:
    """The run's precision in Lightning's words (what :func:`~source_callback.retrain` takes).

    ``fp16`` is mixed precision where accelerate gave the optimizer a ``loss_scaler``; on a CPU
    it gives none and trains in the parameters' own precision.
    """
    if args.bf16:
        return "bf16-mixed"
    if args.fp16 and loss_scaler is not None:
        return "16-mixed"
    dtype = next((p.dtype for p in model.parameters() if p.requires_grad), torch.float32)
    return {torch.bfloat16: "bf16-true", torch.float16: "16-true"}.get(dtype, "32-true")


class SourceTrainerCallback(RecordingCallback, TrainerCallback, ExportableState):
    """Record everything SOURCE needs from a (multi-stage) Hugging Face ``Trainer`` run.

    Each ``trainer.train()`` records one *stage* into the same store format as
    :class:`~source_callback.SourceCallback`: the learning rate and hyperparameters each
    optimizer step used, each step's loss and examples, the optimizer, the training set's size
    and fingerprint, gradient accumulation, world size, and checkpoints (parameters, buffers and
    the optimizer state the analysis needs) at the stage's start, at evenly spaced interior
    steps and at its end. Works for ``Trainer`` subclasses such as TRL's ``SFTTrainer``.
    Nothing about the run changes: the callback only reads.

    Under DDP (``torchrun``, ``accelerate launch``) only global rank 0 writes. The callback's
    place in the record is saved in every Trainer checkpoint (``trainer_state.json``), so
    ``trainer.train(resume_from_checkpoint=...)`` continues the stage exactly.

    Parameters
    ----------
    store
        Where to record: a local path or an fsspec URL (``s3://bucket/run.zarr``,
        ``memory://run.zarr``). Defaults to ``<args.output_dir>/source.zarr``.
    stage
        Name of the next stage (unique in the store). Defaults to ``stage-<index>``. Use
        :meth:`next_stage` to name later stages when reusing the callback object.
    checkpoints_per_stage
        The stage is cut into this many equal parts by optimizer steps; the parameters are saved
        at the start of each part and at the stage's end.
    storage_options
        Passed to fsspec for URLs (credentials, ``endpoint_url``, ...). Never saved in Trainer
        checkpoints.
    flush_every
        Step rows buffered in memory before a block is appended to the store.
    renamed
        For the first stage this callback records into a store that already holds stages:
        which tensors of the model continue which of the previous stage's, where the matching
        rules cannot tell (see :meth:`next_stage`).

    Examples
    --------
    >>> from transformers import Trainer, TrainingArguments
    >>> callback = SourceTrainerCallback("runs/exp.zarr", stage="pretrain")
    >>> trainer = Trainer(model, args, train_dataset=data, callbacks=[callback])  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> callback.next_stage("sft")  # doctest: +SKIP
    >>> Trainer(model, args, train_dataset=sft, callbacks=[callback]).train()  # doctest: +SKIP

    """

    _hook: torch.utils.hooks.RemovableHandle | None = None
    _norms: BackwardEndNorms | None = None
    _epoch = 0
    _loss_scale = 1
    _world_size = 1

    # -- resume ------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What ``Trainer`` saves in ``trainer_state.json`` with every checkpoint.

        ``record`` is where the record stands (the steps it vouches for are written before this
        returns); ``args`` rebuild the callback when ``restore_callback_states_from_checkpoint``
        is set (without ``storage_options``, which may hold credentials).
        """
        session = self._session
        return {
            "args": {
                "store": session.url or session.store,
                "checkpoints_per_stage": session.checkpoints_per_stage,
                "flush_every": session.flush_every,
            },
            "attributes": {},
            "record": session.state_dict(),
        }

    def _saved_record(self, state: TrainerState) -> dict[str, Any] | None:
        """The record state of the checkpoint being resumed, if this is a resume."""
        if state.global_step == 0:  # a fresh train(): the entry is this callback's own state
            return None
        entry = state.stateful_callbacks.get(type(self).__name__)
        if isinstance(entry, list):  # several callbacks of this class: the first is this one
            entry = entry[0] if entry else None
        record = entry.get("record") if isinstance(entry, dict) else None
        return record or None

    # -- stages ------------------------------------------------------------------------------

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        self._check_supported(args, model)
        self._release()  # what a train() that raised left open
        record = self._saved_record(state)
        if record is not None:
            self._session.load_state_dict(record)
        ranks = TorchRanks(state.is_world_process_zero)
        self._session.open(os.path.join(args.output_dir, DEFAULT_STORE_NAME), ranks)
        torch_optimizer = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(torch_optimizer, torch.optim.Optimizer):
            raise errors.SourceCallbackError(
                f"SourceTrainerCallback needs the Trainer's PyTorch optimizer; it got "
                f"{type(optimizer).__name__}."
            )
        dataset = getattr(train_dataloader, "dataset", None)
        collate_fn = getattr(train_dataloader, "collate_fn", None)
        device = args.device

        def probe_losses(indices: Sequence[int]) -> list[float]:
            return model_losses(model, dataset, indices, collate_fn, device)

        loss_scaler = getattr(optimizer, "scaler", None)  # accelerate's, with fp16
        setup = StageSetup(
            model=model,
            optimizer=torch_optimizer,
            dataset=dataset,
            batch_size=args.per_device_train_batch_size,
            accumulate_grad_batches=args.gradient_accumulation_steps,
            world_size=args.world_size,
            precision=_precision(args, model, loss_scaler),
            estimated_steps=float(state.max_steps - state.global_step)
            if state.max_steps > 0
            else None,
            global_step=state.global_step,
            probe_losses=None if args.label_smoothing_factor else probe_losses,
            recorded_by="transformers",
            loss_scaler=loss_scaler,
            no_probe="the Trainer's loss with label smoothing (label_smoothing_factor) is not "
            "the model's own per-example loss"
            if args.label_smoothing_factor
            else None,
        )
        self._session.start(ranks, setup)
        # With num_items_in_batch averaged over processes, the Trainer multiplies the model's
        # loss by the number of processes (Trainer.compute_loss).
        self._loss_scale = args.world_size if args.average_tokens_across_devices else 1
        self._world_size = args.world_size
        self._epoch = int(state.epoch or 0)
        self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        if args.max_grad_norm and args.max_grad_norm > 0:
            self._norms = BackwardEndNorms(model)

    @staticmethod
    def _check_supported(args: TrainingArguments, model: nn.Module | None) -> None:
        refused = [c.__name__ for c in type(args).__mro__ if c.__name__ in REFUSED_CONFIGS]
        if refused:
            raise errors.SourceCallbackError(
                f"SourceTrainerCallback does not record runs configured by TRL's {refused[0]}: "
                "SOURCE attributes a stage through a per-example training loss of the trained "
                "model alone, and this trainer's loss is not one (DPO's compares a chosen and a "
                "rejected completion through a frozen reference model's log-probabilities; "
                "online methods train on generated samples). source-callback has no Task for it, "
                "so analyze() could not attribute the stage. Record the SFT stages "
                "(Trainer, SFTTrainer) and train this stage without the callback."
            )
        if args.load_best_model_at_end:
            raise errors.SourceCallbackError(
                "SourceTrainerCallback cannot record a run with load_best_model_at_end=True: the "
                "Trainer replaces the trained parameters by an earlier checkpoint's before the "
                "stage ends, so the stage's record would not end at the model it trained. Set "
                "load_best_model_at_end=False (and load the best checkpoint yourself afterwards) "
                "or remove the callback."
            )
        sharded = [] if model is None else sharded_parameters(model)
        if args.fsdp or args.deepspeed or sharded:
            found = f", e.g. {sharded[0]!r} is a sharded DTensor" if sharded else ""
            raise errors.SourceCallbackError(
                "SourceTrainerCallback records single-process and DDP runs; FSDP, DeepSpeed and "
                f"fully_shard shard the parameters and optimizer state{found}, which it does "
                "not record yet (SourceCallback records FSDP2 runs under Lightning). Record with "
                "DDP or on a single device, or train this run without the callback."
            )

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._epoch = int(state.epoch or 0)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        try:
            self._session.end(TorchRanks(state.is_world_process_zero))
        finally:
            self._release()

    def close(self) -> None:
        """Write the buffered step rows and release the store.

        The ``Trainer`` tells callbacks nothing when ``train()`` raises: the stage then stays
        ``recording`` (resumable from the last Trainer checkpoint) and the rows of its last
        steps wait in memory. The next ``train()`` with this callback, or with any callback
        recording into the same store in this process, closes it first; call this to read
        the store in between.
        """
        self._release()

    def _release(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._norms is not None:
            self._norms.remove()
            self._norms = None
        self._session.abort()

    # -- steps -------------------------------------------------------------------------------

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._session.before_step(state.global_step)

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        # The scheduler steps after the optimizer: these are the values this step uses. The
        # Trainer has clipped the gradients by now; the norms say by how much.
        clipping, before = None, None
        if self._norms is not None:
            clipping = GradientClipping(float(args.max_grad_norm), "norm", applied=True)
            before = self._norms.take()
        self._session.optimizer_step(getattr(optimizer, "optimizer", optimizer), clipping, before)

    def _on_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        """Count a training forward pass (training mode, with gradients): its loss and size."""
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation, generation, or the probe
        loss = _loss_of(output)
        summed = kwargs.get("num_items_in_batch") is not None
        if loss is not None and summed and self._loss_scale != 1:
            loss = loss.detach() * self._loss_scale
        examples = _examples_in(args, kwargs)
        examples = None if examples is None else examples * self._world_size
        self._session.add_batch(loss, examples, summed=summed)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._session.finish_steps(state.global_step, self._epoch)
