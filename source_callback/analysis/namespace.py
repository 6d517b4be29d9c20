"""The recorded run in the names of the models the analysis runs on.

Stages may train different models: LoRA adapters added, the model wrapped, a head added or
dropped. By default the analysis runs every stage on one model, the last stage's; the user may
instead give a model per stage. Each stage is analyzed with the model of the last stage that
shares it (its *owner*). Following each stage's recorded
:class:`~source_callback.lineage.Continuation` back from the owner gives, for every stage, the
recorded name of each of the model's tensors that the stage had; a tensor a stage did not have
(an adapter added later) is constant through it, at the value it had when it first appeared.
:class:`RunView` serves stages, checkpoints and states translated that way, so the passes and
operators of the analysis never see recorded names; where two consecutive stages are analyzed
with different models, :meth:`RunView.crossing` says which tensor of one is which of the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
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
        return view.with_aliases(params, self.stage)

    def buffers(self) -> TensorDict:
        """Every persistent buffer of the model at this checkpoint."""
        view = self._view
        buffers = _translate(self.checkpoint.buffers(), view.names[self.stage])
        buffers.update(view.constants(self.stage, "buffer"))
        return view.with_aliases(buffers, self.stage)

    def optimizer_state(self) -> dict[str, TensorDict]:
        """Optimizer state of the parameters the stage trained, by model name."""
        return _translate(self.checkpoint.optimizer_state(), self._view.names[self.stage])


class RunView:
    """A recorded run seen through the tensor names of the models that analyze it.

    Parameters
    ----------
    run
        The recorded run (every stage complete).
    manifests
        Per stage, the manifest (:func:`source_callback.manifest.model_manifest`) of the model
        that analyzes it; the same manifest object for stages analyzed with one model. Those
        stages are consecutive, and it must be the model of the last of them (their owner).

    Raises
    ------
    ManifestMismatchError
        A model is not the one its owner stage trained.
    AnalysisError
        A stage trained a model with tensors that the model analyzing it lacks (a head dropped
        later): that stage's training loss cannot be computed with that model.
    """

    def __init__(self, run: Run, manifests: Sequence[Manifest]) -> None:
        self.run = run
        self.url = run.url
        count = len(run.stages)
        if len(manifests) != count:
            raise ValueError(f"{len(manifests)} manifests for {count} stages")
        #: Per stage, the stage whose model analyzes it: the last one analyzed with that model.
        self.owners = [
            max(j for j in range(count) if manifests[j] is manifests[k]) for k in range(count)
        ]
        apart = [k for k in range(count - 1) if self.owners[k] > self.owners[k + 1]]
        if apart:
            stage = run.stages[apart[0]].name
            raise AnalysisError(
                f"one model is given for stage {stage!r} and for "
                f"{run.stages[self.owners[apart[0]]].name!r} but not for the stages between; a "
                "model can analyze consecutive stages only"
            )
        self.names: list[dict[str, str]] = [{} for _ in range(count)]
        self.kinds: list[dict[str, str]] = []
        self.aliases: list[dict[str, list[str]]] = []
        for index in range(count):
            manifest = manifests[index]
            self.kinds.append({e["name"]: e["kind"] for e in manifest})
            self.aliases.append({e["name"]: list(e["aliases"]) for e in manifest if "aliases" in e})
        for owner in sorted(set(self.owners)):
            self._check_model(owner, manifests[owner], single=len(set(self.owners)) == 1)
            names = {e["name"]: e["name"] for e in manifests[owner]}
            for index in range(owner, -1, -1):
                if self.owners[index] != owner:
                    break
                self.names[index] = names
                self._check_reached(index)
                continuation = run.continuation(index)
                if continuation is not None:
                    names = {
                        name: continuation.previous[recorded]
                        for name, recorded in names.items()
                        if recorded in continuation.previous
                    }
        self.trained = self._trained_names()
        self.stages = [self._stage(stage) for stage in run.stages]

    # -- names ------------------------------------------------------------------------------

    def _check_model(self, owner: int, manifest: Manifest, single: bool) -> None:
        """The model given for stage ``owner`` is the one that stage trained."""
        problems = manifest_differences(self.run.stage_manifest(owner), manifest)
        if problems:
            stage = self.run.stages[owner].name
            which = "the model passed to analyze()" if single else f"the model given for {stage!r}"
            raise ManifestMismatchError(
                f"{which} does not match the one stage {stage!r} of {self.url} trained: "
                f"{listed(problems, 8, '; ')}. Pass an instance of that architecture (with the "
                "same adapters and wrappers)."
            )

    def _check_reached(self, index: int) -> None:
        """Every tensor stage ``index`` trained with is one of its analysis model's."""
        reached = set(self.names[index].values())
        lacking = [e["name"] for e in self.run.stage_manifest(index) if e["name"] not in reached]
        if lacking:
            stage = self.run.stages[index].name
            owner = self.run.stages[self.owners[index]].name
            raise AnalysisError(
                f"stage {stage!r} of {self.url} trained a model with tensors that the model of "
                f"stage {owner!r} does not have ({listed(lacking, 5)}): that stage's training "
                f"loss cannot be computed with it. Pass one model per stage: analyze(..., "
                f"model={{{stage!r}: <the model {stage!r} trained>, ...}})."
            )

    def _trained_names(self) -> list[set[str]]:
        """Per stage, the tensors (model names) that some stage trains, following continuations.

        A tensor carried through stages that do not train it still carries the effects of the
        stages that do, so the analysis needs its gradients in every model it appears in.
        """
        count = len(self.run.stages)
        recorded = [set(stage.trainable) for stage in self.run.stages]
        previous = [self.run.continuation(index) for index in range(count)]
        for index in range(1, count):  # forward: trained earlier
            pairs = previous[index].previous.items()  # type: ignore[union-attr]
            recorded[index] |= {new for new, old in pairs if old in recorded[index - 1]}
        for index in range(count - 1, 0, -1):  # backward: trained later
            pairs = previous[index].previous.items()  # type: ignore[union-attr]
            recorded[index - 1] |= {old for new, old in pairs if new in recorded[index]}
        return [
            {name for name, rec in names.items() if rec in recorded[index]}
            for index, names in enumerate(self.names)
        ]

    def crossing(self, index: int) -> dict[str, str] | None:
        """Names of stage ``index``'s analysis model in stage ``index - 1``'s analysis model.

        ``None`` where both stages are analyzed with one model. Tensors new in stage ``index``
        are absent.
        """
        if self.owners[index] == self.owners[index - 1]:
            return None
        continuation = self.run.continuation(index)
        assert continuation is not None
        earlier = {recorded: name for name, recorded in self.names[index - 1].items()}
        out = {}
        for name, recorded in self.names[index].items():
            old = continuation.previous.get(recorded)
            if old in earlier:
                out[name] = earlier[old]
        return out

    def with_aliases(self, tensors: TensorDict, stage: int) -> TensorDict:
        """``tensors`` plus every alias (tied name) in stage ``stage``'s analysis model."""
        out = dict(tensors)
        for name, aliases in self.aliases[stage].items():
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
        """The run's per-step arrays (:meth:`Run.steps`), read and verified once, read-only."""
        return self._steps

    @cached_property
    def _steps(self) -> dict[str, np.ndarray]:
        steps = self.run.steps()
        for values in steps.values():
            values.flags.writeable = False  # shared by every caller of the analysis
        return steps

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
    def _first_values(self) -> dict[int, TensorDict]:
        """Per owner stage: values of its model's tensors that one of its stages lacks.

        Each is the value at the start of the first of the owner's stages that has it.
        """
        out: dict[int, TensorDict] = {}
        for owner in set(self.owners):
            stages = [k for k in range(len(self.names)) if self.owners[k] == owner]
            wanted = {n for n in self.kinds[owner] if any(n not in self.names[k] for k in stages)}
            values: TensorDict = {}
            for index in stages:
                names = self.names[index]
                missing = {n: r for n, r in names.items() if n in wanted and n not in values}
                if missing:
                    start = self.boundary(index, ROLE_START).checkpoint
                    values.update(_translate({**start.params(), **start.buffers()}, missing))
            out[owner] = values
        return out

    def constants(self, stage: int, kind: str) -> TensorDict:
        """The tensors of ``kind`` stage ``stage`` lacks, constant through it at first values."""
        kinds, names = self.kinds[stage], self.names[stage]
        lacking = [n for n, k in kinds.items() if k == kind and n not in names]
        return {n: self._first_values[self.owners[stage]][n] for n in lacking}

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
                    "SOURCE cannot carry effects across such a change (a model built afresh "
                    "for the stage without loading the trained weights, a re-initialised head, "
                    "merged adapters). Where the weights were not loaded, train the stage again "
                    "from them; if the tensors were replaced on purpose, record the stage with "
                    "next_stage(..., renamed={name: None}) so that they count as new."
                )
