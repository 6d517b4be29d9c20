"""The ConvNet end to end: a recorded AdamW stage, the whole ``analyze`` against its floor.

``floors.py`` times each pass of one checkpoint over one batch; this times what a user waits
for: ``analyze(method="source")`` of a recorded run, every pass, eigendecomposition, query
sweep and store read included. The model is ``floors.ConvNet`` (three 3x3 convolutions of 32,
64 and 64 channels, a linear head; 57 k parameters) trained with AdamW on seeded synthetic
32x32 images of 10 classes (a mean image per class plus noise), one stage with the default
checkpoint plan. The floor is, as in ``transformer.py``, the checkpoints the analysis uses times
one plain forward+backward pass over the stage's data at the analysis's batch size, measured
just before and just after the analysis. The time is split by pass with ``speed.py``'s
wrappers. ``--curvature-examples`` adds analyses with the curvature on those fractions of the
examples, each against the same floor, with the Spearman agreement of their scores with the
all-examples analysis.

    python benchmarks/convnet.py [--examples 1024] [--curvature-examples 0.25]
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from floors import ConvNet  # noqa: E402
from speed import DATA_PASSES, timed_analysis  # noqa: E402

from source_callback import SourceCallback  # noqa: E402

BATCH = 64


class Images(pl.LightningModule):
    """``floors.ConvNet`` trained with AdamW on the images."""

    def __init__(self) -> None:
        super().__init__()
        self.model = ConvNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)


def images(n: int, seed: int) -> TensorDataset:
    """``n`` images: a seeded mean image per class (the same for every seed) plus noise."""
    means = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(means[labels] + 2 * torch.randn(n, 3, 32, 32, generator=g), labels)


def analysis(store: Path, data: TensorDataset, queries: TensorDataset, fraction: float | None):
    """``analyze`` timed by pass, against the floor measured before and after it."""
    row = timed_analysis(
        store,
        Images,
        data,
        BATCH,
        task="classification",
        train={"s": data},
        queries=queries,
        curvature_examples=fraction,
    )
    return {**row, "scores": np.asarray(row["result"].scores["s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--curvature-examples", type=float, nargs="*", default=[])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data, queries = images(args.examples, 1), images(args.queries, 2)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "run.zarr"
        pl.Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[SourceCallback(store, stage="s")],
            default_root_dir=tmp,
        ).fit(Images(), DataLoader(data, batch_size=BATCH, shuffle=True))
        rows = {"all": analysis(store, data, queries, None)}
        for fraction in args.curvature_examples:
            rows[str(fraction)] = analysis(store, data, queries, fraction)
    exact = rows["all"]["scores"]
    print(
        f"`python benchmarks/convnet.py --examples {args.examples} --epochs {args.epochs}"
        f"{' --curvature-examples ' if args.curvature_examples else ''}"
        f"{' '.join(map(str, args.curvature_examples))}` ({platform.machine()}, torch "
        f"{torch.__version__}, 1 torch thread; {args.examples} examples, batch {BATCH}, "
        f"{args.queries} queries)\n"
    )
    print(
        "| `curvature_examples` | checkpoints | analyze (s) | floor (s) | × floor | "
        + " | ".join(f"{label} × floor" for label in DATA_PASSES)
        + " | rest × floor | Spearman vs all |"
    )
    print("|---|---:|---:|---:|---:|" + "---:|" * (len(DATA_PASSES) + 2))
    for name, row in rows.items():
        rho = np.mean(
            [spearmanr(a, b).statistic for a, b in zip(row["scores"], exact, strict=True)]
        )
        passes = " | ".join(f"{row['passes'][label]:.2f}" for label in DATA_PASSES)
        print(
            f"| {name} | {row['checkpoints']} | {row['analyze_s']:.1f} | {row['floor_s']:.2f} | "
            f"{row['ratio']:.2f} | {passes} | {row['rest']:.2f} | {rho:.4f} |"
        )


if __name__ == "__main__":
    main()
