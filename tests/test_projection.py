"""Kronecker random projections of per-module gradients against contractions and materialised
per-example gradients."""

from __future__ import annotations

import json

import pytest
import torch
from models import ConvNet, TinyClassifier
from torch import nn
from torch.nn import functional as F
from unitgrads import autograd_per_example, split

from source_callback.analysis import units
from source_callback.analysis.ekfac import tracked_modules
from source_callback.analysis.gradients import contract
from source_callback.analysis.projection import KroneckerProjection, projected_grads


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def _mlp_batch() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = TinyClassifier().double()  # net.0: [8, 6+1], net.2: [3, 8+1]
    x = torch.randn(10, 6, dtype=torch.float64)
    return model, (x, torch.randint(0, 3, (10,)))


def _conv_batch() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(1)
    model = ConvNet().double()  # conv: [3, 2·3·3+1] over 9 patches, fc: [4, 27+1]
    x = torch.randn(7, 2, 5, 5, dtype=torch.float64)
    return model, (x, torch.randint(0, 4, (7,)))


def _random_vectors(shapes: dict[str, tuple[int, int]], queries: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        n: torch.randn(queries, *shape, generator=g, dtype=torch.float64)
        for n, shape in shapes.items()
    }


def _autograd_per_example(
    model: nn.Module, modules: dict[str, units.Unit], batch: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per-example ``[out, in]`` gradients from one plain backward pass per example (no hooks)."""
    return autograd_per_example(model, modules, _loss, split(batch))


@pytest.mark.parametrize("make", [_mlp_batch, _conv_batch], ids=["linear", "conv2d"])
def test_projection_with_k_above_every_dimension_reproduces_contract(make) -> None:
    model, batch = make()
    modules = tracked_modules(model)
    projection = KroneckerProjection.for_modules(modules, k=32, seed=3)
    assert all(p is None for p in [*projection.s.values(), *projection.a.values()])
    assert projection.dim == sum(out * fan_in for out, fan_in in projection.shapes.values())
    vectors = _random_vectors(projection.shapes, queries=4)

    estimate = (
        projection.project(vectors) @ projected_grads(model, modules, _loss, batch, projection).T
    )  # [Q, B]
    exact = contract(model, modules, _loss, batch, vectors)  # [B, Q]
    torch.testing.assert_close(estimate, exact.T, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make", [_mlp_batch, _conv_batch], ids=["linear", "conv2d"])
@pytest.mark.parametrize("elements", [1, 100, 2**24])
def test_contract_equals_inner_products_with_autograd_gradients(
    make, elements: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``contract``'s chunks of per-example gradients (down to one example) change nothing."""
    model, batch = make()
    modules = tracked_modules(model)
    monkeypatch.setattr(units, "CHUNK_ELEMENTS", elements)
    vectors = _random_vectors({n: m.shape for n, m in modules.items()}, queries=3)
    grads = _autograd_per_example(model, modules, batch)
    expected = sum(torch.einsum("boi,qoi->bq", grads[n], vectors[n]) for n in modules)
    got = contract(model, modules, _loss, batch, vectors)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [_mlp_batch, _conv_batch], ids=["linear", "conv2d"])
@pytest.mark.parametrize("k", [2, 5])
def test_projected_grads_equal_projection_of_materialised_gradients(make, k: int) -> None:
    """Σ_tok (P_s s)(P_a a)ᵀ from the hooks equals P_s G P_aᵀ of the autograd per-example G."""
    model, batch = make()
    modules = tracked_modules(model)
    projection = KroneckerProjection.for_modules(modules, k=k, seed=0)
    assert any(p is not None for p in projection.a.values())
    grads = _autograd_per_example(model, modules, batch)
    assert {n: m.shape for n, m in modules.items()} == {
        n: tuple(g.shape[1:]) for n, g in grads.items()
    }
    expected = projection.project(grads)
    got = projected_grads(model, modules, _loss, batch, projection)
    assert got.shape == (len(batch[0]), projection.dim)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [_mlp_batch, _conv_batch], ids=["linear", "conv2d"])
def test_scaled_projected_grads_project_the_scaled_gradients(make) -> None:
    """With ``scale`` (Adam's P^{1/2} in the cache) a module's rows are P_s (scale ∘ G) P_aᵀ."""
    model, batch = make()
    modules = tracked_modules(model)
    projection = KroneckerProjection.for_modules(modules, k=2, seed=0)
    grads = _autograd_per_example(model, modules, batch)
    first = projection.names[0]
    scale = {first: torch.rand(projection.shapes[first], dtype=torch.float64) + 0.5}
    expected = projection.project({n: g * scale.get(n, 1.0) for n, g in grads.items()})
    got = projected_grads(model, modules, _loss, batch, projection, scale=scale)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_conv_gradient_is_summed_over_patches_per_example() -> None:
    """Each example's projected conv gradient depends on that example only (tokens = patches)."""
    model, (x, y) = _conv_batch()
    modules = tracked_modules(model)
    projection = KroneckerProjection.for_modules(modules, k=2, seed=0)
    together = projected_grads(model, modules, _loss, (x, y), projection)
    alone = torch.cat(
        [
            projected_grads(model, modules, _loss, (x[i : i + 1], y[i : i + 1]), projection)
            for i in range(len(x))
        ]
    )
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-14)


def test_inner_products_are_unbiased_and_error_shrinks_as_k_grows() -> None:
    shapes = {"layer": (64, 48)}
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, 64, 48, generator=g, dtype=torch.float64)
    v = base + 0.5 * torch.randn(10, 64, 48, generator=g, dtype=torch.float64)
    w = base + 0.5 * torch.randn(10, 64, 48, generator=g, dtype=torch.float64)
    exact = torch.einsum("qoi,moi->qm", v, w)
    norms = v.flatten(1).norm(dim=1)[:, None] * w.flatten(1).norm(dim=1)[None, :]

    def estimate(k: int, seed: int) -> torch.Tensor:
        projection = KroneckerProjection(shapes, k=k, seed=seed)
        return projection.project({"layer": v}) @ projection.project({"layer": w}).T

    def error(values: torch.Tensor) -> float:
        return float(((values - exact).abs() / norms).mean())

    errors = {k: error(estimate(k, seed=0)) for k in (2, 8, 32)}
    assert errors[2] > errors[8] > errors[32]
    assert errors[32] < 0.5 * errors[2]
    # Unbiased: averaging independent projections converges to the exact inner products.
    mean = torch.stack([estimate(4, seed) for seed in range(100)]).mean(0)
    assert error(mean) < 0.3 * error(estimate(4, seed=0))


def test_matrices_depend_on_seed_and_module_name_only() -> None:
    shapes = {"b": (30, 20), "a": (30, 20), "small": (5, 40)}
    first = KroneckerProjection(shapes, k=8, seed=7)
    again = KroneckerProjection(dict(reversed(shapes.items())), k=8, seed=7)
    other_seed = KroneckerProjection(shapes, k=8, seed=8)
    for name in shapes:
        for side in ("s", "a"):
            p, q = getattr(first, side)[name], getattr(again, side)[name]
            assert (p is None and q is None) or torch.equal(p, q)
    assert not torch.equal(first.s["a"], first.s["b"])
    assert not torch.equal(first.a["a"], first.a["b"])
    assert not torch.equal(first.s["a"], other_seed.s["a"])

    # Layout: sorted names, k_o·k_i columns each, an identity side where k ≥ its size.
    assert first.names == ["a", "b", "small"]
    assert first.s["small"] is None and first.a["small"].shape == (8, 40)
    assert first.s["a"].dtype == torch.float64 and first.s["a"].shape == (8, 30)
    assert first.offsets == {"a": slice(0, 64), "b": slice(64, 128), "small": slice(128, 168)}
    assert first.dim == 168

    # Entries N(0, 1/k): E[PᵀP] = I.
    big = KroneckerProjection({"m": (40, 1000)}, k=500, seed=0).a["m"]  # [500, 1000]
    assert abs(float(big.var()) - 1 / 500) < 0.05 / 500
    assert abs(float(big.mean())) < 1e-3


def test_description_rebuilds_an_identical_projection() -> None:
    projection = KroneckerProjection({"net.0": (16, 7), "net.2": (5, 17)}, k=4, seed=11)
    description = json.loads(json.dumps(projection.describe()))
    rebuilt = KroneckerProjection.from_description(description)
    assert rebuilt.describe() == projection.describe()
    for name in projection.names:
        assert torch.equal(rebuilt.s[name], projection.s[name])
        assert torch.equal(rebuilt.a[name], projection.a[name])
    with pytest.raises(ValueError, match="differs"):
        KroneckerProjection.from_description({**description, "checksum": "0" * 64})
    with pytest.raises(ValueError, match="not a"):
        KroneckerProjection.from_description({**description, "kind": "other"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_matrices_and_projected_grads_do_not_depend_on_the_device() -> None:
    model, batch = _conv_batch()
    modules = tracked_modules(model)
    cpu = KroneckerProjection.for_modules(modules, k=2, seed=4)
    gpu = KroneckerProjection.for_modules(modules, k=2, seed=4, device="cuda")
    for name in cpu.names:
        assert torch.equal(gpu.a[name].cpu(), cpu.a[name])
        assert gpu.a[name].device.type == "cuda"
    expected = projected_grads(model, modules, _loss, batch, cpu)
    model.cuda()
    got = projected_grads(model, modules, _loss, tuple(t.cuda() for t in batch), gpu)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-10, atol=1e-12)


def test_unreached_module_contributes_zeros_and_vectors_must_match() -> None:
    model, batch = _mlp_batch()
    model.unused = nn.Linear(4, 2).double()
    modules = tracked_modules(model)
    projection = KroneckerProjection.for_modules(modules, k=3)
    got = projected_grads(model, modules, _loss, batch, projection)
    assert torch.count_nonzero(got[:, projection.offsets["unused"]]) == 0
    assert torch.count_nonzero(got[:, projection.offsets["net.0"]]) > 0
    with pytest.raises(ValueError, match="modules"):
        projection.project(_random_vectors({"net.0": (8, 7)}, queries=1))
