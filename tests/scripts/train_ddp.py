"""Record two stages of DDP (or FSDP2) training on CPU into one store.

Usage: ``python train_ddp.py STORE DEVICES [sharded]``. ``sharded`` trains with FSDP2
(``fully_shard`` under Lightning's ModelParallelStrategy, gloo) instead of DDP. STORE may be a
URL, with its fsspec options as JSON in the environment variable that ``STORAGE_OPTIONS`` names.
With ``DEVICES > 1`` Lightning's launcher re-executes this script once per extra rank, so all
the work happens under ``__main__``. Each process prints ``DONE rank=<global rank>`` after both
stages. The per-process batch size is ``PER_PROCESS_BATCH``; :func:`train` also serves the
single-process reference run.

Lightning gives every DDP (and FSDP2) training loader a shuffling ``DistributedSampler`` (seed
0 after ``seed_everything(0)``): each epoch, rank ``r`` takes ``randperm(n)[r::world]``. The
single-process reference uses the same sampler with one replica, so its batch ``k`` holds
exactly the examples of the ranks' batches ``k`` together and it takes the same optimizer steps.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch.distributed.fsdp import FSDPModule, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import TinyClassifier, make_dataset
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from source_callback import SourceCallback

#: Environment variable with the store's fsspec options as JSON (for an S3 URL as STORE).
STORAGE_OPTIONS = "SOURCE_CALLBACK_TEST_STORAGE_OPTIONS"
PER_PROCESS_BATCH = 8
PRETRAIN = {"n": 64, "seed": 0, "epochs": 2}  # 64 / (8 x 2) = 4 steps per epoch
FINETUNE = {"n": 48, "seed": 1, "epochs": 1}  # 48 / (8 x 2) = 3 steps
CLIP_NORM = 0.45  # gradient_clip_val: binds on some steps of each stage


class ShardedClassifier(TinyClassifier):
    """The classifier sharded with FSDP2 over the data-parallel mesh."""

    def configure_model(self) -> None:
        if not isinstance(self.net, FSDPModule):  # the second stage's fit finds it sharded
            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


def _strategy(devices: int, sharded: bool) -> str | Strategy:
    if sharded:
        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    return "ddp" if devices > 1 else "auto"


def _trainer(
    callback: SourceCallback, root: str, devices: int, epochs: int, sharded: bool
) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=_strategy(devices, sharded),
        max_epochs=epochs,
        gradient_clip_val=CLIP_NORM,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[callback],
    )


def _loader(data: Dataset, batch_size: int, devices: int) -> DataLoader:
    if devices > 1:
        return DataLoader(data, batch_size=batch_size)  # Lightning adds its DistributedSampler
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
    return DataLoader(data, batch_size=batch_size, sampler=sampler)


def train(
    store: str,
    devices: int,
    batch_size: int,
    root: str,
    sharded: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> pl.Trainer:
    """Two stages (SGD with a per-step schedule, then Adam) into ``store``; the last trainer.

    ``sharded``: FSDP2 (``fully_shard`` under ModelParallelStrategy) rather than DDP.
    """
    pl.seed_everything(0, verbose=False)
    model = (ShardedClassifier if sharded else TinyClassifier)(
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    )
    callback = SourceCallback(
        store, stage="pretrain", checkpoints_per_stage=4, storage_options=storage_options
    )
    data = make_dataset(PRETRAIN["n"], seed=PRETRAIN["seed"])
    _trainer(callback, root, devices, PRETRAIN["epochs"], sharded).fit(
        model, _loader(data, batch_size, devices)
    )

    model.optimizer_factory = lambda p: torch.optim.Adam(p, lr=1e-2)
    model.scheduler_factory = None
    callback.next_stage("finetune")
    data = make_dataset(FINETUNE["n"], seed=FINETUNE["seed"])
    last = _trainer(callback, root, devices, FINETUNE["epochs"], sharded)
    last.fit(model, _loader(data, batch_size, devices))
    return last


def main() -> None:
    store, devices = sys.argv[1], int(sys.argv[2])
    sharded = sys.argv[3:] == ["sharded"]
    options = json.loads(os.environ.get(STORAGE_OPTIONS, "null"))
    root = str(Path(store).parent / "lightning") if options is None else tempfile.mkdtemp()
    trainer = train(store, devices, PER_PROCESS_BATCH, root, sharded, options)
    print(f"DONE rank={trainer.global_rank}", flush=True)


if __name__ == "__main__":
    main()
