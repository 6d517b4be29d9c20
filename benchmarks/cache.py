"""Projected-gradient cache against exact SOURCE: accuracy, size on disk and time per query.

For each setting of ``settings.py``: record one run (seed 0); compute exact SOURCE scores of the
setting's queries (in memory, 3 segments per stage); then, for each ``projection_dim`` k, score
the same queries with ``analyze(cache="projected", projection_dim=k)`` (a named analysis per k,
so every cache stays in the store). Reported per k:

* Spearman correlation with the exact scores, per query over all training examples (all stages
  concatenated) and per stage, averaged over queries;
* LDS of the cached scores, against the same retrainings as the exact scores (the recorded run
  retrained once per setting on random half-subsets of the attributed stage, see ``lds.py``);
* the bytes of ``analyses/<name>/cache`` on disk, and their ratio to the float32 size of one
  full per-example gradient per training example (``Σ_modules out·in × N × 4``);
* the first cached call's time (fits the operators, projects and stores every training gradient,
  scores the queries: the one-off build) and, with the cache built, the time of scoring 1,000
  timing queries from it; next to the time of an exact analysis of the same 1,000 queries.

The 1,000 timing queries are the setting's queries tiled to 1,000 with Gaussian noise (σ = 0.1)
added to every copy's inputs (labels kept): an analysis's cost does not depend on their values.
k = ``K`` is the smallest dimension that covers every side of every module, where the projection
is the identity: its Spearman should be 1 up to the cache's float32 rounding.

    python benchmarks/cache.py --quick      # about 15 minutes on 2 (busy) cores
    python benchmarks/cache.py --full       # about 15-20 minutes: more k, subsets and seeds
    python benchmarks/cache.py --quick --settings noisy-mlp-digits --plot cache.png
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import lds
import matplotlib.pyplot as plt
import numpy as np
import torch
from settings import Setting
from torch import nn
from torch.utils.data import TensorDataset

from source_callback import AnalysisResult, analyze
from source_callback.analysis.ekfac import tracked_modules
from source_callback.evaluation import linear_datamodeling_score, noise_ceiling, random_subsets
from source_callback.evaluation.lds import spearman_rows

ROOT = Path(__file__).resolve().parent.parent
EXACT = "exact"  # the label of the in-memory analysis
TIMING_QUERIES = 1000

MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "settings": ["rotated-digits-sgd", "rotated-digits-adamw", "noisy-mlp-digits"],
        "dims": [4, 16, 64],
        "subsets": 16,
        "seeds": 1,
    },
    "full": {
        "settings": [
            "rotated-digits-sgd",
            "rotated-digits-adamw",
            "noisy-mlp-digits",
        ],
        "dims": [4, 8, 16, 32, 64],
        "subsets": 24,
        "seeds": 2,
    },
}
#: analyze() options shared by every analysis here (the defaults: SOURCE, 3 segments per stage).
OPTIONS: dict[str, Any] = {"method": "source", "batch_size": 256, "verbose": False}


def module_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of each unit's gradient matrix (``in`` counts the bias)."""
    return {n: unit.shape for n, unit in tracked_modules(model).items()}


def covering_dim(shapes: dict[str, tuple[int, int]]) -> int:
    """The smallest ``projection_dim`` at which every module's projection is the identity."""
    return max(max(shape) for shape in shapes.values())


def timing_queries(queries: TensorDataset, count: int, noise: float = 0.1) -> TensorDataset:
    """``count`` queries: ``queries`` tiled, each copy's inputs perturbed by N(0, noise²)."""
    x, y = queries.tensors
    index = torch.arange(count) % len(x)
    generator = torch.Generator().manual_seed(0)
    perturbed = x[index] + noise * torch.randn(x[index].shape, generator=generator)
    return TensorDataset(perturbed, y[index])


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _analyze(
    setting: Setting, store: Path, queries: TensorDataset, **options: Any
) -> AnalysisResult:
    """``analyze`` of the setting's record with :data:`OPTIONS`, overridden by ``options``."""
    return analyze(
        store,
        model=setting.module(),
        task=setting.task,
        train=setting.train,
        queries=queries,
        **{**OPTIONS, **options},
    )


def _timed(
    setting: Setting, store: Path, queries: TensorDataset, **options: Any
) -> tuple[AnalysisResult, float]:
    """:func:`_analyze` and its wall time in seconds."""
    start = time.perf_counter()
    result = _analyze(setting, store, queries, **options)
    return result, time.perf_counter() - start


def _stacked(scores: dict[str, Any], names: list[str]) -> np.ndarray:
    """``[Q, Σ N_s]``: the stages' scores side by side."""
    return np.concatenate([np.asarray(scores[n][...]) for n in names], axis=1)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman of matching rows (queries), averaged."""
    return float(np.nanmean(spearman_rows(a, b)))


def benchmark_setting(
    setting: Setting, workdir: Path, dims: list[int], subsets: int, seeds: int, processes: int
) -> dict[str, Any]:
    """Every measurement of the module docstring on one setting."""
    store = workdir / f"{setting.name}-cache.zarr"
    setting.train_run(store, seed=0)
    shapes = module_shapes(setting.module())
    covering = covering_dim(shapes)
    dims = sorted({*dims, covering})
    sizes = {s.name: len(s.data) for s in setting.stages}
    full_bytes = sum(o * i for o, i in shapes.values()) * sum(sizes.values()) * 4
    names = [s.name for s in setting.stages]

    exact, exact_seconds = _timed(setting, store, setting.queries, name=None)
    variants: dict[str, Any] = {EXACT: exact}
    rows: dict[str, dict[str, Any]] = {EXACT: {"seconds": exact_seconds}}
    for k in dims:
        label = f"k={k}"
        print(f"  {setting.name}: cache {label}", flush=True)
        name = f"cache-k{k}"
        result, build = _timed(
            setting, store, setting.queries, name=name, cache="projected", projection_dim=k
        )
        variants[label] = result
        cache_bytes = directory_bytes(store / "analyses" / name / "cache")
        rows[label] = {
            "k": k,
            "exact_projection": k == covering,
            "spearman": _spearman(_stacked(result.scores, names), _stacked(exact.scores, names)),
            "spearman_stages": {
                n: _spearman(np.asarray(result.scores[n][...]), exact.scores[n]) for n in names
            },
            "build_seconds": build,
            "cache_bytes": cache_bytes,
            "cache_ratio": cache_bytes / full_bytes,
        }

    # timing: 1,000 queries, exact against cached scoring (each cache already built)
    many = timing_queries(setting.queries, TIMING_QUERIES)
    print(f"  {setting.name}: timing {TIMING_QUERIES} queries", flush=True)
    _, seconds = _timed(setting, store, many, name="timing-exact")
    rows[EXACT]["seconds_1000"] = seconds * 1000 / TIMING_QUERIES
    for k in dims:
        label = f"k={k}"
        _, seconds = _timed(
            setting, store, many, name=f"cache-k{k}", cache="projected", projection_dim=k
        )
        rows[label]["seconds_1000"] = seconds * 1000 / TIMING_QUERIES

    # LDS: one set of retrainings, every variant scored against it
    print(f"  {setting.name}: retraining {subsets} subsets x {seeds} seed(s)", flush=True)
    start = time.perf_counter()
    masks = random_subsets(sizes[setting.attributed], subsets, 0.5, seed=0)
    measured = lds.subset_measurements(setting, store, masks, seeds, processes)
    retrain_seconds = time.perf_counter() - start
    for label, result in variants.items():
        score = linear_datamodeling_score(
            np.asarray(result.scores[setting.attributed][...]), masks, measured
        )
        rows[label]["lds"] = [score.mean, score.low, score.high]
    return {
        "setting": setting.name,
        "title": setting.title,
        "stages": names,
        "examples": sizes,
        "attributed": setting.attributed,
        "queries": len(setting.queries),
        "timing_queries": TIMING_QUERIES,
        "modules": {n: list(s) for n, s in shapes.items()},
        "covering_dim": covering,
        "full_gradient_bytes": full_bytes,
        "subsets": subsets,
        "seeds": seeds,
        "ceiling": noise_ceiling(measured) if seeds > 1 else None,
        "retrain_seconds": retrain_seconds,
        "variants": rows,
    }


def run(mode: str, workdir: Path, processes: int, names: list[str] | None = None) -> dict:
    """The benchmark on every setting of ``mode`` (or ``names``)."""
    config = MODES[mode]
    started = time.perf_counter()
    results = []
    for name in names or config["settings"]:
        setting = lds.SETTINGS[name](3)  # epochs: for the linear settings only
        print(f"cache: {setting.title}", flush=True)
        results.append(
            benchmark_setting(
                setting, workdir, config["dims"], config["subsets"], config["seeds"], processes
            )
        )
    return {
        "mode": mode,
        "config": config,
        "threads": torch.get_num_threads(),
        "minutes": (time.perf_counter() - started) / 60,
        "settings": results,
    }


def _megabytes(count: float) -> str:
    """``count`` bytes in MB (kB below 0.1 MB)."""
    return f"{count / 1e6:.2f} MB" if count >= 1e5 else f"{count / 1e3:.0f} kB"


def cache_table(results: dict[str, Any]) -> str:
    """Markdown: per setting and projection_dim, accuracy, size and time against exact."""
    lines = [
        "| setting | k | Spearman vs exact (per stage) | LDS | cache on disk (× full grads) "
        "| build (s) | s / 1,000 queries | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["settings"]:
        rows = r["variants"]
        exact_time = rows[EXACT]["seconds_1000"]
        full = _megabytes(r["full_gradient_bytes"])
        ceiling = "" if r["ceiling"] is None else f", ceiling {r['ceiling']:.2f}"
        lines.append(
            f"| {r['title']} ({sum(r['examples'].values())} examples; full gradients {full}) "
            f"| exact | 1 | {_lds(rows[EXACT]['lds'])}{ceiling} | – | – "
            f"| {exact_time:.1f} | 1 |"
        )
        for label, row in rows.items():
            if label == EXACT:
                continue
            stages = row["spearman_stages"]
            per_stage = (
                " / ".join(f"{stages[n]:.3f}" for n in r["stages"]) if len(stages) > 1 else ""
            )
            k = f"{row['k']}" + (" (identity)" if row["exact_projection"] else "")
            lines.append(
                f"| | {k} | {row['spearman']:.3f}"
                + (f" ({per_stage})" if per_stage else "")
                + f" | {_lds(row['lds'])} | {_megabytes(row['cache_bytes'])} "
                f"({row['cache_ratio']:.2f}×) | {row['build_seconds']:.1f} "
                f"| {row['seconds_1000']:.1f} | {exact_time / row['seconds_1000']:.1f}× |"
            )
    return "\n".join(lines)


def _lds(values: list[float]) -> str:
    """``mean (low–high)``."""
    mean, low, high = values
    return f"{mean:.3f} ({low:.2f}–{high:.2f})"


def cache_intro(results: dict[str, Any], environment: str = "") -> str:
    """One line: how the table was measured."""
    config = results["config"]
    where = f"; {environment}" if environment else f"; {results['threads']} torch thread(s)"
    return (
        f"`benchmarks/cache.py --{results['mode']}`: LDS over {config['subsets']} subsets "
        f"(α = 0.5) × {config['seeds']} retraining seed(s), the same retrainings for every row "
        f"of a setting{where}; {results['minutes']:.0f} minutes."
    )


def plot_cache(results: dict[str, Any], path: Path) -> None:
    """Spearman vs exact and LDS against projection_dim, one line per setting."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, r in zip(colors, results["settings"], strict=False):
        rows = [row for label, row in r["variants"].items() if label != EXACT]
        ks = [row["k"] for row in rows]
        axes[0].plot(ks, [row["spearman"] for row in rows], "o-", color=color, label=r["setting"])
        values = np.array([row["lds"] for row in rows])
        axes[1].errorbar(
            ks,
            values[:, 0],
            yerr=[values[:, 0] - values[:, 1], values[:, 2] - values[:, 0]],
            marker="o",
            capsize=3,
            color=color,
            label=r["setting"],
        )
        axes[1].axhline(r["variants"][EXACT]["lds"][0], color=color, linestyle=":")
    axes[0].set_ylabel("Spearman with exact scores (mean over queries)")
    axes[1].set_ylabel("LDS (dotted: exact scores)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("projection_dim k")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick")
    mode.add_argument("--full", action="store_const", dest="mode", const="full")
    parser.add_argument("--settings", help="comma-separated settings (default: the mode's)")
    parser.add_argument("--processes", type=int, default=2, help="parallel retrainings")
    parser.add_argument("--workdir", type=Path, help="default: benchmarks/runs/<mode>")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/<mode>/cache.json")
    parser.add_argument("--plot", type=Path, help="also write the plot (PNG) here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as run_all.py: tiny models, threads only add contention noise
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    workdir = args.workdir or ROOT / "benchmarks" / "runs" / args.mode
    out = args.out or ROOT / "benchmarks" / "results" / args.mode / "cache.json"
    workdir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = args.settings.split(",") if args.settings else None
    results = run(args.mode, workdir, args.processes, names)
    out.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot_cache(results, args.plot)
    print(cache_intro(results) + "\n\n" + cache_table(results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
