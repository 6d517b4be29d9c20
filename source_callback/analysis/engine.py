"""The passes over data that an analysis makes, on a private copy of the user's model."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from source_callback.analysis import ekfac, memory
from source_callback.analysis.finite import CheckedTask, Place, enter, require_finite
from source_callback.analysis.gradients import ModuleTensors, contract, per_example_grads
from source_callback.analysis.inputs import Collate, Collation, batches, evaluate, on_device
from source_callback.analysis.parallel import Blocks, Workers
from source_callback.analysis.progress import PlannedPass, Progress
from source_callback.analysis.projection import KroneckerProjection, projected_grads
from source_callback.analysis.scores import ScoreSink
from source_callback.analysis.task import Task
from source_callback.analysis.timing import Timer
from source_callback.analysis.units import Unit
from source_callback.errors import AnalysisError, listed
from source_callback.store.schema import CACHE_DTYPE, SCORE_CHUNK

State = dict[str, torch.Tensor]
#: Loads a state when a pass needs it: a run's checkpoints are in memory at once only as many
#: as :func:`~source_callback.analysis.memory.states_held` allows.
StateSource = Callable[[], State]


@dataclass(frozen=True)
class ScoreTerm:
    """One state's part of scores: ``factor · ⟨vectors, ∇L(z, θ)⟩`` at ``θ = state()``."""

    state: StateSource
    vectors: ModuleTensors
    factor: float = 1.0


def batch_seed(seed: int, data_pass: int, first: int) -> int:
    """Seed of the pseudo-labels of the batch starting at example ``first`` of a data pass.

    ``data_pass`` counts the analysis's passes over data from 1. A function of these three
    numbers only, so the draws do not depend on which process takes the batch.
    """
    return int(
        np.random.SeedSequence([seed, data_pass, first]).generate_state(1, np.uint64)[0] >> 1
    )


def curvature_subset(count: int, examples: int | float | None, seed: int) -> list[int] | None:
    """The examples, among ``count``, that a curvature fit uses; ``None``: all of them.

    ``examples`` is at most that many (an int) or that fraction of ``count`` (a float, rounded
    to the nearest count, at least 1), as ``AnalysisOptions.curvature_examples``. The subset
    is the first ones of a random permutation seeded by ``seed`` and ``count`` only, so it is
    the same in every process of a distributed analysis and spread over the whole dataset; a
    smaller subset is part of a larger one. In increasing order (the dataset's own order).
    """
    if examples is None:
        return None
    size = examples if isinstance(examples, int) else max(1, round(examples * count))
    if size >= count:
        return None
    order = np.random.default_rng([seed, count]).permutation(count)
    return np.sort(order[:size]).tolist()


def _factored(modules: dict[str, Unit]) -> dict[str, Unit]:
    """The units with a Kronecker factor to fit: all but those with identity sides only."""
    return {name: unit for name, unit in modules.items() if not all(unit.identity)}


def _basis(factor: torch.Tensor | None) -> torch.Tensor | None:
    """Eigenvectors of a Kronecker factor; ``None`` (identity) for an identity side."""
    return None if factor is None else ekfac.eigh_float64(factor)[1]


def _warn_zero_queries(grads: ModuleTensors) -> None:
    """Warn about queries whose measurement has no gradient: they get zero scores and effects."""
    largest = torch.stack([g.reshape(len(g), -1).abs().amax(1) for g in grads.values()])
    zero = torch.nonzero(largest.amax(0) == 0).flatten().tolist()
    if zero:
        warnings.warn(
            f"{len(zero)} quer{'y has' if len(zero) == 1 else 'ies have'} a measurement with no "
            f"gradient ({listed([str(i) for i in zero], 8)}): their scores and stage effects are "
            "all zero. A language-model query with no labelled token after its first (labels "
            "all -100) measures nothing; give it labels on the tokens to attribute.",
            UserWarning,
            stacklevel=2,
        )


class Engine:
    """The data passes of one analysis: holds the model copy, the data and the settings.

    Every pass covers this rank's share of the data (:class:`Workers`); sums and rows are
    combined across ranks before a pass returns, so callers see whole-data results.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train: Mapping[str, Dataset],
        batch_size: int,
        fisher: str,
        seed: int,
        progress: Progress,
        collation: Collation,
        workers: Workers | None = None,
        units: dict[str, Unit] | None = None,
        timer: Timer | None = None,
        curvature_examples: int | float | None = None,
    ) -> None:
        self.model = model
        self.task = CheckedTask(task)
        self.train = train
        self.batch_size = batch_size
        self.exact = fisher == "exact"
        self.seed = seed
        self.generator = torch.Generator()
        #: Numbers the data passes from 1 (shared by engines that analyze one run together).
        self.passes: Iterator[int] = itertools.count(1)
        self.collation = collation
        self.device = next(model.parameters()).device
        self.workers = workers or Workers(self.device)
        #: What the passes show (shared by the engines of one analysis).
        self.progress = progress
        self.modules = ekfac.tracked_modules(model) if units is None else units
        if not self.modules:
            raise AnalysisError("no unit of the model's trained parameters is selected")
        #: Time per kind of pass (shared by the engines of one analysis, for its summary).
        self.timer = timer or Timer()
        #: The examples each curvature fit uses (:func:`curvature_subset`).
        self.curvature_examples = curvature_examples

    def load(self, state: State) -> None:
        """Put ``state``'s parameters and buffers (every name of a tied one) into the model."""
        self.model.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=True)

    def read(self, state: StateSource) -> State:
        """``state()``, timed as a checkpoint read."""
        with self.timer("checkpoint reads"):
            return state()

    @contextmanager
    def data(
        self,
        dataset: Dataset,
        desc: str,
        blocks: Blocks | None = None,
        seeded: bool = False,
        name: str | None = None,
        indices: list[int] | None = None,
    ) -> Iterator[Iterator[Any]]:
        """A pass over ``dataset``: in the ``with`` block, its batches on the model's device.

        With ``indices``, over those examples of ``dataset`` only, as if they were the dataset:
        ``blocks`` and the batches' first indices below count positions among them. Only this
        rank's ``blocks`` (all of the dataset by default). With ``seeded``, the
        pseudo-label generator is reseeded before each batch from the seed, the pass and the
        batch's first index, so that the draws do not depend on how the batches are split
        between ranks. While a batch is out, a non-finite value found in it
        (:mod:`~source_callback.analysis.finite`) is reported as example ``first + row`` of the
        dataset ``name`` (by default the stage whose training set ``dataset`` is) in the pass
        ``desc``. Leaving the block ends the pass, also when it raises: a traceback that keeps
        the iterator alive must not keep its batch recorded for later checks.
        """
        if blocks is None:
            blocks = [(0, len(dataset) if indices is None else len(indices))]  # type: ignore[arg-type]
        parts = self._parts(dataset, name)
        subset = dataset if indices is None else Subset(dataset, indices)
        loader = batches(subset, self.batch_size, self._collate(parts, name), blocks)
        number = next(self.passes)
        starts = self._starts(blocks)
        with self.progress.data_pass(desc, len(starts)) as advance:

            def each() -> Iterator[Any]:
                for first, batch in zip(starts, on_device(loader, self.device), strict=True):
                    if seeded:
                        self.generator.manual_seed(batch_seed(self.seed, number, first))
                    enter(Place(desc, first, batch, parts, indices))
                    yield batch
                    advance()

            try:
                yield each()
            finally:
                enter(None)

    def _collate(self, parts: tuple[tuple[str, int], ...], name: str | None) -> Collate:
        """What collates the examples of a dataset made of ``parts`` (:meth:`_parts`).

        The queries' (named ``"queries"``), a stage's training set's, or all stages' in one
        pass (influence's pooled stages).
        """
        if name == "queries":
            return self.collation.queries
        if len(parts) == 1 and parts[0][0] in self.collation.stages:
            return self.collation.stage(parts[0][0])
        return self.collation.pooled("if")

    def _starts(self, blocks: Blocks) -> list[int]:
        """The first example of each batch of a pass over ``blocks``."""
        return [first for start, stop in blocks for first in range(start, stop, self.batch_size)]

    def _batches(self, count: int, width: int) -> int:
        """Batches of this rank's share of a pass over ``count`` examples in blocks of ``width``."""
        return len(self._starts(self.workers.blocks(count, width)))

    def _parts(self, dataset: Dataset, name: str | None) -> tuple[tuple[str, int], ...]:
        """``(name, first index)`` of the datasets ``dataset`` is (see :class:`Place`)."""
        if name is not None:
            return ((name, 0),)
        stages = {id(data): stage for stage, data in self.train.items()}
        if id(dataset) in stages:
            return ((stages[id(dataset)], 0),)
        if isinstance(dataset, ConcatDataset):  # influence's pooled stages
            starts = [0, *dataset.cumulative_sizes[:-1]]
            return tuple(
                (stages.get(id(part), "training data"), start)
                for part, start in zip(dataset.datasets, starts, strict=True)
            )
        return (("training data", 0),)

    def curvature(
        self,
        dataset: Dataset,
        states: list[StateSource],
        label: str,
        scale: dict[str, ekfac.Scale] | None = None,
        modules: dict[str, Unit] | None = None,
    ) -> dict[str, ekfac.ModuleCurvature]:
        """EK-FAC of the mean Gauss-Newton Hessian over ``states`` on ``dataset``.

        With ``scale`` (Adam's ``P^{1/2}`` per unit, or its :class:`~ekfac.RankOne` form) it
        is fitted to the scaled
        pseudo-gradients, i.e. to ``P^{1/2} H P^{1/2}``. ``modules`` restricts the fit (to
        the units a stage trains); all units by default. Identity sides need no factor. Both
        kinds of pass go over the same examples: all, or the subset ``curvature_examples``
        selects (:func:`curvature_subset`), whose means they then are.
        """
        modules = self.modules if modules is None else modules
        factored = _factored(modules)
        indices, count = self._curvature_examples(dataset)
        blocks = self.workers.blocks(count, self.batch_size)
        a_sum: dict[str, torch.Tensor] = {}
        s_sum: dict[str, torch.Tensor] = {}
        for i, state in enumerate(states if factored else []):
            desc = f"{label} factors {i + 1}/{len(states)}"

            def factors(state: StateSource = state, desc: str = desc) -> dict[str, torch.Tensor]:
                self.load(self.read(state))
                with self.data(dataset, desc, blocks, seeded=True, indices=indices) as batches:
                    covs = ekfac.covariances(
                        self.model, factored, self.task, batches, self.generator, self.exact, scale
                    )
                sums = {}
                for name, unit in factored.items():
                    out, in_ = unit.shape
                    cov = covs[name]
                    if not unit.identity[1]:
                        sums[f"a/{name}"] = self._zeros(in_, in_) if cov.a is None else cov.a
                    if not unit.identity[0]:
                        sums[f"s/{name}"] = self._zeros(out, out) if cov.s is None else cov.s
                return sums

            with self.timer("covariance factors"):
                sums = self.workers.sum(self.workers.run(factors))
            for key, total in sums.items():
                side, name = key.split("/", 1)
                target = a_sum if side == "a" else s_sum
                target[name] = target.get(name, 0) + total / count
        with self.timer("eigendecomposition"):
            bases = {n: (_basis(a_sum.get(n)), _basis(s_sum.get(n))) for n in modules}
        lam_sum: dict[str, torch.Tensor] = {}
        for i, state in enumerate(states):
            desc = f"{label} eigenvalues {i + 1}/{len(states)}"

            def eigenvalues(
                state: StateSource = state, desc: str = desc
            ) -> dict[str, torch.Tensor]:
                self.load(self.read(state))
                with self.data(dataset, desc, blocks, seeded=True, indices=indices) as batches:
                    mean = ekfac.corrected_eigenvalues(
                        self.model,
                        modules,
                        bases,
                        self.task,
                        batches,
                        self.generator,
                        self.exact,
                        scale,
                    )
                local = sum(stop - start for start, stop in blocks)
                return {
                    name: mean[name] * local if name in mean else self._zeros(*unit.shape)
                    for name, unit in modules.items()
                }

            with self.timer("corrected eigenvalues"):
                sums = self.workers.sum(self.workers.run(eigenvalues))
            for name, value in sums.items():
                lam_sum[name] = lam_sum.get(name, 0) + value / count
        out = {}
        for name, (q_a, q_s) in bases.items():
            eigenvalues = lam_sum[name] / len(states)
            if not torch.isfinite(eigenvalues).all():
                raise AnalysisError(
                    f"the curvature of module {name!r} ({label}) is not finite; the model's "
                    "outputs or losses overflow at these checkpoints."
                )
            out[name] = ekfac.ModuleCurvature(q_a, q_s, eigenvalues)
        return out

    def curvature_passes(
        self, dataset: Dataset, states: int, modules: dict[str, Unit] | None = None
    ) -> list[PlannedPass]:
        """Each pass :meth:`curvature` makes with ``states`` states: its kind and batches.

        This rank's share, as in the other ``*_passes`` methods, which the overall progress
        (:meth:`~source_callback.analysis.progress.Progress.plan`) adds up before the passes run.
        """
        factors = states if _factored(self.modules if modules is None else modules) else 0
        batches = self._batches(self._curvature_examples(dataset)[1], self.batch_size)
        return [("factors", batches)] * factors + [("eigenvalues", batches)] * states

    def _curvature_examples(self, dataset: Dataset) -> tuple[list[int] | None, int]:
        """The examples of ``dataset`` a curvature fit uses (``None``: all), and their number."""
        indices = curvature_subset(len(dataset), self.curvature_examples, self.seed)  # type: ignore[arg-type]
        return indices, len(dataset) if indices is None else len(indices)  # type: ignore[arg-type]

    def _zeros(self, *shape: int) -> torch.Tensor:
        """Float64 zeros on the analysis device."""
        return torch.zeros(shape, dtype=torch.float64, device=self.device)

    def module_matrices(self, state: State) -> ModuleTensors:
        """Every unit's parameters in a state as its ``[out, in]`` matrix."""
        return {name: unit.matrix(state) for name, unit in self.modules.items()}

    def scores(
        self,
        dataset: Dataset,
        terms: list[ScoreTerm],
        label: str,
        sink: ScoreSink,
        stage: int,
        modules: dict[str, Unit] | None = None,
    ) -> None:
        """Add ``Σ_t factor_t ⟨v_t, ∇L(z_m, θ_t)⟩`` of every example ``z_m`` to ``sink``.

        ``modules`` restricts the products to those units (the ones a stage trains, where the
        vectors are zero elsewhere); all units by default. This rank's examples are scored one
        block of ``SCORE_CHUNK[1]`` at a time (the width of a stored score chunk), so a block is
        handed to the sink whole and no two ranks ever write into one chunk; memory holds a
        ``[Q, block]`` buffer or two. Into memory, each term takes one pass over the data. Into
        the store, the terms' states are held on the CPU together, as many as
        :func:`~source_callback.analysis.memory.states_held` allows, and each block gets all of
        them before it is written: written once per group of held states, instead of read back
        and rewritten for every term. Either way the terms add up in the same order.
        """
        blocks = self.workers.blocks(len(dataset), SCORE_CHUNK[1])  # type: ignore[arg-type]
        queries = len(next(iter(terms[0].vectors.values())))
        modules = self.modules if modules is None else modules

        def rows(term: ScoreTerm, run: Blocks, desc: str) -> Iterator[tuple[int, torch.Tensor]]:
            """``(start, factor · [Q, block] products)`` per block of ``run``: loaded state."""
            pending = iter(run)
            start, stop = next(pending, (0, 0))
            block, filled = self._zeros(queries, stop - start), 0
            with self.data(dataset, desc, run) as batches:
                for batch in batches:
                    products = contract(self.model, modules, self.task.loss, batch, term.vectors)
                    require_finite(products, "score")
                    block[:, filled : filled + len(products)] = products.T
                    filled += len(products)
                    if filled == stop - start:
                        yield start, block * term.factor
                        start, stop = next(pending, (0, 0))
                        block, filled = self._zeros(queries, stop - start), 0

        def score() -> None:
            for group in self._held(len(terms), not sink.adds_in_place):
                runs = self._score_runs(blocks, len(group))
                states = [self.read(terms[t].state) for t in group] if runs else []
                for run in runs:
                    totals: dict[int, torch.Tensor] = {}
                    for t, state in zip(group, states, strict=True):
                        self.load(state)
                        where = f" {run[0][0]}:{run[0][1]}" if len(group) > 1 else ""
                        desc = f"{label} scores{where} {t + 1}/{len(terms)}"
                        for start, block in rows(terms[t], run, desc):
                            if start in totals:
                                block = totals.pop(start) + block
                            if t == group[-1]:
                                sink.add(stage, start, block.cpu().numpy())
                            else:
                                totals[start] = block

        with self.timer("scoring"):
            self.workers.run(score)

    def _held(self, count: int, together: bool) -> list[range]:
        """``range(count)`` cut into the groups of states held on the CPU together.

        Groups of one unless ``together``; else as large as
        :func:`~source_callback.analysis.memory.states_held` allows for this model's states.
        """
        size = 1
        if together:
            state = self.model.state_dict().values()
            size = memory.states_held(sum(t.numel() * t.element_size() for t in state), count)
        return [range(first, min(first + size, count)) for first in range(0, count, size)]

    @staticmethod
    def _score_runs(blocks: Blocks, held: int) -> list[Blocks]:
        """The data passes of each state of a group: over all blocks, or one block each."""
        return [blocks] if held == 1 else [[block] for block in blocks]

    def score_passes(self, dataset: Dataset, terms: int, sink: ScoreSink) -> list[PlannedPass]:
        """Each pass :meth:`scores` makes with ``terms`` terms into ``sink``."""
        blocks = self.workers.blocks(len(dataset), SCORE_CHUNK[1])  # type: ignore[arg-type]
        return [
            ("scores", len(self._starts(run)))
            for group in self._held(terms, not sink.adds_in_place)
            for run in self._score_runs(blocks, len(group))
            for _ in group
        ]

    def cache_gradients(
        self,
        dataset: Dataset,
        states: list[StateSource],
        projection: KroneckerProjection,
        array: zarr.Array,
        label: str,
        scale: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write the projected training gradients, averaged over ``states``, into ``array``.

        ``scale`` multiplies a module's gradients before they are projected (see
        :func:`~source_callback.analysis.projection.projected_grads`).

        Block by block (``SCORE_CHUNK[1]`` rows, whole chunks of ``array``) with every state
        applied to a block before it is written, so the mean needs no read-back: the states
        are read from the store once and held on the CPU, as many together as
        :func:`~source_callback.analysis.memory.states_held` allows; each further group of
        them reads the block back and adds its share.
        """
        blocks = self.workers.blocks(len(dataset), SCORE_CHUNK[1])  # type: ignore[arg-type]

        def write() -> None:
            for group in self._held(len(states), together=True):
                held = [self.read(states[i]) for i in group] if blocks else []
                for start, stop in blocks:
                    total = self._zeros(stop - start, projection.dim)
                    for i, state in zip(group, held, strict=True):
                        self.load(state)
                        desc = f"{label} gradients {start}:{stop} {i + 1}/{len(states)}"
                        with self.data(dataset, desc, [(start, stop)]) as batches:
                            total += torch.cat(
                                [
                                    projected_grads(
                                        self.model,
                                        self.modules,
                                        self.task.loss,
                                        batch,
                                        projection,
                                        scale=scale,
                                    )
                                    for batch in batches
                                ]
                            )
                    mean = total / len(states)
                    if group.start:
                        mean += torch.from_numpy(array[start:stop]).to(mean)
                    # float32 by design: the cache's precision (see analysis/cache.py)
                    array[start:stop] = mean.cpu().numpy().astype(CACHE_DTYPE)

        with self.timer("cached gradients"):
            self.workers.run(write)

    def cache_passes(self, dataset: Dataset, states: int) -> list[PlannedPass]:
        """Each pass :meth:`cache_gradients` makes: one per block and state."""
        blocks = self.workers.blocks(len(dataset), SCORE_CHUNK[1])  # type: ignore[arg-type]
        return [
            ("cached gradients", len(self._starts([b])))
            for group in self._held(states, together=True)
            for b in blocks
            for _ in group
        ]

    def query_grads(self, queries: Dataset, label: str = "query gradients") -> ModuleTensors:
        """Per-query measurement gradients at the loaded state: ``{unit: [Q, out, in]}``."""
        blocks = self.workers.blocks(len(queries), self.batch_size)  # type: ignore[arg-type]

        def take() -> ModuleTensors:
            with self.data(queries, label, blocks, name="queries") as batches:
                return per_example_grads(self.model, self.modules, self.task.measurement, batches)

        with self.timer("query gradients"):
            local = self.workers.run(take)
            grads = {
                name: self.workers.gather(grads, len(queries), self.batch_size)  # type: ignore[arg-type]
                for name, grads in local.items()
            }
        _warn_zero_queries(grads)
        return grads

    def query_passes(self, queries: Dataset) -> list[PlannedPass]:
        """The pass :meth:`query_grads` makes."""
        return [("query gradients", self._batches(len(queries), self.batch_size))]  # type: ignore[arg-type]

    def measurement(self, queries: Dataset) -> np.ndarray:
        """The measurement of every query at the loaded state, ``[Q]``."""
        blocks = self.workers.blocks(len(queries), self.batch_size)  # type: ignore[arg-type]

        def measure() -> torch.Tensor:
            if not blocks:
                return self._zeros(0)
            with self.data(queries, "measurement", blocks, name="queries") as batches:
                return evaluate(self.task.measurement, self.model, batches).double()

        with self.timer("measurements"):
            local = self.workers.run(measure)
            values = self.workers.gather(local, len(queries), self.batch_size)  # type: ignore[arg-type]
            return values.cpu().numpy()

    def measurement_passes(self, queries: Dataset) -> list[PlannedPass]:
        """The pass :meth:`measurement` makes: none where this rank has no query."""
        count = self._batches(len(queries), self.batch_size)  # type: ignore[arg-type]
        return [("measurement", count)] if count else []
