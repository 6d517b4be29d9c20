"""Counterfactual accuracy of the attribution methods on one setting (LDS, removal, stages).

For a setting of ``settings.py``: train and record ``models`` runs from different seeds; analyze
each with every method; retrain the first run's recipe on random half-subsets of the attributed
stage (``subsets`` × ``seeds``) in parallel processes; report the LDS of each method for the
first model and for the ensemble (scores averaged over the models), with bootstrap intervals
and the seed-to-seed noise ceiling. Also: the subset-removal evaluation (remove each query's
top-k helpful examples, retrain, count prediction flips) and stage effects against retraining
without each stage.

    python benchmarks/lds.py rotated-digits-sgd --subsets 20 --seeds 2   # one setting
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr
from settings import Setting, linear_diabetes, logistic_breast_cancer, noisy_mlp_digits, set_stage
from settings import rotated_digits as rotated

from source_callback import analyze
from source_callback.analysis.task import resolve_task
from source_callback.errors import AnalysisError
from source_callback.evaluation import (
    ClassPredictions,
    TaskMeasurement,
    flip_fraction,
    linear_datamodeling_score,
    noise_ceiling,
    random_subsets,
    removal_masks,
    retrain,
)

#: Method label → analyze() options. SOURCE and Fast-SOURCE use 3 segments per stage.
METHODS: dict[str, dict[str, Any]] = {
    "SOURCE": {"method": "source", "segments": 3},
    "Fast-SOURCE": {"method": "fast-source", "segments": 3},
    "IF (EK-FAC)": {"method": "if"},
    "TracInCP": {"method": "tracin", "segments": 3},
}
#: Variants that decide defaults, added where they apply.
SGD_VARIANTS = {"SOURCE, no momentum tail": {"method": "source", "momentum_tail": False}}
ADAM_VARIANTS = {
    "SOURCE, diagonal Adam": {"method": "source", "adam_variant": "diagonal"},
    "SOURCE, factored Adam": {"method": "source", "adam_variant": "factored"},
    "SOURCE, curvature on 1/2 of the examples": {"method": "source", "curvature_examples": 0.5},
    "SOURCE, curvature on 1/4 of the examples": {"method": "source", "curvature_examples": 0.25},
}

SETTINGS = {
    "logistic-breast-cancer": logistic_breast_cancer,
    "linear-diabetes": linear_diabetes,
    "noisy-mlp-digits": lambda _: noisy_mlp_digits(),
    "rotated-digits-sgd": lambda _: rotated(adam=False),
    "rotated-digits-adamw": lambda _: rotated(adam=True),
}
THREE_STAGES = ((0, 1), (2,), (3,))
#: SOURCE with other segment counts per stage (the default plan records 6 parts per stage).
SEGMENT_COUNTS = (1, 2, 3, 6)
RETRAIN_SEED0 = 1000  # retraining seeds are disjoint from the recorded models' seeds


def methods_for(setting: Setting) -> dict[str, dict[str, Any]]:
    """The methods to compare on ``setting``, with the variants its optimizer has."""
    module = setting.module()
    kinds = {recipe.optimizer for recipe in module.recipes.values()}
    momentum = any(recipe.momentum > 0 for recipe in module.recipes.values())
    variants = ADAM_VARIANTS if "adamw" in kinds else SGD_VARIANTS if momentum else {}
    return {**METHODS, **variants}


def record_models(setting: Setting, workdir: Path, models: int) -> list[Path]:
    """Train and record ``models`` runs of the setting (seeds 0..models-1)."""
    stores = []
    for seed in range(models):
        store = workdir / f"{setting.name}-model{seed}.zarr"
        setting.train_run(store, seed)
        stores.append(store)
    return stores


def attribute(
    setting: Setting, stores: list[Path], methods: dict[str, dict[str, Any]]
) -> tuple[dict[str, list[np.ndarray]], dict[str, float], dict[str, list[np.ndarray]]]:
    """Scores of the attributed stage and stage effects per method and model, and seconds."""
    scores: dict[str, list[np.ndarray]] = {}
    effects: dict[str, list[np.ndarray]] = {}
    seconds: dict[str, float] = {}
    for label, options in methods.items():
        start = time.perf_counter()
        try:
            results = [
                analyze(
                    store,
                    model=setting.module(),
                    task=setting.task,
                    train=setting.train,
                    queries=setting.queries,
                    batch_size=256,
                    name=None,
                    verbose=False,
                    **options,
                )
                for store in stores
            ]
        except AnalysisError as error:  # e.g. a segment the record cannot support
            print(f"{setting.name}: {label} not applicable: {error}", flush=True)
            continue
        scores[label] = [r.scores[setting.attributed] for r in results]
        effects[label] = [r.stage_effects for r in results]
        seconds[label] = (time.perf_counter() - start) / len(stores)
    return scores, seconds, effects


def _retrain(
    setting: Setting,
    store: Path,
    keep: dict,
    seeds: int,
    processes: int,
    measure: Any,
    length: str = "epochs",
) -> np.ndarray:
    return retrain(
        store,
        module=setting.module,
        train=setting.train,
        measure=measure,
        keep=keep,
        seeds=[RETRAIN_SEED0 + r for r in range(seeds)],
        before_stage=set_stage,
        length=length,  # type: ignore[arg-type]
        processes=processes,
        verbose=False,
    )


def subset_measurements(
    setting: Setting,
    store: Path,
    masks: np.ndarray,
    seeds: int,
    processes: int,
    length: str = "epochs",
) -> np.ndarray:
    """Each query's loss after retraining the recorded run on each subset of the attributed stage.

    ``masks``: ``[J, N]`` kept examples of ``setting.attributed`` (the other stages are kept
    whole); returns ``[J, seeds, Q]``, as :func:`linear_datamodeling_score` takes it.
    """
    measure = TaskMeasurement(resolve_task(setting.task), setting.queries)
    keep = {setting.attributed: masks}
    return _retrain(setting, store, keep, seeds, processes, measure, length)


def lds(
    setting: Setting,
    workdir: Path,
    *,
    models: int,
    subsets: int,
    seeds: int,
    processes: int,
    alpha: float = 0.5,
    lengths: tuple[str, ...] = ("epochs",),
    methods: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """LDS of every method on ``setting``, single model and ensemble, with the noise ceiling.

    ``lengths``: the retraining conventions to measure against (see ``retrain(length=...)``);
    ``methods``: label → ``analyze`` options (default: :func:`methods_for`).
    """
    stores = record_models(setting, workdir, models)
    methods = methods or methods_for(setting)
    scores, seconds, _ = attribute(setting, stores, methods)
    size = len(setting.train[setting.attributed])  # type: ignore[arg-type]
    masks = random_subsets(size, subsets, alpha, seed=0)
    out: dict[str, Any] = {
        "setting": setting.name,
        "title": setting.title,
        "notes": {k: v for k, v in setting.notes.items() if isinstance(v, (int, float, str))},
        "models": models,
        "subsets": subsets,
        "seeds": seeds,
        "alpha": alpha,
        "examples": size,
        "queries": len(setting.queries),
        "seconds": seconds,
        "retrainings": subsets * seeds,
    }
    for length in lengths:
        start = time.perf_counter()
        measured = subset_measurements(setting, stores[0], masks, seeds, processes, length)
        rows = {}
        for label, per_model in scores.items():
            single = linear_datamodeling_score(per_model[0], masks, measured)
            row = {"single": [single.mean, single.low, single.high]}
            if models > 1:
                ensemble = linear_datamodeling_score(np.mean(per_model, axis=0), masks, measured)
                row["ensemble"] = [ensemble.mean, ensemble.low, ensemble.high]
            rows[label] = row
        out[length] = {
            "ceiling": noise_ceiling(measured) if seeds > 1 else None,
            "retrain_seconds": time.perf_counter() - start,
            "methods": rows,
        }
    return out


def removal(
    setting: Setting,
    workdir: Path,
    *,
    ks: list[int],
    queries: int,
    seeds: int,
    processes: int,
) -> dict[str, Any]:
    """Remove each query's top-k helpful examples (per method), retrain, count flips.

    Queries are the first ``queries`` that the recorded model classifies correctly; a random
    removal of k examples is the control.
    """
    (store,) = record_models(setting, workdir, 1)
    predict_all = ClassPredictions(setting.queries)
    scores, _, _ = attribute(setting, [store], METHODS)
    # queries that every retraining on all data classifies correctly
    reference_all = _retrain(setting, store, {}, seeds, processes, predict_all)[0]  # [R, Q]
    labels = np.array([int(setting.queries[i][1]) for i in range(len(setting.queries))])
    correct = np.flatnonzero((reference_all == labels).mean(0) == 1.0)[:queries]
    size = len(setting.train[setting.attributed])  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    candidates = {label: s[0][correct] for label, s in scores.items()}
    candidates["random"] = rng.random((len(correct), size))
    rows: dict[str, dict[str, float]] = {}
    for label, chosen in candidates.items():
        for k in ks:
            keep = {setting.attributed: removal_masks(chosen, k)}
            predicted = _retrain(setting, store, keep, seeds, processes, predict_all)  # [q, R, Q]
            flips = flip_fraction(reference_all[:, correct], predicted[:, :, correct])
            rows.setdefault(label, {})[str(k)] = float(flips.mean())
    return {"setting": setting.name, "queries": len(correct), "seeds": seeds, "flips": rows}


def stage_effects(
    workdir: Path, *, models: int, seeds: int, processes: int, adam: bool = False
) -> dict[str, Any]:
    """Predicted stage effects against retraining without each stage (three stages)."""
    setting = rotated(adam=adam, stage_turns=THREE_STAGES)
    stores = record_models(setting, workdir, models)
    methods = {k: METHODS[k] for k in ("SOURCE", "IF (EK-FAC)", "TracInCP")}
    _, _, effects = attribute(setting, stores, methods)
    names = [s.name for s in setting.stages]
    keep = {
        s.name: np.array([[True] * len(s.data)] + [[s.name != n] * len(s.data) for n in names])
        for s in setting.stages
    }
    measure = TaskMeasurement(resolve_task(setting.task), setting.queries)
    measured = _retrain(setting, stores[0], keep, seeds, processes, measure).mean(1)  # [S+1, Q]
    truth = measured[1:] - measured[0]  # [S, Q]: removing each stage
    rows: dict[str, dict[str, list[float]]] = {}
    for label, per_model in effects.items():
        predicted = np.mean(per_model, axis=0).T  # [S, Q]
        for name, p, t in zip(names, predicted, truth, strict=True):
            slope = float(p @ t / (p @ p)) if p @ p > 0 else float("nan")
            rows.setdefault(label, {})[name] = [
                float(pearsonr(p, t).statistic),
                float(spearmanr(p, t).statistic),
                slope,
            ]
    return {
        "setting": setting.name,
        "stages": names,
        "models": models,
        "seeds": seeds,
        "truth_mean": truth.mean(1).tolist(),
        "effects": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("setting", choices=sorted(SETTINGS))
    parser.add_argument("--epochs", type=int, default=3, help="for the linear settings")
    parser.add_argument("--models", type=int, default=1)
    parser.add_argument("--subsets", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/runs"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = lds(
        SETTINGS[args.setting](args.epochs),
        args.workdir,
        models=args.models,
        subsets=args.subsets,
        seeds=args.seeds,
        processes=args.processes,
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
