"""FSDP2 recording on CPU (gloo) when things go wrong: a rank killed, a crash and a resume.

Usage: ``python train_sharded.py STORE DEVICES SCENARIO [CKPT]``. The model, data and trainer
are ``train_ddp.py``'s with ``sharded=True`` (``fully_shard`` under ModelParallelStrategy), one
SGD-with-momentum stage of ``EPOCHS`` epochs, a Lightning checkpoint after each epoch in
``<STORE's folder>/ckpt``. Scenarios:

``record``
    The whole stage.
``kill``
    Rank 1 kills itself (SIGKILL) after writing its shards of the checkpoint before step
    ``KILL_STEP`` and before that checkpoint's commit.
``crash``
    Every rank raises before step ``CRASH_STEP`` (exit status 3).
``resume``
    Continues the crashed run from the Lightning checkpoint ``CKPT``.

Each rank prints ``DONE rank=<rank>`` when its ``fit`` returns.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import make_dataset
from train_ddp import PER_PROCESS_BATCH, ShardedClassifier, _loader, _strategy

from source_callback import SourceCallback
from source_callback.store import schema, shards

EPOCHS = 3  # 64 examples / (8 x 2) = 4 steps per epoch
KILL_STEP = 6
CRASH_STEP = 9


class CrashAt(pl.Callback):
    """Raise on every rank when the given optimizer step is about to start."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == CRASH_STEP:
            raise RuntimeError("simulated crash")


def kill_rank_1_before_commit(key: str) -> None:
    """Make rank 1 die once its shards of checkpoint ``key`` are written, before the commit."""
    write_region = shards._write_region

    async def write_then_die(group_path: Any, *args: Any) -> None:
        await write_region(group_path, *args)
        if torch.distributed.get_rank() == 1 and str(group_path).endswith(key):
            os.kill(os.getpid(), signal.SIGKILL)

    shards._write_region = write_then_die


def main() -> None:
    store, devices, scenario = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    root = Path(store).parent
    if scenario == "kill":
        kill_rank_1_before_commit(schema.checkpoint_key(KILL_STEP, schema.ROLE_INTERIOR))
    pl.seed_everything(0, verbose=False)
    model = ShardedClassifier(optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    callbacks: list[pl.Callback] = [
        SourceCallback(store, stage="pretrain", checkpoints_per_stage=4, flush_every=1),
        ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_top_k=-1),
    ]
    if scenario == "crash":
        callbacks.append(CrashAt())
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=_strategy(devices, sharded=True),
        max_epochs=EPOCHS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root / "lightning"),
        callbacks=callbacks,
    )
    data = make_dataset(64, seed=0)
    ckpt_path = sys.argv[4] if scenario == "resume" else None
    try:
        trainer.fit(model, _loader(data, PER_PROCESS_BATCH, devices), ckpt_path=ckpt_path)
    except RuntimeError as exc:
        if "simulated crash" not in str(exc):
            raise
        print(f"CRASHED rank={trainer.global_rank}", flush=True)
        sys.exit(3)
    print(f"DONE rank={trainer.global_rank}", flush=True)


if __name__ == "__main__":
    main()
