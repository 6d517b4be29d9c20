"""Ground truth for attribution tests: exact unrolled differentiation through a recorded run.

The recorded trajectory (same data order, the recorded learning rates, the optimizer's exact
update rule) is replayed functionally with a weight (1 + ε_m) on every training example; the
derivative of the final measurement with respect to ε, negated, is the exact first-order
leave-one-out effect that SOURCE estimates (SOURCE-math §1–2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]


def _differentiable(start: Params) -> Params:
    """Copies that require grad; one carrying a graph (an earlier stage's replay) keeps it.

    Each copy is a new node, so a step's gradient is the partial derivative through this
    stage's uses alone. Returning a leaf of the earlier stage itself (a tensor that stage read
    but did not train: a zero LoRA ``B``) would add that stage's path through the trained
    weights to its gradient.
    """
    return {
        n: p.clone() if p.requires_grad else p.detach().clone().requires_grad_(True)
        for n, p in start.items()
    }


def sgd_replay(
    model: nn.Module,
    start: Params,
    batches: Sequence[torch.Tensor],
    loss: Callable[[nn.Module, Params, torch.Tensor], torch.Tensor],
    lrs: Sequence[float],
    weights: torch.Tensor,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    frozen: frozenset[str] = frozenset(),
    clip: float | None = None,
) -> Params:
    """PyTorch SGD (heavy-ball momentum, coupled decay) with per-example loss weights.

    ``batches[t]`` holds the example indices of step t; ``loss(model, params, idx)`` returns
    their per-example losses. The step's gradient is that of ``mean_i (1 + ε_i) L_i``; with
    ``clip``, scaled by ``min(1, clip / (‖g‖ + 1e-6))`` first, as ``clip_grad_norm_`` does
    before the optimizer adds the decay (the factor's dependence on ε differentiated too).
    """
    params = _differentiable(start)
    buffers: Params | None = None
    for idx, lr in zip(batches, lrs, strict=True):
        objective = (weights[idx] * loss(model, params, idx)).mean()
        grads = torch.autograd.grad(objective, list(params.values()), create_graph=True)
        if clip is not None:
            norm = torch.sqrt(sum((g**2).sum() for g in grads))
            grads = [g * torch.clamp(clip / (norm + 1e-6), max=1.0) for g in grads]
        grads = {n: g + weight_decay * params[n] for n, g in zip(params, grads, strict=True)}
        if momentum:
            if buffers is None:
                buffers = dict(grads)  # PyTorch initialises the buffer with the first gradient
            else:
                buffers = {n: momentum * buffers[n] + (1 - dampening) * grads[n] for n in grads}
            grads = buffers
        params = {n: params[n] if n in frozen else params[n] - lr * grads[n] for n in params}
    return params


def leave_one_out_effects(
    model: nn.Module,
    final: Callable[[torch.Tensor], Params],
    measurement: Callable[[nn.Module, Params], torch.Tensor],
    num_examples: int,
) -> torch.Tensor:
    """``−d f_q / d ε_m`` for every query q and example m: ``[Q, N]``."""
    weights = torch.ones(num_examples, dtype=torch.float64, requires_grad=True)
    values = measurement(model, final(weights))
    rows = [-torch.autograd.grad(v, weights, retain_graph=True)[0] for v in values]
    return torch.stack(rows).detach()


def call(model: nn.Module, params: Params, *args: torch.Tensor) -> torch.Tensor:
    """``model(*args)`` with ``params`` substituted (buffers as they are)."""
    return functional_call(model, params, args)


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """``√v`` whose derivative is 0 where ``v`` is 0.

    Adam's second moment is exactly 0 where a gradient always was (embedding rows of tokens no
    batch held, for every ε): there the update does not depend on ε, but the plain square
    root's infinite slope times a zero derivative would give NaN.
    """
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, 1.0).sqrt(), 0.0)


def adam_replay(
    model: nn.Module,
    start: Params,
    batches: Sequence[torch.Tensor],
    loss: Callable[[nn.Module, Params, torch.Tensor], torch.Tensor],
    lrs: Sequence[float],
    weights: torch.Tensor,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = True,
    frozen: frozenset[str] = frozenset(),
) -> Params:
    """PyTorch Adam (``decoupled=False``) or AdamW with per-example loss weights.

    Parameters in ``frozen`` enter the loss (carrying their graph) but are not updated.
    """
    params = _differentiable(start)
    trained = [n for n in params if n not in frozen]
    m = {n: torch.zeros_like(params[n]) for n in trained}
    v = {n: torch.zeros_like(params[n]) for n in trained}
    beta1, beta2 = betas
    for k, (idx, lr) in enumerate(zip(batches, lrs, strict=True), start=1):
        objective = (weights[idx] * loss(model, params, idx)).mean()
        grads = dict(
            zip(
                trained,
                torch.autograd.grad(objective, [params[n] for n in trained], create_graph=True),
                strict=True,
            )
        )
        new = dict(params)
        for n in trained:
            p = params[n]
            g = grads[n] if decoupled else grads[n] + weight_decay * p
            if decoupled:
                p = p * (1 - lr * weight_decay)
            m[n] = beta1 * m[n] + (1 - beta1) * g
            v[n] = beta2 * v[n] + (1 - beta2) * g * g
            denom = _sqrt(v[n] / (1 - beta2**k)) + eps
            new[n] = p - lr / (1 - beta1**k) * m[n] / denom
        params = new
    return params
