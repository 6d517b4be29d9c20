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

A timing callback in *both* arms records the time of every training batch, and the recording
arm's ``SourceCallback`` hooks are timed on the training thread, so the report also shows where
the difference comes from: ordinary steps, steps that take an interior checkpoint, the stage's
start (store creation, stage-start checkpoint) and end (stage-end checkpoint, final flush,
waiting for the background writer), and the CPU the writer thread used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from source_callback import SourceCallback, open_run
from source_callback.record.plan import interior_steps


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


class MLP(pl.LightningModule):
    """A plain MLP trained with AdamW: heavy enough that one optimizer step takes tens of ms."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width_in = cfg.features
        for _ in range(cfg.depth):
            layers += [nn.Linear(width_in, cfg.width), nn.GELU()]
            width_in = cfg.width
        layers.append(nn.Linear(width_in, cfg.classes))
        self.net = nn.Sequential(*layers)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)
        total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / (total + 1))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class BatchTimer(pl.Callback):
    """Wall time of every training batch (start hook to end hook) and of the stage's edges."""

    def __init__(self) -> None:
        self.batches: list[float] = []
        self.fit_start = self.train_start = self.first_batch = self.last_batch_end = 0.0
        self.fit_end = 0.0
        self._t = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_start = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_start = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._t = time.perf_counter()
        if not self.batches:
            self.first_batch = self._t

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.last_batch_end = time.perf_counter()
        self.batches.append(self.last_batch_end - self._t)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_end = time.perf_counter()


HOOKS = (
    "setup",
    "on_train_start",
    "on_train_batch_start",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_train_end",
    "state_dict",
    "teardown",
)


def time_hooks(callback: pl.Callback) -> dict[str, float]:
    """Wrap the callback's hooks (on this instance) to sum their wall time on the calling thread.

    Lightning looks hooks up with ``getattr(callback, name)``, so instance attributes take
    effect. The wrapper costs two ``perf_counter`` calls per hook call.
    """
    totals = dict.fromkeys(HOOKS, 0.0)

    def wrap(name: str) -> None:
        hook = getattr(callback, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - t

        setattr(callback, name, timed)

    for name in HOOKS:
        wrap(name)
    return totals


def make_data(cfg: Config) -> TensorDataset:
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.steps * cfg.batch_size
    x = torch.randn(n, cfg.features, generator=g)
    y = torch.randint(0, cfg.classes, (n,), generator=g)
    return TensorDataset(x, y)


def run_once(
    cfg: Config, data: TensorDataset, init: dict[str, torch.Tensor], record: bool, workdir: str
) -> dict[str, Any]:
    """One training run; returns its timings (and the store's size for the recording arm)."""
    torch.manual_seed(cfg.seed)
    model = MLP(cfg)
    model.load_state_dict(init)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=False, num_workers=0)
    timer = BatchTimer()
    callbacks: list[pl.Callback] = [timer]
    store = os.path.join(workdir, "run.zarr")
    hook_times: dict[str, float] = {}
    if record:
        callback = SourceCallback(
            store, stage="bench", checkpoints_per_stage=cfg.checkpoints_per_stage
        )
        hook_times = time_hooks(callback)
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
    cpu0, thread0 = time.process_time(), time.thread_time()
    start = time.perf_counter()
    trainer.fit(model, loader)
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
        "batch_times": timer.batches,
        "hook_s": dict(hook_times),
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
            name: 1e3 * statistics.median(r["hook_s"][name] for r in with_) for name in HOOKS
        },
        "callback_total_ms": 1e3 * statistics.median(sum(r["hook_s"].values()) for r in with_),
        "store_bytes": with_[0].get("store_bytes"),
        "store_checkpoints": with_[0].get("store_checkpoints"),
    }


def print_table(cfg: Config, s: dict[str, Any]) -> None:
    bw, bo = s["breakdown_with"], s["breakdown_without"]
    lo, hi = s["ratio_bootstrap_95"]
    print()
    print(
        f"model: MLP {cfg.features}->{cfg.depth}x{cfg.width}->{cfg.classes}, AdamW, batch "
        f"{cfg.batch_size}, {cfg.steps} steps, torch threads {cfg.threads}, "
        f"{cfg.reps} reps per arm"
    )
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
        ("setup -> on_train_start (ms)", bo["median_setup_ms"], bw["median_setup_ms"]),
        (
            "on_train_start -> 1st batch (ms)",
            bo["median_train_start_ms"],
            bw["median_train_start_ms"],
        ),
        ("last batch -> on_fit_end (ms)", bo["median_train_end_ms"], bw["median_train_end_ms"]),
        ("on_fit_end -> fit returns (ms)", bo["median_teardown_ms"], bw["median_teardown_ms"]),
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
        f"SourceCallback hooks on the training thread: {total:.0f} ms per run (median), "
        f"{total / 1e3 / s['median_without_s']:.2%} of the run without it:"
    )
    for name, ms in s["callback_hooks_ms"].items():
        print(f"  {name:26}{ms:9.1f} ms")
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
            run.setdefault("hook_s", dict.fromkeys(HOOKS, float("nan")))
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
    parser.add_argument("--out", help="write the results as JSON to this path")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="summarize the runs of earlier --out files together (same configuration) instead "
        "of running",
    )
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)

    cfg = Config(steps=150, reps=3) if args.quick else Config()
    for name in ("steps", "reps", "width", "depth", "batch_size", "threads"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.checkpoints_per_stage is not None:
        cfg.checkpoints_per_stage = args.checkpoints_per_stage

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(cfg.threads)

    data = make_data(cfg)
    torch.manual_seed(cfg.seed)
    init = {k: v.clone() for k, v in MLP(cfg).state_dict().items()}
    params = sum(v.numel() for v in init.values())
    print(f"{params / 1e6:.1f} M parameters, {params * 4 / 2**20:.0f} MiB in float32", flush=True)

    runs: dict[str, list[dict[str, Any]]] = {"with": [], "without": []}
    root = tempfile.mkdtemp(prefix="sc-overhead-")
    try:
        # Warm-up (not counted): imports, allocator, zarr's event loop and thread pools.
        warm = Config(**{**asdict(cfg), "steps": min(cfg.steps, 20)})
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
    report = {
        "config": asdict(cfg),
        "parameters": params,
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
            arm: [{**r, "batch_times": [round(t, 6) for t in r["batch_times"]]} for r in rs]
            for arm, rs in runs.items()
        },
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
