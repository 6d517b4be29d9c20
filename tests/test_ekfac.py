"""EK-FAC against exact curvature on tiny models (SOURCE-math §8.2)."""

from __future__ import annotations

import pytest
import torch
from models import ConvNet
from torch import nn

from source_callback.analysis.ekfac import (
    ModuleCurvature,
    corrected_eigenvalues,
    covariances,
    eigh_float64,
    tracked_modules,
)
from source_callback.analysis.task import ClassificationTask, RegressionTask


def _batches(
    x: torch.Tensor, y: torch.Tensor, size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _fit_curvature(model, task, batches, exact=True) -> dict[str, ModuleCurvature]:
    modules = tracked_modules(model)
    gen = torch.Generator().manual_seed(0)
    covs = covariances(model, modules, task, batches, gen, exact=exact)
    bases = {}
    for name, cov in covs.items():
        bases[name] = tuple(None if f is None else eigh_float64(f)[1] for f in cov.mean())
    lam = corrected_eigenvalues(model, modules, bases, task, batches, gen, exact=exact)
    return {n: ModuleCurvature(bases[n][0], bases[n][1], lam[n]) for n in lam}


@pytest.mark.parametrize("bias", [False, True])
def test_single_linear_layer_ekfac_equals_exact_gauss_newton(bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=bias).double()
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randn(40, 3, dtype=torch.float64)
    curvature = _fit_curvature(layer, RegressionTask(), _batches(x, y, 16))[""]

    unit = tracked_modules(layer)[""]
    params = dict(layer.named_parameters())

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        matrix = flat.reshape(3, -1)
        out = x @ matrix[:, :4].T + (matrix[:, 4] if bias else 0)
        return ((out - y) ** 2).mean()

    flat = unit.matrix(params).detach().reshape(-1)
    exact = torch.autograd.functional.hessian(mean_loss, flat)  # = GNH: the model is linear
    torch.testing.assert_close(curvature.dense(), exact, rtol=1e-10, atol=1e-12)


def test_captured_gradients_and_eigenvalues_match_per_example_autograd() -> None:
    """Conv2d + Linear: Λ from hooks equals E_z Σ_k (Q_Sᵀ G_zk Q_A)² from autograd per example."""
    torch.manual_seed(1)
    model = ConvNet().double()
    x = torch.randn(10, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (10,))
    task = ClassificationTask()
    curvature = _fit_curvature(model, task, _batches(x, y, 4))
    assert set(curvature) == {"conv", "fc"}

    modules = tracked_modules(model)
    for name, module in modules.items():
        brute = torch.zeros_like(curvature[name].eigenvalues)
        q_a, q_s = curvature[name].q_a, curvature[name].q_s
        for i in range(len(x)):
            losses = task.exact_pseudo_losses(model, (x[i : i + 1], y[i : i + 1]))
            for k in range(losses.shape[0]):
                params = [model.get_parameter(p) for p in module.params]
                grads = torch.autograd.grad(losses[k, 0], params, retain_graph=True)
                g = module.matrix(dict(zip(module.params, grads, strict=True)))
                brute += (q_s.T @ g @ q_a) ** 2
        torch.testing.assert_close(
            curvature[name].eigenvalues, brute / len(x), rtol=1e-9, atol=1e-14
        )


def test_exact_classification_fisher_is_the_softmax_hessian() -> None:
    """Σ_k g_k g_kᵀ from exact pseudo-losses equals the Hessian of CE w.r.t. the logits."""
    torch.manual_seed(2)
    layer = nn.Linear(5, 4, bias=False).double()
    x = torch.randn(1, 5, dtype=torch.float64)
    curvature = _fit_curvature(layer, ClassificationTask(), [(x, torch.tensor([1]))])[""]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        # CE with a fixed label: its Hessian in W is (diag p − ppᵀ) ⊗ x xᵀ, label-free
        return nn.functional.cross_entropy(x @ flat.reshape(4, 5).T, torch.tensor([1]))

    exact = torch.autograd.functional.hessian(loss, layer.weight.detach().reshape(-1))
    torch.testing.assert_close(curvature.dense(), exact, rtol=1e-9, atol=1e-12)


def test_sampled_pseudo_gradients_are_unbiased() -> None:
    torch.manual_seed(3)
    layer = nn.Linear(3, 3).double()
    x = torch.randn(4000, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (4000,))
    modules = tracked_modules(layer)
    batches = _batches(x, y, 500)
    gen = torch.Generator().manual_seed(0)
    sampled = covariances(layer, modules, ClassificationTask(), batches, gen)[""].mean()[1]
    exact = covariances(layer, modules, ClassificationTask(), batches, gen, exact=True)
    torch.testing.assert_close(sampled, exact[""].mean()[1], rtol=0.1, atol=0.01)


def test_apply_is_a_matrix_function() -> None:
    torch.manual_seed(4)
    layer = nn.Linear(3, 2).double()
    x = torch.randn(30, 3, dtype=torch.float64)
    y = torch.randn(30, 2, dtype=torch.float64)
    curvature = _fit_curvature(layer, RegressionTask(), _batches(x, y, 10))[""]
    v = torch.randn(2, 4, dtype=torch.float64)
    dense = curvature.dense()
    evals, evecs = torch.linalg.eigh(dense)
    expected = evecs @ torch.diag(torch.exp(-0.7 * evals)) @ evecs.T @ v.reshape(-1)
    got = curvature.apply(v, lambda lam: torch.exp(-0.7 * lam))
    torch.testing.assert_close(got.reshape(-1), expected, rtol=1e-10, atol=1e-12)
