"""Read a store back: a validated, read-only, typed view of a recorded run."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from source_callback.errors import Damage, DamagedStoreError, StoreError
from source_callback.lineage import Continuation, StageChange, stage_change
from source_callback.manifest import Manifest
from source_callback.optim import OptimizerRecord
from source_callback.store import integrity, location, schema
from source_callback.store.analyses import StoredAnalysis, read_analysis, stored_analyses
from source_callback.store.schema import Stage


def read_tensors(group: zarr.Group) -> dict[str, torch.Tensor]:
    """Every array of ``group`` as a tensor of its recorded dtype, by name (format-1 layout).

    The group's arrays are listed and then read concurrently on Zarr's event loop, at most
    ``zarr.config.get("async.concurrency")`` at a time (environment variable
    ``ZARR_ASYNC__CONCURRENCY``): over S3 a checkpoint of hundreds of tensors costs a few
    round trips rather than one per tensor.

    Parameters
    ----------
    group
        A group of arrays written by ``source_callback.store.writer.write_tensors``.

    Returns
    -------
    dict[str, torch.Tensor]
        By array name, in name order.

    """
    return _read_tree(group, max_depth=0)


def _read_tree(group: zarr.Group, max_depth: int) -> dict[str, torch.Tensor]:
    """The arrays of ``group`` and of its subgroups ``max_depth`` levels down, read concurrently.

    Keys are paths relative to ``group`` (``exp_avg/fc.weight`` at depth 1), sorted by their
    components.
    """
    # zarr.Group has no public accessor for its async twin (zarr.Array has ``async_array``);
    # one built from the group's metadata and store path costs no request.
    async_group = zarr.AsyncGroup(metadata=group.metadata, store_path=group.store_path)
    read = sync(_read_arrays(async_group, max_depth), timeout=zarr.config.get("async.timeout"))
    return {
        path: schema.decode_array(values, torch_dtype)
        for path, (values, torch_dtype) in sorted(read.items(), key=lambda kv: kv[0].split("/"))
    }


async def _read_arrays(group: zarr.AsyncGroup, max_depth: int) -> dict[str, tuple[Any, str]]:
    """``{path: (values, torch dtype)}`` of every array under ``group``, fetched concurrently.

    Each array's read starts as soon as the listing yields it (the listing fetches the members'
    metadata concurrently, but walks subgroups one after another).
    """
    # A read fans out over the array's own chunks too (a tensor above TENSOR_CHUNK_BYTES has
    # several): bounding the arrays in flight keeps a large checkpoint from opening hundreds of
    # connections at once.
    limit = asyncio.Semaphore(zarr.config.get("async.concurrency"))

    async def read(array: zarr.AsyncArray) -> Any:
        async with limit:
            return await integrity.checked(array).getitem(...)

    reads: dict[str, tuple[zarr.AsyncArray, asyncio.Task[Any]]] = {}
    try:
        async for path, node in group.members(max_depth=max_depth):
            if isinstance(node, zarr.AsyncArray):
                reads[path] = (node, asyncio.create_task(read(node)))
        values = await asyncio.gather(*(task for _, task in reads.values()))
    except BaseException:
        for _, task in reads.values():
            task.cancel()
        raise
    return {
        path: (value, array.attrs[schema.ATTR_TORCH_DTYPE])
        for (path, (array, _)), value in zip(reads.items(), values, strict=True)
    }


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint in the store; tensors are read only when asked for.

    Attributes
    ----------
    key
        Name of the checkpoint's group under ``checkpoints/`` (``0000000010_interior``).
    step
        Global optimizer step; the parameters are those *before* this step (for a stage-end
        checkpoint: after the stage's last step).
    stage
        Index of the stage it belongs to.
    role
        ``stage-start``, ``interior`` or ``stage-end``.
    committed
        Whether every array was written; uncommitted checkpoints come from an interrupted write
        and hold incomplete data.

    """

    key: str
    step: int
    stage: int
    role: str
    committed: bool
    _group: zarr.Group
    _run: Run

    def _require_committed(self) -> None:
        if not self.committed:
            raise StoreError(
                f"checkpoint {self.key} in {self._run.url} was never committed (its write was "
                "interrupted); its arrays are incomplete. Use a committed checkpoint."
            )

    @property
    def _where(self) -> str:
        return f"checkpoint {self.key}"

    def _read(self, wanted: Callable[[str], bool]) -> dict[str, dict[str, torch.Tensor]]:
        """The wanted sections' tensors, verified: ``{section: {name: tensor}}``."""
        self._require_committed()
        return self._run._read_group(self._group, wanted, self._where)

    def params(self, include_frozen: bool = True) -> dict[str, torch.Tensor]:
        """Parameters by name: the trainable ones, plus the stage's frozen ones by default.

        Raises
        ------
        StoreError
            The checkpoint was never committed.
        DamagedStoreError
            A tensor does not read back as it was written (format 2 checks every read).

        """
        params = self._read(_only(schema.SECTION_PARAMS)).get(schema.SECTION_PARAMS, {})
        if include_frozen:
            params.update(self._run.frozen_params(self.stage))
        return params

    def buffers(self) -> dict[str, torch.Tensor]:
        """Module buffers (e.g. batch-norm statistics) by name."""
        return self._read(_only(schema.SECTION_BUFFERS)).get(schema.SECTION_BUFFERS, {})

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer state by parameter name, as in ``torch.optim.Optimizer.state``.

        E.g. ``{"fc.weight": {"exp_avg_sq": tensor, "step": tensor(12.)}}`` for Adam or
        ``{"fc.weight": {"momentum_buffer": tensor}}`` for SGD with momentum. Empty at a
        stage-start checkpoint (the optimizer has taken no step yet).
        """
        state: dict[str, dict[str, torch.Tensor]] = {}
        for section, tensors in self._read(_is_optimizer_state).items():
            key = schema.optimizer_state_key(section)
            for name, tensor in tensors.items():
                state.setdefault(name, {})[key] = tensor  # type: ignore[index]
        scalars = self._group.attrs.get(schema.ATTR_SCALAR_STATE, {})
        for key, values in scalars.items():
            for name, value in values.items():
                state.setdefault(name, {})[key] = torch.tensor(value, dtype=torch.float32)
        return {name: state[name] for name in sorted(state)}

    def probe(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The probe recorded with this checkpoint: example indices (int64) and losses (float64).

        ``None`` when none was recorded (format 1, stores written before probes, or a stage
        whose ``training_step`` could not be used: see ``Stage.probe``).

        Raises
        ------
        DamagedStoreError
            The probe does not read back as it was written.

        """
        if not self._run._packed:
            return None
        probe = self._read(_only(schema.SECTION_PROBE)).get(schema.SECTION_PROBE)
        if not probe:
            return None
        return probe[schema.PROBE_INDEX].numpy(), probe[schema.PROBE_LOSS].numpy()

    def nbytes(self) -> int:
        """Uncompressed size of the checkpoint's arrays."""
        if self._run._packed:
            return sum(array.nbytes for _, array in self._group.arrays())
        total = 0
        for name in (schema.CKPT_PARAMS, schema.CKPT_BUFFERS):
            group = self._group.get(name)
            if isinstance(group, zarr.Group):
                total += sum(a.nbytes for _, a in group.arrays())
        optimizer_group = self._group.get(schema.CKPT_OPTIMIZER)
        if isinstance(optimizer_group, zarr.Group):
            for _, sub in optimizer_group.groups():
                total += sum(a.nbytes for _, a in sub.arrays())
        return total

    def problems(self) -> list[Damage]:
        """What is damaged in this checkpoint: read and checked in full, nothing raised.

        An uncommitted checkpoint has no problems to report: it is incomplete by definition
        and never read (``committed`` is ``False``).
        """
        if not self.committed:
            return []
        return self._run._check_group(self._group, _everything, self._where)[1]


def _only(section: str) -> Callable[[str], bool]:
    return lambda name: name == section


def _is_optimizer_state(section: str) -> bool:
    return schema.optimizer_state_key(section) is not None


def _everything(section: str) -> bool:
    return True


def _legacy_sections(
    group: zarr.Group, wanted: Callable[[str], bool]
) -> dict[str, dict[str, torch.Tensor]]:
    """The wanted sections of a format-1 checkpoint: one array per tensor, in subgroups."""
    sections = {}
    for section in (schema.SECTION_PARAMS, schema.SECTION_BUFFERS):
        sub = group.get(section)
        if wanted(section) and isinstance(sub, zarr.Group):
            sections[section] = read_tensors(sub)
    optimizer_group = group.get(schema.CKPT_OPTIMIZER)
    if isinstance(optimizer_group, zarr.Group) and wanted(schema.optimizer_section("")):
        # ``<state key>/<param name>``: every state key's arrays in one concurrent read.
        for path, tensor in _read_tree(optimizer_group, max_depth=1).items():
            key, name = path.split("/", 1)
            sections.setdefault(schema.optimizer_section(key), {})[name] = tensor
    return sections


class Run:
    """A recorded run, read-only. Open one with :func:`open_run`."""

    def __init__(self, root: zarr.Group, url: str) -> None:
        self._root = root
        self.url = url
        self._packed = self.format_version > schema.FORMAT_PER_TENSOR_ARRAYS

    def _check_group(
        self, group: zarr.Group, wanted: Callable[[str], bool], where: str, frozen: bool = False
    ) -> tuple[dict[str, dict[str, torch.Tensor]], list[Damage]]:
        """The wanted sections of a committed checkpoint or frozen group, and what is damaged.

        Format 2 verifies checksums and digests; format 1 recorded none, so only a read that
        fails is a problem there (its frozen groups hold their arrays directly).
        """
        if self._packed:
            damaged = integrity.metadata_problems(group, where)
            if damaged:  # the index itself may be wrong: read nothing
                return {}, damaged
            return integrity.read_packed(group, wanted, where)
        try:
            if frozen:
                return {schema.SECTION_PARAMS: read_tensors(group)}, []
            return _legacy_sections(group, wanted), []
        except (ValueError, RuntimeError, KeyError, FileNotFoundError) as error:
            return {}, [Damage(where, (), f"cannot be read ({error})")]

    def _read_group(
        self, group: zarr.Group, wanted: Callable[[str], bool], where: str, frozen: bool = False
    ) -> dict[str, dict[str, torch.Tensor]]:
        """As :meth:`_check_group`, raising :class:`DamagedStoreError` on any problem."""
        sections, problems = self._check_group(group, wanted, where, frozen)
        if problems:
            raise DamagedStoreError(self.url, problems)
        return sections

    @property
    def format_version(self) -> int:
        """Store format version."""
        return int(self._root.attrs[schema.ATTR_FORMAT][schema.FORMAT_VERSION_KEY])

    @property
    def status(self) -> str:
        """``recording`` while (or if interrupted while) a stage trains, else ``complete``."""
        return str(self._root.attrs[schema.ATTR_STATUS])

    @property
    def library_versions(self) -> dict[str, str]:
        """Versions of the libraries the store was created with."""
        return dict(self._root.attrs.get(schema.ATTR_VERSIONS, {}))

    @property
    def manifest(self) -> Manifest:
        """The last stage's model: its parameters and buffers (name, kind, shape, dtype)."""
        if not self.stages:
            return []
        return self.stage_manifest(len(self.stages) - 1)

    def stage_manifest(self, index: int) -> Manifest:
        """The parameters and buffers of stage ``index``'s model."""
        return schema.stage_manifest(self.stages[index], self._root)

    def model_changes(self) -> dict[int, StageChange]:
        """What each stage that changed the model changed in it, by stage index."""
        changes = {}
        for index in range(1, len(self.stages)):
            continuation = self.continuation(index)
            assert continuation is not None  # every stage but the first has one
            previous, current = self.stage_manifest(index - 1), self.stage_manifest(index)
            change = stage_change(previous, current, continuation)
            if change.changed:
                changes[index] = change
        return changes

    def continuation(self, index: int) -> Continuation | None:
        """How stage ``index``'s tensors continue stage ``index - 1``'s (``None`` for the first).

        Stores of format version 1 recorded one model for the whole run: every tensor continues
        the one of its name.
        """
        if index == 0:
            return None
        stage = self.stages[index]
        if stage.continues is None:
            return Continuation.same_names(self.stage_manifest(index))
        return Continuation.from_json(stage.continues)

    def _group(self, *path: str, missing_ok: bool = False) -> zarr.Group | None:
        """The group at ``path``; one whose metadata cannot be read is named as damage.

        Raises
        ------
        DamagedStoreError
            Its ``zarr.json`` is not JSON, or not a group's (a partial copy, an edit).
        KeyError
            Nothing is there (``None`` instead with ``missing_ok``).
        """
        key = "/".join(path)
        try:
            return self._root[key]
        except KeyError:
            if missing_ok:
                return None
            raise
        except ValueError as exc:  # json.JSONDecodeError, or zarr's metadata errors
            reason = f"its metadata cannot be read ({exc})"
            damage = Damage(key, (), reason, (f"{key}/zarr.json",))
            raise DamagedStoreError(self.url, [damage]) from exc

    def _member_names(self, path: str) -> list[str]:
        """The names in group ``path``, listed without reading their (maybe damaged) metadata."""
        where = self._root.store_path / path

        async def names() -> list[str]:
            return [name async for name in where.store.list_dir(where.path)]

        return sorted(name for name in integrity.run(names()) if name != "zarr.json")

    @cached_property
    def stages(self) -> list[Stage]:
        """The stages in training order."""
        entries = self._group(schema.STAGES).attrs[schema.ATTR_STAGE_LIST]  # type: ignore[union-attr]
        return [Stage.from_json(e) for e in entries]

    def stage(self, name: str) -> Stage:
        """The stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        known = ", ".join(repr(s.name) for s in self.stages) or "none"
        raise KeyError(f"no stage {name!r} in {self.url}; recorded stages: {known}")

    @property
    def optimizer(self) -> OptimizerRecord | None:
        """The optimizer of the last stage (each stage's is on ``stage.optimizer``)."""
        return self.stages[-1].optimizer if self.stages else None

    @property
    def num_steps(self) -> int:
        """Number of recorded optimizer steps (all stages)."""
        return int(self._group(schema.STEPS).attrs[schema.ATTR_NUM_STEPS])  # type: ignore[union-attr]

    def steps(self) -> dict[str, np.ndarray]:
        """Every per-step array, by field name, in global step order.

        ``stage``, ``epoch``, ``loss``, ``examples`` and ``scale`` (the factor the step's
        gradient was scaled by: clipping; absent in stores recorded before it) have shape
        ``[steps]``; ``lr``, ``momentum`` (β1 for Adam), ``beta2``, ``weight_decay``,
        ``dampening`` and ``eps`` have shape ``[steps, param groups]``, NaN where a stage has
        fewer groups or no such field.

        Raises
        ------
        DamagedStoreError
            Rows do not read back as they were written (format 2 checks every read).

        """
        columns, problems = self._check_steps()
        if problems:
            raise DamagedStoreError(self.url, problems)
        return columns

    def _check_steps(self) -> tuple[dict[str, np.ndarray], list[Damage]]:
        try:
            group = self._group(schema.STEPS)
        except DamagedStoreError as exc:
            return {}, exc.problems
        damaged = integrity.metadata_problems(group, "steps")  # type: ignore[arg-type]
        if damaged:  # the row count and digests themselves may be wrong
            return {}, damaged
        recorded = group.attrs.get(schema.ATTR_ROW_DIGESTS, {}) if self._packed else None
        return integrity.read_rows(dict(group.arrays()), 0, self.num_steps, recorded)

    def learning_rates(self) -> np.ndarray:
        """Learning rate used at every optimizer step, ``[steps, param groups]``."""
        return self.steps()[schema.STEP_LR]

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint in step order, committed or not (see ``Checkpoint.committed``)."""
        return self._checkpoint_listing[1]

    @cached_property
    def _checkpoint_folders(self) -> list[str]:
        """The checkpoint groups' names, listed without reading their metadata."""
        return self._member_names(schema.CHECKPOINTS)

    @cached_property
    def _checkpoint_listing(self) -> tuple[list[Damage], list[Checkpoint]]:
        """The damage of checkpoints whose own metadata cannot be read, and the others."""
        out = []
        unreadable = []
        for key in self._checkpoint_folders:
            try:
                sub = self._group(schema.CHECKPOINTS, key)
            except DamagedStoreError as exc:  # verify reports it; reads cannot use it
                (problem,) = exc.problems
                unreadable.append(replace(problem, where=f"checkpoint {key}"))
                continue
            attrs = sub.attrs  # type: ignore[union-attr]
            out.append(
                Checkpoint(
                    key=key,
                    step=int(attrs[schema.ATTR_STEP]),
                    stage=int(attrs[schema.ATTR_STAGE]),
                    role=str(attrs[schema.ATTR_ROLE]),
                    committed=bool(attrs.get(schema.ATTR_COMMITTED, False)),
                    _group=sub,
                    _run=self,
                )
            )
        return unreadable, out

    def frozen_params(self, stage: int) -> dict[str, torch.Tensor]:
        """Non-trainable parameters of stage ``stage`` (empty when all were trainable)."""
        sub = self._group(schema.FROZEN, schema.frozen_key(stage), missing_ok=True)
        if sub is None:
            return {}
        if not sub.attrs.get(schema.ATTR_COMMITTED, False):
            raise StoreError(f"the {_frozen_where(stage)} in {self.url} {_NEVER_COMMITTED}.")
        params = _only(schema.SECTION_PARAMS)
        sections = self._read_group(sub, params, _frozen_where(stage), frozen=True)
        return sections.get(schema.SECTION_PARAMS, {})

    def verify(self, checkpoints: Iterable[Checkpoint] | None = None) -> list[Damage]:
        """Read and check the record in full; returns every problem found (none: intact).

        Parameters
        ----------
        checkpoints
            The checkpoints to check (uncommitted ones are skipped: they are never read);
            every checkpoint by default. The frozen parameters of their stages (every frozen
            group by default) and the step rows are always checked.

        Returns
        -------
        list[Damage]
            One entry per problem: a chunk that cannot be decoded, tensors or step rows whose
            bytes differ from their recorded digests, a missing array. A format-1 store recorded
            no checksums: only reads that fail are found there.

        """
        chosen = self.checkpoints if checkpoints is None else list(checkpoints)
        stages = (
            sorted(map(schema.parse_frozen_key, self._member_names(schema.FROZEN)))
            if checkpoints is None
            else sorted({c.stage for c in chosen})
        )
        problems = [p for c in chosen for p in c.problems()]
        if checkpoints is None:
            problems += self._checkpoint_listing[0]  # their own metadata cannot be read
        for stage in stages:
            try:
                sub = self._group(schema.FROZEN, schema.frozen_key(stage), missing_ok=True)
            except DamagedStoreError as exc:
                problems += exc.problems
                continue
            where = _frozen_where(stage)
            if sub is None:
                continue
            if not sub.attrs.get(schema.ATTR_COMMITTED, False):
                # Unlike an uncommitted checkpoint, the stage's checkpoints need it.
                problems.append(Damage(where, (), _NEVER_COMMITTED))
                continue
            problems += self._check_group(sub, _everything, where, frozen=True)[1]
        try:
            count = len(self.stages)
        except DamagedStoreError as exc:  # unreadable: what follows from them is not checked
            return problems + exc.problems + self._check_steps()[1]
        problems += [p for index in range(count) for p in self._check_examples(index)[1]]
        if checkpoints is None:
            stages_group = self._group(schema.STAGES)
            damaged = integrity.metadata_problems(stages_group, "stage records")  # type: ignore[arg-type]
            problems += damaged or self._missing_checkpoints()  # which ones follows from them
        return problems + self._check_steps()[1]

    def _missing_checkpoints(self) -> list[Damage]:
        """Checkpoints a complete stage took that are not in the store (a partial copy?).

        A complete stage took its start and end checkpoints and every planned interior one
        up to its last step (a stage stopped early plans some it never reaches).
        """
        present = set(self._checkpoint_folders)
        problems = []
        for stage in self.stages:
            if not stage.complete:
                continue
            taken = [
                schema.checkpoint_key(stage.first_step, schema.ROLE_START),
                *(
                    schema.checkpoint_key(step, schema.ROLE_INTERIOR)
                    for step in stage.planned_checkpoints
                    if stage.first_step < step <= stage.last_step
                ),
                schema.checkpoint_key(stage.last_step + 1, schema.ROLE_END),
            ]
            missing = [key for key in taken if key not in present]
            if missing:
                verb = "is" if len(missing) == 1 else "are"
                reason = f"{len(missing)} of its {len(taken)} checkpoints {verb} missing"
                files = tuple(f"{schema.CHECKPOINTS}/{key}" for key in missing)
                problems.append(Damage(f"stage {stage.name!r}", tuple(missing), reason, files))
        return problems

    def _check_examples(self, stage: int) -> tuple[np.ndarray | None, list[Damage]]:
        """Stage ``stage``'s example digests (``None`` when not recorded) and their damage."""
        group = self._root.get(schema.EXAMPLES)
        array = None if group is None else group.get(schema.examples_key(stage))
        if not isinstance(array, zarr.Array):
            return None, []
        where = f"example digests of stage {self.stages[stage].name!r}"
        try:
            values = np.asarray(array[...])
        except Exception:
            return None, [Damage(where, (), integrity.UNREADABLE)]
        if integrity.digest(values) != array.attrs.get(schema.ATTR_DIGEST):
            return None, [Damage(where, (), integrity.MISMATCH)]
        return values, []

    def example_digests(self, stage: int) -> np.ndarray | None:
        """Per-example digests of stage ``stage``'s training set, in training-index order.

        ``None`` where none were recorded: a dataset without a length, items that change
        between reads (random transforms), or a store of format version 1.

        Raises
        ------
        DamagedStoreError
            The stored digests are damaged.
        """
        values, problems = self._check_examples(stage)
        if problems:
            raise DamagedStoreError(self.url, problems)
        return values

    def require_intact(self, checkpoints: Iterable[Checkpoint] | None = None) -> None:
        """Raise :class:`DamagedStoreError` unless :meth:`verify` finds nothing.

        Parameters
        ----------
        checkpoints
            As for :meth:`verify`.

        """
        problems = self.verify(checkpoints)
        if problems:
            raise DamagedStoreError(self.url, problems)

    @property
    def analyses(self) -> list[str]:
        """Names of the committed analyses stored in the run."""
        return [entry.name for entry in stored_analyses(self._root) if entry.committed]

    def stored_analyses(self) -> list[StoredAnalysis]:
        """Every analysis name in the run, with what it holds (committed or not)."""
        return stored_analyses(self._root)

    def analysis(self, name: str) -> tuple[dict[str, Any], list[zarr.Array], dict[str, np.ndarray]]:
        """A stored analysis: its info, score arrays (lazy, one per stage) and other arrays."""
        found = read_analysis(self._root, name)
        if found is None:
            raise KeyError(f"no analysis {name!r} in {self.url}; stored: {self.analyses}")
        return found

    def __repr__(self) -> str:
        return (
            f"Run({self.url!r}, status={self.status!r}, stages={[s.name for s in self.stages]}, "
            f"steps={self.num_steps}, checkpoints={len(self.checkpoints)})"
        )


_NEVER_COMMITTED = "were never committed (the write was interrupted)"


def _frozen_where(stage: int) -> str:
    return f"frozen parameters of stage {stage}"


def open_run(url: str | os.PathLike[str], storage_options: dict | None = None) -> Run:
    """Open a recorded run read-only.

    Parameters
    ----------
    url
        Local path or fsspec URL of the store.
    storage_options
        fsspec options for URLs (credentials, ``endpoint_url``, ...).

    Returns
    -------
    Run
        A validated, read-only view of the record.

    Raises
    ------
    StoreError
        Nothing is stored at ``url``.
    NotAStoreError
        ``url`` holds something other than a source-callback store.
    FormatVersionError
        The store was written by a newer format version.

    """
    url = location.normalize(url)
    root = location.open_existing(url, storage_options, mode="r")
    if root is None:
        raise StoreError(f"no store at {url}. Check the path or URL (and storage_options).")
    schema.check_format(root, url)
    return Run(root, url)
