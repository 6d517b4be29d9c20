"""The retraining driver reproduces recorded runs and trains subsets by the recorded recipe."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from models import (
    StepCountingClassifier,
    TinyClassifier,
    loader,
    make_dataset,
    trainer,
    two_stage_recipe,
)
from torch.utils.data import DataLoader

from source_callback import ClassificationTask, SourceCallback, open_run
from source_callback.evaluation import RetrainError, TaskMeasurement, read_recipe, retrain

TRAIN = {"pretrain": make_dataset(24, seed=0), "finetune": make_dataset(40, seed=1)}
SEED = 7


def final_params(model: pl.LightningModule) -> np.ndarray:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).numpy()


def steps_per_fit(model: StepCountingClassifier) -> np.ndarray:
    return np.array(model.steps_per_fit)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two stages as a user script would train them: seeded, shuffled, accumulation in stage 2."""
    root = tmp_path_factory.mktemp("retrain")
    path = root / "run.zarr"
    pl.seed_everything(SEED, verbose=False)
    model = StepCountingClassifier()
    callback = SourceCallback(path, checkpoints_per_stage=2)
    for name, epochs, accumulate in (("pretrain", 2, 1), ("finetune", 1, 2)):
        callback.next_stage(name)
        two_stage_recipe(model, name)
        fit = trainer([callback], root, max_epochs=epochs, accumulate_grad_batches=accumulate)
        fit.fit(model, loader(TRAIN[name], batch_size=8, shuffle=True))
    return path


def test_recipe_is_read_from_the_record(store) -> None:
    pretrain, finetune = read_recipe(open_run(store))
    assert (pretrain.epochs, pretrain.batch_size, pretrain.accumulate_grad_batches) == (2, 8, 1)
    assert (finetune.epochs, finetune.accumulate_grad_batches) == (1, 2)
    assert not finetune.drop_last
    assert finetune.steps_per_epoch(40) == 3  # 5 batches, 2 per step, the last one alone
    assert finetune.schedule(20) == (1, 2)  # the recorded pass over half the data
    assert finetune.schedule(20, "steps") == (2, 3)  # the recorded 3 steps take 2 passes


def test_all_data_with_the_original_seed_reproduces_the_run(store) -> None:
    recorded = open_run(store).checkpoints[-1].params()
    model = TinyClassifier()
    expected = torch.cat([recorded[n].flatten() for n, _ in model.named_parameters()]).numpy()
    common = {"module": StepCountingClassifier, "train": TRAIN, "measure": final_params}
    whole = retrain(store, **common, seeds=[SEED], before_stage=two_stage_recipe, verbose=False)
    assert whole.shape == (1, 1, expected.size)
    np.testing.assert_array_equal(whole[0, 0], expected)
    # a mask keeping everything trains on a Subset of all indices: the same run
    everything = {"pretrain": np.ones((1, 24), dtype=bool)}
    kept = retrain(
        store, **common, keep=everything, seeds=[SEED], before_stage=two_stage_recipe, verbose=False
    )
    np.testing.assert_array_equal(kept, whole)


def test_subsets_get_the_recorded_passes_and_removed_stages_are_skipped(store) -> None:
    common = {
        "module": StepCountingClassifier,
        "train": TRAIN,
        "measure": steps_per_fit,
        "before_stage": two_stage_recipe,
        "verbose": False,
    }
    halves = {
        "pretrain": np.array([[True] * 12 + [False] * 12]),
        "finetune": np.array([[True] * 20 + [False] * 20]),
    }
    # pretrain: 2 epochs of ceil(12/8) = 2 steps; finetune: ceil(ceil(20/8) / 2) = 2 steps
    assert retrain(store, **common, keep=halves)[0, 0].tolist() == [4, 2]
    # or the recorded steps: 6 and 3, in more passes over the halves
    assert retrain(store, **common, keep=halves, length="steps")[0, 0].tolist() == [6, 3]
    # without pretraining only the finetune stage runs, on all 40 examples: 3 steps
    skipped = retrain(store, **common, keep={"pretrain": np.zeros((1, 24), dtype=bool)})
    assert skipped[0, 0].tolist() == [3]


def test_parallel_processes_give_the_same_retrainings(store) -> None:
    keep = {"pretrain": np.stack([np.arange(24) % 2 == 0, np.arange(24) < 16])}
    common = {
        "module": StepCountingClassifier,
        "train": TRAIN,
        "measure": TaskMeasurement(ClassificationTask(), make_dataset(10, seed=5)),
        "keep": keep,
        "seeds": [0, 1],
        "before_stage": two_stage_recipe,
        "verbose": False,
    }
    serial = retrain(store, **common)
    parallel = retrain(store, **common, processes=2)
    assert serial.shape == (2, 2, 10)
    np.testing.assert_allclose(parallel, serial, rtol=1e-6, atol=1e-7)
    assert not np.allclose(serial[:, 0], serial[:, 1])  # seeds differ
    assert not np.allclose(serial[0], serial[1])  # subsets differ


def test_task_measurement_is_the_query_loss() -> None:
    queries = make_dataset(9, seed=3)
    model = TinyClassifier()
    x, y = queries.tensors
    expected = torch.nn.functional.cross_entropy(model(x), y, reduction="none").detach()
    measured = TaskMeasurement(ClassificationTask(), queries, batch_size=4)(model)
    assert measured.dtype == np.float64
    np.testing.assert_allclose(measured, expected.numpy(), rtol=1e-6)


def test_an_optimizer_unlike_the_record_is_refused(store) -> None:
    expected = r"stage 'finetune'.*SGD instead of .*AdamW.*before_stage"
    with pytest.raises(RetrainError, match=expected):
        retrain(
            store, module=StepCountingClassifier, train=TRAIN, measure=final_params, verbose=False
        )


def test_bad_masks_and_unreproducible_epochs_are_refused(store, tmp_path) -> None:
    common = {"module": StepCountingClassifier, "train": TRAIN, "measure": final_params}
    with pytest.raises(RetrainError, match=r"keep\['pretrain'\] must be \[subsets, 24\]"):
        retrain(store, **common, keep={"pretrain": np.ones((2, 23), dtype=bool)}, verbose=False)
    with pytest.raises(RetrainError, match="not in the record"):
        retrain(store, **common, keep={"sft": np.ones((1, 5), dtype=bool)}, verbose=False)
    # a sampler that draws 10 batches per epoch fits no plain epoch structure
    other = tmp_path / "sampled.zarr"
    data = make_dataset(24, seed=0)
    sampler = torch.utils.data.RandomSampler(data, replacement=True, num_samples=80)
    trainer([SourceCallback(other, stage="pretrain")], tmp_path, max_epochs=1).fit(
        TinyClassifier(), DataLoader(data, batch_size=8, sampler=sampler)
    )
    with pytest.raises(RetrainError, match="10 optimizer steps in its first epoch"):
        read_recipe(open_run(other))


def test_a_stage_stopped_mid_epoch_keeps_its_fraction_of_a_pass(tmp_path) -> None:
    path = tmp_path / "steps.zarr"
    trainer([SourceCallback(path, stage="pretrain")], tmp_path, max_steps=5, max_epochs=-1).fit(
        TinyClassifier(), loader(make_dataset(24), batch_size=8, shuffle=True)
    )
    (recipe,) = read_recipe(open_run(path))
    assert recipe.epochs == pytest.approx(5 / 3)
    assert recipe.schedule(24) == (2, 5) and recipe.schedule(12) == (2, 3)
