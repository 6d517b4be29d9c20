"""Train with FSDP2 (``fully_shard``) under Lightning's ModelParallelStrategy, on CPU.

Usage: ``python train_sharded.py STORE DEVICES``. Lightning's launcher re-executes this script
once per extra rank. ``configure_model`` shards the model over the data-parallel mesh with
``fully_shard`` (gloo), so its parameters are DTensors from the strategy's setup on.
SourceCallback must refuse the run at fit start on every rank: each rank prints
``REFUSED rank=<rank>: <message>``, and the script exits with status 3; a run that trains prints
``DONE``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import TinyClassifier, loader, make_dataset

from source_callback import SourceCallback
from source_callback.errors import SourceCallbackError


class ShardedClassifier(TinyClassifier):
    def configure_model(self) -> None:
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


class ReportingCallback(SourceCallback):
    """Prints each rank's refusal before any rank leaves ``fit``.

    An exception on rank 0 makes Lightning kill the other ranks, possibly before they report.
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            super().on_fit_start(trainer, pl_module)
        except SourceCallbackError as exc:
            # One write, so that the ranks' lines do not interleave in the shared pipe.
            sys.stdout.write(f"REFUSED rank={trainer.global_rank}: {exc}\n")
            sys.stdout.flush()
            torch.distributed.barrier()  # a rank that did not refuse leaves this hanging
            raise


def main() -> None:
    store, devices = sys.argv[1], int(sys.argv[2])
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(Path(store).parent / "lightning"),
        callbacks=[ReportingCallback(store, stage="pretrain", checkpoints_per_stage=2)],
    )
    try:
        trainer.fit(ShardedClassifier(), loader(make_dataset(32), batch_size=8))
    except SourceCallbackError:
        sys.exit(3)
    print(f"DONE rank={trainer.global_rank}", flush=True)


if __name__ == "__main__":
    main()
