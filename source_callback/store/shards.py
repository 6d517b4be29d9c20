"""Sharded checkpoints (FSDP2 ``fully_shard``): every rank writes its own rows of each tensor.

A parameter sharded by ``fully_shard`` is a ``DTensor`` placed ``Shard(0)`` on a 1-d mesh of
the run's W ranks: rank r holds rows ``[r c, (r + 1) c)`` of its first dimension
(``c = ceil(rows / W)``, ``torch.chunk``'s split, so the last ranks may hold fewer or none),
and so does each of its optimizer states. A sharded checkpoint is packed like any format-2
checkpoint (one flat array per section and dtype) but *rank-major*: a rank's rows of every
tensor of an array form one region, padded to a whole number of the array's chunks, so that
each rank writes whole chunks of its own and no chunk is written by two ranks. The chunks
split the largest region evenly (it needs next to no padding), and a rank packs its region
padded in place, so that its chunks are written from the snapshot's memory, none copied.
Plain tensors (buffers, parameters left unsharded, the probe) lie in rank 0's region.

Every rank computes the same layout from the tensors' global shapes, without communicating;
each writes its region concurrently and digests its pieces. The commit is one collective made
by every rank (:meth:`ShardGroup.gather` of each rank's error or digests): then rank 0 writes
the ``sharded`` index with every piece's digest and ``committed``, or every rank raises the
same error and the checkpoint stays uncommitted. The index (``schema.ATTR_SHARDED``) lists
each tensor's pieces in order; read back, they are verified and joined into the full tensor.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from zarr.storage import StorePath

from source_callback.errors import StoreError
from source_callback.store import integrity, schema

TensorDict = Mapping[str, torch.Tensor]

#: How long a rank waits at a checkpoint's commit for the others (a rank that died makes the
#: others fail sooner: Gloo reports the closed connection).
COMMIT_TIMEOUT = datetime.timedelta(minutes=30)


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a sharded parameter or its optimizer state)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def unsupported_layout(tensor: torch.Tensor, world: int) -> str | None:
    """Why a ``DTensor``'s layout cannot be recorded (``None``: ``fully_shard``'s, it can).

    Recorded layouts: ``Shard(0)`` on a 1-d mesh of all ``world`` ranks (FSDP2). Tensor
    parallelism (other placements) and hybrid sharding (2-d meshes) are not.
    """
    from torch.distributed.tensor import Shard

    mesh = tensor.device_mesh
    if mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
        return f"placements {tuple(tensor.placements)} on a {mesh.ndim}-d device mesh"
    if mesh.size() != world:
        return f"a device mesh of {mesh.size()} ranks out of {world}"
    return None


def shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of a ``rows``-row tensor that ``fully_shard`` gives ``rank``."""
    size = -(-rows // world)
    start = min(rank * size, rows)
    return start, min(start + size, rows)


@dataclass(frozen=True)
class ShardGroup:
    """The ranks that write each sharded checkpoint together, as this process sees them.

    Attributes
    ----------
    rank, world
        This process's rank and the number of ranks (the sharding mesh's).
    group
        A Gloo process group of all ranks, used by the writer threads alone, for the commit.

    """

    rank: int
    world: int
    group: Any

    @classmethod
    def create(cls) -> ShardGroup:
        """A group over ``torch.distributed``'s world (a collective: every rank calls it)."""
        dist = torch.distributed
        group = dist.new_group(backend="gloo", timeout=COMMIT_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), group)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank (a collective: every rank calls it)."""
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out


@dataclass(frozen=True)
class ShardedLayout:
    """Where every rank's rows of every tensor go, as this rank sees it.

    Attributes
    ----------
    entries
        Per section, ``[name, torch dtype, shape, [[rank, offset, first, count], ...]]`` of
        every tensor (all ranks' pieces, in element order), names sorted: the ``sharded``
        index without its digests.
    arrays
        ``{packed array key: (length, chunk length, torch dtype)}`` of the whole arrays.
    regions
        ``{packed array key: (offset, length) of this rank's region}``, padded: whole chunks.

    """

    entries: dict[str, list[list[Any]]]
    arrays: dict[str, tuple[int, int, str]]
    regions: dict[str, tuple[int, int]]


@dataclass(frozen=True)
class ShardedPacked:
    """A rank's part of a sharded checkpoint, packed on the CPU, and the whole layout.

    Attributes
    ----------
    local
        This rank's pieces packed (:func:`integrity.pack`): its region of each array, padded
        with zeros.
    layout
        Where every rank's pieces go.

    """

    local: integrity.Packed
    layout: ShardedLayout


def _local(tensor: torch.Tensor, name: str, start: int, stop: int) -> torch.Tensor:
    local = tensor.to_local()
    expected = [stop - start, *tensor.shape[1:]]
    if list(local.shape) != expected:
        raise StoreError(
            f"this rank's shard of {name} has shape {list(local.shape)}, not rows "
            f"{start}..{stop} of {list(tensor.shape)} as fully_shard splits it "
            "(torch.chunk); only FSDP2's even Shard(0) layout can be recorded."
        )
    return local


def _assign(
    sections: Mapping[str, TensorDict], shards: ShardGroup
) -> tuple[dict[str, dict[str, torch.Tensor]], ShardedLayout]:
    """Lay out ``{section: {name: tensor}}`` over the ranks (the same on every rank).

    Returns this rank's tensors (its shards, and the plain tensors on rank 0) by section, and
    the layout.
    """
    mine: dict[str, dict[str, torch.Tensor]] = {}
    entries: dict[str, list[list[Any]]] = {section: [] for section in sections}
    used: dict[str, list[int]] = {}  # per array, elements each rank's region holds so far
    dtypes: dict[str, torch.dtype] = {}
    placed: list[tuple[str, list[int]]] = []  # (array, piece): offsets within the region
    for section, name, tensor, dtype, key in integrity.packing_order(sections):
        filled = used.setdefault(key, [0] * shards.world)
        dtypes[key] = tensor.dtype
        shape = list(tensor.shape)
        pieces = []
        if is_sharded(tensor):
            row = math.prod(shape[1:])
            for rank in range(shards.world):
                start, stop = shard_rows(shape[0], shards.world, rank)
                if stop == start:
                    continue
                count = (stop - start) * row
                pieces.append([rank, filled[rank], start * row, count])
                filled[rank] += count
                if rank == shards.rank:
                    local = _local(tensor, f"{section}/{name}", start, stop)
                    mine.setdefault(section, {})[name] = local
        elif tensor.numel():
            pieces.append([0, filled[0], 0, tensor.numel()])
            filled[0] += tensor.numel()
            if shards.rank == 0:
                mine.setdefault(section, {})[name] = tensor
        entries[section].append([name, dtype, shape, pieces])
        placed += [(key, piece) for piece in pieces]
    arrays: dict[str, tuple[int, int, str]] = {}
    starts: dict[str, list[int]] = {}
    for key, filled in used.items():
        largest = max(filled)
        (limit,) = schema.packed_chunks(largest, dtypes[key].itemsize)
        count = -(-largest // limit)
        chunk = -(-largest // count)  # equal chunks: the largest region pads < 1 per chunk
        starts[key] = np.cumsum([0] + [-(-n // chunk) * chunk for n in filled]).tolist()
        arrays[key] = (starts[key][-1], chunk, schema.dtype_name(dtypes[key]))
    for key, piece in placed:
        piece[1] += starts[key][piece[0]]
    regions = {
        key: (offsets[shards.rank], offsets[shards.rank + 1] - offsets[shards.rank])
        for key, offsets in starts.items()
    }
    return mine, ShardedLayout(entries, arrays, regions)


def _padded(mine: Mapping[str, TensorDict], layout: ShardedLayout) -> integrity.Layout:
    """The layout of this rank's pieces packed into its regions, padding included."""
    tight = integrity.layout(mine)
    arrays = {key: (layout.regions[key][1], dtype) for key, (_, dtype) in tight.arrays.items()}
    return integrity.Layout(tight.entries, arrays)


def local_layout(sections: Mapping[str, TensorDict], shards: ShardGroup) -> integrity.Layout:
    """The buffers :func:`pack` will fill: this rank's regions."""
    return _padded(*_assign(sections, shards))


def pack(
    sections: Mapping[str, TensorDict],
    shards: ShardGroup,
    spare: Mapping[str, torch.Tensor] | None = None,
) -> ShardedPacked:
    """Copy this rank's rows of ``{section: {name: tensor}}`` into flat CPU tensors.

    ``spare``: buffers of an earlier snapshot of this rank, filled again where they fit.
    """
    mine, layout = _assign(sections, shards)
    return ShardedPacked(integrity.pack(mine, spare, _padded(mine, layout)), layout)


async def _write_region(
    group_path: StorePath, layout: ShardedLayout, values: Mapping[str, np.ndarray], rank: int
) -> None:
    """Write this rank's region of every array in whole chunks (rank 0 creates the arrays).

    ``values`` hold the regions, padded: every chunk is a view of them.
    """
    writes = []
    for key, (length, chunk, dtype) in layout.arrays.items():
        data = values.get(key)
        if rank != 0 and data is None:
            continue
        array = await integrity.packed_array(
            group_path, key, length, chunk, schema.storage_dtype(dtype), create=rank == 0
        )
        if data is None:
            continue
        region = layout.regions[key][0]
        for start in range(0, data.size, chunk):
            span = slice(region + start, region + start + chunk)
            writes.append(array.setitem(span, data[start : start + chunk]))
    await integrity.all_or_none(writes)


def _piece_digests(layout: ShardedLayout, values: Mapping[str, np.ndarray], rank: int) -> list[str]:
    """Digests of this rank's pieces, in index order."""
    digests = []
    for section, rows in layout.entries.items():
        for _, dtype, _, pieces in rows:
            key = schema.packed_array_key(section, dtype)
            for owner, offset, _, count in pieces:
                if owner == rank:
                    start = offset - layout.regions[key][0]
                    digests.append(integrity.tensor_digest(values[key][start : start + count]))
    return digests


def write(
    parent: zarr.Group,
    key: str,
    attributes: dict[str, Any],
    packed: ShardedPacked,
    shards: ShardGroup,
    commit: dict[str, Any],
) -> None:
    """Write this rank's part of a sharded group ``parent/key``; commit it on rank 0.

    Every rank calls this for the same group, in the same order (the commit is a collective).
    Rank 0 creates the group (with ``attributes``) and its arrays; after every rank has
    written and digested its pieces, rank 0 sets ``commit``, the ``sharded`` index and
    ``committed`` in one update.

    Raises
    ------
    StoreError
        On every rank when any rank failed; the group stays uncommitted.

    """
    error = None
    digests: list[str] = []
    path = parent.store_path / key
    values = {k: schema.encode_tensor(a).array for k, a in packed.local.arrays.items()}
    try:
        if shards.rank == 0:
            parent.create_group(key, attributes=attributes)
        integrity.run(_write_region(path, packed.layout, values, shards.rank))
        digests = _piece_digests(packed.layout, values, shards.rank)
    except Exception as exc:
        error = repr(exc)
    reports = shards.gather((error, digests))
    failed = [f"rank {rank}: {error}" for rank, (error, _) in enumerate(reports) if error]
    if failed:
        raise StoreError(
            f"writing the shards of {parent.path}/{key} failed ({'; '.join(failed)}); it is "
            "not committed."
        )
    if shards.rank == 0:
        index = _index(packed.layout, [digests for _, digests in reports])
        group = parent[key]
        changes = {**commit, schema.ATTR_SHARDED: index, schema.ATTR_COMMITTED: True}
        integrity.update_attributes(group, changes)


def _index(layout: ShardedLayout, digests: list[list[str]]) -> dict[str, Any]:
    """The ``sharded`` index: the entries with every piece's digest (``digests`` by rank)."""
    remaining = [iter(d) for d in digests]
    tensors = {
        section: [
            [name, dtype, shape, [[*piece, next(remaining[piece[0]])] for piece in pieces]]
            for name, dtype, shape, pieces in rows
        ]
        for section, rows in layout.entries.items()
    }
    return {
        schema.PACKED_DIGEST: schema.TENSOR_DIGEST,
        schema.PACKED_ARRAYS: {key: length for key, (length, *_) in layout.arrays.items()},
        schema.SHARDED_RANKS: len(digests),
        schema.PACKED_TENSORS: tensors,
    }
