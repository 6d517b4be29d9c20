"""Exceptions raised by source-callback. Every message says what is wrong and what to do."""

from __future__ import annotations


class SourceCallbackError(Exception):
    """Base class of the errors this library raises on purpose."""


class StoreError(SourceCallbackError):
    """A store cannot be used as asked."""


class NotAStoreError(StoreError):
    """The location holds something that is not a source-callback store."""


class FormatVersionError(StoreError):
    """The store was written by a newer format version than this library reads."""


class ManifestMismatchError(StoreError):
    """The model's parameters do not match the ones recorded in the store."""


class InterruptedStageError(StoreError):
    """The store's last stage was interrupted and is not being resumed."""


class AnalysisError(SourceCallbackError):
    """The analysis cannot run on this record with these arguments."""


class UnsupportedOptimizerError(AnalysisError):
    """The record's optimizer has no model in the analysis."""


class RankFailedError(AnalysisError):
    """Another process of a distributed analysis failed; its error is in the message."""
