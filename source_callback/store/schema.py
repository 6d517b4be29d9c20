"""The store's schema: every group, array and attribute name of format versions 1 and 2.

This is the only module that spells the store's names. The writer and the reader import them
from here; ``docs/store-format.md`` documents the same layout for people.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import zarr
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from source_callback.errors import FormatVersionError, NotAStoreError
from source_callback.optim import OptimizerRecord

FORMAT_NAME = "source-callback"
FORMAT_VERSION = 2
#: Format 1 held one Zarr array per tensor, without checksums: still read, no longer written.
FORMAT_PER_TENSOR_ARRAYS = 1

# Root attributes.
ATTR_FORMAT = "source_callback"  # {FORMAT_KEY: FORMAT_NAME, FORMAT_VERSION_KEY: FORMAT_VERSION}
FORMAT_KEY = "format"
FORMAT_VERSION_KEY = "version"
ATTR_VERSIONS = "library_versions"
ATTR_STATUS = "status"
ATTR_MANIFEST = "model_manifest"  # format 1 only: the run's one manifest (now per stage)
STATUS_RECORDING = "recording"
STATUS_COMPLETE = "complete"

# Per-step arrays: one row per optimizer step, global index across stages.
STEPS = "steps"
ATTR_NUM_STEPS = "num_steps"  # rows fully written; arrays may be longer after a crash
STEP_STAGE = "stage"
STEP_EPOCH = "epoch"
STEP_LOSS = "loss"
STEP_EXAMPLES = "examples"
# The factor by which the framework scaled the step's gradient, against the mean gradient of
# its examples: clipping by norm (``limit / (norm + 1e-6)`` where it bound) times, for a last
# accumulation window of m < k micro-batches whose losses were each divided by k, m / k. 1 where
# neither; 0 where the optimizer did not step (fp16's loss scaler skipped it: no update, no
# weight decay); NaN where unknown (clipping by value, or by a factor not seen). Stores
# written before it have no such array (read as 1).
STEP_SCALE = "scale"
# Per-step, per-param-group hyperparameters ([steps, groups], NaN where a group or field is absent).
STEP_LR = "lr"
STEP_MOMENTUM = "momentum"  # SGD's momentum, or Adam's beta1
STEP_BETA2 = "beta2"
STEP_WEIGHT_DECAY = "weight_decay"
STEP_DAMPENING = "dampening"
STEP_EPS = "eps"
STEP_GROUP_FIELDS = (
    STEP_LR,
    STEP_MOMENTUM,
    STEP_BETA2,
    STEP_WEIGHT_DECAY,
    STEP_DAMPENING,
    STEP_EPS,
)
STEP_ROW_CHUNK = 4096
# Format 2: {array name: [digest of rows [k·STEP_ROW_CHUNK, (k+1)·STEP_ROW_CHUNK) ∩ [0, num_steps)
# for every k]}, written with num_steps in one update; see ``store.integrity``.
ATTR_ROW_DIGESTS = "row_digests"


def step_codecs() -> tuple[BytesBytesCodec, ...]:
    """Compressors of the step arrays (format 2): Zarr's default zstd, then a chunk checksum."""
    return ZstdCodec(level=0), Crc32cCodec()


# Per-example digests of each stage's training set (``fingerprint.example_digests``), format 2:
# ``examples/<stage index>`` uint64 [N_s] in training-index order, written before the stage
# is complete, with attribute ``digest`` (``store.integrity.digest`` of the values).
EXAMPLES = "examples"
ATTR_DIGEST = "digest"


def examples_key(stage_index: int) -> str:
    """Name of one stage's array of example digests under ``examples``."""
    return f"{stage_index:04d}"


# Stages: a list of JSON entries in the attributes of the ``stages`` group.
STAGES = "stages"
ATTR_STAGE_LIST = "stages"
STAGE_RECORDING = "recording"
STAGE_COMPLETE = "complete"

# Checkpoints: one group per checkpoint under ``checkpoints``.
CHECKPOINTS = "checkpoints"
CKPT_PARAMS = "params"
CKPT_BUFFERS = "buffers"
CKPT_OPTIMIZER = "optimizer"
ATTR_STEP = "step"
ATTR_STAGE = "stage"
ATTR_ROLE = "role"
ATTR_COMMITTED = "committed"
ATTR_SCALAR_STATE = "scalar_state"  # {state key: {param name: number}} for 0-d optimizer state
ROLE_START = "stage-start"
ROLE_INTERIOR = "interior"
ROLE_END = "stage-end"

# Non-trainable parameters, once per stage: ``frozen/<stage index>/``.
FROZEN = "frozen"

# Format 2 packs the tensors of a checkpoint (or frozen) group by section and dtype: one 1-d
# array per (section, torch dtype), named by ``packed_array_key``, directly in the group. The
# group's ``packed`` attribute, written with ``committed: true``, indexes them:
#     {"digest": TENSOR_DIGEST, "arrays": {array key: length},
#      "tensors": {section: [[name, torch dtype, offset, shape, digest], ...]}}
# Sections: "params", "buffers", and "optimizer.<state key>" per optimizer state.
ATTR_PACKED = "packed"
# A sharded checkpoint (FSDP2; ``source_callback.store.shards``) has the same arrays laid out
# rank-major, and a ``sharded`` attribute in place of ``packed``, listing each tensor's pieces
# (every rank's rows of it, in element order) with their digests:
#     {"digest": TENSOR_DIGEST, "arrays": {array key: length}, "ranks": W,
#      "tensors": {section: [[name, torch dtype, shape,
#                             [[rank, offset, first element, count, digest], ...]], ...]}}
ATTR_SHARDED = "sharded"
# The digest of a group's other attributes, written with them (``integrity.update_attributes``): a
# committed checkpoint's or frozen group's commit record, the stage list, the step rows' count
# and digests. Groups written before it was introduced have none, and are not checked.
ATTR_METADATA_DIGEST = "metadata_digest"
SHARDED_RANKS = "ranks"
PACKED_DIGEST = "digest"
PACKED_ARRAYS = "arrays"
PACKED_TENSORS = "tensors"
SECTION_PARAMS = "params"
SECTION_BUFFERS = "buffers"
# The probe (format 2, optional): the training loss of a few fixed examples of the stage's
# training set at this checkpoint, as the LightningModule's ``training_step`` computed it on a
# batch of each one alone, in eval mode. Two tensors of the section: the examples' indices
# (int64 [P], the same at every checkpoint of a stage) and their losses (float64 [P]).
SECTION_PROBE = "probe"
PROBE_INDEX = "index"
PROBE_LOSS = "loss"
_SECTION_OPTIMIZER = "optimizer."
#: The digest of step rows and example digests: the first 16 bytes of the SHA-256 of their
#: stored (little-endian) bytes, as 32 hex digits. The first format-2 writer digested packed
#: tensors this way too (its index says so).
DIGEST = "sha256-128"
#: The digest of a packed tensor: the CRC-32C of its stored bytes, as 8 hex digits (the
#: checkpoint's bytes pass through it once, at several GB/s, where SHA-256 costs a core-second
#: per 1.8 GB; benchmarks/overhead.py).
TENSOR_DIGEST = "crc32c"


def optimizer_section(state_key: str) -> str:
    """Section holding one optimizer state (``exp_avg_sq``, ``momentum_buffer``, ...)."""
    return _SECTION_OPTIMIZER + state_key


def optimizer_state_key(section: str) -> str | None:
    """Inverse of :func:`optimizer_section`; ``None`` for a section that is no optimizer state."""
    if not section.startswith(_SECTION_OPTIMIZER):
        return None
    return section.removeprefix(_SECTION_OPTIMIZER)


def packed_array_key(section: str, torch_dtype: str) -> str:
    """Name of the packed array of one section and torch dtype: ``params.float32``."""
    return f"{section}.{torch_dtype}"


# Results written back by the analysis (``source_callback.store.analyses`` owns this layout).
# ``analyses/<name>/`` holds versions: ``results-<token>/`` and ``cache-<token>/``; its attribute
# ``committed_versions`` ({"results": key, "cache": key}) names the committed one of each kind.
# A results version: ``scores/<stage index>`` [queries, stage examples] chunked by training
# index, plus named result arrays; attributes hold the configuration and a committed flag.
# (Stores written before versions hold one results layout directly in ``analyses/<name>/``.)
ANALYSES = "analyses"
ATTR_VERSIONS = "committed_versions"
RESULTS_VERSION = "results"
CACHE_VERSION = "cache"
INFO_CREATED = "created"  # key of the ``analysis`` attribute: when the results were committed
INFO_STAGE_NAMES = "stage_names"  # key of the ``analysis`` attribute: the stages, in order
INFO_CONFIG = "config"  # key of the ``analysis`` attribute: the settings (``AnalysisOptions``)
# The settings are keyed by the names of ``AnalysisOptions``' fields, and besides them:
CONFIG_COVERAGE = "coverage"  # {stage name: share of its trained parameters attributed}
ANALYSIS_SCORES = "scores"
ANALYSIS_EFFECTS = "stage_effects"  # [queries, stages]
ANALYSIS_LAST_EXACT = "last_stage_exact"  # [queries]
ATTR_ANALYSIS = "analysis"  # {INFO_STAGE_NAMES: [...], INFO_CONFIG: {...}, INFO_CREATED: ...}
SCORE_CHUNK = (256, 4096)  # [queries, training examples]: a column block reads on its own


def score_codecs() -> tuple[BytesBytesCodec, ...]:
    """Codecs of the score arrays: a chunk checksum, verified on every read; no compression.

    Scores are dense float64 that zstd shrinks by 3 %, at 180 MiB/s written and 470 MiB/s
    read, against 980 and 1,800 MiB/s for the checksum alone (``[256, 4096]`` chunks on a
    local disk), and out-of-core analyses and ``top`` go through every chunk. Analyses written
    before kept zstd and read as before.
    """
    return (Crc32cCodec(),)


def scores_key(stage_index: int) -> str:
    """Name of one stage's score array under ``analyses/<name>/scores``."""
    return f"{stage_index:04d}"


# Projected-gradient cache of an analysis: a ``cache-<token>/`` version of ``analyses/<name>/``
# (``analyses/<name>/cache/`` before versions), attributes ``cache`` and ``committed``.
# ``operators/<segment>/`` holds one segment operator: its structure as JSON in the
# ``operator`` attribute, its tensors as arrays named by ``cache_tensor_key``.
# ``gradients/<segment>`` is ``[N_s, D]`` float32: each training example's projected gradient
# (mean over the segment's checkpoints), rows in training-index order, NaN until written.
ANALYSIS_CACHE = "cache"  # the cache's place before versions
CACHE_OPERATORS = "operators"
CACHE_GRADIENTS = "gradients"
ATTR_CACHE = "cache"  # {CACHE_INFO_CONFIG: {...}, CACHE_INFO_PROJECTION: {...}}
CACHE_INFO_CONFIG = "config"  # the settings the cache was built with, compared before reuse
CACHE_INFO_PROJECTION = "projection"  # ``KroneckerProjection.describe()``
ATTR_OPERATOR = "operator"
CACHE_DTYPE = "float32"
#: Largest chunk of a cached gradient array.
CACHE_CHUNK_BYTES = 32 * 2**20
# Tags of the JSON nodes of an ``operator`` attribute (other nodes are JSON scalars): a tensor
# (its array name, or [name, order] for a tensor stored as ``tensor.permute(order)``), a
# dataclass ({"type": name, "fields": {...}}), a dict and a list (lists of entries) and a
# non-finite float ("nan", "inf", "-inf").
SPEC_TENSOR = "tensor"
SPEC_DATACLASS = "dataclass"
SPEC_TYPE = "type"
SPEC_FIELDS = "fields"
SPEC_DICT = "dict"
SPEC_LIST = "list"
SPEC_FLOAT = "float"


def segment_key(segment: int) -> str:
    """Name of one segment's group or array under ``cache/operators`` and ``cache/gradients``."""
    return f"{segment:04d}"


def cache_tensor_key(index: int) -> str:
    """Name of the ``index``-th tensor of a cached operator's group."""
    return str(index)


def cache_codecs() -> BloscCodec:
    """Compressor of cached gradients: zstd over bit-shuffled bytes.

    Projected gradients are near-Gaussian floats: this stores them at about 0.88 of the raw
    size, against 0.93 for zstd without the shuffle.
    """
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def cache_chunks(width: int) -> tuple[int, int]:
    """Chunk shape of a ``[N, width]`` cached gradient array.

    Rows: the largest power of two up to ``SCORE_CHUNK[1]`` (4096) whose chunk stays within
    ``CACHE_CHUNK_BYTES``. It divides 4096, so writers of whole 4096-row blocks never share a
    chunk. A row wider than the limit (not expected) is split into column chunks.
    """
    itemsize = np.dtype(CACHE_DTYPE).itemsize
    width = max(width, 1)
    rows = SCORE_CHUNK[1]
    while rows > 1 and rows * width * itemsize > CACHE_CHUNK_BYTES:
        rows //= 2
    return rows, min(width, max(1, CACHE_CHUNK_BYTES // itemsize))


# Tensor encoding: the torch dtype is kept in an array attribute; dtypes numpy lacks are stored
# as same-width unsigned integers and viewed back on read.
ATTR_TORCH_DTYPE = "torch_dtype"
_NUMPY_LACKS = {
    torch.bfloat16: torch.uint16,
    torch.float8_e4m3fn: torch.uint8,
    torch.float8_e5m2: torch.uint8,
}


def stage_manifest(stage: Stage, root: zarr.Group) -> list[dict[str, Any]]:
    """The manifest of ``stage``'s model (the run's one manifest in format-1 stores)."""
    if stage.manifest is not None:
        return stage.manifest
    return list(root.attrs.get(ATTR_MANIFEST, []))


def check_format(root: zarr.Group, url: str) -> None:
    """Raise unless ``root`` is a source-callback store of a version this library reads."""
    marker = root.attrs.get(ATTR_FORMAT)
    if not isinstance(marker, dict) or marker.get(FORMAT_KEY) != FORMAT_NAME:
        raise NotAStoreError(
            f"{url} is a Zarr group but not a source-callback store (no "
            f"'{ATTR_FORMAT}' attribute). Point SourceCallback/open_run at a new or "
            "existing source-callback store; nothing was changed at this location."
        )
    version = marker.get(FORMAT_VERSION_KEY)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{url} has store format version {version!r}; this source-callback reads up to "
            f"version {FORMAT_VERSION}. Upgrade source-callback to use this store."
        )


def packed_codecs() -> tuple[BytesBytesCodec, ...]:
    """Compressors of a packed array: none.

    The tensors' digests find any damage. LZ4 would save about 12% of the bytes of float32
    weights at about a core-second per 1.6 GB written, and a CRC-32C of every chunk another
    (Zarr appends it by copying the chunk), both competing with training for the CPU; the
    first format-2 writer used both, and its stores read as before.
    """
    return ()


def tensor_codecs() -> BloscCodec:
    """Compressor for checkpoint tensors.

    LZ4 over bit-shuffled bytes: as small as zstd level 3 on float weights (about 0.86 of the
    raw size) at less than half its cost, which keeps the background writer off the critical
    path (``benchmarks/overhead.py``).
    """
    return BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")


#: Largest checkpoint chunk; a tensor up to this size is one chunk (one object on S3).
TENSOR_CHUNK_BYTES = 32 * 2**20


def tensor_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunk shape of a stored tensor: whole, or split along its first axis above the limit."""
    if not shape:
        return ()
    row_bytes = itemsize * max(1, int(np.prod(shape[1:])))
    rows = max(1, min(shape[0], TENSOR_CHUNK_BYTES // row_bytes))
    return (max(rows, 1), *(max(d, 1) for d in shape[1:]))


def packed_chunks(length: int, itemsize: int) -> tuple[int]:
    """Chunk of a packed array: the whole array up to ``TENSOR_CHUNK_BYTES``, else that much.

    A tensor may span chunks; a small checkpoint is one object per packed array.
    """
    return (max(1, min(length, TENSOR_CHUNK_BYTES // itemsize)),)


def storage_dtype(torch_dtype: str) -> np.dtype:
    """The numpy dtype a tensor of ``torch_dtype`` is stored as (see :func:`encode_tensor`)."""
    dtype = getattr(torch, torch_dtype)
    return torch.empty(0, dtype=_NUMPY_LACKS.get(dtype, dtype)).numpy().dtype


def checkpoint_key(step: int, role: str) -> str:
    """Name of a checkpoint's group: sorts by step, then stage-end before stage-start."""
    return f"{step:010d}_{role}"


def parse_checkpoint_key(key: str) -> tuple[int, str]:
    """Inverse of :func:`checkpoint_key`: ``(step, role)``."""
    step, role = key.split("_", 1)
    return int(step), role


def frozen_key(stage_index: int) -> str:
    """Name of the group holding one stage's frozen parameters under ``FROZEN``."""
    return f"{stage_index:04d}"


def parse_frozen_key(key: str) -> int:
    """Inverse of :func:`frozen_key`: the stage index."""
    return int(key)


@dataclass(frozen=True)
class EncodedTensor:
    """A tensor as stored: a numpy array plus the torch dtype needed to read it back."""

    array: np.ndarray
    torch_dtype: str


def dtype_name(dtype: torch.dtype) -> str:
    """The name a torch dtype is stored under (``"float32"``, ``"bfloat16"``, ...)."""
    return str(dtype).removeprefix("torch.")


def encode_tensor(tensor: torch.Tensor) -> EncodedTensor:
    """Encode a CPU tensor for storage without changing its dtype's precision."""
    tensor = tensor.detach()
    name = dtype_name(tensor.dtype)
    if tensor.dtype in _NUMPY_LACKS:
        tensor = tensor.view(_NUMPY_LACKS[tensor.dtype])
    return EncodedTensor(tensor.contiguous().numpy(), name)


def decode_array(array: np.ndarray, torch_dtype: str) -> torch.Tensor:
    """Inverse of :func:`encode_tensor`."""
    dtype = getattr(torch, torch_dtype)
    tensor = torch.from_numpy(np.asarray(array, order="C"))  # (ascontiguousarray makes 0-d 1-d)
    if dtype in _NUMPY_LACKS:
        tensor = tensor.view(dtype)
    return tensor


@dataclass(frozen=True)
class Stage:
    """One stage of a run as recorded (an entry of the ``stages`` group's attribute list).

    Attributes
    ----------
    index, name
        Position in the run and unique name (``pretrain``, ``sft``, ...).
    status
        ``recording`` while the stage trains (or after it was interrupted), then ``complete``.
    first_step, last_step
        Global optimizer steps (inclusive); ``last_step`` is ``None`` until the stage ends.
    planned_checkpoints
        Global steps of the interior checkpoints planned at stage start.
    num_examples, fingerprint
        Training set size N_s and :func:`source_callback.fingerprint.dataset_fingerprint`.
    batch_size, accumulate_grad_batches, world_size
        Per-process batch size and how many batches and processes make one optimizer step.
    precision
        Lightning's precision setting (``32-true``, ``bf16-mixed``, ...).
    estimated_steps, checkpoints_per_stage
        What the checkpoint plan was computed from.
    optimizer
        The optimizer's description.
    trainable, frozen
        Names of the parameters the optimizer updates, and of the others.
    manifest
        The model's tensors in this stage (:func:`source_callback.manifest.model_manifest`);
        ``None`` in stores of format version 1, where the run's one manifest holds.
    continues
        This stage's tensor name -> ``[the previous stage's name, how it was matched]`` for
        every tensor that continues one of the previous stage
        (:class:`source_callback.lineage.Continuation`); ``None`` for the first stage and in
        stores of format version 1 (where every tensor continues the one of its name).
    probe
        Why the stage's checkpoints hold no probe losses (``training_step`` returned no loss,
        manual optimization, an iterable dataset, ...); ``None`` when they do, and in stores
        written before probes were recorded (whose checkpoints hold none either).
    recorded_by
        The framework whose adapter recorded the stage (``lightning``, ``transformers``);
        ``None`` in stores written before it was recorded. The analysis names it in messages
        only.

    """

    index: int
    name: str
    status: str
    first_step: int
    last_step: int | None
    planned_checkpoints: list[int]
    num_examples: int | None
    fingerprint: str | None
    batch_size: int | None
    accumulate_grad_batches: int
    world_size: int
    precision: str
    estimated_steps: float | None
    checkpoints_per_stage: int
    optimizer: OptimizerRecord
    trainable: list[str]
    frozen: list[str]
    manifest: list[dict[str, Any]] | None = None
    continues: dict[str, list[str]] | None = None
    probe: str | None = None
    recorded_by: str | None = None

    @property
    def num_steps(self) -> int | None:
        """Optimizer steps in the stage, once it is complete."""
        return None if self.last_step is None else self.last_step - self.first_step + 1

    @property
    def complete(self) -> bool:
        """Whether the stage ended normally."""
        return self.status == STAGE_COMPLETE

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form stored in the ``stages`` attribute."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["optimizer"] = self.optimizer.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Stage:
        """Inverse of :meth:`to_json`."""
        # Fields added by later versions have defaults: entries written before them lack them.
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        values["optimizer"] = OptimizerRecord.from_json(data["optimizer"])
        return cls(**values)
