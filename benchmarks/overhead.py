"""Recording overhead: the same Lightning run with and without ``SourceCallback``.

Both arms run in one process, interleaved in counterbalanced pairs (AB, BA, AB, ...), from the
same initial weights and data, with the same ``torch.set_num_threads``. The "with" arm records
into a fresh local store (default checkpoint plan: ``checkpoints_per_stage=6``, i.e. a stage-start
checkpoint, 5 interior ones and a stage-end one). The wall time of ``trainer.fit`` is compared.

    python benchmarks/overhead.py                 # full run (about 4 minutes on 2 CPU cores)
    python benchmarks/overhead.py --quick         # smoke run (about a minute; 150 steps, so
                                                  # the fixed per-stage costs weigh 4x more)
    python benchmarks/overhead.py --out overhead.json
    python benchmarks/overhead.py --merge a.json b.json   # pool earlier runs' repetitions
    python benchmarks/overhead.py --sizes 2M 20M 200M --markdown sizes.md   # against model size
    python benchmarks/overhead.py --framework trainer   # Hugging Face Trainer and
                                                        # SourceTrainerCallback (Llama, 300 steps)
    python benchmarks/overhead.py --framework trainer --save-steps 50   # with Trainer saves

A timing callback in *both* arms records the time of every training batch, and the recording
arm's ``SourceCallback`` hooks are timed on the training thread, so the report also shows where
the difference comes from: ordinary steps, steps that take an interior checkpoint, the stage's
start (store creation, stage-start checkpoint) and end (stage-end checkpoint, final flush,
waiting for the background writer), and the CPU the writer thread used.

``--sizes`` runs the same comparison on residual MLPs of about 2 M, 20 M and 200 M parameters
(pre-norm feed-forward blocks as in a transformer: 28, 64 and 148 tensors), fused AdamW, batch 4
(cheap steps, so recording weighs more), 200 steps between checkpoints. Each write of a
checkpoint is also timed on the writer thread (bytes of parameters and optimizer state over its
wall time) and set against the sequential write speed ``dd`` measures on the same file system,
and the stage-end wait (``on_train_end`` on the training thread) against the stage-end
checkpoint's own write.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from source_callback import SourceCallback, open_run
from source_callback.record.plan import interior_steps
from source_callback.record.recorder import Recorder
from source_callback.store import schema
from source_callback.store.writer import CheckpointSnapshot, StoreWriter


@dataclass
class Config:
    steps: int = 600
    reps: int = 6
    width: int = 1024
    depth: int = 3
    features: int = 512
    classes: int = 10
    batch_size: int = 64
    threads: int = 1
    checkpoints_per_stage: int = 6
    seed: int = 0
    blocks: int = 0  # > 0: residual feed-forward blocks of width `width` instead of `depth`
    fused: bool = False  # AdamW(fused=True)
    framework: str = "lightning"  # or "trainer": a Llama (`depth` layers of `width`), HF Trainer
    vocab: int = 2048  # trainer: vocabulary, and tokens per example
    seq_len: int = 32
    save_steps: int = 0  # trainer: > 0 saves a Trainer checkpoint every this many steps


# The Trainer arm: a Llama of 2 layers of width 128 (0.9 M parameters), batches of 8 x 32 tokens.
TRAINER: dict[str, Any] = {"width": 128, "depth": 2, "batch_size": 8, "steps": 300}


# Model sizes of ``--sizes``: residual MLPs, fused AdamW, batch 4, 200 steps between checkpoints.
SIZES: dict[str, dict[str, Any]] = {
    "2M": {"width": 256, "blocks": 4, "steps": 1000, "checkpoints_per_stage": 5, "reps": 4},
    "20M": {"width": 512, "blocks": 10, "steps": 600, "checkpoints_per_stage": 3, "reps": 3},
    "200M": {"width": 1024, "blocks": 24, "steps": 400, "checkpoints_per_stage": 2, "reps": 2},
}
SIZE_DEFAULTS: dict[str, Any] = {"batch_size": 4, "fused": True}


class Block(nn.Module):
    """A transformer's feed-forward block: ``x + W2 gelu(W1 LayerNorm(x))``, hidden 4x width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class MLP(pl.LightningModule):
    """An MLP trained with AdamW: ``depth`` plain layers, or ``blocks`` residual blocks."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width_in = cfg.features
        if cfg.blocks:
            layers.append(nn.Linear(width_in, cfg.width))
            layers += [Block(cfg.width) for _ in range(cfg.blocks)]
            width_in = cfg.width
        for _ in range(0 if cfg.blocks else cfg.depth):
            layers += [nn.Linear(width_in, cfg.width), nn.GELU()]
            width_in = cfg.width
        layers.append(nn.Linear(width_in, cfg.classes))
        self.net = nn.Sequential(*layers)
        self.fused = cfg.fused

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=1e-3, weight_decay=0.01, fused=self.fused or None
        )
        total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / (total + 1))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class BatchTimer(pl.Callback):
    """When each training batch starts, how long it takes (start to end hook), the stage's edges."""

    def __init__(self) -> None:
        self.batches: list[float] = []
        self.starts: list[float] = []
        self.fit_start = self.train_start = self.first_batch = self.last_batch_end = 0.0
        self.fit_end = 0.0
        self._t = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_start = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_start = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._t = time.perf_counter()
        self.starts.append(self._t)
        if not self.batches:
            self.first_batch = self._t

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.last_batch_end = time.perf_counter()
        self.batches.append(self.last_batch_end - self._t)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_end = time.perf_counter()


LIGHTNING_HOOKS = (
    "setup",
    "on_train_start",
    "on_train_batch_start",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_train_end",
    "state_dict",
    "teardown",
)
# SourceTrainerCallback's: ``_on_forward`` is its forward hook on the model (bound when
# ``on_train_begin`` registers it), ``state`` what each Trainer save calls.
TRAINER_HOOKS = (
    "on_train_begin",
    "on_step_begin",
    "_on_forward",
    "on_pre_optimizer_step",
    "on_step_end",
    "state",
    "on_train_end",
)


def time_hooks(callback: Any, hooks: tuple[str, ...]) -> dict[str, float]:
    """Wrap the callback's hooks (on this instance) to sum their wall time on the calling thread.

    Lightning and the Trainer look hooks up on the callback object, so instance attributes take
    effect. The wrapper costs two ``perf_counter`` calls per hook call.
    """
    totals = dict.fromkeys(hooks, 0.0)

    def wrap(name: str) -> None:
        hook = getattr(callback, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - t

        setattr(callback, name, timed)

    for name in hooks:
        wrap(name)
    return totals


@contextlib.contextmanager
def timed_writes() -> Iterator[list[dict[str, Any]]]:
    """Time every ``StoreWriter.write_checkpoint`` (on the writer thread) while in the block.

    Yields a list that gets, per checkpoint, its role, its bytes in memory (parameters, buffers
    and optimizer state) and the wall time of its write and commit.
    """
    writes: list[dict[str, Any]] = []
    original = StoreWriter.write_checkpoint

    def timed(
        self: StoreWriter, step: int, role: str, stage: int, snapshot: CheckpointSnapshot
    ) -> str:
        size = sum(a.nbytes for a in snapshot.packed.arrays.values())
        start = time.perf_counter()
        key = original(self, step, role, stage, snapshot)
        writes.append({"role": role, "bytes": size, "seconds": time.perf_counter() - start})
        return key

    StoreWriter.write_checkpoint = timed  # type: ignore[method-assign]
    try:
        yield writes
    finally:
        StoreWriter.write_checkpoint = original  # type: ignore[method-assign]


@contextlib.contextmanager
def timed_stage_end() -> Iterator[dict[str, float]]:
    """Time ``Recorder.end_stage`` on the training thread, and the part of it blocked on writes.

    Yields a dict that gets ``total_s`` (the stage-end checkpoint's probe and copy, handing the
    last rows to the writer, waiting for the writes, closing the stage) and ``blocked_s`` (the
    time in ``Recorder.wait`` inside it: waiting for the stage-end checkpoint's write, the
    rows, and the stage's closing write).
    """
    times = {"total_s": 0.0, "blocked_s": 0.0}
    end_stage, wait = Recorder.end_stage, Recorder.wait
    inside = threading.Event()

    def timed_end(self: Recorder, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        inside.set()
        try:
            end_stage(self, *args, **kwargs)
        finally:
            inside.clear()
            times["total_s"] += time.perf_counter() - start

    def timed_wait(self: Recorder) -> None:
        start = time.perf_counter()
        try:
            wait(self)
        finally:
            if inside.is_set():
                times["blocked_s"] += time.perf_counter() - start

    Recorder.end_stage, Recorder.wait = timed_end, timed_wait  # type: ignore[method-assign]
    try:
        yield times
    finally:
        Recorder.end_stage, Recorder.wait = end_stage, wait  # type: ignore[method-assign]


class TokenData(Dataset):
    """Random token sequences as the Trainer takes them (``labels`` are the inputs)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_data(cfg: Config) -> Dataset:
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.steps * cfg.batch_size
    if cfg.framework == "trainer":
        return TokenData(torch.randint(0, cfg.vocab, (n, cfg.seq_len), generator=g))
    x = torch.randn(n, cfg.features, generator=g)
    y = torch.randint(0, cfg.classes, (n,), generator=g)
    return TensorDataset(x, y)


def make_model(cfg: Config) -> nn.Module:
    """The arm's model: :class:`MLP`, or for the Trainer a Llama built from a config."""
    if cfg.framework != "trainer":
        return MLP(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.width,
        intermediate_size=4 * cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=cfg.seq_len,
    )
    return LlamaForCausalLM(config)


def fit_trainer(
    cfg: Config, model: nn.Module, data: Dataset, record: bool, workdir: str
) -> tuple[BatchTimer, dict[str, float], Any]:
    """A Hugging Face ``Trainer`` for the run (with ``SourceTrainerCallback`` when recording).

    Returns the step timer, the callback's hook times and a function that trains.
    """
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from source_callback import SourceTrainerCallback

    hf_logging.disable_progress_bar()  # the bars of each Trainer save

    timer = BatchTimer()

    class StepTimer(TrainerCallback):
        """``timer``'s times from the Trainer's hooks: optimizer steps for batches."""

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            timer.on_train_start(None, None)

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            timer.on_train_batch_start(None)

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            timer.on_train_batch_end(None)

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            timer.on_fit_end(None, None)

    callbacks: list[Any] = [StepTimer()]
    hook_times: dict[str, float] = {}
    if record:
        callback = SourceTrainerCallback(
            os.path.join(workdir, "run.zarr"),
            stage="bench",
            checkpoints_per_stage=cfg.checkpoints_per_stage,
        )
        hook_times = time_hooks(callback, TRAINER_HOOKS)
        callbacks.append(callback)
    args = TrainingArguments(
        output_dir=workdir,
        per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.steps,
        learning_rate=1e-3,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        optim="adamw_torch_fused" if cfg.fused else "adamw_torch",
        use_cpu=True,
        report_to=[],
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=cfg.seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    return timer, hook_times, trainer.train


def fit_lightning(
    cfg: Config, model: nn.Module, data: Dataset, record: bool, workdir: str
) -> tuple[BatchTimer, dict[str, float], Any]:
    """As :func:`fit_trainer`, for Lightning and ``SourceCallback``."""
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=False, num_workers=0)
    timer = BatchTimer()
    callbacks: list[pl.Callback] = [timer]
    hook_times: dict[str, float] = {}
    if record:
        callback = SourceCallback(
            os.path.join(workdir, "run.zarr"),
            stage="bench",
            checkpoints_per_stage=cfg.checkpoints_per_stage,
        )
        hook_times = time_hooks(callback, LIGHTNING_HOOKS)
        callbacks.append(callback)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=workdir,
    )
    return timer, hook_times, lambda: trainer.fit(model, loader)


def run_once(
    cfg: Config, data: Dataset, init: dict[str, torch.Tensor], record: bool, workdir: str
) -> dict[str, Any]:
    """One training run; returns its timings (and the store's size for the recording arm)."""
    torch.manual_seed(cfg.seed)
    model = make_model(cfg)
    model.load_state_dict(init)
    fit = fit_trainer if cfg.framework == "trainer" else fit_lightning
    timer, hook_times, train = fit(cfg, model, data, record, workdir)
    store = os.path.join(workdir, "run.zarr")
    cpu0, thread0 = time.process_time(), time.thread_time()
    with timed_writes() as writes, timed_stage_end() as stage_end:
        start = time.perf_counter()
        train()
        wall = time.perf_counter() - start
    result: dict[str, Any] = {
        "wall_s": wall,
        "thread_cpu_s": time.thread_time() - thread0,
        "process_cpu_s": time.process_time() - cpu0,
        "setup_s": timer.train_start - start,
        "train_start_s": timer.first_batch - timer.train_start,
        "batches_s": timer.last_batch_end - timer.first_batch,
        "train_end_s": timer.fit_end - timer.last_batch_end,
        "teardown_s": start + wall - timer.fit_end,
        "outside_batches_s": wall - (timer.last_batch_end - timer.first_batch),
        "batch_times": timer.batches,
        "intervals": np.diff(timer.starts).tolist(),
        "hook_s": dict(hook_times),
        "writes": writes,
        "stage_end": stage_end,
    }
    if record:
        run = open_run(store)
        result["store_steps"] = run.num_steps
        result["store_checkpoints"] = len(run.checkpoints)
        result["store_bytes"] = sum(
            os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(store) for f in files
        )
    return result


def bootstrap_ratio(a: list[float], b: list[float], n: int = 4000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of median(a) / median(b), resampling each arm independently."""
    rng = np.random.default_rng(seed)
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    ia = rng.integers(0, len(a_arr), size=(n, len(a_arr)))
    ib = rng.integers(0, len(b_arr), size=(n, len(b_arr)))
    ratios = np.median(a_arr[ia], axis=1) / np.median(b_arr[ib], axis=1)
    return [float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))]


def cost_split(
    runs: dict[str, list[dict[str, Any]]], steps: int, checkpoints_per_stage: int
) -> dict[str, float]:
    """Split the difference between the arms into costs per step, per checkpoint and per stage.

    From the intervals between consecutive batch starts (everything done on the training thread
    per step, every hook included; the first interval is left out as a warm-up):

    - per step: the difference of the arms' mean ordinary intervals. This includes the writer
      thread competing for the CPU while it writes a checkpoint; the difference of the medians
      (``per_step_median_s``) leaves that out when it slows fewer than half of the steps;
    - per interior checkpoint: the recording arm's mean checkpoint interval minus its mean
      ordinary one (the tensors' CPU copy, and any wait for a free writer slot);
    - fixed per stage: the difference of the time outside the batches (setup, creating the
      store, the stage-start checkpoint; the stage-end checkpoint and the wait for the writer).

    ``steady_overhead`` is the fraction added to a long stage with the same number of steps
    between checkpoints (per step and per checkpoint; the fixed cost left out).
    """
    with_, without = runs["with"], runs["without"]
    planned = set(interior_steps(steps, checkpoints_per_stage))

    def intervals(arm: list[dict[str, Any]], checkpoint: bool) -> list[float]:
        return [
            t
            for r in arm
            for i, t in enumerate(r["intervals"])
            if i > 0 and (i in planned) == checkpoint
        ]

    step_with, step_without = intervals(with_, False), intervals(without, False)
    mean_with, mean_without = statistics.fmean(step_with), statistics.fmean(step_without)
    at_checkpoints = intervals(with_, True)
    per_checkpoint = statistics.fmean(at_checkpoints) - mean_with if at_checkpoints else math.nan
    outside_with = statistics.median(r["outside_batches_s"] for r in with_)
    outside_without = statistics.median(r["outside_batches_s"] for r in without)
    gap = steps / checkpoints_per_stage
    per_step = mean_with - mean_without
    return {
        "steps": steps,
        "interior_checkpoints": len(planned),
        "steps_between_checkpoints": gap,
        "step_without_s": mean_without,
        "step_with_s": mean_with,
        "per_step_s": per_step,
        "per_step_median_s": statistics.median(step_with) - statistics.median(step_without),
        "per_checkpoint_s": per_checkpoint,
        "stage_fixed_s": outside_with - outside_without,
        "steady_overhead": (per_step * gap + per_checkpoint) / (gap * mean_without),
    }


def writer_summary(arm: list[dict[str, Any]]) -> dict[str, float]:
    """Checkpoint writes on the writer thread, and the stage-end wait against one of them.

    Throughput is a checkpoint's bytes in memory (parameters, buffers, optimizer state) over
    the wall time of its write, medians over the checkpoints that hold optimizer state (all but
    the stage-start ones). The stage-end wait is ``on_train_end`` on the training thread: the
    stage-end checkpoint's probe and CPU copy, its write, anything still pending before it, and
    closing the stage; "blocked" is the part of it spent waiting for writes (everything but the
    probe and the copy, which every checkpoint costs the training thread).
    """
    writes = [w for r in arm for w in r["writes"]]
    full = [w for w in writes if w["role"] != schema.ROLE_START]

    def end_write(run: dict[str, Any]) -> float:
        return next(w["seconds"] for w in run["writes"] if w["role"] == schema.ROLE_END)

    write_s = statistics.median(w["seconds"] for w in full)
    wait_s = statistics.median(r["hook_s"]["on_train_end"] for r in arm)
    return {
        "checkpoints": len(writes) / len(arm),
        "checkpoint_bytes": statistics.median(w["bytes"] for w in full),
        "write_s": write_s,
        "write_mb_s": statistics.median(w["bytes"] / w["seconds"] / 1e6 for w in full),
        "end_write_s": statistics.median(end_write(r) for r in arm),
        "stage_end_wait_s": wait_s,
        "wait_over_end_write": statistics.median(
            r["hook_s"]["on_train_end"] / end_write(r) for r in arm
        ),
        "wait_over_write": wait_s / write_s,
        "stage_end_blocked_s": statistics.median(r["stage_end"]["blocked_s"] for r in arm),
        "blocked_over_end_write": statistics.median(
            r["stage_end"]["blocked_s"] / end_write(r) for r in arm
        ),
    }


def summarize(cfg: Config, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    with_, without = runs["with"], runs["without"]
    w = [r["wall_s"] for r in with_]
    wo = [r["wall_s"] for r in without]
    planned = set(interior_steps(cfg.steps, cfg.checkpoints_per_stage))

    def batch_split(arm: list[dict[str, Any]]) -> dict[str, float]:
        timed = [r["batch_times"] for r in arm if r.get("batch_times")]
        ordinary = [t for times in timed for i, t in enumerate(times) if i not in planned]
        ckpt = [t for times in timed for i, t in enumerate(times) if i in planned]

        def ms(values: list[float], mean: bool = False) -> float:
            if not values:
                return float("nan")
            return 1e3 * (statistics.fmean(values) if mean else statistics.median(values))

        return {
            "median_batch_ms": ms(ordinary),
            "mean_batch_ms": ms(ordinary, mean=True),
            "median_checkpoint_batch_ms": ms(ckpt),
            "median_train_start_ms": ms([r["train_start_s"] for r in arm]),
            "median_train_end_ms": ms([r["train_end_s"] for r in arm]),
            "median_setup_ms": ms([r["setup_s"] for r in arm]),
            "median_teardown_ms": ms([r["teardown_s"] for r in arm]),
        }

    pairs = [a / b for a, b in zip(w, wo, strict=True)]

    def med(arm: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in arm)

    return {
        "median_with_s": statistics.median(w),
        "median_without_s": statistics.median(wo),
        "min_with_s": min(w),
        "min_without_s": min(wo),
        "ratio_median": statistics.median(w) / statistics.median(wo),
        "ratio_min": min(w) / min(wo),
        "ratio_bootstrap_95": bootstrap_ratio(w, wo),
        "paired_ratios": pairs,
        "ratio_paired_median": statistics.median(pairs),
        "step_ms_without": 1e3 * statistics.median(wo) / cfg.steps,
        "median_thread_cpu_with_s": med(with_, "thread_cpu_s"),
        "median_thread_cpu_without_s": med(without, "thread_cpu_s"),
        "median_process_cpu_with_s": med(with_, "process_cpu_s"),
        "median_process_cpu_without_s": med(without, "process_cpu_s"),
        "breakdown_with": batch_split(with_),
        "breakdown_without": batch_split(without),
        "callback_hooks_ms": {
            name: 1e3 * statistics.median(r["hook_s"][name] for r in with_)
            for name in with_[0]["hook_s"]
        },
        "callback_total_ms": 1e3 * statistics.median(sum(r["hook_s"].values()) for r in with_),
        "store_bytes": with_[0].get("store_bytes"),
        "store_checkpoints": with_[0].get("store_checkpoints"),
        # Runs from before these were timed (pooled with --merge) have neither.
        "split": (
            cost_split(runs, cfg.steps, cfg.checkpoints_per_stage)
            if "intervals" in with_[0]
            else None
        ),
        "writer": writer_summary(with_) if with_[0].get("writes") else None,
    }


def print_table(cfg: Config, s: dict[str, Any]) -> None:
    bw, bo = s["breakdown_with"], s["breakdown_without"]
    lo, hi = s["ratio_bootstrap_95"]
    print()
    trainer = cfg.framework == "trainer"
    if trainer:
        model = (
            f"Hugging Face Trainer, Llama {cfg.depth} layers of {cfg.width}, vocabulary "
            f"{cfg.vocab}, batch {cfg.batch_size} x {cfg.seq_len} tokens"
        )
        saves = f", a Trainer save every {cfg.save_steps} steps" if cfg.save_steps else ""
    else:
        hidden = (
            f"{cfg.blocks} residual blocks of {cfg.width}"
            if cfg.blocks
            else f"{cfg.depth}x{cfg.width}"
        )
        model = f"Lightning, MLP {cfg.features}->{hidden}->{cfg.classes}, batch {cfg.batch_size}"
        saves = ""
    print(
        f"model: {model}, {'fused ' * cfg.fused}AdamW, {cfg.steps} steps{saves}, "
        f"checkpoints_per_stage {cfg.checkpoints_per_stage}, torch threads {cfg.threads}, "
        f"{cfg.reps} reps per arm"
    )
    # The Trainer's hooks for Lightning's: train() for fit(), optimizer steps for batches.
    start, first, end, returns = (
        ("train() -> on_train_begin", "on_train_begin -> 1st step", "last step -> on_train_end",
         "on_train_end -> train() returns")
        if trainer
        else ("setup -> on_train_start", "on_train_start -> 1st batch",
              "last batch -> on_fit_end", "on_fit_end -> fit returns")
    )  # fmt: skip
    print(f"{'':38}{'without':>12}{'with':>12}{'ratio':>9}")
    rows = [
        ("fit wall time, median (s)", s["median_without_s"], s["median_with_s"]),
        ("fit wall time, min (s)", s["min_without_s"], s["min_with_s"]),
        (
            "training-thread CPU, median (s)",
            s["median_thread_cpu_without_s"],
            s["median_thread_cpu_with_s"],
        ),
        (
            "process CPU (all threads), median (s)",
            s["median_process_cpu_without_s"],
            s["median_process_cpu_with_s"],
        ),
        ("ordinary batch, median (ms)", bo["median_batch_ms"], bw["median_batch_ms"]),
        ("ordinary batch, mean (ms)", bo["mean_batch_ms"], bw["mean_batch_ms"]),
        (
            "interior-checkpoint batch (ms)",
            bo["median_checkpoint_batch_ms"],
            bw["median_checkpoint_batch_ms"],
        ),
        (f"{start} (ms)", bo["median_setup_ms"], bw["median_setup_ms"]),
        (f"{first} (ms)", bo["median_train_start_ms"], bw["median_train_start_ms"]),
        (f"{end} (ms)", bo["median_train_end_ms"], bw["median_train_end_ms"]),
        (f"{returns} (ms)", bo["median_teardown_ms"], bw["median_teardown_ms"]),
    ]
    for label, a, b in rows:
        print(f"{label:38}{a:12.3f}{b:12.3f}{b / a:9.3f}")
    print(
        f"\nstep time (without): {s['step_ms_without']:.1f} ms/step; overhead ratio "
        f"(median with / median without): {s['ratio_median']:.4f} "
        f"[bootstrap 95% {lo:.4f}-{hi:.4f}], min/min {s['ratio_min']:.4f}, "
        f"median of paired ratios {s['ratio_paired_median']:.4f}"
    )
    total = s["callback_total_ms"]
    print(
        f"{'SourceTrainerCallback' if trainer else 'SourceCallback'} hooks on the training "
        f"thread: {total:.0f} ms per run (median), "
        f"{total / 1e3 / s['median_without_s']:.2%} of the run without it:"
    )
    for name, ms in s["callback_hooks_ms"].items():
        print(f"  {name:26}{ms:9.1f} ms")
    if trainer and cfg.save_steps:
        saves = cfg.steps // cfg.save_steps
        state = s["callback_hooks_ms"]["state"]
        print(
            f"Trainer saves: {saves} per run; the callback's state() (waiting for the buffered "
            f"step rows) took {state / saves:.1f} ms per save"
        )
    background = s["median_process_cpu_with_s"] - s["median_thread_cpu_with_s"]
    print(
        f"CPU used off the training thread in the recording arm (writer, codecs; process CPU "
        f"minus training-thread CPU, medians): {background:.2f} s"
    )
    if s["store_bytes"] is not None:
        print(
            f"store: {s['store_checkpoints']} checkpoints, "
            f"{s['store_bytes'] / 2**20:.1f} MiB on disk"
        )
    if s["split"] is not None:
        c = s["split"]
        print(
            f"cost per step {c['per_step_s'] * 1e3:+.2f} ms (mean; median "
            f"{c['per_step_median_s'] * 1e3:+.2f} ms), per interior checkpoint "
            f"{c['per_checkpoint_s'] * 1e3:+.1f} ms, fixed per stage {c['stage_fixed_s']:+.3f} s; "
            f"at {c['steps_between_checkpoints']:.0f} steps between checkpoints a long stage "
            f"takes {c['steady_overhead']:+.2%}"
        )
    if s["writer"] is not None:
        w = s["writer"]
        print(
            f"checkpoint write (writer thread): {w['checkpoint_bytes'] / 1e6:.1f} MB in "
            f"{w['write_s']:.3f} s, {w['write_mb_s']:.0f} MB/s; stage-end wait "
            f"{w['stage_end_wait_s']:.3f} s = {w['wait_over_end_write']:.2f} x the stage-end "
            f"checkpoint's write ({w['end_write_s']:.3f} s), {w['wait_over_write']:.2f} x the "
            f"median write; blocked on writes {w['stage_end_blocked_s']:.3f} s = "
            f"{w['blocked_over_end_write']:.2f} x the stage-end checkpoint's write"
        )


def merge(paths: list[str], out: str | None) -> dict[str, Any]:
    """Pool the repetitions of several result files of the same configuration."""
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    configs = [{k: v for k, v in r["config"].items() if k != "reps"} for r in reports]
    if any(c != configs[0] for c in configs):
        raise SystemExit(f"--merge: the files were run with different configurations: {configs}")
    runs: dict[str, list[dict[str, Any]]] = {
        arm: [run for r in reports for run in r["runs"][arm]] for arm in ("with", "without")
    }
    for arm_runs in runs.values():
        for run in arm_runs:
            run.setdefault("hook_s", dict.fromkeys(LIGHTNING_HOOKS, float("nan")))
    cfg = Config(**{**configs[0], "reps": len(runs["with"])})
    summary = summarize(cfg, runs)
    print(f"pooled {len(paths)} files: {', '.join(paths)}")
    print_table(cfg, summary)
    report = {"config": asdict(cfg), "merged_from": paths, "summary": summary}
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {out}")
    return report


def measure(cfg: Config) -> dict[str, Any]:
    """Warm up, then alternate the arms ``cfg.reps`` times; print and return the report."""
    torch.set_num_threads(cfg.threads)
    data = make_data(cfg)
    torch.manual_seed(cfg.seed)
    init = {k: v.clone() for k, v in make_model(cfg).state_dict().items()}
    params = sum(v.numel() for v in init.values())
    print(
        f"{params / 1e6:.1f} M parameters in {len(init)} tensors, "
        f"{params * 4 / 2**20:.0f} MiB in float32",
        flush=True,
    )

    runs: dict[str, list[dict[str, Any]]] = {"with": [], "without": []}
    root = tempfile.mkdtemp(prefix="sc-overhead-")
    try:
        # Warm-up (not counted): imports, allocator, zarr's event loop and thread pools.
        warm = replace(cfg, steps=min(cfg.steps, 20))
        for record in (False, True):
            workdir = tempfile.mkdtemp(dir=root)
            run_once(warm, make_data(warm), init, record, workdir)
            shutil.rmtree(workdir)
        for rep in range(cfg.reps):
            order = (False, True) if rep % 2 == 0 else (True, False)
            for record in order:
                workdir = tempfile.mkdtemp(dir=root)
                result = run_once(cfg, data, init, record, workdir)
                shutil.rmtree(workdir)
                arm = "with" if record else "without"
                runs[arm].append(result)
                print(f"rep {rep + 1}/{cfg.reps} {arm:>7}: {result['wall_s']:.3f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    summary = summarize(cfg, runs)
    print_table(cfg, summary)
    return {
        "config": asdict(cfg),
        "parameters": params,
        "tensors": len(init),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "argv": sys.argv,
            "loadavg_at_end": list(os.getloadavg()),
        },
        "summary": summary,
        "runs": {
            arm: [
                {
                    **r,
                    "batch_times": [round(t, 6) for t in r["batch_times"]],
                    "intervals": [round(t, 6) for t in r["intervals"]],
                }
                for r in rs
            ]
            for arm, rs in runs.items()
        },
    }


def disk_speed(directory: str, mib: int) -> dict[str, float]:
    """Sequential write speed of ``directory``'s file system by ``dd`` (``mib`` MiB), in MB/s.

    ``fdatasync``: through the page cache, flushed to the device before ``dd`` returns;
    ``direct``: bypassing the cache (``O_DIRECT``).
    """
    path = os.path.join(directory, "sc-dd.bin")
    speeds = {}
    try:
        for name, flag in (("fdatasync", "conv=fdatasync"), ("direct", "oflag=direct")):
            done = subprocess.run(
                ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", flag],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "LC_ALL": "C"},
            )
            found = re.search(r"^(\d+) bytes.* copied, ([\d.e+-]+) s", done.stderr, re.M)
            if found is None:
                raise RuntimeError(f"unexpected dd output: {done.stderr!r}")
            speeds[name] = int(found[1]) / float(found[2]) / 1e6
    finally:
        if os.path.exists(path):
            os.remove(path)
    return speeds


def command(script: str, argv: list[str]) -> str:
    """The command line of ``benchmarks/<script>`` that measures the same (no output paths)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out", "--markdown", "--workdir"):
            skip = True
        elif not arg.startswith(("--out=", "--markdown=", "--workdir=")):
            kept.append(arg)
    return " ".join([f"python benchmarks/{script}", *kept])


def by_size(names: list[str], quick: bool, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The comparison for each model size of ``SIZES``, with ``dd`` before and after.

    ``quick``: 400 steps with one interior checkpoint and one repetition per size;
    ``overrides`` (``Config`` fields) apply to every size after that.
    """
    loadavg = [list(os.getloadavg())]
    disk = [disk_speed(tempfile.gettempdir(), 256 if quick else 1024)]
    reports = {}
    for name in names:
        preset = {**SIZE_DEFAULTS, **SIZES[name]}
        if quick:
            preset.update(steps=400, checkpoints_per_stage=2, reps=1)
        preset.update(overrides)
        cfg = Config(**preset)
        print(f"\n== {name}: {cfg}", flush=True)
        reports[name] = measure(cfg)
    disk.append(disk_speed(tempfile.gettempdir(), 256 if quick else 1024))
    loadavg.append(list(os.getloadavg()))
    return {"sizes": reports, "disk_mb_s": disk, "loadavg": loadavg}


def sizes_markdown(result: dict[str, Any]) -> str:
    """The results of :func:`by_size` as markdown tables."""
    disk = {k: [d[k] for d in result["disk_mb_s"]] for k in result["disk_mb_s"][0]}
    sync = statistics.fmean(disk["fdatasync"])
    (start, *_), (end, *_) = result["loadavg"]
    first = next(iter(result["sizes"].values()))
    env = first["environment"]
    lines = [
        f"`{result['command']}`; "
        f"{env['machine']}, {env['cpu_count']} CPUs, torch {env['torch']} "
        f"({first['config']['threads']} thread), Lightning {env['lightning']}; 1-minute load "
        f"average {start:.1f} at the start, {end:.1f} at the end. `dd` on the stores' file "
        f"system (1 MiB blocks, before and after): "
        + ", ".join(f"{' / '.join(f'{v:.0f}' for v in vs)} MB/s ({k})" for k, vs in disk.items())
        + ".",
        "",
        "| model | parameters (tensors) | step without (ms) | steps (between checkpoints) "
        "| reps | fit without (s) | fit with (s) | ratio of medians (95 %) | paired ratios "
        "| per step (ms) | per interior checkpoint (ms) | fixed per stage (s) "
        "| long stage at this spacing |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["sizes"].items():
        s, c, cfg = r["summary"], r["summary"]["split"], r["config"]
        lo, hi = s["ratio_bootstrap_95"]
        paired = ", ".join(f"{x:.3f}" for x in s["paired_ratios"])
        lines.append(
            f"| {name} | {r['parameters'] / 1e6:.1f} M ({r['tensors']}) "
            f"| {c['step_without_s'] * 1e3:.1f} | {cfg['steps']} "
            f"({c['steps_between_checkpoints']:.0f}) | {cfg['reps']} "
            f"| {s['median_without_s']:.2f} | {s['median_with_s']:.2f} "
            f"| {s['ratio_median']:.3f} ({lo:.3f}–{hi:.3f}) | {paired} "
            f"| {c['per_step_s'] * 1e3:+.2f} (median {c['per_step_median_s'] * 1e3:+.2f}) "
            f"| {c['per_checkpoint_s'] * 1e3:+.0f} | {c['stage_fixed_s']:+.2f} "
            f"| {c['steady_overhead']:+.1%} |"
        )
    lines += [
        "",
        "| model | checkpoint (MB) | write on the writer thread (s) | writer (MB/s) "
        "| of `dd` fdatasync | stage-end wait (s) | stage-end checkpoint's write (s) "
        "| wait / that write | wait / median write | blocked on writes (s) "
        "| blocked / that write |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["sizes"].items():
        w = r["summary"]["writer"]
        lines.append(
            f"| {name} | {w['checkpoint_bytes'] / 1e6:.0f} | {w['write_s']:.3f} "
            f"| {w['write_mb_s']:.0f} | {w['write_mb_s'] / sync:.0%} "
            f"| {w['stage_end_wait_s']:.3f} | {w['end_write_s']:.3f} "
            f"| {w['wait_over_end_write']:.2f} | {w['wait_over_write']:.2f} "
            f"| {w['stage_end_blocked_s']:.3f} | {w['blocked_over_end_write']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--steps", type=int, help="optimizer steps per run")
    parser.add_argument("--reps", type=int, help="repetitions per arm")
    parser.add_argument("--width", type=int, help="hidden width")
    parser.add_argument("--depth", type=int, help="hidden layers")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for both arms")
    parser.add_argument("--checkpoints-per-stage", type=int)
    parser.add_argument(
        "--framework",
        choices=["lightning", "trainer"],
        default="lightning",
        help="Lightning and SourceCallback (an MLP), or the Hugging Face Trainer and "
        "SourceTrainerCallback (a Llama built from a config)",
    )
    parser.add_argument(
        "--save-steps", type=int, help="with --framework trainer: a Trainer save every N steps"
    )
    parser.add_argument("--out", help="write the results as JSON to this path")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="summarize the runs of earlier --out files together (same configuration) instead "
        "of running",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=list(SIZES),
        help="compare at these model sizes (residual MLPs, fused AdamW; the options above "
        "override their settings)",
    )
    parser.add_argument("--markdown", help="with --sizes: write the tables here")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    names = ("steps", "reps", "width", "depth", "batch_size", "threads", "checkpoints_per_stage")
    names += ("framework", "save_steps")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.sizes:
        report = by_size(args.sizes, args.quick, overrides)
        report["command"] = command("overhead.py", sys.argv[1:] if argv is None else argv)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(sizes_markdown(report) + "\n")
            print(f"wrote {args.markdown}")
    else:
        preset = TRAINER if args.framework == "trainer" else {}
        quick = {"steps": 60 if preset else 150, "reps": 2 if preset else 3}
        report = measure(Config(**{**preset, **(quick if args.quick else {}), **overrides}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
