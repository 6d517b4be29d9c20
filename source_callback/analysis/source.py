"""The SOURCE estimator on EK-FAC curvature: segment operators and the query-side sweep.

Everything is moved to the query side (SOURCE-math §3): walking the segments from last to first,
``v_ℓ = φ_ℓ(H̃_ℓ)ᵀ u_ℓ`` is the vector that training gradients of segment ℓ are dotted with,
and ``u_{ℓ−1} = ξ_ℓ(H̃_ℓ)ᵀ u_ℓ`` carries the query gradient back through segment ℓ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from source_callback.analysis.ekfac import ModuleCurvature
from source_callback.analysis.gradients import ModuleTensors
from source_callback.analysis.matfun import phi, xi


@dataclass
class SegmentOperator:
    """One segment's curvature and rates, per tracked module.

    Attributes
    ----------
    curvature
        EK-FAC of the segment's mean Gauss-Newton Hessian, per module.
    tau
        Learning-rate mass of the segment for each module's parameter group.
    shift
        Coupled weight decay λ of each module's group: ``H̃ = H + λI``.
    """

    curvature: dict[str, ModuleCurvature]
    tau: dict[str, float]
    shift: dict[str, float]

    def propagate(self, u: ModuleTensors) -> ModuleTensors:
        """``ξ(H̃)ᵀ u``: carry query-side vectors back through the segment."""
        return {
            name: c.apply(u[name], lambda lam, n=name: xi(lam + self.shift[n], self.tau[n]))
            for name, c in self.curvature.items()
        }

    def respond(self, u: ModuleTensors) -> ModuleTensors:
        """``φ(H̃)ᵀ u``: the vector a training gradient of this segment is dotted with."""
        return {
            name: c.apply(u[name], lambda lam, n=name: phi(lam + self.shift[n], self.tau[n]))
            for name, c in self.curvature.items()
        }


def sweep(
    operators: list[SegmentOperator], final_grads: ModuleTensors
) -> tuple[list[ModuleTensors], list[ModuleTensors]]:
    """Walk the segments from last to first.

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
    for operator in reversed(operators):
        arrivals.append(u)
        responses.append(operator.respond(u))
        u = operator.propagate(u)
    return responses[::-1], arrivals[::-1]


def dot(u: ModuleTensors, delta: ModuleTensors) -> torch.Tensor:
    """``⟨u[q], delta⟩`` summed over modules: ``[Q]`` (``delta`` holds single ``[out, in]``)."""
    return sum(torch.einsum("qoi,oi->q", u[n].double(), delta[n].double()) for n in u)
