"""Memory of writing scores: ``analyze(out_of_core=True)`` on 10^6 training examples × 10^3 queries.

A real run is recorded with ``SourceCallback``: a linear softmax classifier (16 features, 4
classes) trained with SGD + momentum for one epoch per stage on two synthetic stages
(``pretrain`` and ``finetune``, sizes that are not multiples of the score chunk width), two
checkpoints per stage. Every example is generated from its index (a counter-based hash,
``HashedExamples``), so the data take no memory and the dataset fingerprint the library
records is the same in every process.

Then, each in a fresh subprocess that reports its peak resident memory (``VmHWM``, reset to
the current RSS just before the call, as the imports peak on their own):

1. ``analyze(..., segments=1, name=..., out_of_core=True, batch_size=1024)``: the scores are
   added up in the store one block of 4096 training examples at a time (both checkpoints of a
   stage, their states held on the CPU, are applied to a block before it is written once).
   Reported: RSS before the
   call and the peak during it, wall and CPU time, the time in the scoring passes and in the
   store's score sink (library methods wrapped with timers here), and the analysis's size on
   disk.
2. At the ``quick`` size also the same analysis in memory (``out_of_core=False``; it holds
   every ``[Q, N]`` float64 score matrix, ``Q × N × 8`` bytes), and the two are compared: the
   stored scores and stage effects must equal the in-memory ones exactly.
3. ``load_analysis(...).top(q, 10)`` and ``stage_totals()`` on the result ``analyze`` wrote,
   with the measuring machinery of ``benchmarks/results_memory.py``: checked against the
   in-memory scores at the ``quick`` size, for consistency at the others.

Sizes (training examples × queries): ``quick`` 10^5 × 10^2 (both modes), ``mid`` 10^5 × 10^3
and ``full`` 10^6 × 10^3 (out of core; ``mid`` is ``full`` at a tenth of the examples, so that
the two peaks show what grows with N). At ``quick`` and ``mid`` the out-of-core analysis also
runs with glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``), which returns
freed blocks to the system: its peak is the live memory, without heap fragmentation.

``batch_size`` is 1024 rather than larger because the scoring pass's per-batch contraction
holds a ``[batch, Q, inputs + 1]`` float64 intermediate (145 MB at 1024 × 1000 × 17; the cost
per example does not depend on the batch size).

The stores are deleted at the end. Disk: the recorded runs take a few MB, the scores
``Q × N × 8`` bytes (7.5 GiB at ``full``; random float64 barely compresses), under ``--dir``.

    python benchmarks/analyze_memory.py --quick     # 10^5 × 10^2, both modes (under a minute)
    python benchmarks/analyze_memory.py             # all three sizes (about 8 minutes, 2 cores)
    python benchmarks/analyze_memory.py --sizes full --dir /big/disk --out a.json --markdown a.md
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import resource
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_memory import (
    FULL,
    QUICK,
    expected_path,
    in_subprocess,
    measure_in_subprocess,
    on_disk_mb,
    peak_mb,
    print_operation,
    reset_peak,
    rss_mb,
    write_expected,
)
from settings import trainer

from source_callback import SourceCallback, analyze, load_analysis, open_run
from source_callback.analysis.engine import Engine
from source_callback.analysis.scores import MemoryScores, StoredScores
from source_callback.store.schema import ANALYSES, SCORE_CHUNK

FEATURES = 16
CLASSES = 4
#: A fixed random teacher: an example's label is the argmax of ``x @ TEACHER + noise``.
TEACHER = np.random.default_rng(1234).standard_normal((FEATURES, CLASSES))
TRAIN_BATCH = 4096
#: Per stage: SGD learning rate (momentum 0.9).
RATES = {"pretrain": 0.2, "finetune": 0.05}
CHECKPOINTS = 2  # per stage: the stage's start and its middle (the end is not scored)
ANALYZE_BATCH = 1024
#: The analysis each mode writes; ``MODES`` gives the mode's environment. glibc raises its
#: mmap threshold dynamically, so that freed blocks of a few MB stay in the heap and RSS
#: includes fragmentation; with the threshold fixed at 128 KiB larger blocks go back to the
#: system when freed and RSS follows the live allocations (as in benchmarks/speed.py).
NAMES = {"in-memory": "in-memory", "out-of-core": "out-of-core"}
MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}
MODES: dict[str, tuple[str, dict[str, str]]] = {
    "in-memory": ("in-memory", {}),
    "out-of-core": ("out-of-core", {}),
    "out-of-core, mmap threshold 128 KiB": ("out-of-core", MMAP_THRESHOLD),
}


def _hash(counters: np.ndarray) -> np.ndarray:
    """SplitMix64 of each ``uint64`` counter: a fixed, well-mixed 64-bit value."""
    z = counters + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hashed_examples(indices: np.ndarray, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[n, FEATURES]`` (float32, uniform with unit variance) and labels ``[n]``.

    Each value is a hash of ``(stream, index, column)`` alone, so an example is the same
    whichever batch it is drawn in; the label's logits add the features' terms one column at a
    time, in the same order for every batch size.
    """
    width = FEATURES + CLASSES
    first = indices.astype(np.uint64)[:, None] * np.uint64(width)
    counters = (first + np.arange(width, dtype=np.uint64)) | (np.uint64(stream) << np.uint64(40))
    uniform = (_hash(counters) >> np.uint64(11)) * 2.0**-53  # [0, 1), 53 bits
    x = ((uniform[:, :FEATURES] - 0.5) * np.sqrt(12.0)).astype(np.float32)
    logits = 0.5 * (uniform[:, FEATURES:] - 0.5) * np.sqrt(12.0)
    for column in range(FEATURES):
        logits = logits + x[:, column, None].astype(np.float64) * TEACHER[column]
    return x, logits.argmax(axis=1)


class HashedExamples(Dataset):
    """``size`` classification examples generated from their index, ``(x, label)`` tensors.

    Nothing is held in memory. ``__getitems__`` builds a whole batch at once (``DataLoader``
    calls it with a batch's indices); ``stream`` tells datasets apart.
    """

    def __init__(self, size: int, stream: int) -> None:
        self.size = size
        self.stream = stream

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        where = np.asarray(indices, dtype=np.int64)
        if where.size and (where.min() < 0 or where.max() >= self.size):
            raise IndexError(f"index out of range for {self.size} examples")
        x, y = hashed_examples(where, self.stream)
        return list(zip(torch.from_numpy(x).unbind(), torch.from_numpy(y).unbind(), strict=True))


def training_sets(sizes: dict[str, int]) -> dict[str, HashedExamples]:
    """Each stage's dataset by name (streams 1, 2, ...; the queries are stream 0)."""
    return {
        name: HashedExamples(size, stream) for stream, (name, size) in enumerate(sizes.items(), 1)
    }


class LinearClassifier(pl.LightningModule):
    """Softmax regression ``FEATURES`` → ``CLASSES``, or ``net``; SGD + momentum by stage."""

    def __init__(self, net: nn.Module | None = None) -> None:
        super().__init__()
        self.net = nn.Linear(FEATURES, CLASSES) if net is None else net
        self.recipe = "pretrain"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=RATES[self.recipe], momentum=0.9)


def quiet_lightning() -> None:
    """Silence Lightning's info lines and its warnings about data-loader workers."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")


def record(store: Path, sizes: dict[str, int], seed: int = 0) -> None:
    """Train both stages for one epoch each, recording them into ``store``."""
    quiet_lightning()
    torch.manual_seed(seed)
    model = LinearClassifier()
    callback = SourceCallback(str(store), checkpoints_per_stage=CHECKPOINTS)
    for name, dataset in training_sets(sizes).items():
        model.recipe = name
        callback.next_stage(name)
        trainer(1, [callback], store.parent).fit(
            model, DataLoader(dataset, batch_size=TRAIN_BATCH, shuffle=True)
        )


@contextmanager
def timers(targets: dict[str, tuple[Any, str]]) -> Iterator[dict[str, list[float]]]:
    """Accumulate the wall time and count of calls of each ``(owner, attribute)`` while open.

    Yields ``{label: [seconds, calls, peak]}``, the peak being :func:`peak_mb` when the last
    call returned (the process's peak up to then); the attributes are put back on exit.
    """
    totals: dict[str, list[float]] = {label: [0.0, 0, 0.0] for label in targets}
    originals = {label: getattr(owner, attr) for label, (owner, attr) in targets.items()}

    def timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label][0] += time.perf_counter() - start
                totals[label][1] += 1
                totals[label][2] = peak_mb()

        return wrapper

    for label, (owner, attr) in targets.items():
        setattr(owner, attr, timed(label, originals[label]))
    try:
        yield totals
    finally:
        for label, (owner, attr) in targets.items():
            setattr(owner, attr, originals[label])


def analyze_once(store: Path, mode: str, queries: int, batch_size: int) -> dict[str, Any]:
    """In this (fresh) process: ``analyze`` the recorded run ``mode``-wise; memory and time."""
    run = open_run(str(store))
    sizes = {stage.name: int(stage.num_examples or 0) for stage in run.stages}
    train, query_set = training_sets(sizes), HashedExamples(queries, 0)
    model = LinearClassifier()
    imports_peak = peak_mb()
    before = rss_mb()
    reset = reset_peak()
    targets = {
        "curvature passes": (Engine, "curvature"),
        "scoring passes": (Engine, "scores"),
        "score sink": (StoredScores if mode == "out-of-core" else MemoryScores, "add"),
    }
    with timers(targets) as spent:
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        analyze(
            str(store),
            model=model,
            task="classification",
            train=train,
            queries=query_set,
            segments=1,
            batch_size=batch_size,
            name=NAMES[mode],
            out_of_core=mode == "out-of-core",
            verbose=False,
        )
        seconds = time.perf_counter() - start
        used = resource.getrusage(resource.RUSAGE_SELF)
    peak = peak_mb()
    return {
        "mode": mode,
        "queries": queries,
        "examples": sum(sizes.values()),
        "seconds": seconds,
        "cpu_seconds": used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime,
        "rss_before_mb": before,
        "imports_peak_mb": imports_peak,
        "peak_reset": reset,
        "peak_rss_mb": peak,
        "parts": {
            label: {"seconds": s, "calls": int(c), "peak_rss_mb_after": p}
            for label, (s, c, p) in spent.items()
        },
    }


def compare(store: Path) -> dict[str, Any]:
    """The out-of-core analysis against the in-memory one, both reopened from ``store``.

    Also saves what reading the out-of-core one must give (``write_expected``).
    """
    memory = load_analysis(store, NAMES["in-memory"])
    stored = load_analysis(store, NAMES["out-of-core"])
    scores = {s: np.asarray(memory.scores[s]) for s in memory.stage_names}
    equal, largest, difference = True, 0.0, 0.0
    for stage, expected in scores.items():
        found = np.asarray(stored.scores[stage])
        equal &= bool(np.array_equal(found, expected))
        difference = max(difference, float(np.abs(found - expected).max()))
        largest = max(largest, float(np.abs(expected).max()))
    equal &= bool(np.array_equal(stored.stage_effects, memory.stage_effects))
    write_expected(scores, store, NAMES["out-of-core"])
    return {
        "equal": equal,
        "max_abs_difference": difference,
        "max_abs_score": largest,
    }


def environment() -> str:
    """One line naming the machine and library versions."""
    import zarr

    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, Python "
        f"{platform.python_version()}, torch {torch.__version__}, zarr {zarr.__version__}"
    )


def markdown(report: dict[str, Any]) -> str:
    """The generated section of docs/benchmarks.md: analyses, reads, the correctness check."""
    lines: list[str] = [
        f"Settings: `analyze_memory.py` ({report['environment']}); linear classifier "
        f"({FEATURES} features, {CLASSES} classes), {CHECKPOINTS} checkpoints per stage, "
        f"`segments=1`, `batch_size={report['batch_size']}`; each `analyze` and each read in a "
        "fresh process. RSS in MiB; the peak is `VmHWM`, reset just before the call. CPU is the "
        "process's user + system time; *while fitting*: the peak by the end of the curvature "
        "passes (before any scoring); on disk, the analysis's group in the store.",
        "",
        "| training examples × queries | mode | wall (s) | CPU (s) | scoring passes (s) "
        "| score sink (s) | RSS before | peak RSS while fitting | peak RSS | peak − before "
        "| [Q, N] float64 | on disk |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size in report["sizes"]:
        for run in size["analyses"]:
            parts = run["parts"]
            matrix = size["queries"] * size["examples"] * 8 / 2**20
            lines.append(
                f"| {size['examples']:,} × {size['queries']:,} | {run['mode']} "
                f"| {run['seconds']:.1f} | {run['cpu_seconds']:.1f} "
                f"| {parts['scoring passes']['seconds']:.1f} "
                f"| {parts['score sink']['seconds']:.1f} | {run['rss_before_mb']:.0f} "
                f"| {parts['curvature passes']['peak_rss_mb_after']:.0f} "
                f"| {run['peak_rss_mb']:.0f} | {run['peak_rss_mb'] - run['rss_before_mb']:.0f} "
                f"| {matrix:,.0f} | {run['on_disk_mb']:,.0f} |"
            )
    lines += [
        "",
        "Reading the out-of-core result back (`load_analysis` in a fresh process; `top` asks "
        "for three queries, one call each):",
        "",
        "| training examples × queries | operation | seconds per call | peak RSS after imports "
        "and `load_analysis` | peak RSS | checked |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    labels = {"top": "`top(q, 10)`", "stage_totals": "`stage_totals()`"}
    for size in report["sizes"]:
        for op in size["operations"]:
            lines.append(
                f"| {size['examples']:,} × {size['queries']:,} "
                f"| {labels.get(op['operation'], 'all scores into memory')} "
                f"| {op['seconds_per_call']:.2f} | {op['peak_rss_after_load_mb']:.0f} "
                f"| {op['peak_rss_mb']:.0f} | {'yes' if op['ok'] else 'WRONG'} |"
            )
    for size in report["sizes"]:
        check = size.get("check")
        if check:
            verdict = "bit for bit equal" if check["equal"] else "NOT equal"
            lines += [
                "",
                f"At {size['examples']:,} × {size['queries']:,} the out-of-core scores and stage "
                f"effects are {verdict} to the in-memory ones (largest difference "
                f"{check['max_abs_difference']:.1e}, largest score "
                f"{check['max_abs_score']:.1e}); `top` and `stage_totals` on the stored result "
                "are checked against the in-memory scores, at the other sizes for consistency.",
            ]
    return "\n".join(lines)


#: Per size: training examples of each stage, queries, and the modes analysed. ``mid`` has the
#: training set of ``quick`` and the queries of ``full``: the same Q at a tenth of the N.
SIZES: dict[str, dict[str, Any]] = {
    "quick": {**QUICK, "modes": list(MODES)},
    "mid": {
        "queries": FULL["queries"],
        "sizes": QUICK["sizes"],
        "modes": ["out-of-core", "out-of-core, mmap threshold 128 KiB"],
    },
    "full": {**FULL, "modes": ["out-of-core"]},
}


def analyze_size(store: Path, queries: int, modes: list[str], batch_size: int) -> dict[str, Any]:
    """Analyze the recorded run with ``queries`` in each of ``modes``; read the result back."""
    examples = sum(int(s.num_examples or 0) for s in open_run(str(store)).stages)
    report: dict[str, Any] = {
        "queries": queries,
        "examples": examples,
        "analyses": [],
        "operations": [],
    }
    print(
        f"{queries:,} queries × {examples:,} training examples: [Q, N] float64 is "
        f"{queries * examples * 8 / 2**20:,.0f} MB",
        flush=True,
    )
    for mode in modes:
        kind, env = MODES[mode]
        args = ["--analyze", str(store), kind, "--queries", str(queries)]
        figures = in_subprocess(__file__, *args, "--batch-size", str(batch_size), env=env)
        figures["mode"] = mode
        figures["on_disk_mb"] = on_disk_mb(store / ANALYSES / NAMES[kind])
        report["analyses"].append(figures)
        sink = figures["parts"]["score sink"]
        print(
            f"  analyze {mode}: {figures['seconds']:.1f} s wall, "
            f"{figures['cpu_seconds']:.1f} s CPU (scoring passes "
            f"{figures['parts']['scoring passes']['seconds']:.1f} s, score sink "
            f"{sink['seconds']:.1f} s in {sink['calls']} calls), RSS before "
            f"{figures['rss_before_mb']:.0f} MB, peak while fitting "
            f"{figures['parts']['curvature passes']['peak_rss_mb_after']:.0f} MB, peak "
            f"{figures['peak_rss_mb']:.0f} MB "
            f"(+{figures['peak_rss_mb'] - figures['rss_before_mb']:.0f}), "
            f"{figures['on_disk_mb']:,.0f} MB on disk",
            flush=True,
        )
    if "in-memory" in modes:
        report["check"] = compare(store)
        shutil.rmtree(store / ANALYSES / NAMES["in-memory"])
        print(
            f"  out-of-core == in-memory: {report['check']['equal']} (largest difference "
            f"{report['check']['max_abs_difference']:.1e})",
            flush=True,
        )
    operations = ["top", "stage_totals"] + (["read_all"] if "in-memory" in modes else [])
    for operation in operations:
        figures = measure_in_subprocess(operation, store, NAMES["out-of-core"])
        report["operations"].append(figures)
        print_operation(figures)
    expected_path(store, NAMES["out-of-core"]).unlink(missing_ok=True)
    shutil.rmtree(store / ANALYSES / NAMES["out-of-core"])
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="only 10^5 examples × 10^2 queries (both modes)"
    )
    parser.add_argument(
        "--sizes",
        help=f"comma-separated subset of {', '.join(SIZES)} (default: all; quick with --quick)",
    )
    parser.add_argument("--dir", type=Path, help="where to write the stores (default: a temp dir)")
    parser.add_argument("--batch-size", type=int, default=ANALYZE_BATCH, help="of analyze")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    parser.add_argument("--markdown", type=Path, help="also write the docs section")
    parser.add_argument("--analyze", nargs=2, metavar=("STORE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--queries", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.analyze:
        quiet_lightning()
        store, mode = args.analyze
        print(json.dumps(analyze_once(Path(store), mode, args.queries, args.batch_size)))
        return {}
    names = (args.sizes or ("quick" if args.quick else ",".join(SIZES))).split(",")
    if set(names) - set(SIZES):
        parser.error(f"unknown size(s) in --sizes: {args.sizes}")
    report: dict[str, Any] = {
        "environment": environment(),
        "batch_size": args.batch_size,
        "score_chunk": list(SCORE_CHUNK),
        "records": [],
        "sizes": [],
    }
    workdir = Path(tempfile.mkdtemp(prefix="analyze-memory-", dir=args.dir))
    stores: dict[tuple[int, ...], Path] = {}
    try:
        for name in names:
            setting = SIZES[name]
            key = tuple(setting["sizes"].values())
            if key not in stores:  # one recorded run per training set
                stores[key] = workdir / f"run-{sum(key)}.zarr"
                start = time.perf_counter()
                record(stores[key], setting["sizes"])
                recorded = {
                    "stage_sizes": setting["sizes"],
                    "seconds": time.perf_counter() - start,
                    "on_disk_mb": on_disk_mb(stores[key]),
                }
                report["records"].append(recorded)
                print(
                    f"recorded {sum(key):,} training examples in {recorded['seconds']:.1f} s "
                    f"({recorded['on_disk_mb']:.2f} MB on disk)",
                    flush=True,
                )
            size = analyze_size(stores[key], setting["queries"], setting["modes"], args.batch_size)
            report["sizes"].append({"name": name, **size})
            if args.out:  # after each size: a long run keeps what it measured
                args.out.write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.markdown:
        args.markdown.write_text(markdown(report) + "\n")
    return report


if __name__ == "__main__":
    main()
