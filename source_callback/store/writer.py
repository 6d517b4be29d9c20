"""The store's single writer: creates or validates a store, appends step rows, writes checkpoints.

Everything here runs on the recorder's background thread (or before training starts). Nothing
is modified until validation has passed, and a checkpoint counts only once its ``committed``
attribute is set, with the digests of its tensors, after all of its arrays are written.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr

from source_callback.errors import DamagedStoreError, FormatVersionError, StoreError
from source_callback.store import integrity, location, schema, shards

TensorDict = Mapping[str, torch.Tensor]


@dataclass
class StepRow:
    """One optimizer step as recorded.

    ``groups`` holds one dict of ``schema.STEP_GROUP_FIELDS`` values per parameter group.
    """

    stage: int
    epoch: int
    loss: float | torch.Tensor  # a tensor until the recorder materializes a block
    examples: int
    groups: list[dict[str, float]] = field(default_factory=list)
    scale: float = 1.0  # schema.STEP_SCALE


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shaped a record."""
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("source-callback", "torch", "lightning", "zarr", "numpy", "fsspec"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions


class StoreWriter:
    """Writes one source-callback store. Use :meth:`open` to create or validate one.

    In a sharded run (``shard_group`` set) every rank has a writer, which writes only its own
    shards of each checkpoint (:mod:`source_callback.store.shards`); rank 0's writes the rest
    of the record.
    """

    def __init__(
        self, root: zarr.Group, url: str, shard_group: shards.ShardGroup | None = None
    ) -> None:
        self.root = root
        self.url = url
        self.shard_group = shard_group
        # This writer alone changes the steps and stages groups: their attributes are read
        # from memory.
        self._steps_group = root[schema.STEPS]
        self._stages_group = root[schema.STAGES]
        self._step_arrays: dict[str, zarr.Array] | None = None
        # Rows of the last, partial STEP_ROW_CHUNK block as stored (its digest covers them).
        self._tail: dict[str, np.ndarray] | None = None

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        url: str,
        storage_options: location.StorageOptions = None,
        shard_group: shards.ShardGroup | None = None,
    ) -> StoreWriter:
        """Open the store at ``url`` for writing, creating it when the location is empty.

        ``shard_group``: the ranks of a sharded run (this one is rank 0).

        Raises
        ------
        NotAStoreError
            The location holds something else; it is left untouched.
        FormatVersionError
            The store was written by a newer format version, or by format 1 (read only).

        """
        url = location.normalize(url)
        root = location.open_existing(url, storage_options, mode="r+")
        if root is None:
            try:
                root = location.open_group(url, storage_options, mode="w-")
            except OSError as exc:  # a parent that is a file, a folder not writable, ...
                raise StoreError(
                    f"could not create a store at {url}: {exc.strerror or exc}. Give a path in "
                    "a directory you can write to (each folder above it a directory, not a "
                    "file)."
                ) from exc
            if root is None:  # pragma: no cover - the backend refused to create a group
                raise StoreError(f"could not create a Zarr group at {url}")
            root.attrs.update(
                {
                    schema.ATTR_FORMAT: {
                        schema.FORMAT_KEY: schema.FORMAT_NAME,
                        schema.FORMAT_VERSION_KEY: schema.FORMAT_VERSION,
                    },
                    schema.ATTR_VERSIONS: library_versions(),
                    schema.ATTR_STATUS: schema.STATUS_RECORDING,
                }
            )
            root.create_group(schema.STEPS, attributes={schema.ATTR_NUM_STEPS: 0})
            root.create_group(schema.STAGES, attributes={schema.ATTR_STAGE_LIST: []})
            root.create_group(schema.CHECKPOINTS)
            root.create_group(schema.FROZEN)
        else:
            schema.check_format(root, url)
            version = root.attrs[schema.ATTR_FORMAT][schema.FORMAT_VERSION_KEY]
            if version < schema.FORMAT_VERSION:
                raise FormatVersionError(
                    f"{url} has store format version {version}, which this source-callback "
                    f"reads but does not write (it writes version {schema.FORMAT_VERSION}). "
                    "Record into a new store, or resume this one with the source-callback "
                    "release that created it; the store was not modified."
                )
        return cls(root, url, shard_group)

    @classmethod
    def join(
        cls, url: str, storage_options: location.StorageOptions, shard_group: shards.ShardGroup
    ) -> StoreWriter:
        """The writer of a rank other than 0 of a sharded run, once rank 0 has opened ``url``.

        It writes this rank's shards of each checkpoint and nothing else.
        """
        url = location.normalize(url)
        root = location.open_existing(url, storage_options, mode="r+")
        if root is None:
            raise StoreError(f"rank {shard_group.rank} finds no store at {url} to write into")
        schema.check_format(root, url)
        return cls(root, url, shard_group)

    # -- stages -----------------------------------------------------------

    @property
    def stages(self) -> list[schema.Stage]:
        """The recorded stages."""
        entries = self._stages_group.attrs[schema.ATTR_STAGE_LIST]
        return [schema.Stage.from_json(e) for e in entries]

    def _write_stages(self, stages: list[schema.Stage]) -> None:
        entries = {schema.ATTR_STAGE_LIST: [s.to_json() for s in stages]}
        integrity.update_attributes(self._stages_group, entries)

    def add_stage(self, stage: schema.Stage) -> None:
        """Append a stage and mark the store as recording."""
        self._write_stages([*self.stages, stage])
        self.set_status(schema.STATUS_RECORDING)

    def update_stage(self, index: int, **changes: Any) -> None:
        """Replace fields of stage ``index``."""
        stages = self.stages
        stages[index] = dataclasses.replace(stages[index], **changes)
        self._write_stages(stages)

    def set_status(self, status: str) -> None:
        """Set the store's status (``recording`` or ``complete``)."""
        self.root.attrs[schema.ATTR_STATUS] = status

    # -- steps -------------------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        """Number of fully written step rows."""
        return int(self._steps_group.attrs[schema.ATTR_NUM_STEPS])

    def _steps(self, num_groups: int) -> dict[str, zarr.Array]:
        """The step arrays, created on first use, widened to ``num_groups`` groups."""
        group = self._steps_group
        if self._step_arrays is None:
            existing = dict(group.arrays())
            if not existing:
                chunk = schema.STEP_ROW_CHUNK
                specs: dict[str, tuple[tuple[int, ...], tuple[int, ...], str, Any]] = {
                    schema.STEP_STAGE: ((0,), (chunk,), "int32", -1),
                    schema.STEP_EPOCH: ((0,), (chunk,), "int32", -1),
                    schema.STEP_LOSS: ((0,), (chunk,), "float64", math.nan),
                    schema.STEP_EXAMPLES: ((0,), (chunk,), "int64", -1),
                    schema.STEP_SCALE: ((0,), (chunk,), "float64", math.nan),
                }
                for name in schema.STEP_GROUP_FIELDS:
                    specs[name] = (
                        (0, num_groups),
                        (chunk, max(num_groups, 1)),
                        "float64",
                        math.nan,
                    )
                existing = {
                    name: group.create_array(
                        name,
                        shape=shape,
                        chunks=chunks,
                        dtype=dtype,
                        fill_value=fill,
                        compressors=schema.step_codecs(),
                    )
                    for name, (shape, chunks, dtype, fill) in specs.items()
                }
            self._step_arrays = existing
        arrays = self._step_arrays
        if any(arrays[name].shape[1] < num_groups for name in schema.STEP_GROUP_FIELDS):
            self._widen(arrays, num_groups)
        return arrays

    def _widen(self, arrays: dict[str, zarr.Array], num_groups: int) -> None:
        """Give the per-group arrays ``num_groups`` columns (NaN) and digest their rows again."""
        self._verified_rows(arrays, 0, self.num_steps)
        for name in schema.STEP_GROUP_FIELDS:
            arrays[name].resize((arrays[name].shape[0], num_groups))
        digests = self._row_digests()
        for name in schema.STEP_GROUP_FIELDS:
            rows = integrity.row_digests(arrays[name][: self.num_steps], 0)
            digests[name] = list(rows.values())
        changes = {schema.ATTR_ROW_DIGESTS: digests}
        integrity.update_attributes(self._steps_group, changes)
        self._tail = None

    def _row_digests(self) -> dict[str, list[str]]:
        """The recorded digests of the step rows, by array (a copy to change and write back)."""
        recorded = self._steps_group.attrs.get(schema.ATTR_ROW_DIGESTS, {})
        return {name: list(values) for name, values in recorded.items()}

    def _verified_rows(
        self, arrays: Mapping[str, zarr.Array], start: int, stop: int
    ) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` as stored, checked against their digests.

        ``start`` is a multiple of ``STEP_ROW_CHUNK``; ``stop`` ends a block or is ``num_steps``.

        Raises
        ------
        DamagedStoreError
            Rows that were recorded do not read back as they were written: nothing is appended
            to (or truncated from) a damaged record.

        """
        columns, problems = integrity.read_rows(arrays, start, stop, self._row_digests())
        if problems:
            raise DamagedStoreError(self.url, problems)
        return columns

    def truncate_steps(self, num_steps: int) -> None:
        """Drop step rows from ``num_steps`` on (rows written after a resumed checkpoint)."""
        arrays = self._steps(0)
        kept = min(self.num_steps, num_steps)
        first = kept - kept % schema.STEP_ROW_CHUNK
        block = self._verified_rows(
            arrays, first, min(first + schema.STEP_ROW_CHUNK, self.num_steps)
        )
        for array in arrays.values():
            if array.shape[0] > num_steps:
                array.resize((num_steps, *array.shape[1:]))
        self._commit_rows(arrays, first, {n: rows[: kept - first] for n, rows in block.items()})

    def append_steps(self, rows: Sequence[StepRow]) -> None:
        """Append ``rows`` after the last fully written row."""
        if not rows:
            return
        num_groups = max(len(r.groups) for r in rows)
        arrays = self._steps(num_groups)
        start = self.num_steps
        width = arrays[schema.STEP_GROUP_FIELDS[0]].shape[1]
        columns: dict[str, np.ndarray] = {
            schema.STEP_STAGE: np.array([r.stage for r in rows], dtype=np.int32),
            schema.STEP_EPOCH: np.array([r.epoch for r in rows], dtype=np.int32),
            schema.STEP_LOSS: np.array([r.loss for r in rows], dtype=np.float64),
            schema.STEP_EXAMPLES: np.array([r.examples for r in rows], dtype=np.int64),
            schema.STEP_SCALE: np.array([r.scale for r in rows], dtype=np.float64),
        }
        for name in schema.STEP_GROUP_FIELDS:
            block = np.full((len(rows), width), np.nan)
            for i, row in enumerate(rows):
                block[i, : len(row.groups)] = [g[name] for g in row.groups]
            columns[name] = block
        first = start - start % schema.STEP_ROW_CHUNK
        head = self._tail if self._tail is not None else self._verified_rows(arrays, first, start)
        block = {name: np.concatenate([head[name], columns[name]]) for name in arrays}
        integrity.write_row_blocks(arrays, first, block)
        self._commit_rows(arrays, first, block)

    def _commit_rows(
        self, arrays: Mapping[str, zarr.Array], first: int, rows: Mapping[str, np.ndarray]
    ) -> None:
        """Make the rows up to ``first + len(rows)`` the valid ones, with their digests.

        ``rows`` are every array's rows from ``first`` (a multiple of ``STEP_ROW_CHUNK``) to the
        new end, as stored. The row count and digests are set in one metadata write.
        """
        end = first + len(next(iter(rows.values())))
        digests = self._row_digests()
        tail_start = end - end % schema.STEP_ROW_CHUNK
        for name in arrays:
            blocks = integrity.row_digests(rows[name], first)
            digests.setdefault(name, [])[first // schema.STEP_ROW_CHUNK :] = list(blocks.values())
        changes = {schema.ATTR_NUM_STEPS: end, schema.ATTR_ROW_DIGESTS: digests}
        integrity.update_attributes(self._steps_group, changes)
        self._tail = {name: values[tail_start - first :] for name, values in rows.items()}

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint_keys(self) -> list[str]:
        """Names of all checkpoint groups, committed or not."""
        return sorted(self.root[schema.CHECKPOINTS].group_keys())

    def delete_checkpoint(self, key: str) -> None:
        """Remove one checkpoint group."""
        del self.root[schema.CHECKPOINTS][key]

    def write_checkpoint(
        self, step: int, role: str, stage: int, snapshot: CheckpointSnapshot
    ) -> str:
        """Write a checkpoint packed (format 2) and commit it; returns its key.

        Replaces an existing one. The commit record (``committed``, the packed index with the
        tensors' digests, the scalar optimizer state) is written in one update after every
        array, so a crash before it leaves an uncommitted checkpoint.
        """
        key = schema.checkpoint_key(step, role)
        attributes = {
            schema.ATTR_STEP: step,
            schema.ATTR_STAGE: stage,
            schema.ATTR_ROLE: role,
            schema.ATTR_COMMITTED: False,
        }
        commit = {schema.ATTR_SCALAR_STATE: snapshot.scalar_state}
        self._write_group(
            schema.CHECKPOINTS, key, attributes, snapshot.packed, commit, snapshot.late_probe
        )
        return key

    def _write_group(
        self,
        parent: str,
        key: str,
        attributes: dict[str, Any],
        packed: integrity.Packed | shards.ShardedPacked,
        commit: dict[str, Any],
        late_probe: LateProbe | None = None,
    ) -> None:
        """Write a packed group ``parent/key`` and commit it (replacing one unless sharded).

        A sharded group is never replaced: the other ranks write into it while rank 0 creates
        it (a stale one, left by an interrupted write, is removed when the stage resumes).
        ``late_probe``: see :class:`CheckpointSnapshot` (not for sharded groups).
        """
        if isinstance(packed, shards.ShardedPacked):
            assert self.shard_group is not None and late_probe is None
            shards.write(self.root[parent], key, attributes, packed, self.shard_group, commit)
            return
        group = integrity.create_group(self.root.store_path / parent, key, attributes)
        _commit(group, packed, commit, late_probe)

    def write_example_digests(self, stage: int, digests: np.ndarray) -> None:
        """Write the per-example digests of stage ``stage``'s training set (replacing any)."""
        self.root.require_group(schema.EXAMPLES).create_array(
            schema.examples_key(stage),
            data=digests,
            compressors=schema.step_codecs(),
            attributes={schema.ATTR_DIGEST: integrity.digest(digests)},
            overwrite=True,
        )

    def write_frozen(self, stage: int, params: integrity.Packed | shards.ShardedPacked) -> None:
        """Write stage ``stage``'s non-trainable parameters (:func:`snapshot_frozen`), commit."""
        attributes = {schema.ATTR_COMMITTED: False}
        self._write_group(schema.FROZEN, schema.frozen_key(stage), attributes, params, {})


LateProbe = concurrent.futures.Future[TensorDict | None]


@dataclass(frozen=True)
class CheckpointSnapshot:
    """A checkpoint's tensors packed on the CPU, and the optimizer's scalar state.

    ``late_probe``: the probe's tensors, when they are taken after the copy (the stage-end
    checkpoint's: the parameters no longer change, so the probe runs while the rest is
    written); the write waits for them before the commit, and is not committed if it is
    cancelled.
    """

    packed: integrity.Packed | shards.ShardedPacked
    scalar_state: dict[str, dict[str, float]]
    late_probe: LateProbe | None = None

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        """The flat CPU tensors it fills (to be filled again by a later snapshot)."""
        packed = self.packed
        return (packed.local if isinstance(packed, shards.ShardedPacked) else packed).arrays


def _checkpoint_sections(
    params: TensorDict,
    buffers: TensorDict,
    optimizer_state: Mapping[str, TensorDict],
    probe: TensorDict | None,
) -> tuple[dict[str, TensorDict], dict[str, dict[str, float]]]:
    """A checkpoint's tensors by packed section, and its 0-d optimizer state as scalars."""
    scalar_state: dict[str, dict[str, float]] = {}
    tensor_state: dict[str, dict[str, torch.Tensor]] = {}
    for state_key, values in optimizer_state.items():
        for name, value in values.items():
            if value.ndim == 0:
                scalar_state.setdefault(state_key, {})[name] = value.item()
            else:
                tensor_state.setdefault(state_key, {})[name] = value
    sections = {
        schema.SECTION_PARAMS: params,
        schema.SECTION_BUFFERS: buffers,
        **{schema.optimizer_section(k): values for k, values in tensor_state.items()},
    }
    if probe:
        sections[schema.SECTION_PROBE] = probe
    return sections, scalar_state


def snapshot_checkpoint(
    params: TensorDict,
    buffers: TensorDict,
    optimizer_state: Mapping[str, TensorDict],
    probe: TensorDict | None = None,
    spare: Mapping[str, torch.Tensor] | None = None,
    shard_group: shards.ShardGroup | None = None,
    late_probe: LateProbe | None = None,
) -> CheckpointSnapshot:
    """Copy a checkpoint's tensors (any device) for :meth:`StoreWriter.write_checkpoint`.

    Runs on the training thread: the originals keep changing once training goes on.

    Parameters
    ----------
    params, buffers
        The model's trained parameters and buffers by name.
    optimizer_state
        ``{state key: {parameter name: tensor}}``; 0-d tensors (Adam's step count) are stored
        as scalars.
    probe
        The probe's indices and losses (``schema.SECTION_PROBE``), if any.
    spare
        Buffers of a snapshot already written, to fill again (see :func:`integrity.pack`).
    shard_group
        The ranks of a sharded run: this rank's shards are copied (:func:`shards.pack`).
    late_probe
        Instead of ``probe``: the probe to come (see :class:`CheckpointSnapshot`).

    """
    sections, scalar_state = _checkpoint_sections(params, buffers, optimizer_state, probe)
    return CheckpointSnapshot(_pack(sections, spare, shard_group), scalar_state, late_probe)


def _pack(
    sections: Mapping[str, TensorDict],
    spare: Mapping[str, torch.Tensor] | None,
    shard_group: shards.ShardGroup | None,
) -> integrity.Packed | shards.ShardedPacked:
    if shard_group is None:
        return integrity.pack(sections, spare)
    return shards.pack(sections, shard_group, spare)


def checkpoint_layout(
    params: TensorDict,
    buffers: TensorDict,
    optimizer_state: Mapping[str, TensorDict],
    shard_group: shards.ShardGroup | None = None,
) -> integrity.Layout:
    """The buffers a checkpoint of these tensors would fill (without a probe)."""
    sections = _checkpoint_sections(params, buffers, optimizer_state, None)[0]
    if shard_group is None:
        return integrity.layout(sections)
    return shards.local_layout(sections, shard_group)


def snapshot_frozen(
    params: TensorDict, shard_group: shards.ShardGroup | None = None
) -> integrity.Packed | shards.ShardedPacked:
    """Copy a stage's non-trainable parameters for :meth:`StoreWriter.write_frozen`."""
    return _pack({schema.SECTION_PARAMS: params}, None, shard_group)


def _commit(
    group: zarr.Group,
    packed: integrity.Packed,
    attributes: dict[str, Any],
    late_probe: LateProbe | None = None,
) -> None:
    """Write ``packed`` into ``group``, then commit it with its index and digests.

    ``late_probe`` is waited for after ``packed`` is written; its section joins the commit. When
    it is cancelled (taking the probe raised), the group is left uncommitted.
    """
    index = integrity.write_packed(group, packed)
    try:
        probe = None if late_probe is None else late_probe.result()
    except concurrent.futures.CancelledError:
        return
    if probe:
        extra = integrity.pack({schema.SECTION_PROBE: probe})
        index = integrity.merged(index, integrity.write_packed(group, extra))
    # One metadata write (``attrs.update`` would write once per key).
    commit = {**attributes, schema.ATTR_PACKED: index, schema.ATTR_COMMITTED: True}
    integrity.update_attributes(group, commit)


def write_tensors(group: zarr.Group, tensors: TensorDict) -> None:
    """Write each tensor as a compressed array named after its key, keeping its dtype.

    The layout of format-1 checkpoints; used for the analysis cache's operators.
    """
    for name, tensor in tensors.items():
        encoded = schema.encode_tensor(tensor)
        group.create_array(
            name,
            data=encoded.array,
            chunks=schema.tensor_chunks(encoded.array.shape, encoded.array.itemsize),
            compressors=schema.tensor_codecs(),
            attributes={schema.ATTR_TORCH_DTYPE: encoded.torch_dtype},
        )
