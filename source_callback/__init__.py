"""source-callback: record multi-stage Lightning training, attribute predictions with SOURCE."""

from source_callback.errors import (
    FormatVersionError,
    InterruptedStageError,
    ManifestMismatchError,
    NotAStoreError,
    SourceCallbackError,
    StoreError,
)
from source_callback.lightning import SourceCallback
from source_callback.store.reader import Checkpoint, Run, open_run
from source_callback.store.schema import Stage

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "FormatVersionError",
    "InterruptedStageError",
    "ManifestMismatchError",
    "NotAStoreError",
    "Run",
    "SourceCallback",
    "SourceCallbackError",
    "Stage",
    "StoreError",
    "open_run",
]
