"""Format 2's packed tensors and digests: packing on write, verified unpacking on read.

A checkpoint (or frozen) group holds one 1-d array per section and dtype; its ``packed``
attribute indexes every tensor (name, dtype, offset, shape) with a digest of its bytes
(``schema.TENSOR_DIGEST``). A read checks every tensor against it: a missing chunk (which Zarr
reads back as zeros), an altered one or one from elsewhere fails the digests of the tensors it
held, and a truncated one (or one whose codec or checksum fails, in stores of the first format-2
writer) cannot be decoded. Step rows get a digest per ``schema.STEP_ROW_CHUNK`` rows
(``row_digests``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import json
import math
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.group import GroupMetadata
from zarr.core.metadata import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.storage import MemoryStore, StorePath

from source_callback.errors import Damage
from source_callback.store import schema

TensorDict = Mapping[str, torch.Tensor]
#: The packed index of a group: the JSON of its ``packed`` attribute.
PackedIndex = dict[str, Any]

UNREADABLE = "a chunk cannot be decoded (truncated or altered)"
MISMATCH = "bytes differ from the digest recorded at commit (a chunk is missing or was altered)"
METADATA_MISMATCH = "its metadata differs from the digest recorded with it (edited or altered)"
#: What reading a chunk that cannot be decoded raises (zarr's codec errors).
CODEC_ERRORS = (ValueError, RuntimeError, IndexError, TypeError)


class CheckedBlosc(BloscCodec):
    """Blosc that refuses a chunk whose header does not describe it.

    c-blosc decompresses by the sizes in a chunk's 16-byte header, not the chunk's length, so
    a truncated chunk reads past its end: values that change from one read to the next (NaN
    among them) instead of an error. Arrays without checksums or digests (format 1's tensors,
    cached gradients) are read through :func:`checked`.
    """

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer:
        data = chunk_bytes.as_numpy_array()
        expected = math.prod(chunk_spec.shape) * chunk_spec.dtype.to_native_dtype().itemsize
        if len(data) < BLOSC_HEADER:
            raise ValueError(f"a blosc chunk of {len(data)} bytes, shorter than its header")
        header = bytes(data[:BLOSC_HEADER])
        decoded, stored = (int.from_bytes(header[i : i + 4], "little") for i in (4, 12))
        if stored != len(data) or decoded != expected:
            raise ValueError(
                f"a blosc chunk of {len(data)} bytes whose header records {stored} bytes "
                f"holding {decoded} (of {expected}): truncated or altered"
            )
        return await super()._decode_single(chunk_bytes, chunk_spec)


#: Bytes of a blosc chunk's header: version, flags, sizes (decoded at 4, stored at 12).
BLOSC_HEADER = 16


def checked(array: zarr.AsyncArray) -> zarr.AsyncArray:
    """``array`` with its blosc codec replaced by :class:`CheckedBlosc` (same bytes decoded)."""
    codecs = tuple(
        CheckedBlosc.from_dict(codec.to_dict()) if type(codec) is BloscCodec else codec
        for codec in array.metadata.codecs
    )
    if codecs == tuple(array.metadata.codecs):
        return array
    metadata = dataclasses.replace(array.metadata, codecs=codecs)
    return zarr.AsyncArray(metadata=metadata, store_path=array.store_path, config=array.config)


def _stored_bytes(values: np.ndarray) -> np.ndarray:
    """An array's little-endian bytes in C order, as a read-only ``uint8`` array."""
    data = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    data = data.reshape(-1).view(np.uint8)
    if data.flags.writeable:  # google_crc32c takes read-only buffers only
        data = data.view()
        data.flags.writeable = False
    return data


def digest(values: np.ndarray) -> str:
    """``schema.DIGEST`` of an array's little-endian bytes, in C order."""
    return hashlib.sha256(_stored_bytes(values)).hexdigest()[:32]


def tensor_digest(values: np.ndarray) -> str:
    """``schema.TENSOR_DIGEST`` of an array's little-endian bytes, in C order."""
    return f"{google_crc32c.value(_stored_bytes(values)):08x}"


#: Packed tensors' digest functions by the name an index records.
_TENSOR_DIGESTS: dict[str, Callable[[np.ndarray], str]] = {
    schema.DIGEST: digest,
    schema.TENSOR_DIGEST: tensor_digest,
}


def run(coroutine: Any) -> Any:
    """Run a coroutine on Zarr's event loop (the writer thread and readers both block on it)."""
    return sync(coroutine, timeout=zarr.config.get("async.timeout"))


def _async_group(group: zarr.Group) -> zarr.AsyncGroup:
    # zarr.Group has no public accessor for its async twin; this one costs no request.
    return zarr.AsyncGroup(metadata=group.metadata, store_path=group.store_path)


# -- writing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packed:
    """Tensors packed into one flat CPU tensor per section and dtype, ready to be written.

    Made by :func:`pack` on the training thread (one copy of each tensor, into buffers that can
    be reused from one checkpoint to the next); written by :func:`write_packed`.

    Attributes
    ----------
    arrays
        The flat tensors by packed array key (``schema.packed_array_key``).
    entries
        Per section, ``[name, torch dtype, offset, shape]`` of every tensor, names sorted: the
        ``packed`` index without its digests.

    """

    arrays: dict[str, torch.Tensor]
    entries: dict[str, list[list[Any]]]


@dataclass(frozen=True)
class Layout:
    """Where :func:`pack` puts each tensor: the flat arrays' lengths and dtypes, and the entries.

    Attributes
    ----------
    entries
        Per section, ``[name, torch dtype, offset, shape]`` of every tensor, names sorted.
    arrays
        ``{packed array key: (length, torch dtype)}``.

    """

    entries: dict[str, list[list[Any]]]
    arrays: dict[str, tuple[int, torch.dtype]]


def packing_order(
    sections: Mapping[str, TensorDict],
) -> Iterator[tuple[str, str, torch.Tensor, str, str]]:
    """``(section, name, tensor, torch dtype, packed array key)`` in the order tensors are packed.

    Sections in their order, names sorted within each.
    """
    for section, values in sections.items():
        for name in sorted(values):
            tensor = values[name]
            dtype = schema.dtype_name(tensor.dtype)
            yield section, name, tensor, dtype, schema.packed_array_key(section, dtype)


def layout(sections: Mapping[str, TensorDict]) -> Layout:
    """The layout of ``{section: {name: tensor}}`` packed (reads shapes and dtypes only)."""
    entries: dict[str, list[list[Any]]] = {section: [] for section in sections}
    arrays: dict[str, tuple[int, torch.dtype]] = {}
    for section, name, tensor, dtype, key in packing_order(sections):
        offset = arrays[key][0] if key in arrays else 0
        arrays[key] = (offset + tensor.numel(), tensor.dtype)
        entries[section].append([name, dtype, offset, list(tensor.shape)])
    return Layout(entries, arrays)


def allocate(
    target: Layout, spare: Mapping[str, torch.Tensor] | None = None, *, touch: bool = False
) -> dict[str, torch.Tensor]:
    """Flat CPU buffers for ``target``: those of ``spare`` that fit (same key, dtype, length).

    Fresh memory costs a page fault per 4 KiB when first written, several times the copy
    itself; ``touch`` zero-fills new buffers to take those faults now (off the training thread).
    """
    spare = spare or {}
    buffers = {}
    for key, (length, dtype) in target.arrays.items():
        buffer = spare.get(key)
        if buffer is None or buffer.dtype != dtype or buffer.numel() != length:
            buffer = (torch.zeros if touch else torch.empty)(length, dtype=dtype)
        buffers[key] = buffer
    return buffers


def pack(
    sections: Mapping[str, TensorDict],
    spare: Mapping[str, torch.Tensor] | None = None,
    target: Layout | None = None,
) -> Packed:
    """Copy ``{section: {name: tensor}}`` (any device) into flat CPU tensors.

    ``spare``: the ``arrays`` of an earlier :class:`Packed` that has been written (or buffers
    from :func:`allocate`); those that fit are filled again instead of allocating.
    ``target``: the tensors' :func:`layout` with longer arrays, whose ends are zero-filled.
    """
    tight = layout(sections)
    arrays = allocate(target or tight, spare)
    with torch.no_grad():
        for section, rows in tight.entries.items():
            for name, dtype, offset, shape in rows:
                tensor = sections[section][name]
                buffer = arrays[schema.packed_array_key(section, dtype)]
                buffer[offset : offset + tensor.numel()].view(shape).copy_(tensor)
        if target is not None:
            for key, (length, _) in tight.arrays.items():
                arrays[key][length:].zero_()
    return Packed(arrays, tight.entries)


def _index(packed: Packed, values: Mapping[str, np.ndarray]) -> PackedIndex:
    """The ``packed`` index of ``packed``: its entries with the digest of every tensor."""
    tensors = {
        section: [
            [name, dtype, offset, shape, tensor_digest(values[key][offset : offset + size])]
            for name, dtype, offset, shape in rows
            for key, size in [(schema.packed_array_key(section, dtype), math.prod(shape))]
        ]
        for section, rows in packed.entries.items()
    }
    return {
        schema.PACKED_DIGEST: schema.TENSOR_DIGEST,
        schema.PACKED_ARRAYS: {key: int(a.numel()) for key, a in packed.arrays.items()},
        schema.PACKED_TENSORS: tensors,
    }


async def _write_metadata(path: StorePath, metadata: GroupMetadata | ArrayV3Metadata) -> None:
    """Write a node's metadata document at ``path``, checking nothing that is there or above.

    Zarr's ``create_group``/``create_array`` first look for an existing node and for every
    parent group: about ten requests per node on S3, where the writer knows the answers.
    """
    documents = metadata.to_buffer_dict(default_buffer_prototype())
    await all_or_none((path / name).set(document) for name, document in documents.items())


async def packed_array(
    group_path: StorePath, key: str, length: int, chunk: int, dtype: np.dtype, create: bool
) -> zarr.AsyncArray:
    """The 1-d packed array ``key`` of the group at ``group_path``, chunks of ``chunk`` items.

    Its metadata is made in memory; ``create`` writes it (in a group just made by the caller),
    otherwise the handle writes chunks only (another process writes the metadata).
    """
    made = await zarr.api.asynchronous.create_array(
        StorePath(MemoryStore(), key),
        shape=(length,),
        dtype=dtype,
        chunks=(chunk,),
        compressors=schema.packed_codecs(),
        fill_value=0,
        config={"write_empty_chunks": True},
    )
    if create:
        await _write_metadata(group_path / key, made.metadata)
    # With the made array's config too (every chunk written), which the metadata does not hold.
    return zarr.AsyncArray(metadata=made.metadata, store_path=group_path / key, config=made.config)


def create_group(parent: StorePath, key: str, attributes: dict[str, Any]) -> zarr.Group:
    """A new group ``key`` under ``parent``, replacing whatever was there.

    One listing (and the deletes of what it finds) and one write, where ``create_group`` would
    also read the parents and check for nodes of the same name.
    """
    path = parent / key

    async def create() -> zarr.AsyncGroup:
        await path.delete_dir()
        metadata = GroupMetadata(attributes=attributes, zarr_format=3)
        await _write_metadata(path, metadata)
        return zarr.AsyncGroup(metadata=metadata, store_path=path)

    return zarr.Group(run(create()))


async def _write_arrays(group_path: StorePath, values: Mapping[str, np.ndarray]) -> None:
    """Create every packed array and write it chunk by chunk, ``async.concurrency`` at a time.

    One ``setitem`` per chunk, and every chunk written (even one of zeros): Zarr then encodes
    the caller's memory as it is. A write spanning chunks would first copy each chunk into a
    fresh buffer, and leaving out all-zero chunks costs a scan of every chunk.
    """
    limit = asyncio.Semaphore(zarr.config.get("async.concurrency"))

    async def write_chunk(array: zarr.AsyncArray, data: np.ndarray, start: int) -> None:
        async with limit:
            await array.setitem(slice(start, start + len(data)), data)

    async def write(key: str, data: np.ndarray) -> None:
        (step,) = schema.packed_chunks(data.size, data.itemsize)
        array = await packed_array(group_path, key, data.size, step, data.dtype, create=True)
        await all_or_none(
            write_chunk(array, data[start : start + step], start)
            for start in range(0, data.size, step)
        )

    await all_or_none(write(key, data) for key, data in values.items())


def merged(first: PackedIndex, second: PackedIndex) -> PackedIndex:
    """The index of a group holding the packed arrays of both indexes (their keys distinct)."""
    return {
        schema.PACKED_DIGEST: first[schema.PACKED_DIGEST],
        schema.PACKED_ARRAYS: {**first[schema.PACKED_ARRAYS], **second[schema.PACKED_ARRAYS]},
        schema.PACKED_TENSORS: {**first[schema.PACKED_TENSORS], **second[schema.PACKED_TENSORS]},
    }


def write_packed(group: zarr.Group, packed: Packed) -> PackedIndex:
    """Write ``packed`` into ``group``; returns the ``packed`` index, with the digests.

    The index belongs in the group's commit: set it with ``committed``.
    """
    values = {key: schema.encode_tensor(a).array for key, a in packed.arrays.items()}
    index = _index(packed, values)
    run(_write_arrays(group.store_path, values))
    return index


def metadata_digest(attributes: Mapping[str, Any]) -> str:
    """Digest of a group's attributes (less the digest itself) as JSON holds them."""
    entries = {k: v for k, v in attributes.items() if k != schema.ATTR_METADATA_DIGEST}
    text = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def update_attributes(group: zarr.Group, changes: Mapping[str, Any]) -> None:
    """Apply ``changes`` to ``group``'s attributes, with the digest of all of them once changed.

    Written in one update, so that the digest never describes other attributes than the ones
    stored with it.
    """
    after = {**group.attrs.asdict(), **changes}
    group.update_attributes({**changes, schema.ATTR_METADATA_DIGEST: metadata_digest(after)})


def metadata_problems(group: zarr.Group, where: str) -> list[Damage]:
    """The group's attributes' damage: none where they match their digest or have none."""
    attributes = group.attrs.asdict()
    recorded = attributes.get(schema.ATTR_METADATA_DIGEST)
    if recorded is None or recorded == metadata_digest(attributes):
        return []
    return [Damage(where, (), METADATA_MISMATCH, (f"{group.path}/zarr.json",))]


# -- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fetched:
    """A packed array as read: its values (``None`` when unusable) and unreadable ranges."""

    values: np.ndarray | None
    bad: list[tuple[int, int]]
    reason: str = UNREADABLE
    path: str = ""  # the array's key in the store
    chunk: int = 0  # elements per chunk; 0 when the array could not be opened

    def files(self, start: int, stop: int) -> list[str]:
        """The keys of the chunk files of elements ``start:stop`` that failed to decode.

        All of them when none did (which one a failed digest is in is not known); the array's
        metadata when the array could not be opened.
        """
        if not self.chunk:
            return [f"{self.path}/zarr.json"]
        chunks = range(start // self.chunk, (stop - 1) // self.chunk + 1)
        bad = [
            i
            for i in chunks
            for a, b in self.bad
            if a < (i + 1) * self.chunk and i * self.chunk < b
        ]
        return [f"{self.path}/c/{i}" for i in bad or chunks]


async def _fetch(
    group: zarr.AsyncGroup, key: str, length: int, dtype: np.dtype, limit: asyncio.Semaphore
) -> _Fetched:
    """Read one packed array chunk by chunk, noting the ranges of chunks that fail to decode."""
    path = (group.store_path / key).path
    try:
        array = await zarr.AsyncArray.open(group.store_path / key, zarr_format=3)
    except (FileNotFoundError, ValueError):  # zarr's node-not-found errors are both
        reason = f"packed array {key} is missing or unreadable"
        return _Fetched(None, [(0, length)], reason, path)
    if array.shape != (length,) or array.dtype != dtype:
        reason = f"packed array {key} is {array.dtype}{list(array.shape)}, not {dtype}[{length}]"
        return _Fetched(None, [(0, length)], reason, path)
    values = np.empty(length, dtype=dtype)
    bad: list[tuple[int, int]] = []
    step = array.chunks[0]

    async def read(start: int) -> None:
        stop = min(start + step, length)
        async with limit:
            try:
                values[start:stop] = await array.getitem(slice(start, stop))
            except CODEC_ERRORS:
                bad.append((start, stop))

    await all_or_none(read(start) for start in range(0, length, step))
    return _Fetched(values, bad, UNREADABLE, path, step)


def read_packed(
    group: zarr.Group, wanted: Callable[[str], bool], where: str
) -> tuple[dict[str, dict[str, torch.Tensor]], list[Damage]]:
    """The tensors of the wanted sections of a packed group, verified, and what is damaged.

    Parameters
    ----------
    group
        A committed format-2 checkpoint or frozen group.
    wanted
        Which sections to read (``schema.SECTION_PARAMS``, ...).
    where
        The group in messages (``checkpoint 0000000010_interior``).

    Returns
    -------
    tensors, problems
        ``{section: {name: tensor}}`` of the intact tensors, names in sorted order, and one
        :class:`Damage` per kind of problem with the tensors it affects.

    """
    found = _tensor_index(group)
    if isinstance(found, str):
        return {}, [Damage(where, (), found)]
    digest_of, lengths, indexed = found
    sections = {s: e for s, e in indexed.items() if wanted(s)}
    dtypes = {
        schema.packed_array_key(section, dtype): schema.storage_dtype(dtype)
        for section, entries in sections.items()
        for _, dtype, _, _ in entries
    }
    fetched = run(_fetch_all(_async_group(group), lengths, dtypes))
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    damaged: dict[str, list[str]] = {}
    files: dict[str, set[str]] = {}
    for section, entries in sections.items():
        out = tensors.setdefault(section, {})
        for name, torch_dtype, shape, pieces in entries:
            array = fetched[schema.packed_array_key(section, torch_dtype)]
            label = name if section == schema.SECTION_PARAMS else f"{section}/{name}"
            parts, problem = _pieces(array, pieces, math.prod(shape), digest_of)
            if problem is not None:
                reason, rank, (start, stop) = problem
                damaged.setdefault(reason, []).append(
                    label if rank is None else f"{label} (rank {rank}'s rows)"
                )
                files.setdefault(reason, set()).update(array.files(start, stop))
                continue
            key = schema.packed_array_key(section, torch_dtype)
            values = np.concatenate(parts) if parts else np.empty(0, dtype=dtypes[key])
            out[name] = schema.decode_array(values.reshape(shape), torch_dtype)
    problems = [
        Damage(where, tuple(names), reason, tuple(sorted(files[reason], key=_chunk_order)))
        for reason, names in damaged.items()
    ]
    return tensors, problems


def _chunk_order(key: str) -> tuple[str, int]:
    """Chunk keys ``<array>/c/<i>`` in array then chunk order (``c/10`` after ``c/9``)."""
    head, _, tail = key.rpartition("/")
    return (head, int(tail)) if tail.isdigit() else (key, -1)


#: ``[rank (None: unsharded), offset in the array, first element, count, digest]``.
Piece = list[Any]


def _tensor_index(
    group: zarr.Group,
) -> tuple[Callable[[np.ndarray], str], dict[str, int], dict[str, list[Any]]] | str:
    """A group's ``packed`` or ``sharded`` index as ``[name, dtype, shape, pieces]`` per section.

    Returns the digest function, the arrays' lengths and the entries; or why there is none.
    """
    attrs = group.attrs
    sharded = schema.ATTR_SHARDED in attrs
    index = attrs.get(schema.ATTR_SHARDED if sharded else schema.ATTR_PACKED)
    if not isinstance(index, dict) or index.get(schema.PACKED_DIGEST) not in _TENSOR_DIGESTS:
        return f"no '{schema.ATTR_PACKED}' index of its tensors"
    entries = index[schema.PACKED_TENSORS]
    if not sharded:
        entries = {
            section: [
                [name, dtype, shape, [[None, offset, 0, math.prod(shape), expected]]]
                for name, dtype, offset, shape, expected in rows
            ]
            for section, rows in entries.items()
        }
    lengths = {key: int(n) for key, n in index[schema.PACKED_ARRAYS].items()}
    return _TENSOR_DIGESTS[index[schema.PACKED_DIGEST]], lengths, entries


def tensor_digests(group: zarr.Group, sections: Sequence[str]) -> dict[str, str]:
    """The recorded digest of each tensor of ``sections`` in a committed group, by name.

    A sharded tensor's is its pieces' digests joined. Empty where the group has no index.
    """
    found = _tensor_index(group)
    if isinstance(found, str):
        return {}
    entries = found[2]
    return {
        name: "/".join(str(piece[-1]) for piece in pieces)
        for section in sections
        for name, _, _, pieces in entries.get(section, [])
    }


def _pieces(
    array: _Fetched, pieces: list[Piece], numel: int, digest_of: Callable[[np.ndarray], str]
) -> tuple[list[np.ndarray], tuple[str, int | None, tuple[int, int]] | None]:
    """A tensor's pieces read from ``array`` and verified, or its first problem.

    The problem is its reason, the piece's rank and the range of the array's elements it
    concerns.
    """
    parts = []
    expected_first = 0
    for rank, offset, first, count, expected in pieces:
        stop = offset + count
        if first != expected_first:
            return [], ("its pieces in the index do not cover the tensor", rank, (offset, stop))
        expected_first += count
        if array.values is None or any(a < stop and offset < b for a, b in array.bad):
            return [], (array.reason, rank, (offset, stop))
        part = array.values[offset:stop]
        if digest_of(part) != expected:
            return [], (MISMATCH, rank, (offset, stop))
        parts.append(part)
    if expected_first != numel:
        whole = (pieces[0][1], pieces[-1][1] + pieces[-1][3]) if pieces else (0, 1)
        return [], ("its pieces in the index do not cover the tensor", None, whole)
    return parts, None


async def _fetch_all(
    group: zarr.AsyncGroup, lengths: Mapping[str, int], dtypes: Mapping[str, np.dtype]
) -> dict[str, _Fetched]:
    """Every array of ``dtypes`` read concurrently, ``async.concurrency`` chunks at a time."""
    limit = asyncio.Semaphore(zarr.config.get("async.concurrency"))
    keys = list(dtypes)
    results = await all_or_none(
        _fetch(group, key, int(lengths.get(key, 0)), dtypes[key], limit) for key in keys
    )
    return dict(zip(keys, results, strict=True))


async def all_or_none(coroutines: Iterable[Awaitable[Any]]) -> list[Any]:
    """Await every coroutine concurrently; on the first failure cancel the others and raise it.

    (``asyncio.gather`` would leave the others running, writing after the failure.)
    """
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


# -- step rows ---------------------------------------------------------------------------------


def row_blocks(start: int, stop: int) -> range:
    """Indices of the ``schema.STEP_ROW_CHUNK``-row blocks that rows ``[start, stop)`` touch."""
    size = schema.STEP_ROW_CHUNK
    return range(start // size, -(-stop // size))


def row_digests(values: np.ndarray, first: int) -> dict[int, str]:
    """Digest of every block of rows in ``values``, whose first row is ``first`` (block-aligned).

    A block's digest covers its rows in ``values`` only, so the last block may be partial.
    """
    size = schema.STEP_ROW_CHUNK
    return {
        block: digest(values[block * size - first : (block + 1) * size - first])
        for block in row_blocks(first, first + len(values))
    }


def row_problems(
    arrays: Mapping[str, zarr.Array],
    columns: Mapping[str, np.ndarray],
    first: int,
    recorded: Mapping[str, Sequence[str]],
) -> list[Damage]:
    """Step arrays whose rows ``first..`` (block-aligned) differ from their recorded digests."""
    size = schema.STEP_ROW_CHUNK
    damaged: list[Damage] = []
    for name, values in columns.items():
        digests = recorded.get(name, [])
        blocks = [
            block
            for block, value in row_digests(values, first).items()
            if block >= len(digests) or digests[block] != value
        ]
        if blocks:
            rows = ", ".join(
                f"{b * size}..{min((b + 1) * size, first + len(values)) - 1}" for b in blocks
            )
            reason = f"rows {rows}: {MISMATCH}"
            damaged.append(Damage("steps", (name,), reason, _row_files(arrays[name], blocks)))
    return damaged


def _unreadable_blocks(array: zarr.Array, start: int, stop: int) -> list[int]:
    """The row blocks of ``[start, stop)`` that fail to decode (all, where none fails alone)."""
    size = schema.STEP_ROW_CHUNK
    blocks = row_blocks(start, stop)
    bad = []
    for block in blocks:
        try:
            array[max(start, block * size) : min(stop, (block + 1) * size)]
        except CODEC_ERRORS:
            bad.append(block)
    return bad or list(blocks)


def _row_files(array: zarr.Array, blocks: Iterable[int]) -> tuple[str, ...]:
    """Keys of the chunk files that hold the row ``blocks`` of a step array."""
    across = [range(-(-n // c)) for n, c in zip(array.shape[1:], array.chunks[1:], strict=True)]
    return tuple(
        f"{array.path}/{array.metadata.encode_chunk_key(coords)}"
        for block in blocks
        for coords in itertools.product([block], *across)
    )


def write_row_blocks(
    arrays: Mapping[str, zarr.Array], first: int, rows: Mapping[str, np.ndarray]
) -> None:
    """Write every step array's rows from ``first`` (a multiple of ``STEP_ROW_CHUNK``) on.

    Whole chunks are written, the rows after ``rows`` holding fill values, so that no chunk is
    read back to be merged; an array grows a chunk's worth of rows at a time. All arrays are
    written concurrently, in one round trip to Zarr's event loop: every synchronous call costs
    the writer thread a hand-off of the interpreter lock to that loop and back, which the
    training thread feels.
    """

    async def write(array: zarr.AsyncArray, values: np.ndarray) -> None:
        chunk = schema.STEP_ROW_CHUNK
        capacity = -(-(first + len(values)) // chunk) * chunk
        if array.shape[0] < capacity:
            await array.resize((capacity, *array.shape[1:]))
        whole = np.full((capacity - first, *values.shape[1:]), array.metadata.fill_value)
        whole = whole.astype(values.dtype, copy=False)
        whole[: len(values)] = values
        await array.setitem(slice(first, capacity), whole)

    run(all_or_none(write(arrays[name].async_array, rows[name]) for name in rows))


def read_rows(
    arrays: Mapping[str, zarr.Array],
    start: int,
    stop: int,
    recorded: Mapping[str, Sequence[str]] | None,
) -> tuple[dict[str, np.ndarray], list[Damage]]:
    """Rows ``[start, stop)`` of the step arrays that read back intact, and the problems.

    Parameters
    ----------
    arrays
        The step arrays by name.
    start, stop
        ``start`` is a multiple of ``STEP_ROW_CHUNK``; ``stop`` ends a block or is ``num_steps``.
    recorded
        The ``row_digests`` attribute; ``None`` for a format-1 store (nothing to check against).

    """
    columns: dict[str, np.ndarray] = {}
    problems: list[Damage] = []
    for name, array in arrays.items():
        try:
            values = array[start:stop]
        except CODEC_ERRORS:
            files = _row_files(array, _unreadable_blocks(array, start, stop))
            problems.append(Damage("steps", (name,), UNREADABLE, files))
            continue
        if len(values) < stop - start:
            reason = f"holds {array.shape[0]} rows, fewer than the {stop} recorded"
            problems.append(Damage("steps", (name,), reason, (f"{array.path}/zarr.json",)))
            continue
        columns[name] = values
    if recorded is not None:
        missing = tuple(sorted(set(recorded) - set(arrays)))
        if missing and stop > start:
            problems.append(Damage("steps", missing, "array is missing"))
        problems += row_problems(arrays, columns, start, recorded)
    return columns, problems
