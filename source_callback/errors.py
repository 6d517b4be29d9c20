"""Exceptions raised by source-callback. Every message says what is wrong and what to do."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def listed(items: Sequence[str], limit: int, separator: str = ", ") -> str:
    """The first ``limit`` of ``items`` joined for a message, ``...`` marking the rest."""
    more = f"{separator}..." if len(items) > limit else ""
    return separator.join(items[:limit]) + more


class SourceCallbackError(Exception):
    """Base class of the errors this library raises on purpose."""


class StoreError(SourceCallbackError):
    """A store cannot be used as asked."""


class NotAStoreError(StoreError):
    """The location holds something that is not a source-callback store."""


class FormatVersionError(StoreError):
    """The store was written by a newer format version than this library reads."""


@dataclass(frozen=True)
class Damage:
    """One problem found in a store: where, which tensors or arrays, and what is wrong.

    Attributes
    ----------
    where
        The part of the store: ``checkpoint 0000000010_interior``, ``frozen parameters of
        stage 1``, ``steps``.
    names
        The tensors (or step arrays) affected.
    reason
        What is wrong with them.
    files
        The store's files (keys relative to its root) holding the damaged bytes, where known:
        the ones a partial copy or sync would have to copy again.

    """

    where: str
    names: tuple[str, ...]
    reason: str
    files: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = f"{self.where}: {self.reason}"
        if self.names:
            text += f" ({len(self.names)}: {listed(self.names, 8)})"
        return text + (f" in {listed(self.files, 4)}" if self.files else "")


class DamagedStoreError(StoreError):
    """Stored data does not match the checksums and digests recorded when it was written.

    ``problems`` lists every problem found.
    """

    def __init__(self, url: str, problems: Sequence[Damage]) -> None:
        self.problems = list(problems)
        lines = "; ".join(str(p) for p in self.problems[:5])
        more = f"; and {len(self.problems) - 5} more" if len(self.problems) > 5 else ""
        super().__init__(
            f"{url} is damaged: {lines}{more}. Nothing was read from the damaged part. Restore "
            "the store (or the damaged part: a partial copy or sync?) from a copy; "
            "`source-callback verify STORE` lists every problem."
        )


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


class NonFiniteError(AnalysisError):
    """A value that entered a data pass of the analysis is NaN or infinite.

    Attributes
    ----------
    quantity
        What was not finite: ``"loss"``, ``"measurement"``, ``"pseudo-loss"``,
        ``"pseudo-label probabilities"``, ``"gradient"`` or ``"score"``.
    dataset
        The stage's name, or ``"queries"``; ``None`` outside a pass of the analysis.
    index
        The example's index in that dataset (``None`` outside a pass: then the row of the batch
        is in the message).
    pass_name
        The pass, as its progress bar shows it (``"segment 2/3 factors 1/3"``).
    in_input
        Whether the example's input itself holds NaN or infinite values.

    """

    def __init__(
        self,
        quantity: str,
        dataset: str | None,
        index: int,
        pass_name: str | None,
        in_input: bool,
    ) -> None:
        self.quantity = quantity
        self.dataset = dataset
        self.index = index
        self.pass_name = pass_name
        self.in_input = in_input
        if dataset is None:
            where = f"example {index} of the batch"
        elif dataset == "queries":
            where = f"query {index}"
        else:
            where = f"example {index} of stage {dataset!r}"
        during = "" if pass_name is None else f" in the pass {pass_name!r}"
        if in_input:
            cause = "that example's input itself holds NaN or infinite values"
        else:
            cause = (
                "its input is finite, so the model or the task overflows or divides by zero on "
                "it at this state"
            )
        if dataset == "queries":
            advice = "Fix that query or leave it out"
        else:
            advice = (
                "Replace the non-finite values (the stage's training set must stay the one it "
                "trained on, so retrain with them replaced), or pass a Task whose values are "
                "finite for this example"
            )
        super().__init__(
            f"the {quantity} of {where} is not finite (NaN or infinite){during}: {cause}. The "
            f"analysis stopped and stored nothing. {advice}."
        )

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return type(self), (
            self.quantity,
            self.dataset,
            self.index,
            self.pass_name,
            self.in_input,
        )
