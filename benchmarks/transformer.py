"""A Hugging Face Llama at a realistic shape: recording overhead and analysis cost vs its floor.

The run a user would write: a ``LlamaForCausalLM`` (built from a config, never downloaded)
inside a ``LightningModule``, a full fine-tune stage (``pretrain``: AdamW, linear warmup then
cosine decay), then peft LoRA adapters added with ``get_peft_model`` and a second stage
(``sft``: AdamW on the adapters only), both recorded into one store.

1. **Recording overhead, per stage.** Each stage's ``trainer.fit`` is run with and without
   ``SourceCallback``, alternated in one process (AB, BA, AB, ...; one short unmeasured warm-up
   per arm), from the same initial weights and batches. The ``sft`` runs start from the
   ``pretrain`` weights; their recording arm continues a copy of the ``pretrain`` store, as a
   real two-stage run does. Reported: the ratio of median fit times, the per-step and
   per-interior-checkpoint costs (batch timings of both arms, as ``overhead.py``) and the fixed
   cost per stage (store creation/opening, stage-start checkpoint, stage-end checkpoint and the
   wait for the writer: everything outside the batches).
2. **Analysis against its floor.** ``analyze(task="language_modeling", segments=1)`` on the
   recorded two-stage store with the final peft-wrapped model, timed against its floor: the
   checkpoints each stage's segment uses times one plain forward+backward pass over the stage's
   data at one checkpoint (gradients for what that stage trained: every base weight for
   ``pretrain``, the adapters for ``sft``), measured just before and just after the analysis.
   The time is split by pass with the wrappers of ``speed.py`` (nothing in ``source_callback``
   is changed), and every pass is also given in units of its stage's floor. Peak memory during
   ``analyze``: the RSS high-water mark (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA).

The training sets are small (the analysis's cost is proportional to their size; what matters is
the ratio to the floor), trained for several epochs so each stage still takes tens of steps.
The model shape is the realistic part: see ``Config.preset`` and docs/benchmarks.md for why the
vocabulary is 4096.

Commands (from the repository root):

    python benchmarks/transformer.py --quick          # tiny Llama, about 2 minutes: smoke run
    python benchmarks/transformer.py --full --out t.json --markdown t.md   # 24 M parameters
    python benchmarks/transformer.py --full --device cuda --precision bf16-mixed   # on a GPU
    python benchmarks/transformer.py --full --reps 1 --examples 64 --curvature-examples 0.5 0.25
        # the analysis also with its curvature on half and a quarter of the examples

``--device cuda`` exits cleanly (status 0, with a message) where no CUDA device is present.
``--precision`` is the Trainer's (``32-true``, ``bf16-mixed``, ``16-mixed``); the analysis
always runs in float32 parameters with float64 curvature, as ``analyze`` does, and its floor
is measured in float32 too. ``benchmarks/transformer_gpu.sh`` runs both precisions on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import lightning.pytorch as pl
import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from overhead import LIGHTNING_HOOKS, BatchTimer, bootstrap_ratio, command, time_hooks  # noqa: E402
from speed import (  # noqa: E402
    BREAKDOWN_ORDER,
    BREAKDOWN_TARGETS,
    DATA_PASSES,
    Profiler,
    TagOf,
    pass_units_table,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)

from source_callback import SourceCallback, analyze, open_run  # noqa: E402
from source_callback.analysis import api  # noqa: E402
from source_callback.analysis.engine import Engine  # noqa: E402
from source_callback.analysis.namespace import RunView  # noqa: E402
from source_callback.analysis.segments import plan_segments  # noqa: E402
from source_callback.analysis.task import LanguageModelingTask  # noqa: E402
from source_callback.manifest import model_manifest  # noqa: E402
from source_callback.record.plan import interior_steps  # noqa: E402

STAGES = ("pretrain", "sft")


@dataclass
class Config:
    """One invocation's settings (``--quick`` / ``--full`` presets, CLI overrides)."""

    mode: str = "quick"
    # model: LlamaConfig
    vocab: int = 512
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 176
    seq_len: int = 32
    # data and training
    examples: int = 16  # per stage
    epochs: dict[str, int] = field(default_factory=lambda: {"pretrain": 4, "sft": 4})
    batch_size: int = 4
    lr: dict[str, float] = field(default_factory=lambda: {"pretrain": 1e-3, "sft": 2e-3})
    weight_decay: float = 0.01
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    checkpoints_per_stage: int = 3
    reps: int = 2
    # analysis
    queries: int = 4
    analyze_batch_size: int = 4
    segments: int = 1
    # machine
    threads: int = 2
    device: str = "cpu"
    precision: str = "32-true"
    seed: int = 0

    @classmethod
    def preset(cls, full: bool) -> Config:
        """``--quick``: a tiny Llama (smoke run). ``--full``: the realistic shape.

        Full: hidden 384, 12 layers of 6 heads (head dim 64), MLP 1024, vocabulary 4096:
        24.4 M parameters in 111 tensors; 128-token sequences, batch 8, 16 examples per stage
        trained for 10 epochs (20 steps per stage), 3 repetitions per arm; about 25 minutes on
        2 CPU cores.
        """
        if not full:
            return cls()
        return cls(
            mode="full",
            vocab=4096,
            hidden=384,
            layers=12,
            heads=6,
            intermediate=1024,
            seq_len=128,
            examples=16,
            epochs={"pretrain": 10, "sft": 10},
            batch_size=8,
            reps=3,
            queries=4,
            analyze_batch_size=8,
        )

    def steps(self, stage: str) -> int:
        """Optimizer steps of a stage."""
        return math.ceil(self.examples / self.batch_size) * self.epochs[stage]


# ---------------------------------------------------------------------------------------------
# Data: a seeded synthetic language (a sparse random Markov chain over the vocabulary)
# ---------------------------------------------------------------------------------------------


class MarkovLanguage:
    """Every token has ``branching`` possible successors with Dirichlet(0.5) probabilities.

    ``shifted(fraction, seed)`` is the same language with a fraction of the tokens' successor
    rows drawn anew: the fine-tuning domain shares most transitions with the pretraining one
    and differs in the rest, so queries from it depend on examples of both stages.
    """

    def __init__(self, vocab: int, seed: int, branching: int = 8) -> None:
        rng = np.random.default_rng(seed)
        self.vocab, self.branching = vocab, branching
        self.successors = rng.integers(0, vocab, size=(vocab, branching))
        self.probs = rng.dirichlet(np.full(branching, 0.5), size=vocab)

    def shifted(self, fraction: float, seed: int) -> MarkovLanguage:
        rng = np.random.default_rng(seed)
        other = MarkovLanguage.__new__(MarkovLanguage)
        other.vocab, other.branching = self.vocab, self.branching
        other.successors, other.probs = self.successors.copy(), self.probs.copy()
        rows = rng.random(self.vocab) < fraction
        other.successors[rows] = rng.integers(0, self.vocab, size=(rows.sum(), self.branching))
        other.probs[rows] = rng.dirichlet(np.full(self.branching, 0.5), size=rows.sum())
        return other

    def sample(self, n: int, length: int, seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        ids = np.empty((n, length), dtype=np.int64)
        ids[:, 0] = rng.integers(0, self.vocab, n)
        cumulative = self.probs.cumsum(1)
        for t in range(1, length):
            u = rng.random(n)[:, None]
            choice = (u > cumulative[ids[:, t - 1]]).sum(1).clip(max=self.branching - 1)
            ids[:, t] = self.successors[ids[:, t - 1], choice]
        return torch.from_numpy(ids)


class Sequences(Dataset):
    """Token sequences as Hugging Face batches (``input_ids``, ``attention_mask``)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def make_data(cfg: Config) -> tuple[dict[str, Sequences], Sequences]:
    """Each stage's training set and the queries (held-out sequences of the ``sft`` language)."""
    pretrain = MarkovLanguage(cfg.vocab, seed=cfg.seed + 1)
    sft = pretrain.shifted(0.25, seed=cfg.seed + 2)
    train = {
        "pretrain": Sequences(pretrain.sample(cfg.examples, cfg.seq_len, cfg.seed + 3)),
        "sft": Sequences(sft.sample(cfg.examples, cfg.seq_len, cfg.seed + 4)),
    }
    return train, Sequences(sft.sample(cfg.queries, cfg.seq_len, cfg.seed + 5))


# ---------------------------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------------------------


def llama(cfg: Config) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def add_lora(cfg: Config, model: nn.Module) -> nn.Module:
    """peft LoRA on ``cfg.lora_targets``; the adapters' initialisation is seeded."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed + 7)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=2 * cfg.lora_r,
        target_modules=list(cfg.lora_targets),
        lora_dropout=0.0,
    )
    return get_peft_model(model, lora)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class CausalLM(pl.LightningModule):
    """A Hugging Face causal LM trained with AdamW on the mean token loss of each sequence."""

    def __init__(self, model: nn.Module, stage: str, cfg: Config) -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.lr = cfg.lr[stage]
        self.weight_decay = cfg.weight_decay
        self.task = LanguageModelingTask()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.task.loss(self, batch).mean()

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.stage != "pretrain":
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        schedule = functools.partial(warmup_cosine, warmup=max(1, total // 10), total=total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def build(cfg: Config, stage: str, state: dict[str, torch.Tensor]) -> CausalLM:
    """The stage's LightningModule holding ``state`` (``sft``: the adapters added after)."""
    module = CausalLM(llama(cfg), "pretrain", cfg)
    module.load_state_dict(state)
    if stage == "sft":
        module = CausalLM(add_lora(cfg, module.model), "sft", cfg)
    return module


def synchronize(cfg: Config) -> None:
    if cfg.device == "cuda":
        torch.cuda.synchronize()


def fit(
    cfg: Config,
    module: CausalLM,
    data: Dataset,
    epochs: int,
    store: Path | None,
    workdir: Path,
    max_steps: int = -1,
) -> dict[str, Any]:
    """``trainer.fit`` of one stage, recording into ``store`` (``None``: no callback)."""
    pl.seed_everything(cfg.seed, verbose=False)
    loader = DataLoader(
        data,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    timer = BatchTimer()
    callbacks: list[pl.Callback] = [timer]
    hooks: dict[str, float] = {}
    if store is not None:
        callback = SourceCallback(
            str(store), stage=module.stage, checkpoints_per_stage=cfg.checkpoints_per_stage
        )
        hooks = time_hooks(callback, LIGHTNING_HOOKS)
        callbacks.append(callback)
    trainer = pl.Trainer(
        accelerator=cfg.device,
        devices=1,
        precision=cfg.precision,  # type: ignore[arg-type]
        max_epochs=epochs,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(workdir),
    )
    synchronize(cfg)
    cpu0 = time.process_time()
    start = time.perf_counter()
    trainer.fit(module, loader)
    synchronize(cfg)
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "process_cpu_s": time.process_time() - cpu0,
        "outside_batches_s": wall - (timer.last_batch_end - timer.first_batch),
        "batch_times": timer.batches,
        "hook_s": dict(hooks),
    }


def store_bytes(store: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store) for f in fs)


def stage_overhead(
    cfg: Config,
    stage: str,
    data: Dataset,
    state: dict[str, torch.Tensor],
    previous_store: Path | None,
    workdir: Path,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """Alternate fits of ``stage`` with and without recording; keep one recorded result.

    Returns the summary, the trained module's state (of the last recording run) and that
    run's store (``previous_store`` continued, or a new one).
    """

    def store_for(run: int) -> Path:
        path = workdir / f"{stage}-{run}.zarr"
        if previous_store is not None:
            shutil.copytree(previous_store, path)
        return path

    def one(record: bool, run: int, max_steps: int = -1) -> tuple[dict[str, Any], CausalLM, Path]:
        module = build(cfg, stage, state).to(cfg.device)
        store = store_for(run) if record else None
        result = fit(cfg, module, data, cfg.epochs[stage], store, workdir, max_steps)
        return result, module, store  # type: ignore[return-value]

    for record in (False, True):  # warm-up, not counted
        _, _, store = one(record, -1, max_steps=2)
        if store is not None:
            shutil.rmtree(store)
    runs: dict[str, list[dict[str, Any]]] = {"with": [], "without": []}
    kept: tuple[CausalLM, Path] | None = None
    for rep in range(cfg.reps):
        for record in (False, True) if rep % 2 == 0 else (True, False):
            result, module, store = one(record, rep)
            arm = "with" if record else "without"
            if record:
                result["store_bytes"] = store_bytes(store)
                if kept is not None:
                    shutil.rmtree(kept[1])
                kept = (module, store)
            runs[arm].append(result)
            print(
                f"  {stage} rep {rep + 1}/{cfg.reps} {arm:>7}: {result['wall_s']:.2f} s",
                flush=True,
            )
    assert kept is not None
    module, store = kept
    trained = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return summarize_overhead(cfg, stage, runs), trained, store


def summarize_overhead(
    cfg: Config, stage: str, runs: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Ratio of medians; per-step, per-checkpoint and per-stage costs from the batch timings."""
    with_, without = runs["with"], runs["without"]
    w, wo = [r["wall_s"] for r in with_], [r["wall_s"] for r in without]
    steps = cfg.steps(stage)
    planned = set(interior_steps(steps, cfg.checkpoints_per_stage))

    def batches(arm: list[dict[str, Any]], checkpoint: bool) -> list[float]:
        return [
            t
            for r in arm
            for i, t in enumerate(r["batch_times"])
            if (i in planned) == checkpoint and i > 0
        ]

    step_with = statistics.median(batches(with_, False))
    step_without = statistics.median(batches(without, False))
    checkpoint_batches = batches(with_, True)
    per_checkpoint = (
        statistics.median(checkpoint_batches) - step_with if checkpoint_batches else float("nan")
    )
    outside_with = statistics.median(r["outside_batches_s"] for r in with_)
    outside_without = statistics.median(r["outside_batches_s"] for r in without)
    return {
        "steps": steps,
        "interior_checkpoints": len(planned),
        "median_without_s": statistics.median(wo),
        "median_with_s": statistics.median(w),
        "ratio_median": statistics.median(w) / statistics.median(wo),
        "ratio_bootstrap_95": bootstrap_ratio(w, wo),
        "ratio_paired_median": statistics.median(a / b for a, b in zip(w, wo, strict=True)),
        "ratio_min": min(w) / min(wo),
        "step_without_s": step_without,
        "step_with_s": step_with,
        "per_step_s": step_with - step_without,
        "per_checkpoint_s": per_checkpoint,
        "stage_fixed_s": outside_with - outside_without,
        "outside_batches_with_s": outside_with,
        "outside_batches_without_s": outside_without,
        "hooks_ms": {
            name: 1e3 * statistics.median(r["hook_s"][name] for r in with_)
            for name in with_[0]["hook_s"]
        },
        "hooks_total_s": statistics.median(sum(r["hook_s"].values()) for r in with_),
        "writer_cpu_s": statistics.median(r["process_cpu_s"] for r in with_)
        - statistics.median(r["process_cpu_s"] for r in without),
        "store_bytes": with_[-1]["store_bytes"],
        "runs": {
            arm: [{k: v for k, v in r.items() if k != "batch_times"} for r in rs]
            for arm, rs in runs.items()
        },
    }


# ---------------------------------------------------------------------------------------------
# Analysis against its floor
# ---------------------------------------------------------------------------------------------


def floor_pass(
    cfg: Config, model: nn.Module, data: Dataset, trainable: set[str]
) -> dict[str, float]:
    """One plain forward+backward pass of the mean loss over ``data`` at analyze's batch size.

    Gradients for ``trainable`` only (what the stage trained), float32, eval mode, no hooks.
    """
    task = LanguageModelingTask()
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    loader = DataLoader(data, batch_size=cfg.analyze_batch_size, shuffle=False)
    synchronize(cfg)
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in loader:
        batch = {k: v.to(cfg.device) for k, v in batch.items()}
        task.loss(model, batch).mean().backward()
        model.zero_grad(set_to_none=True)
    synchronize(cfg)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def analysis(
    cfg: Config,
    store: Path,
    train: dict[str, Sequences],
    queries: Sequences,
    final_state: dict[str, torch.Tensor],
    curvature_examples: float | None = None,
) -> dict[str, Any]:
    """Time ``analyze`` by pass against the floor (passes before and after it, averaged).

    ``curvature_examples`` is ``analyze``'s option (the curvature on that fraction of each
    stage's examples); the floor is the same full pass over the data either way. The result
    holds the scores (``"scores"``, ``[queries, all stages' examples]``) for comparisons.
    """

    def final_model() -> CausalLM:
        return CausalLM(add_lora(cfg, llama(cfg)), "sft", cfg)

    # The record as analyze sees it: every stage's tensors under the final model's names.
    recorded = open_run(str(store))
    run = RunView(recorded, [model_manifest(final_model())] * len(recorded.stages))
    plan = plan_segments(run, cfg.segments)
    checkpoints = dict.fromkeys(STAGES, 0)
    for segment in plan:
        checkpoints[run.stages[segment.stage].name] += len(segment.checkpoints)
    trainable = {s.name: set(s.trainable) for s in run.stages}

    reference = final_model()
    reference.load_state_dict(final_state)
    reference = reference.to(cfg.device).eval()

    def floors() -> dict[str, dict[str, float]]:
        return {n: floor_pass(cfg, reference, train[n], trainable[n]) for n in STAGES}

    stage_of = {id(dataset): name for name, dataset in train.items()}
    tags: list[tuple[Any, str, TagOf]] = [
        (api, "segment_operator", lambda args, kwargs: args[2].name),
        (Engine, "scores", lambda args, kwargs: stage_of.get(id(args[1]), "")),
    ]
    profiler = Profiler()
    floors()  # warm-up of the plain passes
    before = floors()
    model = final_model().to(cfg.device)
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reset = reset_peak_rss()
    rss_before = rss_bytes()
    with profiler.patched(BREAKDOWN_TARGETS, tags):
        synchronize(cfg)
        wall, cpu = time.perf_counter(), time.process_time()
        result = analyze(
            str(store),
            model=model,
            task="language_modeling",
            train=train,
            queries=queries,
            segments=cfg.segments,
            batch_size=cfg.analyze_batch_size,
            seed=cfg.seed,
            curvature_examples=curvature_examples,
            name=None,
            verbose=False,
        )
        synchronize(cfg)
        total, total_cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = peak_rss_bytes() if reset else None
    gpu_peak = torch.cuda.max_memory_allocated() if cfg.device == "cuda" else None
    after = floors()
    fb = {n: (before[n]["wall"] + after[n]["wall"]) / 2 for n in STAGES}
    fb_cpu = {n: (before[n]["cpu"] + after[n]["cpu"]) / 2 for n in STAGES}
    floor = sum(checkpoints[n] * fb[n] for n in STAGES)
    floor_cpu = sum(checkpoints[n] * fb_cpu[n] for n in STAGES)
    parts = dict(profiler.totals)
    parts["other"] = total - sum(parts.values())
    labels = [label for label in BREAKDOWN_ORDER if label in parts]
    scores = np.concatenate([result.scores[n] for n in STAGES], axis=1)
    return {
        "analyze_s": total,
        "analyze_cpu_s": total_cpu,
        "floor_s": floor,
        "floor_cpu_s": floor_cpu,
        "ratio": total / floor,
        "cpu_ratio": total_cpu / floor_cpu,
        "breakdown_s": {label: parts[label] for label in labels},
        "calls": dict(profiler.calls),
        "stages": {
            s.name: {
                "examples": s.num_examples,
                "checkpoints_used": checkpoints[s.name],
                "update_rule": s.optimizer.update_rule.value,
                "trainable_tensors": len(trainable[s.name]),
                "forward_backward_s": fb[s.name],
                "forward_backward_before_after_s": [before[s.name]["wall"], after[s.name]["wall"]],
                "passes_s": {
                    label: profiler.by_tag[s.name].get(label, 0.0) for label in DATA_PASSES
                },
                "passes_in_stage_floor_units": {
                    label: profiler.by_tag[s.name].get(label, 0.0)
                    / (checkpoints[s.name] * fb[s.name])
                    for label in DATA_PASSES
                },
            }
            for s in run.stages
        },
        "segments": [[s.start, s.end, len(s.checkpoints)] for s in plan],
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "cuda_peak_allocated_bytes": gpu_peak,
        "stage_effects": result.stage_effects.tolist(),
        "scores": scores,
        "scores_shape": list(scores.shape),
        "scores_finite": bool(np.isfinite(scores).all()),
        "mean_score_by_stage": {n: float(np.mean(result.scores[n])) for n in STAGES},
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def agreement(scores: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """How far ``scores`` are from ``exact`` (both ``[queries, examples]``).

    The mean over queries of the Spearman correlation over all stages' examples, and the
    largest difference relative to the largest exact score.
    """
    rho = [spearmanr(row, reference)[0] for row, reference in zip(scores, exact, strict=True)]
    return {
        "spearman": float(np.mean(rho)),
        "max_relative_difference": float(np.abs(scores - exact).max() / np.abs(exact).max()),
    }


def describe_model(cfg: Config) -> dict[str, Any]:
    model = llama(cfg)
    params = list(model.parameters())
    lora = add_lora(cfg, model)
    adapters = [p for n, p in lora.named_parameters() if "lora_" in n]
    return {
        "parameters": sum(p.numel() for p in params),
        "tensors": len(params),
        "lora_parameters": sum(p.numel() for p in adapters),
        "lora_tensors": len(adapters),
        "output_factor_mib": cfg.vocab**2 * 8 / 2**20,
    }


def environment(cfg: Config) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "argv": sys.argv,
        "loadavg_at_end": list(os.getloadavg()),
    }
    if cfg.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    try:
        import peft
        import transformers

        env["transformers"], env["peft"] = transformers.__version__, peft.__version__
    except ImportError:
        pass
    return env


def markdown(cfg: Config, report: dict[str, Any]) -> str:
    """The results as a markdown fragment for docs/benchmarks.md."""
    m, env = report["model"], report["environment"]
    where = env.get("gpu", f"{env['cpu_count']} CPU cores, torch threads {env['threads']}")
    lines = [
        f"`{report['command']}` ({report['wall_s'] / 60:.0f} minutes): Llama {cfg.layers} layers × "
        f"hidden {cfg.hidden} ({cfg.heads} heads, MLP {cfg.intermediate}), vocabulary "
        f"{cfg.vocab}: {m['parameters'] / 1e6:.1f} M parameters in {m['tensors']} tensors; "
        f"LoRA r={cfg.lora_r} on {', '.join(cfg.lora_targets)} ({m['lora_parameters']} "
        f"parameters in {m['lora_tensors']} tensors). Sequences of {cfg.seq_len} tokens, batch "
        f"{cfg.batch_size}, {cfg.examples} examples per stage; `pretrain` {cfg.steps('pretrain')} "
        f"steps of AdamW with warmup + cosine, `sft` {cfg.steps('sft')} steps of AdamW on the "
        f"adapters; `checkpoints_per_stage={cfg.checkpoints_per_stage}`; precision "
        f"{cfg.precision} on {cfg.device}. {where}, Python {env['python']}, torch {env['torch']}, "
        f"transformers {env.get('transformers', '?')}, peft {env.get('peft', '?')}, Lightning "
        f"{env['lightning']}; load average at the end {env['loadavg_at_end'][0]:.1f}.",
        "",
        "**Recording overhead** (median `fit` time of each arm over "
        f"{cfg.reps} alternated repetitions, after a warm-up):",
        "",
        "| stage | steps | without (s) | with (s) | ratio of medians [bootstrap 95%] | paired "
        "| per step (ms) | per interior checkpoint (ms) | fixed per stage (s) | store (MiB) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for stage, o in report["overhead"].items():
        lo, hi = o["ratio_bootstrap_95"]
        lines.append(
            f"| {stage} | {o['steps']} | {o['median_without_s']:.2f} | {o['median_with_s']:.2f} "
            f"| {o['ratio_median']:.3f} [{lo:.2f}–{hi:.2f}] | {o['ratio_paired_median']:.3f} "
            f"| {o['per_step_s'] * 1e3:+.0f} | {o['per_checkpoint_s'] * 1e3:+.0f} "
            f"| {o['stage_fixed_s']:+.2f} | {o['store_bytes'] / 2**20:.0f} |"
        )
    a = report["analysis"]
    stages = ", ".join(
        f"{n} {s['examples']} examples × {s['checkpoints_used']} checkpoints ({s['update_rule']})"
        for n, s in a["stages"].items()
    )
    lines += [
        "",
        f'**Analysis** (`analyze(task="language_modeling", segments={cfg.segments})`, '
        f"{cfg.queries} queries, batch size {cfg.analyze_batch_size}); floor = Σ checkpoints × "
        f"one forward+backward pass over the stage's data ({stages}), one analysis with floor "
        "passes just before and after it:",
        "",
        "| | seconds | share | × floor |",
        "| --- | ---: | ---: | ---: |",
    ]
    total, floor = a["analyze_s"], a["floor_s"]
    for label, value in a["breakdown_s"].items():
        lines.append(f"| {label} | {value:.2f} | {value / total:.1%} | {value / floor:.2f} |")
    lines += [
        f"| **analyze total** | **{total:.1f}** | 100% | **{total / floor:.1f}** |",
        f"| floor (Σ C × forward+backward) | {floor:.2f} | | 1 |",
        "",
        f"Ratio in process-CPU time: {a['cpu_ratio']:.1f}. "
        + (
            f"Peak RSS during `analyze`: {a['peak_rss_bytes'] / 2**30:.2f} GiB "
            f"({(a['peak_rss_bytes'] - a['rss_before_bytes']) / 2**30:.2f} GiB above the RSS "
            "before it)."
            if a["peak_rss_bytes"]
            else ""
        )
        + (
            f" Peak CUDA memory allocated: {a['cuda_peak_allocated_bytes'] / 2**30:.2f} GiB."
            if a["cuda_peak_allocated_bytes"]
            else ""
        ),
        "",
        "Each data pass per checkpoint, in units of one plain forward+backward pass over the "
        "same data (gradients for what the stage trained):",
        "",
        *pass_units_table(
            (
                (
                    f"{name} ({s['update_rule']})",
                    s["examples"],
                    s["checkpoints_used"],
                    f"{s['forward_backward_s']:.2f}",
                    s["passes_in_stage_floor_units"],
                )
                for name, s in a["stages"].items()
            ),
            "s",
        ),
    ]
    if report.get("curvature_examples"):
        lines += [
            "",
            "With the curvature on a fraction of each stage's examples (`curvature_examples`), "
            "each analysis timed against its own floor passes; scores compared with all "
            "examples' (Spearman over all training examples, mean over queries):",
            "",
            "| `curvature_examples` | analyze (s) | × floor | "
            + " | ".join(f"{label} × floor" for label in DATA_PASSES)
            + " | Spearman vs all | max difference / max score |",
            "| --- | ---: | ---: | " + " | ".join("---:" for _ in DATA_PASSES) + " | ---: | ---: |",
        ]
        for fraction, c in [("all (`None`)", a), *report["curvature_examples"].items()]:
            parts = c["breakdown_s"]
            agree = c.get("agreement", {"spearman": 1.0, "max_relative_difference": 0.0})
            lines.append(
                f"| {fraction} | {c['analyze_s']:.1f} | {c['ratio']:.2f} | "
                + " | ".join(f"{parts.get(label, 0.0) / c['floor_s']:.2f}" for label in DATA_PASSES)
                + f" | {agree['spearman']:.4f} | {agree['max_relative_difference']:.2e} |"
            )
    return "\n".join(lines)


def print_report(report: dict[str, Any]) -> None:
    for stage, o in report["overhead"].items():
        print(
            f"{stage}: without {o['median_without_s']:.2f} s, with {o['median_with_s']:.2f} s, "
            f"ratio {o['ratio_median']:.3f} (paired {o['ratio_paired_median']:.3f}); per step "
            f"{o['per_step_s'] * 1e3:+.1f} ms, per checkpoint {o['per_checkpoint_s'] * 1e3:+.0f} "
            f"ms, fixed {o['stage_fixed_s']:+.2f} s; hooks {o['hooks_total_s']:.2f} s"
        )
    a = report["analysis"]
    print(
        f"analyze {a['analyze_s']:.1f} s, floor {a['floor_s']:.2f} s: ratio {a['ratio']:.1f} "
        f"(CPU {a['cpu_ratio']:.1f})"
    )
    for label, value in a["breakdown_s"].items():
        print(f"  {label:28}{value:9.2f} s {value / a['floor_s']:7.2f} x floor")
    for name, s in a["stages"].items():
        units = ", ".join(f"{k} {v:.1f}" for k, v in s["passes_in_stage_floor_units"].items())
        print(f"  {name}: fwd+bwd {s['forward_backward_s']:.2f} s; per checkpoint: {units}")
    for fraction, c in report.get("curvature_examples", {}).items():
        print(
            f"curvature_examples={fraction}: analyze {c['analyze_s']:.1f} s, ratio "
            f"{c['ratio']:.2f}; Spearman vs all {c['agreement']['spearman']:.4f}, max difference "
            f"{c['agreement']['max_relative_difference']:.1e} of the largest score"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny Llama smoke run (default)")
    mode.add_argument("--full", action="store_true", help="the realistic shape")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", default="32-true", help="the Trainer's precision")
    parser.add_argument("--reps", type=int, help="alternated repetitions per arm and stage")
    parser.add_argument("--examples", type=int, help="training examples per stage")
    parser.add_argument("--epochs", type=int, help="epochs of each stage")
    parser.add_argument("--queries", type=int)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default 2)")
    parser.add_argument("--checkpoints-per-stage", type=int)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--markdown", help="write the docs section here")
    parser.add_argument("--workdir", help="keep the stores here (default: temporary)")
    parser.add_argument(
        "--curvature-examples",
        type=float,
        nargs="+",
        help="also analyze with the curvature on these fractions of the examples (e.g. 0.5 "
        "0.25), each timed against its own floor passes and compared with all examples",
    )
    args = parser.parse_args(argv)
    invoked = command("transformer.py", sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here; nothing was run.")
        raise SystemExit(0)
    cfg = Config.preset(args.full)
    cfg = replace(cfg, device=args.device, precision=args.precision)
    for name in ("reps", "examples", "queries", "threads", "checkpoints_per_stage"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.epochs is not None:
        cfg.epochs = dict.fromkeys(STAGES, args.epochs)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(cfg.threads)

    started = time.perf_counter()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sc-llama-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": invoked, "config": asdict(cfg)}
    report["model"] = describe_model(cfg)
    m = report["model"]
    print(
        f"Llama: {m['parameters'] / 1e6:.1f} M parameters in {m['tensors']} tensors; LoRA "
        f"{m['lora_parameters']} parameters in {m['lora_tensors']} tensors",
        flush=True,
    )
    try:
        train, queries = make_data(cfg)
        torch.manual_seed(cfg.seed)
        initial = CausalLM(llama(cfg), "pretrain", cfg)
        state = {k: v.clone() for k, v in initial.state_dict().items()}
        report["overhead"] = {}
        store: Path | None = None
        for stage in STAGES:
            print(f"recording overhead: {stage}", flush=True)
            summary, state, store = stage_overhead(cfg, stage, train[stage], state, store, workdir)
            report["overhead"][stage] = summary
        assert store is not None
        print("analysis against its floor", flush=True)
        report["analysis"] = analysis(cfg, store, train, queries, state)
        exact = report["analysis"].pop("scores")
        report["curvature_examples"] = {}
        for fraction in args.curvature_examples or []:
            print(f"analysis with curvature_examples={fraction}", flush=True)
            subset = analysis(cfg, store, train, queries, state, fraction)
            subset["agreement"] = agreement(subset.pop("scores"), exact)
            report["curvature_examples"][str(fraction)] = subset
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report["wall_s"] = time.perf_counter() - started
    report["environment"] = environment(cfg)
    print_report(report)
    print(f"total {report['wall_s']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    if args.markdown:
        Path(args.markdown).write_text(markdown(cfg, report))
        print(f"wrote {args.markdown}")
    return report


if __name__ == "__main__":
    main()
