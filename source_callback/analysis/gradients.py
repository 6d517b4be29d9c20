"""Per-module gradients: materialised for queries, only contracted for training examples."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from source_callback.analysis.ekfac import Capture, per_example

ModuleTensors = dict[str, torch.Tensor]
PerExample = Callable[[nn.Module, Any], torch.Tensor]


def per_example_grads(
    model: nn.Module,
    modules: dict[str, nn.Module],
    fn: PerExample,
    batches: Iterable[Any],
    shapes: dict[str, tuple[int, int]],
) -> ModuleTensors:
    """Gradients of ``fn`` (one value per example) for every example: ``{module: [N, out, in]}``.

    Used for queries, whose count is small; never for training data. ``shapes`` gives each
    module's ``(out, in)``, for the empty result of no batches.
    """
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def on_grads(name: str, a: torch.Tensor, s: torch.Tensor) -> None:
        parts[name].append(per_example(a, s))

    with Capture(modules, on_grads):
        for batch in batches:
            fn(model, batch).sum().backward()
            model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    return {
        name: torch.cat(chunks)
        if chunks
        else torch.zeros((0, *shapes[name]), dtype=torch.float64, device=device)
        for name, chunks in parts.items()
    }


def contract(
    model: nn.Module,
    modules: dict[str, nn.Module],
    fn: PerExample,
    batch: Any,
    vectors: ModuleTensors,
) -> torch.Tensor:
    """``⟨vectors[q], ∇fn(z)⟩`` summed over modules, ``[B, Q]``, without per-example gradients.

    For a module with ``G_z = Σ_tok s aᵀ``, ``⟨V, G_z⟩ = Σ_tok sᵀ V a``.
    """
    total: list[torch.Tensor] = []

    def on_grads(name: str, a: torch.Tensor, s: torch.Tensor) -> None:
        v = vectors[name].to(s.device, torch.float64)
        total.append(torch.einsum("bto,qoi,bti->bq", s.double(), v, a.double()))

    with Capture(modules, on_grads):
        fn(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)
    return torch.stack(total).sum(0)
