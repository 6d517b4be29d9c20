"""Tiny Lightning modules and datasets for tests (CPU, seconds)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]


def make_dataset(n: int = 64, features: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


class TinyClassifier(pl.LightningModule):
    """A two-layer MLP whose optimizer and scheduler the test chooses."""

    def __init__(
        self,
        features: int = 6,
        hidden: int = 8,
        classes: int = 3,
        optimizer: OptimizerFactory | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        scheduler_interval: str = "step",
        freeze_first: bool = False,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(features, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.Tanh(), nn.Linear(hidden, classes)]
        self.net = nn.Sequential(*layers)
        if freeze_first:
            self.net[0].requires_grad_(False)
        self.optimizer_factory = optimizer or (lambda params: torch.optim.SGD(params, lr=0.1))
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }


class ConvNet(nn.Module):
    """A strided, padded convolution and a linear head: 2×5×5 inputs, 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def loader(dataset: TensorDataset, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def trainer(callbacks: list[pl.Callback], root: Any, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def sgd_momentum(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


class StepCountingClassifier(TinyClassifier):
    """A TinyClassifier that remembers how many optimizer steps each of its fits took."""

    def __init__(self) -> None:
        super().__init__(optimizer=sgd_momentum)
        self.steps_per_fit: list[int] = []

    def on_train_end(self) -> None:
        self.steps_per_fit.append(self.trainer.global_step)


def two_stage_recipe(model: TinyClassifier, stage: str) -> None:
    """The optimizer of each stage of ``record_two_stages``: SGD with momentum, then AdamW."""
    model.optimizer_factory = sgd_momentum if stage == "pretrain" else adamw


def two_stage_sets() -> dict[str, TensorDataset]:
    """The training sets of test_cli's two-stage record, for ``analyze --config``'s data."""
    return {"pretrain": make_dataset(48), "finetune": make_dataset(40, seed=1)}


def numbered_collators() -> dict[str, Any]:
    """A mapping of the two-stage record's stages (``collate_fn``) whose values are not
    functions."""
    return {"pretrain": None, "finetune": 3}


def query_set() -> TensorDataset:
    """Three query examples, for ``analyze --config``'s queries."""
    return make_dataset(3, seed=7)


def analyze_one_stage(store: Any, data: TensorDataset, stage: str = "s") -> Any:
    """``analyze`` of a one-stage ``TinyClassifier`` record: two queries, one segment, unstored."""
    from source_callback import analyze

    return analyze(
        store,
        model=TinyClassifier(),
        task="classification",
        train={stage: data},
        queries=make_dataset(2, seed=9),
        segments=1,
        name=None,
        verbose=False,
    )


def refusing_collator() -> Callable[[list[Any]], Any]:
    """A collate function (for the command line's ``collate_fn``) that refuses every batch."""

    def collate(examples: list[Any]) -> Any:
        raise ValueError(f"this collator refuses {len(examples)} examples")

    return collate
