"""Record a Hugging Face ``Trainer`` run under DDP on CPU (gloo) with ``SourceTrainerCallback``.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node=2 train_hf_ddp.py STORE
OUT``. The Trainer reads ``LOCAL_RANK``/``WORLD_SIZE`` from the launcher and wraps the model in
DDP. Besides the store, every rank writes ``OUT/rank<r>.pt``, the ground truth the test
compares the store with: the examples each of its optimizer steps saw (counted by a forward
pre-hook of its own), the learning rates and gradient norms (before clipping) the Trainer
logged, the parameters and AdamW state before every step and at the end, and the stores it
opened a writer on. Each rank prints
``DONE rank=<r>``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_models import LabelledSequences, tiny_llama
from transformers import Trainer, TrainerCallback, TrainingArguments

from source_callback import SourceTrainerCallback
from source_callback.store.writer import StoreWriter

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PER_DEVICE_BATCH = 4
ACCUMULATION = 2
EXAMPLES = 38  # 10 batches of 4 (the last holds 2): 5 per rank, the last step is short
EPOCHS = 2
MAX_GRAD_NORM = 0.5  # clips some steps


class Truth(TrainerCallback):
    """This rank's own account: examples per optimizer step, the model and AdamW state before
    every step and at the end."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.examples: list[int] = []
        self._count = 0
        self.before: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}
        model.register_forward_pre_hook(self._count_batch, with_kwargs=True)

    def _count_batch(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if module.training and torch.is_grad_enabled():
            self._count += int(kwargs["input_ids"].shape[0])

    @staticmethod
    def _grab(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
        names = {id(p): n for n, p in model.named_parameters()}
        return {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "state": {
                names[id(p)]: {k: v.clone() for k, v in s.items()}
                for p, s in optimizer.optimizer.state.items()
            },
        }

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        self.before.append(self._grab(model, optimizer))

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.examples.append(self._count)
        self._count = 0

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        self.final = self._grab(model, optimizer)


def main() -> None:
    store, out = sys.argv[1], Path(sys.argv[2])
    opened = []
    original_open = StoreWriter.open

    def counted_open(*args: Any, **kwargs: Any) -> StoreWriter:
        opened.append(args[0])
        return original_open(*args, **kwargs)

    StoreWriter.open = counted_open  # type: ignore[method-assign]

    torch.manual_seed(0)
    model = tiny_llama()
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=PER_DEVICE_BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        num_train_epochs=EPOCHS,
        learning_rate=0.01,
        lr_scheduler_type="linear",
        warmup_steps=2,
        weight_decay=0.1,
        use_cpu=True,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        report_to=[],
        max_grad_norm=MAX_GRAD_NORM,
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    truth = Truth(model)
    callback = SourceTrainerCallback(store, stage="pretrain", checkpoints_per_stage=3)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=LabelledSequences(EXAMPLES, seed=1),
        callbacks=[callback, truth],
    )
    trainer.train()
    rank = args.process_index
    torch.save(
        {
            "rank": rank,
            "world_size": args.world_size,
            "examples": truth.examples,
            "lr": [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e],
            "grad_norm": [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e],
            "before": truth.before,
            "final": truth.final,
            "opened": opened,
        },
        out / f"rank{rank}.pt",
    )
    print(f"DONE rank={rank}", flush=True)


if __name__ == "__main__":
    main()
