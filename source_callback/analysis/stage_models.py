"""The models an analysis runs on: the last stage's for the whole run, or one per stage.

A stage is analyzed with the model it trained, or with a later stage's model where that model
holds every tensor it trained (``namespace``). A run whose later stages drop tensors (an old
head) needs the earlier stages' own models: ``analyze(model={stage: model, ...})``. Each distinct
model gets its own :class:`Engine` (a private copy, its units); the query vectors cross from one
model's units to the other's where consecutive stages are analyzed with different models.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from source_callback.analysis.engine import Engine
from source_callback.analysis.gradients import ModuleTensors
from source_callback.analysis.inputs import prepare_model, stage_keys
from source_callback.analysis.namespace import RunView
from source_callback.analysis.segments import Segment
from source_callback.analysis.units import (
    ModuleSelection,
    SelectionSpec,
    Unit,
    Units,
    carry_vectors,
    find_units,
)
from source_callback.errors import AnalysisError
from source_callback.manifest import model_manifest
from source_callback.store.reader import Run

#: What ``analyze(model=...)`` accepts: one model, or one per stage name.
ModelSpec = nn.Module | Mapping[str, nn.Module]


def models_per_stage(model: ModelSpec, run: Run) -> list[nn.Module]:
    """The model that analyzes each stage of ``run``, in stage order.

    Raises
    ------
    AnalysisError
        A mapping that does not name every recorded stage.
    TypeError
        Something other than a module or a mapping of stage names to modules.
    """
    names = [stage.name for stage in run.stages]
    if isinstance(model, nn.Module):
        return [model] * len(names)
    if not isinstance(model, Mapping) or not all(isinstance(m, nn.Module) for m in model.values()):
        raise TypeError(
            "model must be an nn.Module (the last stage's model) or a mapping of stage names to "
            f"nn.Module, got {type(model).__name__}"
        )
    wrong = stage_keys(model, names)
    if wrong:
        raise AnalysisError(
            f"model {wrong}; with one model per stage, name every recorded stage: {names}"
        )
    return [model[n] for n in names]


def run_view(run: Run, models: Sequence[nn.Module]) -> RunView:
    """``run`` in the names of each stage's model (one manifest per distinct model)."""
    manifests: dict[int, list] = {}
    return RunView(run, [manifests.setdefault(id(m), model_manifest(m)) for m in models])


@dataclass
class StageEngines:
    """Per stage, the engine that analyzes it, and the units found in its model.

    Stages analyzed with one model share its engine.
    """

    run: RunView
    engines: list[Engine]
    found: list[Units]

    @classmethod
    def build(
        cls,
        run: RunView,
        models: Sequence[nn.Module],
        make: Callable[[nn.Module, dict[str, Unit]], Engine],
        modules: SelectionSpec,
        diagonal_above: int | None,
        device: torch.device,
    ) -> StageEngines:
        """One engine per distinct model: a private copy on ``device``, its selected units."""
        built: dict[int, tuple[Engine, Units]] = {}
        for owner in run.owners:
            if owner not in built:
                copy = prepare_model(models[owner], run.trained[owner]).to(device)
                found = find_units(copy, diagonal_above)
                built[owner] = make(copy, ModuleSelection.of(modules).apply(found.units)), found
        passes = itertools.count(1)  # one numbering, so pseudo-labels are those of one engine
        for engine, _ in built.values():
            engine.passes = passes
        return cls(
            run,
            [built[owner][0] for owner in run.owners],
            [built[owner][1] for owner in run.owners],
        )

    @property
    def final(self) -> Engine:
        """The last stage's engine: query gradients and measurements."""
        return self.engines[-1]

    @property
    def distinct(self) -> list[Engine]:
        """Each engine once, in stage order."""
        return list({id(e): e for e in self.engines}.values())

    @property
    def units(self) -> dict[str, Unit]:
        """The selected units of every engine, by name."""
        return {name: unit for e in self.distinct for name, unit in e.modules.items()}

    def crossings(
        self, plan: Sequence[Segment]
    ) -> dict[int, Callable[[ModuleTensors], ModuleTensors]]:
        """What carries the query vectors into the previous stage's model's units (``sweep``).

        Keyed by the first segment of each stage analyzed with another model than the stage
        before it.
        """
        out = {}
        for number, segment in enumerate(plan):
            stage = segment.stage
            starts = number > 0 and plan[number - 1].stage != stage
            names = self.run.crossing(stage) if starts else None
            if names is not None:
                later, earlier = self.engines[stage].modules, self.engines[stage - 1].modules
                out[number] = lambda u, a=later, b=earlier, n=names: carry_vectors(u, a, b, n)
        return out
