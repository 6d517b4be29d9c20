"""The curvature on a capped number of examples, where the cap binds (``curvature_examples``).

kronfluence fits its covariance factors and corrected eigenvalues on at most 100,000 examples
by default (``covariance_max_examples``, ``lambda_max_examples``). This measures what such a
cap does to ``analyze`` on stages larger than it: a real run is recorded with
``SourceCallback`` — an MLP (16 → 128 → 128 → 4, tanh) on the synthetic classification data of
``analyze_memory.py`` (each example generated from its index), a ``pretrain`` stage of SGD +
momentum then a ``finetune`` stage of AdamW, one epoch each — and analyzed with the library's
defaults (``method="source"``, 3 segments, sampled Fisher, factored Adam preconditioner), with
the curvature on every example (``curvature_examples=None``) and on at most each of the caps.

Reported per analysis: the wall time, its split by pass (the wrappers of ``speed.py``) and the
floor (one plain forward+backward pass over each stage's data per checkpoint the analysis
reads, measured before and after); against the analysis on every example, per stage, the mean
(and the lowest) per-query Spearman correlation of the scores, the mean overlap of each query's
100 highest-scored examples, and the largest difference of the stage effects relative to the
largest effect. The same figures between two seeds of the uncapped analysis (the seed draws
the pseudo-labels) give the scale of differences that mean nothing.

    python benchmarks/curvature_cap.py --quick            # 4·10^4 + 2·10^4 examples, cap 10^4
    python benchmarks/curvature_cap.py --out c.json --markdown c.md  # 3·10^5 + 1.5·10^5, ~25 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from analyze_memory import (
    CLASSES,
    FEATURES,
    HashedExamples,
    LinearClassifier,
    environment,
    quiet_lightning,
    training_sets,
)
from settings import trainer
from speed import BREAKDOWN_ORDER, BREAKDOWN_TARGETS, Profiler, forward_backward_time

from source_callback import SourceCallback, analyze, open_run
from source_callback.analysis.segments import plan_segments
from source_callback.evaluation.lds import spearman_rows

HIDDEN = 128
TRAIN_BATCH = 256
ANALYZE_BATCH = 1024
QUERIES = 16
TOP = 100
#: Stage sizes (``pretrain``, ``finetune``) and caps: the full setting and ``--quick``.
FULL = {"sizes": (300_000, 150_000), "caps": (100_000,)}
QUICK = {"sizes": (40_000, 20_000), "caps": (10_000,)}
STAGES = ("pretrain", "finetune")


class MLP(LinearClassifier):
    """``FEATURES → HIDDEN → HIDDEN → CLASSES``; SGD + momentum, then AdamW (``recipe``)."""

    def __init__(self) -> None:
        super().__init__(
            nn.Sequential(
                nn.Linear(FEATURES, HIDDEN),
                nn.Tanh(),
                nn.Linear(HIDDEN, HIDDEN),
                nn.Tanh(),
                nn.Linear(HIDDEN, CLASSES),
            )
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.recipe == "pretrain":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=3e-4, weight_decay=0.01)


def record(store: Path, sizes: dict[str, int]) -> MLP:
    """Train both stages for one epoch each into ``store``; the trained model."""
    quiet_lightning()
    torch.manual_seed(0)
    model = MLP()
    callback = SourceCallback(str(store))
    for name, dataset in training_sets(sizes).items():
        model.recipe = name
        callback.next_stage(name)
        trainer(1, [callback], store.parent).fit(
            model, DataLoader(dataset, batch_size=TRAIN_BATCH, shuffle=True)
        )
    return model


def analysis(store: Path, sizes: dict[str, int], cap: int | None, seed: int) -> dict[str, Any]:
    """``analyze`` with the curvature on at most ``cap`` examples: time by pass, and scores."""
    train = training_sets(sizes)
    profiler = Profiler()
    with profiler.patched(BREAKDOWN_TARGETS, []):
        start = time.perf_counter()
        result = analyze(
            str(store),
            model=MLP(),
            task="classification",
            train=train,
            queries=HashedExamples(QUERIES, 0),
            batch_size=ANALYZE_BATCH,
            seed=seed,
            curvature_examples=cap,
            name=None,
            verbose=False,
        )
        seconds = time.perf_counter() - start
    parts = dict(profiler.totals)
    parts["other"] = seconds - sum(parts.values())
    return {
        "cap": cap,
        "seed": seed,
        "seconds": seconds,
        "parts_s": {label: parts[label] for label in BREAKDOWN_ORDER if label in parts},
        "scores": {name: np.asarray(result.scores[name]) for name in STAGES},
        "effects": np.asarray(result.stage_effects),
    }


def agreement(found: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Per stage: Spearman per query (mean, lowest) and top-``TOP`` overlap; stage effects."""
    stages = {}
    for name in STAGES:
        a, b = found["scores"][name], reference["scores"][name]
        rhos = spearman_rows(a, b).tolist()
        tops = [
            len(set(np.argsort(-x)[:TOP]) & set(np.argsort(-y)[:TOP])) / TOP
            for x, y in zip(a, b, strict=True)
        ]
        stages[name] = {
            "spearman_mean": statistics.fmean(rhos),
            "spearman_min": min(rhos),
            "top_overlap": statistics.fmean(tops),
        }
    effects = reference["effects"]
    difference = np.abs(found["effects"] - effects).max() / np.abs(effects).max()
    return {"stages": stages, "effects_relative": float(difference)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the examples")
    parser.add_argument("--dir", type=Path, help="where to write the store (default: temp)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    parser.add_argument("--markdown", type=Path, help="also write the docs section")
    args = parser.parse_args(argv)
    setting = QUICK if args.quick else FULL
    sizes = dict(zip(STAGES, setting["sizes"], strict=True))
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        store = Path(root) / "run.zarr"
        start = time.perf_counter()
        model = record(store, sizes).eval()
        recorded = time.perf_counter() - start
        print(f"recorded {sizes} in {recorded:.1f} s", flush=True)
        run = open_run(str(store))
        checkpoints = dict.fromkeys(STAGES, 0)
        for segment in plan_segments(run):
            checkpoints[run.stages[segment.stage].name] += len(segment.checkpoints)
        train = training_sets(sizes)
        forward_backward_time(model, train["finetune"], ANALYZE_BATCH)  # warm-up
        before = {n: forward_backward_time(model, train[n], ANALYZE_BATCH).wall for n in STAGES}
        arms = [(None, 0), *((cap, 0) for cap in setting["caps"]), (None, 1)]
        results = []
        for cap, seed in arms:
            results.append(analysis(store, sizes, cap, seed))
            print(f"cap {cap}, seed {seed}: {results[-1]['seconds']:.1f} s", flush=True)
        after = {n: forward_backward_time(model, train[n], ANALYZE_BATCH).wall for n in STAGES}
    forward_backward = {n: (before[n] + after[n]) / 2 for n in STAGES}
    floor = sum(checkpoints[n] * forward_backward[n] for n in STAGES)
    reference = results[0]
    report = {
        "environment": environment(),
        "sizes": sizes,
        "record_s": recorded,
        "checkpoints_used": checkpoints,
        "forward_backward_s": forward_backward,
        "floor_s": floor,
        "analyses": [
            {
                **{k: r[k] for k in ("cap", "seed", "seconds", "parts_s")},
                "floors": r["seconds"] / floor,
                "against_all": agreement(r, reference),
            }
            for r in results
        ],
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    """The docs section: one row per analysis."""
    sizes = " + ".join(f"{n:,} ({s})" for s, n in report["sizes"].items())
    lines = [
        f"Settings: `curvature_cap.py` ({report['environment']}); MLP 16-128-128-4, stages "
        f"{sizes} examples, {QUERIES} queries, `batch_size={ANALYZE_BATCH}`, defaults "
        f"otherwise; floor {report['floor_s']:.1f} s (checkpoints read per stage: "
        + ", ".join(f"{s} {c}" for s, c in report["checkpoints_used"].items())
        + ").",
        "",
        "| curvature on | seed | wall (s) | floors | covariance + eigenvalue passes (s) "
        "| scoring (s) | Spearman vs all, pretrain (lowest) | finetune (lowest) "
        f"| top-{TOP} overlap, pretrain / finetune | stage effects, max rel. difference |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["analyses"]:
        parts, against = row["parts_s"], row["against_all"]
        curvature = parts.get("covariance factors", 0.0) + parts.get("corrected eigenvalues", 0.0)
        stages = against["stages"]
        label = "all" if row["cap"] is None else f"at most {row['cap']:,}"
        first = row is report["analyses"][0]
        spearman = [
            "—" if first else f"{stages[s]['spearman_mean']:.4f} ({stages[s]['spearman_min']:.4f})"
            for s in STAGES
        ]
        top = "—" if first else " / ".join(f"{stages[s]['top_overlap']:.2f}" for s in STAGES)
        effects = "—" if first else f"{against['effects_relative']:.2g}"
        lines.append(
            f"| {label} | {row['seed']} | {row['seconds']:.1f} | {row['floors']:.2f} "
            f"| {curvature:.1f} | {parts.get('training-gradient scoring', 0.0):.1f} "
            f"| {spearman[0]} | {spearman[1]} | {top} | {effects} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
