"""Counterfactual evaluation of attribution scores (linear datamodeling score, LDS)."""

from source_callback.evaluation.lds import LDSResult, linear_datamodeling_score, random_subsets

__all__ = ["LDSResult", "linear_datamodeling_score", "random_subsets"]
