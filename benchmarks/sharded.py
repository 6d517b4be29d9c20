"""Recording an FSDP2 run: overhead against the same run without ``SourceCallback``, and memory.

Two CPU processes (gloo) train an MLP sharded with ``fully_shard`` under Lightning's
``ModelParallelStrategy`` (AdamW), with and without ``SourceCallback``, alternated in
counterbalanced pairs (each run is its own launch of this script: Lightning's launcher starts
the second rank). Reported per arm: the wall time of ``fit`` from the first training batch to
the end of ``on_train_end`` (rank 0), and every rank's peak resident memory and peak heap (the
memory malloc has handed out and not taken back, glibc's ``mallinfo2`` sampled every 20 ms:
resident memory also counts what glibc keeps of freed memory, which varies from run to run by
a few hundred MB). The "with" arm's peaks against the "without" arm's are the memory recording
adds on a rank, to set against one copy of what a checkpoint copies on that rank (its shards of
the parameters and of Adam's ``exp_avg_sq``, from the record's index).

    python benchmarks/sharded.py                      # ~20 M parameters, 60 steps, 2 pairs
    python benchmarks/sharded.py --quick              # smoke run (~2 M parameters)
    python benchmarks/sharded.py --markdown sharded.md   # also write the table
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import zarr
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from source_callback import SourceCallback
from source_callback.store import schema

WORLD = 2
BATCH = 16  # per rank


class ShardedMLP(pl.LightningModule):
    """``layers`` square linear layers with tanh, each sharded with ``fully_shard``."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            *[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers)]
        )

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for block in self.net:
            fully_shard(block, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


class HeapPeak:
    """The peak of glibc's in-use heap (``uordblks + hblkhd``), sampled in a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self._mallinfo2 = ctypes.CDLL(None).mallinfo2
        self._mallinfo2.restype = _Mallinfo2
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            info = self._mallinfo2()
            self.peak = max(self.peak, info.uordblks + info.hblkhd)

    def stop(self) -> float:
        """Stop sampling; the peak in MB."""
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def copy_mb(store: str, rank: int) -> float:
    """MB of the last checkpoint's tensors that ``rank`` copied (its pieces, from the index)."""
    checkpoints = zarr.open_group(store, mode="r")[schema.CHECKPOINTS]
    index = checkpoints[max(checkpoints.group_keys())].attrs[schema.ATTR_SHARDED]
    return (
        sum(
            count * getattr(torch, dtype).itemsize
            for rows in index[schema.PACKED_TENSORS].values()
            for _, dtype, _, pieces in rows
            for owner, _, _, count, _ in pieces
            if owner == rank
        )
        / 2**20
    )


class Clock(pl.Callback):
    """Wall time from the first training batch to the end of ``on_train_end``."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == 0 and not hasattr(self, "start"):
            self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def run(args: argparse.Namespace) -> None:
    """One arm, on every rank (Lightning's launcher re-executes this script for rank 1)."""
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = ShardedMLP(args.width, args.layers)
    clock = Clock()
    callbacks: list[pl.Callback] = []
    if args.arm == "with":
        callbacks.append(SourceCallback(args.store, stage="sft", checkpoints_per_stage=3))
    callbacks.append(clock)  # after SourceCallback: its on_train_end is inside the time
    n = BATCH * WORLD * args.steps
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(n, args.width, generator=g), torch.randn(n, args.width, generator=g)
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.root,
        callbacks=callbacks,
    )
    heap = HeapPeak()
    trainer.fit(model, DataLoader(data, batch_size=BATCH))
    rank = trainer.global_rank
    report = {
        "rank": rank,
        "seconds": clock.seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_heap_mb": heap.stop(),
        "params": sum(p.numel() for p in model.parameters()),  # global shapes (DTensors)
        "copy_mb": copy_mb(args.store, rank) if args.arm == "with" else None,
    }
    with open(os.path.join(args.root, f"result-{trainer.global_rank}.json"), "w") as f:
        json.dump(report, f)


def launch(args: argparse.Namespace, arm: str, folder: str) -> list[dict[str, Any]]:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--arm",
        arm,
        "--width",
        str(args.width),
        "--layers",
        str(args.layers),
        "--steps",
        str(args.steps),
        "--store",
        os.path.join(folder, "run.zarr"),
        "--root",
        folder,
    ]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("WORLD_SIZE", None)
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    results = [json.loads(path.read_text()) for path in sorted(Path(folder).glob("result-*.json"))]
    if out.returncode or len(results) != WORLD:
        raise RuntimeError(f"the {arm} arm failed:\n{out.stdout}\n{out.stderr}")
    return sorted(results, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", choices=["with", "without"])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--store")
    parser.add_argument("--root")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    if args.arm is not None:
        run(args)
        return
    if args.quick:
        args.width, args.layers, args.steps, args.pairs = 640, 5, 30, 1
    arms: dict[str, list[list[dict[str, Any]]]] = {"with": [], "without": []}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            order = ("without", "with") if pair % 2 == 0 else ("with", "without")
            for arm in order:
                folder = os.path.join(tmp, f"{arm}-{pair}")
                os.makedirs(folder)
                arms[arm].append(launch(args, arm, folder))
    first = arms["with"][0][0]
    seconds = {arm: statistics.median(r[0]["seconds"] for r in runs) for arm, runs in arms.items()}
    lines = [
        f"`python benchmarks/sharded.py{' --quick' if args.quick else ''}` ({WORLD} CPU "
        f"processes, gloo, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
        f"{torch.__version__}; {first['params'] / 1e6:.1f} M parameters in {args.layers} "
        f"fully_shard blocks, AdamW, {args.steps} steps of {BATCH} x {WORLD} examples, 4 "
        f"checkpoints; median of {args.pairs} alternated pairs)",
        "",
        "| | without | with | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| fit, first batch to end of `on_train_end` (s) | {seconds['without']:.2f} | "
        f"{seconds['with']:.2f} | {seconds['with'] / seconds['without']:.3f} |",
    ]
    for measure, label in (("peak_rss_mb", "peak RSS"), ("peak_heap_mb", "peak heap")):
        for rank in range(WORLD):
            peak = {arm: max(r[rank][measure] for r in runs) for arm, runs in arms.items()}
            added, copy = peak["with"] - peak["without"], arms["with"][0][rank]["copy_mb"]
            lines.append(
                f"| rank {rank} {label} (MB) | {peak['without']:.0f} | {peak['with']:.0f} | "
                f"{added:+.0f} MB, {added / copy:.1f} copies of its checkpoint ({copy:.0f} MB) |"
            )
    full_mb = sum(report["copy_mb"] for report in arms["with"][0])
    lines += [
        "",
        f"One checkpoint of the whole model (parameters and Adam's exp_avg_sq): {full_mb:.0f} MB.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
