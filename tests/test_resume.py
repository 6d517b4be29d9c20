"""Resume: trainer.fit(ckpt_path=...) continues the same record, with no duplicated rows."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from models import TinyClassifier, loader, make_dataset, trainer
from storeutil import assert_same_record

from source_callback import InterruptedStageError, SourceCallback, open_run


class CrashAt(pl.Callback):
    """Raise when the given optimizer step is about to start."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def _model() -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier(
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7),
    )


def _record(tmp_path, store, crash_at=None, ckpt_path=None) -> None:
    callbacks: list[pl.Callback] = [
        SourceCallback(store, stage="pretrain", flush_every=1),
        ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1),
    ]
    if crash_at is not None:
        callbacks.append(CrashAt(crash_at))
    trainer(callbacks, tmp_path, max_epochs=3, enable_checkpointing=True).fit(
        _model(), loader(make_dataset(64)), ckpt_path=ckpt_path
    )


def _finetune(tmp_path, store) -> None:
    model = _model()
    trainer([SourceCallback(store, stage="finetune")], tmp_path, max_epochs=1).fit(
        model, loader(make_dataset(24, seed=3))
    )


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_resume_after_crash_equals_uninterrupted_run(tmp_path) -> None:
    reference = tmp_path / "reference.zarr"
    _record(tmp_path / "ref", reference)

    store = tmp_path / "source.zarr"  # the default location under default_root_dir
    with pytest.raises(RuntimeError, match="simulated crash"):
        _record(tmp_path, store, crash_at=21)
    crashed = open_run(store)
    # Everything up to the crash is in the store: 21 rows and the interior checkpoint at 20,
    # although the last Lightning checkpoint is at step 16.
    assert crashed.status == "recording" and not crashed.stages[0].complete
    assert crashed.num_steps == 21
    assert 20 in [c.step for c in crashed.checkpoints]

    # A new stage cannot be appended to an interrupted one ...
    with pytest.raises(InterruptedStageError, match="ckpt_path"):
        _finetune(tmp_path, store)

    # ... but resuming continues the record exactly.
    # ... also when the resumed callback names the store differently (here: the default).
    _record(tmp_path, None, ckpt_path=tmp_path / "ckpt" / "epoch=1-step=16.ckpt")
    run, ref = open_run(store), open_run(reference)
    assert run.status == "complete" and run.stages[0].complete
    assert_same_record(run, ref)

    # Stage bookkeeping is intact after the resume: the next stage follows on.
    _finetune(tmp_path, store)
    run = open_run(store)
    assert [(s.name, s.first_step, s.last_step) for s in run.stages] == [
        ("pretrain", 0, 23),
        ("finetune", 24, 26),
    ]
    assert run.num_steps == 27
