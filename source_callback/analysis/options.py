"""``AnalysisOptions``: every setting of an analysis's computation, documented and validated.

One spelling for :func:`~source_callback.analyze`'s keyword arguments, the ``analyze``
configuration file of the command line and the JSON of a stored analysis: the field names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from source_callback.analysis.optimizers import AdamVariant
from source_callback.analysis.segments import SegmentSpec
from source_callback.analysis.units import ModuleSelection, SelectionSpec
from source_callback.optim import UpdateRule

Method = Literal["source", "fast-source", "if", "tracin"]
Fisher = Literal["sampled", "exact"]
METHODS, FISHERS, ADAM_VARIANTS = get_args(Method), get_args(Fisher), get_args(AdamVariant)
CACHES = (None, "projected")
#: The update rules ``optimizer_model`` may name.
RULES = tuple(rule.value for rule in UpdateRule if rule is not UpdateRule.UNKNOWN)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _typed(name: str, value: Any, kind: type | tuple[type, ...], label: str) -> None:
    """Raise ``TypeError`` unless ``value`` is a ``kind`` (a bool is no number here)."""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise TypeError(f"{name} must be {label}, got {value!r} ({type(value).__name__})")


def _check_segments(segments: Any) -> SegmentSpec:
    """``segments`` validated: a count, or per stage name a count or a list of steps."""
    label = "a positive int, or a mapping {stage name: count or list of steps}"
    if isinstance(segments, Mapping):
        checked: dict[str, int | tuple[int, ...]] = {}
        for stage, spec in segments.items():
            _typed("segments' stage names", stage, str, "text")
            if isinstance(spec, Sequence) and not isinstance(spec, str):
                for step in spec:
                    _typed(f"segments[{stage!r}]'s steps", step, int, "ints")
                checked[stage] = tuple(spec)
            else:
                _typed(f"segments[{stage!r}]", spec, int, "a positive int or a list of steps")
                _require(spec >= 1, f"segments[{stage!r}] must be >= 1, got {spec}")
                checked[stage] = spec
        return checked
    _typed("segments", segments, int, label)
    _require(segments >= 1, f"segments must be >= 1, got {segments}")
    return segments


def _check_curvature_examples(examples: Any, method: str) -> None:
    """``curvature_examples`` is a count >= 1 or a fraction in (0, 1], for a fitted curvature."""
    _typed(
        "curvature_examples",
        examples,
        (int, float),
        "an int (a count), a float (a fraction) or None",
    )
    if isinstance(examples, float):
        _require(
            0 < examples <= 1,
            f"curvature_examples as a fraction (a float) must be in (0, 1], got {examples}",
        )
    else:
        _require(examples >= 1, f"curvature_examples as a count must be >= 1, got {examples}")
    _require(method != "tracin", "curvature_examples does not serve method 'tracin' (no curvature)")


@dataclass(frozen=True)
class AnalysisOptions:
    """The settings of an analysis's computation (:func:`~source_callback.analyze`).

    Where the record, model and data come from, and where the analysis runs (devices, Fabric)
    and is stored (``name``), are arguments of :func:`~source_callback.analyze` instead. The
    same names are the keys of the command line's configuration file and of
    :meth:`to_json`. Every field is checked on construction.

    Parameters
    ----------
    method
        ``"source"`` (EK-FAC and gradients at every checkpoint of a segment, averaged),
        ``"fast-source"`` (once, at the segment's average parameters), ``"if"`` (EK-FAC
        influence at the final parameters, damped) or ``"tracin"`` (TracInCP over the
        segments' checkpoints, weighted by their learning-rate mass).
    segments
        Segments per stage, or per stage name a count or the global steps where segments start
        (a stage the mapping does not name gets one segment).
    batch_size
        Examples per batch in every pass over data.
    optimizer_model
        Update rule to assume instead of the recorded one (needed for unknown optimizers):
        ``"sgd"``, ``"sgd-momentum"``, ``"adam"`` or ``"adamw"``; kept as an
        :class:`~source_callback.optim.UpdateRule`.
    momentum_tail
        Cut each gradient's momentum tail at its stage's end (SOURCE-math §4).
    fisher
        ``"sampled"`` pseudo-labels (one per example and pass), or ``"exact"`` Gauss-Newton
        Hessian blocks (one backward pass per output: small outputs only).
    seed
        Seed of the pseudo-label sampling, and of the examples ``curvature_examples`` draws.
    adam_variant
        How Adam's preconditioner enters (SOURCE-math §4): ``"preconditioned"`` (EK-FAC of
        ``P^{1/2} H P^{1/2}``, exact for a constant P), ``"factored"`` (the default: the same
        with each unit's ``P^{1/2}`` replaced by its best rank-one approximation, so the Adam
        passes cost what SGD's do; as accurate in the tests and the LDS benchmark) or
        ``"diagonal"`` (the paper's App. D.2).
    damping
        Damping of inverse curvatures, relative to each module's mean eigenvalue: the
        ``"diagonal"`` Adam variant's, and influence functions' (``method="if"``).
    preconditioner_floor
        Adam/AdamW: each parameter's √v̂ is floored at this fraction of its median, bounding
        the amplification of coordinates that never received gradient (see
        :func:`source_callback.analysis.optimizers.adam_preconditioner`).
    out_of_core
        Add the scores up in the store, one block of training examples at a time, instead of
        in memory; the returned scores are then Zarr arrays read where sliced (as from
        :func:`~source_callback.load_analysis`). Memory no longer grows with the number of
        training examples. Needs a ``name``; a later analysis of the same name replaces what
        those arrays read.
    cache
        ``"projected"``: keep what scoring needs besides the queries under
        ``analyses/<name>/`` — the segment operators and every training example's gradient,
        averaged over its segment's checkpoints and compressed by a per-module Kronecker random
        projection (float32) — and score from it. A later call with the same settings and any
        queries reuses it and makes no pass over the training data. Needs a ``name``;
        ``method`` ``"source"`` or ``"fast-source"``.
    projection_dim
        With ``cache="projected"``: each module's ``[out, in]`` gradient is projected to
        ``[min(k, out), min(k, in)]`` with ``k = projection_dim`` (exact where ``k`` covers a
        side). Larger is more accurate and takes more disk; Adam stages need a larger ``k``
        than SGD ones for the same accuracy (see the benchmarks).
    modules
        The units to attribute through (a unit: a module's parameters with their own
        curvature; a parameter tied between modules is one unit named ``"a+b"``): a
        :class:`~source_callback.ModuleSelection`, a list of ``fnmatch`` include patterns, or
        ``{"include": [...], "exclude": [...]}``; all by default. Kept as a
        :class:`~source_callback.ModuleSelection`.
    diagonal_above
        Sides of a unit's gradient matrix longer than this (e.g. a 50,000-token output layer)
        get an identity eigenbasis instead of a dense ``[n, n]`` factor; ``None``: only
        embeddings' token sides and units of norm weights and standalone biases are diagonal.
    curvature_examples
        Fit each curvature (covariance factors and corrected eigenvalues) on a seeded random
        subset of its data: at most this many examples (an int, as kronfluence's
        ``covariance_max_examples``), or this fraction of them (a float in (0, 1], rounded to
        the nearest count, at least 1); ``None``: all. Per stage for ``"source"`` and
        ``"fast-source"``, of the pooled stages for ``"if"``; every example is still scored.
        The subset depends on ``seed`` and the data's size only, not on the processes
        (:func:`~source_callback.analysis.engine.curvature_subset`). It trades accuracy for
        the time of the curvature passes (see the docs' accuracy section).

    Raises
    ------
    TypeError
        A field has the wrong type (e.g. ``batch_size="16"``).
    ValueError
        A field's value is out of range or not one of its choices, or ``cache`` is asked for a
        method it does not serve.

    Examples
    --------
    >>> options = AnalysisOptions(method="fast-source", segments={"sft": 2}, batch_size=16)
    >>> AnalysisOptions.from_json(options.to_json()) == options
    True
    """

    method: Method = "source"
    segments: SegmentSpec = 3
    batch_size: int = 64
    optimizer_model: UpdateRule | str | None = None
    momentum_tail: bool = True
    fisher: Fisher = "sampled"
    seed: int = 0
    adam_variant: AdamVariant = "factored"
    damping: float = 0.1
    preconditioner_floor: float = 0.01
    out_of_core: bool = False
    cache: Literal["projected"] | None = None
    projection_dim: int = 32
    modules: SelectionSpec = None
    diagonal_above: int | None = None
    curvature_examples: int | float | None = None

    def __post_init__(self) -> None:
        _require(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        _require(self.fisher in FISHERS, f"fisher must be one of {FISHERS}, got {self.fisher!r}")
        _require(
            self.adam_variant in ADAM_VARIANTS,
            f"adam_variant must be one of {ADAM_VARIANTS}, got {self.adam_variant!r}",
        )
        _require(self.cache in CACHES, f"cache must be None or 'projected', got {self.cache!r}")
        _require(
            not self.cache or self.method in ("source", "fast-source"),
            f"cache='projected' serves method 'source' or 'fast-source', not {self.method!r}",
        )
        for name in ("momentum_tail", "out_of_core"):
            _typed(name, getattr(self, name), bool, "True or False")
        for name in ("batch_size", "projection_dim", "seed"):
            _typed(name, getattr(self, name), int, "an int")
        for name in ("batch_size", "projection_dim"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("damping", "preconditioner_floor"):
            _typed(name, getattr(self, name), (int, float), "a number")
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        if self.diagonal_above is not None:
            _typed("diagonal_above", self.diagonal_above, int, "an int or None")
            _require(self.diagonal_above >= 1, "diagonal_above must be >= 1 or None")
        if self.curvature_examples is not None:
            _check_curvature_examples(self.curvature_examples, self.method)
        if self.optimizer_model is not None:
            _require(
                self.optimizer_model in RULES,
                f"optimizer_model must be None or one of {RULES}, got {self.optimizer_model!r}",
            )
            object.__setattr__(self, "optimizer_model", UpdateRule(self.optimizer_model))
        object.__setattr__(self, "segments", _check_segments(self.segments))
        object.__setattr__(self, "modules", ModuleSelection.of(self.modules))

    def to_json(self) -> dict[str, Any]:
        """Every field as plain JSON (lists for tuples, text for the update rule).

        Returns
        -------
        dict
            ``{field name: value}``, read back by :meth:`from_json`.
        """
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        segments = data["segments"]
        if isinstance(segments, Mapping):
            data["segments"] = {
                stage: list(spec) if isinstance(spec, tuple) else spec
                for stage, spec in segments.items()
            }
        if data["optimizer_model"] is not None:
            data["optimizer_model"] = data["optimizer_model"].value
        selection: ModuleSelection = data["modules"]
        data["modules"] = {"include": list(selection.include), "exclude": list(selection.exclude)}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AnalysisOptions:
        """Options from a mapping of field names, as :meth:`to_json` or a config file holds.

        Parameters
        ----------
        data
            Some of the fields; the others keep their defaults.

        Returns
        -------
        AnalysisOptions
            The checked options.

        Raises
        ------
        ValueError
            A key is no field, or a value has the wrong type or is out of range.
        """
        known = option_names()
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(
                f"unknown analysis option(s) {', '.join(unknown)}; known: {', '.join(known)}"
            )
        try:
            return cls(**data)
        except TypeError as error:  # a wrong type in a document is a wrong value of it
            raise ValueError(str(error)) from error


def option_names() -> tuple[str, ...]:
    """The names of :class:`AnalysisOptions`' fields, in order."""
    return tuple(f.name for f in fields(AnalysisOptions))
