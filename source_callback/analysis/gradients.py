"""Per-unit gradients: materialised for queries, only contracted for training examples."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from source_callback.analysis.ekfac import Capture, per_example
from source_callback.analysis.units import Factored, Unit

ModuleTensors = dict[str, torch.Tensor]
PerExample = Callable[[nn.Module, Any], torch.Tensor]


def per_example_grads(
    model: nn.Module,
    units: dict[str, Unit],
    fn: PerExample,
    batches: Iterable[Any],
) -> ModuleTensors:
    """Gradients of ``fn`` (one value per example) for every example: ``{unit: [N, out, in]}``.

    Used for queries, whose count is small; never for training data. A tied parameter's
    gradient is summed over its uses; a unit no gradient reaches gets zeros.
    """
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in units}
    device = next(model.parameters()).device

    def on_grads(name: str, grads: list[Factored]) -> None:
        batch_grads[name] = per_example(grads)

    with Capture(model, units, on_grads) as capture:
        for batch in batches:
            capture.reset()
            batch_grads: dict[str, torch.Tensor] = {}
            values = fn(model, batch)
            capture.backward(values.sum())
            for name, unit in units.items():
                parts[name].append(batch_grads.get(name, _zeros(len(values), unit.shape, device)))
    return {
        name: torch.cat(chunks) if chunks else _zeros(0, units[name].shape, device)
        for name, chunks in parts.items()
    }


def _zeros(count: int, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    return torch.zeros((count, *shape), dtype=torch.float64, device=device)


def contract(
    model: nn.Module,
    units: dict[str, Unit],
    fn: PerExample,
    batch: Any,
    vectors: ModuleTensors,
) -> torch.Tensor:
    """``⟨vectors[q], ∇fn(z)⟩`` summed over units, ``[B, Q]``, without per-example gradients.

    Each use of a unit contributes its own contraction (the inner product is linear in the
    gradient, so a tied parameter's sum over uses needs no buffer); see
    :meth:`~source_callback.analysis.units.Factored.contract`.
    """
    total: list[torch.Tensor] = []

    def on_grads(name: str, grads: list[Factored]) -> None:
        total.extend(part.contract(vectors[name]) for part in grads)

    with Capture(model, units, on_grads) as capture:
        values = fn(model, batch)
        capture.backward(values.sum())
    queries = len(next(iter(vectors.values())))
    out = torch.zeros(len(values), queries, dtype=torch.float64, device=values.device)
    return out + sum(total) if total else out
