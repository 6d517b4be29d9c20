"""What an optimizer's hyperparameters and state mean for SOURCE.

Recording uses this module to describe the optimizer and pick the state to save; analysis reads
the same description back. It depends on neither side.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch


class UpdateRule(StrEnum):
    """The update rule the analysis assumes (SOURCE-math §4)."""

    SGD = "sgd"
    SGD_MOMENTUM = "sgd-momentum"
    ADAM = "adam"
    ADAMW = "adamw"
    UNKNOWN = "unknown"


class WeightDecay(StrEnum):
    """How weight decay enters the update."""

    NONE = "none"
    COUPLED = "coupled"  # added to the gradient (L2): H̃ = H + λI
    DECOUPLED = "decoupled"  # applied to the parameters directly (AdamW)


#: Optimizer state the analysis needs, per update rule.
STATE_KEYS: dict[UpdateRule, tuple[str, ...]] = {
    UpdateRule.SGD: (),
    UpdateRule.SGD_MOMENTUM: ("momentum_buffer",),
    UpdateRule.ADAM: ("exp_avg_sq", "max_exp_avg_sq", "step"),
    UpdateRule.ADAMW: ("exp_avg_sq", "max_exp_avg_sq", "step"),
    UpdateRule.UNKNOWN: (),
}

_SCALAR_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class ParamGroupRecord:
    """One parameter group: its hyperparameters at fit start and its parameters' names."""

    hyperparameters: dict[str, Any]
    params: list[str]


@dataclass(frozen=True)
class OptimizerRecord:
    """An optimizer as the analysis sees it.

    Attributes
    ----------
    class_name
        Fully qualified class name, e.g. ``torch.optim.adamw.AdamW``.
    update_rule
        The update rule the analysis will assume.
    weight_decay
        How weight decay enters the update (``none`` when every group has zero decay).
    groups
        Per parameter group: hyperparameters at fit start and parameter names.

    """

    class_name: str
    update_rule: UpdateRule
    weight_decay: WeightDecay
    groups: list[ParamGroupRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form stored in the record."""
        return {
            "class": self.class_name,
            "update_rule": self.update_rule.value,
            "weight_decay": self.weight_decay.value,
            "groups": [
                {"hyperparameters": g.hyperparameters, "params": g.params} for g in self.groups
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OptimizerRecord:
        """Inverse of :meth:`to_json`."""
        return cls(
            class_name=data["class"],
            update_rule=UpdateRule(data["update_rule"]),
            weight_decay=WeightDecay(data["weight_decay"]),
            groups=[
                ParamGroupRecord(g["hyperparameters"], list(g["params"])) for g in data["groups"]
            ],
        )


def _as_json_value(value: Any) -> Any:
    """A hyperparameter as JSON, or None when it has no meaningful JSON form."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, _SCALAR_TYPES) or value is None:
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _SCALAR_TYPES) for v in value):
        return list(value)
    if isinstance(value, (tuple, list)):
        converted = [_as_json_value(v) for v in value]
        return converted if all(v is not None for v in converted) else None
    return None


def classify(optimizer: torch.optim.Optimizer) -> tuple[UpdateRule, WeightDecay]:
    """The update rule and weight-decay kind of a PyTorch optimizer.

    Exact classes only: a subclass may change the update, so it counts as unknown.
    """
    groups = optimizer.param_groups
    has_decay = any(float(g.get("weight_decay", 0.0)) != 0.0 for g in groups)
    kind = type(optimizer)
    if kind is torch.optim.SGD:
        momentum = any(float(g.get("momentum", 0.0)) != 0.0 for g in groups)
        rule = UpdateRule.SGD_MOMENTUM if momentum else UpdateRule.SGD
        return rule, WeightDecay.COUPLED if has_decay else WeightDecay.NONE
    if kind is torch.optim.AdamW or (
        kind is torch.optim.Adam and any(g.get("decoupled_weight_decay", False) for g in groups)
    ):
        return UpdateRule.ADAMW, WeightDecay.DECOUPLED if has_decay else WeightDecay.NONE
    if kind is torch.optim.Adam:
        return UpdateRule.ADAM, WeightDecay.COUPLED if has_decay else WeightDecay.NONE
    return UpdateRule.UNKNOWN, WeightDecay.COUPLED if has_decay else WeightDecay.NONE


def describe_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> OptimizerRecord:
    """Describe ``optimizer``; ``names`` maps ``id(parameter)`` to the parameter's name."""
    rule, decay = classify(optimizer)
    groups = []
    for group in optimizer.param_groups:
        hyper = {}
        for key, value in group.items():
            if key == "params":
                continue
            converted = _as_json_value(value)
            if converted is not None or value is None:
                hyper[key] = converted
        params = [names.get(id(p), f"<unnamed:{i}>") for i, p in enumerate(group["params"])]
        groups.append(ParamGroupRecord(hyper, params))
    kind = type(optimizer)
    return OptimizerRecord(f"{kind.__module__}.{kind.__qualname__}", rule, decay, groups)


def optimizer_state_by_name(
    optimizer: torch.optim.Optimizer, names: dict[int, str], rule: UpdateRule
) -> dict[str, dict[str, torch.Tensor]]:
    """The state the analysis needs, as ``{state key: {parameter name: tensor}}``.

    Tensors are the optimizer's own (not copies); parameters without state yet are left out.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    keys = STATE_KEYS[rule]
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key in keys:
                value = state.get(key)
                if isinstance(value, torch.Tensor):
                    out.setdefault(key, {})[names[id(param)]] = value
    return out


@dataclass(frozen=True)
class GradientNorms:
    """The norms of some parameters' gradients at one moment.

    A framework whose callbacks see the gradients only after it clipped them (the Trainer's)
    needs them measured before: the factor clipping scaled a step by is then known, and checked
    against the clipped gradients (:meth:`GradientClipping.scale`).

    Attributes
    ----------
    params
        The parameters, in a fixed order.
    present
        The positions in ``params`` of those with a gradient.
    norms
        Their gradients' 2-norms, in that order (a float64 tensor on their device).
    rtol
        The relative rounding of a norm after the gradients are scaled in their own precision.
    """

    params: tuple[torch.Tensor, ...]
    present: tuple[int, ...]
    norms: torch.Tensor
    rtol: float

    @classmethod
    def of(cls, params: Sequence[torch.Tensor]) -> GradientNorms:
        """Measure the gradients of ``params`` now (fused reductions, no synchronisation)."""
        params = tuple(params)
        present = tuple(i for i, p in enumerate(params) if p.grad is not None)
        grads = [params[i].grad.detach() for i in present]
        if not grads:
            return cls(params, (), torch.zeros(0, dtype=torch.float64), 1e-4)
        # One kernel per device and dtype, as torch.nn.utils.get_total_norm computes them, but
        # summed in float64: gradients times a loss scale overflow a float32 sum of squares.
        measured = torch._foreach_norm(grads, 2, dtype=torch.float64)
        device = grads[0].device
        if any(g.device != device for g in grads):
            measured = [n.to(device) for n in measured]
        narrow = any(g.dtype.itemsize < 4 for g in grads)
        return cls(params, present, torch.stack(measured), 1e-2 if narrow else 1e-4)

    @functools.cached_property
    def values(self) -> list[float]:
        """The norms as numbers (one synchronisation, the first time)."""
        return self.norms.tolist()

    def divided_by(self, scale: float) -> GradientNorms:
        """These norms for the gradients divided by ``scale`` (a loss scale)."""
        return dataclasses.replace(self, norms=self.norms / scale)

    def total(self) -> float:
        """The 2-norm of all the gradients together (what clipping by norm compares)."""
        return math.sqrt(math.fsum(v * v for v in self.values))

    def scaled_by(self, before: GradientNorms, factor: float) -> bool:
        """Whether these gradients are ``before``'s, each scaled by ``factor`` within rounding.

        Both measure the same parameters. Those with a gradient must be the same in both (one
        that got its gradient later, after a backward pass measured before it ended, fails), and
        any change other than one factor for all (some gradients edited in between) fails.
        """
        rtol = max(self.rtol, before.rtol)
        return self.present == before.present and all(
            abs(a - factor * b) <= rtol * factor * b
            for a, b in zip(self.values, before.values, strict=True)
        )


@dataclass(frozen=True)
class GradientClipping:
    """How a framework clips a step's gradients before the optimizer steps.

    Attributes
    ----------
    limit
        The clipping threshold (Lightning's ``gradient_clip_val``, the Trainer's
        ``max_grad_norm``).
    kind
        ``"norm"`` (the gradients' total 2-norm scaled down to ``limit``) or ``"value"`` (each
        entry clamped to ``[-limit, limit]``).
    applied
        Whether the gradients seen are already clipped (a Trainer callback runs after the
        clipping; a Lightning callback before).
    """

    limit: float
    kind: str = "norm"
    applied: bool = False

    def factor(self, norm: float) -> float:
        """What clipping by norm scales gradients of total norm ``norm`` by (torch's rule)."""
        return min(1.0, self.limit / (norm + 1e-6))

    def scale(self, params: list[torch.Tensor], before: GradientNorms | None = None) -> float:
        """The factor clipping scales this step's gradients of ``params`` by.

        1 where clipping does not change them; ``limit / (norm + 1e-6)`` (torch's) where it
        clips the gradients' norm, seen before clipping. Seen after clipping, with ``before``
        (the gradients measured when the backward pass ended, divided by any loss scale): the
        factor every gradient was scaled by since, whatever scaled them, where one factor for
        all describes the change within rounding. NaN where clipping changed them by a factor
        not known here (clipping by value, or norm clipping seen after it happened without a
        ``before`` that one factor maps to the gradients now: a clipped step's norm is then at
        least ``limit² / (limit + 1e-6)``, and one within 1e-4 of that, for rounding, counts as
        clipped). Every process of a sharded run must call it: the norm of sharded gradients
        is reduced across them.
        """
        if self.applied and before is not None:
            now, norm = GradientNorms.of(before.params), before.total()
            rule = self.factor(norm) if self.kind == "norm" else 1.0
            measured = now.total() / norm if norm > 0 else 1.0
            for factor in (rule, measured):  # torch's exact value where it is the one
                if now.scaled_by(before, factor):
                    return factor
        grads = [p.grad.detach() for p in params if p.grad is not None]
        if not grads:
            return 1.0
        if self.kind == "value":
            largest = max(_reduced(g.abs().max()) for g in grads)
            changed = largest >= self.limit if self.applied else largest > self.limit
            return math.nan if changed else 1.0
        total = _reduced(torch.nn.utils.get_total_norm(grads))
        if self.applied:
            changed = total >= self.limit**2 / (self.limit + 1e-6) * (1 - 1e-4)
            return math.nan if changed else 1.0
        return self.factor(total)


def _reduced(value: torch.Tensor) -> float:
    """A reduction of (possibly sharded: DTensor) gradients as a number, over all processes."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)
