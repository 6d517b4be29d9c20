"""source-callback: record multi-stage training runs, attribute predictions with SOURCE."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from source_callback.analysis.api import analyze
from source_callback.analysis.options import AnalysisOptions
from source_callback.analysis.results import AnalysisResult, Attribution, load_analysis
from source_callback.analysis.task import (
    ClassificationTask,
    LanguageModelingTask,
    RegressionTask,
    Seq2SeqTask,
    Task,
)
from source_callback.analysis.units import ModuleSelection
from source_callback.errors import (
    AnalysisError,
    Damage,
    DamagedStoreError,
    FormatVersionError,
    InterruptedStageError,
    ManifestMismatchError,
    NonFiniteError,
    NotAStoreError,
    RankFailedError,
    SourceCallbackError,
    StoreError,
    UnsupportedOptimizerError,
)
from source_callback.store.reader import Checkpoint, Run, open_run
from source_callback.store.schema import Stage

if TYPE_CHECKING:
    from source_callback.hf import SourceTrainerCallback
    from source_callback.lightning import SourceCallback

__version__ = "0.1.0"

__all__ = [
    "AnalysisError",
    "AnalysisOptions",
    "AnalysisResult",
    "Attribution",
    "Checkpoint",
    "ClassificationTask",
    "Damage",
    "DamagedStoreError",
    "FormatVersionError",
    "InterruptedStageError",
    "LanguageModelingTask",
    "ManifestMismatchError",
    "ModuleSelection",
    "NonFiniteError",
    "NotAStoreError",
    "RankFailedError",
    "RegressionTask",
    "Run",
    "Seq2SeqTask",
    "SourceCallback",
    "SourceCallbackError",
    "SourceTrainerCallback",
    "Stage",
    "StoreError",
    "Task",
    "UnsupportedOptimizerError",
    "analyze",
    "load_analysis",
    "open_run",
]


def __getattr__(name: str) -> Any:
    # Lightning and transformers are imported only when a callback is used, so that reading a
    # store and the command line start quickly (and transformers stays optional: the hf extra).
    if name == "SourceCallback":
        from source_callback.lightning import SourceCallback

        return SourceCallback
    if name == "SourceTrainerCallback":
        from source_callback.hf import SourceTrainerCallback

        return SourceTrainerCallback
    raise AttributeError(f"module 'source_callback' has no attribute {name!r}")
