"""Memory of reading stored results: ``load_analysis(...).top(q, k)`` and ``stage_totals()``.

A synthetic analysis of 10^6 training examples (two stages, sizes not multiples of the chunk
width) × 10^3 queries, float32 (4 GB of scores), is written into a local store one chunk of
training examples at a time through the library's writer (``AnalysisWriter``), with a few
planted extremes and the exact per-stage sums kept aside. Each operation then runs in a fresh
subprocess, which reports its peak resident memory (``VmHWM``) after imports and
``load_analysis`` and again after the operation, and checks its answer.

    python benchmarks/results_memory.py           # 10^6 × 10^3 (4 GB on disk; a few minutes)
    python benchmarks/results_memory.py --quick   # 10^5 × 10^2 (40 MB), plus reading it all
    python benchmarks/results_memory.py --dir /big/disk --out results_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from source_callback import load_analysis
from source_callback.analysis.results import column_blocks
from source_callback.store.writer import AnalysisWriter, StoreWriter

NAME = "synthetic"
FULL = {"queries": 1000, "sizes": {"pretrain": 700_001, "finetune": 299_999}}
QUICK = {"queries": 100, "sizes": {"pretrain": 70_001, "finetune": 29_999}}
K = 10
#: ``(stage, index)`` of planted extremes, the best first, at chunk edges: query 0's highest
#: scores and query 1's lowest.
PLANTED = [("finetune", 29_998), ("pretrain", 4096), ("pretrain", 4095), ("finetune", 0)]


def _peak_mb() -> float:
    """Peak resident memory of this process so far, in MB.

    Linux's ``VmHWM``: ``getrusage``'s ``ru_maxrss`` carries the parent's peak across
    ``fork``/``exec``, which would hide a small child's own peak behind the writer's.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB (bytes on macOS)


def write_store(path: Path, queries: int, sizes: dict[str, int], seed: int = 0) -> float:
    """Write the synthetic analysis block by block; save the exact stage sums beside it."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    StoreWriter.open(str(path))
    writer = AnalysisWriter(
        str(path),
        None,
        NAME,
        [(queries, n) for n in sizes.values()],
        np.float32,
        {"stage_names": list(sizes), "config": {"method": "synthetic"}},
    )
    totals = np.zeros((queries, len(sizes)))
    for column, (stage, target) in enumerate(zip(sizes, writer.scores, strict=True)):
        for first, stop in column_blocks(target):
            block = rng.standard_normal((queries, stop - first), dtype=np.float32)
            for rank, (where, index) in enumerate(PLANTED):
                if where == stage and first <= index < stop:
                    block[0, index - first] = 100 - rank
                    block[1, index - first] = -100 + rank
            target[:, first:stop] = block
            totals[:, column] += block.sum(axis=1, dtype=np.float64)
    writer.commit(np.zeros((queries, len(sizes))), np.zeros(queries))
    np.save(path.parent / "totals.npy", totals)
    return time.perf_counter() - start


def measure(operation: str, path: Path) -> dict[str, Any]:
    """Run one operation on the stored analysis (in this process); peak memory and check."""
    result = load_analysis(path, NAME)
    exact_totals = np.load(path.parent / "totals.npy")
    queries = len(result.stage_effects)
    loaded = _peak_mb()
    start = time.perf_counter()
    if operation == "top":
        helpful, _ = result.top(0, K)
        _, harmful = result.top(1, K)
        result.top(queries - 1, K)
        ok = [(a.stage, a.index) for a in helpful[: len(PLANTED)]] == PLANTED
        ok &= [(a.stage, a.index) for a in harmful[: len(PLANTED)]] == PLANTED
        calls = 3
    elif operation == "stage_totals":
        ok = np.allclose(result.stage_totals(), exact_totals, rtol=1e-9)
        calls = 1
    elif operation == "read_all":  # the eager way, for comparison: every score in memory
        scores = [np.asarray(result.scores[s]) for s in result.stage_names]
        totals = np.stack([s.sum(axis=1, dtype=np.float64) for s in scores], axis=1)
        ok = np.allclose(totals, exact_totals, rtol=1e-9)
        calls = 1
    else:
        raise ValueError(operation)
    seconds = (time.perf_counter() - start) / calls
    return {
        "operation": operation,
        "ok": bool(ok),
        "seconds_per_call": seconds,
        "peak_rss_after_load_mb": loaded,
        "peak_rss_mb": _peak_mb(),
    }


def _in_subprocess(operation: str, path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", operation, str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10^5 examples × 10^2 queries")
    parser.add_argument("--dir", type=Path, help="where to write the store (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    parser.add_argument(
        "--measure", nargs=2, metavar=("OPERATION", "STORE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return {}
    setting = QUICK if args.quick else FULL
    queries, sizes = setting["queries"], setting["sizes"]
    examples = sum(sizes.values())
    workdir = Path(tempfile.mkdtemp(prefix="results-memory-", dir=args.dir))
    try:
        store = workdir / "run.zarr"
        written = write_store(store, queries, sizes)
        on_disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        report: dict[str, Any] = {
            "queries": queries,
            "examples": examples,
            "scores_mb": queries * examples * 4 / 2**20,
            "on_disk_mb": on_disk / 2**20,
            "write_seconds": written,
            "write_peak_rss_mb": _peak_mb(),
            "operations": [],
        }
        print(
            f"{queries:,} queries × {examples:,} training examples, float32: "
            f"{report['scores_mb']:,.0f} MB of scores ({report['on_disk_mb']:,.0f} MB on disk), "
            f"written in {written:.1f} s (writer peak RSS {report['write_peak_rss_mb']:.0f} MB)"
        )
        operations = ["top", "stage_totals"] + (["read_all"] if args.quick else [])
        for operation in operations:
            figures = _in_subprocess(operation, store)
            report["operations"].append(figures)
            print(
                f"  {operation:<13} peak RSS {figures['peak_rss_mb']:7.0f} MB "
                f"(after imports and load_analysis {figures['peak_rss_after_load_mb']:.0f} MB), "
                f"{figures['seconds_per_call']:.2f} s per call, "
                f"{'correct' if figures['ok'] else 'WRONG'}"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
