"""Checks and preparation of what the user hands to ``analyze``: model, datasets, checkpoints."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from source_callback.analysis.namespace import CheckpointView, RunView
from source_callback.analysis.task import describe_batch
from source_callback.errors import AnalysisError
from source_callback.fingerprint import UnstableItemsError, dataset_fingerprint, example_digests
from source_callback.record.probe import preserved_rng
from source_callback.store.reader import Checkpoint, Run
from source_callback.store.schema import (
    STEP_EPOCH,
    STEP_EXAMPLES,
    STEP_SCALE,
    STEP_STAGE,
    Stage,
)


def prepare_model(model: nn.Module, trained: set[str]) -> nn.Module:
    """A private copy of ``model`` in eval mode, with gradients for exactly ``trained``.

    ``trained``: the model's tensors that some stage trained (:attr:`RunView.trained`). The
    instance passed in may be freshly built with everything trainable, or with adapters' bases
    frozen.
    """
    copy_ = copy.deepcopy(model).eval()
    for name, param in copy_.named_parameters():
        param.requires_grad_(name in trained)
    return copy_


#: How a dataset is handed to ``analyze``, for messages about one that is not.
DATASET_FORMS = (
    "a dataset of examples (a torch Dataset, a datasets.Dataset, or a list of per-example "
    "items), indexed by example"
)


def check_datasets(run: Run | RunView, train: Mapping[str, Dataset]) -> None:
    """Every recorded stage has a dataset of the recorded size and examples.

    Every stage is checked before raising, so that one error names every stage whose dataset
    is not the one trained on.
    """
    names = [s.name for s in run.stages]
    if not isinstance(train, Mapping):
        raise AnalysisError(
            f"train is a {type(train).__name__}; it maps each stage's name to its training set: "
            f"train={{{', '.join(repr(n) + ': ...' for n in names)}}}."
        )
    unknown = sorted(set(train) - set(names))
    if unknown:
        raise AnalysisError(f"train names stage(s) {unknown} not in the record; recorded: {names}")
    missing = [n for n in names if n not in train]
    if missing:
        raise AnalysisError(
            f"train has no dataset for stage(s) {missing}; every stage's data is needed for its "
            f"curvature. Pass train={{{', '.join(repr(n) + ': ...' for n in names)}}}."
        )
    problems = []
    for stage in run.stages:
        try:
            check_dataset(stage, train[stage.name], run.example_digests(stage.index))
        except AnalysisError as exc:
            problems.append(exc)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise AnalysisError(
            f"{len(problems)} stages' datasets are not the ones trained on:\n"
            + "\n".join(f"- {problem}" for problem in problems)
        )


def partial_draws(run: Run | RunView) -> list[str]:
    """The stages that drew fewer examples than their datasets hold, each said in a sentence.

    SOURCE scores every example of a stage's dataset as if the stage's batches were drawn from
    all of it. A stage stopped within its first epoch (``max_steps``), or whose epochs each
    drew part of the data (``limit_train_batches``, a sampler over a subset), trained on some
    examples only, and the record does not say which: the others get scores they should not
    have. A stage's draws are the ``examples`` column of its steps; what ``drop_last`` leaves
    out of an epoch (less than one batch) does not count as a shortfall.
    """
    steps = run.steps()
    found = []
    for stage in run.stages:
        size = stage.num_examples
        rows = steps[STEP_STAGE] == stage.index
        examples, epochs = steps[STEP_EXAMPLES][rows], steps[STEP_EPOCH][rows]
        if not size or not len(examples) or (examples < 0).any():  # unknown counts
            continue
        slack = int(examples.max())
        drawn = [int(examples[epochs == e].sum()) for e in np.unique(epochs)]
        if sum(drawn) + slack <= size:
            shortfall = (
                f"drew {sum(drawn)} examples in its {len(examples)} optimizer steps, fewer than "
                f"the {size} of its dataset (max_steps?)"
            )
        elif any(d + slack <= size for d in drawn[:-1]):
            low, high = min(drawn[:-1]), max(drawn)
            per_epoch = f"{low}" if low == high else f"{low} to {high}"
            shortfall = (
                f"drew {per_epoch} examples per epoch, fewer than the {size} of its dataset "
                "(limit_train_batches, or a sampler over part of it?)"
            )
        else:
            continue
        found.append(
            f"stage {stage.name!r} {shortfall}. The record does not say which examples were "
            "trained on, and SOURCE scores every example of the dataset as if drawn from all "
            "of it: examples never trained on get scores too. To attribute such a stage, "
            "record it with the examples it trains on as its dataset (a Subset)."
        )
    return found


def unknown_scales(run: Run | RunView) -> list[str]:
    """The stages with steps scaled by a factor the record does not hold, each in a sentence.

    A step's ``scale`` is NaN where the framework changed its gradient by a factor the callback
    could not measure (clipping by value; the Trainer's clipping after other changes to the
    gradients). The analysis takes such a step as unscaled; it moved less.
    """
    steps = run.steps()
    scales = steps.get(STEP_SCALE)
    found = []
    for stage in run.stages if scales is not None else []:
        rows = scales[steps[STEP_STAGE] == stage.index]
        unknown = int(np.isnan(rows).sum())
        if unknown:
            found.append(
                f"stage {stage.name!r}: {unknown} of its {len(rows)} optimizer steps were "
                "scaled by a factor the record does not hold (gradient clipping by value, or "
                "the Trainer's clipping after other changes to the gradients): they are taken "
                "as unscaled, though they moved less, so the stage's scores and effect come "
                "out larger ('Gradient clipping' in docs/limitations.md)."
            )
    return found


def check_dataset(stage: Stage, dataset: Dataset, digests: np.ndarray | None = None) -> None:
    """The dataset is the one recorded for ``stage``: its size, and its examples' digests.

    With ``digests`` (where the record has them) every example is compared; otherwise the
    fingerprint of a sample of items.
    """
    if isinstance(dataset, Mapping):
        raise AnalysisError(
            f"the dataset for stage {stage.name!r} is a mapping with keys {sorted(dataset)[:8]} "
            f"(a tokenizer's output?); pass {DATASET_FORMS}."
        )
    if stage.num_examples is None:
        raise AnalysisError(
            f"stage {stage.name!r} was recorded from a dataset without a length (an iterable "
            "dataset), so its size N_s is unknown and its scores cannot be normalised. Train "
            "with a map-style dataset to attribute this stage."
        )
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise AnalysisError(
            f"the dataset for stage {stage.name!r} has no length; pass a map-style dataset."
        ) from exc
    if stage.num_examples is not None and size != stage.num_examples:
        raise AnalysisError(
            f"the dataset for stage {stage.name!r} has {size} examples but the stage was "
            f"trained on {stage.num_examples}. Pass the stage's training set, in its order."
        )
    if digests is not None:
        _check_examples(stage, dataset, digests)
    elif stage.fingerprint is not None and dataset_fingerprint(dataset) != stage.fingerprint:
        raise AnalysisError(
            f"the dataset for stage {stage.name!r} has the recorded size but not the recorded "
            "fingerprint of a sample of its items: its items differ from the ones trained on "
            "(other data, order, or preprocessing). Pass the exact training set of the stage."
        )


def _check_examples(stage: Stage, dataset: Dataset, recorded: np.ndarray) -> None:
    """Every example of ``dataset`` has the digest recorded for it."""
    try:
        found = example_digests(dataset)
    except UnstableItemsError as exc:
        raise AnalysisError(
            f"the dataset for stage {stage.name!r} gives different items for the same index "
            f"({exc}; random transforms?), but the stage was trained on fixed items. Pass the "
            "stage's training set without random transforms."
        ) from exc
    differ = np.flatnonzero(found != recorded) if found is not None else np.array([0])
    if len(differ):
        raise AnalysisError(
            f"the dataset for stage {stage.name!r} differs from the one trained on: "
            f"{len(differ)} of its {len(recorded)} examples "
            f"{'differs' if len(differ) == 1 else 'differ'} from the recorded ones, the first at "
            f"index {differ[0]} (other labels, data, order or preprocessing, or items of "
            "another type: lists of numbers are not tensors, as a datasets.Dataset gives them "
            "before and after with_format('torch')). Pass the exact training set of the stage, "
            "in its order and form."
        )


def check_queries(queries: Dataset) -> None:
    """``queries`` is a non-empty dataset of examples."""
    if isinstance(queries, Mapping):
        raise AnalysisError(
            f"queries is a mapping with keys {sorted(queries)[:8]} (a tokenizer's output?); "
            f"pass {DATASET_FORMS}."
        )
    if isinstance(queries, tuple) and all(isinstance(t, torch.Tensor) for t in queries):
        raise AnalysisError(
            f"queries is a tuple of {len(queries)} tensors, not a dataset of examples: pass "
            "TensorDataset(*queries) (one example per row)."
        )
    try:
        count = len(queries)  # type: ignore[arg-type]
    except TypeError as exc:
        raise AnalysisError(f"queries has no length; pass {DATASET_FORMS}.") from exc
    if not count:
        raise AnalysisError("queries is empty: there is nothing to attribute.")


#: Examples of each dataset :func:`check_first_batch` runs through the model and task.
FIRST_BATCH = 2


def stage_keys(given: Mapping[str, Any], names: Sequence[str]) -> str | None:
    """What is wrong with a mapping meant to name every recorded stage (``names``).

    Said as "names stage(s) [...] not in the record and lacks [...]"; ``None`` where nothing is.
    """
    unknown = [k for k in given if k not in names]
    missing = [n for n in names if n not in given]
    wrong = [f"names stage(s) {unknown} not in the record"] if unknown else []
    wrong += [f"lacks {missing}"] if missing else []
    return " and ".join(wrong) or None


#: What collates a list of examples into a batch (``None``: torch's ``default_collate``).
Collate = Callable[[list[Any]], Any] | None


@dataclass(frozen=True)
class Collation:
    """Which function collates each stage's training examples, and the queries.

    Attributes
    ----------
    stages
        Per stage name, its training examples' collate function.
    queries
        The queries' (the last stage's: the queries measure the model it ended with).
    """

    stages: Mapping[str, Collate]
    queries: Collate

    @classmethod
    def of(cls, collate_fn: Any, stage_names: Sequence[str]) -> Collation:
        """Check ``collate_fn`` (one function, or a mapping from every stage's name to one)."""
        if collate_fn is None or (callable(collate_fn) and not isinstance(collate_fn, Mapping)):
            return cls(dict.fromkeys(stage_names, collate_fn), collate_fn)
        if not isinstance(collate_fn, Mapping):
            raise TypeError(
                "collate_fn must be a function that collates a list of examples into a batch, "
                f"or a mapping from each stage's name to one; got {type(collate_fn).__name__}"
            )
        wrong = stage_keys(collate_fn, stage_names)
        if wrong:
            raise ValueError(
                f"collate_fn {wrong}: a mapping gives every recorded stage "
                f"({list(stage_names)}) its collate function (None for torch's default_collate)"
            )
        wrong = [k for k, f in collate_fn.items() if f is not None and not callable(f)]
        if wrong:
            raise TypeError(f"collate_fn of stage(s) {wrong} is not a function")
        return cls(dict(collate_fn), collate_fn[stage_names[-1]])

    def stage(self, name: str) -> Collate:
        """The function that collates stage ``name``'s examples (one given for all: that)."""
        return self.stages.get(name, self.queries)

    def pooled(self, method: str) -> Collate:
        """The one function for all stages' examples in one pass (``method``'s), if one is."""
        functions = [*self.stages.values(), self.queries]
        if any(f is not functions[0] for f in functions):
            raise AnalysisError(
                f"method={method!r} pools every stage's examples into one pass, whose batches "
                "may hold examples of two stages, so it needs one collate_fn for all of them; "
                "this one gives the stages different function objects. Give one function that "
                "collates every stage's examples (the same object for each stage, or alone), "
                "or use method='source'."
            )
        return functions[0]


def check_first_batch(
    fn: Callable[[nn.Module, Any], torch.Tensor],
    model: nn.Module,
    dataset: Dataset,
    collate_fn: Any,
    what: str,
) -> None:
    """``fn`` (a task's method) gives one value per example of ``dataset``'s first batch.

    Run before any pass over the data, so that a wrong task, collate function or dataset
    fails at once with a message, not deep inside the first pass (or after the curvature).

    Parameters
    ----------
    fn
        ``task.loss`` or ``task.measurement``.
    model
        The model it runs (the analysis's copy; its weights do not matter here).
    dataset, collate_fn
        The data, and what collates its examples into a batch (default: ``default_collate``).
    what
        The data and the method in messages: ``"the training set of stage 'sft', task.loss"``.

    Raises
    ------
    AnalysisError
        The examples cannot be collated, the model or task fails on the batch, or the values
        are not ``[B]``: the message names the data, the batch's form and the error.
    """
    count = min(FIRST_BATCH, len(dataset))  # type: ignore[arg-type]
    advice = (
        "Check that its examples have the form of the training data, that collate_fn is the "
        "one the run trained with (a Hugging Face Trainer's data_collator), and that the task "
        "is the training objective's."
    )
    try:
        batch = (collate_fn or default_collate)([dataset[i] for i in range(count)])
    except Exception as exc:
        raise AnalysisError(
            f"{what}: the first {count} examples cannot be collated into a batch "
            f"({type(exc).__name__}: {exc}). {advice}"
        ) from exc
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), preserved_rng():
            values = fn(model, to_device(batch, device))
    except Exception as exc:
        raise AnalysisError(
            f"{what}: it fails on a batch of the first {count} examples, {describe_batch(batch)} "
            f"({type(exc).__name__}: {exc}). {advice}"
        ) from exc
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != (count,):
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise AnalysisError(
            f"{what}: it returned {got} for a batch of {count} examples; a task's methods "
            "return one value per example, shape [B]."
        )


def batches(
    dataset: Dataset,
    batch_size: int,
    collate_fn: Any = None,
    blocks: Sequence[tuple[int, int]] | None = None,
) -> DataLoader:
    """Deterministic batches over ``dataset`` in its own order.

    With ``blocks`` (``(start, stop)`` ranges of indices), only those examples, each block cut
    into batches of its own so that no batch spans two blocks.
    """
    if blocks is None:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    sampler = [
        list(range(first, min(first + batch_size, stop)))
        for start, stop in blocks
        for first in range(start, stop, batch_size)
    ]
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def on_device(loader: DataLoader, device: torch.device) -> Iterator[Any]:
    """Iterate ``loader`` with every batch moved to ``device``."""
    for batch in loader:
        yield to_device(batch, device)


def evaluate(
    fn: Callable[[nn.Module, Any], torch.Tensor], model: nn.Module, batches: Iterable[Any]
) -> torch.Tensor:
    """``fn(model, batch)`` of every batch, concatenated along the first axis, without grad."""
    with torch.no_grad():
        return torch.cat([fn(model, batch) for batch in batches])


def checkpoint_state(checkpoint: Checkpoint | CheckpointView) -> dict[str, torch.Tensor]:
    """A checkpoint's parameters and buffers as a state dict; refuse non-finite values."""
    state = {**checkpoint.params(), **checkpoint.buffers()}
    bad = [n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise AnalysisError(
            f"checkpoint {checkpoint.key} holds NaN or infinite values in {bad[:5]}: the run "
            "diverged there, and no attribution through it means anything. Fix the training "
            "(e.g. a lower learning rate, gradient clipping) and record it again."
        )
    return state


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean of floating-point entries (Fast-SOURCE); other entries from the last state."""
    out = dict(states[-1])
    for name, tensor in out.items():
        if tensor.is_floating_point():
            out[name] = torch.stack([s[name].double() for s in states]).mean(0).to(tensor.dtype)
    return out
