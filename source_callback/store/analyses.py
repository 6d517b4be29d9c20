"""The analyses stored in a run: ``analyses/<name>/``, its versions and their atomic commit.

An analysis name holds versions of two kinds: results (``results-<token>/``: scores, stage
effects) and the projected-gradient cache (``cache-<token>/``). The name group's ``committed``
attribute points at the committed version of each kind. A new version is written beside the
committed one, uncommitted, and takes the name only when its writer commits it: one write of
the pointer attribute, after which the superseded version is deleted. A crash, an error or an
interrupt at any earlier point leaves the committed version readable as it was; the next writer
of the name deletes what the interrupted one left.

Stores written before versions existed hold results directly in ``analyses/<name>/`` (committed
flag on the group) and the cache in ``analyses/<name>/cache/``; they are read as they are, and
replaced by versions at their name's next commit.

Only one process at a time may write an analysis name (a distributed analysis counts as one:
rank 0 creates and commits, the other ranks write blocks into the version it created).
"""

from __future__ import annotations

import datetime
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from source_callback.errors import StoreError
from source_callback.store import location, schema

RESULTS, CACHE = schema.RESULTS_VERSION, schema.CACHE_VERSION


def _root(url: str, storage_options: location.StorageOptions, mode: str) -> zarr.Group:
    url = location.normalize(url)
    root = location.open_existing(url, storage_options, mode=mode)
    if root is None:
        raise StoreError(f"no store at {url}")
    schema.check_format(root, url)
    return root


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith("__"):
        raise ValueError(f"an analysis name must be a non-empty name without '/', got {name!r}")


def _named(url: str, storage_options: location.StorageOptions, name: str) -> zarr.Group:
    """``analyses/<name>/``, created if needed, opened for writing."""
    _check_name(name)
    return _root(url, storage_options, "r+").require_group(schema.ANALYSES).require_group(name)


def _pointers(group: zarr.Group) -> dict[str, str]:
    return dict(group.attrs.get(schema.ATTR_VERSIONS, {}))


def _legacy(group: zarr.Group, kind: str) -> zarr.Group | None:
    """A version of ``kind`` in the layout before versions (see the module docstring)."""
    if kind == RESULTS:
        return group if group.attrs.get(schema.ATTR_COMMITTED, False) else None
    node = group.get(schema.ANALYSIS_CACHE)
    return node if isinstance(node, zarr.Group) else None


def committed_version(group: zarr.Group, kind: str) -> zarr.Group | None:
    """The committed version of ``kind`` (``RESULTS`` or ``CACHE``) of an analysis name."""
    pointer = _pointers(group).get(kind)
    if pointer is None:
        return _legacy(group, kind)
    node = group.get(pointer)
    return node if isinstance(node, zarr.Group) else None


def _new_version(group: zarr.Group, kind: str, attributes: dict[str, Any]) -> zarr.Group:
    """A new uncommitted version of ``kind``, after deleting what interrupted writers left."""
    committed = _pointers(group).get(kind)
    for key in list(group.group_keys()):
        if key.startswith(f"{kind}-") and key != committed:
            del group[key]
    key = f"{kind}-{secrets.token_hex(6)}"
    return group.create_group(key, attributes={**attributes, schema.ATTR_COMMITTED: False})


def _being_written(group: zarr.Group, kind: str) -> zarr.Group:
    """The one uncommitted version of ``kind`` another process of this analysis created."""
    committed = _pointers(group).get(kind)
    found = [
        sub
        for key, sub in group.groups()
        if key.startswith(f"{kind}-")
        and key != committed
        and not sub.attrs.get(schema.ATTR_COMMITTED, False)
    ]
    if len(found) != 1:
        raise StoreError(
            f"expected one {kind} version of analysis {group.basename!r} being written, found "
            f"{len(found)}; is another process writing this analysis?"
        )
    return found[0]


def _commit(version: zarr.Group, kind: str) -> None:
    """Mark ``version`` committed, point its name at it, then delete what it supersedes."""
    version.attrs[schema.ATTR_COMMITTED] = True
    group = zarr.open_group(store=version.store, path=version.path.rsplit("/", 1)[0], mode="r+")
    group.attrs.update(
        {
            schema.ATTR_VERSIONS: {**_pointers(group), kind: version.basename},
            schema.ATTR_COMMITTED: False,  # the group itself no longer holds (legacy) results
        }
    )
    for key in list(group.keys()):
        if key.startswith(f"{kind}-"):
            stale = key != version.basename
        elif kind == RESULTS:  # legacy results: everything but versions and a legacy cache
            stale = not key.startswith(f"{CACHE}-") and key != schema.ANALYSIS_CACHE
        else:
            stale = key == schema.ANALYSIS_CACHE  # a legacy cache
        if stale:
            del group[key]


# -- results -----------------------------------------------------------------------------------


class AnalysisWriter:
    """A new version of analysis ``name``'s results, written beside the committed one.

    The version is created uncommitted with empty (zero) score arrays, one per stage, which the
    caller fills by blocks of training examples (``writer.scores[stage][:, a:b] = block``, best
    one chunk of ``schema.SCORE_CHUNK`` wide at a time), so that ``[queries, examples]`` never
    has to be in memory; :meth:`commit` adds the other result arrays and makes the version the
    analysis's results. Until then the previous results stay readable. Nothing outside
    ``analyses/<name>/`` is touched, nor the analysis's projected-gradient cache.

    Parameters
    ----------
    url, storage_options
        The store.
    name
        The analysis's name: non-empty, without ``/``, not starting with ``__``.
    shapes
        ``(queries, examples of the stage)`` per stage, in stage order.
    dtype
        Floating dtype of the scores.
    info
        The ``analysis`` attribute: ``{INFO_STAGE_NAMES: [...], INFO_CONFIG: {...}}``.
    """

    def __init__(
        self,
        url: str,
        storage_options: location.StorageOptions,
        name: str,
        shapes: Sequence[tuple[int, int]],
        dtype: np.dtype | type[np.floating],
        info: dict[str, Any],
    ) -> None:
        self.group = _new_version(
            _named(url, storage_options, name), RESULTS, {schema.ATTR_ANALYSIS: info}
        )
        score_group = self.group.create_group(schema.ANALYSIS_SCORES)
        self.scores: list[zarr.Array] = [
            score_group.create_array(
                schema.scores_key(index),
                shape=shape,
                chunks=tuple(
                    min(c, max(s, 1)) for c, s in zip(schema.SCORE_CHUNK, shape, strict=True)
                ),
                dtype=dtype,
                compressors=schema.score_codecs(),
                fill_value=math.nan,  # a chunk never written (or deleted) reads as NaN
            )
            for index, shape in enumerate(shapes)
        ]

    @classmethod
    def reopen(
        cls, url: str, storage_options: location.StorageOptions, name: str
    ) -> AnalysisWriter:
        """The version of analysis ``name`` another process created, to write blocks into."""
        writer = cls.__new__(cls)
        writer.group = _being_written(_named(url, storage_options, name), RESULTS)
        scores = writer.group[schema.ANALYSIS_SCORES]
        writer.scores = [array for _, array in sorted(scores.arrays())]
        return writer

    def commit(self, stage_effects: np.ndarray, last_stage_exact: np.ndarray) -> None:
        """Write the stage effects (``[queries, stages]`` and ``[queries]``) and commit."""
        self.group.create_array(schema.ANALYSIS_EFFECTS, data=stage_effects)
        self.group.create_array(schema.ANALYSIS_LAST_EXACT, data=last_stage_exact)
        info = dict(self.group.attrs[schema.ATTR_ANALYSIS])
        info[schema.INFO_CREATED] = datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        )
        self.group.attrs[schema.ATTR_ANALYSIS] = info
        _commit(self.group, RESULTS)


def write_analysis(
    url: str,
    storage_options: location.StorageOptions,
    name: str,
    scores: Sequence[np.ndarray],
    stage_effects: np.ndarray,
    last_stage_exact: np.ndarray,
    info: dict[str, Any],
) -> None:
    """Write an analysis held in memory (per stage ``[queries, examples]`` scores) and commit.

    See :class:`AnalysisWriter` for the arguments and for writing scores block by block.
    """
    shapes = [values.shape for values in scores]
    writer = AnalysisWriter(url, storage_options, name, shapes, np.result_type(*scores), info)
    for target, values in zip(writer.scores, scores, strict=True):
        target[...] = values
    writer.commit(stage_effects, last_stage_exact)


@dataclass(frozen=True)
class StoredAnalysis:
    """An analysis name in a store, for listings.

    Attributes
    ----------
    name
        The analysis's name.
    committed
        Whether it has committed results (else only an interrupted or running write).
    info
        The committed results' ``analysis`` attribute (``stage_names``, ``config``,
        ``created``); empty without committed results.
    queries
        Number of queries of the committed results.
    writing
        Whether an uncommitted version (a write in progress, or an interrupted one) exists
        (a superseded version an interrupted commit left undeleted does not count).
    cache
        Whether a committed projected-gradient cache exists.
    """

    name: str
    committed: bool
    info: dict[str, Any]
    queries: int
    writing: bool
    cache: bool


def stored_analyses(root: zarr.Group) -> list[StoredAnalysis]:
    """Every analysis name under ``analyses/``, committed or not, in name order."""
    group = root.get(schema.ANALYSES)
    if not isinstance(group, zarr.Group):
        return []
    out = []
    for name, sub in sorted(group.groups()):
        results = committed_version(sub, RESULTS)
        pointers = set(_pointers(sub).values())
        writing = any(
            key.startswith((f"{RESULTS}-", f"{CACHE}-"))
            and key not in pointers
            and not version.attrs.get(schema.ATTR_COMMITTED, False)
            for key, version in sub.groups()
        )
        info = {} if results is None else dict(results.attrs[schema.ATTR_ANALYSIS])
        queries = 0
        if results is not None:
            first = results[schema.ANALYSIS_SCORES].get(schema.scores_key(0))
            queries = 0 if first is None else int(first.shape[0])
        cache = committed_version(sub, CACHE)
        committed_cache = cache is not None and bool(cache.attrs.get(schema.ATTR_COMMITTED))
        out.append(
            StoredAnalysis(name, results is not None, info, queries, writing, committed_cache)
        )
    return out


def read_analysis(
    root: zarr.Group, name: str
) -> tuple[dict[str, Any], list[zarr.Array], dict[str, np.ndarray]] | None:
    """A committed analysis: its info, score arrays (lazy, one per stage) and other arrays."""
    group = root.get(f"{schema.ANALYSES}/{name}")
    results = None if not isinstance(group, zarr.Group) else committed_version(group, RESULTS)
    if results is None:
        return None
    scores = results[schema.ANALYSIS_SCORES]
    arrays = [scores[schema.scores_key(i)] for i in range(len(dict(scores.arrays())))]
    others = {key: array[...] for key, array in results.arrays()}
    return dict(results.attrs[schema.ATTR_ANALYSIS]), arrays, others


# -- the projected-gradient cache --------------------------------------------------------------


def create_cache(
    url: str, storage_options: location.StorageOptions, name: str, info: dict[str, Any]
) -> zarr.Group:
    """A new version of analysis ``name``'s cache, uncommitted, with ``info`` attached.

    ``info`` is the ``cache`` attribute (see ``schema.ATTR_CACHE``). The
    version holds empty ``operators/`` and ``gradients/`` subgroups; :func:`commit_cache` makes
    it the analysis's cache once everything is written. The committed cache, if any, stays
    readable until then.
    """
    group = _new_version(_named(url, storage_options, name), CACHE, {schema.ATTR_CACHE: info})
    group.create_group(schema.CACHE_OPERATORS)
    group.create_group(schema.CACHE_GRADIENTS)
    return group


def reopen_cache(url: str, storage_options: location.StorageOptions, name: str) -> zarr.Group:
    """The cache version of analysis ``name`` another process created, to write blocks into."""
    return _being_written(_named(url, storage_options, name), CACHE)


def open_cache(url: str, storage_options: location.StorageOptions, name: str) -> zarr.Group | None:
    """The committed cache of analysis ``name`` (read-only), or ``None`` when there is none."""
    _check_name(name)
    group = _root(url, storage_options, "r").get(f"{schema.ANALYSES}/{name}")
    return None if not isinstance(group, zarr.Group) else committed_version(group, CACHE)


def create_cache_array(group: zarr.Group, key: str, rows: int, width: int) -> zarr.Array:
    """An empty ``[rows, width]`` float32 array of cached gradients (NaN until written).

    Chunked by :func:`schema.cache_chunks`: whole 4096-row blocks written by different
    processes never share a chunk.
    """
    return group.create_array(
        key,
        shape=(rows, width),
        chunks=schema.cache_chunks(width),
        dtype=schema.CACHE_DTYPE,
        fill_value=math.nan,
        compressors=schema.cache_codecs(),
        overwrite=True,
    )


def commit_cache(group: zarr.Group) -> None:
    """Make a cache version created by :func:`create_cache` the analysis's cache."""
    _commit(group, CACHE)
