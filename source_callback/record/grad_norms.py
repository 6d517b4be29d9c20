"""Gradient norms measured when each backward pass ends.

For a framework whose callbacks see the gradients only after it clipped them (the Hugging Face
Trainer's ``max_grad_norm``).
"""

from __future__ import annotations

import torch
from torch import nn

from source_callback.optim import GradientNorms


class BackwardEndNorms:
    """The trainable parameters' gradient norms as each backward pass leaves them.

    The measurement is queued from the first gradient hook of a backward pass and runs after
    every gradient has been accumulated, and, under DDP, averaged across processes: DDP averages
    in a callback it queues during the backward pass, and this one is queued behind it. It costs
    one fused norm over the gradients per backward pass and no synchronisation.

    Parameters
    ----------
    model
        The model whose parameters with ``requires_grad`` are measured.
    """

    def __init__(self, model: nn.Module) -> None:
        self._params = tuple(p for p in model.parameters() if p.requires_grad)
        self._queued = False
        self._latest: GradientNorms | None = None
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]

    def _on_grad(self, param: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            # Callbacks run in the order queued, and one may queue more: queueing the
            # measurement from a callback puts it behind every callback queued during the pass.
            _engine().queue_callback(lambda: _engine().queue_callback(self._measure))

    def _measure(self) -> None:
        self._queued = False
        self._latest = GradientNorms.of(self._params)

    def take(self) -> GradientNorms | None:
        """The last backward pass's norms (once: ``None`` until the next pass ends)."""
        latest, self._latest = self._latest, None
        self._queued = False  # a pass that raised left its measurement unqueued
        return latest

    def remove(self) -> None:
        """Remove the gradient hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _engine() -> torch._C._EngineBase:
    return torch.autograd.Variable._execution_engine
