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

The measuring half — ``measure`` on any stored analysis, in a fresh process
(``measure_in_subprocess``), with the peak-memory helpers — is also what
``benchmarks/analyze_memory.py`` uses on the analysis that ``analyze(out_of_core=True)`` wrote.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
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
from source_callback.analysis.results import AnalysisResult, Attribution, column_blocks
from source_callback.store.analyses import AnalysisWriter
from source_callback.store.writer import StoreWriter

NAME = "synthetic"
FULL = {"queries": 1000, "sizes": {"pretrain": 700_001, "finetune": 299_999}}
QUICK = {"queries": 100, "sizes": {"pretrain": 70_001, "finetune": 29_999}}
K = 10
#: ``(stage, index)`` of planted extremes, the best first, at chunk edges: query 0's highest
#: scores and query 1's lowest.
PLANTED = [("finetune", 29_998), ("pretrain", 4096), ("pretrain", 4095), ("finetune", 0)]


def peak_mb() -> float:
    """Peak resident memory of this process so far (or since :func:`reset_peak`), in MB.

    Linux's ``VmHWM``: ``getrusage``'s ``ru_maxrss`` carries the parent's peak across
    ``fork``/``exec``, which would hide a small child's own peak behind the writer's.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB (bytes on macOS)


def rss_mb() -> float:
    """Current resident memory of this process, in MB (``VmRSS``; the peak where unknown)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return peak_mb()


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); whether it could.

    Importing torch and Lightning peaks above what some operations use; after a reset,
    :func:`peak_mb` is the operation's own peak.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def on_disk_mb(path: Path) -> float:
    """Size of the files under ``path`` (a store or one of its groups), in MB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


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


def asked_queries(queries: int) -> list[int]:
    """The queries whose top ``K`` the ``top`` operation asks for: the first two, the last."""
    return sorted({0, 1, queries - 1})


def expected_path(path: Path, name: str) -> Path:
    """Where :func:`write_expected` saves what analysis ``name`` of the store must give."""
    return path.parent / f"{name}.expected.json"


def write_expected(scores: dict[str, np.ndarray], path: Path, name: str) -> None:
    """Save what ``measure`` must find for analysis ``name`` of the store at ``path``.

    From the analysis's scores in memory (the stages in order), computed independently of
    the library's block-wise reading: each stage's row sums (and sums of magnitudes, to scale
    the tolerance) and, for :func:`asked_queries`, the ``K`` highest and lowest
    ``(stage, index)``, ties to the earlier position.
    """
    stages = list(scores)
    rows = np.concatenate([scores[s] for s in stages], axis=1)
    where = [(s, i) for s in stages for i in range(scores[s].shape[1])]
    top: dict[str, list[list[list[Any]]]] = {}
    positions = np.arange(rows.shape[1])
    for query in asked_queries(rows.shape[0]):
        values = rows[query]
        sides = [np.lexsort((positions, -values))[:K], np.lexsort((positions, values))[:K]]
        top[str(query)] = [[list(where[p]) for p in side] for side in sides]
    expected = {
        "totals": [scores[s].sum(axis=1).tolist() for s in stages],
        "magnitudes": [np.abs(scores[s]).sum(axis=1).tolist() for s in stages],
        "top": top,
    }
    expected_path(path, name).write_text(json.dumps(expected))


def _check_top(
    result: AnalysisResult,
    answers: list[tuple[list[Attribution], list[Attribution]]],
    path: Path,
    name: str,
) -> bool:
    """Whether the ``top`` answers for :func:`asked_queries` are right.

    The synthetic analysis: its planted extremes; another: the saved expectation if there is
    one, else consistency (``K`` per side, ordered, each score the stored one).
    """
    asked = asked_queries(len(result.stage_effects))
    if name == NAME:
        helpful, harmful = answers[0][0], answers[1][1]
        ok = [(a.stage, a.index) for a in helpful[: len(PLANTED)]] == PLANTED
        return ok and [(a.stage, a.index) for a in harmful[: len(PLANTED)]] == PLANTED
    expected = expected_path(path, name)
    if expected.exists():
        top = json.loads(expected.read_text())["top"]
        return all(
            [[a.stage, a.index] for a in side] == top[str(query)][number]
            for query, answer in zip(asked, answers, strict=True)
            for number, side in enumerate(answer)
        )
    ok = True
    for query, (helpful, harmful) in zip(asked, answers, strict=True):
        for side, sign in ((helpful, 1), (harmful, -1)):
            scores = [a.score for a in side]
            ok &= len(side) == K and all(sign * (a - b) >= 0 for a, b in itertools.pairwise(scores))
            ok &= all(float(result.scores[a.stage][query, a.index]) == a.score for a in side)
        ok &= helpful[0].score >= harmful[0].score
    return bool(ok)


def _check_totals(totals: np.ndarray, path: Path, name: str) -> bool:
    """Whether per-stage sums are right: exact ones of the synthetic analysis or the saved
    expectation (to 1e-12 of the sum of magnitudes), else only finite and of their shape."""
    if name == NAME:
        return bool(np.allclose(totals, np.load(path.parent / "totals.npy"), rtol=1e-9))
    expected_file = expected_path(path, name)
    if expected_file.exists():
        expected = json.loads(expected_file.read_text())
        exact = np.array(expected["totals"]).T
        scale = np.array(expected["magnitudes"]).T
        return bool(np.all(np.abs(totals - exact) <= 1e-12 * scale + 1e-300))
    return bool(np.isfinite(totals).all())


def measure(operation: str, path: Path, name: str = NAME) -> dict[str, Any]:
    """Run one operation on stored analysis ``name`` (in this process); peak memory and check.

    ``top`` asks for :func:`asked_queries`; ``stage_totals`` sums every stage; ``read_all``
    reads every score into memory (the eager way, for comparison) and sums it. The peak is
    taken right after the operation, before its answer is checked.
    """
    result = load_analysis(path, name)
    loaded = peak_mb()
    asked = asked_queries(len(result.stage_effects))
    start = time.perf_counter()
    if operation == "top":
        answers = [result.top(q, K) for q in asked]
    elif operation == "stage_totals":
        totals = result.stage_totals()
    elif operation == "read_all":
        scores = [np.asarray(result.scores[s]) for s in result.stage_names]
        totals = np.stack([s.sum(axis=1, dtype=np.float64) for s in scores], axis=1)
    else:
        raise ValueError(operation)
    seconds = (time.perf_counter() - start) / (len(asked) if operation == "top" else 1)
    peak = peak_mb()
    if operation == "top":
        ok = _check_top(result, answers, path, name)
    else:
        ok = _check_totals(totals, path, name)
    return {
        "operation": operation,
        "ok": ok,
        "seconds_per_call": seconds,
        "peak_rss_after_load_mb": loaded,
        "peak_rss_mb": peak,
    }


def in_subprocess(
    script: Path | str, *args: str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python script *args`` in a fresh process; the JSON object its stdout ends with.

    ``env`` is added to this process's environment.
    """
    out = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"{Path(script).name} {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-4000:]}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_in_subprocess(operation: str, path: Path, name: str = NAME) -> dict[str, Any]:
    """:func:`measure` in a fresh process, so that its peak memory is the operation's own."""
    return in_subprocess(__file__, "--measure", operation, str(path), "--name", name)


def print_operation(figures: dict[str, Any]) -> None:
    """One line of a :func:`measure` result."""
    print(
        f"  {figures['operation']:<13} peak RSS {figures['peak_rss_mb']:7.0f} MB "
        f"(after imports and load_analysis {figures['peak_rss_after_load_mb']:.0f} MB), "
        f"{figures['seconds_per_call']:.2f} s per call, "
        f"{'correct' if figures['ok'] else 'WRONG'}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10^5 examples × 10^2 queries")
    parser.add_argument("--dir", type=Path, help="where to write the store (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    parser.add_argument(
        "--measure", nargs=2, metavar=("OPERATION", "STORE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--name", default=NAME, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]), args.name)))
        return {}
    setting = QUICK if args.quick else FULL
    queries, sizes = setting["queries"], setting["sizes"]
    examples = sum(sizes.values())
    workdir = Path(tempfile.mkdtemp(prefix="results-memory-", dir=args.dir))
    try:
        store = workdir / "run.zarr"
        written = write_store(store, queries, sizes)
        report: dict[str, Any] = {
            "queries": queries,
            "examples": examples,
            "scores_mb": queries * examples * 4 / 2**20,
            "on_disk_mb": on_disk_mb(store),
            "write_seconds": written,
            "write_peak_rss_mb": peak_mb(),
            "operations": [],
        }
        print(
            f"{queries:,} queries × {examples:,} training examples, float32: "
            f"{report['scores_mb']:,.0f} MB of scores ({report['on_disk_mb']:,.0f} MB on disk), "
            f"written in {written:.1f} s (writer peak RSS {report['write_peak_rss_mb']:.0f} MB)"
        )
        operations = ["top", "stage_totals"] + (["read_all"] if args.quick else [])
        for operation in operations:
            figures = measure_in_subprocess(operation, store)
            report["operations"].append(figures)
            print_operation(figures)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
