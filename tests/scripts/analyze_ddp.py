"""Analyze a recorded run on several CPU processes (gloo), for ``tests/test_distributed.py``.

Usage: ``python analyze_ddp.py STORE OUT MODE``. ``MODE`` is

- ``fabric``: ``analyze(..., devices=2, strategy="ddp", verbose=True)`` launches the ranks
  itself (Lightning Fabric re-executes this script for rank 1) and shows progress and the
  summary;
- ``external``: the script runs under ``torchrun`` and initialises the process group itself;
  the analysis builds an exact projected-gradient cache (``projection_dim`` 16 covers every
  layer) and keeps its scores out of core;
- ``fail``: like ``fabric`` (quiet), with a training set that raises on rank 1 only;
- ``nan``: like ``fabric``, with a task whose loss is NaN on pretraining example ``NAN_AT``
  (which rank 1 scores);
- ``subset``: like ``fabric``, each curvature fitted on ``SUBSET`` of its stage's examples.

Each rank saves its result as ``OUT/rank<r>.npz`` and prints ``DONE rank=<r>``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import TinyClassifier, make_dataset

from source_callback import ClassificationTask, analyze

#: Pretraining spans two score blocks (4096 wide), so each rank scores one; fine-tuning spans
#: one, so rank 1 has no score block there.
SIZES = {"pretrain": 5000, "finetune": 300}
QUERIES = 21  # not a multiple of the batch size: ranks hold unequal numbers of query rows
BATCH = 64
NAN_AT = 4170  # in pretraining's second score block
SUBSET = 0.3  # curvature_examples of mode ``subset``


def training_sets() -> dict[str, TensorDataset]:
    return {
        "pretrain": make_dataset(SIZES["pretrain"], seed=0),
        "finetune": make_dataset(SIZES["finetune"], seed=1),
    }


def query_set() -> TensorDataset:
    return make_dataset(QUERIES, seed=7)


class FailsOnRankOne(Dataset):
    """A dataset that raises on rank 1 of an initialised process group."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        if dist.is_initialized() and dist.get_rank() == 1:
            raise RuntimeError("rank one cannot read its data")
        return self.data[index]


class NanLossAt(ClassificationTask):
    """Classification whose loss is NaN on the example whose inputs equal ``inputs``."""

    def __init__(self, inputs: torch.Tensor) -> None:
        super().__init__()
        self.inputs = inputs

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        marked = (batch[0] == self.inputs.to(batch[0].device)).all(1)
        return torch.where(marked, torch.nan, super().loss(model, batch))


def analyze_run(store: str, **kwargs: Any) -> Any:
    """The analysis every mode runs (and the single-process reference)."""
    return analyze(
        store,
        model=TinyClassifier(),
        task=kwargs.pop("task", "classification"),
        train=kwargs.pop("train", training_sets()),
        queries=query_set(),
        batch_size=BATCH,
        segments=2,
        verbose=kwargs.pop("verbose", False),
        **kwargs,
    )


def main() -> None:
    store, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    names = {"fail": "failed", "nan": "non-finite"}
    kwargs: dict[str, Any] = {"name": names.get(mode, "distributed")}
    if mode == "external":
        dist.init_process_group("gloo")
        kwargs.update(cache="projected", projection_dim=16, out_of_core=True)
    else:
        kwargs.update(accelerator="cpu", devices=2, strategy="ddp")
    if mode == "fail":
        kwargs["train"] = {name: FailsOnRankOne(data) for name, data in training_sets().items()}
    if mode == "nan":
        kwargs["task"] = NanLossAt(training_sets()["pretrain"][NAN_AT][0])
    if mode == "subset":
        kwargs["curvature_examples"] = SUBSET
    kwargs["verbose"] = mode == "fabric"
    result = analyze_run(store, **kwargs)
    rank = dist.get_rank()
    np.savez(
        out / f"rank{rank}.npz",
        effects=result.stage_effects,
        last_exact=result.last_stage_exact,
        **{f"scores_{name}": np.asarray(values) for name, values in result.scores.items()},
    )
    print(f"DONE rank={rank}", flush=True)


if __name__ == "__main__":
    main()
