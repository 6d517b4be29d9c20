"""Units: the blocks of trained parameters that each get their own curvature (SOURCE-math §5).

A unit's gradient is one ``[out, in]`` matrix. Most units are one module used once; its
per-example gradient is ``G = Σ_tok s aᵀ`` with ``a`` the module's input (a 1 appended for a
bias) and ``s`` the gradient of the loss with respect to its output. Each kind of module says how
its parameters are laid out in that matrix and how ``a`` and ``s`` are captured:

- ``nn.Linear``, ``nn.Conv2d`` (unfolded patches) and Hugging Face's ``Conv1D`` (weight stored
  ``[in, out]``, so its matrix is the weight's transpose);
- ``nn.Embedding``: ``a`` is a one-hot token, kept as its index; the matrix is ``[dim, vocab]``;
- every other module that owns trained parameters (LayerNorm/RMSNorm weights, a Linear's bias
  whose weight is frozen): a *diagonal* unit, ``[1, n]``, whose per-example gradient is the
  vector-Jacobian product of the module alone (``torch.func``), so no formula is needed.

A parameter shared by several modules (tied weights, e.g. GPT-2's ``lm_head`` and ``wte``) is one
unit whose matrix is the parameter's own layout; its gradient is the sum over all uses.

A side of a unit (rows or columns) is an *identity side* when its eigenbasis is taken as the
identity: one-hot sides (every use is an embedding's token side), every side of a diagonal unit,
and, on request, sides longer than a threshold (e.g. a 50,000-token ``lm_head`` output).

Precision: products of a batch's per-example gradients are formed in the precision of the
captured sides (:attr:`Factored.dtype`: float32 for a float32 model, whose activations and
output gradients carry float32's precision already), and what they return to be summed over
batches (covariances, squares, contractions) is float64.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from source_callback.errors import AnalysisError

#: Most per-example gradient entries formed at once (128 MiB in float64).
CHUNK_ELEMENTS = 2**24
#: How units lay their parameters out in matrices, recorded with what is stored in that layout
#: (the projected-gradient cache). 2: a ``Conv2d``'s columns in ``(kh, kw, C)`` order.
MATRIX_LAYOUT = 2
_REPLAYING = [False]


@contextmanager
def replaying() -> Iterator[None]:
    """While a diagonal unit re-runs its module for per-example gradients: capture is off."""
    _REPLAYING[0] = True
    try:
        yield
    finally:
        _REPLAYING[0] = False


def is_replaying() -> bool:
    """Whether a module is being re-run by :func:`replaying` (hooks must ignore that call)."""
    return _REPLAYING[0]


# -- factored per-example gradients ------------------------------------------------------------


@dataclass
class Side:
    """One side of ``G = Σ_tok rows_t cols_tᵀ`` per example.

    ``values`` is ``[B, T, size]`` (vectors), or ``[B, T]`` integer indices of one-hot vectors
    of length ``size``.
    """

    values: torch.Tensor
    size: int

    @property
    def onehot(self) -> bool:
        """Whether the side holds token indices."""
        return not self.values.is_floating_point()

    def times(self, matrix: torch.Tensor | None) -> Side:
        """Each vector ``x`` replaced by ``matrixᵀ x`` (``None``: unchanged), as ``[B, T, k]``."""
        if matrix is None:
            return self
        if self.onehot:
            return Side(matrix[self.values], matrix.shape[1])
        return Side(self.values.to(matrix.dtype) @ matrix, matrix.shape[1])

    def add_covariance(self, total: torch.Tensor | None) -> torch.Tensor:
        """``total + Σ_{b,t} x xᵀ``, ``[size, size]`` float64 (``total`` updated in place).

        Formed in the values' precision. A one-hot side adds its tokens' counts to the diagonal,
        with no ``[size, size]`` temporary per batch (a tied 4,096-token vocabulary's is 134 MB).
        ``None``: a new sum.
        """
        if self.onehot:
            counts = torch.bincount(self.values.reshape(-1), minlength=self.size).double()
            if total is None:
                total = torch.zeros(self.size, self.size, dtype=torch.float64, device=counts.device)
            total.diagonal().add_(counts)
            return total
        gram = _gram(self.values.reshape(-1, self.size)).double()
        return gram if total is None else total.add_(gram)

    def __getitem__(self, rows: slice) -> Side:
        return Side(self.values[rows], self.size)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``xᵀx`` for ``[N, n]`` ``x``, each block below the diagonal formed once, mirrored above.

    With ``k`` blocks of columns (``k`` up to 8, blocks of at least 128) it takes
    ``(k + 1) / 2k`` of the products of ``x.T @ x``: 20-30% less time at the widths of a
    transformer's or a ConvNet's factors (289-4096 columns; ``x.T @ x`` below 256).
    """
    size = x.shape[1]
    blocks = min(8, size // 128)
    if blocks < 2:
        return x.T @ x
    out = x.new_empty(size, size)
    edges = [size * i // blocks for i in range(blocks + 1)]
    for start, stop in itertools.pairwise(edges):
        below = x[:, start:].T @ x[:, start:stop]
        out[start:, start:stop] = below
        out[start:stop, start:] = below.T
    return out


def _scatter(dense: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``Σ_t x_t e_{index_t}ᵀ`` per example: ``[B, T, n]`` and ``[B, T]`` to ``[B, size, n]``."""
    batch, n = dense.shape[0], dense.shape[-1]
    flat = index + torch.arange(batch, device=index.device)[:, None] * size
    out = torch.zeros(batch * size, n, dtype=dense.dtype, device=dense.device)
    out.index_add_(0, flat.reshape(-1), dense.reshape(-1, n))
    return out.reshape(batch, size, n)


@dataclass
class Factored:
    """A batch's per-example gradients ``G_b = Σ_t rows_bt cols_btᵀ`` of one use of a unit.

    ``known`` is the axis (0 rows, 1 columns) of the side captured in the forward pass (the
    module's input), ``None`` when neither is.
    """

    rows: Side
    cols: Side
    known: int | None = None

    def __len__(self) -> int:
        return self.rows.values.shape[0]

    @property
    def T(self) -> Factored:
        """``G_bᵀ``."""
        known = None if self.known is None else 1 - self.known
        return Factored(self.cols, self.rows, known)

    def __getitem__(self, examples: slice) -> Factored:
        return Factored(self.rows[examples], self.cols[examples], self.known)

    @property
    def sides(self) -> tuple[Side, Side]:
        """``(rows, cols)``."""
        return self.rows, self.cols

    @property
    def dtype(self) -> torch.dtype:
        """Precision of the products: the wider of the (non-one-hot) sides' dtypes."""
        floats = [side.values.dtype for side in self.sides if not side.onehot]
        return floats[0] if len(floats) == 1 else torch.promote_types(*floats)

    def rotated(self, q_rows: torch.Tensor | None, q_cols: torch.Tensor | None) -> Factored:
        """``Q_rowsᵀ G Q_cols`` (``None``: identity)."""
        return Factored(self.rows.times(q_rows), self.cols.times(q_cols), self.known)

    def rotate_sides_first(self, q_rows: torch.Tensor | None, q_cols: torch.Tensor | None) -> bool:
        """Whether rotating each token's sides costs fewer products than each example's ``G``.

        ``Σ_t (Q_rowsᵀ r_t)(Q_colsᵀ c_t)ᵀ`` takes ``T·(rows² + cols²) + T·rows·cols`` products
        per example, ``Q_rowsᵀ G Q_cols`` after ``G`` takes ``T·rows·cols + rows·cols·(rows +
        cols)`` (a side without a basis costs nothing): short sequences of wide layers rotate
        the sides, long ones the gradient. A one-hot side is rotated by a lookup: always first.
        """
        if self.rows.onehot or self.cols.onehot:
            return True
        tokens = self.rows.values.shape[1]
        rows = 0 if q_rows is None else self.rows.size
        cols = 0 if q_cols is None else self.cols.size
        return tokens * (rows * rows + cols * cols) <= self.rows.size * self.cols.size * (
            rows + cols
        )

    @staticmethod
    def joined(parts: Sequence[Factored]) -> Factored | None:
        """The sum of the parts' gradients as one :class:`Factored`: their tokens side by side.

        ``Σ_uses Σ_t r_t c_tᵀ`` is one sum over every use's tokens. ``None`` when the parts'
        sides are not alike (a one-hot side beside a dense one) or differ in dtype.
        """
        first = parts[0]
        for part in parts[1:]:
            for mine, theirs in zip(first.sides, part.sides, strict=True):
                if mine.size != theirs.size or mine.values.dtype != theirs.values.dtype:
                    return None
        if len(parts) == 1:
            return first
        rows, cols = (
            Side(torch.cat([part.sides[axis].values for part in parts], dim=1), side.size)
            for axis, side in enumerate(first.sides)
        )
        known = first.known if all(part.known == first.known for part in parts) else None
        return Factored(rows, cols, known)

    def to(self, dtype: torch.dtype) -> Factored:
        """The same gradients with the (non-one-hot) sides' values in ``dtype``."""
        rows, cols = (
            side if side.onehot else Side(side.values.to(dtype), side.size) for side in self.sides
        )
        return Factored(rows, cols, self.known)

    def dense(self) -> torch.Tensor:
        """``[B, rows, cols]`` in :attr:`dtype`."""
        if self.cols.onehot:
            return _scatter(self.rows.values, self.cols.values, self.cols.size).transpose(1, 2)
        if self.rows.onehot:
            return _scatter(self.cols.values, self.rows.values, self.rows.size)
        dtype = self.dtype
        return self.rows.values.to(dtype).transpose(1, 2) @ self.cols.values.to(dtype)

    def slices(self) -> Iterator[slice]:
        """Consecutive groups of examples whose dense gradients hold ≤ ``CHUNK_ELEMENTS``."""
        step = max(1, CHUNK_ELEMENTS // (self.rows.size * self.cols.size))
        for start in range(0, len(self), step):
            yield slice(start, start + step)

    def chunks(self) -> Iterator[Factored]:
        """The examples of :meth:`slices`, each as a :class:`Factored`."""
        return (self[rows] for rows in self.slices())

    def squares(self) -> torch.Tensor:
        """``Σ_b G_b²`` (elementwise), ``[rows, cols]`` float64.

        With a one-hot side only the (example, token) pairs present are formed: a token's column
        of ``G_b`` is the sum of ``s`` over its occurrences in example b. With one token per
        example no ``G_b`` is formed: ``G_b² = (r_b²)(c_b²)ᵀ``.
        """
        if self.rows.onehot:
            return self.T.squares().T
        if not self.cols.onehot and self.rows.values.shape[1] == 1:
            rows, cols = (side.values[:, 0].double().square() for side in self.sides)
            return rows.T @ cols
        if not self.cols.onehot:
            return sum(part.dense().square_().sum(0).double() for part in self.chunks())
        size = self.cols.size
        index = self.cols.values
        keys = index + torch.arange(len(self), device=index.device)[:, None] * size
        unique, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
        rows = self.rows.values.reshape(-1, self.rows.size)
        sums = torch.zeros(len(unique), self.rows.size, dtype=rows.dtype, device=rows.device)
        sums.index_add_(0, inverse, rows)
        out = torch.zeros(size, self.rows.size, dtype=torch.float64, device=rows.device)
        out.index_add_(0, unique % size, sums.square().double())
        return out.T

    def contract(self, vectors: torch.Tensor) -> torch.Tensor:
        """``⟨vectors[q], G_b⟩`` for ``[Q, rows, cols]`` vectors: ``[B, Q]`` float64.

        Dense sides: the gradients of a few examples at a time (formed in :attr:`dtype`) times
        all queries' vectors in one float64 product (2-40× faster than going through a
        ``[B, T, Q, in]`` intermediate, ``benchmarks/speed.py``); a sum over all ``rows·cols``
        coordinates in float32 would add rounding several times the float32 model's own. A
        one-hot side gathers the vectors' columns of its tokens, a sum over ``rows`` only,
        formed in :attr:`dtype`.
        """
        v = vectors.to(self.rows.values.device, torch.float64)
        if self.rows.onehot:
            return self.T.contract(v.transpose(1, 2))
        if self.cols.onehot:
            v = v.to(self.dtype)
            batch, tokens = self.cols.values.shape
            out = []
            step = max(1, CHUNK_ELEMENTS // (len(v) * self.rows.size * tokens))
            for start in range(0, batch, step):
                part = self[start : start + step]
                picked = v[:, :, part.cols.values.reshape(-1)]  # [Q, rows, b·T]
                s = part.rows.values.reshape(-1, self.rows.size)
                values = torch.einsum("qrn,nr->nq", picked, s)
                out.append(values.reshape(len(part), tokens, -1).double().sum(1))
            return torch.cat(out)
        flat = v.reshape(len(v), -1).T
        # a single token's gradient sums nothing: formed in float64, it needs no conversion
        parts = (self.to(torch.float64) if self.rows.values.shape[1] == 1 else self).chunks()
        return torch.cat([part.dense().flatten(1).double() @ flat for part in parts])


# -- kinds of modules --------------------------------------------------------------------------


def _hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (``transformers.pytorch_utils``), without importing it."""
    cls = type(module)
    return any(
        c.__name__ == "Conv1D" and c.__module__.startswith("transformers.") for c in cls.__mro__
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, ..., n]`` as ``[B, tokens, n]``."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _padding(module: nn.Module) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)``: the zeros a convolution pads its input with."""
    if module.padding == "valid":
        return 0, 0, 0, 0
    if module.padding == "same":  # as torch pads it: the odd one of a total on the far side
        (kh, kw), (dh, dw) = module.kernel_size, module.dilation
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return tw // 2, tw - tw // 2, th // 2, th - th // 2
    ph, pw = module.padding
    return pw, pw, ph, ph


class Kind:
    """How a kind of module lays out its ``[out, in]`` matrix and captures its gradient.

    ``transposed``: the natural matrix is the transpose of the weight's own layout.
    """

    transposed = False

    def weight_matrix(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """The weight (or a tensor of its shape) as the ``[out, in]`` matrix, bias excluded."""
        return weight.reshape(weight.shape[0], -1)

    def capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """What the forward pass must keep for the gradient (detached)."""
        return args[0].detach()

    def inputs(self, module: nn.Module, data: Any, bias: bool) -> Side | None:
        """The input side ``a`` (a column of ones appended for a bias)."""
        a = _rows(data)
        if bias:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
        return Side(a, a.shape[-1])

    def factored(
        self, module: nn.Module, data: Any, side: Side | None, grad: torch.Tensor
    ) -> Factored:
        """The per-example gradients of one call, in the natural orientation.

        ``side`` is what :meth:`inputs` gave for ``data`` (formed once per call: unfolded
        patches are costly).
        """
        assert side is not None
        return Factored(Side(_rows(grad), grad.shape[-1]), side, known=1)


class LinearKind(Kind):
    """``nn.Linear``: weight ``[out, in]``."""


class Conv2dKind(Kind):
    """``nn.Conv2d`` over unfolded patches: weight ``[out, C, kh, kw]``, columns ``(kh, kw, C)``.

    The matrix's columns (and a patch's values) go channels last: each patch is a run of
    contiguous channel vectors.
    """

    def weight_matrix(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """``[out, kh·kw·C]``: the kernel with its channels last, the patches' column order."""
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)

    def inputs(self, module: nn.Module, data: Any, bias: bool) -> Side | None:
        """The unfolded patches, ``[B, L, kh·kw·C (+1)]``, with the bias's column of ones.

        The input is copied once into a zero-padded channels-last buffer, and the patches are
        one strided copy of its windows: 2-3× faster than writing ``F.unfold``'s ``(C, kh, kw)``
        order, whose every value lands ``kh·kw`` apart from its neighbour.
        """
        (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
        left, right, top, bottom = _padding(module)
        batch, channels, height, width = data.shape
        hp, wp = height + top + bottom, width + left + right
        x = data.new_zeros(batch, hp, wp, channels)
        x[:, top : top + height, left : left + width] = data.permute(0, 2, 3, 1)
        lh = (hp - dh * (kh - 1) - 1) // sh + 1
        lw = (wp - dw * (kw - 1) - 1) // sw + 1
        size = kh * kw * channels
        patches = x.new_empty(batch, lh * lw, size + int(bias))
        row = wp * channels
        windows = x.as_strided(
            (batch, lh, lw, kh, kw, channels),
            (hp * row, sh * row, sw * channels, dh * row, dw * channels, 1),
        )
        patches[..., :size].view(batch, lh, lw, kh, kw, channels).copy_(windows)
        if bias:
            patches[..., size] = 1
        return Side(patches, patches.shape[-1])

    def factored(
        self, module: nn.Module, data: Any, side: Side | None, grad: torch.Tensor
    ) -> Factored:
        """Output gradients per patch position, ``[B, L, out]``."""
        return super().factored(module, data, side, grad.flatten(2).transpose(1, 2))


class Conv1dKind(Kind):
    """Hugging Face ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""

    transposed = True

    def weight_matrix(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """The weight's transpose."""
        return weight.T


@dataclass
class EmbeddingKind(Kind):
    """``nn.Embedding``: ``[dim, vocab]`` gradients from the tokens' output gradients.

    ``scale``: the factor the module's forward multiplies its rows by (Hugging Face's
    ``*ScaledWordEmbedding``, see :func:`embedding_scale`), which the rows' gradients carry.
    """

    scale: float = 1.0
    transposed = True

    def weight_matrix(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """The weight's transpose."""
        return weight.T

    def inputs(self, module: nn.Module, data: Any, bias: bool) -> Side | None:
        """The token indices, ``[B, T]``, of one-hot vectors of the vocabulary's size."""
        return Side(data.reshape(data.shape[0], -1), module.num_embeddings)

    def factored(
        self, module: nn.Module, data: Any, tokens: Side | None, grad: torch.Tensor
    ) -> Factored:
        """``s`` per token (zero at the padding index) and the tokens."""
        assert tokens is not None
        s = _rows(grad) if self.scale == 1.0 else _rows(grad) * self.scale
        if module.padding_idx is not None:  # the padding row receives no gradient
            s = s * (tokens.values != module.padding_idx)[..., None]
        return Factored(Side(s, s.shape[-1]), tokens, known=1)


@dataclass
class DiagonalKind(Kind):
    """Any module's own trained parameters ``attrs``, flattened into one ``[1, n]`` row.

    The per-example gradient is the vector-Jacobian product of the module alone, re-run on
    each example's captured inputs (``torch.func.vmap`` of ``vjp``) with its output gradient.
    """

    attrs: tuple[str, ...] = ()

    def capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The call's arguments, tensors detached."""

        def detach(x: Any) -> Any:
            return x.detach() if isinstance(x, torch.Tensor) else x

        return tuple(map(detach, args)), {k: detach(v) for k, v in kwargs.items()}

    def inputs(self, module: nn.Module, data: Any, bias: bool) -> Side | None:
        """None: no side of a diagonal unit is known from the forward pass."""
        return None

    def factored(
        self, module: nn.Module, data: Any, side: Side | None, grad: torch.Tensor
    ) -> Factored:
        """``G = 1 · gᵀ`` with ``g`` the per-example gradient of the module's parameters.

        Every tensor argument, positional or keyword, whose leading dimension is the batch's is
        split by example (DoRA's magnitude takes the base layer's output as ``base_result=``).
        """
        args, kwargs = data
        batch = grad.shape[0]

        def split(x: Any) -> bool:
            return isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == batch

        batched = tuple(0 if split(x) else None for x in args)
        keys = tuple(k for k, v in kwargs.items() if split(v))
        fixed = {k: v for k, v in kwargs.items() if k not in keys}
        params = {name: module.get_parameter(name).detach() for name in self.attrs}

        def one(
            example_args: tuple[Any, ...], example_kwargs: tuple[torch.Tensor, ...], g: torch.Tensor
        ) -> tuple[torch.Tensor, ...]:
            # each example keeps a batch dimension of 1: modules may require one
            call_args = tuple(
                x[None] if dim == 0 else x for x, dim in zip(example_args, batched, strict=True)
            )
            call_kwargs = {
                **fixed,
                **{k: v[None] for k, v in zip(keys, example_kwargs, strict=True)},
            }

            def run(p: dict[str, torch.Tensor]) -> torch.Tensor:
                return torch.func.functional_call(module, p, call_args, call_kwargs)

            _, vjp = torch.func.vjp(run, params)
            grads = vjp(g[None])[0]
            return tuple(grads[name].reshape(-1) for name in self.attrs)

        values = tuple(kwargs[k] for k in keys)
        with replaying():
            parts = torch.func.vmap(one, in_dims=(batched, (0,) * len(keys), 0))(args, values, grad)
        g = torch.cat([p.double() for p in parts], dim=1)  # [B, n]
        ones = g.new_ones(batch, 1, 1)
        return Factored(Side(ones, 1), Side(g[:, None, :], g.shape[1]))


def kronecker_kind(module: nn.Module) -> Kind | None:
    """The Kronecker kind of a module (``None`` when it is none of them)."""
    if isinstance(module, nn.Linear):
        return LinearKind()
    if isinstance(module, nn.Conv2d):
        return Conv2dKind()
    if isinstance(module, nn.Embedding):
        if type(module).forward is nn.Embedding.forward:
            return EmbeddingKind()
        # a subclass with its own forward (OPT's positions from the attention mask) may look
        # its rows up by other than its first argument: a diagonal unit re-runs it instead,
        # unless it only scales its rows
        scale = embedding_scale(module)
        return None if scale is None else EmbeddingKind(scale)
    if _hf_conv1d(module):
        return Conv1dKind()
    return None


def embedding_scale(module: nn.Embedding) -> float | None:
    """The ``embed_scale`` by which ``module``'s own forward multiplies its rows, else ``None``.

    Hugging Face's ``*ScaledWordEmbedding`` classes (Gemma, BART, Pegasus-X) return the rows
    of their tokens times ``embed_scale`` (a float or a one-element buffer). Whether the
    forward does just that is checked on the first and last tokens, calling it without hooks.
    """
    scale = getattr(module, "embed_scale", None)
    if not isinstance(scale, (float, int, torch.Tensor)) or torch.as_tensor(scale).numel() != 1:
        return None
    weight = module.weight
    factor = torch.as_tensor(scale).to(weight.device, weight.dtype)
    ids = torch.tensor([0, module.num_embeddings - 1], device=weight.device)
    try:
        with torch.no_grad():
            got = type(module).forward(module, ids)
            torch.testing.assert_close(got, nn.functional.embedding(ids, weight) * factor)
    except (AssertionError, RuntimeError, TypeError, ValueError):
        return None
    return float(factor)


def refusal(module: nn.Module) -> str | None:
    """Why a module of a Kronecker kind cannot be a unit (``None`` when it can)."""
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
        return "grouped or non-zero-padded convolution"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
        return "embedding with max_norm (renormalised in place) or sparse gradients"
    return None


# -- units -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Use:
    """One module through which a unit's parameters enter the forward pass.

    Attributes
    ----------
    name
        The module's qualified name.
    module
        The module.
    kind
        Its kind.
    bias
        Whether its bias belongs to the unit (a column of ones on the input side).
    transposed
        Whether the unit's matrix is the transpose of the kind's natural ``[out, in]``.
    """

    name: str
    module: nn.Module = field(repr=False)
    kind: Kind
    bias: bool
    transposed: bool

    def factored(self, data: Any, side: Side | None, grad: torch.Tensor) -> Factored:
        """The per-example gradients of one call, in the unit's orientation.

        ``side`` is the kind's input side of ``data`` (:meth:`inputs`).
        """
        out = self.kind.factored(self.module, data, side, grad)
        return out.T if self.transposed else out

    def inputs(self, data: Any) -> tuple[int, Side] | None:
        """``(axis, side)``: the unit side (0 rows, 1 columns) known from the forward pass."""
        side = self.kind.inputs(self.module, data, self.bias)
        return None if side is None else (0 if self.transposed else 1, side)


@dataclass(frozen=True)
class Unit:
    """A block of parameters with its own curvature; its gradient is one ``[out, in]`` matrix.

    Attributes
    ----------
    name
        The unit's name: its module's qualified name (tied: the modules' names joined by
        ``+``).
    uses
        The modules its parameters enter through.
    params
        Qualified names of its parameters (the names ``named_parameters()`` gives).
    shape
        ``(out, in)`` of its gradient matrix.
    identity
        Per side (rows, columns): whether its eigenbasis is the identity.
    """

    name: str
    uses: tuple[Use, ...]
    params: tuple[str, ...]
    shape: tuple[int, int]
    identity: tuple[bool, bool]

    @property
    def size(self) -> int:
        """Number of coordinates (parameters) of the unit."""
        return self.shape[0] * self.shape[1]

    def matrix(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The unit's parameters (or tensors of their shapes, by name) as ``[out, in]``."""
        use = self.uses[0]
        if isinstance(use.kind, DiagonalKind):
            return torch.cat([tensors[p].reshape(-1) for p in self.params])[None]
        matrix = use.kind.weight_matrix(use.module, tensors[self.params[0]])
        if use.transposed:
            matrix = matrix.T
        if use.bias:
            matrix = torch.cat([matrix, tensors[self.params[1]][:, None]], dim=1)
        return matrix


def _owners(model: nn.Module) -> dict[int, list[tuple[str, str, nn.Module]]]:
    """Per trainable parameter (by identity): every ``(module name, attribute, module)``."""
    out: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                out.setdefault(id(param), []).append((module_name, attr, module))
    return out


_CONTAINERS = (nn.ParameterDict, nn.ParameterList)


def _calling_module(
    model: nn.Module, module_name: str, attr: str, module: nn.Module
) -> tuple[str, str, nn.Module]:
    """The module whose forward uses a parameter, and the parameter's path in it.

    A ``ParameterDict`` or ``ParameterList`` is never called: the module holding it uses its
    parameters (peft's LoRA on an embedding, ``lora_embedding_A[adapter]``), so a diagonal unit
    re-runs that module, with the parameter as ``"lora_embedding_A.default"``.
    """
    while isinstance(module, _CONTAINERS) and module_name:
        parent, _, child = module_name.rpartition(".")
        module_name, attr, module = parent, f"{child}.{attr}", model.get_submodule(parent)
    return module_name, attr, module


def _trains_composite(child: nn.Module) -> bool:
    """Whether ``child`` has trainable parameters and modules of its own.

    A diagonal unit re-runs its module per example: one whose children with trainable
    parameters are single layers (peft's LoRA embedding around its base embedding, trained in
    an earlier stage) is re-run at a layer's cost; a module holding larger trained blocks as
    well as parameters of its own is left uncovered. Parameter containers are its own.
    """
    if isinstance(child, _CONTAINERS) or not any(p.requires_grad for p in child.parameters()):
        return False
    return any(True for _ in child.children())


def _qualified(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


@dataclass
class Units:
    """The units of a model and the trained parameters no unit covers.

    Attributes
    ----------
    units
        By name.
    uncovered
        Qualified parameter name → why no unit covers it.
    numel
        Size of every trainable parameter by (canonical) name.
    """

    units: dict[str, Unit]
    uncovered: dict[str, str]
    numel: dict[str, int]


def find_units(model: nn.Module, diagonal_above: int | None = None) -> Units:
    """Every trainable parameter's unit, ties detected by tensor identity.

    Parameters
    ----------
    model
        The model; parameters with ``requires_grad`` are the ones covered.
    diagonal_above
        Sides of a Kronecker unit longer than this get an identity eigenbasis (``None``: only
        one-hot sides do).
    """
    canonical = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    numel = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    owners = _owners(model)
    units: dict[str, Unit] = {}
    uncovered: dict[str, str] = {}
    covered: set[int] = set()

    def identity(size: int, onehot: bool) -> bool:
        return onehot or (diagonal_above is not None and size > diagonal_above)

    # Kronecker units: one per trainable weight, over all modules it is the weight of.
    for pid, places in owners.items():
        kinds = [(n, m, kronecker_kind(m)) for n, a, m in places if a == "weight"]
        if len(kinds) != len(places) or any(k is None for _, _, k in kinds):
            continue
        reasons = [r for _, m, _ in kinds if (r := refusal(m))]
        if reasons:
            uncovered[canonical[pid]] = reasons[0]
            covered.add(pid)
            continue
        tied = len(kinds) > 1
        uses = []
        for name, module, kind in kinds:
            bias = module.bias if isinstance(getattr(module, "bias", None), nn.Parameter) else None
            own_bias = (
                not tied and bias is not None and bias.requires_grad and len(owners[id(bias)]) == 1
            )
            uses.append(Use(name, module, kind, own_bias, tied and kind.transposed))  # type: ignore[arg-type]
            if own_bias:
                covered.add(id(bias))
        first = uses[0]
        natural = first.kind.weight_matrix(first.module, model.get_parameter(canonical[pid]))
        rows, cols = (natural.T if first.transposed else natural).shape
        cols += int(first.bias)
        onehot = [
            all(isinstance(u.kind, EmbeddingKind) and u.transposed == (axis == 0) for u in uses)
            for axis in (0, 1)
        ]
        params = (canonical[pid],) + ((_qualified(first.name, "bias"),) if first.bias else ())
        name = "+".join(u.name for u in uses)
        units[name] = Unit(
            name,
            tuple(uses),
            params,
            (rows, cols),
            (identity(rows, onehot[0]), identity(cols, onehot[1])),
        )
        covered.add(pid)

    # Diagonal units: a module's own remaining trainable parameters.
    modules: dict[str, tuple[nn.Module, list[str]]] = {}
    for pid, places in owners.items():
        if pid in covered:
            continue
        if len(places) > 1:
            uncovered[canonical[pid]] = "shared by several modules that are not all Kronecker kinds"
            continue
        module_name, attr, module = _calling_module(model, *places[0])
        if any(_trains_composite(child) for child in module.children()):
            uncovered[canonical[pid]] = (
                f"a parameter of {type(module).__name__} used outside its submodules"
            )
            continue
        modules.setdefault(module_name, (module, []))[1].append(attr)
    for module_name, (module, attrs) in modules.items():
        params = tuple(_qualified(module_name, a) for a in attrs)
        size = sum(numel[p] for p in params)
        use = Use(module_name, module, DiagonalKind(tuple(attrs)), False, False)
        units[module_name] = Unit(module_name, (use,), params, (1, size), (True, True))
    return Units(units, uncovered, numel)


def _layout(unit: Unit) -> tuple[Any, ...]:
    """What fixes where each parameter's entries sit in the unit's matrix."""
    use = unit.uses[0]
    return unit.shape, type(use.kind), use.transposed, use.bias, len(unit.uses)


def carry_vectors(
    vectors: Mapping[str, torch.Tensor],
    later: Mapping[str, Unit],
    earlier: Mapping[str, Unit],
    names: Mapping[str, str],
) -> dict[str, torch.Tensor]:
    """Query-side vectors ``[Q, out, in]`` of one model's units as those of another model's.

    Where consecutive stages are analyzed with different models, the vector that reaches the
    start of the later stage continues, in the earlier stage, on the unit whose parameters its
    unit's parameters continue (``names``: later parameter name -> earlier one). A unit of the
    earlier model that nothing continues (a head dropped later) starts from zero: the queries do
    not depend on it. A later unit that nothing in the earlier model continues (an adapter
    added) ends there: it was constant before.

    Raises
    ------
    AnalysisError
        A unit's parameters continue only part of a unit, or a unit laid out otherwise (a tie
        made or undone between the stages).
    """
    first = next(iter(vectors.values()))
    continued = {
        tuple(names.get(p) for p in unit.params): name
        for name, unit in later.items()
        if name in vectors
    }
    out = {}
    for name, unit in earlier.items():
        source = continued.get(unit.params)
        if source is not None and _layout(later[source]) == _layout(unit):
            out[name] = vectors[source]
            continue
        partial = [n for ps, n in continued.items() if set(ps) & set(unit.params)]
        if partial:
            raise AnalysisError(
                f"unit {name!r} of the earlier stage's model ({', '.join(unit.params)}) is "
                f"continued by unit(s) {partial} of the later stage's model with other "
                "parameters or another layout (a tie made or undone between the stages); "
                "analyzing such a change with one model per stage is not supported."
            )
        out[name] = first.new_zeros(len(first), *unit.shape)
    return out


# -- selection ---------------------------------------------------------------------------------

#: What ``analyze(modules=...)`` accepts (see :meth:`ModuleSelection.of`).
SelectionSpec = Union["ModuleSelection", Mapping[str, Sequence[str]], Sequence[str], None]


@dataclass(frozen=True)
class ModuleSelection:
    """Which units an analysis attributes through, by ``fnmatch`` patterns on unit names.

    A unit is selected when it matches some ``include`` pattern (all units when ``include`` is
    empty) and no ``exclude`` pattern. Unit names are module names (``"transformer.h.0.mlp.c_fc"``;
    tied parameters: the modules' names joined by ``+``, e.g. ``"transformer.wte+lm_head"``).

    Examples
    --------
    >>> ModuleSelection(exclude=("*lm_head*",))
    ModuleSelection(include=(), exclude=('*lm_head*',))
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field_name in ("include", "exclude"):
            value = getattr(self, field_name)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise TypeError(f"ModuleSelection.{field_name} must be a sequence of strings")
            object.__setattr__(self, field_name, tuple(value))

    @classmethod
    def of(cls, spec: SelectionSpec) -> ModuleSelection:
        """A selection from ``analyze(modules=...)``.

        ``None`` (all units), a list of include patterns, a mapping with ``include`` and
        ``exclude`` lists, or a selection.
        """
        if spec is None:
            return cls()
        if isinstance(spec, ModuleSelection):
            return spec
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - {"include", "exclude"})
            if unknown:
                raise ValueError(f"modules= accepts keys 'include' and 'exclude', got {unknown}")
            return cls(tuple(spec.get("include", ())), tuple(spec.get("exclude", ())))
        if isinstance(spec, str):
            raise TypeError("modules= takes a list of patterns, not a single string")
        return cls(tuple(spec))

    def selects(self, name: str) -> bool:
        """Whether the unit ``name`` is selected."""
        included = not self.include or any(fnmatch.fnmatchcase(name, p) for p in self.include)
        return included and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def apply(self, units: Mapping[str, Unit]) -> dict[str, Unit]:
        """The selected units; an include pattern that matches nothing is an error."""
        for pattern in self.include:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in units):
                raise AnalysisError(
                    f"modules= pattern {pattern!r} matches no unit; units: {sorted(units)[:12]}"
                )
        return {name: unit for name, unit in units.items() if self.selects(name)}
