"""Retrain a recorded run on subsets of its data, the way it was trained, for ground truth.

The counterfactual a score predicts (SOURCE-math §1) is what training *would* have produced
without some examples. :func:`retrain` measures it: for each subset it trains a fresh instance of
the user's ``LightningModule`` through every recorded stage with the recorded recipe — batch
size, gradient accumulation, precision, and the number of passes over the data — and the
module's own ``configure_optimizers`` (so the schedule adapts to the subset exactly as it would
have in a real run). Each stage's optimizer is checked against the record before the first
step. Retrainings are independent and run in parallel processes.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from source_callback.analysis.inputs import (
    Collate,
    Collation,
    batches,
    check_datasets,
    evaluate,
    on_device,
)
from source_callback.analysis.probes import check_module_probes
from source_callback.analysis.task import Task
from source_callback.errors import SourceCallbackError
from source_callback.optim import OptimizerRecord, describe_optimizer
from source_callback.store.reader import Run, open_run
from source_callback.store.schema import STEP_EPOCH, Stage

#: ``module()`` builds a fresh, untrained model; ``before_stage(module, stage name)`` prepares
#: it for a stage (e.g. selects that stage's optimizer recipe or freezes layers) as the original
#: training script did.
ModuleFactory = Callable[[], pl.LightningModule]
StageHook = Callable[[pl.LightningModule, str], None]
Measure = Callable[[pl.LightningModule], Any]
#: How long a retraining on a subset trains each stage: the recorded passes over the data, or
#: the recorded optimizer steps.
Length = Literal["epochs", "steps"]

# Hyperparameters a scheduler may change during a stage; the rest must match the record.
_SCHEDULED = {"lr", "initial_lr", "momentum", "betas", "max_lr", "min_lr", "base_momentum"}


class RetrainError(SourceCallbackError):
    """A run cannot be retrained as it was recorded."""


@dataclass(frozen=True)
class StageRecipe:
    """How one stage was trained, read from the record.

    Attributes
    ----------
    name
        Stage name.
    num_examples
        Size of the stage's training set.
    num_steps
        Optimizer steps the stage took.
    batch_size
        Examples per optimizer micro-batch across all processes (per-process size × world).
    accumulate_grad_batches
        Micro-batches per optimizer step.
    drop_last
        Whether the incomplete last batch of an epoch was dropped.
    precision
        Lightning precision setting.
    optimizer
        The recorded optimizer, which the retrained stage must reproduce.
    """

    name: str
    num_examples: int
    num_steps: int
    batch_size: int
    accumulate_grad_batches: int
    drop_last: bool
    precision: str
    optimizer: OptimizerRecord

    @property
    def epochs(self) -> float:
        """Passes over the stage's data (fractional when the stage stopped mid-epoch)."""
        return self.num_steps / self.steps_per_epoch(self.num_examples)

    def steps_per_epoch(self, num_examples: int) -> int:
        """Optimizer steps in one epoch over ``num_examples`` examples."""
        divide = math.floor if self.drop_last else math.ceil
        return math.ceil(divide(num_examples / self.batch_size) / self.accumulate_grad_batches)

    def schedule(self, num_examples: int, length: Length = "epochs") -> tuple[int, int]:
        """``(max_epochs, max_steps)`` of a retraining on ``num_examples`` examples.

        ``length="epochs"``: the recorded number of passes over the data (fewer steps on a
        subset); ``"steps"``: the recorded number of optimizer steps (more passes).
        """
        per_epoch = self.steps_per_epoch(num_examples)
        steps = self.num_steps if length == "steps" else max(1, round(self.epochs * per_epoch))
        return math.ceil(steps / per_epoch), steps


def read_recipe(run: Run) -> list[StageRecipe]:
    """Each stage's recipe from the record (stages must be complete, of map-style data).

    Raises
    ------
    RetrainError
        A stage is incomplete, has no recorded size or batch size, or its step count fits no
        epoch structure of that batch size (a custom sampler, or steps limited by time).
    """
    epochs = run.steps()[STEP_EPOCH]
    return [_stage_recipe(s, epochs[s.first_step : (s.last_step or 0) + 1]) for s in run.stages]


def _stage_recipe(stage: Stage, epochs: np.ndarray) -> StageRecipe:
    """The recipe of one stage whose steps had the epoch numbers ``epochs``."""
    if not stage.complete or stage.num_examples is None or stage.batch_size is None:
        raise RetrainError(
            f"stage {stage.name!r} is incomplete or was trained from data without a length or "
            "batch size; only complete stages of map-style datasets can be retrained."
        )
    first_epoch = int((epochs == epochs[0]).sum())
    single_epoch = len(np.unique(epochs)) == 1
    batch = stage.batch_size * stage.world_size
    for drop_last in (False, True):
        recipe = StageRecipe(
            stage.name,
            stage.num_examples,
            len(epochs),
            batch,
            stage.accumulate_grad_batches,
            drop_last,
            stage.precision,
            stage.optimizer,
        )
        per_epoch = recipe.steps_per_epoch(stage.num_examples)
        # A stage stopped by max_steps inside its first epoch ran fewer steps than an epoch.
        if per_epoch == first_epoch or (single_epoch and per_epoch > first_epoch):
            return recipe
    raise RetrainError(
        f"stage {stage.name!r}: {first_epoch} optimizer steps in its first epoch do not match "
        f"{stage.num_examples} examples in batches of {batch} with "
        f"{stage.accumulate_grad_batches} accumulated; the data was not iterated in plain "
        "epochs, so the recipe cannot be reproduced."
    )


class TaskMeasurement:
    """A picklable measurement: the task's ``measurement`` of every query, ``[Q]``.

    Parameters
    ----------
    task
        The task whose measurement :func:`~source_callback.analyze` attributed.
    queries
        The query examples.
    batch_size
        Queries per forward pass.
    collate_fn
        What collates the queries into a batch (as :func:`~source_callback.analyze` did:
        the last stage's where it took one per stage; ``None``: ``default_collate``).
    """

    def __init__(
        self, task: Task, queries: Dataset, batch_size: int = 256, collate_fn: Collate = None
    ) -> None:
        self.task = task
        self.queries = queries
        self.batch_size = batch_size
        self.collate_fn = collate_fn

    def __call__(self, model: pl.LightningModule) -> np.ndarray:
        """The measurement of every query under ``model`` (put in eval mode)."""
        model.eval()
        device = next(model.parameters()).device
        loader = on_device(batches(self.queries, self.batch_size, self.collate_fn), device)
        return evaluate(self.task.measurement, model, loader).double().cpu().numpy()


class _CheckOptimizer(pl.Callback):
    """Fails the retraining before its first step if the optimizer is not the recorded one."""

    def __init__(self, recipe: StageRecipe) -> None:
        self.recipe = recipe

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        if len(trainer.optimizers) != 1:
            raise RetrainError(f"stage {self.recipe.name!r}: expected one optimizer")
        got = describe_optimizer(trainer.optimizers[0], names)
        want = self.recipe.optimizer
        problems = []
        if got.class_name != want.class_name:
            problems.append(f"class {got.class_name} instead of {want.class_name}")
        elif len(got.groups) != len(want.groups):
            problems.append(f"{len(got.groups)} param groups instead of {len(want.groups)}")
        for index, (g, w) in enumerate(zip(got.groups, want.groups, strict=False)):
            if sorted(g.params) != sorted(w.params):
                problems.append(f"group {index} holds other parameters")
            for key in sorted(set(w.hyperparameters) - _SCHEDULED):
                if g.hyperparameters.get(key) != w.hyperparameters[key]:
                    problems.append(
                        f"group {index} {key}={g.hyperparameters.get(key)!r} "
                        f"instead of {w.hyperparameters[key]!r}"
                    )
        if problems:
            raise RetrainError(
                f"stage {self.recipe.name!r}: the module's configure_optimizers() does not give "
                f"the recorded optimizer ({'; '.join(problems[:4])}). Pass before_stage= to "
                "prepare the module for each stage as the original training script did."
            )


@dataclass(frozen=True)
class _Context:
    """What every retraining shares (sent once to each worker process)."""

    recipes: list[StageRecipe]
    module: ModuleFactory
    train: Mapping[str, Dataset]
    measure: Measure
    before_stage: StageHook | None
    collation: Collation
    accelerator: str
    threads: int
    length: Length


_WORKER_CONTEXT: _Context | None = None


def _init_worker(context: _Context) -> None:
    global _WORKER_CONTEXT
    _WORKER_CONTEXT = context
    torch.set_num_threads(context.threads)


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-``fit`` banners and hints, which would repeat every retraining."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PossibleUserWarning)
            yield
    finally:
        logger.setLevel(level)


def _train_one(context: _Context, keep: Mapping[str, np.ndarray], seed: int) -> np.ndarray:
    """Train a fresh module through the stages on the kept examples; return its measurement."""
    pl.seed_everything(seed, verbose=False)
    model = context.module()
    with tempfile.TemporaryDirectory() as root, _quiet_lightning():
        for recipe in context.recipes:
            dataset = context.train[recipe.name]
            indices = np.flatnonzero(keep[recipe.name]) if recipe.name in keep else None
            if indices is not None and len(indices) == 0:
                continue  # the stage is removed entirely
            if indices is not None:
                dataset = Subset(dataset, indices.tolist())
            if context.before_stage is not None:
                context.before_stage(model, recipe.name)
            loader = DataLoader(
                dataset,
                batch_size=recipe.batch_size,
                shuffle=True,
                drop_last=recipe.drop_last,
                collate_fn=context.collation.stage(recipe.name),
            )
            size = len(dataset)  # type: ignore[arg-type]
            max_epochs, max_steps = recipe.schedule(size, context.length)
            trainer = pl.Trainer(
                accelerator=context.accelerator,
                devices=1,
                precision=recipe.precision,  # type: ignore[arg-type]
                max_epochs=max_epochs,
                max_steps=max_steps,
                accumulate_grad_batches=recipe.accumulate_grad_batches,
                callbacks=[_CheckOptimizer(recipe)],
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                limit_val_batches=0,
                default_root_dir=root,
            )
            trainer.fit(model, loader)
    return np.asarray(context.measure(model))


def _worker_job(keep: Mapping[str, np.ndarray], seed: int) -> np.ndarray:
    assert _WORKER_CONTEXT is not None
    return _train_one(_WORKER_CONTEXT, keep, seed)


def retrain(
    store: str | os.PathLike[str],
    *,
    module: ModuleFactory,
    train: Mapping[str, Dataset],
    measure: Measure,
    keep: Mapping[str, np.ndarray] | None = None,
    seeds: Sequence[int] = (0,),
    before_stage: StageHook | None = None,
    length: Length = "epochs",
    processes: int = 1,
    threads_per_process: int = 1,
    accelerator: str = "cpu",
    collate_fn: Collate | Mapping[str, Collate] = None,
    storage_options: dict[str, Any] | None = None,
    verbose: bool = True,
) -> np.ndarray:
    """Retrain the recorded run on subsets of its stages' data and measure each result.

    Every retraining seeds all generators with its seed (``lightning.seed_everything``), then
    builds a fresh module and trains it through the recorded stages, each with a new
    ``Trainer`` and a shuffled ``DataLoader`` over the kept examples. By default a stage is
    trained for the recorded number of passes over its (kept) data, so a half-size subset gets
    half the optimizer steps, and a schedule computed from
    ``trainer.estimated_stepping_batches`` adapts as it would have in a real run. With every
    example kept and the seed of a script that called ``seed_everything(seed)`` before
    building its model, the retraining reproduces that run.

    Parameters
    ----------
    store
        The recorded run (path or fsspec URL).
    module
        Builds a fresh, untrained instance of the trained ``LightningModule``; must be
        picklable when ``processes > 1`` (a class or a module-level function).
    train
        Each stage's training dataset by stage name, checked against the record.
    measure
        ``measure(trained module)`` → array, e.g. :class:`TaskMeasurement`; picklable when
        ``processes > 1``.
    keep
        Per stage name, boolean masks ``[J, N_s]`` of the examples each retraining keeps (all
        stages with the same J); stages not named keep everything. A mask with nothing kept
        skips the stage. ``None``: one retraining on all data.
    seeds
        Seeds; every subset is retrained once per seed.
    before_stage
        ``before_stage(module, stage name)``, called before each stage's ``fit``, as the
        original script prepared the module (optimizer recipe, frozen layers).
    length
        ``"epochs"`` (default): each stage makes the recorded number of passes over its kept
        data, as retraining with the same script would; ``"steps"``: each stage takes the
        recorded number of optimizer steps (more passes over a subset).
    processes
        Parallel worker processes (``spawn``); 1 trains in this process. The calling script
        must then guard its entry point with ``if __name__ == "__main__":``, since each
        worker imports it.
    threads_per_process
        ``torch.set_num_threads`` in each worker.
    accelerator
        Lightning accelerator of the retrainings.
    collate_fn
        Passed to the DataLoaders: one function, or a mapping from every stage's name to its
        own (as :func:`~source_callback.analyze` takes it).
    storage_options
        fsspec options for a remote store.
    verbose
        Show a progress bar.

    Returns
    -------
    np.ndarray
        ``[J, len(seeds), *measure shape]``.

    Raises
    ------
    RetrainError
        The record cannot be retrained, or a stage's optimizer differs from the record.
    """
    run = open_run(store, storage_options)
    check_datasets(run, train)
    collation = Collation.of(collate_fn, [s.name for s in run.stages])
    check_module_probes(run, module, train, before_stage, collation, RetrainError)
    recipes = read_recipe(run)
    masks = {name: np.asarray(m, dtype=bool) for name, m in (keep or {}).items()}
    unknown = sorted(set(masks) - {r.name for r in recipes})
    if unknown:
        raise RetrainError(f"keep names stage(s) {unknown} not in the record")
    counts = {m.shape[0] for m in masks.values()}
    if len(counts) > 1:
        raise RetrainError(f"keep masks have different numbers of subsets: {sorted(counts)}")
    for name, mask in masks.items():
        size = len(train[name])  # type: ignore[arg-type]
        if mask.ndim != 2 or mask.shape[1] != size:
            raise RetrainError(f"keep[{name!r}] must be [subsets, {size}], got {mask.shape}")
    subsets = counts.pop() if counts else 1
    jobs = [
        ({name: mask[j] for name, mask in masks.items()}, seed)
        for j in range(subsets)
        for seed in seeds
    ]
    context = _Context(
        recipes,
        module,
        train,
        measure,
        before_stage,
        collation,
        accelerator,
        threads_per_process,
        length,
    )
    progress = tqdm(total=len(jobs), desc="retraining", disable=not verbose)
    if processes == 1:
        results = []
        for keep_j, seed in jobs:
            results.append(_train_one(context, keep_j, seed))
            progress.update()
    else:
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            processes, mp_context=spawn, initializer=_init_worker, initargs=(context,)
        ) as pool:
            futures = [pool.submit(_worker_job, keep_j, seed) for keep_j, seed in jobs]
            for future in futures:
                future.add_done_callback(lambda _: progress.update())
            results = [future.result() for future in futures]
    progress.close()
    out = np.stack(results)
    return out.reshape(subsets, len(seeds), *out.shape[1:])
