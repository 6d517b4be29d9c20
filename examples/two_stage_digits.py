"""Two-stage fine-tuning on scikit-learn's bundled digits, recorded with SourceCallback.

Stage "pretrain": an MLP learns digits shown in three orientations (0°, 90°, 180°) with
SGD + momentum + weight decay. Stage "finetune": it is fine-tuned on the fourth orientation
(270°) with AdamW and a warmup + cosine schedule. Rotations by multiples of 90° are exact on
8×8 images. The last 100 digits are held out as queries for examples/attribute_digits.py.
Both stages are recorded into one store, which is then summarised.

    python examples/two_stage_digits.py [--store runs/digits.zarr] [--epochs 1.0]
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from source_callback import SourceCallback
from source_callback.cli import main as cli_main

HELD_OUT = 100
STAGES = [("pretrain", [0, 1, 2], 3), ("finetune", [3], 2)]  # name, quarter turns, epochs


def rotated_digits(quarter_turns: list[int], held_out: bool = False) -> TensorDataset:
    """Digits rotated by each of ``quarter_turns`` × 90°, pixels scaled to [0, 1].

    The training digits, or with ``held_out`` the last ``HELD_OUT`` digits (never trained on).
    """
    digits = load_digits()
    rows = slice(-HELD_OUT, None) if held_out else slice(None, -HELD_OUT)
    images, targets = digits.images[rows] / 16.0, digits.target[rows]
    xs = [np.rot90(images, k=k, axes=(1, 2)).reshape(len(images), -1) for k in quarter_turns]
    ys = [targets] * len(quarter_turns)
    x = torch.tensor(np.concatenate(xs), dtype=torch.float32)
    return TensorDataset(x, torch.tensor(np.concatenate(ys)))


def training_sets() -> dict[str, TensorDataset]:
    """Each stage's training set by stage name, in training order.

    For ``analyze(train=...)``, and for ``source-callback report --data
    examples.two_stage_digits:training_sets`` (from the repository root) to show the digits.
    """
    return {name: rotated_digits(turns) for name, turns, _ in STAGES}


def held_out_queries() -> TensorDataset:
    """The held-out digits in the fine-tuning orientation (270°), never trained on.

    For ``source-callback analyze`` configurations:
    ``"queries": "examples.two_stage_digits:held_out_queries"``.
    """
    return rotated_digits([3], held_out=True)


class DigitsMLP(pl.LightningModule):
    """A 64-128-10 MLP; the optimizer recipe is chosen per stage."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.recipe = "pretrain"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        if self.recipe == "pretrain":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        optimizer = torch.optim.AdamW(self.parameters(), lr=2e-3, weight_decay=0.01)
        total = self.trainer.estimated_stepping_batches
        warmup = max(1, int(0.1 * total))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def run(
    store: Path, epochs: float = 1.0, quiet: bool = False, checkpoints_per_stage: int = 6
) -> None:
    """Train both stages, recording into ``store`` (replaced if it exists)."""
    if store.exists():
        shutil.rmtree(store)
    torch.manual_seed(0)
    model = DigitsMLP()
    callback = SourceCallback(store, checkpoints_per_stage=checkpoints_per_stage)
    for name, turns, stage_epochs in STAGES:
        model.recipe = name
        callback.next_stage(name)
        data = DataLoader(rotated_digits(turns), batch_size=64, shuffle=True)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=max(1, round(stage_epochs * epochs)),
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=not quiet,
            enable_model_summary=False,
            default_root_dir=str(store.parent),
        )
        trainer.fit(model, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("runs/digits.zarr"))
    parser.add_argument("--epochs", type=float, default=1.0, help="scale of the epoch counts")
    args = parser.parse_args()
    run(args.store, args.epochs)
    print()
    cli_main(["inspect", str(args.store)])


if __name__ == "__main__":
    main()
