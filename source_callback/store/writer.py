"""The store's single writer: creates or validates a store, appends step rows, writes checkpoints.

Everything here runs on the recorder's background thread (or before training starts). Nothing
is modified until validation has passed, and a checkpoint counts only once its ``committed``
attribute is set after all of its arrays.
"""

from __future__ import annotations

import dataclasses
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr

from source_callback.errors import StoreError
from source_callback.store import location, schema

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
    """Writes one source-callback store. Use :meth:`open` to create or validate one."""

    def __init__(self, root: zarr.Group, url: str) -> None:
        self.root = root
        self.url = url
        self._step_arrays: dict[str, zarr.Array] | None = None

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, storage_options: location.StorageOptions = None) -> StoreWriter:
        """Open the store at ``url`` for writing, creating it when the location is empty.

        Raises
        ------
        NotAStoreError
            The location holds something else; it is left untouched.
        FormatVersionError
            The store was written by a newer format version.

        """
        url = location.normalize(url)
        root = location.open_existing(url, storage_options, mode="r+")
        if root is None:
            root = location.open_group(url, storage_options, mode="w-")
            if root is None:  # pragma: no cover - the backend refused to create a group
                raise StoreError(f"could not create a Zarr group at {url}")
            root.attrs.update(
                {
                    schema.ATTR_FORMAT: {
                        "format": schema.FORMAT_NAME,
                        "version": schema.FORMAT_VERSION,
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
        return cls(root, url)

    # -- stages -----------------------------------------------------------

    @property
    def stages(self) -> list[schema.Stage]:
        """The recorded stages."""
        entries = self.root[schema.STAGES].attrs[schema.ATTR_STAGE_LIST]
        return [schema.Stage.from_json(e) for e in entries]

    def _write_stages(self, stages: list[schema.Stage]) -> None:
        self.root[schema.STAGES].attrs[schema.ATTR_STAGE_LIST] = [s.to_json() for s in stages]

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
        return int(self.root[schema.STEPS].attrs[schema.ATTR_NUM_STEPS])

    def _steps(self, num_groups: int) -> dict[str, zarr.Array]:
        """The step arrays, created on first use, widened to ``num_groups`` groups."""
        group = self.root[schema.STEPS]
        if self._step_arrays is None:
            existing = dict(group.arrays())
            if not existing:
                chunk = schema.STEP_ROW_CHUNK
                specs: dict[str, tuple[tuple[int, ...], tuple[int, ...], str, Any]] = {
                    schema.STEP_STAGE: ((0,), (chunk,), "int32", -1),
                    schema.STEP_EPOCH: ((0,), (chunk,), "int32", -1),
                    schema.STEP_LOSS: ((0,), (chunk,), "float64", math.nan),
                    schema.STEP_EXAMPLES: ((0,), (chunk,), "int64", -1),
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
                        name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill
                    )
                    for name, (shape, chunks, dtype, fill) in specs.items()
                }
            self._step_arrays = existing
        arrays = self._step_arrays
        for name in schema.STEP_GROUP_FIELDS:
            if arrays[name].shape[1] < num_groups:
                arrays[name].resize((arrays[name].shape[0], num_groups))
        return arrays

    def truncate_steps(self, num_steps: int) -> None:
        """Drop step rows from ``num_steps`` on (rows written after a resumed checkpoint)."""
        arrays = self._steps(0)
        for array in arrays.values():
            if array.shape[0] > num_steps:
                array.resize((num_steps, *array.shape[1:]))
        self.root[schema.STEPS].attrs[schema.ATTR_NUM_STEPS] = min(self.num_steps, num_steps)

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
        }
        for name in schema.STEP_GROUP_FIELDS:
            block = np.full((len(rows), width), np.nan)
            for i, row in enumerate(rows):
                block[i, : len(row.groups)] = [g[name] for g in row.groups]
            columns[name] = block
        end = start + len(rows)
        for name, array in arrays.items():
            # A crash mid-append can leave arrays longer than the committed row count.
            if array.shape[0] != end:
                array.resize((end, *array.shape[1:]))
            array[start:end] = columns[name]
        self.root[schema.STEPS].attrs[schema.ATTR_NUM_STEPS] = end

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint_keys(self) -> list[str]:
        """Names of all checkpoint groups, committed or not."""
        return sorted(self.root[schema.CHECKPOINTS].group_keys())

    def delete_checkpoint(self, key: str) -> None:
        """Remove one checkpoint group."""
        del self.root[schema.CHECKPOINTS][key]

    def write_checkpoint(
        self,
        step: int,
        role: str,
        stage: int,
        params: TensorDict,
        buffers: TensorDict,
        optimizer_state: Mapping[str, TensorDict],
    ) -> str:
        """Write a checkpoint and commit it; returns its key. Replaces an existing one."""
        key = schema.checkpoint_key(step, role)
        scalar_state: dict[str, dict[str, float]] = {}
        tensor_state: dict[str, dict[str, torch.Tensor]] = {}
        for state_key, values in optimizer_state.items():
            for name, value in values.items():
                if value.ndim == 0:
                    scalar_state.setdefault(state_key, {})[name] = value.item()
                else:
                    tensor_state.setdefault(state_key, {})[name] = value
        group = self.root[schema.CHECKPOINTS].create_group(
            key,
            overwrite=True,
            attributes={
                schema.ATTR_STEP: step,
                schema.ATTR_STAGE: stage,
                schema.ATTR_ROLE: role,
                schema.ATTR_COMMITTED: False,
                schema.ATTR_SCALAR_STATE: scalar_state,
            },
        )
        write_tensors(group.create_group(schema.CKPT_PARAMS), params)
        write_tensors(group.create_group(schema.CKPT_BUFFERS), buffers)
        optimizer_group = group.create_group(schema.CKPT_OPTIMIZER)
        for state_key, values in tensor_state.items():
            write_tensors(optimizer_group.create_group(state_key), values)
        group.attrs[schema.ATTR_COMMITTED] = True
        return key

    def write_frozen(self, stage: int, params: TensorDict) -> None:
        """Write the non-trainable parameters of stage ``stage`` and commit them."""
        group = self.root[schema.FROZEN].create_group(
            schema.frozen_key(stage), overwrite=True, attributes={schema.ATTR_COMMITTED: False}
        )
        write_tensors(group, params)
        group.attrs[schema.ATTR_COMMITTED] = True


def write_tensors(group: zarr.Group, tensors: TensorDict) -> None:
    """Write each tensor as a compressed array named after its key, keeping its dtype."""
    for name, tensor in tensors.items():
        encoded = schema.encode_tensor(tensor)
        group.create_array(
            name,
            data=encoded.array,
            chunks=schema.tensor_chunks(encoded.array.shape, encoded.array.itemsize),
            compressors=schema.tensor_codecs(),
            attributes={schema.ATTR_TORCH_DTYPE: encoded.torch_dtype},
        )
