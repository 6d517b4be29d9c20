"""The passes over data that an analysis makes, on a private copy of the user's model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from source_callback.analysis import ekfac
from source_callback.analysis.gradients import ModuleTensors, contract, per_example_grads
from source_callback.analysis.inputs import batches, evaluate, on_device
from source_callback.analysis.task import Task
from source_callback.errors import AnalysisError

State = dict[str, torch.Tensor]
#: Loads a state when a pass needs it, so that a run's checkpoints are never all in memory.
StateSource = Callable[[], State]


class Engine:
    """The data passes of one analysis: holds the model copy, the data and the settings."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train: Mapping[str, Dataset],
        batch_size: int,
        fisher: str,
        seed: int,
        verbose: bool,
        collate_fn: Any,
    ) -> None:
        self.model = model
        self.task = task
        self.train = train
        self.batch_size = batch_size
        self.exact = fisher == "exact"
        self.generator = torch.Generator().manual_seed(seed)
        self.verbose = verbose
        self.collate_fn = collate_fn
        self.device = next(model.parameters()).device
        self.modules = ekfac.tracked_modules(model)
        if not self.modules:
            raise AnalysisError("the model has no trainable nn.Linear or nn.Conv2d to analyze")

    def load(self, state: State) -> None:
        """Put ``state``'s parameters and buffers into the model."""
        self.model.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=True)

    def data(self, dataset: Dataset, desc: str) -> Any:
        """Batches of ``dataset`` on the model's device, with a progress bar."""
        loader = batches(dataset, self.batch_size, self.collate_fn)
        return tqdm(
            on_device(loader, self.device),
            total=len(loader),
            desc=desc,
            disable=not self.verbose,
            leave=False,
        )

    def curvature(
        self,
        dataset: Dataset,
        states: list[StateSource],
        label: str,
        scale: dict[str, torch.Tensor] | None = None,
        modules: dict[str, nn.Module] | None = None,
    ) -> dict[str, ekfac.ModuleCurvature]:
        """EK-FAC of the mean Gauss-Newton Hessian over ``states`` on ``dataset``.

        With ``scale`` (Adam's ``P^{1/2}`` per module) it is fitted to the scaled
        pseudo-gradients, i.e. to ``P^{1/2} H P^{1/2}``. ``modules`` restricts the fit (to
        those a stage trains); all tracked modules by default.
        """
        modules = self.modules if modules is None else modules
        a_sum: dict[str, torch.Tensor] = {}
        s_sum: dict[str, torch.Tensor] = {}
        for i, state in enumerate(states):
            self.load(state())
            covs = ekfac.covariances(
                self.model,
                modules,
                self.task,
                self.data(dataset, f"{label} factors {i + 1}/{len(states)}"),
                self.generator,
                self.exact,
                scale,
            )
            for name, cov in covs.items():
                a, s = cov.mean()
                a_sum[name] = a_sum.get(name, 0) + a
                s_sum[name] = s_sum.get(name, 0) + s
        bases = {
            n: (ekfac.eigh_float64(a_sum[n])[1], ekfac.eigh_float64(s_sum[n])[1]) for n in a_sum
        }
        lam_sum: dict[str, torch.Tensor] = {}
        for i, state in enumerate(states):
            self.load(state())
            lam = ekfac.corrected_eigenvalues(
                self.model,
                modules,
                bases,
                self.task,
                self.data(dataset, f"{label} eigenvalues {i + 1}/{len(states)}"),
                self.generator,
                self.exact,
                scale,
            )
            for name, value in lam.items():
                lam_sum[name] = lam_sum.get(name, 0) + value
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

    def module_matrices(self, state: State) -> ModuleTensors:
        """Tracked parameters of a state as ``[out, in (+1)]`` matrices."""
        out = {}
        for name, module in self.modules.items():
            weight, bias = ekfac.module_param_names(name, module)
            out[name] = ekfac.weight_matrix(module, state[weight], state[bias] if bias else None)
        return out

    def scores(
        self, dataset: Dataset, states: list[StateSource], vectors: ModuleTensors, label: str
    ) -> np.ndarray:
        """``(1/C) Σ_c ⟨v, ∇L(z_m, θ_c)⟩`` for every example of ``dataset``: ``[Q, N]``.

        Accumulated in place into one float64 array: memory holds one ``[Q, N]`` copy (keeping
        per-batch rows for a concatenation held several, and fragmented the heap as N grew).
        """
        queries = len(next(iter(vectors.values())))
        total = np.zeros((queries, len(dataset)))  # type: ignore[arg-type]
        for i, state in enumerate(states):
            self.load(state())
            start = 0
            for batch in self.data(dataset, f"{label} scores {i + 1}/{len(states)}"):
                rows = contract(self.model, self.modules, self.task.loss, batch, vectors)
                total[:, start : start + len(rows)] += rows.T.cpu().numpy()
                start += len(rows)
        total /= len(states)
        return total

    def query_grads(self, queries: Dataset, label: str = "query gradients") -> ModuleTensors:
        """Per-query measurement gradients at the loaded state: ``{module: [Q, out, in]}``."""
        return per_example_grads(
            self.model, self.modules, self.task.measurement, self.data(queries, label)
        )

    def measurement(self, queries: Dataset) -> np.ndarray:
        """The measurement of every query at the loaded state, ``[Q]``."""
        values = evaluate(self.task.measurement, self.model, self.data(queries, "measurement"))
        return values.double().cpu().numpy()
