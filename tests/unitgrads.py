"""Per-example unit gradients from plain autograd (no hooks): the ground truth of the hooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from source_callback.analysis.units import Unit


def autograd_per_example(
    model: nn.Module,
    units: dict[str, Unit],
    fn: Callable[[nn.Module, Any], torch.Tensor],
    examples: list[Any],
) -> dict[str, torch.Tensor]:
    """``{unit: [N, out, in]}``: one backward pass of ``fn(model, example).sum()`` per example.

    A tied parameter's ``.grad`` already sums all its uses.
    """
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in units}
    for example in examples:
        model.zero_grad(set_to_none=True)
        fn(model, example).sum().backward()
        by_name = {
            n: torch.zeros_like(p) if p.grad is None else p.grad
            for n, p in model.named_parameters()
        }
        for name, unit in units.items():
            grads[name].append(unit.matrix(by_name).double())
    model.zero_grad(set_to_none=True)
    return {name: torch.stack(parts) for name, parts in grads.items()}


def split(batch: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """A batch of tensors as single-example batches."""
    return [tuple(t[i : i + 1] for t in batch) for i in range(len(batch[0]))]
