"""The per-example gradient capture checked against autograd before the first pass.

Units capture per-example gradients through hooks, by rules: how a module lays its gradient
out as a matrix, which rows of a call belong to which example (a batch dimension, the batch's
tokens flattened, a call shared by the batch) and what the gradient is (a product of captured
sides, or the module re-run). A rule that does not fit a module would make every score through
it wrong without an error. So before the first pass :func:`check_capture` compares, on the
first few examples of each model's first stage and through a seeded random projection of every
unit:

- the batch's captured gradients, example by example, with each example captured alone (which
  rows belong to which example);
- their sum over the batch with autograd's gradient of the batch's summed loss, every unit's
  parameters differentiated as in training (what each unit's gradient is).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from source_callback.analysis.gradients import PerExample
from source_callback.analysis.inputs import to_device
from source_callback.analysis.projection import KroneckerProjection, projected_grads
from source_callback.analysis.units import Unit
from source_callback.errors import AnalysisError, listed

#: Examples each model is checked on.
EXAMPLES = 4
#: Size of each side of a unit's projection.
PROJECTION = 4
#: Most bytes of parameter gradients formed at once by the autograd reference.
GRADIENT_BYTES = 2**30
#: Largest difference allowed, relative to the largest projected value of the unit: float32
#: rounding of a batch against one example is near 1e-6 (1e-3 where a GPU's convolutions run
#: in TF32, cuDNN's default); a wrong rule is of order one (0.65 and 1.9 on the embeddings it
#: caught).
RTOL = 1e-2


@contextmanager
def _differentiated(model: nn.Module, names: Sequence[str]) -> Any:
    """The named parameters require gradients inside, as they did before after."""
    params = [model.get_parameter(name) for name in names]
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield params
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)


def autograd_projected(
    model: nn.Module,
    units: Mapping[str, Unit],
    fn: PerExample,
    batch: Any,
    projection: KroneckerProjection,
) -> torch.Tensor:
    """``[1, dim]``: the projected autograd gradient of ``fn``'s sum over the batch.

    The analysis forms no parameter gradients; so that this check adds no model-sized memory,
    the units' gradients are taken in groups of at most :data:`GRADIENT_BYTES`, one backward
    pass each.
    """
    out = torch.zeros(1, projection.dim, dtype=torch.float64)
    for group in _groups(model, units):
        names = list(dict.fromkeys(p for name in group for p in units[name].params))
        with _differentiated(model, names) as params:
            grads = torch.autograd.grad(fn(model, batch).sum(), params, allow_unused=True)
        by_name = {
            name: torch.zeros_like(p) if g is None else g
            for name, p, g in zip(names, params, grads, strict=True)
        }
        for name in group:
            matrix = units[name].matrix(by_name)[None]
            out[:, projection.offsets[name]] = projection.project_unit(name, matrix).cpu()
    return out


def _groups(model: nn.Module, units: Mapping[str, Unit]) -> list[list[str]]:
    """Units in groups whose parameters hold at most :data:`GRADIENT_BYTES` (one unit more)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, unit in units.items():
        bytes_ = sum((p := model.get_parameter(n)).numel() * p.element_size() for n in unit.params)
        if groups[-1] and size + bytes_ > GRADIENT_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += bytes_
    return groups


def check_capture(
    model: nn.Module,
    units: Mapping[str, Unit],
    fn: PerExample,
    dataset: Dataset,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    label: str = "the model",
) -> None:
    """Refuse a model whose units' captured gradients are not its examples' gradients.

    Parameters
    ----------
    model
        The model (in eval mode: dropout would make two passes differ).
    units
        Its units.
    fn
        Per-example function the analysis differentiates (the task's loss).
    dataset
        Examples to check on: the first :data:`EXAMPLES`.
    collate_fn
        Collates a list of examples into a batch (default: torch's ``default_collate``).
    label
        What the model is, for the message.

    Raises
    ------
    AnalysisError
        Names each unit whose captured gradients differ, and how.
    """
    collate = collate_fn or default_collate
    examples = [dataset[i] for i in range(min(EXAMPLES, len(dataset)))]  # type: ignore[arg-type]
    if not examples or not units:
        return
    device = next(model.parameters()).device
    projection = KroneckerProjection.for_modules(units, PROJECTION, 0, device)

    def batch(items: list[Any]) -> Any:
        return to_device(collate(items), device)

    whole = batch(examples)
    together = projected_grads(model, units, fn, whole, projection)
    alone = torch.cat([projected_grads(model, units, fn, batch([e]), projection) for e in examples])
    exact = autograd_projected(model, units, fn, whole, projection).to(device)
    problems = []
    for name in projection.names:
        columns = projection.offsets[name]
        t, a, e = together[:, columns], alone[:, columns], exact[:, columns]
        scale = max(float(a.abs().max()), float(e.abs().max()), 1e-30)
        rows = float((t - a).abs().max()) / scale
        total = float((t.sum(0) - e[0]).abs().max()) / scale
        if rows > RTOL:
            problems.append(
                f"{name}: an example's gradient in a batch differs from its gradient alone "
                f"({rows:.2g} of the largest value): the unit's rows are not assigned to the "
                "right examples"
            )
        elif total > RTOL:
            problems.append(
                f"{name}: the captured gradients sum to other than autograd's gradient "
                f"({total:.2g} of the largest value): the module computes other than its kind "
                "assumes (e.g. a subclass whose forward changes its input or output)"
            )
    if problems:
        raise AnalysisError(
            f"the per-example gradients captured for {label} are not its examples' gradients, "
            f"checked on {len(examples)} examples against autograd: {listed(problems, 5, '; ')}. "
            "Leave these units out with modules={'exclude': [<unit name>, ...]}; nothing was "
            "computed or stored."
        )
