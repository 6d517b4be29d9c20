"""The SOURCE estimator on EK-FAC curvature: segment operators and the query-side sweep.

Everything is moved to the query side (SOURCE-math §3): walking the segments from last to first,
``v_ℓ = R_ℓᵀ u_ℓ`` is the vector that training gradients of segment ℓ are dotted with, and
``u_{ℓ−1} = Ξ_ℓᵀ u_ℓ`` carries the query gradient back through segment ℓ. A segment operator
provides both products; which one applies depends on the optimizer (SOURCE-math §4).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from source_callback.analysis.ekfac import ModuleCurvature
from source_callback.analysis.gradients import ModuleTensors
from source_callback.analysis.matfun import phi, xi

Shift = float | torch.Tensor


class SegmentOperator(Protocol):
    """What the sweep needs from a segment."""

    def propagate(self, u: ModuleTensors) -> ModuleTensors:
        """``Ξᵀ u``: carry query-side vectors back through the segment."""
        ...

    def respond(self, u: ModuleTensors) -> ModuleTensors:
        """``Rᵀ u``: the vector a training gradient of this segment is dotted with."""
        ...

    def respond_and_propagate(self, u: ModuleTensors) -> tuple[ModuleTensors, ModuleTensors]:
        """``(Rᵀ u, Ξᵀ u)``, what the sweep takes at each segment."""
        ...


def untrained(u: ModuleTensors, trained: dict[str, object], respond: bool) -> ModuleTensors:
    """The parts of ``u`` for modules a segment does not train.

    The segment leaves them unchanged (propagation is the identity) and none of its gradients
    reach them (zero response).
    """
    return {
        name: torch.zeros_like(vector) if respond else vector
        for name, vector in u.items()
        if name not in trained
    }


@dataclass
class EkfacOperator:
    """``Ξ = exp(−τ P H̃)`` and ``R = (I − Ξ) H̃⁻¹`` with H̃ in EK-FAC form.

    Without a preconditioner (SGD family) ``H̃ = H + λI``. With one (Adam, the preconditioned
    EK-FAC variant), ``curvature`` was fitted to ``P^{1/2}``-scaled pseudo-gradients, so it
    approximates ``H' = P^{1/2} H P^{1/2}``, and ``Ξ = P^{1/2} ξ(H') P^{−1/2}``,
    ``R = P^{1/2} φ(H') P^{1/2}`` — exact when P is constant.

    Attributes
    ----------
    curvature
        EK-FAC per module.
    tau
        Learning-rate mass of each module's parameter group.
    shift
        Added to the eigenvalues: coupled weight decay λ (SGD), decoupled λ (AdamW), or the
        eigenbasis diagonal of λP (Adam with coupled decay); ``[out, in]`` tensors allowed.
    sqrt_p
        ``P^{1/2}`` per module as ``[out, in]``, or ``None`` without a preconditioner.
    """

    curvature: dict[str, ModuleCurvature]
    tau: dict[str, float]
    shift: dict[str, Shift]
    sqrt_p: dict[str, torch.Tensor] | None = None

    def _apply(self, u: ModuleTensors, kinds: tuple[bool, ...]) -> list[ModuleTensors]:
        """The response (``True``) or propagation (``False``) of ``u`` for each of ``kinds``.

        Both start from ``P^{1/2} u`` in the eigenbasis: it is rotated in once for all.
        """
        outs = [untrained(u, self.curvature, respond) for respond in kinds]
        for name, c in self.curvature.items():
            scale = 1.0 if self.sqrt_p is None else self.sqrt_p[name]
            fns = [
                lambda lam, n=name, fn=phi if respond else xi: fn(lam + self.shift[n], self.tau[n])
                for respond in kinds
            ]
            results = c.apply_each(u[name] * scale, fns)
            for out, respond, result in zip(outs, kinds, results, strict=True):
                out[name] = result * scale if respond else result / scale
        return outs

    def propagate(self, u: ModuleTensors) -> ModuleTensors:
        """``Ξᵀ u = P^{−1/2} ξ(H') P^{1/2} u``."""
        return self._apply(u, (False,))[0]

    def respond(self, u: ModuleTensors) -> ModuleTensors:
        """``Rᵀ u = P^{1/2} φ(H') P^{1/2} u``."""
        return self._apply(u, (True,))[0]

    def respond_and_propagate(self, u: ModuleTensors) -> tuple[ModuleTensors, ModuleTensors]:
        """Both, ``u`` rotated into each module's eigenbasis once."""
        response, propagated = self._apply(u, (True, False))
        return response, propagated


@dataclass
class DiagonalExpOperator:
    """The paper's Adam variant (App. D.2): exponentials taken per coordinate.

    ``Ξ = exp(−τ (P ∘ (d + λ_c) + λ_d))`` with ``d = diag(H)`` from EK-FAC, and
    ``R = (I − Ξ) (H + δI)⁻¹`` with the EK-FAC inverse and a small damping δ.

    Attributes
    ----------
    curvature
        EK-FAC of the (unpreconditioned) Hessian per module.
    tau
        Learning-rate mass of each module's group.
    p
        The preconditioner ``P = 1/(√v̂ + eps)`` per module as ``[out, in]``.
    coupled, decoupled
        Weight decay inside P (Adam) and outside it (AdamW) per module.
    damping
        δ per module.
    """

    curvature: dict[str, ModuleCurvature]
    tau: dict[str, float]
    p: dict[str, torch.Tensor]
    coupled: dict[str, float]
    decoupled: dict[str, float]
    damping: dict[str, float]

    def _xi(self, name: str) -> torch.Tensor:
        rate = self.p[name] * (self.curvature[name].diagonal() + self.coupled[name])
        return xi(rate + self.decoupled[name], self.tau[name])

    def _apply(self, u: ModuleTensors, kinds: tuple[bool, ...]) -> list[ModuleTensors]:
        """The response (``True``) or propagation (``False``) of ``u`` for each of ``kinds``.

        Both need each module's Ξ: it is formed once for all.
        """
        outs = [untrained(u, self.curvature, respond) for respond in kinds]
        for name, c in self.curvature.items():
            xi_ = self._xi(name)
            for out, respond in zip(outs, kinds, strict=True):
                out[name] = (
                    c.apply((1 - xi_) * u[name], lambda lam, n=name: 1 / (lam + self.damping[n]))
                    if respond
                    else xi_ * u[name]
                )
        return outs

    def propagate(self, u: ModuleTensors) -> ModuleTensors:
        """``Ξ u`` (Ξ is diagonal)."""
        return self._apply(u, (False,))[0]

    def respond(self, u: ModuleTensors) -> ModuleTensors:
        """``(H + δI)⁻¹ (I − Ξ) u``."""
        return self._apply(u, (True,))[0]

    def respond_and_propagate(self, u: ModuleTensors) -> tuple[ModuleTensors, ModuleTensors]:
        """Both, each module's Ξ formed once."""
        response, propagated = self._apply(u, (True, False))
        return response, propagated


def sweep(
    operators: list[SegmentOperator],
    final_grads: ModuleTensors,
    crossings: Mapping[int, Callable[[ModuleTensors], ModuleTensors]] | None = None,
) -> tuple[list[ModuleTensors], list[ModuleTensors]]:
    """Walk the segments from last to first.

    ``crossings[ℓ]`` takes the vectors that reach the start of segment ℓ into the units of the
    model that analyzes segment ℓ − 1, where that is another model
    (:func:`~source_callback.analysis.units.carry_vectors`).

    Returns
    -------
    responses
        ``v_ℓ`` per segment, in training order.
    arrivals
        ``u_ℓ`` per segment (the query vector at the *end* of segment ℓ), in training order.
    """
    responses: list[ModuleTensors] = []
    arrivals: list[ModuleTensors] = []
    u = final_grads
    for number in reversed(range(len(operators))):
        arrivals.append(u)
        response, u = operators[number].respond_and_propagate(u)
        responses.append(response)
        if crossings and number in crossings:
            u = crossings[number](u)
    return responses[::-1], arrivals[::-1]


def dot(u: ModuleTensors, delta: ModuleTensors) -> torch.Tensor:
    """``⟨u[q], delta⟩`` summed over modules: ``[Q]`` (``delta`` holds single ``[out, in]``)."""
    return sum(
        torch.einsum("qoi,oi->q", u[n].double(), delta[n].to(u[n].device, torch.float64)) for n in u
    )
