"""What an optimizer's hyperparameters and state mean for SOURCE.

Recording uses this module to describe the optimizer and pick the state to save; analysis reads
the same description back. It depends on neither side.
"""

from __future__ import annotations

import math
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

    def scale(self, params: list[torch.Tensor]) -> float:
        """The factor clipping scales this step's gradients of ``params`` by.

        1 where clipping does not change them; ``limit / (norm + 1e-6)`` (torch's) where it
        clips the gradients' norm, seen before clipping; NaN where it changed them by a factor
        not known here (clipping by value, or norm clipping seen after it happened: a clipped
        step's norm is then at least ``limit² / (limit + 1e-6)``, and one within 1e-4 of that,
        for rounding, counts as clipped). Every process of a sharded run must call it: the
        norm of sharded gradients is reduced across them.
        """
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
        return min(1.0, self.limit / (total + 1e-6))


def _reduced(value: torch.Tensor) -> float:
    """A reduction of (possibly sharded: DTensor) gradients as a number, over all processes."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)
