"""The benchmark settings: data shipped with scikit-learn, small models, recorded recipes.

Every setting is a multi-stage (or single-stage) run that a user could have written: a
``LightningModule`` whose optimizer recipe is chosen per stage, a shuffled ``DataLoader`` per
stage, ``SourceCallback`` recording into a store. Everything here is picklable (module-level
classes and ``functools.partial``) so that :func:`source_callback.evaluation.retrain` can
rebuild the module in worker processes.
"""

from __future__ import annotations

import functools
import itertools
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from source_callback import SourceCallback


@dataclass(frozen=True)
class Recipe:
    """One stage's optimizer: SGD (with momentum) or AdamW, optionally warmup + cosine."""

    optimizer: str  # "sgd" or "adamw"
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    warmup_cosine: bool = False


class Net(pl.LightningModule):
    """An MLP (or a linear model) trained with the recipe of its current stage."""

    def __init__(self, sizes: tuple[int, ...], loss: str, recipes: dict[str, Recipe]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
            layers += [nn.Linear(n_in, n_out)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        self.net = nn.Sequential(*layers)
        self.loss_kind = loss
        self.recipes = recipes
        self.stage = next(iter(recipes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        out = self(x)
        if self.loss_kind == "classification":
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out, y.reshape(out.shape))

    def configure_optimizers(self) -> Any:
        recipe = self.recipes[self.stage]
        if recipe.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(),
                lr=recipe.lr,
                momentum=recipe.momentum,
                weight_decay=recipe.weight_decay,
            )
        else:
            optimizer = torch.optim.AdamW(
                self.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
            )
        if not recipe.warmup_cosine:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        warmup = max(1, total // 10)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(warmup_cosine, warmup=warmup, total=total)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def set_stage(model: Net, stage: str) -> None:
    """``before_stage`` hook: select the stage's recipe, as the training script does."""
    model.stage = stage


@dataclass(frozen=True)
class StageSpec:
    """A stage: its data, epochs and batch size."""

    name: str
    data: TensorDataset
    epochs: int
    batch_size: int


@dataclass(frozen=True)
class Setting:
    """A benchmark setting: what is trained, how, and what is attributed.

    Attributes
    ----------
    attributed
        The stage whose examples the LDS subsets remove (the other stages are kept whole).
    """

    name: str
    title: str
    module: Callable[[], Net]
    stages: list[StageSpec]
    queries: TensorDataset
    task: str
    attributed: str
    checkpoints_per_stage: int = 6
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def train(self) -> dict[str, Dataset]:
        """Each stage's dataset by name."""
        return {s.name: s.data for s in self.stages}

    def train_run(self, store: Path | None, seed: int) -> Net:
        """Train the setting from ``seed`` as a user script would, recording into ``store``.

        ``store=None`` trains without ``SourceCallback`` (for the overhead comparison).
        """
        pl.seed_everything(seed, verbose=False)
        model = self.module()
        callbacks: list[pl.Callback] = []
        callback = None
        if store is not None:
            if store.exists():
                shutil.rmtree(store)
            callback = SourceCallback(store, checkpoints_per_stage=self.checkpoints_per_stage)
            callbacks.append(callback)
        for stage in self.stages:
            if callback is not None:
                callback.next_stage(stage.name)
            set_stage(model, stage.name)
            trainer(stage.epochs, callbacks, Path(tempfile.gettempdir())).fit(
                model, DataLoader(stage.data, batch_size=stage.batch_size, shuffle=True)
            )
        return model


def trainer(epochs: int, callbacks: list[pl.Callback], root: Path) -> pl.Trainer:
    """A quiet CPU trainer."""
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )


def _tensors(x: np.ndarray, y: np.ndarray, regression: bool = False) -> TensorDataset:
    target = torch.tensor(y, dtype=torch.float32 if regression else torch.long)
    return TensorDataset(torch.tensor(x, dtype=torch.float32), target)


def _standardized_split(
    x: np.ndarray, y: np.ndarray, held_out: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A fixed shuffle, the last ``held_out`` rows as queries, features standardized on train."""
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    mean, std = x[:-held_out].mean(0), x[:-held_out].std(0) + 1e-8
    x = (x - mean) / std
    return x[:-held_out], y[:-held_out], x[-held_out:], y[-held_out:]


def logistic_breast_cancer(epochs: int) -> Setting:
    """Setting 1a: logistic regression on breast cancer, SGD for ``epochs`` epochs."""
    data = load_breast_cancer()
    x, y, qx, qy = _standardized_split(data.data, data.target, held_out=100)
    recipes = {"train": Recipe("sgd", lr=0.01)}
    return Setting(
        name=f"logistic-breast-cancer-{epochs}ep",
        title=f"Logistic regression, breast cancer, SGD, {epochs} epoch(s)",
        module=functools.partial(Net, (30, 2), "classification", recipes),
        stages=[StageSpec("train", _tensors(x, y), epochs, batch_size=16)],
        queries=_tensors(qx, qy),
        task="classification",
        attributed="train",
        notes={"epochs": epochs},
    )


def linear_diabetes(epochs: int) -> Setting:
    """Setting 1b: linear regression on diabetes (standardized target), SGD."""
    data = load_diabetes()
    target = (data.target - data.target.mean()) / data.target.std()
    x, y, qx, qy = _standardized_split(data.data, target, held_out=92)
    recipes = {"train": Recipe("sgd", lr=0.005)}
    return Setting(
        name=f"linear-diabetes-{epochs}ep",
        title=f"Linear regression, diabetes, SGD, {epochs} epoch(s)",
        module=functools.partial(Net, (10, 1), "regression", recipes),
        stages=[StageSpec("train", _tensors(x, y[:, None], True), epochs, batch_size=16)],
        queries=_tensors(qx, qy[:, None], True),
        task="regression",
        attributed="train",
        notes={"epochs": epochs},
    )


def _digits(held_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    images, targets = digits.images[order] / 16.0, digits.target[order]
    return images[:-held_out], targets[:-held_out], images[-held_out:], targets[-held_out:]


def noisy_mlp_digits(noise: float = 0.3) -> Setting:
    """Setting 2: a 3-layer MLP on digits with ``noise`` of the labels corrupted, brief SGD."""
    images, targets, q_images, q_targets = _digits(held_out=100)
    rng = np.random.default_rng(1)
    corrupted = rng.random(len(targets)) < noise
    noisy = targets.copy()
    noisy[corrupted] = (targets[corrupted] + rng.integers(1, 10, corrupted.sum())) % 10
    recipes = {"train": Recipe("sgd", lr=0.03, momentum=0.9, weight_decay=1e-4)}
    return Setting(
        name="noisy-mlp-digits",
        title=f"3-layer MLP, digits with {noise:.0%} corrupted labels, SGD + momentum",
        module=functools.partial(Net, (64, 64, 64, 10), "classification", recipes),
        stages=[StageSpec("train", _tensors(images.reshape(-1, 64), noisy), 4, batch_size=64)],
        queries=_tensors(q_images.reshape(-1, 64), q_targets),
        task="classification",
        attributed="train",
        notes={"corrupted": corrupted},
    )


def _rotated(images: np.ndarray, targets: np.ndarray, turns: list[int]) -> TensorDataset:
    """Images rotated by each of ``turns`` × 90° (exact on 8×8), flattened."""
    xs = [np.rot90(images, k=k, axes=(1, 2)).reshape(len(images), -1) for k in turns]
    return _tensors(np.concatenate(xs), np.concatenate([targets] * len(turns)))


def rotated_digits(adam: bool, stage_turns: tuple[tuple[int, ...], ...] | None = None) -> Setting:
    """Settings 3 and 4: digits in rotated domains, stages on disjoint domains.

    Default: stage ``pretrain`` on 0°, 90°, 180°, stage ``finetune`` on 270°; queries are
    held-out digits in the pretraining domains, and the pretraining data is attributed. With
    ``adam``, both stages use AdamW with warmup + cosine; otherwise SGD with momentum.
    ``stage_turns`` splits the domains into other stages (queries from every domain).
    """
    images, targets, q_images, q_targets = _digits(held_out=100)
    images, targets = images[:600], targets[:600]
    turns = stage_turns or ((0, 1, 2), (3,))
    names = (
        ["pretrain", "finetune"]
        if len(turns) == 2
        else [f"stage{i + 1}" for i, _ in enumerate(turns)]
    )
    if adam:
        recipe = Recipe("adamw", lr=2e-3, weight_decay=0.01, warmup_cosine=True)
    else:
        recipe = Recipe("sgd", lr=0.03, momentum=0.9, weight_decay=1e-4)
    recipes = dict.fromkeys(names, recipe)
    query_turns = sorted({t for group in turns for t in group}) if stage_turns else list(turns[0])
    per_domain = 60 // len(query_turns)
    kind = "adamw" if adam else "sgd"
    return Setting(
        name=f"rotated-digits-{kind}" + (f"-{len(turns)}stages" if stage_turns else ""),
        title=(
            f"{len(turns)}-stage rotated digits, "
            + ("AdamW + warmup/cosine" if adam else "SGD + momentum")
        ),
        module=functools.partial(Net, (64, 128, 10), "classification", recipes),
        stages=[
            StageSpec(name, _rotated(images, targets, list(group)), 3 if i == 0 else 2, 64)
            for i, (name, group) in enumerate(zip(names, turns, strict=True))
        ],
        queries=_rotated(q_images[:per_domain], q_targets[:per_domain], query_turns),
        task="classification",
        attributed=names[0],
    )
