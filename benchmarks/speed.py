"""Analysis speed and memory: ``analyze()`` against its floor, peak memory vs N, kronfluence.

Three measurements, each with its ratios taken side by side in one process (the machine is
shared, so absolute times drift; ratios of interleaved measurements do not):

1. **Floor ratio.** The two-stage digits run of ``examples/two_stage_digits.py`` is recorded,
   then ``analyze(method="source")`` is timed against its floor: the number of checkpoints the
   segments use (``Σ_ℓ C_ℓ``) times one plain forward+backward pass over the stage's training
   data at ``analyze``'s batch size, measured right before and after each analysis. Library
   functions are wrapped with timers inside this script (nothing in ``source_callback`` is
   changed) to split the time into covariance factors, eigendecomposition, corrected
   eigenvalues, query gradients and sweep, training-gradient scoring, and the rest.
2. **Peak memory vs training-set size.** A run on N synthetic examples and one on 10·N (the
   digits MLP on random features, labels from a random teacher) are recorded; each is analysed
   in a fresh subprocess that reports its RSS before ``analyze``, its peak RSS during it (the
   kernel's high-water mark ``VmHWM``, reset to the current RSS just before the call, since
   the imports peak higher than a small analysis) and an RSS timeline.
3. **kronfluence.** On the digits run's final checkpoint, ``analyze(method="if")`` and
   kronfluence's EK-FAC pairwise scores (``Analyzer.fit_all_factors`` with ``strategy="ekfac"``,
   ``compute_pairwise_scores``) on the same pooled training data and queries, with sampled
   pseudo-labels in both and kronfluence's heuristic damping (``damping_factor=None``: 0.1 × the
   mean corrected eigenvalue per module), which is exactly ours (``damping=0.1`` × each
   module's mean eigenvalue). Reported: per-query Spearman of the scores, their scale ratio
   (ours carries the 1/N of SOURCE-math §7, kronfluence does not), the wall-time ratio
   (alternating, warm-up excluded), and diagnostics of what separates the two.

kronfluence is never a dependency of the package. Part 3 runs in this process when
kronfluence is importable; otherwise in a subprocess with ``--kf-python`` (default
``benchmarks/.venv-kf/bin/python`` when it exists); otherwise it is skipped. Set that
interpreter up with (from the repository root; the torch pin keeps pip from pulling a CUDA
build):

    python3 -m venv benchmarks/.venv-kf                     # git-ignored
    benchmarks/.venv-kf/bin/pip install torch==2.13.0       # the CPU build, as in .venv
    benchmarks/.venv-kf/bin/pip install -e . torch==2.13.0
    benchmarks/.venv-kf/bin/pip install --no-deps kronfluence==1.0.1
    benchmarks/.venv-kf/bin/pip install accelerate einconv einops opt-einsum safetensors \
        scikit-learn torch==2.13.0

(kronfluence declares torchvision as a dependency but does not import it for this use, hence
``--no-deps``.)

Commands:

    python benchmarks/speed.py --quick                       # about 2-4 minutes on 2 cores
    python benchmarks/speed.py --full --out speed.json --markdown speed.md   # about 10 minutes
    python benchmarks/speed.py --quick --parts kronfluence   # one part only

Plots (matplotlib, when importable) go to ``docs/img/speed_*.png`` (``--img-dir``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from two_stage_digits import STAGES, DigitsMLP, rotated_digits  # noqa: E402
from two_stage_digits import run as record_digits  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from settings import trainer  # noqa: E402

from source_callback import ClassificationTask, analyze, open_run  # noqa: E402
from source_callback.analysis import api, ekfac, optimizers, stage_models  # noqa: E402
from source_callback.analysis.engine import Engine, batch_seed  # noqa: E402
from source_callback.analysis.segments import plan_segments  # noqa: E402
from source_callback.analysis.task import sample_labels  # noqa: E402
from source_callback.store.reader import Run  # noqa: E402

PARTS = ("floor", "memory", "kronfluence")
DEFAULT_KF_PYTHON = ROOT / "benchmarks" / ".venv-kf" / "bin" / "python"


@dataclass
class Config:
    """Settings of one benchmark invocation (``--quick`` and ``--full`` presets)."""

    mode: str = "quick"
    threads: int = 1
    batch_size: int = 256
    seed: int = 0
    # part 1: the digits run and analyze(method="source")
    epochs: float = 1.0
    checkpoints_per_stage: int = 6
    segments: int = 3
    queries: int = 20
    floor_reps: int = 2
    # part 2: synthetic runs of N and factor·N examples
    mem_n: int = 1000
    mem_factor: int = 10
    mem_queries: int = 100
    mem_checkpoints_per_stage: int = 2
    mem_segments: int = 1
    # part 3: kronfluence
    kf_queries: int = 20
    kf_reps: int = 2
    kf_all_diagnostics: bool = False

    @classmethod
    def preset(cls, full: bool) -> Config:
        """The ``--quick`` (default) or ``--full`` settings."""
        if not full:
            return cls()
        return cls(
            mode="full",
            queries=100,
            floor_reps=5,
            mem_n=10000,
            kf_queries=100,
            kf_reps=5,
            kf_all_diagnostics=True,
        )


def quiet_lightning() -> None:
    """Silence Lightning's banners and this library's expected warnings."""
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "kronfluence"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------


class Profiler:
    """Exclusive wall time of wrapped functions: a call's time minus that of wrapped callees.

    The labels therefore add up (with ``other``) to the total of the outermost wrapped call.
    Times are also kept per *tag* (here: the stage being worked on), which tagging wrappers set
    for the duration of a call.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.by_tag: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.tag = ""
        self._children: list[float] = []

    def wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        """``fn`` with its exclusive time added to ``label``."""

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._children.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                exclusive = elapsed - self._children.pop()
                self.totals[label] += exclusive
                self.by_tag[self.tag][label] += exclusive
                self.calls[label] += 1
                if self._children:
                    self._children[-1] += elapsed

        return timed

    def tagging(self, fn: Callable[..., Any], tag_of: TagOf) -> Callable[..., Any]:
        """``fn`` that sets the tag to ``tag_of(args, kwargs)`` while it runs."""

        @functools.wraps(fn)
        def tagged(*args: Any, **kwargs: Any) -> Any:
            previous, self.tag = self.tag, tag_of(args, kwargs)
            try:
                return fn(*args, **kwargs)
            finally:
                self.tag = previous

        return tagged

    @contextlib.contextmanager
    def patched(
        self,
        targets: list[tuple[Any, str, str]],
        tags: list[tuple[Any, str, TagOf]] | None = None,
    ) -> Iterator[Profiler]:
        """Wrap each ``(owner, attribute, label)`` with a timer, each tag target with a tagger.

        Tagging wrappers go around timed ones; everything is restored on exit.
        """
        tags = tags or []
        attributes = {(owner, attr) for owner, attr, _ in [*targets, *tags]}
        saved = [(owner, attr, owner.__dict__[attr]) for owner, attr in attributes]
        try:
            for owner, attr, label in targets:
                setattr(owner, attr, self.wrap(getattr(owner, attr), label))
            for owner, attr, tag_of in tags:
                setattr(owner, attr, self.tagging(getattr(owner, attr), tag_of))
            yield self
        finally:
            for owner, attr, original in saved:
                setattr(owner, attr, original)

    def reset(self) -> None:
        """Forget what was timed so far."""
        self.totals.clear()
        self.calls.clear()
        self.by_tag.clear()


TagOf = Callable[[tuple[Any, ...], dict[str, Any]], str]


#: Where analyze() spends its time, by the functions it calls (owner, attribute, label). The
#: module-level names are looked up at call time (``ekfac.covariances`` in engine.py,
#: ``checkpoint_state``/``sweep`` as globals of api.py, ``prepare_model`` of stage_models.py), so
#: patching them takes effect.
BREAKDOWN_TARGETS: list[tuple[Any, str, str]] = [
    (api, "open_run", "open + validate store"),
    (api, "check_datasets", "dataset checks"),
    (stage_models, "prepare_model", "model copy"),
    (api, "plan_segments", "segment plan"),
    (Run, "steps", "store reads"),
    (api, "checkpoint_state", "store reads"),
    (Engine, "load", "load state into model"),
    (ekfac, "covariances", "covariance factors"),
    (ekfac, "eigh_float64", "eigendecomposition"),
    (ekfac, "corrected_eigenvalues", "corrected eigenvalues"),
    (optimizers, "adam_preconditioner", "Adam preconditioner"),
    (Engine, "query_grads", "query gradients"),
    (api, "sweep", "query sweep"),
    (Engine, "scores", "training-gradient scoring"),
    (Engine, "measurement", "stage effects"),
    (Engine, "module_matrices", "stage effects"),
    (api, "write_analysis", "write results"),
]
BREAKDOWN_ORDER = [
    "covariance factors",
    "eigendecomposition",
    "corrected eigenvalues",
    "query gradients",
    "query sweep",
    "training-gradient scoring",
    "store reads",
    "load state into model",
    "Adam preconditioner",
    "stage effects",
    "open + validate store",
    "dataset checks",
    "model copy",
    "segment plan",
    "write results",
    "other",
]
#: The stages of analyze() that make one pass over the training data per checkpoint.
DATA_PASSES = ("covariance factors", "corrected eigenvalues", "training-gradient scoring")


def pass_units_table(
    rows: Iterable[tuple[str, int, int, str, Mapping[str, float]]], time_unit: str
) -> list[str]:
    """Markdown rows: each stage's data passes per checkpoint, in its forward+backward passes.

    ``rows``: per stage, ``"name (update rule)"``, examples, checkpoints used, one
    forward+backward pass's time as shown (in ``time_unit``), and each of ``DATA_PASSES`` in
    units of that pass.
    """
    lines = [
        f"| stage (update rule) | examples | checkpoints | forward+backward ({time_unit}) | "
        + " | ".join(DATA_PASSES)
        + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in DATA_PASSES) + " |",
    ]
    for stage, examples, checkpoints, shown, units in rows:
        lines.append(
            f"| {stage} | {examples} | {checkpoints} | {shown} | "
            + " | ".join(f"{units[label]:.1f}" for label in DATA_PASSES)
            + " |"
        )
    return lines


@dataclass
class Timing:
    """Wall and process-CPU seconds of one measured call."""

    wall: float
    cpu: float

    @classmethod
    @contextlib.contextmanager
    def of(cls) -> Iterator[Timing]:
        """Time the ``with`` block; the yielded object is filled in when it ends."""
        timing = cls(0.0, 0.0)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield timing
        finally:
            timing.wall = time.perf_counter() - wall
            timing.cpu = time.process_time() - cpu


def _cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def forward_backward_time(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    loss: Callable[[nn.Module, Any], torch.Tensor] = _cross_entropy,
) -> Timing:
    """Time of one plain forward+backward pass over ``dataset``.

    Batched like ``analyze`` batches (a ``DataLoader`` in dataset order), no hooks; ``loss``
    gives a batch's scalar loss (default: the mean cross-entropy of ``(inputs, labels)``).
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with Timing.of() as timing:
        for batch in loader:
            loss(model, batch).backward()
            model.zero_grad(set_to_none=True)
    return timing


def at_last_checkpoint(architecture: Callable[[], nn.Module], run: Run) -> nn.Module:
    """A new ``architecture()`` holding the parameters of ``run``'s last checkpoint.

    Every parameter must be recorded; a tied one under the name that holds it (the others,
    ``state_dict``'s aliases of it, are not in the record).
    """
    model = architecture()
    params = run.checkpoints[-1].params()
    loaded = model.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()}, strict=False)
    missing = {n for n, _ in model.named_parameters()} - params.keys()
    assert not loaded.unexpected_keys and not missing, (loaded.unexpected_keys, missing)
    return model


def timed_analysis(
    store: Path,
    architecture: Callable[[], nn.Module],
    floor_data: Dataset,
    batch_size: int,
    loss: Callable[[nn.Module, Any], torch.Tensor] = _cross_entropy,
    **options: Any,
) -> dict[str, Any]:
    """``analyze(store, model=architecture(), **options)`` timed by pass against its floor.

    The floor: the checkpoints the analysis's segments use times one plain forward+backward
    pass (``loss``) of the model at the run's last checkpoint over ``floor_data``, the mean of
    a measurement just before and one just after the analysis.
    """
    run = open_run(str(store))
    reference = at_last_checkpoint(architecture, run).eval()
    forward_backward_time(reference, floor_data, batch_size, loss)  # warm-up
    before = forward_backward_time(reference, floor_data, batch_size, loss).wall
    profiler = Profiler()
    with profiler.patched(BREAKDOWN_TARGETS, []):
        start = time.perf_counter()
        result = analyze(
            str(store),
            model=architecture(),
            batch_size=batch_size,
            name=None,
            verbose=False,
            **options,
        )
        total = time.perf_counter() - start
    after = forward_backward_time(reference, floor_data, batch_size, loss).wall
    segments = options.get("segments")
    used = sum(len(s.checkpoints) for s in plan_segments(run, *([segments] if segments else [])))
    unit = used * (before + after) / 2
    parts = {label: profiler.totals.get(label, 0.0) / unit for label in BREAKDOWN_ORDER}
    return {
        "analyze_s": total,
        "floor_s": unit,
        "ratio": total / unit,
        "checkpoints": used,
        "passes": {label: parts[label] for label in DATA_PASSES},
        "eigendecomposition": parts["eigendecomposition"],
        "rest": total / unit - sum(parts[label] for label in DATA_PASSES),
        "result": result,
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two vectors (ties broken by order: float scores)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        out = np.empty(len(x))
        out[np.argsort(x, kind="stable")] = np.arange(len(x))
        return out

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def per_query_spearman(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Spearman of ``a[q]`` and ``b[q]`` for every query row."""
    return [spearman(x, y) for x, y in zip(a, b, strict=True)]


def scale_ratio(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Least-squares scale of ``a`` onto ``b`` per query: ``⟨a, b⟩ / ⟨b, b⟩``."""
    return [float(x @ y / (y @ y)) for x, y in zip(a, b, strict=True)]


def mib(value: float) -> str:
    """Bytes as MiB with one decimal."""
    return f"{value / 2**20:.1f}"


def summary(values: list[float]) -> dict[str, float]:
    """Mean, median, min and max."""
    return {
        "mean": float(np.mean(values)),
        "median": float(np.median(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
    }


# ---------------------------------------------------------------------------------------------
# Part 1: analyze(method="source") against its floor
# ---------------------------------------------------------------------------------------------


def digits_data(num_queries: int) -> tuple[dict[str, TensorDataset], Dataset]:
    """The digits run's per-stage training sets and the first held-out queries (270°)."""
    train = {name: rotated_digits(turns) for name, turns, _ in STAGES}
    queries = Subset(rotated_digits([3], held_out=True), range(num_queries))
    return train, queries


def final_model(store: Path) -> DigitsMLP:
    """A ``DigitsMLP`` holding the final checkpoint's parameters, in eval mode."""
    model = DigitsMLP()
    model.load_state_dict(open_run(str(store)).checkpoints[-1].params())
    return model.eval()


def part_floor(cfg: Config, store: Path) -> dict[str, Any]:
    """Time ``analyze(method="source")`` and its breakdown against the forward+backward floor.

    Every repetition is bracketed by floor passes (one per stage's data); the floor of a
    repetition uses the mean of the passes just before and just after it. Wall and process-CPU
    times are both kept: on a shared machine the CPU-time ratio is the steadier of the two.
    """
    train, queries = digits_data(cfg.queries)
    run = open_run(str(store))
    plan = plan_segments(run, cfg.segments)
    checkpoints = {s.name: 0 for s in run.stages}
    for segment in plan:
        checkpoints[run.stages[segment.stage].name] += len(segment.checkpoints)
    model = final_model(store)

    def floor_passes() -> dict[str, Timing]:
        return {n: forward_backward_time(model, train[n], cfg.batch_size) for n in train}

    def run_analysis() -> Timing:
        with Timing.of() as timing:
            analyze(
                str(store),
                model=DigitsMLP(),
                task="classification",
                train=train,
                queries=queries,
                segments=cfg.segments,
                method="source",
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                name="speed-benchmark",
                verbose=False,
            )
        return timing

    # Tag the time by stage: segment_operator(engine, segment, stage, ...) fits a segment's
    # curvature (api.py calls it by the name it imported); Engine.scores(self, dataset, ...)
    # scores one stage's dataset.
    stage_of = {id(dataset): name for name, dataset in train.items()}
    tags: list[tuple[Any, str, TagOf]] = [
        (api, "segment_operator", lambda args, kwargs: args[2].name),
        (Engine, "scores", lambda args, kwargs: stage_of.get(id(args[1]), "")),
    ]
    rules = {s.name: s.optimizer.update_rule.value for s in run.stages}
    profiler = Profiler()
    reps: list[dict[str, Any]] = []
    with profiler.patched(BREAKDOWN_TARGETS, tags):
        floor_passes()
        run_analysis()  # warm-up, not counted
        after = floor_passes()
        for rep in range(cfg.floor_reps):
            before = after
            profiler.reset()
            total = run_analysis()
            after = floor_passes()
            fb = {n: (before[n].wall + after[n].wall) / 2 for n in train}
            fb_cpu = {n: (before[n].cpu + after[n].cpu) / 2 for n in train}
            floor = sum(checkpoints[n] * fb[n] for n in train)
            floor_cpu = sum(checkpoints[n] * fb_cpu[n] for n in train)
            parts = dict(profiler.totals)
            parts["other"] = total.wall - sum(parts.values())
            reps.append(
                {
                    "analyze_s": total.wall,
                    "analyze_cpu_s": total.cpu,
                    "forward_backward_s": fb,
                    "forward_backward_cpu_s": fb_cpu,
                    "floor_s": floor,
                    "floor_cpu_s": floor_cpu,
                    "ratio": total.wall / floor,
                    "cpu_ratio": total.cpu / floor_cpu,
                    "breakdown_s": parts,
                    "by_stage_s": {
                        stage: {
                            label: profiler.by_tag[stage].get(label, 0.0) for label in DATA_PASSES
                        }
                        for stage in train
                    },
                    "calls": dict(profiler.calls),
                }
            )
            print(
                f"  rep {rep + 1}/{cfg.floor_reps}: analyze {total.wall:.2f} s, floor "
                f"{floor:.3f} s (ratio {total.wall / floor:.1f}; CPU-time ratio "
                f"{total.cpu / floor_cpu:.1f})",
                flush=True,
            )

    def median(key: str) -> float:
        return statistics.median(r[key] for r in reps)

    labels = [label for label in BREAKDOWN_ORDER if any(label in r["breakdown_s"] for r in reps)]
    # Means, not medians: means add up, so the parts sum to the total.
    breakdown = {
        label: statistics.fmean(r["breakdown_s"].get(label, 0.0) for r in reps) for label in labels
    }
    # Each data pass of a stage against that stage's own floor (C_s × one forward+backward).
    per_stage = {
        name: {
            label: statistics.median(
                r["by_stage_s"][name][label] / (checkpoints[name] * r["forward_backward_s"][name])
                for r in reps
            )
            for label in DATA_PASSES
        }
        for name in train
    }
    return {
        "stages": {
            s.name: {
                "examples": s.num_examples,
                "checkpoints_used": checkpoints[s.name],
                "update_rule": rules[s.name],
                "forward_backward_s_median": statistics.median(
                    r["forward_backward_s"][s.name] for r in reps
                ),
                "pass_cost_in_stage_floor_units": per_stage[s.name],
            }
            for s in run.stages
        },
        "segments": [[s.start, s.end, len(s.checkpoints)] for s in plan],
        "parameters": sum(p.numel() for p in model.parameters()),
        "queries": cfg.queries,
        "batch_size": cfg.batch_size,
        "ratio_median": median("ratio"),
        "ratio_min": min(r["ratio"] for r in reps),
        "ratio_max": max(r["ratio"] for r in reps),
        "cpu_ratio_median": median("cpu_ratio"),
        "analyze_s_median": median("analyze_s"),
        "floor_s_median": median("floor_s"),
        "analyze_s_mean": statistics.fmean(r["analyze_s"] for r in reps),
        "floor_s_mean": statistics.fmean(r["floor_s"] for r in reps),
        "breakdown_s_mean": breakdown,
        "reps": reps,
    }


# ---------------------------------------------------------------------------------------------
# Part 2: peak memory against the training-set size
# ---------------------------------------------------------------------------------------------


def synthetic(n: int, seed: int) -> TensorDataset:
    """``n`` random 64-feature examples labelled by a fixed random teacher (10 classes)."""
    teacher = torch.randn(64, 10, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    logits = x @ teacher + 0.5 * torch.randn(n, 10, generator=g)
    return TensorDataset(x, logits.argmax(1))


def record_synthetic(cfg: Config, store: Path, n: int) -> None:
    """Train the digits MLP (SGD recipe) for one epoch on ``synthetic(n)``, recording it."""

    from source_callback import SourceCallback

    if store.exists():
        shutil.rmtree(store)
    torch.manual_seed(cfg.seed)
    model = DigitsMLP()
    callback = SourceCallback(
        str(store), stage="pretrain", checkpoints_per_stage=cfg.mem_checkpoints_per_stage
    )
    data = DataLoader(synthetic(n, cfg.seed), batch_size=64, shuffle=True)
    trainer(1, [callback], store.parent).fit(model, data)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (``VmHWM``) to the current RSS (Linux >= 4.0).

    Without it the peak of a fresh process is that of its imports (importing torch and
    Lightning peaks above what a small analysis uses).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """``VmHWM``: the peak RSS since the process started or since :func:`reset_peak_rss`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return max_rss_bytes()


class RssSampler:
    """Samples this process's RSS every ``interval`` seconds on a daemon thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.perf_counter()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._t0, rss_bytes()))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def memory_worker(cfg: Config, store: Path, n: int) -> dict[str, Any]:
    """In a fresh process: RSS before, peak during, and timeline of ``analyze`` on ``n``."""
    train = {"pretrain": synthetic(n, cfg.seed)}
    queries = synthetic(cfg.mem_queries, cfg.seed + 1)
    model = DigitsMLP()
    max_before = max_rss_bytes()
    reset = reset_peak_rss()
    rss_before = rss_bytes()
    start = time.perf_counter()
    with RssSampler() as sampler:
        result = analyze(
            str(store),
            model=model,
            task="classification",
            train=train,
            queries=queries,
            segments=cfg.mem_segments,
            method="source",
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            name="speed-benchmark",
            verbose=False,
        )
    elapsed = time.perf_counter() - start
    scores = result.scores["pretrain"]
    step = max(1, len(sampler.samples) // 400)
    return {
        "n": n,
        "analyze_s": elapsed,
        "rss_before_bytes": rss_before,
        "max_rss_before_bytes": max_before,
        "peak_reset": reset,
        "peak_rss_bytes": peak_rss_bytes() if reset else max(r for _, r in sampler.samples),
        "sampled_peak_rss_bytes": max(r for _, r in sampler.samples),
        "rss_after_bytes": rss_bytes(),
        "dataset_bytes": sum(t.numel() * t.element_size() for t in train["pretrain"].tensors),
        "scores_shape": list(scores.shape),
        "scores_bytes": scores.nbytes,
        "timeline": [(round(t, 3), r) for t, r in sampler.samples[::step]],
    }


def run_worker(
    python: str,
    args: list[str],
    result: Path,
    timeout: float,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run this script as ``--worker`` with ``python``; return the JSON it wrote to ``result``.

    ``env`` is added to this process's environment.
    """
    command = [python, str(Path(__file__).resolve()), *args, "--result", str(result)]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"worker {' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return json.loads(result.read_text())


#: The allocator settings each size is measured under. glibc's default raises its mmap
#: threshold dynamically, so freed blocks of a few MiB stay in the heap and RSS includes
#: fragmentation that varies from run to run; with the threshold fixed at 128 KiB every larger
#: block is returned to the system when freed, and RSS follows the live allocations.
MALLOC_MODES: dict[str, dict[str, str]] = {
    "glibc default": {},
    "mmap threshold 128 KiB": {"MALLOC_MMAP_THRESHOLD_": "131072"},
}


def part_memory(cfg: Config, workdir: Path) -> dict[str, Any]:
    """Record runs on N and factor·N examples; measure each analysis in a fresh subprocess.

    Each size is analysed once per allocator setting of :data:`MALLOC_MODES`.
    """
    sizes = [cfg.mem_n, cfg.mem_n * cfg.mem_factor]
    runs: list[dict[str, Any]] = []
    for n in sizes:
        store = workdir / f"synthetic-{n}.zarr"
        start = time.perf_counter()
        record_synthetic(cfg, store, n)
        print(f"  recorded N={n} in {time.perf_counter() - start:.1f} s", flush=True)
        for mode, env in MALLOC_MODES.items():
            out = run_worker(
                sys.executable,
                ["--worker", "memory", "--store", str(store), "--n", str(n), *config_args(cfg)],
                workdir / f"memory-{n}.json",
                timeout=3600,
                env=env,
            )
            out["malloc"] = mode
            print(
                f"  N={n} ({mode}): analyze {out['analyze_s']:.1f} s, RSS before "
                f"{mib(out['rss_before_bytes'])} MiB, peak {mib(out['peak_rss_bytes'])} MiB "
                f"(+{mib(out['peak_rss_bytes'] - out['rss_before_bytes'])})",
                flush=True,
            )
            runs.append(out)

    def increment(run: dict[str, Any]) -> int:
        return run["peak_rss_bytes"] - run["rss_before_bytes"]

    growth = {}
    for mode in MALLOC_MODES:
        small, large = (r for r in runs if r["malloc"] == mode)
        scores = large["scores_bytes"] - small["scores_bytes"]
        growth[mode] = {
            "increment_growth_bytes": increment(large) - increment(small),
            "scores_growth_bytes": scores,
            # how many [Q, N] float64 score matrices the growth of the peak amounts to
            "score_matrix_copies": (increment(large) - increment(small)) / scores,
        }
    model = DigitsMLP()
    params = sum(p.numel() for p in model.parameters())
    widths = [unit.size for unit in ekfac.tracked_modules(model).values()]  # out * (in + bias)
    return {
        "sizes": sizes,
        "queries": cfg.mem_queries,
        "runs": runs,
        "growth": growth,
        "parameters": params,
        # one batch of float64 per-example gradients [B, out, in+1] of all tracked modules:
        # the corrected-eigenvalue pass forms these (rotated), a few at a time, whatever N
        "per_batch_gradients_bytes": cfg.batch_size * 8 * sum(widths),
        # what holding every example's float64 gradient would take at the larger N
        "per_example_gradients_bytes_at_large_n": sizes[1] * params * 8,
    }


# ---------------------------------------------------------------------------------------------
# Part 3: kronfluence
# ---------------------------------------------------------------------------------------------


def kronfluence_importable() -> bool:
    """Whether kronfluence can be imported by this interpreter."""
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        return False
    return True


def make_kronfluence_task(shared: tuple[int, int] | None = None) -> Any:
    """A kronfluence ``Task`` matching ours: summed cross-entropy, sampled labels for the Fisher.

    The measurement is each query's cross-entropy loss, like ``ClassificationTask("loss")``.
    Labels are sampled from the softmax with torch's global generator (kronfluence's usual
    way), or, with ``shared = (seed, N)``, exactly as ``analyze(seed=seed)`` draws them for the
    influence function on N pooled examples: each batch from a generator reseeded with
    ``engine.batch_seed(seed, pass, first index)``. Both make a covariance pass (1) and then an
    eigenvalue pass (2) over the data in order with the same batches, so both see the same
    pseudo-labels.
    """
    from kronfluence.task import Task as KfTask

    generator = torch.Generator()
    seen = 0  # training examples sampled so far, over both passes

    class ClassificationKfTask(KfTask):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Any:
            nonlocal seen
            x, y = batch
            logits = model(x)
            if sample and shared is not None:  # the labels analyze draws for these examples
                seed, total = shared
                generator.manual_seed(batch_seed(seed, 1 + seen // total, seen % total))
                seen += len(x)
                y = sample_labels(logits, generator)
            elif sample:  # kronfluence's own draws
                with torch.no_grad():
                    probs = torch.softmax(logits.detach().double(), dim=-1)
                    y = torch.multinomial(probs, num_samples=1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Any:
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    return ClassificationKfTask()


def kronfluence_scores(
    model: nn.Module,
    pooled: Dataset,
    queries: Dataset,
    batch_size: int,
    outdir: Path,
    seed: int,
    float64: bool = False,
    empirical: bool = False,
    shared_draws: bool = False,
) -> tuple[np.ndarray, dict[str, float]]:
    """kronfluence EK-FAC pairwise scores ``[Q, N]`` of a copy of ``model``, and their timings.

    Everything a user runs is timed: wrapping the model, fitting the factors (covariances,
    eigendecomposition, corrected eigenvalues) and the pairwise scores, which kronfluence writes
    to and reads from ``outdir``. ``float64`` runs covariances, eigenvalues, preconditioning
    and scores in double precision (ours always does); ``empirical`` uses the true labels
    instead of sampled ones for the Fisher. ``shared_draws`` samples the pseudo-labels from a
    generator seeded with ``seed``, exactly as ``analyze(seed=seed)`` does.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    if outdir.exists():
        shutil.rmtree(outdir)
    torch.manual_seed(seed)  # kronfluence samples labels from the global generator
    times: dict[str, float] = {}
    start = time.perf_counter()
    task = make_kronfluence_task((seed, len(pooled)) if shared_draws else None)  # type: ignore[arg-type]
    prepared = prepare_model(copy.deepcopy(model), task)
    analyzer = Analyzer(
        analysis_name="speed",
        model=prepared,
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(outdir),
    )
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=empirical)
    score_args = ScoreArguments(damping_factor=None)  # 0.1 × mean eigenvalue per module
    if float64:
        for name in (
            "activation_covariance_dtype",
            "gradient_covariance_dtype",
            "per_sample_gradient_dtype",
            "lambda_dtype",
        ):
            setattr(factor_args, name, torch.float64)
        for name in ("per_sample_gradient_dtype", "precondition_dtype", "score_dtype"):
            setattr(score_args, name, torch.float64)
    t = time.perf_counter()
    times["setup_s"] = t - start
    analyzer.fit_all_factors(
        factors_name="ekfac",
        dataset=pooled,
        per_device_batch_size=batch_size,
        factor_args=factor_args,
        overwrite_output_dir=True,
    )
    times["factors_s"] = time.perf_counter() - t
    t = time.perf_counter()
    analyzer.compute_pairwise_scores(
        scores_name="pairwise",
        factors_name="ekfac",
        query_dataset=queries,
        train_dataset=pooled,
        per_device_query_batch_size=min(batch_size, len(queries)),  # type: ignore[arg-type]
        per_device_train_batch_size=batch_size,
        score_args=score_args,
        overwrite_output_dir=True,
    )
    scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]
    times["scores_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - start
    return scores.double().numpy(), times


class EmpiricalFisherTask(ClassificationTask):
    """Classification whose "pseudo-labels" are the true labels: the empirical Fisher.

    Deterministic, so that ours and kronfluence's ``use_empirical_fisher=True`` fit the same
    curvature and any remaining disagreement is the implementations'.
    """

    def pseudo_loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> Any:
        return self.loss(model, batch)


def our_if_scores(
    store: Path,
    train: dict[str, TensorDataset],
    queries: Dataset,
    batch_size: int,
    seed: int,
    fisher: str = "sampled",
    empirical: bool = False,
) -> tuple[np.ndarray, float]:
    """``analyze(method="if")`` scores over the pooled stages ``[Q, N]`` and its wall time.

    ``empirical`` uses :class:`EmpiricalFisherTask` (true labels) for the curvature.
    """
    start = time.perf_counter()
    result = analyze(
        str(store),
        model=DigitsMLP(),
        task=EmpiricalFisherTask() if empirical else "classification",
        train=train,
        queries=queries,
        method="if",
        batch_size=batch_size,
        seed=seed,
        fisher=fisher,  # type: ignore[arg-type]
        name=None,
        verbose=False,
    )
    elapsed = time.perf_counter() - start
    return np.concatenate([result.scores[name] for name, _, _ in STAGES], axis=1), elapsed


def kronfluence_worker(cfg: Config, store: Path, workdir: Path) -> dict[str, Any]:
    """Compare ``analyze(method="if")`` with kronfluence's EK-FAC on the final checkpoint."""
    train, queries = digits_data(cfg.kf_queries)
    pooled = ConcatDataset([train[name] for name, _, _ in STAGES])
    model = final_model(store)
    kf_dir = workdir / "kronfluence"

    def ours(
        seed: int = cfg.seed, fisher: str = "sampled", empirical: bool = False
    ) -> tuple[np.ndarray, float]:
        return our_if_scores(store, train, queries, cfg.batch_size, seed, fisher, empirical)

    def theirs(
        seed: int = cfg.seed, float64: bool = False, empirical: bool = False, shared: bool = False
    ) -> tuple[np.ndarray, dict[str, float]]:
        return kronfluence_scores(
            model, pooled, queries, cfg.batch_size, kf_dir, seed, float64, empirical, shared
        )

    ours()  # warm-up, not counted
    theirs()
    our_times: list[float] = []
    kf_times: list[dict[str, float]] = []
    our_scores = kf_scores = np.empty(0)
    for rep in range(cfg.kf_reps):
        for arm in ("ours", "kf") if rep % 2 == 0 else ("kf", "ours"):
            if arm == "ours":
                our_scores, elapsed = ours()
                our_times.append(elapsed)
            else:
                kf_scores, timing = theirs()
                kf_times.append(timing)
        print(
            f"  rep {rep + 1}/{cfg.kf_reps}: ours {our_times[-1]:.2f} s, kronfluence "
            f"{kf_times[-1]['total_s']:.2f} s",
            flush=True,
        )
    n = len(pooled)
    rho = per_query_spearman(our_scores, kf_scores)
    scale = scale_ratio(our_scores, kf_scores)
    ratios = [o / k["total_s"] for o, k in zip(our_times, kf_times, strict=True)]

    # Diagnostics (not timed). Identical pseudo-label draws in both tools, and the empirical
    # Fisher (true labels, nothing sampled) in both, isolate the implementations; a second seed
    # of each tool measures how far the sampled Fisher alone moves the ranking.
    kf_shared, _ = theirs(shared=True)
    ours_seed1, _ = ours(seed=cfg.seed + 1)
    kf_seed1, _ = theirs(seed=cfg.seed + 1)
    ours_emp, _ = ours(empirical=True)
    kf_emp, _ = theirs(empirical=True)
    pairs = {
        "ours_vs_kf_identical_draws": (our_scores, kf_shared),
        "empirical_fisher_ours_vs_kf": (ours_emp, kf_emp),
        "ours_seed0_vs_ours_seed1": (our_scores, ours_seed1),
        "kf_seed0_vs_kf_seed1": (kf_scores, kf_seed1),
        "ours_seed1_vs_kf_seed1": (ours_seed1, kf_seed1),
        "mean_of_2_seeds_ours_vs_kf": ((our_scores + ours_seed1) / 2, (kf_scores + kf_seed1) / 2),
    }
    if cfg.kf_all_diagnostics:
        ours_exact, _ = ours(fisher="exact")
        kf_f64, _ = theirs(float64=True)
        kf_emp64, _ = theirs(empirical=True, float64=True)
        pairs.update(
            {
                "ours_exact_fisher_vs_kf": (ours_exact, kf_scores),
                "ours_vs_kf_float64": (our_scores, kf_f64),
                "empirical_fisher_ours_vs_kf_float64": (ours_emp, kf_emp64),
            }
        )
    diagnostics = {key: summary(per_query_spearman(a, b)) for key, (a, b) in pairs.items()}
    return {
        "shared_draws_spearman": diagnostics["ours_vs_kf_identical_draws"],
        "shared_draws_scale_ratio_times_n": summary(
            [s * n for s in scale_ratio(our_scores, kf_shared)]
        ),
        "empirical_fisher_scale_ratio_times_n": summary(
            [s * n for s in scale_ratio(ours_emp, kf_emp)]
        ),
        "train_examples": n,
        "queries": cfg.kf_queries,
        "batch_size": cfg.batch_size,
        "spearman_per_query": rho,
        "spearman": summary(rho),
        "scale_ratio_per_query": scale,
        "scale_ratio": summary(scale),
        "scale_ratio_times_n": summary([s * n for s in scale]),
        "ours_s": our_times,
        "kronfluence_s": kf_times,
        "time_ratio_per_rep": ratios,
        "time_ratio_median": statistics.median(ratios),
        "ours_s_median": statistics.median(our_times),
        "kronfluence_s_median": statistics.median(k["total_s"] for k in kf_times),
        "kronfluence_factors_s_median": statistics.median(k["factors_s"] for k in kf_times),
        "kronfluence_scores_s_median": statistics.median(k["scores_s"] for k in kf_times),
        "diagnostics": diagnostics,
        # first query's scores, for the scatter plot
        "example_query": {
            "ours": our_scores[0].tolist(),
            "kronfluence": kf_scores[0].tolist(),
            "kronfluence_identical_draws": kf_shared[0].tolist(),
        },
        "shared_draws_spearman_per_query": per_query_spearman(our_scores, kf_shared),
    }


def part_kronfluence(cfg: Config, store: Path, workdir: Path, kf_python: str | None) -> Any:
    """Run the comparison here, in ``kf_python``, or report why it was skipped."""
    if kronfluence_importable():
        return kronfluence_worker(cfg, store, workdir)
    if kf_python and Path(kf_python).exists():
        print(f"  kronfluence not importable here; running the comparison with {kf_python}")
        return run_worker(
            kf_python,
            ["--worker", "kronfluence", "--store", str(store), *config_args(cfg)],
            workdir / "kronfluence.json",
            timeout=3600,
        )
    return {
        "skipped": f"kronfluence is not importable by this interpreter and --kf-python "
        f"{kf_python!r} does not exist (default {DEFAULT_KF_PYTHON}); see this script's "
        "docstring for the setup."
    }


# ---------------------------------------------------------------------------------------------
# Report: text, markdown, plots
# ---------------------------------------------------------------------------------------------


def markdown_tables(cfg: Config, report: dict[str, Any]) -> str:
    """The results as a markdown fragment (one subsection per part)."""
    lines: list[str] = []
    env = report["environment"]
    lines.append(
        f"Settings: `--{cfg.mode}`, torch threads {cfg.threads}, analyze batch size "
        f"{cfg.batch_size}; {env['cpu_count']} CPU cores, Python {env['python']}, torch "
        f"{env['torch']}, load average at the end {env['loadavg_at_end'][0]:.2f}."
    )
    floor = report.get("floor")
    if floor:
        stages = ", ".join(
            f"{name} {s['examples']} examples × {s['checkpoints_used']} checkpoints"
            for name, s in floor["stages"].items()
        )
        lines += [
            "",
            "### Analysis cost against its floor",
            "",
            f"Digits run (`examples/two_stage_digits.py`, {floor['parameters']} parameters), "
            f'`analyze(method="source", segments={cfg.segments})` with {floor["queries"]} '
            f"queries; floor = Σ checkpoints × one forward+backward pass over the stage's data "
            f"({stages}). Means of {len(floor['reps'])} repetitions (parts add up to the "
            "total); the ratio below is the median of the per-repetition ratios.",
            "",
            "| | seconds | share | × floor |",
            "| --- | ---: | ---: | ---: |",
        ]
        total = floor["analyze_s_mean"]
        for label, value in floor["breakdown_s_mean"].items():
            lines.append(
                f"| {label} | {value:.3f} | {value / total:.1%} | "
                f"{value / floor['floor_s_mean']:.2f} |"
            )
        lines += [
            f"| **analyze total** | **{total:.2f}** | 100% | "
            f"**{total / floor['floor_s_mean']:.1f}** |",
            f"| floor (Σ C × forward+backward) | {floor['floor_s_mean']:.3f} | | 1 |",
            "",
            f"Ratio analyze / floor in wall time: median {floor['ratio_median']:.1f} (range "
            f"{floor['ratio_min']:.1f}–{floor['ratio_max']:.1f}); in process-CPU time: "
            f"{floor['cpu_ratio_median']:.1f}.",
            "",
            "Each data pass per checkpoint, in units of one plain forward+backward pass over the "
            "same data:",
            "",
            *pass_units_table(
                (
                    (
                        f"{name} ({st['update_rule']})",
                        st["examples"],
                        st["checkpoints_used"],
                        f"{st['forward_backward_s_median'] * 1e3:.1f}",
                        st["pass_cost_in_stage_floor_units"],
                    )
                    for name, st in floor["stages"].items()
                ),
                "ms",
            ),
        ]
    memory = report.get("memory")
    if memory:
        lines += [
            "",
            "### Peak memory against the training-set size",
            "",
            f"Synthetic run (digits MLP on random features, one epoch of SGD, "
            f"`segments={cfg.mem_segments}`, {cfg.mem_queries} queries), each `analyze` in a "
            "fresh process. RSS in MiB.",
            "",
            "| N | allocator | analyze (s) | RSS before | peak RSS | peak − before | "
            "scores [Q, N] |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in memory["runs"]:
            lines.append(
                f"| {r['n']} | {r['malloc']} | {r['analyze_s']:.1f} | "
                f"{mib(r['rss_before_bytes'])} | {mib(r['peak_rss_bytes'])} | "
                f"{mib(r['peak_rss_bytes'] - r['rss_before_bytes'])} | {mib(r['scores_bytes'])} |"
            )
        lines += ["", f"Growth of the peak increment from N to {cfg.mem_factor}·N:", ""]
        for mode, g in memory["growth"].items():
            lines.append(
                f"- {mode}: {mib(g['increment_growth_bytes'])} MiB, i.e. "
                f"{g['score_matrix_copies']:.1f} × the growth of one [Q, N] float64 score "
                f"matrix ({mib(g['scores_growth_bytes'])} MiB)."
            )
        lines += [
            "",
            f"For scale: float64 per-example gradients of all {memory['sizes'][1]} examples "
            f"would take {mib(memory['per_example_gradients_bytes_at_large_n'])} MiB; one batch "
            f"of them (batch size {cfg.batch_size}), which the corrected-eigenvalue pass forms "
            f"a few at a time whatever N, takes {mib(memory['per_batch_gradients_bytes'])} MiB.",
        ]
    kf = report.get("kronfluence")
    if kf and "skipped" not in kf:
        d, shared = kf["diagnostics"], kf["shared_draws_spearman"]
        lines += [
            "",
            "### Against kronfluence (EK-FAC influence at the final checkpoint)",
            "",
            f"{kf['train_examples']} pooled training examples, {kf['queries']} queries, batch "
            f"size {kf['batch_size']}, sampled pseudo-labels in both, damping 0.1 × mean "
            f"eigenvalue per module in both. {len(kf['ours_s'])} alternating repetitions after "
            "a warm-up.",
            "",
            "| | value |",
            "| --- | ---: |",
            f"| Spearman per query, independent pseudo-label draws, mean (min) | "
            f"{kf['spearman']['mean']:.4f} ({kf['spearman']['min']:.4f}) |",
            f"| scale ours / kronfluence × N, independent draws, median | "
            f"{kf['scale_ratio_times_n']['median']:.4f} |",
            f"| Spearman per query, identical draws (same generator and seed), mean (min) | "
            f"{shared['mean']:.7f} ({shared['min']:.7f}) |",
            f"| scale ours / kronfluence × N, identical draws, median | "
            f"{kf['shared_draws_scale_ratio_times_n']['median']:.6f} |",
            f"| wall time ours (s), median | {kf['ours_s_median']:.2f} |",
            f"| wall time kronfluence (s), median | {kf['kronfluence_s_median']:.2f} |",
            f"| time ratio ours / kronfluence, median | {kf['time_ratio_median']:.2f} |",
            "",
            "Diagnostics (Spearman per query, mean (min)):",
            "",
            "| pair | Spearman |",
            "| --- | ---: |",
        ]
        for key, value in d.items():
            lines.append(f"| {key.replace('_', ' ')} | {value['mean']:.4f} ({value['min']:.4f}) |")
    elif kf:
        lines += ["", "### Against kronfluence", "", f"Skipped: {kf['skipped']}"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], img_dir: Path) -> list[str]:
    """Write the PNG plots; return their paths (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plots")
        return []
    img_dir.mkdir(parents=True, exist_ok=True)
    written = []
    floor = report.get("floor")
    if floor:
        fig, (ax, ax2) = plt.subplots(
            1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1.4, 1]}
        )
        total = floor["analyze_s_mean"]
        shown = {k: v for k, v in floor["breakdown_s_mean"].items() if v >= 0.01 * total}
        shown["rest (< 1% each)"] = total - sum(shown.values())
        left = 0.0
        colors = plt.get_cmap("tab10").colors
        for i, (label, value) in enumerate(shown.items()):
            ax.barh(1, value, left=left, color=colors[i % 10], label=label)
            left += value
        ax.barh(0, floor["floor_s_mean"], color="black", label="floor")
        ax.set_yticks([0, 1], ["floor: Σ C ×\nforward+backward", 'analyze(\nmethod="source")'])
        ax.set_xlabel(f"seconds (mean of {len(floor['reps'])} repetitions)")
        ax.set_title(
            f"analyze = {floor['ratio_median']:.1f} × its floor, median (CPU time: "
            f"{floor['cpu_ratio_median']:.1f} ×)",
            fontsize=10,
        )
        ax.legend(fontsize=7, loc="lower right")
        stages = list(floor["stages"])
        width = 0.8 / len(DATA_PASSES)
        for j, label in enumerate(DATA_PASSES):
            values = [floor["stages"][n]["pass_cost_in_stage_floor_units"][label] for n in stages]
            ax2.bar(np.arange(len(stages)) + j * width, values, width, label=label)
        ax2.set_xticks(
            np.arange(len(stages)) + width * (len(DATA_PASSES) - 1) / 2,
            [f"{n}\n({floor['stages'][n]['update_rule']})" for n in stages],
        )
        ax2.set_ylabel("× one forward+backward pass")
        ax2.set_title("each data pass, per checkpoint", fontsize=10)
        ax2.legend(fontsize=7)
        fig.tight_layout()
        path = img_dir / "speed_breakdown.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    memory = report.get("memory")
    if memory:
        modes = list(memory["growth"])
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 3.8), sharey=True)
        for ax, mode in zip(np.atleast_1d(axes), modes, strict=True):
            for r in (r for r in memory["runs"] if r["malloc"] == mode):
                t = [s[0] for s in r["timeline"]]
                rss = [(s[1] - r["rss_before_bytes"]) / 2**20 for s in r["timeline"]]
                line = ax.plot(t, rss, lw=0.8, label=f"N = {r['n']}")[0]
                peak = (r["peak_rss_bytes"] - r["rss_before_bytes"]) / 2**20
                ax.axhline(peak, color=line.get_color(), ls="--", lw=0.8)
            ax.set_xlabel("seconds into analyze()")
            ax.set_title(f"allocator: {mode}", fontsize=10)
            ax.legend(fontsize=8)
        np.atleast_1d(axes)[0].set_ylabel("RSS − RSS before analyze (MiB)")
        fig.suptitle(
            f"Memory of analyze(), {memory['queries']} queries (dashed: peak, VmHWM)", fontsize=11
        )
        fig.tight_layout()
        path = img_dir / "speed_memory.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    kf = report.get("kronfluence")
    if kf and "skipped" not in kf:
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        ours = np.asarray(kf["example_query"]["ours"]) * kf["train_examples"]
        panels = [
            ("kronfluence", "independent pseudo-label draws", kf["spearman_per_query"]),
            (
                "kronfluence_identical_draws",
                "identical pseudo-label draws",
                kf["shared_draws_spearman_per_query"],
            ),
        ]
        for ax, (key, title, rho) in zip(axes[:2], panels, strict=True):
            theirs = np.asarray(kf["example_query"][key])
            ax.scatter(theirs, ours, s=3, alpha=0.4)
            lim = [min(theirs.min(), ours.min()), max(theirs.max(), ours.max())]
            ax.plot(lim, lim, color="gray", lw=0.8)
            ax.set_xlabel("kronfluence pairwise score")
            ax.set_ylabel("ours × N")
            ax.set_title(f"query 0, {title}\nSpearman {rho[0]:.4f}", fontsize=10)
        bins = np.linspace(min(kf["spearman_per_query"]), 1.0, 30)
        for _, title, rho in panels:
            axes[2].hist(np.clip(rho, bins[0], 1.0), bins=bins, alpha=0.7, label=title)
        axes[2].set_xlabel("Spearman per query, ours vs kronfluence")
        axes[2].legend(fontsize=8)
        axes[2].set_title(
            f"{kf['queries']} queries; time ours / kronfluence = {kf['time_ratio_median']:.2f}",
            fontsize=10,
        )
        fig.tight_layout()
        path = img_dir / "speed_kronfluence.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return written


def print_report(cfg: Config, report: dict[str, Any]) -> None:
    """Plain-text summary of every part that ran."""
    floor = report.get("floor")
    if floor:
        print(
            f"\n== 1. analyze(method='source') against its floor "
            f"(mean of {len(floor['reps'])} repetitions) =="
        )
        for name, s in floor["stages"].items():
            units = s["pass_cost_in_stage_floor_units"]
            print(
                f"  {name} ({s['update_rule']}): {s['examples']} examples, "
                f"{s['checkpoints_used']} checkpoints, forward+backward "
                f"{s['forward_backward_s_median'] * 1e3:.1f} ms; per checkpoint, in "
                "forward+backward passes: "
                + ", ".join(f"{label} {units[label]:.1f}" for label in DATA_PASSES)
            )
        total = floor["analyze_s_mean"]
        print(f"  {'part':30}{'seconds':>10}{'share':>8}{'x floor':>9}")
        for label, value in floor["breakdown_s_mean"].items():
            print(
                f"  {label:30}{value:10.3f}{value / total:8.1%}{value / floor['floor_s_mean']:9.2f}"
            )
        ratio = total / floor["floor_s_mean"]
        print(f"  {'analyze total':30}{total:10.3f}{1:8.0%}{ratio:9.1f}")
        print(f"  {'floor (sum C x fwd+bwd)':30}{floor['floor_s_mean']:10.3f}")
        print(
            f"  ratio analyze / floor (wall): median {floor['ratio_median']:.1f}, "
            f"range {floor['ratio_min']:.1f}-{floor['ratio_max']:.1f}; process-CPU time ratio "
            f"median {floor['cpu_ratio_median']:.1f}"
        )
    memory = report.get("memory")
    if memory:
        print("\n== 2. peak memory against the training-set size ==")
        for r in memory["runs"]:
            print(
                f"  N={r['n']:>7} ({r['malloc']}): RSS before {mib(r['rss_before_bytes'])} MiB, "
                f"peak {mib(r['peak_rss_bytes'])} MiB, increment "
                f"{mib(r['peak_rss_bytes'] - r['rss_before_bytes'])} MiB, scores [Q, N] "
                f"{mib(r['scores_bytes'])} MiB, {r['analyze_s']:.1f} s"
            )
        for mode, g in memory["growth"].items():
            print(
                f"  increment growth N -> {cfg.mem_factor}N ({mode}): "
                f"{mib(g['increment_growth_bytes'])} MiB = {g['score_matrix_copies']:.1f} x the "
                f"score matrix's growth ({mib(g['scores_growth_bytes'])} MiB)"
            )
    kf = report.get("kronfluence")
    if kf:
        print("\n== 3. against kronfluence (EK-FAC influence, final checkpoint) ==")
        if "skipped" in kf:
            print(f"  skipped: {kf['skipped']}")
            return
        s, sc = kf["spearman"], kf["scale_ratio_times_n"]
        print(
            f"  independent pseudo-label draws: Spearman per query mean {s['mean']:.4f}, "
            f"median {s['median']:.4f}, "
            f"min {s['min']:.4f} ({kf['queries']} queries, {kf['train_examples']} examples)"
        )
        print(
            f"  scale ours/kronfluence x N: median {sc['median']:.4f} [{sc['min']:.4f}, "
            f"{sc['max']:.4f}]"
        )
        sd, ss = kf["shared_draws_spearman"], kf["shared_draws_scale_ratio_times_n"]
        print(
            f"  identical pseudo-label draws: Spearman mean {sd['mean']:.7f}, min "
            f"{sd['min']:.7f}; scale x N median {ss['median']:.6f}"
        )
        print(
            f"  wall time: ours {kf['ours_s_median']:.2f} s, kronfluence "
            f"{kf['kronfluence_s_median']:.2f} s (factors {kf['kronfluence_factors_s_median']:.2f}"
            f", scores {kf['kronfluence_scores_s_median']:.2f}); ratio ours/kronfluence median "
            f"{kf['time_ratio_median']:.2f}"
        )
        print("  diagnostics (Spearman per query, mean / min):")
        for key, value in kf["diagnostics"].items():
            print(f"    {key:40}{value['mean']:.4f} / {value['min']:.4f}")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def config_args(cfg: Config) -> list[str]:
    """The ``--config`` argument that hands ``cfg`` to a worker process."""
    return ["--config", json.dumps(asdict(cfg))]


def worker_main(args: argparse.Namespace) -> None:
    """Entry of a ``--worker`` subprocess: run one measurement, write its JSON."""
    cfg = Config(**json.loads(args.config))
    torch.set_num_threads(cfg.threads)
    if args.worker == "memory":
        out = memory_worker(cfg, Path(args.store), args.n)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="sc-speed-kf-"))
        try:
            out = kronfluence_worker(cfg, Path(args.store), workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    Path(args.result).write_text(json.dumps(out))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selected parts, print the report, write JSON / markdown / plots."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="about 2-4 minutes (default)")
    mode.add_argument("--full", action="store_true", help="more queries, reps and a larger N")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default 1)")
    parser.add_argument("--batch-size", type=int, help="analyze's batch size (default 256)")
    parser.add_argument("--mem-n", type=int, help="part 2's smaller training-set size")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--markdown", help="write the tables as a markdown fragment here")
    parser.add_argument("--img-dir", default=str(ROOT / "docs" / "img"), help="plots go here")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--kf-python",
        default=str(DEFAULT_KF_PYTHON),
        help="interpreter with kronfluence, used when this one cannot import it",
    )
    parser.add_argument("--workdir", help="keep the recorded stores here (default: temporary)")
    # internal: subprocess workers
    parser.add_argument("--worker", choices=["memory", "kronfluence"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quiet_lightning()
    if args.worker:
        worker_main(args)
        return {}

    cfg = Config.preset(args.full)
    for name in ("threads", "batch_size", "mem_n"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    torch.set_num_threads(cfg.threads)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sc-speed-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"config": asdict(cfg)}
    started = time.perf_counter()
    try:
        store = workdir / "digits.zarr"
        if {"floor", "kronfluence"} & set(parts):
            record_digits(
                store, cfg.epochs, quiet=True, checkpoints_per_stage=cfg.checkpoints_per_stage
            )
            print(f"recorded the digits run into {store}", flush=True)
        if "floor" in parts:
            print("1. analyze(method='source') against its floor", flush=True)
            report["floor"] = part_floor(cfg, store)
        if "memory" in parts:
            print("2. peak memory against the training-set size", flush=True)
            report["memory"] = part_memory(cfg, workdir)
        if "kronfluence" in parts:
            print("3. against kronfluence", flush=True)
            report["kronfluence"] = part_kronfluence(cfg, store, workdir, args.kf_python)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report["environment"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "argv": sys.argv,
        "loadavg_at_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - started,
    }
    print_report(cfg, report)
    print(f"\ntotal {report['environment']['wall_s']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    if args.markdown:
        Path(args.markdown).write_text(markdown_tables(cfg, report))
        print(f"wrote {args.markdown}")
    if not args.no_plots:
        for path in plot(report, Path(args.img_dir)):
            print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
