"""EK-FAC curvature per unit (SOURCE-math §5; Grosse et al. 2023).

A unit's per-example gradient is ``G = Σ_tok s aᵀ`` (see :mod:`source_callback.analysis.units`
for the kinds of units and their layouts). Hooks capture each use's ``a`` in the forward pass and
its ``s`` in the backward pass, so gradients are only ever formed per unit and per batch. A side
of a unit with an identity eigenbasis (one-hot tokens, diagonal units, sides above a size
threshold) needs no covariance.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from source_callback.analysis.finite import RowFlags
from source_callback.analysis.units import (
    EmbeddingKind,
    Factored,
    Side,
    Unit,
    Use,
    find_units,
    is_replaying,
)
from source_callback.errors import AnalysisError, listed

#: Called once per unit and backward pass with the per-example gradients of all its uses.
OnGrads = Callable[[str, list[Factored]], None]


@dataclass(frozen=True)
class RankOne:
    """A positive ``[out, in]`` scale in factored form, ``rows colsᵀ`` (Adafactor-style).

    Scaling a unit's per-example gradients by it keeps their Kronecker structure:
    ``(r cᵀ) ∘ Σ_t s aᵀ = Σ_t (r ∘ s)(c ∘ a)ᵀ``, so the passes that use it cost what the
    unscaled ones do. Products are formed in the sides' precision (the vectors cast to it).

    Attributes
    ----------
    rows
        ``r``, ``[out]``.
    cols
        ``c``, ``[in]``.
    """

    rows: torch.Tensor
    cols: torch.Tensor

    def matrix(self) -> torch.Tensor:
        """``r cᵀ``, ``[out, in]``."""
        return torch.outer(self.rows, self.cols)

    def factored(self, part: Factored) -> Factored:
        """``(r cᵀ) ∘ G_b`` of every example; a one-hot side's factor moves to the other side.

        ``Σ_t x_t c_{k_t} e_{k_t}ᵀ`` for tokens ``k_t``: each token's dense vector takes the
        factor of its own token.
        """
        rows, cols = (vector.to(part.rows.values) for vector in (self.rows, self.cols))
        if part.cols.onehot:
            weighted = part.rows.values * rows * cols[part.cols.values][..., None]
            return Factored(Side(weighted, part.rows.size), part.cols, part.known)
        if part.rows.onehot:
            return RankOne(self.cols, self.rows).factored(part.T).T
        return Factored(
            Side(part.rows.values * rows, part.rows.size),
            Side(part.cols.values * cols, part.cols.size),
            part.known,
        )


#: A unit's scale of its pseudo-gradients: an ``[out, in]`` matrix, or factored.
Scale = torch.Tensor | RankOne


def _unscaled(
    scale: Scale | None, parts: list[Factored]
) -> tuple[torch.Tensor | None, list[Factored]]:
    """``(dense scale left to apply, parts)``: a :class:`RankOne` scale applied to the parts."""
    if isinstance(scale, RankOne):
        return None, [scale.factored(part) for part in parts]
    return scale, parts


def tracked_modules(model: nn.Module, diagonal_above: int | None = None) -> dict[str, Unit]:
    """The units EK-FAC covers, by name (see :func:`~source_callback.analysis.units.find_units`)."""
    return find_units(model, diagonal_above).units


class Capture:
    """Context manager that records every unit's per-example gradients through hooks.

    After each forward pass ``inputs[name]`` holds ``(axis, side)`` of every call's input side
    (the side of the unit known from the forward pass). In every backward pass
    ``on_grads(name, parts)`` is called once per unit with the gradients of all its uses in that
    pass (a tied parameter or a module called twice has several), as soon as all have arrived;
    :meth:`backward` hands over any left (uses no gradient reached). Call :meth:`reset` before
    each forward pass.

    A call whose inputs and output are shared by the batch (GPT-2's position embeddings:
    position ids ``[1, T]``; ``embedding(arange(T))``: ``[T]``, broadcast over the batch) would
    only give the batch's summed gradient; its output is expanded to B rows instead (a batch
    dimension prepended unless it has one of 1), the same values downstream, so that each
    example's gradient stays separate. So is an output of one ``[1, ...]`` table for the batch
    computed from its data without a gradient (BART's decoder positions, from the shape of its
    ``[B, T]`` tokens). B is the leading dimension of the model's first tensor argument; a
    shared tensor whose leading dimension happens to equal B cannot be told apart. Other shared
    calls (DoRA calls its adapters on an identity to form their matrix) are left as they are,
    and a gradient reaching one is an error naming every such unit of the pass. A call on the
    examples' data whose leading dimension is a multiple ``B·k`` of the batch's (OPT's
    ``[B·T, n]`` feed-forward rows, Swin's windows) is captured as ``[B, k, ...]``, its rows
    taken as the examples' one block after the other
    (:mod:`~source_callback.analysis.capture_check` refuses a model where they are not).

    No parameter gradient is formed: while capturing, every parameter of the model is frozen,
    and the output of a unit's call that then needs no gradient (no unit before it; grad mode
    on) is replaced by a copy that does. The backward pass reaches every unit's output as
    before, but skips the weight-gradient products and every module before the first unit
    (the frozen base of a model with adapters). The parameters are unfrozen on exit.
    """

    def __init__(self, model: nn.Module, units: dict[str, Unit], on_grads: OnGrads) -> None:
        self.model = model
        self.units = units
        self.on_grads = on_grads
        self.inputs: dict[str, list[tuple[int, Side]]] = {}
        self._calls: dict[str, int] = {}
        self._pending: dict[str, list[Factored]] = {}
        self._handles: list[Any] = []
        self._batch = 1
        self._shared_outputs: weakref.WeakValueDictionary[int, torch.Tensor] = (
            weakref.WeakValueDictionary()
        )
        self._finite = RowFlags()
        self._broadcast_units: set[str] = set()
        self._unseparable: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._frozen: list[nn.Parameter] = []

    def _batch_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        first = next(
            (x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor) and x.ndim), None
        )
        self._batch = 1 if first is None else first.shape[0]

    def _shared(self, x: Any) -> bool:
        """Whether ``x`` is a tensor whose leading dimension is not the batch's."""
        return isinstance(x, torch.Tensor) and (not x.ndim or x.shape[0] != self._batch)

    def _broadcast(self, x: Any, prepend: bool) -> Any:
        """A shared tensor expanded to the batch (a batch dimension prepended first).

        Without ``prepend`` only a leading dimension of 1 is expanded; another (BART's position
        ids ``[T]`` beside its decoder's ``[B, T]`` tokens) is left as it is.
        """
        if not self._shared(x) or (not prepend and x.shape[0] != 1):
            return x
        if prepend:
            x = x[None]
        return x.expand(self._batch, *x.shape[1:])

    def _from_shared(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is the output of a unit's call shared by the batch (not broadcast)."""
        return self._shared_outputs.get(id(x)) is x

    def _rows(self, name: str, output: torch.Tensor) -> int:
        """Rows per example of a call on the examples' data not led by the batch.

        A call is on the examples' data when one of its tensors needs a gradient and is not a
        shared call's output (every parameter is frozen while capturing: only what a unit's
        output feeds does). Its leading dimension is taken as the batch's examples one block
        after the other: OPT's feed-forward rows ``[B·T, n]`` (``x.reshape(-1, n)`` of ``[B, T,
        n]``), Swin's windows ``[B·W, T, n]``. Another order (a sequence-first ``[T, B, n]``) is
        not told apart here: :mod:`~source_callback.analysis.capture_check` refuses it before
        the first pass. A leading dimension that is no multiple of the batch's is an error.
        """
        if output.ndim > 1 and output.shape[0] % self._batch == 0:
            return output.shape[0] // self._batch
        raise AnalysisError(
            f"unit {name!r} is called on a tensor of shape {tuple(output.shape)} computed from "
            f"the examples, whose leading dimension is no multiple of the batch's "
            f"({self._batch}): its rows cannot be assigned to examples; leave it out with "
            f"modules={{'exclude': [{name!r}]}}."
        )

    def _by_example(self, x: Any, rows: int | None) -> Any:
        """``x`` (a tensor, a tuple or a dict of them) with ``[B·rows, ...]`` as ``[B, rows, ...]``.

        Unchanged when ``rows`` is None or a tensor's leading dimension is another.
        """
        if rows is None:
            return x
        if isinstance(x, tuple):
            return tuple(self._by_example(v, rows) for v in x)
        if isinstance(x, dict):
            return {k: self._by_example(v, rows) for k, v in x.items()}
        if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == self._batch * rows:
            return x.reshape(self._batch, rows, *x.shape[1:])
        return x

    @staticmethod
    def _broadcastable(use: Use, output: torch.Tensor) -> bool:
        """Whether a call shared by the batch may be expanded to it, shapes downstream unchanged.

        So may an output with a leading dimension of 1, and an embedding table's ``[T, dim]``
        rows (added to ``[B, T, dim]`` activations). Other shared calls (DoRA computing its
        adapter's matrix by calling it on an identity) stay as they are.
        """
        one = output.ndim > 0 and output.shape[0] == 1
        return one or (isinstance(use.kind, EmbeddingKind) and output.ndim == 2)

    def _reached_shared(self, name: str, use: Use, output: torch.Tensor) -> None:
        self._unseparable.setdefault(name, (use.name, tuple(output.shape)))

    def _raise_unseparable(self) -> None:
        """Name every unit a gradient reached through a shared output in the last pass."""
        if not self._unseparable:
            return
        calls = "; ".join(
            (f"unit {name!r}" if module == name else f"module {module!r} of unit {name!r}")
            + f" (output {shape})"
            for name, (module, shape) in sorted(self._unseparable.items())
        )
        names = sorted(self._unseparable)
        self._unseparable.clear()
        one = len(names) == 1
        raise AnalysisError(
            f"{calls} {'is' if one else 'are'} called on tensors shared by the batch (not led "
            f"by the batch's {self._batch} examples) and {'its' if one else 'their'} output "
            f"reaches the loss, so each example's gradient through "
            f"{'it' if one else 'them'} cannot be separated; leave {'it' if one else 'them'} "
            f"out with modules={{'exclude': {names!r}}}."
        )

    def _forward_hook(self, name: str, index: int) -> Callable[..., None]:
        use = self.units[name].uses[index]

        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> torch.Tensor | None:
            if is_replaying():
                return None
            if not isinstance(output, torch.Tensor):
                raise AnalysisError(
                    f"module {use.name!r} of unit {name!r} returns a {type(output).__name__}, "
                    "not a tensor, so its gradient cannot be captured; leave it out with "
                    f"modules={{'exclude': [{name!r}]}}."
                )
            tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
            rows, shared = None, self._shared(output)
            if shared and any(x.requires_grad and not self._from_shared(x) for x in tensors):
                rows, shared = self._rows(name, output), False
            led_by_one = output.ndim > 0 and output.shape[0] == 1
            if (
                shared
                and (led_by_one or all(map(self._shared, tensors)))
                and self._broadcastable(use, output)
            ):
                prepend = not led_by_one
                args = tuple(self._broadcast(x, prepend) for x in args)
                kwargs = {k: self._broadcast(v, prepend) for k, v in kwargs.items()}
                output, shared = self._broadcast(output, prepend), False
                self._broadcast_units.add(name)
            if not output.requires_grad and torch.is_grad_enabled():
                # a copy (not the leaf itself), so that the model may still modify it in place
                output = output.detach().requires_grad_().clone()
            if shared:
                self._shared_outputs[id(output)] = output
            if rows is not None:  # the examples' rows one block after the other: [B, k, ...]
                args, kwargs = self._by_example(args, rows), self._by_example(kwargs, rows)
            data = use.kind.capture(module, args, kwargs)
            known = use.inputs(data)
            side = None
            if known is not None:
                self.inputs.setdefault(name, []).append(known)
                side = known[1]
            if output.requires_grad and shared:  # no gradient expected: none is waited for
                output.register_hook(lambda grad: self._reached_shared(name, use, output))
            elif output.requires_grad:
                self._calls[name] = self._calls.get(name, 0) + 1
                output.register_hook(
                    lambda grad: self._arrive(
                        name, use.factored(data, side, self._by_example(grad, rows))
                    )
                )
            return output

        return hook

    def _arrive(self, name: str, part: Factored) -> None:
        for side in part.sides:
            self._finite.add(side.values)
        pending = self._pending.setdefault(name, [])
        pending.append(part)
        if len(pending) == self._calls[name]:
            self.on_grads(name, self._pending.pop(name))

    def reset(self) -> None:
        """Forget the last forward pass."""
        self.inputs.clear()
        self._calls.clear()
        self._pending.clear()
        self._finite.flags.clear()
        self._shared_outputs.clear()
        self._broadcast_units.clear()
        self._unseparable.clear()

    def backward(self, value: torch.Tensor, retain_graph: bool = False) -> None:
        """``value.backward()``, then hand over the gradients of uses that are still waiting.

        Raises :class:`~source_callback.errors.NonFiniteError` for the first example whose
        gradient holds a NaN or infinity (see :mod:`~source_callback.analysis.finite`). A
        ``value`` that no unit's output reaches has no gradient to hand over.
        """
        if value.requires_grad:
            value.backward(retain_graph=retain_graph)
        self._raise_unseparable()
        for name in list(self._pending):
            self.on_grads(name, self._pending.pop(name))
        self._finite.check("gradient")

    def __enter__(self) -> Capture:
        self._frozen = [p for p in self.model.parameters() if p.requires_grad]
        for param in self._frozen:
            param.requires_grad_(False)
        self._handles.append(
            self.model.register_forward_pre_hook(self._batch_hook, with_kwargs=True)
        )
        for name, unit in self.units.items():
            for index, use in enumerate(unit.uses):
                self._handles.append(
                    use.module.register_forward_hook(
                        self._forward_hook(name, index), with_kwargs=True
                    )
                )
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: object) -> None:
        broadcast = sorted(self._broadcast_units)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param in self._frozen:
            param.requires_grad_(True)
        self._frozen.clear()
        self.reset()
        memory = isinstance(error, torch.OutOfMemoryError)
        if isinstance(error, RuntimeError) and not memory and broadcast:
            raise AnalysisError(
                f"the model failed ({error}) while it ran on outputs of {listed(broadcast, 5)} "
                "that the analysis expanded to the batch (they are shared by its examples, and "
                "each example's gradient through them is kept apart that way). If that broke it "
                "(a model that combines them with other than the batch's examples, as Swin's "
                "windows), leave them out with "
                f"modules={{'exclude': {broadcast[:5]!r}}}."
            ) from error


def dense_sum(parts: list[Factored]) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(examples, Σ_uses G)``: the summed dense gradients, a chunk of examples at a time."""
    for rows in parts[0].slices():
        yield rows, sum(part[rows].dense() for part in parts)  # type: ignore[misc]


def _backward_each(capture: Capture, losses: torch.Tensor) -> Iterator[None]:
    """Backpropagate each row of ``[K, B]`` losses (summed over the batch) in turn."""
    for k in range(losses.shape[0]):
        capture.backward(losses[k].sum(), retain_graph=k + 1 < losses.shape[0])
        yield


def pseudo_passes(
    model: nn.Module,
    capture: Capture,
    task: Any,
    batches: Iterable[Any],
    generator: torch.Generator,
    exact: bool,
) -> Iterator[int]:
    """Run the pseudo-gradient backward passes of every batch; yield each batch's size.

    ``capture.inputs`` holds the batch's input sides when it is yielded.
    """
    for batch in batches:
        capture.reset()
        if exact:
            losses = task.exact_pseudo_losses(model, batch)
        else:
            losses = task.pseudo_loss(model, batch, generator)[None]
        for _ in _backward_each(capture, losses):
            pass
        yield losses.shape[1]


@dataclass
class Covariances:
    """Running sums of the two Kronecker factors (per example, tokens summed) and the count.

    ``a`` is the columns' side (``a aᵀ``), ``s`` the rows' (``s sᵀ``); ``None`` for an identity
    side.
    """

    a: torch.Tensor | None
    s: torch.Tensor | None
    count: int = 0

    def mean(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(E[a aᵀ], E[s sᵀ])`` per example."""
        return tuple(None if f is None else f / self.count for f in (self.a, self.s))  # type: ignore[return-value]

    def rescale(self, factor: RankOne) -> None:
        """Scale in place to the factors of each token's sides scaled by ``factor``.

        ``c cᵀ ∘ a`` and ``r rᵀ ∘ s``, as a row and a column scaling: no ``[n, n]`` temporary.
        """
        for f, v in ((self.a, factor.cols), (self.s, factor.rows)):
            if f is not None:
                v = v.to(f)
                f.mul_(v[:, None]).mul_(v)

    def add_side(self, axis: int, side: Side) -> None:
        """Add ``Σ_{b,t} x xᵀ`` of a side to the rows' (0) or the columns' (1) factor."""
        if axis == 0:
            self.s = side.add_covariance(self.s)
        else:
            self.a = side.add_covariance(self.a)

    def add(self, axis: int, value: torch.Tensor) -> None:
        """Add to the rows' (0) or the columns' (1) factor.

        The first ``value`` becomes the sum itself (later ones are added in place): it must be a
        tensor nothing else holds.
        """
        if axis == 0:
            self.s = value if self.s is None else self.s.add_(value)
        else:
            self.a = value if self.a is None else self.a.add_(value)


def per_example(parts: list[Factored]) -> torch.Tensor:
    """Per-example gradients summed over a unit's uses: ``[B, out, in]`` (float64)."""
    return torch.cat([total for _, total in dense_sum(parts)]).double()


def covariances(
    model: nn.Module,
    units: dict[str, Unit],
    task: Any,
    batches: Iterable[Any],
    generator: torch.Generator,
    exact: bool = False,
    scale: dict[str, Scale] | None = None,
) -> dict[str, Covariances]:
    """One pass over ``batches``: the two Kronecker factors per unit (float64).

    A batch's products are formed in the precision of its captured gradients (see
    :mod:`~source_callback.analysis.units`), and summed over batches in float64.

    Without ``scale``: per-example ``E[a aᵀ]`` and ``E[s sᵀ]`` (tokens summed), each use adding
    its own factors in the unit's layout (a tied parameter sums them over its uses). With
    ``scale`` (an ``[out, in]`` matrix per unit, e.g. Adam's ``P^{1/2}``): ``E[G'ᵀG']`` and
    ``E[G'G'ᵀ]`` of the scaled per-example pseudo-gradients ``G' = scale ∘ G`` (``G`` summed
    over uses). A factored scale ``r cᵀ`` (:class:`RankOne`) keeps the Kronecker structure:
    the factors are those of each token's scaled sides, ``c cᵀ ∘ E[a aᵀ]`` and
    ``r rᵀ ∘ E[s sᵀ]``. Identity sides are skipped (``None``).
    """
    sums = {name: Covariances(None, None) for name in units}
    dense_scale = {
        name: matrix for name, matrix in (scale or {}).items() if isinstance(matrix, torch.Tensor)
    }

    def on_grads(name: str, parts: list[Factored]) -> None:
        dense = [not flag for flag in units[name].identity]
        if name not in dense_scale:
            for part in parts:
                if part.known is not None and dense[1 - part.known]:
                    sums[name].add_side(1 - part.known, part.sides[1 - part.known])
            return
        for _, g in dense_sum(parts):
            g = g * dense_scale[name].to(g.dtype)
            if dense[0]:
                sums[name].add(0, torch.einsum("boi,bpi->op", g, g).double())
            if dense[1]:
                sums[name].add(1, torch.einsum("boi,boj->ij", g, g).double())

    with Capture(model, units, on_grads) as capture:
        for size in pseudo_passes(model, capture, task, batches, generator, exact):
            for name in units:
                if name not in dense_scale:
                    for axis, side in capture.inputs.get(name, []):
                        if not units[name].identity[axis]:
                            sums[name].add_side(axis, side)
                sums[name].count += size
    for name, factor in (scale or {}).items():
        if isinstance(factor, RankOne) and name in sums:
            sums[name].rescale(factor)
    return sums


def corrected_eigenvalues(
    model: nn.Module,
    units: dict[str, Unit],
    bases: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]],
    task: Any,
    batches: Iterable[Any],
    generator: torch.Generator,
    exact: bool = False,
    scale: dict[str, Scale] | None = None,
) -> dict[str, torch.Tensor]:
    """One pass: ``Λ[i, j] = E_z[(Q_Sᵀ G'_z Q_A)_ij²]`` per unit in the given bases.

    ``bases[name]`` is ``(Q_A, Q_S)`` (``None``: identity). ``G'`` is the per-example gradient
    summed over the unit's uses, times ``scale`` when given (see :func:`covariances`). In exact
    mode each of the K backward passes contributes its own squared rotated gradient. The
    rotations are made in the precision of the captured gradients (the bases cast to it), the
    squares summed in float64.
    """
    sums: dict[str, torch.Tensor] = {}
    cast: dict[tuple[str, torch.dtype], tuple[torch.Tensor | None, ...]] = {}

    def on_grads(name: str, parts: list[Factored]) -> None:
        dtype = parts[0].dtype
        if (name, dtype) not in cast:  # once per pass, not per batch (lm_head's is 4096²)
            cast[name, dtype] = tuple(None if q is None else q.to(dtype) for q in bases[name])
        q_a, q_s = cast[name, dtype]
        matrix, parts = _unscaled(None if scale is None else scale[name], parts)
        joined = None
        if matrix is None and all(part.rotate_sides_first(q_s, q_a) for part in parts):
            # Σ_tok (Q_Sᵀ s)(Q_Aᵀ a)ᵀ: rotating each factor first, then one batched product,
            # is 4-10x faster than the four-operand einsum (benchmarks/speed.py) where it takes
            # fewer products than rotating G; a one-hot side adds up only the tokens present.
            # A tied parameter's uses add up as one sum over all their tokens.
            joined = Factored.joined([part.rotated(q_s, q_a) for part in parts])
        if joined is not None:
            total = joined.squares()
        else:
            total = 0
            for _, g in dense_sum(parts):
                if matrix is not None:
                    g = g * matrix.to(g.dtype)
                if q_s is not None:
                    g = q_s.T @ g
                if q_a is not None:
                    g = g @ q_a
                total = total + g.square_().sum(0).double()
        sums[name] = sums[name].add_(total) if name in sums else total

    count = 0
    with Capture(model, units, on_grads) as capture:
        for size in pseudo_passes(model, capture, task, batches, generator, exact):
            count += size
    return {name: sums[name] / count for name in sums}


def eigh_float64(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric matrix in float64 (symmetrised first)."""
    matrix = matrix.double()
    return torch.linalg.eigh((matrix + matrix.T) / 2)


def _square(q: torch.Tensor | None) -> torch.Tensor | None:
    return None if q is None else q.square()


def _sandwich(
    left: torch.Tensor | None, matrix: torch.Tensor, right: torch.Tensor | None
) -> torch.Tensor:
    """``leftᵀ · matrix · right`` over the last two axes (``None``: identity)."""
    if left is not None:
        matrix = left.T @ matrix
    if right is not None:
        matrix = matrix @ right
    return matrix


@dataclass
class ModuleCurvature:
    """EK-FAC of one unit: ``H ≈ (Q_A ⊗ Q_S) diag(Λ) (Q_A ⊗ Q_S)ᵀ`` on ``[out, in]`` matrices.

    ``q_a`` (columns) or ``q_s`` (rows) is ``None`` for an identity side.
    """

    q_a: torch.Tensor | None
    q_s: torch.Tensor | None
    eigenvalues: torch.Tensor  # [out, in]

    def apply(
        self, matrix: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``f(H) · vec(matrix)`` for a function ``fn`` of the eigenvalues, as ``[out, in]``."""
        return self.apply_each(matrix, [fn])[0]

    def apply_each(
        self, matrix: torch.Tensor, fns: Sequence[Callable[[torch.Tensor], torch.Tensor]]
    ) -> list[torch.Tensor]:
        """:meth:`apply` of each of ``fns``, ``matrix`` rotated into the eigenbasis once."""
        rotated = _sandwich(self.q_s, matrix.to(self.eigenvalues.dtype), self.q_a)
        q_s, q_a = (None if q is None else q.T for q in (self.q_s, self.q_a))
        return [_sandwich(q_s, fn(self.eigenvalues) * rotated, q_a) for fn in fns]

    def diagonal(self) -> torch.Tensor:
        """Diagonal of ``H`` as ``[out, in]``: ``(Q_S∘Q_S) Λ (Q_A∘Q_A)ᵀ``."""
        q_s, q_a = _square(self.q_s), _square(self.q_a)
        return _sandwich(
            None if q_s is None else q_s.T, self.eigenvalues, None if q_a is None else q_a.T
        )

    def in_basis(self, matrix: torch.Tensor) -> torch.Tensor:
        """Diagonal of ``diag(vec matrix)`` in the eigenbasis: ``(Q_S∘Q_S)ᵀ M (Q_A∘Q_A)``."""
        return _sandwich(_square(self.q_s), matrix.to(self.eigenvalues.dtype), _square(self.q_a))

    def dense(self) -> torch.Tensor:
        """The full matrix over row-major ``vec([out, in])`` (small modules only: tests)."""
        out, in_ = self.eigenvalues.shape
        dtype = self.eigenvalues.dtype
        q_s = torch.eye(out, dtype=dtype) if self.q_s is None else self.q_s
        q_a = torch.eye(in_, dtype=dtype) if self.q_a is None else self.q_a
        basis = torch.kron(
            q_s.contiguous(), q_a.contiguous()
        )  # row-major vec(Q_S X Q_Aᵀ) = (Q_S ⊗ Q_A) vec(X)
        return basis @ torch.diag(self.eigenvalues.reshape(-1)) @ basis.T
