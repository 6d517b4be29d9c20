"""Reproduce every table and plot of docs/benchmarks.md.

    python benchmarks/run_all.py --quick     # minutes: fewer subsets, seeds and models
    python benchmarks/run_all.py --full      # the published figures (about half an hour, 2 cores)

Results go to ``benchmarks/results/<mode>/`` (``results.json``, ``benchmarks.md`` and PNGs).
``--docs`` also writes the generated sections into docs/benchmarks.md (between the
``<!-- generated:NAME -->`` markers) and the plots into docs/img/; ``--full`` implies it.
The speed benchmark (benchmarks/speed.py) runs in a subprocess and writes its own section.
Parts (``--parts``, default all): accuracy, segments, overhead, recording, speed, cache (the
projected-gradient cache against exact scores, benchmarks/cache.py), scale (memory of
``analyze(out_of_core=True)`` on up to 10^6 training examples × 10^3 queries,
benchmarks/analyze_memory.py, in a subprocess; with ``--full`` about 6 minutes and 8 GB of
temporary disk), transformer (a 24 M-parameter Hugging Face Llama, a full stage then a peft
LoRA stage: recording overhead per stage and analysis time against its floor by pass,
benchmarks/transformer.py, in a subprocess; with ``--full`` about 25 minutes on 2 cores),
floors (every data pass per batch in units of one forward+backward pass, SGD and both Adam
variants, on the digits MLP, a ConvNet and the Llama, benchmarks/floors.py, in a subprocess;
with ``--full`` about 10 minutes), recording-size (recording overhead, writer throughput
against ``dd`` and the stage-end wait on models of 2 M, 20 M and, with ``--full``, 200 M
parameters, ``overhead.py --sizes``, in a subprocess; about 20 minutes with ``--full``, 2 with
``--quick``), sharded (recording an FSDP2 run on two CPU processes against the same run
without the callback, and each rank's peak memory, benchmarks/sharded.py; about 2 minutes).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning
import matplotlib
import numpy as np
import torch
import zarr

matplotlib.use("Agg")
import cache as cache_benchmark
import lds
import matplotlib.pyplot as plt
from overhead import SIZES
from settings import Setting, rotated_digits

ROOT = Path(__file__).resolve().parent.parent
PARTS = (
    "accuracy",
    "segments",
    "overhead",
    "recording",
    "speed",
    "cache",
    "scale",
    "transformer",
    "floors",
    "recording-size",
    "sharded",
)
SPEED_PLOTS = ("breakdown", "memory", "kronfluence")  # docs/img/speed_<name>.png
DOCS = ROOT / "docs" / "benchmarks.md"

MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "epochs": [1, 10],
        "models": 2,
        "subsets": 20,
        "seeds": 2,
        "removal_ks": [20],
        "removal_queries": 10,
        "overhead_reps": 2,
    },
    "full": {
        "epochs": [1, 3, 10, 30],
        "models": 3,
        "subsets": 50,
        "seeds": 4,
        "removal_ks": [10, 40],
        "removal_queries": 20,
        "overhead_reps": 5,
    },
}


def lds_settings(epochs: list[int]) -> list[Setting]:
    """Settings 1–4 (the linear ones at each epoch count)."""
    linear = [
        lds.SETTINGS[name](e)
        for name in ("logistic-breast-cancer", "linear-diabetes")
        for e in epochs
    ]
    return linear + [
        lds.SETTINGS[name](0)
        for name in ("noisy-mlp-digits", "rotated-digits-sgd", "rotated-digits-adamw")
    ]


def recording_overhead(setting: Setting, workdir: Path, reps: int) -> dict[str, float]:
    """Wall time of training the setting with and without recording, interleaved."""
    times: dict[str, list[float]] = {"without": [], "with": []}
    for rep in range(reps + 1):  # the first pair warms up
        for arm in ("without", "with") if rep % 2 else ("with", "without"):
            store = workdir / f"{setting.name}-overhead.zarr" if arm == "with" else None
            start = time.perf_counter()
            setting.train_run(store, seed=rep)
            if rep:
                times[arm].append(time.perf_counter() - start)
    without, with_ = np.median(times["without"]), np.median(times["with"])
    paired = np.median(np.array(times["with"]) / np.array(times["without"]))
    return {
        "without": float(without),
        "with": float(with_),
        "ratio": float(with_ / without),
        "paired": float(paired),
        "reps": reps,
    }


def _interval(values: list[float]) -> str:
    mean, low, high = values
    return f"{mean:.3f} ({low:.2f}–{high:.2f})"


def lds_table(results: list[dict[str, Any]], length: str = "epochs") -> str:
    """Markdown table: LDS per setting and method, single model and ensemble.

    Against the retrainings of ``length`` (on the settings measured with it).
    """
    methods = list(lds.METHODS)
    lines = [
        "| setting | N | ceiling | " + " | ".join(methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for r in results:
        if length not in r:
            continue
        by_method, value = r[length]["methods"], r[length]["ceiling"]
        ceiling = "–" if value is None else f"{value:.2f}"
        for kind in ("single", "ensemble"):
            if kind not in by_method[methods[0]]:
                continue
            label = r["title"] + (f", ensemble of {r['models']}" if kind == "ensemble" else "")
            cells = [_interval(by_method[m][kind]) for m in methods]
            lines.append(f"| {label} | {r['examples']} | {ceiling} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def variants_table(results: list[dict[str, Any]]) -> str:
    """Markdown table: the default's alternatives where they apply."""
    lines = [
        "| setting | variant | LDS single | LDS ensemble | SOURCE (default) single |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        by_method = r["epochs"]["methods"]
        for label, row in by_method.items():
            if label in lds.METHODS:
                continue
            ensemble = _interval(row["ensemble"]) if "ensemble" in row else "–"
            lines.append(
                f"| {r['title']} | {label} | {_interval(row['single'])} | {ensemble} | "
                f"{_interval(by_method['SOURCE']['single'])} |"
            )
    return "\n".join(lines)


def plot_lds(results: list[dict[str, Any]], path: Path) -> None:
    """LDS against epochs for the linear settings (both retraining conventions), bars for
    the others."""
    linear = [r for r in results if "epochs" in r["notes"]]
    others = [r for r in results if "epochs" not in r["notes"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, prefix in zip(axes[:2], ("logistic", "linear-"), strict=True):
        rows = [r for r in linear if r["setting"].startswith(prefix)]
        epochs = [r["notes"]["epochs"] for r in rows]
        for color, method in zip(colors, lds.METHODS, strict=False):
            for length, style in (("epochs", "-"), ("steps", ":")):
                if length not in rows[0]:
                    continue
                values = np.array([r[length]["methods"][method]["single"] for r in rows])
                ax.errorbar(
                    epochs,
                    values[:, 0],
                    yerr=[values[:, 0] - values[:, 1], values[:, 2] - values[:, 0]],
                    marker="o",
                    capsize=3,
                    color=color,
                    linestyle=style,
                    label=f"{method} (same {length})",
                )
        ax.set_xscale("log")
        ax.set_xlabel("epochs of SGD")
        ax.set_ylabel("LDS")
        ax.set_title(rows[0]["title"].rsplit(",", 2)[0])
        ax.legend(fontsize=7)
    ax = axes[2]
    width = 0.8 / len(lds.METHODS)
    for i, method in enumerate(lds.METHODS):
        values = np.array([r["epochs"]["methods"][method]["single"] for r in others])
        ax.bar(
            np.arange(len(others)) + i * width,
            values[:, 0],
            width,
            yerr=[values[:, 0] - values[:, 1], values[:, 2] - values[:, 0]],
            capsize=2,
            label=method,
        )
    ax.set_xticks(np.arange(len(others)) + 0.4 - width / 2)
    ax.set_xticklabels([r["setting"] for r in others], fontsize=8)
    ax.set_ylabel("LDS (single model)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def removal_table(result: dict[str, Any]) -> str:
    """Markdown table: fraction of predictions flipped by removing the top-k examples."""
    ks = list(next(iter(result["flips"].values())))
    lines = [
        "| removed per query | " + " | ".join(f"k = {k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for label, row in result["flips"].items():
        lines.append(f"| {label} | " + " | ".join(f"{row[k]:.2f}" for k in ks) + " |")
    return "\n".join(lines)


def stage_table(result: dict[str, Any]) -> str:
    """Markdown table: predicted vs retrained stage effects."""
    lines = [
        "| method | stage | Pearson | Spearman | scale (retrained / predicted) |",
        "|---|---|---|---|---|",
    ]
    for label, rows in result["effects"].items():
        for stage, (pearson, spearman, slope) in rows.items():
            lines.append(f"| {label} | {stage} | {pearson:.3f} | {spearman:.3f} | {slope:.2f} |")
    return "\n".join(lines)


def overhead_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table of recording overhead per setting."""
    lines = [
        "| setting | fit without (s) | fit with (s) | ratio of medians | paired ratio |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['without']:.2f} | {r['with']:.2f} | {r['ratio']:.3f} | "
            f"{r['paired']:.3f} |"
        )
    return "\n".join(lines)


def environment() -> str:
    """One line naming the machine and library versions."""
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, Python "
        f"{platform.python_version()}, torch {torch.__version__}, Lightning "
        f"{lightning.__version__}, zarr {zarr.__version__}"
    )


def replace_section(text: str, name: str, body: str) -> str:
    """Replace the text between ``<!-- generated:name -->`` and ``<!-- /generated:name -->``."""
    begin, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"docs/benchmarks.md has no {begin} ... {end} section")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text)


def accuracy(config: dict[str, Any], work: Path, processes: int) -> dict[str, Any]:
    """LDS on every setting, the removal evaluation and the stage effects."""
    results: dict[str, Any] = {"lds": []}
    for setting in lds_settings(config["epochs"]):
        print(f"LDS: {setting.title}", flush=True)
        linear = "epochs" in setting.notes
        results["lds"].append(
            lds.lds(
                setting,
                work,
                models=config["models"],
                subsets=config["subsets"],
                seeds=config["seeds"],
                lengths=("epochs", "steps") if linear else ("epochs",),
                processes=processes,
            )
        )
    print("removal: noisy MLP", flush=True)
    results["removal"] = lds.removal(
        lds.SETTINGS["noisy-mlp-digits"](0),
        work,
        ks=config["removal_ks"],
        queries=config["removal_queries"],
        seeds=config["seeds"],
        processes=processes,
    )
    print("stage effects: three stages", flush=True)
    results["stages"] = lds.stage_effects(
        work, models=config["models"], seeds=config["seeds"], processes=processes
    )
    return results


def accuracy_sections(results: dict[str, Any], config: dict[str, Any], image: str) -> dict:
    """The generated markdown of the accuracy part."""
    intro = (
        f"`run_all.py --{results['mode']}`: {config['subsets']} subsets (α = 0.5) × "
        f"{config['seeds']} retraining seeds per setting, {config['models']} recorded models for "
        f"the ensembles; {results['environment']}; {results['accuracy_minutes']:.0f} minutes."
    )
    return {
        "lds": "\n\n".join([intro, lds_table(results["lds"]), f"![LDS per method]({image})"]),
        "lds-steps": lds_table(results["lds"], "steps"),
        "variants": variants_table(results["lds"]),
        "removal": removal_table(results["removal"]),
        "stages": stage_table(results["stages"]),
    }


def segment_counts(config: dict[str, Any], work: Path, processes: int) -> list[dict[str, Any]]:
    """LDS of SOURCE with 1, 2, 3 and 6 segments per stage on the two-stage settings."""
    methods = {f"{n} segment(s)": {"method": "source", "segments": n} for n in lds.SEGMENT_COUNTS}
    rows = []
    for setting in (rotated_digits(adam=False), rotated_digits(adam=True)):
        print(f"segments: {setting.title}", flush=True)
        rows.append(
            lds.lds(
                setting,
                work,
                models=1,
                subsets=config["subsets"],
                seeds=config["seeds"],
                processes=processes,
                methods=methods,
            )
        )
    return rows


def segments_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: SOURCE's LDS against the number of segments per stage."""
    labels = [f"{n} segment(s)" for n in lds.SEGMENT_COUNTS]
    lines = ["| setting | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for r in rows:
        found = r["epochs"]["methods"]
        cells = [_interval(found[k]["single"]) if k in found else "n/a" for k in labels]
        seconds = [f"{r['seconds'][k]:.0f} s" if k in found else "–" for k in labels]
        lines.append(f"| {r['title']} | " + " | ".join(cells) + " |")
        lines.append("| analysis time | " + " | ".join(seconds) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick")
    mode.add_argument("--full", action="store_const", dest="mode", const="full")
    parser.add_argument("--docs", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--processes", type=int, default=2, help="parallel retrainings")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {', '.join(PARTS)} (default: all)",
    )
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="rewrite the tables and plots from the saved results.json without measuring",
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown part(s) in --parts: {args.parts}")
    torch.set_num_threads(1)  # tiny models: threads only add contention noise
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    config = MODES[args.mode]
    out = ROOT / "benchmarks" / "results" / args.mode
    work = ROOT / "benchmarks" / "runs" / args.mode
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    write_docs = args.docs or args.mode == "full"
    images = (ROOT / "docs" / "img") if write_docs else out
    images.mkdir(parents=True, exist_ok=True)
    saved = out / "results.json"
    results: dict[str, Any] = json.loads(saved.read_text()) if saved.exists() else {}
    results.update({"mode": args.mode, "config": config, "environment": environment()})
    sections: dict[str, str] = {}

    measure = not args.tables_only
    if "accuracy" in parts:
        if measure:
            started = time.perf_counter()
            results.update(accuracy(config, work, args.processes))
            results["accuracy_minutes"] = (time.perf_counter() - started) / 60
            saved.write_text(json.dumps(results, indent=1))
        plot_lds(results["lds"], images / "lds.png")
        image = ("img/" if write_docs else "") + "lds.png"
        sections.update(accuracy_sections(results, config, image))
    if "segments" in parts:
        if measure:
            results["segments"] = segment_counts(config, work, args.processes)
            saved.write_text(json.dumps(results, indent=1))
        sections["segments"] = segments_table(results["segments"])
    if "overhead" in parts:
        if measure:
            print("recording overhead", flush=True)
            results["overhead"] = {
                s.name: recording_overhead(s, work, config["overhead_reps"])
                for s in (rotated_digits(adam=False), rotated_digits(adam=True))
            }
            saved.write_text(json.dumps(results, indent=1))
        sections["overhead"] = overhead_table(results["overhead"])
    if "recording" in parts:
        if measure:
            print("recording overhead of a longer run", flush=True)
            reps = ["--quick"] if args.mode == "quick" else ["--reps", "6"]
            command = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), *reps]
            command += ["--out", str(out / "overhead.json")]
            printed = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results["recording"] = printed[printed.index("model:") :].split("\nwrote ")[0].rstrip()
            saved.write_text(json.dumps(results, indent=1))
        sections["overhead-long"] = f"```\n{results['recording']}\n```"
    if "recording-size" in parts:
        sizes_md = out / "overhead_sizes.md"
        if measure:
            print("recording overhead against model size", flush=True)
            command = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--sizes"]
            command += ["2M", "20M", "--quick"] if args.mode == "quick" else list(SIZES)
            command += ["--out", str(out / "overhead_sizes.json"), "--markdown", str(sizes_md)]
            subprocess.run(command, check=True)
        sections["overhead-size"] = sizes_md.read_text().strip()
    if "sharded" in parts:
        sharded_md = out / "sharded.md"
        if measure:
            print("recording an FSDP2 run", flush=True)
            command = [sys.executable, str(ROOT / "benchmarks" / "sharded.py")]
            command += ["--quick"] if args.mode == "quick" else []
            subprocess.run([*command, "--markdown", str(sharded_md)], check=True)
        sections["sharded"] = sharded_md.read_text().strip()
    if "speed" in parts:
        speed_md = out / "speed.md"
        if measure:
            command = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), f"--{args.mode}"]
            command += ["--out", str(out / "speed.json"), "--markdown", str(speed_md)]
            subprocess.run([*command, "--img-dir", str(images)], check=True)
        prefix = "img/" if write_docs else ""
        plots = [f"![{name}]({prefix}speed_{name}.png)" for name in SPEED_PLOTS]
        sections["speed"] = "\n\n".join([speed_md.read_text().strip(), *plots])
    if "scale" in parts:
        scale_md = out / "analyze_memory.md"
        if measure:
            print("out-of-core analysis memory", flush=True)
            command = [sys.executable, str(ROOT / "benchmarks" / "analyze_memory.py")]
            command += ["--quick"] if args.mode == "quick" else []
            command += ["--out", str(out / "analyze_memory.json"), "--markdown", str(scale_md)]
            subprocess.run(command, check=True)
        sections["scale-memory"] = scale_md.read_text().strip()
    if "transformer" in parts:
        transformer_md = out / "transformer.md"
        if measure:
            print("Hugging Face Llama, full stage then LoRA stage", flush=True)
            command = [sys.executable, str(ROOT / "benchmarks" / "transformer.py")]
            command += [f"--{args.mode}", "--out", str(out / "transformer.json")]
            subprocess.run([*command, "--markdown", str(transformer_md)], check=True)
        sections["transformer"] = transformer_md.read_text().strip()
    if "floors" in parts:
        floors_md = out / "floors.md"
        if measure:
            print("each data pass against its floor, three shapes", flush=True)
            command = [sys.executable, str(ROOT / "benchmarks" / "floors.py"), f"--{args.mode}"]
            command += ["--out", str(out / "floors.json"), "--markdown", str(floors_md)]
            subprocess.run(command, check=True)
        sections["floors"] = floors_md.read_text().strip()
    if "cache" in parts:
        if measure:
            print("projected-gradient cache", flush=True)
            results["cache"] = cache_benchmark.run(args.mode, work, args.processes)
            saved.write_text(json.dumps(results, indent=1))
        cache_benchmark.plot_cache(results["cache"], images / "cache.png")
        image = ("img/" if write_docs else "") + "cache.png"
        intro = cache_benchmark.cache_intro(results["cache"], results["environment"])
        table = cache_benchmark.cache_table(results["cache"])
        sections["cache"] = "\n\n".join([intro, table, f"![cache accuracy]({image})"])

    (out / "benchmarks.md").write_text(
        "\n\n".join(f"## {name}\n\n{body}" for name, body in sections.items())
    )
    if write_docs:
        text = DOCS.read_text()
        for name, body in sections.items():
            text = replace_section(text, name, body)
        DOCS.write_text(text)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
