"""Train one recorded stage with many large checkpoints, to be killed with SIGKILL by a test.

Usage: ``python train_forever.py STORE CKPT_DIR [--resume LIGHTNING_CKPT]``.

Prints ``STEP <global step>`` (flushed) after every optimizer step and ``FINISHED`` at the end.
Lightning checkpoints (``CKPT_DIR/last.ckpt``) are saved at every epoch's end; the store
gets ``CHECKPOINTS`` + 1 checkpoints of a ~2 MB model plus its Adam state, and step rows in
blocks of ``FLUSH_EVERY``, so that the background writer is busy most of the time and a kill at
a random moment usually lands in the middle of a write.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import TinyClassifier, loader, make_dataset

from source_callback import SourceCallback

FEATURES, HIDDEN, CLASSES = 512, 1024, 4
EXAMPLES, BATCH = 256, 16  # 16 steps per epoch
EPOCHS = 8
TOTAL_STEPS = EPOCHS * EXAMPLES // BATCH  # 128
CHECKPOINTS = 32  # a store checkpoint every 4 steps
FLUSH_EVERY = 3
CKPT_EVERY = EXAMPLES // BATCH  # a Lightning checkpoint at every epoch's end
STAGE = "long"


def decay(step: int) -> float:
    return 0.98**step


def make_model() -> TinyClassifier:
    pl.seed_everything(0, verbose=False)
    return TinyClassifier(
        features=FEATURES,
        hidden=HIDDEN,
        classes=CLASSES,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, decay),
    )


def make_loader() -> Any:
    return loader(make_dataset(EXAMPLES, features=FEATURES, classes=CLASSES, seed=0), BATCH)


def make_trainer(root: str | Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": EPOCHS,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
    }
    return pl.Trainer(callbacks=callbacks, **{**options, **kwargs})


def make_callback(store: str | Path) -> SourceCallback:
    return SourceCallback(
        store, stage=STAGE, checkpoints_per_stage=CHECKPOINTS, flush_every=FLUSH_EVERY
    )


class PrintSteps(pl.Callback):
    """Report progress on stdout; listed first, so a step is printed before it is recorded."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        print(f"STEP {trainer.global_step}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("ckpt_dir")
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    lightning_ckpt = ModelCheckpoint(
        dirpath=args.ckpt_dir,
        # At the epoch's end, not on its last batch (every_n_train_steps=16): Lightning 2.6.6
        # replays a whole epoch when resuming a second time from such a batch-end checkpoint.
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        save_top_k=1,
        save_last=True,
        enable_version_counter=False,
    )
    callbacks = [PrintSteps(), make_callback(args.store), lightning_ckpt]
    trainer = make_trainer(Path(args.ckpt_dir).parent, callbacks)
    trainer.fit(make_model(), make_loader(), ckpt_path=args.resume)
    print("FINISHED", flush=True)


if __name__ == "__main__":
    main()
