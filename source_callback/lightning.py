"""``SourceCallback``: the Lightning adapter over the framework-free :class:`Recorder`."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import strategies
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size
from torch.utils.data import default_collate

from source_callback import errors
from source_callback.optim import GradientClipping
from source_callback.record.probe import ProbeUnavailable, probing
from source_callback.record.session import (
    RecordingCallback,
    StageSetup,
    sharded_parameters,
    unrecordable_shards,
)

DEFAULT_STORE_NAME = "source.zarr"

#: Lightning strategies whose sharding is not recorded (looked up by name: a Lightning version
#: may lack one). FSDP1 and DeepSpeed keep flat shards of their own, and run on GPUs only.
UNRECORDED_STRATEGIES: tuple[type[strategies.Strategy], ...] = tuple(
    getattr(strategies, name)
    for name in ("FSDPStrategy", "DeepSpeedStrategy")
    if hasattr(strategies, name)
)


def check_sharding(strategy: strategies.Strategy, module: torch.nn.Module) -> bool:
    """Whether the run shards its parameters with FSDP2 (``fully_shard``), which is recorded.

    Depends only on the strategy's class and the parameters' types and layouts, which every
    rank shares, so every rank answers (or raises) the same and none is left waiting in a
    collective.

    Raises
    ------
    SourceCallbackError
        FSDP1 (``FSDPStrategy``) or DeepSpeed; a ``DTensor`` laid out other than by
        ``fully_shard`` (tensor parallelism, hybrid sharding); ``ModelParallelStrategy`` with no
        parameter sharded.
    """
    sharded = bool(sharded_parameters(module))
    found = None
    if isinstance(strategy, UNRECORDED_STRATEGIES):
        found = f"the trainer's strategy is {type(strategy).__name__}"
    elif (reason := unrecordable_shards(module)) is not None:
        found = reason
    elif isinstance(strategy, strategies.ModelParallelStrategy) and not sharded:
        found = "the trainer's strategy is ModelParallelStrategy and no parameter is sharded"
    if found is not None:
        raise errors.SourceCallbackError(
            f"SourceCallback cannot record this run: {found}. Sharded runs are recorded when "
            "sharded with FSDP2 (fully_shard over one device mesh of all ranks, e.g. "
            "ModelParallelStrategy with tensor_parallel_size=1 and fully_shard in "
            "configure_model); FSDPStrategy, DeepSpeed and tensor parallelism are not "
            "supported yet. Train with FSDP2, DDP or on a single device, or train this run "
            "without SourceCallback."
        )
    return sharded


class _Ranks:
    """The trainer's processes, through its strategy's collectives."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.is_main = trainer.is_global_zero
        self._strategy = trainer.strategy

    def broadcast(self, obj: Any) -> Any:
        return self._strategy.broadcast(obj, src=0)


@contextmanager
def _probing(module: pl.LightningModule) -> Iterator[None]:
    """:func:`~source_callback.record.probe.probing`, with ``self.log`` silenced."""
    module.log = module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        with probing(module):
            yield
    finally:
        del module.log, module.log_dict


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


class SourceCallback(RecordingCallback, Callback):
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

    # -- setup and teardown ------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model and the strategy's setup, so that fully_shard is visible, and
        # before the store is opened.
        sharded = check_sharding(trainer.strategy, pl_module)
        default = os.path.join(trainer.default_root_dir, DEFAULT_STORE_NAME)
        self._session.open(default, _Ranks(trainer), sharded=sharded)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._session.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Keep what was recorded so far; the stage stays 'recording' so that it can be resumed.
        self._session.abort()

    # -- stages ------------------------------------------------------------------------------

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
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        collate_fn = getattr(loader, "collate_fn", None)

        def probe_losses(indices: Sequence[int]) -> list[float]:
            return training_step_losses(
                pl_module,
                dataset,
                indices,
                collate_fn,
                trainer.strategy.root_device,
                trainer.precision_plugin.convert_input,
            )

        estimated = trainer.estimated_stepping_batches
        # automatic optimization divides each batch's loss by k, in a shorter last window too
        divided = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        setup = StageSetup(
            model=pl_module,
            optimizer=trainer.optimizers[0],
            dataset=dataset,
            batch_size=getattr(loader, "batch_size", None),
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            world_size=trainer.world_size,
            precision=str(trainer.precision),
            estimated_steps=float(estimated) if math.isfinite(estimated) else None,
            global_step=trainer.global_step,
            probe_losses=probe_losses,
            recorded_by="lightning",
            divides_loss_by=divided,
            loss_scaler=getattr(trainer.precision_plugin, "scaler", None),
        )
        self._session.start(_Ranks(trainer), setup)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._session.end(_Ranks(trainer))

    # -- steps -------------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._session.before_step(trainer.global_step)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        clipping = None
        if trainer.gradient_clip_val:  # Lightning clips after this hook
            algorithm = trainer.gradient_clip_algorithm or "norm"  # an enum of "norm", "value"
            kind = str(getattr(algorithm, "value", algorithm))
            clipping = GradientClipping(float(trainer.gradient_clip_val), kind, applied=False)
        self._session.optimizer_step(getattr(optimizer, "_optimizer", optimizer), clipping)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
            if pl_module.automatic_optimization and trainer.accumulate_grad_batches != 1:
                loss = loss * trainer.accumulate_grad_batches  # undo Lightning's 1/k
        else:
            loss = None
        try:
            examples = extract_batch_size(batch) * trainer.world_size
        except Exception:
            examples = None
        self._session.add_batch(loss, examples)
        self._session.finish_steps(trainer.global_step, trainer.current_epoch)

    # -- resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return self._session.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._session.load_state_dict(state_dict)
