"""Per-module gradients: materialised for queries, only contracted for training examples."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from source_callback.analysis.ekfac import Capture, per_example

ModuleTensors = dict[str, torch.Tensor]
#: Most per-example gradient entries :func:`contract` forms at once (128 MiB in float64).
CONTRACT_ELEMENTS = 2**24
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

    For a module with ``G_z = Σ_tok s aᵀ``, ``⟨V, G_z⟩ = vec(G_z)ᵀ vec(V)``: the per-example
    gradients of a few examples at a time (at most ``CONTRACT_ELEMENTS`` floats) times all
    queries' vectors in one matrix product. That is 2-40× faster than contracting ``s``, ``V``
    and ``a`` directly, which goes through a ``[B, tokens, Q, in]`` intermediate
    (``benchmarks/speed.py``); only the chunk's gradients are ever held.
    """
    total: list[torch.Tensor] = []

    def on_grads(name: str, a: torch.Tensor, s: torch.Tensor) -> None:
        v = vectors[name].to(s.device, torch.float64)
        flat = v.reshape(len(v), -1).T  # [out·in, Q]
        rows = max(1, CONTRACT_ELEMENTS // flat.shape[0])
        total.append(
            torch.cat(
                [
                    per_example(a[i : i + rows], s[i : i + rows]).flatten(1) @ flat
                    for i in range(0, len(a), rows)
                ]
            )
        )

    with Capture(modules, on_grads):
        fn(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)
    return torch.stack(total).sum(0)
