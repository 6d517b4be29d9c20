"""Kronecker-structured random projections of per-module gradients (as in LoGra).

A unit's per-example gradient is ``G = Σ_tok s aᵀ`` (``[out, in]``, see
:mod:`source_callback.analysis.units`). It is compressed to ``P_s G P_aᵀ = Σ_tok (P_s s)(P_a a)ᵀ``
(``[k_o, k_i]``) with two Gaussian matrices whose entries have variance ``1/k_o`` and ``1/k_i``,
so that ``E[P_sᵀP_s] = I`` and ``E[P_aᵀP_a] = I``, and inner products are preserved in
expectation: ``E⟨P_s V P_aᵀ, P_s G P_aᵀ⟩ = ⟨V, G⟩`` (the two matrices are independent). The
right side is formed from the projected activations and output gradients, never from ``G``
(a one-hot token side picks the token's column of ``P_a``; a diagonal unit's single row is
never projected).

Training gradients are projected once and cached; a query-side vector ``V`` (a SOURCE response,
SOURCE-math §3) is projected the same way, and the score is the inner product of the two.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from source_callback.analysis.ekfac import Capture, dense_sum
from source_callback.analysis.gradients import ModuleTensors, PerExample
from source_callback.analysis.units import Factored, Unit

#: Value of the ``kind`` entry of a projection's description.
KIND = "kronecker-gaussian-v1"


def _gaussian(seed: int, name: str, side: str, rows: int, cols: int) -> np.ndarray:
    """``[rows, cols]`` entries N(0, 1/rows), determined by ``(seed, name, side)`` only.

    NumPy's PCG64 on the CPU, so the matrix does not depend on the device or on torch's
    generators; the stream is keyed by a hash of the name (Python's ``hash`` is salted).
    """
    digest = hashlib.sha256(f"{side}\0{name}".encode()).digest()
    words = np.frombuffer(digest, dtype=np.uint32).tolist()
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *words])))
    return rng.standard_normal((rows, cols)) / np.sqrt(rows)


class KroneckerProjection:
    """A seeded random projection of every tracked module's gradient, concatenated.

    For a module with gradients ``[out, in]`` it holds ``P_s`` (``[k_o, out]``) and ``P_a``
    (``[k_i, in]``), ``k_o = min(k, out)``, ``k_i = min(k, in)``. A side with ``k`` at least its
    size is the identity (held as ``None``), so with ``k`` at least every dimension the
    projection is exact. Modules are laid out in sorted name order; module ``n`` occupies
    columns ``offsets[n]`` of the ``[.., dim]`` outputs (row-major ``[k_o, k_i]``).

    Parameters
    ----------
    shapes
        ``(out, in)`` of each module's gradient matrix by module name (see
        :attr:`~source_callback.analysis.units.Unit.shape`).
    k
        Target size of each side.
    seed
        Seed of the matrices; each module's pair depends only on ``(seed, name, shape, k)``.
    device
        Where the float64 matrices are created.
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        k: int,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"the projection dimension must be at least 1, got {k}")
        self.k = int(k)
        self.seed = int(seed)
        self.device = torch.device("cpu" if device is None else device)
        self.shapes = {
            name: (int(shapes[name][0]), int(shapes[name][1])) for name in sorted(shapes)
        }
        self.names = list(self.shapes)
        self.offsets: dict[str, slice] = {}
        self.s: dict[str, torch.Tensor | None] = {}
        self.a: dict[str, torch.Tensor | None] = {}
        checksum = hashlib.sha256()
        start = 0
        for name, (out, fan_in) in self.shapes.items():
            for side, size, store in (("s", out, self.s), ("a", fan_in, self.a)):
                if self.k >= size:
                    store[name] = None
                    checksum.update(b"identity")
                else:
                    matrix = _gaussian(self.seed, name, side, self.k, size)
                    checksum.update(matrix.tobytes())
                    store[name] = torch.from_numpy(matrix).to(self.device)
            width = min(self.k, out) * min(self.k, fan_in)
            self.offsets[name] = slice(start, start + width)
            start += width
        self.dim = start
        self.checksum = checksum.hexdigest()
        self._cast: dict[tuple[str, str, torch.device, torch.dtype], torch.Tensor | None] = {}

    @classmethod
    def for_modules(
        cls,
        modules: Mapping[str, Unit],
        k: int,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> KroneckerProjection:
        """The projection of the given units (``ekfac.tracked_modules``)."""
        return cls({name: unit.shape for name, unit in modules.items()}, k, seed, device)

    # -- storage -----------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Plain-JSON description from which :meth:`from_description` rebuilds it.

        ``checksum`` hashes the matrices, so a rebuild that would differ (a NumPy whose
        generator changed) is detected.
        """
        return {
            "kind": KIND,
            "k": self.k,
            "seed": self.seed,
            "modules": [[name, out, fan_in] for name, (out, fan_in) in self.shapes.items()],
            "dim": self.dim,
            "checksum": self.checksum,
        }

    @classmethod
    def from_description(
        cls, description: Mapping[str, Any], device: torch.device | str | None = None
    ) -> KroneckerProjection:
        """Rebuild the projection that :meth:`describe` described, on ``device``.

        Raises
        ------
        ValueError
            The description is of another kind, or the rebuilt matrices differ from the
            described ones.
        """
        if description.get("kind") != KIND:
            raise ValueError(f"not a {KIND} projection: {description.get('kind')!r}")
        shapes = {
            str(name): (int(out), int(fan_in)) for name, out, fan_in in description["modules"]
        }
        projection = cls(shapes, int(description["k"]), int(description["seed"]), device)
        if projection.checksum != description["checksum"]:
            raise ValueError(
                "the random projection rebuilt from its description differs from the one "
                "described (NumPy's random generator changed?); the cached gradients cannot be "
                "reused and must be recomputed."
            )
        return projection

    # -- projecting --------------------------------------------------------------------------

    def factors(
        self, name: str, device: torch.device, dtype: torch.dtype = torch.float64
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(P_s, P_a)`` of a module on ``device`` in ``dtype`` (``None``: identity)."""
        out = []
        for side, store in (("s", self.s), ("a", self.a)):
            key = (name, side, torch.device(device), dtype)
            if key not in self._cast:
                matrix = store[name]
                self._cast[key] = None if matrix is None else matrix.to(device, dtype)
            out.append(self._cast[key])
        return out[0], out[1]

    def project(self, vectors: ModuleTensors) -> torch.Tensor:
        """``P_s V P_aᵀ`` of each module's ``[Q, out, in]`` vectors, flattened and concatenated.

        Returns
        -------
        torch.Tensor
            ``[Q, dim]`` float64 on the device of the vectors.
        """
        if set(vectors) != set(self.shapes):
            raise ValueError(
                f"the vectors' modules {sorted(vectors)} are not the projection's {self.names}"
            )
        return torch.cat([self.project_unit(name, vectors[name]) for name in self.names], dim=1)

    def project_unit(self, name: str, vectors: torch.Tensor) -> torch.Tensor:
        """``P_s V P_aᵀ`` of one module's ``[Q, out, in]`` vectors: ``[Q, k_o·k_i]`` float64."""
        v = vectors.double()
        if tuple(v.shape[1:]) != self.shapes[name]:
            raise ValueError(
                f"module {name!r}: vectors of shape {tuple(v.shape[1:])}, projection for "
                f"{self.shapes[name]}"
            )
        p_s, p_a = self.factors(name, v.device)
        if p_s is not None:
            v = p_s @ v
        if p_a is not None:
            v = v @ p_a.T
        return v.reshape(v.shape[0], -1)


def projected_grads(
    model: nn.Module,
    modules: Mapping[str, Unit],
    fn: PerExample,
    batch: Any,
    projection: KroneckerProjection,
    dtype: torch.dtype = torch.float64,
    scale: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Projected per-example gradients of ``fn`` for one batch: ``[B, projection.dim]``.

    Per unit ``Σ_tok (P_s s)(P_a a)ᵀ`` (summed over a tied parameter's uses), from the hooked
    activations ``a`` and output gradients ``s``; no per-example ``[out, in]`` gradient is
    formed. ``fn(model, batch)`` gives one value per example (e.g. ``task.loss``). Computed in
    ``dtype`` on the device of ``fn``'s values; a unit no gradient reaches contributes zeros.
    A unit in ``scale``
    (an ``[out, in]`` matrix) is projected as ``P_s (scale ∘ G) P_aᵀ`` instead, which does
    form its per-example gradients ``G``.

    Parameters
    ----------
    model, modules
        The model and its units by name; ``modules`` must hold every unit of the
        projection (others are ignored).
    fn
        Per-example function to differentiate.
    batch
        One batch, on the model's device.
    projection
        The projection.
    dtype
        Precision of the products (float64 by default, as :func:`gradients.contract`).
    """
    missing = [name for name in projection.names if name not in modules]
    if missing:
        raise ValueError(f"the projection's modules {missing} are not among the given modules")
    hooked = {name: modules[name] for name in projection.names}
    parts: dict[str, torch.Tensor] = {}

    def on_grads(name: str, grads: list[Factored]) -> None:
        device = grads[0].rows.values.device
        p_s, p_a = projection.factors(name, device, dtype)
        if scale is not None and name in scale:
            blocks = []
            for _, g in dense_sum(grads):
                g = (g * scale[name].to(device, torch.float64)).to(dtype)
                if p_s is not None:
                    g = p_s @ g
                if p_a is not None:
                    g = g @ p_a.T
                blocks.append(g.flatten(1))
            block = torch.cat(blocks)
        else:
            t_s, t_a = (None if p is None else p.T for p in (p_s, p_a))
            block = sum(part.rotated(t_s, t_a).dense().to(dtype) for part in grads)
            block = block.flatten(1)  # [B, k_o·k_i]
        parts[name] = block

    with Capture(model, hooked, on_grads) as capture:
        values = fn(model, batch)
        capture.backward(values.sum())
    out = torch.zeros(len(values), projection.dim, dtype=dtype, device=values.device)
    for name, block in parts.items():  # a module no gradient reached keeps zeros, as in contract
        out[:, projection.offsets[name]] = block
    return out
