"""Accuracy of a curvature fitted on a subset of each stage's examples (``curvature_examples``).

Each setting is one of the exact-unroll tests' runs (recorded, and unrolled through autograd
once): the two-stage tanh MLP of ``tests/test_analyze.py`` (SGD + momentum, then AdamW; exact
Gauss-Newton blocks, as that test) and the three two-stage LoRA transformers of
``tests/test_transformers.py`` (Llama + peft, GPT-2 + peft, the hand-written model; sampled
pseudo-labels). Each is analyzed as its test does, with the curvature on all, a half and a
quarter of each stage's examples, at several seeds (the seed draws the subset and the
pseudo-labels), and compared with the exact unroll: mean per-query Spearman of the scores
(per stage and, for the transformers, all examples together) and, for the MLP, the Pearson
correlation of the first stage's effect with retraining the second stage from its start.

    python benchmarks/curvature_examples.py --out c.json --markdown c.md   # ~10 minutes, 2 cores
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from scipy.stats import pearsonr  # noqa: E402
from test_analyze import _data, _spearman, analyze_two_stage, two_stage_run  # noqa: E402
from test_transformers import RECIPES, _two_stage_run, analyze_lora, lora_figures  # noqa: E402

#: Settings in table order: name -> the figures measured, in order.
SETTINGS = {
    "two-stage tanh MLP (SGD+momentum, then AdamW)": ("stage 1", "stage 2", "stage-1 effect"),
    "Llama + peft LoRA": ("all", "pretraining", "LoRA stage"),
    "GPT-2 + peft LoRA": ("all", "pretraining", "LoRA stage"),
    "hand-written LoRA model": ("all", "pretraining", "LoRA stage"),
}
KINDS = {
    "Llama + peft LoRA": "llama-peft",
    "GPT-2 + peft LoRA": "gpt2-peft",
    "hand-written LoRA model": "handwritten",
}


def mlp(root: Path) -> Any:
    """The two-stage MLP: a function of (seed, fraction) giving its figures."""
    queries = _data(6, seed=99)
    truth, skipped_a, _, model, data_a, data_b = two_stage_run(root, queries)

    def figures(seed: int, fraction: float | None) -> tuple[float, ...]:
        options = {"seed": seed, "curvature_examples": fraction, "name": None}
        result = analyze_two_stage(root, model, data_a, data_b, queries, **options)
        return (
            _spearman(result.scores["a"], truth[:, :24]),
            _spearman(result.scores["b"], truth[:, 24:]),
            float(pearsonr(result.stage_effects[:, 0], skipped_a).statistic),
        )

    return figures


def transformer(root: Path, kind: str) -> Any:
    """A LoRA setting of ``test_transformers``: a function of (seed, fraction)."""
    store, _, pretrain, sft, queries, truth = _two_stage_run(root, RECIPES[kind]())

    def figures(seed: int, fraction: float | None) -> tuple[float, ...]:
        options = {"seed": seed, "curvature_examples": fraction}
        return lora_figures(analyze_lora(store, kind, pretrain, sft, queries, **options), truth)

    return figures


def cell(values: list[float]) -> str:
    """Mean over seeds, with the range where the seeds differ."""
    mean = statistics.fmean(values)
    if max(values) - min(values) < 5e-4:
        return f"{mean:.3f}"
    return f"{mean:.3f} ({min(values):.3f}–{max(values):.3f})"


def markdown(report: dict[str, Any]) -> str:
    fractions = report["fractions"]
    head = [f"{'all' if f is None else f'{f:g}'} of the examples" for f in fractions]
    lines = [
        f"`{report['command']}` ({report['wall_s'] / 60:.0f} minutes; seeds "
        f"{', '.join(map(str, report['seeds']))}: mean (range) over seeds)",
        "",
        "| setting | figure | " + " | ".join(head) + " |",
        "| --- | --- |" + " --- |" * len(fractions),
    ]
    for name, rows in report["settings"].items():
        for i, figure in enumerate(SETTINGS[name]):
            cells = [cell([r[i] for r in rows[str(f)]]) for f in fractions]
            lines.append(f"| {name} | {figure} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..n-1 per fraction")
    parser.add_argument("--fractions", default="1,0.5,0.25", help="1 means all examples")
    parser.add_argument("--settings", default=";".join(SETTINGS), help="separated by ';'")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--markdown", help="write the docs table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fractions = [None if float(f) == 1 else float(f) for f in args.fractions.split(",")]
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": "python benchmarks/curvature_examples.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "fractions": fractions,
        "seeds": seeds,
        "settings": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for number, name in enumerate(args.settings.split(";")):
            root = Path(tmp) / str(number)
            root.mkdir()
            figures = mlp(root) if name not in KINDS else transformer(root, KINDS[name])
            rows = {str(f): [figures(seed, f) for seed in seeds] for f in fractions}
            report["settings"][name] = rows
            print(name, json.dumps(rows), flush=True)
    report["wall_s"] = time.perf_counter() - started
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    text = markdown(report)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return report


if __name__ == "__main__":
    main()
