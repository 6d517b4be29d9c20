"""An encoder-decoder end to end: a recorded T5 stage, the whole ``analyze`` against its floor.

A ``T5ForConditionalGeneration`` built from a config (never downloaded: 2 + 2 layers of width
256, 8 heads, feed-forward 1024, a 4,096-token vocabulary whose embedding is shared by both
stacks and tied to the output layer; 4.7 M parameters) is trained with AdamW on seeded random
pairs (64-token sources, 32-token targets) for one stage, as a ``LightningModule`` on the
model's own loss, and the stage is analyzed with ``task="seq2seq"`` (T5's relative attention
biases left out, as the analysis asks). The floor and the split by pass are ``convnet.py``'s
(``speed.timed_analysis``). The tied embedding is the unit to watch: its vocabulary side is
eigendecomposed (it is dense through the output layer) and its uses add up over the encoder's,
the decoder's and the output layer's tokens.

    python benchmarks/seq2seq.py [--examples 64] [--reps 2]
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed import DATA_PASSES, timed_analysis  # noqa: E402

from source_callback import Seq2SeqTask, SourceCallback  # noqa: E402

VOCAB, SOURCE, TARGET, BATCH = 4096, 64, 32, 8


def t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=256,
        d_kv=32,
        d_ff=1024,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=8,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(config)


class Pairs(Dataset):
    """Seeded random source and target token sequences."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.sources = torch.randint(2, VOCAB, (n, SOURCE), generator=g)
        self.targets = torch.randint(2, VOCAB, (n, TARGET), generator=g)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = torch.ones(SOURCE, dtype=torch.long)
        return {"input_ids": self.sources[i], "attention_mask": mask, "labels": self.targets[i]}


class Seq2Seq(pl.LightningModule):
    """The T5 trained with AdamW on its own loss."""

    def __init__(self) -> None:
        super().__init__()
        self.model = t5()

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)


def mean_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return Seq2SeqTask().loss(model, batch).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    data, queries = Pairs(args.examples, 1), Pairs(args.queries, 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "run.zarr"
        pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[SourceCallback(store, stage="sft", checkpoints_per_stage=3)],
            default_root_dir=tmp,
        ).fit(Seq2Seq(), DataLoader(data, batch_size=BATCH))
        for _ in range(args.reps):
            rows.append(
                timed_analysis(
                    store,
                    Seq2Seq,
                    data,
                    BATCH,
                    mean_loss,
                    task="seq2seq",
                    train={"sft": data},
                    queries=queries,
                    segments=1,
                    modules={"exclude": ["*relative_attention_bias*"]},
                )
            )
    parameters = sum(p.numel() for p in t5().parameters())
    print(
        f"`python benchmarks/seq2seq.py --examples {args.examples} --reps {args.reps}` "
        f"({platform.machine()}, torch {torch.__version__}, 2 torch threads; T5 of "
        f"{parameters / 1e6:.1f} M parameters, {args.examples} pairs of {SOURCE} + {TARGET} "
        f"tokens, batch {BATCH}, {args.queries} queries, one segment of "
        f"{rows[0]['checkpoints']} checkpoints; medians of {args.reps} analyses)\n"
    )
    labels = [*DATA_PASSES, "eigendecomposition", "rest"]
    print(
        "| analyze (s) | floor (s) | × floor | " + " | ".join(f"{x} × floor" for x in labels) + " |"
    )
    print("|---:|---:|---:|" + "---:|" * len(labels))

    def median(get: Any) -> float:
        return statistics.median(get(row) for row in rows)

    cells = [
        median(lambda r: r["analyze_s"]),
        median(lambda r: r["floor_s"]),
        median(lambda r: r["ratio"]),
        *(median(lambda r, x=x: r["passes"][x]) for x in DATA_PASSES),
        median(lambda r: r["eigendecomposition"]),
        median(lambda r: r["rest"] - r["eigendecomposition"]),
    ]
    print("| " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
