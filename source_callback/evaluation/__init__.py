"""Counterfactual evaluation of attribution scores: LDS, and retraining for its ground truth."""

from source_callback.evaluation.lds import LDSResult, linear_datamodeling_score, random_subsets
from source_callback.evaluation.retrain import (
    RetrainError,
    StageRecipe,
    TaskMeasurement,
    read_recipe,
    retrain,
)

__all__ = [
    "LDSResult",
    "RetrainError",
    "StageRecipe",
    "TaskMeasurement",
    "linear_datamodeling_score",
    "random_subsets",
    "read_recipe",
    "retrain",
]
