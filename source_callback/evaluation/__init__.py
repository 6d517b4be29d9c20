"""Counterfactual evaluation of attribution scores: LDS, and retraining for its ground truth."""

from source_callback.evaluation.lds import (
    LDSResult,
    linear_datamodeling_score,
    noise_ceiling,
    random_subsets,
)
from source_callback.evaluation.removal import ClassPredictions, flip_fraction, removal_masks
from source_callback.evaluation.retrain import (
    RetrainError,
    StageRecipe,
    TaskMeasurement,
    read_recipe,
    retrain,
)

__all__ = [
    "ClassPredictions",
    "LDSResult",
    "RetrainError",
    "StageRecipe",
    "TaskMeasurement",
    "flip_fraction",
    "linear_datamodeling_score",
    "noise_ceiling",
    "random_subsets",
    "read_recipe",
    "removal_masks",
    "retrain",
]
