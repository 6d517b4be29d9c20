"""AnalysisOptions: checked on construction, one JSON spelling, analyze()'s defaults."""

from __future__ import annotations

import inspect
import json
import re
from typing import Any

import pytest

from source_callback import AnalysisOptions, ModuleSelection, analyze
from source_callback.analysis.options import option_names
from source_callback.optim import UpdateRule


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"method": "loo"}, ValueError, "method must be one of"),
        ({"batch_size": "16"}, TypeError, "batch_size must be an int, got '16' (str)"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"seed": True}, TypeError, "seed must be an int"),
        ({"momentum_tail": 1}, TypeError, "momentum_tail must be True or False"),
        ({"damping": -0.1}, ValueError, "damping must be >= 0"),
        ({"preconditioner_floor": "0.1"}, TypeError, "preconditioner_floor must be a number"),
        ({"fisher": "empirical"}, ValueError, "fisher must be one of"),
        ({"adam_variant": "full"}, ValueError, "adam_variant must be one of"),
        ({"cache": "full"}, ValueError, "cache must be None or 'projected'"),
        ({"cache": "projected", "method": "if"}, ValueError, "serves method 'source' or"),
        ({"segments": 0}, ValueError, "segments must be >= 1"),
        ({"segments": "3"}, TypeError, "segments must be a positive int, or a mapping"),
        ({"segments": {"sft": [10.5]}}, TypeError, "segments['sft']'s steps must be ints"),
        ({"segments": {"sft": 0}}, ValueError, "segments['sft'] must be >= 1"),
        ({"optimizer_model": "lion"}, ValueError, "optimizer_model must be None or one of"),
        ({"modules": "head"}, TypeError, "not a single string"),
        ({"diagonal_above": 0}, ValueError, "diagonal_above must be >= 1"),
        ({"projection_dim": 8.0}, TypeError, "projection_dim must be an int"),
        ({"curvature_examples": 0}, ValueError, "curvature_examples as a count must be >= 1"),
        ({"curvature_examples": 1.5}, ValueError, "as a fraction (a float) must be in (0, 1]"),
        ({"curvature_examples": 0.0}, ValueError, "as a fraction (a float) must be in (0, 1]"),
        ({"curvature_examples": "1/2"}, TypeError, "curvature_examples must be an int (a count)"),
        ({"curvature_examples": True}, TypeError, "curvature_examples must be an int (a count)"),
        (
            {"curvature_examples": 0.5, "method": "tracin"},
            ValueError,
            "curvature_examples does not serve method 'tracin'",
        ),
    ],
)
def test_bad_options_are_refused(fields: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        AnalysisOptions(**fields)


def test_json_round_trip() -> None:
    options = AnalysisOptions(
        method="fast-source",
        segments={"pretrain": 2, "sft": [12, 20]},
        optimizer_model="adamw",
        modules=["body.*"],
        cache="projected",
        damping=1,
        curvature_examples=0.25,
    )
    assert options.optimizer_model is UpdateRule.ADAMW
    assert options.modules == ModuleSelection(include=("body.*",))
    data = json.loads(json.dumps(options.to_json()))
    assert data["segments"] == {"pretrain": 2, "sft": [12, 20]}
    assert data["modules"] == {"include": ["body.*"], "exclude": []}
    assert AnalysisOptions.from_json(data) == options
    assert AnalysisOptions.from_json({}) == AnalysisOptions()
    assert AnalysisOptions.from_json({"curvature_examples": 1000}).curvature_examples == 1000
    assert set(AnalysisOptions().to_json()) == set(option_names())


def test_from_json_names_unknown_keys_and_wrong_types() -> None:
    with pytest.raises(ValueError, match=r"unknown analysis option\(s\) epochs; known: method, "):
        AnalysisOptions.from_json({"epochs": 3})
    with pytest.raises(ValueError, match="batch_size must be an int, got '16'"):
        AnalysisOptions.from_json({"batch_size": "16"})


def test_analyze_keywords_default_to_the_options_defaults() -> None:
    parameters = inspect.signature(analyze).parameters
    defaults = {name: parameters[name].default for name in option_names()}
    assert AnalysisOptions(**defaults) == AnalysisOptions()
