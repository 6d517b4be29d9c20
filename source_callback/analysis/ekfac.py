"""EK-FAC curvature per tracked module (SOURCE-math §5; Grosse et al. 2023).

For every tracked ``nn.Linear`` and ``nn.Conv2d`` the per-example gradient of the weight (with
the bias as an extra input column) is ``G = Σ_tok s aᵀ``: ``a`` the module's input (unfolded
patches for convolutions, a 1 appended for the bias) and ``s`` the gradient of the loss with
respect to the module's output. Hooks capture both, so gradients are only ever formed per
module and per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

TRACKED = (nn.Linear, nn.Conv2d)


def tracked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules EK-FAC covers, by qualified name: trainable ``Linear`` and ``Conv2d``."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, TRACKED) and module.weight.requires_grad:
            if isinstance(module, nn.Conv2d) and (
                module.groups != 1 or module.padding_mode != "zeros"
            ):
                continue  # grouped or non-zero-padded convolutions: not modelled
            out[name] = module
    return out


def module_param_names(name: str, module: nn.Module) -> tuple[str, str | None]:
    """Qualified names of a tracked module's weight and bias (``None`` without bias)."""
    prefix = f"{name}." if name else ""
    return f"{prefix}weight", (f"{prefix}bias" if module.bias is not None else None)


def module_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a tracked module's gradient matrix (``in`` counts the bias column)."""
    weight = module.weight
    fan_in = int(np.prod(weight.shape[1:])) + (1 if module.bias is not None else 0)
    return int(weight.shape[0]), fan_in


def activations(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Module input as ``[B, tokens, in (+1 for bias)]``."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(
            inputs,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )  # [B, C·kh·kw, L]
        a = patches.transpose(1, 2)
    else:
        a = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
    return a


def output_grads(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the module's output as ``[B, tokens, out]``."""
    if isinstance(module, nn.Conv2d):
        return grad.flatten(2).transpose(1, 2)
    return grad.reshape(grad.shape[0], -1, grad.shape[-1])


def weight_matrix(
    module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """A module's parameters (or gradients) as one ``[out, in (+1)]`` matrix."""
    matrix = weight.reshape(weight.shape[0], -1)
    if bias is not None:
        matrix = torch.cat([matrix, bias[:, None]], dim=1)
    return matrix


class Capture:
    """Context manager that records each tracked module's ``a`` and ``s`` for one batch.

    After a forward pass, ``a[name]`` holds the activations; after each backward pass,
    ``on_grads(name, a, s)`` is called for every module (several backward passes through one
    forward pass are allowed).
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        on_grads: Callable[[str, torch.Tensor, torch.Tensor], None],
    ) -> None:
        self.modules = modules
        self.on_grads = on_grads
        self.a: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _forward_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.a[name] = activations(module, inputs[0].detach())
            if output.requires_grad:
                output.register_hook(
                    lambda grad: self.on_grads(name, self.a[name], output_grads(module, grad))
                )

        return hook

    def __enter__(self) -> Capture:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.a.clear()


def _backward_each(losses: torch.Tensor) -> Iterator[None]:
    """Backpropagate each row of ``[K, B]`` losses (summed over the batch) in turn."""
    for k in range(losses.shape[0]):
        losses[k].sum().backward(retain_graph=k + 1 < losses.shape[0])
        yield


def pseudo_backward(
    task: Any, model: nn.Module, batch: Any, generator: torch.Generator, exact: bool
) -> Iterator[None]:
    """Run the backward passes whose captured ``s`` give pseudo-gradients for one batch."""
    if exact:
        yield from _backward_each(task.exact_pseudo_losses(model, batch))
    else:
        yield from _backward_each(task.pseudo_loss(model, batch, generator)[None])


def pseudo_passes(
    model: nn.Module,
    modules: dict[str, nn.Module],
    task: Any,
    batches: Iterable[Any],
    generator: torch.Generator,
    exact: bool,
    on_grads: Callable[[str, torch.Tensor, torch.Tensor], None],
) -> Iterator[dict[str, torch.Tensor]]:
    """Run the pseudo-gradient backward passes of every batch; yield each batch's activations.

    ``on_grads(name, a, s)`` sees every module's activations and output gradients per pass.
    """
    with Capture(modules, on_grads) as capture:
        for batch in batches:
            for _ in pseudo_backward(task, model, batch, generator, exact):
                pass
            model.zero_grad(set_to_none=True)
            yield capture.a


@dataclass
class Covariances:
    """Running sums of ``a aᵀ`` and ``s sᵀ`` (summed over tokens) and the example count."""

    a: torch.Tensor
    s: torch.Tensor
    count: int = 0

    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E[a aᵀ], E[s sᵀ])`` per example."""
        return self.a / self.count, self.s / self.count


def per_example(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-example gradients ``G = Σ_tok s aᵀ``: ``[B, out, in]`` (float64)."""
    return torch.einsum("bto,bti->boi", s.double(), a.double())


def covariances(
    model: nn.Module,
    modules: dict[str, nn.Module],
    task: Any,
    batches: Iterable[Any],
    generator: torch.Generator,
    exact: bool = False,
    scale: dict[str, torch.Tensor] | None = None,
) -> dict[str, Covariances]:
    """One pass over ``batches``: the two Kronecker factors per module (float64).

    Without ``scale``: per-example ``E[a aᵀ]`` and ``E[s sᵀ]`` (tokens summed). With
    ``scale`` (an ``[out, in]`` matrix per module, e.g. Adam's ``P^{1/2}``): ``E[G'ᵀG']`` and
    ``E[G'G'ᵀ]`` of the scaled per-example pseudo-gradients ``G' = scale ∘ G``.
    """
    sums: dict[str, Covariances] = {}

    def entry(name: str, a_dim: int, s_dim: int, device: torch.device) -> Covariances:
        if name not in sums:
            zeros = torch.zeros
            sums[name] = Covariances(
                zeros(a_dim, a_dim, dtype=torch.float64, device=device),
                zeros(s_dim, s_dim, dtype=torch.float64, device=device),
            )
        return sums[name]

    def on_grads(name: str, a: torch.Tensor, s: torch.Tensor) -> None:
        sums_ = entry(name, a.shape[-1], s.shape[-1], s.device)
        if scale is None:
            s = s.double()
            sums_.s += torch.einsum("bto,btp->op", s, s)
            return
        g = per_example(a, s) * scale[name]
        sums_.s += torch.einsum("boi,bpi->op", g, g)
        sums_.a += torch.einsum("boi,boj->ij", g, g)

    for activations_ in pseudo_passes(model, modules, task, batches, generator, exact, on_grads):
        for name, a in activations_.items():
            if scale is None:
                a = a.double()
                sums[name].a += torch.einsum("bti,btj->ij", a, a)
            sums[name].count += a.shape[0]
    return sums


def corrected_eigenvalues(
    model: nn.Module,
    modules: dict[str, nn.Module],
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
    task: Any,
    batches: Iterable[Any],
    generator: torch.Generator,
    exact: bool = False,
    scale: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One pass: ``Λ[i, j] = E_z[(Q_Sᵀ G'_z Q_A)_ij²]`` per module in the given bases.

    ``G' = G``, or ``scale ∘ G`` when ``scale`` is given (see :func:`covariances`). In exact
    mode each of the K backward passes contributes its own squared rotated gradient.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def on_grads(name: str, a: torch.Tensor, s: torch.Tensor) -> None:
        q_a, q_s = bases[name]
        if scale is None:
            # Σ_tok (Q_Sᵀ s)(Q_Aᵀ a)ᵀ: rotating each factor first, then one batched product,
            # is 4-10x faster than the four-operand einsum (benchmarks/speed.py).
            rotated = (s.double() @ q_s).transpose(1, 2) @ (a.double() @ q_a)
        else:
            g = per_example(a, s) * scale[name]
            rotated = torch.einsum("op,boi,iq->bpq", q_s, g, q_a)
        total = sums.get(name)
        sums[name] = rotated.square().sum(0) + (0 if total is None else total)

    for activations_ in pseudo_passes(model, modules, task, batches, generator, exact, on_grads):
        for name, a in activations_.items():
            counts[name] = counts.get(name, 0) + a.shape[0]
    return {name: sums[name] / counts[name] for name in sums}


def eigh_float64(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric matrix in float64 (symmetrised first)."""
    matrix = matrix.double()
    return torch.linalg.eigh((matrix + matrix.T) / 2)


@dataclass
class ModuleCurvature:
    """EK-FAC of one module: ``H ≈ (Q_A ⊗ Q_S) diag(Λ) (Q_A ⊗ Q_S)ᵀ`` on ``[out, in]`` matrices."""

    q_a: torch.Tensor
    q_s: torch.Tensor
    eigenvalues: torch.Tensor  # [out, in]

    def apply(
        self, matrix: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``f(H) · vec(matrix)`` for a function ``fn`` of the eigenvalues, as ``[out, in]``."""
        rotated = self.q_s.T @ matrix.to(self.q_s.dtype) @ self.q_a
        return self.q_s @ (fn(self.eigenvalues) * rotated) @ self.q_a.T

    def diagonal(self) -> torch.Tensor:
        """Diagonal of ``H`` as ``[out, in]``: ``(Q_S∘Q_S) Λ (Q_A∘Q_A)ᵀ``."""
        return self.q_s.square() @ self.eigenvalues @ self.q_a.square().T

    def in_basis(self, matrix: torch.Tensor) -> torch.Tensor:
        """Diagonal of ``diag(vec matrix)`` in the eigenbasis: ``(Q_S∘Q_S)ᵀ M (Q_A∘Q_A)``."""
        return self.q_s.square().T @ matrix.to(self.q_s.dtype) @ self.q_a.square()

    def dense(self) -> torch.Tensor:
        """The full matrix over row-major ``vec([out, in])`` (small modules only: tests)."""
        basis = torch.kron(self.q_s, self.q_a)  # row-major vec(Q_S X Q_Aᵀ) = (Q_S ⊗ Q_A) vec(X)
        return basis @ torch.diag(self.eigenvalues.reshape(-1)) @ basis.T
