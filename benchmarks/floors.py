"""Every data pass of an analysis, per batch, in units of its floor, on three model shapes.

The floor of a pass over a batch is one plain forward+backward pass of the batch's mean loss
with parameter gradients (what a training step computes, without the optimizer). Each pass of
``analyze`` over the same batch is timed with the library's own functions, for the three ways a
stage enters the curvature:

- *SGD*: EK-FAC of the pseudo-gradients (covariance factors per token, corrected eigenvalues);
- *Adam, preconditioned*: of the ``P^{1/2}``-scaled pseudo-gradients, ``P^{1/2}`` an arbitrary
  positive ``[out, in]`` matrix per unit (each example's gradient is formed);
- *Adam, factored*: ``P^{1/2}`` replaced by its best rank-one approximation (the Kronecker
  structure kept, ``adam_variant="factored"``);

and the training-gradient scoring pass (``Q`` query vectors contracted with every example's
gradient). Shapes: the digits MLP of ``examples/two_stage_digits.py`` (64-128-10, batch 256,
100 queries), a ConvNet (three 3×3 convolutions of 32, 64, 64 channels, the last two of stride
2, global average pooling and a linear head, on 3×32×32 images, batch 64, 100 queries) and the
Hugging Face Llama of ``transformer.py`` (``--full``: 24 M parameters, 8 sequences of 128
tokens, 4 queries; ``--quick``: its tiny shape). Inputs, labels, scales, eigenbases (random
orthogonal) and query vectors are random: the cost does not depend on their values. All arms
of a shape are alternated, a warm-up round excluded; the figure is the median over the rounds
of each arm's time over the floor measured in the same round. Beside the times, each pass's
multiply-adds in the units' products, counted from their shapes (:func:`products`), over the
floor's: what EK-FAC must compute at least, the yardstick for how close a pass is to its own
arithmetic.

With ``curvature_examples`` (``--curvature-examples``, fractions), the Adam stage is also given
with its curvature passes over that fraction of the examples (``AnalysisOptions``'s option of
the name): a pass makes that fraction of the batches, each costing what is measured here, and
the scoring pass is unchanged.

    python benchmarks/floors.py --quick                        # about a minute
    python benchmarks/floors.py --full --out f.json --markdown f.md   # about 10 minutes, 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from overhead import command  # noqa: E402
from transformer import Config as LlamaConfig  # noqa: E402
from transformer import llama  # noqa: E402

from source_callback.analysis import ekfac  # noqa: E402
from source_callback.analysis.finite import CheckedTask  # noqa: E402
from source_callback.analysis.gradients import contract  # noqa: E402
from source_callback.analysis.optimizers import rank_one  # noqa: E402
from source_callback.analysis.task import ClassificationTask, LanguageModelingTask, Task  # noqa: E402
from source_callback.analysis.units import DiagonalKind, EmbeddingKind, Unit  # noqa: E402

#: The passes of a checkpoint, as :func:`products` names them.
PASSES = ("covariance factors", "corrected eigenvalues", "training-gradient scoring")

#: Timed arms in table order: (label, kind of pass, scale).
ARMS = (
    ("covariance factors, SGD", "covariances", None),
    ("covariance factors, Adam preconditioned", "covariances", "dense"),
    ("covariance factors, Adam factored", "covariances", "factored"),
    ("corrected eigenvalues, SGD", "eigenvalues", None),
    ("corrected eigenvalues, Adam preconditioned", "eigenvalues", "dense"),
    ("corrected eigenvalues, Adam factored", "eigenvalues", "factored"),
    ("training-gradient scoring", "scores", None),
)


class ConvNet(nn.Module):
    """Three 3×3 convolutions (32, 64, 64 channels), global average pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def shapes(full: bool) -> dict[str, tuple[nn.Module, Task, Any, int]]:
    """``name -> (model, task, batch, queries)``, seeded."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    digits = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    cfg = LlamaConfig.preset(full)
    tokens = torch.randint(0, cfg.vocab, (8 if full else 4, cfg.seq_len), generator=g)
    return {
        "digits MLP (9.6 k parameters)": (
            digits,
            ClassificationTask(),
            (torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)),
            100,
        ),
        "ConvNet (57 k parameters)": (
            ConvNet(),
            ClassificationTask(),
            (torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)),
            100,
        ),
        "Llama": (
            llama(cfg),
            LanguageModelingTask(),
            {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)},
            4,
        ),
    }


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def arms(model: nn.Module, task: Task, batch: Any, queries: int) -> dict[str, Callable[[], Any]]:
    """The floor and every arm of :data:`ARMS` as functions of no argument."""
    model.eval()
    checked = CheckedTask(task)
    units = ekfac.tracked_modules(model)
    g = torch.Generator().manual_seed(1)
    dense = {
        n: 0.5 + torch.rand(u.shape, generator=g, dtype=torch.float64) for n, u in units.items()
    }
    scales: dict[str | None, dict[str, ekfac.Scale] | None] = {
        None: None,
        "dense": dict(dense),
        "factored": {n: rank_one(m) for n, m in dense.items()},
    }
    bases = {
        n: tuple(
            None if flag else _orthogonal(size, g)
            for flag, size in zip(u.identity[::-1], u.shape[::-1], strict=True)
        )
        for n, u in units.items()
    }
    vectors = {
        n: torch.randn(queries, *u.shape, generator=g, dtype=torch.float64)
        for n, u in units.items()
    }
    pseudo = torch.Generator()

    def floor() -> None:
        task.loss(model, batch).mean().backward()
        model.zero_grad(set_to_none=True)

    def one(kind: str, scale: str | None) -> Callable[[], Any]:
        if kind == "covariances":
            return lambda: ekfac.covariances(
                model, units, checked, [batch], pseudo, False, scales[scale]
            )
        if kind == "eigenvalues":
            return lambda: ekfac.corrected_eigenvalues(
                model,
                units,
                bases,
                checked,
                [batch],
                pseudo,
                False,
                scales[scale],  # type: ignore[arg-type]
            )
        return lambda: contract(model, units, task.loss, batch, vectors)

    return {"floor": floor, **{label: one(kind, scale) for label, kind, scale in ARMS}}


def tokens_per_example(
    model: nn.Module, units: dict[str, Unit], task: Task, batch: Any
) -> dict[str, int]:
    """Per unit, the tokens (positions, for a convolution) each example's gradient sums over."""
    tokens: dict[str, int] = {}
    hooks = []
    for name, unit in units.items():
        for use in unit.uses:

            def hook(module: nn.Module, args: Any, out: Any, name: str = name) -> None:
                y = out if isinstance(out, torch.Tensor) else out[0]
                conv = isinstance(module, nn.Conv2d)
                per = y.shape[2] * y.shape[3] if conv else y[0].numel() // y.shape[-1]
                tokens[name] = tokens.get(name, 0) + per

            hooks.append(use.module.register_forward_hook(hook))
    with torch.no_grad():
        task.loss(model, batch)
    for hook in hooks:
        hook.remove()
    return tokens


def products(model: nn.Module, task: Task, batch: Any, queries: int) -> dict[str, float]:
    """Each pass's multiply-adds over the floor's, counting the units' products alone.

    Per example and unit (``[out, in]``, ``T`` tokens; a side with an identity basis has no
    Gram or rotation): the floor is ``3·T·out·in`` (forward, input and weight gradients). Every
    pass makes the forward and input-gradient products, ``2·T·out·in``, and then the covariance
    factors each side's Gram, ``T·(out² + in²)/2`` (symmetric); the corrected eigenvalues the
    cheaper of rotating each token's sides and forming ``G`` (``T·(out² + in²) + T·out·in``)
    and forming ``G`` and rotating it (``T·out·in + out·in·(out + in)``), and its square; the
    scoring forms ``G`` (``T·out·in``) and contracts it with each query (``Q·out·in``).
    One-token examples form no ``G``; an embedding's products are ``T·out``. Products outside
    units (attention's, the loss's) and elementwise work are not counted: what the pass must
    compute at least, as EK-FAC defines it, against what the floor computes.
    """
    units = ekfac.tracked_modules(model)
    tokens = tokens_per_example(model, units, task, batch)
    floor = 0.0
    passes = dict.fromkeys(PASSES, 0.0)
    for name, unit in units.items():
        kind = unit.uses[0].kind
        if isinstance(kind, DiagonalKind) or name not in tokens:
            continue
        t, (out, inn) = tokens[name], unit.shape
        based = zip(unit.identity, unit.shape, strict=True)
        rows, cols = (0 if identity else size for identity, size in based)
        gram = rows * rows + cols * cols
        mm = t * out if isinstance(kind, EmbeddingKind) else t * out * inn
        floor += 3 * mm
        if t == 1:
            rotate, score = gram + out * inn, queries * out * inn
        else:
            rotate = min(t * gram + mm, mm + out * inn * (rows + cols)) + out * inn
            score = mm + queries * out * inn
        passes["covariance factors"] += 2 * mm + t * gram / 2
        passes["corrected eigenvalues"] += 2 * mm + rotate
        passes["training-gradient scoring"] += 2 * mm + score
    return {name: value / floor for name, value in passes.items()}


def measure(functions: dict[str, Callable[[], Any]], rounds: int) -> dict[str, Any]:
    """Alternated rounds (the first a warm-up): floor seconds and each arm in floors, medians."""
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    for round_ in range(rounds + 1):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            if round_:
                seconds[name].append(time.perf_counter() - start)
    floors = seconds["floor"]
    return {
        "floor_s": statistics.median(floors),
        "floors": {
            name: statistics.median(t / f for t, f in zip(times, floors, strict=True))
            for name, times in seconds.items()
            if name != "floor"
        },
        "seconds": seconds,
    }


def markdown(report: dict[str, Any]) -> str:
    """The docs section: one row per shape, one column per pass, in floors."""
    env = report["environment"]
    lines = [
        f"`{report['command']}` ({report['wall_s'] / 60:.0f} minutes; {env['cpu_count']} CPU "
        f"cores, torch threads {env['threads']}, Python {env['python']}, torch {env['torch']}; "
        f"load average before {env['loadavg_before'][0]:.1f}, at the end "
        f"{env['loadavg_at_end'][0]:.1f}). Each pass over one batch, in units of one "
        f"forward+backward pass of the batch with parameter gradients (median of "
        f"{report['rounds']} alternated rounds); *Adam stage* is the sum of the three passes a "
        "checkpoint of an Adam stage costs (covariance factors, corrected eigenvalues, scoring).",
        "",
        "| pass | " + " | ".join(report["shapes"]) + " |",
        "| --- |" + " ---: |" * len(report["shapes"]),
        "| batch; floor (ms) | "
        + " | ".join(f"{s['batch']}; {s['floor_s'] * 1e3:.1f}" for s in report["shapes"].values())
        + " |",
    ]
    for label, _, _ in ARMS:
        cells = (f"{s['floors'][label]:.2f}" for s in report["shapes"].values())
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    stages = [(variant, 1.0) for variant in ("preconditioned", "factored")]
    stages += [("factored", fraction) for fraction in report["curvature_examples"]]
    for variant, fraction in stages:
        cells = []
        for s in report["shapes"].values():
            f = s["floors"]
            total = sum(
                f[f"{kind}, Adam {variant}"]
                for kind in ("covariance factors", "corrected eigenvalues")
            )
            cells.append(f"**{fraction * total + f['training-gradient scoring']:.2f}**")
        subset = "" if fraction == 1 else f", curvature on {fraction:g} of the examples"
        lines.append(f"| **Adam stage, {variant}{subset}** | " + " | ".join(cells) + " |")
    for name in PASSES:
        cells = (f"{s['products'][name]:.2f}" for s in report["shapes"].values())
        lines.append(f"| *{name}, its products alone* | " + " | ".join(cells) + " |")
    cells = (f"***{sum(s['products'].values()):.2f}***" for s in report["shapes"].values())
    lines.append("| ***a stage's checkpoint, its products alone*** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(batch: Any) -> str:
    if isinstance(batch, dict):
        return "×".join(map(str, batch["input_ids"].shape)) + " tokens"
    return str(len(batch[0]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny Llama, 2 rounds (default)")
    mode.add_argument("--full", action="store_true", help="24 M-parameter Llama, 3 rounds")
    parser.add_argument("--rounds", type=int, help="measured rounds per shape")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--curvature-examples",
        default="0.5,0.25",
        help="fractions of the examples the curvature passes go over, for extra Adam-stage rows",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--markdown", help="write the docs section here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.full else 2)
    started, load = time.perf_counter(), list(os.getloadavg())
    report: dict[str, Any] = {
        "command": command("floors.py", sys.argv[1:] if argv is None else argv),
        "rounds": rounds,
        "curvature_examples": [float(f) for f in args.curvature_examples.split(",") if f],
        "shapes": {},
    }
    for name, (model, task, batch, queries) in shapes(args.full).items():
        params = sum(p.numel() for p in model.parameters())
        label = name if name != "Llama" else f"Llama ({params / 1e6:.1f} M parameters)"
        print(label, flush=True)
        result = measure(arms(model, task, batch, queries), rounds)
        result.update(batch=describe(batch), queries=queries, parameters=params)
        result["products"] = products(model, task, batch, queries)
        report["shapes"][label] = result
        for arm, value in result["floors"].items():
            print(f"  {arm:44}{value:7.2f} floors", flush=True)
        for name, value in result["products"].items():
            print(f"  {name + ', its products alone':44}{value:7.2f} floors", flush=True)
    report["wall_s"] = time.perf_counter() - started
    report["environment"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg_before": load,
        "loadavg_at_end": list(os.getloadavg()),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
