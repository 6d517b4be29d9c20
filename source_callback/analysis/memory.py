"""Memory known before work: what an analysis will hold on its device, checked before any pass.

Per unit with an ``[out, in]`` gradient matrix, in float64 (8 bytes):

- **factors**, per segment (every segment's operator is kept for the sweep): the dense sides'
  eigenvectors ``[in, in]`` and ``[out, out]`` (the sums they come from are as large, counted
  once), the corrected eigenvalues ``[out, in]`` and, for Adam, ``P^{1/2}`` ``[out, in]``;
- **query-side vectors** ``[Q, out, in]``: the query gradients, and per segment the response
  ``v`` and the arrival ``u`` the sweep returns;
- the **per-example chunks** of gradients a contraction forms (``units.CHUNK_ELEMENTS``), and
  the model's parameters with their gradients.

The limit is the device's free memory (CUDA) or the machine's RAM (CPU), or the environment
variable ``SOURCE_CALLBACK_MEMORY_LIMIT`` (bytes, or with a ``K``/``M``/``G``/``T`` suffix,
``KiB``... meaning the same powers of 1024), e.g. to leave room for other work.

Besides, scoring into the store holds checkpoints' states on the CPU, within
:data:`HELD_STATES_SHARE` of the machine's memory (:func:`states_held`).

What fits may still take long: a dense side of ``n`` costs an eigendecomposition of ``n³`` per
segment, and :func:`warn_large_sides` says so before any pass for sides over
:data:`LARGE_SIDE` (a language model's output layer over its vocabulary).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from source_callback.analysis import units as units_module
from source_callback.analysis.units import Unit
from source_callback.errors import AnalysisError

ENV_LIMIT = "SOURCE_CALLBACK_MEMORY_LIMIT"
FLOAT = 8  # float64
_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
#: Share of the machine's memory (its RAM, or ``SOURCE_CALLBACK_MEMORY_LIMIT``) that the states
#: of checkpoints held together on the CPU may take (:func:`states_held`).
HELD_STATES_SHARE = 0.25


#: Dense sides longer than this are warned of (:func:`warn_large_sides`).
LARGE_SIDE = 16384


def warn_large_sides(units: Mapping[str, Unit], plan: Plan) -> None:
    """Warn of every unit with a dense side over :data:`LARGE_SIDE`: its cost and the options.

    Its factor is a dense float64 ``[n, n]`` matrix eigendecomposed once per segment, at
    ``(n / 4096)³`` times the cost of a 4,096 side: a 32,000-token output layer takes about
    two hours per segment on two CPU cores (a 4,000 side took 15 s there).
    """
    for unit in units.values():
        side = max(_dense_sides(unit, None), default=0)
        if side <= LARGE_SIDE:
            continue
        warnings.warn(
            f"unit {unit.name!r} [{unit.shape[0]:,}, {unit.shape[1]:,}] has a dense side of "
            f"{side:,}: its factor is a {side:,} x {side:,} float64 matrix "
            f"({_gib(FLOAT * side * side)}), eigendecomposed once per segment ({plan.segments} "
            f"here) at {(side / 4096) ** 3:.0f}x the cost of a 4,096 side (hours on a CPU). "
            f"To give sides longer than {LARGE_SIDE:,} an identity eigenbasis, pass "
            f"diagonal_above={LARGE_SIDE}; to leave the unit out, "
            f"modules={{'exclude': [{unit.name!r}]}}.",
            stacklevel=4,
        )


def _gib(size: float) -> str:
    return f"{size / 2**30:.3g} GiB"


@dataclass(frozen=True)
class Plan:
    """What an analysis holds: the query count, segments, and the model's own bytes."""

    queries: int
    segments: int
    model_bytes: int


def _dense_sides(unit: Unit, diagonal_above: int | None) -> list[int]:
    sides = zip(unit.shape, unit.identity, strict=True)
    return [
        size
        for size, identity in sides
        if not identity and (diagonal_above is None or size <= diagonal_above)
    ]


def factor_bytes(unit: Unit, plan: Plan, diagonal_above: int | None = None) -> int:
    """Bytes of a unit's curvature over all segments (see the module docstring)."""
    squares = sum(size * size for size in _dense_sides(unit, diagonal_above))
    return FLOAT * (plan.segments * (squares + 2 * unit.size) + squares)


def query_bytes(unit: Unit, plan: Plan) -> int:
    """Bytes of a unit's query-side vectors: the gradients, and ``u``, ``v`` per segment."""
    return FLOAT * plan.queries * unit.size * (1 + 2 * plan.segments)


def unit_bytes(unit: Unit, plan: Plan, diagonal_above: int | None = None) -> int:
    """Everything a unit holds."""
    return factor_bytes(unit, plan, diagonal_above) + query_bytes(unit, plan)


def fixed_bytes(plan: Plan) -> int:
    """What does not depend on the units.

    The per-example chunks (and one intermediate of their size), the model and its gradients.
    """
    return 2 * FLOAT * units_module.CHUNK_ELEMENTS + 2 * plan.model_bytes


def estimate(units: Mapping[str, Unit], plan: Plan, diagonal_above: int | None = None) -> int:
    """Total bytes the analysis is expected to hold on its device."""
    held = sum(unit_bytes(u, plan, diagonal_above) for u in units.values())
    return held + fixed_bytes(plan)


def parse_size(text: str) -> int:
    """``"3000000"``, ``"2G"``, ``"512MiB"`` as bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"{ENV_LIMIT}={text!r} is not a size such as 2000000000 or 2GiB")
    return int(float(match.group(1)) * _SUFFIX[match.group(2).upper()])


def available(device: torch.device) -> int:
    """Bytes the analysis may use on ``device`` (see the module docstring)."""
    limit = os.environ.get(ENV_LIMIT)
    if limit:
        return parse_size(limit)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def states_held(state_bytes: int, count: int) -> int:
    """How many of ``count`` states of ``state_bytes`` each may be held on the CPU together.

    As many as fit in :data:`HELD_STATES_SHARE` of the machine's memory, at least one: scoring
    into the store applies them all to each block of training examples before writing it
    (:meth:`~source_callback.analysis.engine.Engine.scores`), instead of reading every block
    back once per state.
    """
    budget = int(available(torch.device("cpu")) * HELD_STATES_SHARE)
    return max(1, min(count, budget // max(state_bytes, 1)))


def _options(units: Mapping[str, Unit], plan: Plan, limit: int) -> list[str]:
    """The changes of settings that would fit, with their estimates."""
    options = []
    by_size = sorted(units, key=lambda n: -unit_bytes(units[n], plan))
    kept = dict(units)
    for count, name in enumerate(by_size, start=1):
        del kept[name]
        if kept and estimate(kept, plan) <= limit:
            patterns = by_size[:count]
            options.append(
                f"leave out {patterns} with modules={{'exclude': {patterns}}} "
                f"({_gib(estimate(kept, plan))})"
            )
            break
    sides = sorted({s for u in units.values() for s in _dense_sides(u, None)}, reverse=True)
    for threshold in [*sides[1:], 0]:
        if estimate(units, plan, threshold) <= limit:
            options.append(
                f"diagonal_above={threshold} (identity eigenbasis for larger sides; "
                f"{_gib(estimate(units, plan, threshold))})"
            )
            break
    per_query = sum(query_bytes(u, Plan(1, plan.segments, 0)) for u in units.values())
    rest = estimate(units, Plan(0, plan.segments, plan.model_bytes))
    fitting = (limit - rest) // per_query if per_query else 0
    if 0 < fitting < plan.queries:
        options.append(f"at most {fitting} queries per call (split the queries)")
    return options


def check(units: Mapping[str, Unit], plan: Plan, device: torch.device) -> int:
    """The estimate, after checking that it fits the limit.

    Raises
    ------
    AnalysisError
        It does not fit; the message names the largest units and the options that fit.
    """
    total = estimate(units, plan)
    limit = available(device)
    if total <= limit:
        return total
    largest = sorted(units.values(), key=lambda u: -unit_bytes(u, plan))[:3]
    shown = "; ".join(
        f"{u.name!r} [{u.shape[0]}, {u.shape[1]}]: factors {_gib(factor_bytes(u, plan))}, "
        f"query vectors {_gib(query_bytes(u, plan))}"
        for u in largest
    )
    options = _options(units, plan, limit)
    raise AnalysisError(
        f"the analysis would hold about {_gib(total)} on {device}, more than the "
        f"{_gib(limit)} available ({plan.queries} queries, {plan.segments} segments). "
        f"Largest units: {shown}. "
        + (
            f"Options that fit: {'; or '.join(options)}."
            if options
            else "No single change of settings fits: use a device with more memory."
        )
        + f" ({ENV_LIMIT} overrides the available memory.)"
    )
