"""The recorded run in the names of the model the analysis runs on.

Stages may train different models: LoRA adapters added, the model wrapped, a head added. The
analysis runs on one model, the last stage's. Following each stage's recorded
:class:`~source_callback.lineage.Continuation` back from the last stage gives, for every stage,
the recorded name of each of the model's tensors that the stage had; a tensor a stage did not
have (an adapter added later) is constant through it, at the value it had when it first
appeared. :class:`RunView` serves stages, checkpoints and states translated that way, so the
passes and operators of the analysis never see recorded names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import numpy as np
import torch

from source_callback.errors import AnalysisError, ManifestMismatchError, listed
from source_callback.manifest import Manifest, manifest_differences
from source_callback.optim import OptimizerRecord, ParamGroupRecord
from source_callback.store.reader import Checkpoint, Run
from source_callback.store.schema import ROLE_END, ROLE_START, Stage

TensorDict = dict[str, torch.Tensor]


def _translate(tensors: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """``{model name: tensors[recorded name]}`` for the recorded names present."""
    return {name: tensors[recorded] for name, recorded in names.items() if recorded in tensors}


class CheckpointView:
    """A recorded checkpoint whose tensors are named as in the analysis model.

    Attributes ``key``, ``step``, ``stage``, ``role`` and ``committed`` are the checkpoint's.
    """

    def __init__(self, checkpoint: Checkpoint, view: RunView) -> None:
        self.checkpoint = checkpoint
        self.key = checkpoint.key
        self.step = checkpoint.step
        self.stage = checkpoint.stage
        self.role = checkpoint.role
        self.committed = checkpoint.committed
        self._view = view

    def params(self) -> TensorDict:
        """Every parameter of the model (aliases included) at this checkpoint."""
        view = self._view
        params = _translate(self.checkpoint.params(), view.names[self.stage])
        params.update(view.constants(self.stage, "parameter"))
        return view.with_aliases(params)

    def buffers(self) -> TensorDict:
        """Every persistent buffer of the model at this checkpoint."""
        view = self._view
        buffers = _translate(self.checkpoint.buffers(), view.names[self.stage])
        buffers.update(view.constants(self.stage, "buffer"))
        return view.with_aliases(buffers)

    def optimizer_state(self) -> dict[str, TensorDict]:
        """Optimizer state of the parameters the stage trained, by model name."""
        return _translate(self.checkpoint.optimizer_state(), self._view.names[self.stage])


class RunView:
    """A recorded run seen through the analysis model's tensor names.

    Parameters
    ----------
    run
        The recorded run (every stage complete).
    manifest
        The analysis model's manifest (:func:`source_callback.manifest.model_manifest`), which
        must be the last stage's.

    Raises
    ------
    ManifestMismatchError
        The model is not the last stage's.
    AnalysisError
        An earlier stage trained a model with tensors this model lacks (a dropped head): that
        stage's training loss cannot be computed with this model.
    """

    def __init__(self, run: Run, manifest: Manifest) -> None:
        self.run = run
        self.url = run.url
        last = len(run.stages) - 1
        problems = manifest_differences(run.stage_manifest(last), manifest)
        if problems:
            raise ManifestMismatchError(
                f"the model passed to analyze() does not match the one the last stage "
                f"({run.stages[last].name!r}) of {run.url} trained: {listed(problems, 8, '; ')}. "
                "Pass an instance "
                "of that architecture (with the same adapters and wrappers)."
            )
        self.kinds = {e["name"]: e["kind"] for e in manifest}
        self.aliases = {e["name"]: list(e.get("aliases", [])) for e in manifest if "aliases" in e}
        names = {e["name"]: e["name"] for e in manifest}
        self.names: list[dict[str, str]] = [names]
        for index in range(last, 0, -1):
            continuation = run.continuation(index)
            assert continuation is not None  # every stage but the first has one
            names = {
                name: continuation.previous[recorded]
                for name, recorded in names.items()
                if recorded in continuation.previous
            }
            self.names.insert(0, names)
        for index, stage_names in enumerate(self.names):
            reached = set(stage_names.values())
            lacking = [e["name"] for e in run.stage_manifest(index) if e["name"] not in reached]
            if lacking:
                raise AnalysisError(
                    f"stage {run.stages[index].name!r} of {run.url} trained a model with tensors "
                    f"that the last stage's model does not have ({listed(lacking, 5)}): that "
                    "stage's training loss cannot "
                    "be computed with the model passed to analyze(). Attributing runs whose "
                    "later stages drop tensors (an old head) is not supported yet."
                )
        self.stages = [self._stage(stage) for stage in run.stages]

    # -- names ------------------------------------------------------------------------------

    def with_aliases(self, tensors: TensorDict) -> TensorDict:
        """``tensors`` plus every alias (tied name) of the tensors it holds."""
        out = dict(tensors)
        for name, aliases in self.aliases.items():
            if name in tensors:
                out.update(dict.fromkeys(aliases, tensors[name]))
        return out

    def _stage(self, stage: Stage) -> Stage:
        """``stage`` with trainable, frozen and optimizer-group names in the model's names."""
        to_model = {recorded: name for name, recorded in self.names[stage.index].items()}

        def rename(recorded: list[str]) -> list[str]:
            return [to_model[n] for n in recorded if n in to_model]

        optimizer = stage.optimizer
        groups = [ParamGroupRecord(g.hyperparameters, rename(g.params)) for g in optimizer.groups]
        return dataclasses.replace(
            stage,
            trainable=rename(stage.trainable),
            frozen=rename(stage.frozen),
            optimizer=OptimizerRecord(
                optimizer.class_name, optimizer.update_rule, optimizer.weight_decay, groups
            ),
        )

    # -- checkpoints and states -------------------------------------------------------------

    @cached_property
    def checkpoints(self) -> list[CheckpointView]:
        """Every checkpoint of the run, in step order."""
        return [CheckpointView(c, self) for c in self.run.checkpoints]

    def steps(self) -> dict[str, np.ndarray]:
        """The run's per-step arrays (:meth:`Run.steps`)."""
        return self.run.steps()

    def example_digests(self, stage: int) -> np.ndarray | None:
        """Stage ``stage``'s per-example digests (:meth:`Run.example_digests`)."""
        return self.run.example_digests(stage)

    def boundary(self, stage: int, role: str) -> CheckpointView:
        """The committed stage-start or stage-end checkpoint of stage ``stage``."""
        for checkpoint in self.checkpoints:
            if checkpoint.committed and (checkpoint.stage, checkpoint.role) == (stage, role):
                return checkpoint
        raise AnalysisError(
            f"stage {self.stages[stage].name!r} has no committed {role} checkpoint in {self.url}"
        )

    @cached_property
    def _first_values(self) -> dict[str, torch.Tensor]:
        """Values of tensors some stage lacks, where they first appear, by model name."""
        wanted = {n for n in self.kinds if any(n not in names for names in self.names)}
        values: dict[str, torch.Tensor] = {}
        for index, names in enumerate(self.names):
            missing = {n: r for n, r in names.items() if n in wanted and n not in values}
            if missing:
                start = self.boundary(index, ROLE_START).checkpoint
                values.update(_translate({**start.params(), **start.buffers()}, missing))
        return values

    def constants(self, stage: int, kind: str) -> TensorDict:
        """The tensors of ``kind`` stage ``stage`` lacks, constant through it at first values."""
        lacking = [n for n, k in self.kinds.items() if k == kind and n not in self.names[stage]]
        return {n: self._first_values[n] for n in lacking}

    def check_continuity(self) -> None:
        """Every continued tensor starts a stage at the value it ended the previous one with.

        Raises
        ------
        AnalysisError
            A tensor changed between two stages outside training (re-initialised, merged
            adapters, edited): SOURCE cannot carry an effect across such a change.
        """
        for index in range(1, len(self.stages)):
            continuation = self.run.continuation(index)
            assert continuation is not None
            end = self.boundary(index - 1, ROLE_END).checkpoint
            start = self.boundary(index, ROLE_START).checkpoint
            before = {**end.params(), **end.buffers()}
            after = {**start.params(), **start.buffers()}
            changed = [
                f"{old} -> {new}" if old != new else new
                for new, old in continuation.previous.items()
                if new in after and old in before and not torch.equal(after[new], before[old])
            ]
            if changed:
                raise AnalysisError(
                    f"{len(changed)} tensor(s) changed between the end of stage "
                    f"{self.stages[index - 1].name!r} and the start of stage "
                    f"{self.stages[index].name!r} outside training ({listed(changed, 5)}). "
                    "SOURCE cannot carry effects across "
                    "such a change (a re-initialised head, merged adapters). If the tensors were "
                    "replaced on purpose, record the stage with next_stage(..., renamed="
                    "{name: None}) so that they count as new."
                )
