"""The two matrix functions of SOURCE, applied to eigenvalues (SOURCE-math §3).

``ξ(σ) = exp(−τσ)`` propagates a perturbation through a segment; ``φ(σ) = (1 − exp(−τσ))/σ``
is the segment's response to a gradient. Both are evaluated in forms that stay accurate for
σ → 0 and for large τσ, without ever forming ``1/σ`` alone.
"""

from __future__ import annotations

import torch

# Below this |τσ| the series 1 − x/2 + x²/6 is exact to float64 rounding.
_SERIES_BELOW = 1e-5


def xi(sigma: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """``exp(−τσ)``: how much of a perturbation along eigenvalue σ survives the segment."""
    return torch.exp(-tau * sigma)


def phi(sigma: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """``(1 − exp(−τσ)) / σ``, equal to ``τ`` at σ = 0 and ``≈ 1/σ`` for large ``τσ``.

    Computed as ``τ · g(τσ)`` with ``g(x) = −expm1(−x)/x``, using the series of ``g`` near 0.
    """
    x = tau * sigma
    small = x.abs() < _SERIES_BELOW
    safe = torch.where(small, torch.ones_like(x), x)
    g = torch.where(small, 1 - x / 2 + x * x / 6, -torch.expm1(-safe) / safe)
    return tau * g
