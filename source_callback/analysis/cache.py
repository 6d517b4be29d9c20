"""The projected-gradient cache of an analysis: what scoring new queries needs, without data.

In a cache version of ``analyses/<name>/`` (:mod:`source_callback.store.analyses`) an analysis
keeps its segment operators (to sweep new query gradients back, SOURCE-math §3), the
description of its :class:`~source_callback.analysis.projection.KroneckerProjection`, a
configuration to check a later analysis against, and per segment the projected training
gradients ``[N_s, D]``. The gradients are stored as **float32** (half the size of float64; the
projection's own error is far larger than float32 rounding); scores are accumulated in float64.

Operators are stored without pickle: their structure (dataclasses of a fixed list, dicts, lists,
floats, ``None``) as a JSON attribute in which every tensor is replaced by the name of an array
written with the store's tensor encoding, so dtypes and values come back exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from source_callback.analysis.ekfac import ModuleCurvature
from source_callback.analysis.engine import Engine, StateSource
from source_callback.analysis.gradients import ModuleTensors
from source_callback.analysis.projection import KroneckerProjection
from source_callback.analysis.scores import ScoreSink
from source_callback.analysis.source import DiagonalExpOperator, EkfacOperator, SegmentOperator
from source_callback.errors import StoreError
from source_callback.store import integrity, location, schema
from source_callback.store.analyses import (
    commit_cache,
    create_cache,
    create_cache_array,
    open_cache,
    reopen_cache,
)
from source_callback.store.reader import read_tensors
from source_callback.store.writer import write_tensors

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The dataclasses an operator attribute may name: nothing else is ever constructed on reading.
SERIALIZABLE: dict[str, type] = {
    cls.__name__: cls for cls in (EkfacOperator, DiagonalExpOperator, ModuleCurvature)
}

# -- operators ---------------------------------------------------------------------------------


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON form of ``value``; its tensors are added to ``tensors`` under their array names."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        key = schema.cache_tensor_key(len(tensors))
        # eigh and qr return column-major matrices, and BLAS rounding depends on the operands'
        # layout: a permuted tensor is stored contiguous with its permutation, so that the
        # operator read back computes bit-identical products.
        order = sorted(range(tensor.ndim), key=lambda d: -tensor.stride(d))
        dense = tensor.permute(order)
        if order != list(range(tensor.ndim)) and dense.is_contiguous():
            tensors[key] = dense
            return {schema.SPEC_TENSOR: [key, order]}
        tensors[key] = tensor
        return {schema.SPEC_TENSOR: key}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if SERIALIZABLE.get(name) is not type(value):
            raise TypeError(f"cannot store a {type(value).__qualname__} in an operator")
        fields = {
            f.name: _encode(getattr(value, f.name), tensors) for f in dataclasses.fields(value)
        }
        return {schema.SPEC_DATACLASS: {schema.SPEC_TYPE: name, schema.SPEC_FIELDS: fields}}
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("only dicts with string keys can be stored in an operator")
        return {schema.SPEC_DICT: [[key, _encode(item, tensors)] for key, item in value.items()]}
    if isinstance(value, list | tuple):
        return {schema.SPEC_LIST: [_encode(item, tensors) for item in value]}
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        # repr (what JSON writes) round-trips a finite float exactly; JSON has no NaN or inf.
        return float(value) if math.isfinite(value) else {schema.SPEC_FLOAT: repr(float(value))}
    raise TypeError(f"cannot store a {type(value).__qualname__} in an operator")


def _decode(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_encode`."""
    if not isinstance(node, dict):
        return node
    if len(node) != 1:
        raise StoreError(f"malformed operator attribute node with keys {sorted(node)}")
    ((tag, body),) = node.items()
    if tag == schema.SPEC_TENSOR:
        if isinstance(body, str):
            return tensors[body]
        key, order = body
        return tensors[key].permute(sorted(range(len(order)), key=order.__getitem__))
    if tag == schema.SPEC_DATACLASS:
        cls = SERIALIZABLE.get(body[schema.SPEC_TYPE])
        if cls is None:
            raise StoreError(f"unknown operator type {body[schema.SPEC_TYPE]!r} in the store")
        fields = body[schema.SPEC_FIELDS]
        return cls(**{key: _decode(item, tensors) for key, item in fields.items()})
    if tag == schema.SPEC_DICT:
        return {key: _decode(item, tensors) for key, item in body}
    if tag == schema.SPEC_LIST:
        return [_decode(item, tensors) for item in body]
    if tag == schema.SPEC_FLOAT:
        return float(body)
    raise StoreError(f"unknown operator attribute tag {tag!r}")


def write_operators(group: zarr.Group, operators: Sequence[SegmentOperator]) -> None:
    """Write segment operators into ``group``, one subgroup per segment in order.

    Each operator (an :class:`EkfacOperator` or :class:`DiagonalExpOperator`) is stored as its
    JSON structure plus its tensors on the CPU, dtypes unchanged.
    """
    for index, operator in enumerate(operators):
        tensors: dict[str, torch.Tensor] = {}
        spec = _encode(operator, tensors)
        sub = group.create_group(
            schema.segment_key(index), overwrite=True, attributes={schema.ATTR_OPERATOR: spec}
        )
        write_tensors(sub, tensors)


def read_operators(
    group: zarr.Group, device: torch.device | str | None = None
) -> list[SegmentOperator]:
    """The operators written by :func:`write_operators`, in segment order, tensors on ``device``."""
    keys = sorted(group.group_keys())
    expected = [schema.segment_key(i) for i in range(len(keys))]
    if keys != expected:
        raise StoreError(f"cached operators {keys} in {group.path} are not segments 0..n-1")
    operators = []
    for key in keys:
        sub = group[key]
        tensors = {name: t.to(device) for name, t in _read(sub.path, read_tensors, sub).items()}
        operators.append(_decode(sub.attrs[schema.ATTR_OPERATOR], tensors))
    return operators


def _read(path: str, read: Callable[..., T], *args: Any) -> T:
    """``read(*args)``, a chunk that cannot be decoded raised as damage to the cache at ``path``."""
    try:
        return read(*args)
    except ValueError as error:
        raise StoreError(
            f"the cache at {path} cannot be read ({error}): it is damaged. Delete the "
            "analysis's cache group to have analyze() rebuild it, or analyze under another name."
        ) from error


# -- the cache group ---------------------------------------------------------------------------


def cache_info(config: Mapping[str, Any], projection: Mapping[str, Any]) -> dict[str, Any]:
    """The ``cache`` attribute: a JSON-normalised ``config`` and the projection's description.

    Normalised (tuples become lists) so that it compares equal to what is read back.
    """
    info = {schema.CACHE_INFO_CONFIG: config, schema.CACHE_INFO_PROJECTION: projection}
    return json.loads(json.dumps(info))


def cache_differences(
    group: zarr.Group | None, config: Mapping[str, Any], projection: Mapping[str, Any]
) -> list[str]:
    """Why a stored cache cannot serve an analysis with ``config`` and ``projection``.

    Empty when it can: it exists, was committed, and its configuration and projection equal the
    given ones (after JSON normalisation).
    """
    if group is None:
        return ["no cache is stored"]
    if not group.attrs.get(schema.ATTR_COMMITTED, False):
        return ["the stored cache was never committed (its writing was interrupted)"]
    stored = group.attrs.get(schema.ATTR_CACHE, {})
    wanted = cache_info(config, projection)
    problems = []
    old, new = stored.get(schema.CACHE_INFO_CONFIG, {}), wanted[schema.CACHE_INFO_CONFIG]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            problems.append(f"{key}: stored {old.get(key)!r}, wanted {new.get(key)!r}")
    projection = schema.CACHE_INFO_PROJECTION
    if stored.get(projection) != wanted[projection]:
        problems.append(
            f"projection: stored {stored.get(projection)!r}, wanted {wanted[projection]!r}"
        )
    return problems


def stored_projection(group: zarr.Group) -> dict[str, Any]:
    """A cache group's projection description (``KroneckerProjection.from_description``)."""
    return dict(group.attrs[schema.ATTR_CACHE][schema.CACHE_INFO_PROJECTION])


def create_gradients(group: zarr.Group, segment: int, rows: int, width: int) -> zarr.Array:
    """The empty ``[rows, width]`` gradient array of ``segment`` in a cache group."""
    return create_cache_array(
        group[schema.CACHE_GRADIENTS], schema.segment_key(segment), rows, width
    )


def gradients(group: zarr.Group, segment: int) -> zarr.Array:
    """The gradient array of ``segment`` in a cache group (a truncated chunk fails its read)."""
    array = group[schema.CACHE_GRADIENTS][schema.segment_key(segment)]
    return zarr.Array(integrity.checked(array.async_array))


def read_rows(array: zarr.Array, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a gradient array, ``[stop - start, D]`` float32.

    Raises
    ------
    StoreError
        Some of the rows were never written (NaN, the fill value).
    """
    values = np.asarray(_read(array.path, array.__getitem__, slice(start, stop)))
    if np.isnan(values).any():
        raise StoreError(
            f"cached gradients {array.path} rows {start}:{stop} hold NaN: they were never "
            "written (an interrupted cache) or the gradients overflowed."
        )
    return values


def add_cached_scores(
    array: zarr.Array,
    projected: torch.Tensor,
    blocks: Sequence[tuple[int, int]],
    sink: ScoreSink,
    stage: int,
    weight: float,
) -> None:
    """Add ``weight·⟨projected[q], row_m⟩`` for the rows of ``blocks`` of a gradient array.

    ``projected`` is ``[Q, D]`` (``KroneckerProjection.project`` of the query-side vectors);
    the products run on its device in float64, one row block at a time.
    """
    queries = projected.double()
    for start, stop in blocks:
        rows = torch.from_numpy(read_rows(array, start, stop)).to(queries.device, torch.float64)
        sink.add(stage, start, ((queries @ rows.T) * weight).cpu().numpy())


@dataclass
class GradientCache:
    """An analysis's cache as ``analyze`` uses it: reuse it when it matches, else build it.

    Parameters
    ----------
    url, storage_options, name
        The store and the analysis the cache belongs to.
    config
        Every setting that shapes the operators or the cached gradients.
    projection
        The projection of the training gradients and query-side vectors.
    """

    url: str
    storage_options: location.StorageOptions
    name: str
    config: dict[str, Any]
    projection: KroneckerProjection
    group: zarr.Group | None = None

    def stored_operators(self, work: Engine) -> list[SegmentOperator] | None:
        """The stored segment operators if the stored cache matches; ``None`` to rebuild."""

        def look() -> list[SegmentOperator] | None:
            group = open_cache(self.url, self.storage_options, self.name)
            problems = cache_differences(group, self.config, self.projection.describe())
            if problems:
                if group is not None:
                    log.info("rebuilding the cache of %r: %s", self.name, "; ".join(problems))
                return None
            self.group = group
            return read_operators(group[schema.CACHE_OPERATORS], work.device)  # type: ignore[index]

        operators = work.workers.run(look)
        work.workers.barrier()  # every rank has looked before rank 0 may replace the cache
        return operators

    def build(
        self,
        work: Engine,
        datasets: Sequence[Dataset],
        operators: Sequence[SegmentOperator],
        states: Sequence[list[StateSource]],
    ) -> None:
        """Write the operators and every segment's projected training gradients, then commit.

        ``datasets[ℓ]`` and ``states[ℓ]`` are segment ℓ's training set and states. Rank 0
        creates the arrays; every rank fills its own blocks of rows.
        """
        workers = work.workers

        def create() -> None:
            if workers.rank == 0:
                info = cache_info(self.config, self.projection.describe())
                group = create_cache(self.url, self.storage_options, self.name, info)
                write_operators(group[schema.CACHE_OPERATORS], operators)
                for number, dataset in enumerate(datasets):
                    create_gradients(group, number, len(dataset), self.projection.dim)  # type: ignore[arg-type]

        workers.run(create)  # every rank's run ends together: the arrays exist after it
        self.group = workers.run(lambda: reopen_cache(self.url, self.storage_options, self.name))
        for number, (dataset, segment_states) in enumerate(zip(datasets, states, strict=True)):
            array = gradients(self.group, number)  # type: ignore[arg-type]
            label = f"segment {number + 1}/{len(datasets)}"
            scale = _balance(operators[number])
            work.cache_gradients(dataset, segment_states, self.projection, array, label, scale)
        workers.barrier()
        if workers.rank == 0:
            commit_cache(self.group)  # type: ignore[arg-type]

    def score(
        self,
        work: Engine,
        operators: Sequence[SegmentOperator],
        responses: Sequence[ModuleTensors],
        stages: Sequence[int],
        weights: Sequence[float],
        sink: ScoreSink,
    ) -> None:
        """Add each segment's scores from its cached gradients: ``weight·⟨P(v_ℓ/s), P(s∘g_m)⟩``.

        ``s`` is the segment's balance (:func:`_balance`), the same as when the gradients
        were cached.
        """
        for number, (response, stage, weight) in enumerate(
            zip(responses, stages, weights, strict=True)
        ):
            array = gradients(self.group, number)  # type: ignore[arg-type]
            blocks = work.workers.blocks(array.shape[0], schema.SCORE_CHUNK[1])
            scale = _balance(operators[number])
            projected = self.projection.project(
                {n: v / scale[n] if n in scale else v for n, v in response.items()}
            )
            work.workers.run(
                lambda: add_cached_scores(array, projected, blocks, sink, stage, weight)  # noqa: B023
            )


def _balance(operator: SegmentOperator) -> dict[str, torch.Tensor]:
    """Per module, ``s`` such that scores are taken as ``⟨P(v / s), P(s ∘ g)⟩``: ``P^{1/2}``.

    The score ``⟨v, g⟩`` does not depend on ``s``, but a random projection's error grows with
    ``‖v‖·‖g‖``. Under Adam ``v = P^{1/2} φ(H') P^{1/2} u`` carries the whole preconditioner,
    which concentrates it on a few coordinates (measured: a projection of ``v`` and ``g`` was no
    better than chance); splitting it as ``P^{1/2}`` on each side balances the two. Other
    operators keep ``s = 1``.
    """
    sqrt_p = getattr(operator, "sqrt_p", None)
    return dict(sqrt_p) if sqrt_p else {}
