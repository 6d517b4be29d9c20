"""Every kind of unit against brute force: per-example autograd gradients of tiny modules.

Hugging Face ``Conv1D``, embeddings (padding index, repeated tokens), LayerNorm/RMSNorm weights,
a standalone bias, a tied Linear + Embedding pair and identity (diagonal) large sides: the hooks'
query gradients, contractions, projections, Kronecker factors and corrected eigenvalues equal
what plain autograd gives per example.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D
from unitgrads import autograd_per_example, split

from source_callback.analysis import capture_check
from source_callback.analysis import units as units_module
from source_callback.analysis.capture_check import check_capture
from source_callback.analysis.ekfac import (
    ModuleCurvature,
    RankOne,
    corrected_eigenvalues,
    covariances,
    eigh_float64,
)
from source_callback.analysis.gradients import contract, per_example_grads
from source_callback.analysis.optimizers import rank_one
from source_callback.analysis.projection import KroneckerProjection, projected_grads
from source_callback.analysis.task import LanguageModelingTask
from source_callback.analysis.units import Factored, ModuleSelection, Side, Unit, find_units
from source_callback.errors import AnalysisError

VOCAB, WIDTH, LENGTH = 6, 4, 5


class ProbeTask:
    """Per-example losses of a model's output ``[B, ..., C]``: any functions will do here.

    ``exact_pseudo_losses`` gives two different ones, so that the factors and eigenvalues sum
    two backward passes per forward pass.
    """

    def __init__(self, outputs: int) -> None:
        g = torch.Generator().manual_seed(11)
        self.weights = torch.randn(2, outputs, generator=g, dtype=torch.float64)

    def _out(self, model: nn.Module, batch: tuple[torch.Tensor]) -> torch.Tensor:
        out = model(batch[0])
        return out.reshape(out.shape[0], -1, out.shape[-1])  # [B, T, C]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor]) -> torch.Tensor:
        out = self._out(model, batch)
        weight = self.weights[0].to(out.dtype)
        return (torch.tanh(out) @ weight).sum(1) + out.square().sum((1, 2)) / 4

    def exact_pseudo_losses(self, model: nn.Module, batch: tuple[torch.Tensor]) -> torch.Tensor:
        out = self._out(model, batch)
        return torch.stack([(torch.tanh(out) @ w.to(out.dtype)).sum(1) for w in self.weights])


class Conv1DNet(nn.Module):
    """GPT-2's projection layer (weight ``[in, out]``) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = Conv1D(5, 3)  # nf=5 outputs, nx=3 inputs
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x)))


class EmbeddingNet(nn.Module):
    """Token embeddings with a padding index into a Linear head, over sequences."""

    def __init__(self, padding_idx: int | None = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH, padding_idx=padding_idx)
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids)))


class NormNet(nn.Module):
    """LayerNorm (weight and bias), Llama's RMSNorm, and a Linear whose weight is frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.rms = LlamaRMSNorm(WIDTH)
        self.shift = nn.Linear(WIDTH, 3)
        self.shift.weight.requires_grad_(False)  # its bias alone is trained: a standalone bias
        with torch.no_grad():
            for p in (self.norm.weight, self.norm.bias, self.rms.weight):
                p.add_(torch.randn_like(p) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.rms(torch.tanh(self.norm(self.inner(x))))
        return self.shift(hidden)


class TiedNet(nn.Module):
    """GPT-2's tie: the output head's weight is the embedding's (``[V, D]`` both)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.mix(self.embed(ids))))


class AdapterNet(nn.Module):
    """A frozen base layer with a trained low-rank adapter beside it, modified in place.

    The adapter's first layer is the first unit: its output needs a gradient only because the
    passes capture it (every parameter is frozen while capturing), and the model scales it in
    place, as a model may do with a module's output.
    """

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(3, WIDTH)
        self.base.requires_grad_(False)
        self.down = nn.Linear(3, 2, bias=False)
        self.up = nn.Linear(2, WIDTH, bias=False)
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.down(x)
        low.mul_(2)
        return self.head(torch.tanh(self.base(x) + self.up(low)))


class GainNet(nn.Module):
    """A gain of its own beside a trained layer, and a bias in a ``ParameterDict`` its forward
    reads (peft keeps an embedding's LoRA adapters so)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner: nn.Module = nn.Linear(3, WIDTH)
        self.extra = nn.ParameterDict({"default": nn.Parameter(torch.randn(WIDTH) / 3)})
        self.gain = nn.Parameter(torch.randn(WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.gain + self.extra["default"]


class ContainerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = GainNet()
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.block(x)))


def _tokens(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    ids[:, 1] = ids[:, 0]  # every sequence repeats a token
    ids[::3, -1] = 0  # and some hold the padding index
    return ids


Case = tuple[nn.Module, tuple[torch.Tensor], int, int | None]


def _case(name: str) -> Case:
    """``(model, batch, outputs, diagonal_above)`` of a named case, float64."""
    torch.manual_seed(0)
    if name == "conv1d":
        return Conv1DNet().double(), (torch.randn(7, 3, dtype=torch.float64),), 4, None
    if name == "embedding":
        return EmbeddingNet().double(), (_tokens(7, 1),), 3, None
    if name == "norms":
        return NormNet().double(), (torch.randn(7, 2, 3, dtype=torch.float64),), 3, None
    if name == "tied":
        return TiedNet().double(), (_tokens(7, 2),), VOCAB, None
    if name == "tied-two-tokens":  # few tokens: the uses' rotated sides join
        return TiedNet().double(), (_tokens(7, 2)[:, :2],), VOCAB, None
    if name == "tied-diagonal":
        return TiedNet().double(), (_tokens(7, 2),), VOCAB, VOCAB - 1
    if name == "adapter":
        return AdapterNet().double(), (torch.randn(7, 2, 3, dtype=torch.float64),), 3, None
    if name == "containers":
        return ContainerNet().double(), (torch.randn(7, 2, 3, dtype=torch.float64),), 3, None
    assert name == "large-side"  # the head's 3 outputs and 4+1 inputs both above 2
    return EmbeddingNet(None).double(), (_tokens(7, 3),), 3, 2


CASES = [
    "conv1d",
    "embedding",
    "norms",
    "tied",
    "tied-two-tokens",
    "tied-diagonal",
    "large-side",
    "adapter",
    "containers",
]


def _units(model: nn.Module, diagonal_above: int | None) -> dict[str, Unit]:
    found = find_units(model, diagonal_above)
    assert not found.uncovered
    assert sum(u.size for u in found.units.values()) == sum(found.numel.values())
    return found.units


def test_units_of_each_kind() -> None:
    shapes = {n: (u.shape, u.identity) for n, u in _units(Conv1DNet(), None).items()}
    assert shapes == {"proj": ((5, 3 + 1), (False, False)), "head": ((4, 6), (False, False))}
    shapes = {n: (u.shape, u.identity) for n, u in _units(EmbeddingNet(), None).items()}
    assert shapes["embed"] == ((WIDTH, VOCAB), (False, True))  # [dim, vocab], one-hot columns
    found = _units(NormNet(), None)
    assert {n: (u.shape, u.params) for n, u in found.items() if n != "inner"} == {
        "norm": ((1, 2 * WIDTH), ("norm.weight", "norm.bias")),
        "rms": ((1, WIDTH), ("rms.weight",)),
        "shift": ((1, 3), ("shift.bias",)),
    }
    tied = _units(TiedNet(), None)
    assert set(tied) == {"embed+lm_head", "mix"}
    assert tied["embed+lm_head"].shape == (VOCAB, WIDTH)  # the parameter's own layout
    assert tied["embed+lm_head"].identity == (False, False)
    assert _units(TiedNet(), VOCAB - 1)["embed+lm_head"].identity == (True, False)


def test_unit_matrices_follow_each_parameter_layout() -> None:
    model = Conv1DNet()
    unit = _units(model, None)["proj"]
    params = dict(model.named_parameters())
    expected = torch.cat([model.proj.weight.T, model.proj.bias[:, None]], dim=1)
    torch.testing.assert_close(unit.matrix(params), expected)
    tied = TiedNet()
    unit = _units(tied, None)["embed+lm_head"]
    torch.testing.assert_close(unit.matrix(dict(tied.named_parameters())), tied.embed.weight)


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding=1, stride=2),
        dict(kernel_size=(3, 2), dilation=(2, 1), padding=(1, 2), stride=(2, 3), bias=False),
        dict(kernel_size=5),
        dict(kernel_size=(4, 3), dilation=(1, 2), padding="same"),  # padded unevenly
        dict(kernel_size=(2, 3), padding="valid", bias=False),
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_convolution_patches_times_the_unit_matrix_are_the_convolution(
    conv: dict[str, object],
) -> None:
    module = nn.Conv2d(3, 4, **conv).double()  # type: ignore[arg-type]
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    side = units_module.Conv2dKind().inputs(module, x, module.bias is not None)
    unit = _units(module, None)[""]
    assert side is not None and side.size == unit.shape[1]
    out = module(x)
    got = side.values @ unit.matrix(dict(module.named_parameters())).T  # [B, L, out]
    torch.testing.assert_close(got, out.flatten(2).transpose(1, 2), rtol=1e-12, atol=1e-12)
    if isinstance(module.padding, tuple):  # F.unfold's patches, its columns (C, kh, kw)
        unfolded = nn.functional.unfold(
            x, module.kernel_size, module.dilation, module.padding, module.stride
        )
        kh, kw = module.kernel_size
        b, length = unfolded.shape[0], unfolded.shape[2]
        channels_last = unfolded.view(b, 3, kh, kw, length).permute(0, 4, 2, 3, 1)
        assert torch.equal(side.values[..., : 3 * kh * kw], channels_last.reshape(b, length, -1))


@pytest.mark.parametrize("case", CASES)
def test_query_gradients_and_contractions_equal_autograd(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, batch, outputs, diagonal_above = _case(case)
    units = _units(model, diagonal_above)
    task = ProbeTask(outputs)
    expected = autograd_per_example(model, units, task.loss, split(batch))
    got = per_example_grads(model, units, task.loss, [(batch[0][:3],), (batch[0][3:],)])
    for name in units:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12)
    g = torch.Generator().manual_seed(5)
    vectors = {
        n: torch.randn(3, *u.shape, generator=g, dtype=torch.float64) for n, u in units.items()
    }
    truth = sum(torch.einsum("boi,qoi->bq", expected[n], vectors[n]) for n in units)
    for elements in (2**24, 7):  # whole batches, and chunks of one example
        monkeypatch.setattr(units_module, "CHUNK_ELEMENTS", elements)
        got_contract = contract(model, units, task.loss, batch, vectors)
        torch.testing.assert_close(got_contract, truth, rtol=1e-10, atol=1e-12)


def test_passes_form_no_parameter_gradients_and_unfreeze_after() -> None:
    model, batch, outputs, _ = _case("adapter")
    units = _units(model, None)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    seen: list[bool] = []
    task = ProbeTask(outputs)

    def loss(model: nn.Module, batch: tuple[torch.Tensor]) -> torch.Tensor:
        seen.append(any(p.requires_grad for p in model.parameters()))
        return task.loss(model, batch)

    got = per_example_grads(model, units, loss, [batch])
    assert seen == [False]
    assert all(p.grad is None for p in model.parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained
    assert got["down"].abs().min() > 0  # the adapter's first layer got its gradient


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("k", [2, 32])
def test_projected_gradients_equal_projected_autograd(case: str, k: int) -> None:
    model, batch, outputs, diagonal_above = _case(case)
    units = _units(model, diagonal_above)
    task = ProbeTask(outputs)
    projection = KroneckerProjection.for_modules(units, k=k, seed=1)
    expected = projection.project(autograd_per_example(model, units, task.loss, split(batch)))
    got = projected_grads(model, units, task.loss, batch, projection)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _brute_pseudo_grads(
    model: nn.Module, units: dict[str, Unit], task: ProbeTask, batch: tuple[torch.Tensor]
) -> list[dict[str, torch.Tensor]]:
    """Per pseudo-loss k: ``{unit: [N, out, in]}`` by autograd, one example at a time."""
    return [
        autograd_per_example(
            model, units, lambda m, b, k=k: task.exact_pseudo_losses(m, b)[k], split(batch)
        )
        for k in range(2)
    ]


def _input_factor(model: nn.Module, unit: Unit, batch: tuple[torch.Tensor]) -> torch.Tensor:
    """``E[Σ_tok a aᵀ]`` of a single-use unit from its module's inputs (hooked here)."""
    seen: list[torch.Tensor] = []
    handle = unit.uses[0].module.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(batch[0])
    handle.remove()
    a = seen[0].reshape(-1, seen[0].shape[-1])
    if unit.uses[0].bias:
        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], dim=1)
    return a.T @ a / len(batch[0])


@pytest.mark.parametrize("case", CASES)
def test_factors_and_corrected_eigenvalues_equal_brute_force(case: str) -> None:
    model, batch, outputs, diagonal_above = _case(case)
    units = _units(model, diagonal_above)
    task = ProbeTask(outputs)
    batches = [(batch[0][:4],), (batch[0][4:],)]
    gen = torch.Generator()
    brute = _brute_pseudo_grads(model, units, task, batch)
    count = len(batch[0])

    covs = covariances(model, units, task, batches, gen, exact=True)
    ones = {n: torch.ones(u.shape, dtype=torch.float64) for n, u in units.items()}
    scaled = covariances(model, units, task, batches, gen, exact=True, scale=ones)
    for name, unit in units.items():
        a, s = covs[name].mean()
        assert (a is None) == unit.identity[1] and (s is None) == unit.identity[0]
        # with a unit scale: E[G Gᵀ] and E[Gᵀ G] of the per-example pseudo-gradients
        g_gt = sum(torch.einsum("boi,bpi->op", g[name], g[name]) for g in brute) / count
        gt_g = sum(torch.einsum("boi,boj->ij", g[name], g[name]) for g in brute) / count
        a_scaled, s_scaled = scaled[name].mean()
        for got, want, identity in (
            (s_scaled, g_gt, unit.identity[0]),
            (a_scaled, gt_g, unit.identity[1]),
        ):
            if identity:
                assert got is None
            else:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        if len(unit.uses) == 1 and a is not None and not unit.uses[0].transposed:
            torch.testing.assert_close(a, _input_factor(model, unit, batch), rtol=1e-10, atol=1e-12)

    bases = {
        n: tuple(None if f is None else eigh_float64(f)[1] for f in c.mean())
        for n, c in covs.items()
    }
    eigenvalues = corrected_eigenvalues(model, units, bases, task, batches, gen, exact=True)
    for name in units:
        q_a, q_s = bases[name]
        total = 0
        for g in brute:
            rotated = g[name]
            if q_s is not None:
                rotated = q_s.T @ rotated
            if q_a is not None:
                rotated = rotated @ q_a
            total = total + rotated.square().sum(0)
        torch.testing.assert_close(eigenvalues[name], total / count, rtol=1e-9, atol=1e-14)


def test_embedding_factor_of_the_output_side_sums_tokens() -> None:
    """``E[Σ_tok s sᵀ]`` of an embedding, padding tokens excluded, from autograd per token."""
    model, batch, outputs, _ = _case("embedding")
    unit = _units(model, None)["embed"]
    task = ProbeTask(outputs)
    covs = covariances(model, {"embed": unit}, task, [batch], torch.Generator(), exact=True)
    ids = batch[0]
    total = torch.zeros(WIDTH, WIDTH, dtype=torch.float64)
    for k in range(2):
        out = model.embed(ids)
        out.retain_grad()
        head = model.head(torch.tanh(out))
        losses = task.exact_pseudo_losses(lambda _, h=head: h, (ids,))
        losses[k].sum().backward()
        s = out.grad * (ids != 0)[..., None]
        total += torch.einsum("bti,btj->ij", s, s)
    torch.testing.assert_close(covs["embed"].mean()[1], total / len(ids), rtol=1e-10, atol=1e-12)


def test_curvature_with_identity_sides_is_consistent_with_its_dense_matrix() -> None:
    torch.manual_seed(3)
    q_s = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    lam = torch.rand(3, 4, dtype=torch.float64)
    for curvature in (ModuleCurvature(None, q_s, lam), ModuleCurvature(None, None, lam)):
        dense = curvature.dense()
        v = torch.randn(3, 4, dtype=torch.float64)
        evals, evecs = torch.linalg.eigh(dense)
        expected = evecs @ torch.diag(torch.exp(-evals)) @ evecs.T @ v.reshape(-1)
        got = curvature.apply(v, lambda x: torch.exp(-x))
        torch.testing.assert_close(got.reshape(-1), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(curvature.diagonal().reshape(-1), dense.diagonal())
        eye = torch.eye(3, dtype=torch.float64)
        rows = eye if curvature.q_s is None else curvature.q_s.contiguous()
        basis = torch.kron(rows, torch.eye(4, dtype=torch.float64))
        in_basis = torch.diagonal(basis.T @ torch.diag(v.reshape(-1)) @ basis)
        torch.testing.assert_close(curvature.in_basis(v).reshape(-1), in_basis)


def test_own_parameters_re_run_their_module_unless_it_holds_trained_blocks() -> None:
    """A ``ParameterDict``'s parameters are its module's; beside a trained layer they are
    covered by re-running the module, beside a trained block of layers they are not."""
    units = _units(ContainerNet(), None)
    assert set(units["block"].params) == {"block.extra.default", "block.gain"}
    assert isinstance(units["block"].uses[0].kind, units_module.DiagonalKind)
    model = ContainerNet()
    model.block.inner = nn.Sequential(nn.Linear(3, WIDTH), nn.Tanh())
    reason = "a parameter of GainNet used outside its submodules"
    assert find_units(model).uncovered == {"block.extra.default": reason, "block.gain": reason}


def test_embeddings_that_renormalise_are_left_uncovered_with_a_reason() -> None:
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Linear(3, 2))
    found = find_units(model)
    assert set(found.units) == {"1"}
    assert "max_norm" in found.uncovered["0.weight"]


def test_module_selection_patterns() -> None:
    names = {"transformer.wte+lm_head": 0, "transformer.h.0.mlp.c_fc": 1, "ln_f": 2}
    units = {n: _units(Conv1DNet(), None)["proj"] for n in names}
    picked = ModuleSelection.of({"exclude": ["*lm_head*"]}).apply(units)
    assert set(picked) == {"transformer.h.0.mlp.c_fc", "ln_f"}
    assert set(ModuleSelection.of(["transformer.*"]).apply(units)) == {
        "transformer.wte+lm_head",
        "transformer.h.0.mlp.c_fc",
    }
    with pytest.raises(AnalysisError, match="'nothing\\*'"):
        ModuleSelection.of(["nothing*"]).apply(units)
    with pytest.raises(ValueError, match="include"):
        ModuleSelection.of({"only": ["x"]})
    with pytest.raises(TypeError):
        ModuleSelection.of("ln_f")


@pytest.mark.parametrize("build", ["gpt2", "llama"])
def test_hugging_face_query_gradients_and_contractions_equal_autograd(build: str) -> None:
    """Every unit of a tiny GPT-2 (tie, Conv1D, broadcast position embeddings, LayerNorms) and
    Llama (RMSNorm): hooked per-example gradients equal autograd's, example by example."""
    from hf_models import TokenSequences
    from test_hf_models import LM

    model = LM(build).double()
    units = find_units(model).units
    task = LanguageModelingTask()
    ids = TokenSequences(5, seed=3).ids
    examples = [{"input_ids": ids[i : i + 1]} for i in range(len(ids))]
    expected = autograd_per_example(model, units, task.loss, examples)
    got = per_example_grads(model, units, task.loss, [{"input_ids": ids}])
    for name in units:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12)
    g = torch.Generator().manual_seed(5)
    vectors = {
        n: torch.randn(2, *u.shape, generator=g, dtype=torch.float64) for n, u in units.items()
    }
    truth = sum(torch.einsum("boi,qoi->bq", expected[n], vectors[n]) for n in units)
    got_contract = contract(model, units, task.loss, {"input_ids": ids}, vectors)
    torch.testing.assert_close(got_contract, truth, rtol=1e-9, atol=1e-12)


def _dora_llama() -> nn.Module:
    """A tiny Llama with DoRA adapters, ``B`` drawn at random (peft starts it at zero)."""
    from hf_models import tiny_llama
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True)
    model = get_peft_model(tiny_llama(), config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)
    return model


@pytest.mark.parametrize("build", ["opt", "dora"])
def test_flattened_tokens_and_dora_per_example_gradients_equal_autograd(build: str) -> None:
    """OPT's layers called on ``[B·T, n]`` rows; DoRA's magnitude (its input and the base
    output passed by keyword) and the identity calls through which it forms its adapter's
    matrix: hooked per-example gradients equal autograd's, example by example."""
    from hf_models import CausalLM, TokenSequences, tiny_opt

    torch.manual_seed(0)
    model = CausalLM(tiny_opt() if build == "opt" else _dora_llama()).double()
    units = find_units(model).units
    if build == "dora":
        assert any("lora_magnitude_vector" in name for name in units)
    task = LanguageModelingTask()
    ids = TokenSequences(5, seed=3).ids
    examples = [{"input_ids": ids[i : i + 1]} for i in range(len(ids))]
    expected = autograd_per_example(model, units, task.loss, examples)
    got = per_example_grads(model, units, task.loss, [{"input_ids": ids}])
    for name in units:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12)
    assert all(expected[name].abs().max() > 0 for name in units)


def _hooked_equal_autograd(
    model: nn.Module, outputs: int = 3
) -> tuple[dict[str, Unit], dict[str, torch.Tensor]]:
    """A token model's hooked per-example gradients, asserted equal to autograd's (returned)."""
    units = _units(model, None)
    loss = ProbeTask(outputs).loss
    batch = (_tokens(4, 5),)
    expected = autograd_per_example(model, units, loss, split(batch))
    got = per_example_grads(model, units, loss, [batch])
    for name in units:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12)
    return units, expected


class ScaledEmbedding(nn.Embedding):
    """An embedding with its own forward (Gemma's scales its rows by ``sqrt(dim)``)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 3.0


class ScaledTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = ScaledEmbedding(VOCAB, WIDTH)
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids)))


def test_an_embedding_with_its_own_forward_is_re_run_not_looked_up() -> None:
    """Its output gradient is not its rows' (the scale): a diagonal unit, equal to autograd."""
    torch.manual_seed(0)
    units, _ = _hooked_equal_autograd(ScaledTokens().double())
    assert isinstance(units["embed"].uses[0].kind, units_module.DiagonalKind)


class ScaledWordEmbedding(nn.Embedding):
    """Gemma's: its rows times ``embed_scale``, a buffer, in the weight's dtype."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__(VOCAB, WIDTH, padding_idx=0)
        self.register_buffer("embed_scale", torch.tensor(WIDTH**0.5), persistent=False)
        self.shift = shift

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype) + self.shift


class ScaledTiedNet(TiedNet):
    """Gemma's tie: the output head's weight is the scaled embedding's."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = ScaledWordEmbedding()
        self.lm_head.weight = self.embed.weight


def test_an_embedding_that_only_scales_its_rows_is_looked_up_even_when_tied() -> None:
    """Gemma's scaled embedding tied to the head: one Kronecker unit, equal to autograd."""
    torch.manual_seed(0)
    units, expected = _hooked_equal_autograd(ScaledTiedNet().double(), VOCAB)
    kind = units["embed+lm_head"].uses[0].kind
    assert isinstance(kind, units_module.EmbeddingKind) and kind.scale == WIDTH**0.5
    assert expected["embed+lm_head"].abs().max() > 0
    assert units_module.embedding_scale(ScaledWordEmbedding(shift=0.5)) is None  # more than that


class Mixer(nn.Module):
    """Tokens embedded, mixed by a linear layer (each subclass calls it its own way), read out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 3)


class SequenceFirst(Mixer):
    """A linear layer called on ``[T, B, n]`` (sequence first): its rows mix the examples."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.embed(ids).transpose(0, 1)).transpose(0, 1))


class SharedTable(Mixer):
    """A linear map of a constant ``[T, n]`` table, added to every example: not separable."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("constant", torch.randn(LENGTH, WIDTH))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids) + self.mix(self.constant[: ids.shape[1]]))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (SequenceFirst, "'mix' is called on a tensor of shape \\(5, 4, 4\\) computed from"),
        (
            SharedTable,
            "unit 'mix' \\(output \\(5, 4\\)\\) is called on tensors shared by the batch",
        ),
    ],
)
def test_calls_whose_rows_are_not_the_examples_are_refused(model, message: str) -> None:
    torch.manual_seed(0)
    net = model().double()
    units = _units(net, None)
    with pytest.raises(AnalysisError, match=message):
        per_example_grads(net, units, ProbeTask(3).loss, [(_tokens(4, 5),)])


class TokenMajor(Mixer):
    """A layer on the batch's tokens flattened token by token (``[T·B, n]``): the capture
    takes flattened rows as example by example, so this one's rows go to the wrong examples."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).transpose(0, 1)  # [T, B, n]
        mixed = self.mix(x.reshape(-1, WIDTH)).reshape(x.shape).transpose(0, 1)
        return self.head(torch.tanh(mixed))


class Windows(Mixer):
    """A layer on windows of the sequence, ``[B·W, T/W, n]`` (Swin's), example by example or,
    ``window_major``, window by window (rows the capture would give to the wrong examples)."""

    def __init__(self, window_major: bool = False) -> None:
        super().__init__()
        self.window_major = window_major
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids[:, :4])  # [B, 4, n]: two windows of two
        windows = x.reshape(len(x), 2, 2, WIDTH)
        if self.window_major:
            windows = windows.transpose(0, 1)
        mixed = self.mix(self.norm(windows.reshape(-1, 2, WIDTH)))  # [B·2, 2, n]
        mixed = mixed.reshape(windows.shape)
        if self.window_major:
            mixed = mixed.transpose(0, 1)
        return self.head(torch.tanh(mixed.reshape(x.shape)))


def test_windows_of_each_example_are_captured_as_its_rows() -> None:
    torch.manual_seed(0)
    model = Windows().double()
    units, _ = _hooked_equal_autograd(model)
    task = ProbeTask(3)
    check_capture(model, units, task.loss, _as_rows(_tokens(4, 5)))
    window_major = Windows(window_major=True).double()
    with pytest.raises(AnalysisError, match=r"mix: an example's gradient in a batch differs"):
        check_capture(window_major, _units(window_major, None), task.loss, _as_rows(_tokens(4, 5)))


class Table(nn.Module):
    """A learned ``[1, 1, n]`` bias computed from nothing: shared by the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 1, WIDTH))

    def forward(self) -> torch.Tensor:
        return self.weight * 2


class WindowBias(Windows):
    """The table added to every window (Swin's relative position bias): not to the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.table = Table()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        windows = self.embed(ids[:, :4]).reshape(-1, 2, WIDTH)  # [B·2, 2, n]
        return self.head(torch.tanh(windows + self.table()).reshape(len(ids), 4, WIDTH))


def test_a_shared_output_that_breaks_the_model_once_expanded_is_named() -> None:
    torch.manual_seed(0)
    model = WindowBias().double()
    units = _units(model, None)
    with pytest.raises(AnalysisError, match=r"on outputs of table that the analysis expanded"):
        per_example_grads(model, units, ProbeTask(3).loss, [(_tokens(4, 5),)])
    without = {name: unit for name, unit in units.items() if name != "table"}
    per_example_grads(model, without, ProbeTask(3).loss, [(_tokens(4, 5),)])


def _as_rows(tokens: torch.Tensor) -> list[tuple[torch.Tensor]]:
    return [(row,) for row in tokens]


def test_the_capture_check_finds_rows_given_to_the_wrong_examples() -> None:
    torch.manual_seed(0)
    model = TokenMajor().double()
    with pytest.raises(AnalysisError, match=r"mix: an example's gradient in a batch differs"):
        check_capture(model, _units(model, None), ProbeTask(3).loss, _as_rows(_tokens(4, 5)))


def test_the_capture_check_finds_a_gradient_its_kind_gets_wrong(monkeypatch) -> None:
    """The scaled embedding taken as a plain lookup: its gradient lacks the scale."""
    monkeypatch.setattr(units_module, "kronecker_kind", _plain_lookup(units_module.kronecker_kind))
    torch.manual_seed(0)
    model = ScaledTokens().double()
    units = _units(model, None)
    assert isinstance(units["embed"].uses[0].kind, units_module.EmbeddingKind)
    with pytest.raises(AnalysisError, match=r"embed: the captured gradients sum to other than"):
        check_capture(model, units, ProbeTask(3).loss, _as_rows(_tokens(4, 5)))
    monkeypatch.undo()
    model = ScaledTokens().double()  # the diagonal unit it is now passes, as do the others
    check_capture(model, _units(model, None), ProbeTask(3).loss, _as_rows(_tokens(4, 5)))
    model = SharedPositions().double()
    check_capture(model, _units(model, None), ProbeTask(3).loss, _as_rows(_tokens(4, 5)))


def test_the_capture_checks_autograd_reference_in_groups_equals_it_at_once(monkeypatch) -> None:
    """Gradients taken a unit at a time (no model-sized memory) are the ones taken together."""
    torch.manual_seed(0)
    model = Windows().double()
    units = _units(model, None)
    projection = KroneckerProjection.for_modules(units, 2)
    batch = (_tokens(4, 5),)
    loss = ProbeTask(3).loss
    together = capture_check.autograd_projected(model, units, loss, batch, projection)
    assert len(capture_check._groups(model, units)) == 1
    monkeypatch.setattr(capture_check, "GRADIENT_BYTES", 1)
    assert len(capture_check._groups(model, units)) == len(units)
    apart = capture_check.autograd_projected(model, units, loss, batch, projection)
    torch.testing.assert_close(apart, together, rtol=1e-12, atol=1e-14)
    assert together.abs().max() > 0
    grads = torch.autograd.grad(loss(model, batch).sum(), list(model.parameters()))
    by_name = dict(zip((n for n, _ in model.named_parameters()), grads, strict=True))
    exact = projection.project({n: u.matrix(by_name)[None] for n, u in units.items()})
    torch.testing.assert_close(together, exact, rtol=1e-12, atol=1e-14)


def _plain_lookup(kind_of):
    def kind(module: nn.Module):
        return units_module.EmbeddingKind() if isinstance(module, nn.Embedding) else kind_of(module)

    return kind


class SharedPositions(nn.Module):
    """Position embeddings of ``arange(T)`` (no batch dimension), broadcast over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Embedding(LENGTH, WIDTH)
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1])
        return self.head(torch.tanh(self.embed(ids) + self.position(positions)))


def test_calls_shared_by_the_batch_keep_per_example_gradients() -> None:
    torch.manual_seed(0)
    model = SharedPositions().double()
    units, expected = _hooked_equal_autograd(model)
    task = ProbeTask(3)
    batch = (_tokens(4, 5),)
    one = per_example_grads(model, units, task.loss, [(batch[0][:1],)])  # a batch of one
    for name in units:
        torch.testing.assert_close(one[name], expected[name][:1], rtol=1e-10, atol=1e-12)


class OutOfMemory(SharedPositions):
    """Fails for want of memory after a shared output was expanded to the batch."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.position(torch.arange(ids.shape[1]))
        raise torch.OutOfMemoryError("out of memory (simulated)")


def test_running_out_of_memory_is_not_blamed_on_an_expanded_output() -> None:
    model = OutOfMemory().double()
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        per_example_grads(model, _units(model, None), ProbeTask(3).loss, [(_tokens(4, 5),)])


@pytest.mark.parametrize("case", ["conv1d", "tied", "adapter"])
def test_a_float32_model_gives_its_float64_twins_results_in_float64(case: str) -> None:
    """Products formed in float32 for a float32 model, summed in float64: float32's precision."""
    model64, batch64, outputs, diagonal_above = _case(case)
    model32 = copy.deepcopy(model64).float()
    batch32 = tuple(x.float() if x.is_floating_point() else x for x in batch64)
    task = ProbeTask(outputs)
    g = torch.Generator().manual_seed(3)
    units = {m: _units(model, diagonal_above) for m, model in (("64", model64), ("32", model32))}
    vectors = {
        n: torch.randn(3, *u.shape, generator=g, dtype=torch.float64)
        for n, u in units["64"].items()
    }
    ones = {n: torch.ones(u.shape, dtype=torch.float64) for n, u in units["64"].items()}
    results: dict[str, list[torch.Tensor]] = {}
    for key, model, batch in (("64", model64, batch64), ("32", model32, batch32)):
        found = units[key]
        grads = per_example_grads(model, found, task.loss, [batch])
        covs = covariances(model, found, task, [batch], torch.Generator(), exact=True)
        scaled = covariances(model, found, task, [batch], torch.Generator(), True, ones)
        factors = [f for c in (*covs.values(), *scaled.values()) for f in c.mean() if f is not None]
        if key == "64":
            bases = {
                n: tuple(None if f is None else eigh_float64(f)[1] for f in c.mean())
                for n, c in covs.items()
            }
        lam = corrected_eigenvalues(model, found, bases, task, [batch], torch.Generator(), True)
        lam_scaled = corrected_eigenvalues(
            model, found, bases, task, [batch], torch.Generator(), True, ones
        )
        results[key] = [
            *grads.values(),
            contract(model, found, task.loss, batch, vectors),
            *factors,
            *lam.values(),
            *lam_scaled.values(),
        ]
    for got, want in zip(results["32"], results["64"], strict=True):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("case", CASES)
def test_a_factored_scale_equals_its_dense_matrix(case: str) -> None:
    """A ``RankOne`` scale: factors rescaled, eigenvalues those of ``r cᵀ ∘ G`` exactly."""
    model, batch, outputs, diagonal_above = _case(case)
    units = _units(model, diagonal_above)
    task, gen = ProbeTask(outputs), torch.Generator()
    batches = [(batch[0][:4],), (batch[0][4:],)]
    g = torch.Generator().manual_seed(3)
    factored = {
        n: RankOne(
            0.5 + torch.rand(u.shape[0], generator=g, dtype=torch.float64),
            0.5 + torch.rand(u.shape[1], generator=g, dtype=torch.float64),
        )
        for n, u in units.items()
    }
    dense = {n: f.matrix() for n, f in factored.items()}
    covs = covariances(model, units, task, batches, gen, exact=True)
    scaled = covariances(model, units, task, batches, gen, exact=True, scale=factored)
    for name in units:
        for got, want, vector in zip(
            scaled[name].mean(),
            covs[name].mean(),
            (factored[name].cols, factored[name].rows),
            strict=True,
        ):
            assert (got is None) == (want is None)
            if got is not None:
                torch.testing.assert_close(got, torch.outer(vector, vector) * want)
    bases = {
        n: tuple(None if f is None else eigh_float64(f)[1] for f in c.mean())
        for n, c in scaled.items()
    }
    got = corrected_eigenvalues(model, units, bases, task, batches, gen, True, factored)
    want = corrected_eigenvalues(model, units, bases, task, batches, gen, True, dense)
    for name in units:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-14)


def test_rank_one_is_the_leading_singular_pair() -> None:
    g = torch.Generator().manual_seed(0)
    r, c = 0.1 + torch.rand(7, generator=g), 0.1 + torch.rand(5, generator=g)
    exact = rank_one(torch.outer(r, c).double())
    torch.testing.assert_close(exact.matrix(), torch.outer(r, c).double())
    matrix = 0.1 + torch.rand(9, 4, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(matrix)
    fitted = rank_one(matrix)
    assert (fitted.rows > 0).all() and (fitted.cols > 0).all()
    torch.testing.assert_close(fitted.matrix(), s[0] * torch.outer(u[:, 0], vh[0]))


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_squares_of_per_example_gradients_equal_the_dense_sum(tokens: int, dtype) -> None:
    """``Σ_b G_b²`` in float64, whether formed per example (tokens > 1) or as one product."""
    gen = torch.Generator().manual_seed(3)
    rows, cols = (torch.randn(5, tokens, n, generator=gen, dtype=dtype) for n in (4, 6))
    grads = Factored(Side(rows, 4), Side(cols, 6))
    exact = torch.einsum("bti,btj->bij", rows.double(), cols.double()).square().sum(0)
    got = grads.squares()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, exact, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


def test_a_tied_parameters_uses_join_into_one_sum_over_their_tokens() -> None:
    """``Σ_uses G_use`` as one factored sum over every use's tokens: its squares (what the
    corrected eigenvalues of a tied embedding and head add up) equal those of the dense sum,
    with the embedding's one-hot side rotated by a lookup; unlike sides do not join."""
    gen = torch.Generator().manual_seed(4)
    vocab, width = 7, 3
    q_rows, _ = torch.linalg.qr(torch.randn(vocab, vocab, generator=gen, dtype=torch.float64))
    head = Factored(  # the output layer: [B, T, vocab] gradients, [B, T, width] inputs
        Side(torch.randn(5, 2, vocab, generator=gen, dtype=torch.float64), vocab),
        Side(torch.randn(5, 2, width, generator=gen, dtype=torch.float64), width),
    )
    embed = Factored(  # the embedding: [B, T] token indices, [B, T, width] output gradients
        Side(torch.randint(0, vocab, (5, 4), generator=gen), vocab),
        Side(torch.randn(5, 4, width, generator=gen, dtype=torch.float64), width),
    )
    parts = [part.rotated(q_rows, None) for part in (head, embed)]
    joined = Factored.joined(parts)
    assert joined is not None and joined.rows.values.shape == (5, 6, vocab)
    exact = sum(part.dense() for part in parts).square().sum(0)
    torch.testing.assert_close(joined.squares(), exact, rtol=1e-12, atol=0)
    assert Factored.joined([head, embed]) is None  # a one-hot side beside a dense one
    assert Factored.joined([embed]) is embed
