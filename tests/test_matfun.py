"""The matrix functions against closed forms and high-precision references."""

from __future__ import annotations

import mpmath
import pytest
import torch

from source_callback.analysis.matfun import phi, xi


@pytest.mark.parametrize("tau", [1e-3, 0.7, 50.0, 1e6])
def test_phi_matches_high_precision_reference(tau: float) -> None:
    sigma = torch.tensor(
        [0.0, 1e-300, 1e-12, 1e-9, 1e-6, 1e-4, 1e-2, 0.3, 1.0, 10.0, 1e4, -1e-7, -0.5],
        dtype=torch.float64,
    )
    got = phi(sigma, tau)
    mpmath.mp.dps = 50
    for s, value in zip(sigma.tolist(), got.tolist(), strict=True):
        expected = tau if s == 0.0 else float(-mpmath.expm1(-mpmath.mpf(tau) * s) / s)
        assert value == pytest.approx(expected, rel=1e-13), (s, tau)


def test_phi_limits() -> None:
    sigma = torch.tensor([0.0, 1e3], dtype=torch.float64)
    out = phi(sigma, 1e4)
    assert out[0].item() == 1e4  # τ at σ = 0 (plain SGD: the update is remembered whole)
    assert out[1].item() == pytest.approx(1e-3, rel=1e-12)  # 1/σ when τσ is large


def test_xi_and_phi_equal_the_unrolled_sums_for_a_constant_rate() -> None:
    # K steps of (1 − ησ): Π = (1 − ησ)^K and Σ_j (1 − ησ)^j η = (1 − (1 − ησ)^K)/σ, which
    # tend to ξ and φ as η → 0 with ηK = τ fixed (error O(ητσ²)).
    sigma, tau, steps = 0.8, 2.0, 20000
    eta = tau / steps
    s = torch.tensor(sigma, dtype=torch.float64)
    product = (1 - eta * sigma) ** steps
    assert product == pytest.approx(xi(s, tau).item(), rel=1e-4)
    assert (1 - product) / sigma == pytest.approx(phi(s, tau).item(), rel=1e-4)


def test_dtype_is_kept() -> None:
    for dtype in (torch.float32, torch.float64):
        sigma = torch.linspace(0, 3, 7, dtype=dtype)
        assert phi(sigma, 0.5).dtype == dtype and xi(sigma, 0.5).dtype == dtype
