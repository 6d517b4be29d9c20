"""A model's manifest: the names, kinds, shapes and dtypes of its parameters and buffers.

Every stage records the manifest of the model it trains; the analysis compares its model with
the last stage's. A tensor reachable under several names (a tied ``lm_head``/input embedding) is
listed once, under the name ``named_parameters()`` gives it, with its other names as
``aliases``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

Manifest = list[dict[str, Any]]


def persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers that belong to the module's state (``state_dict``), by name.

    Non-persistent buffers (attention masks, rotary caches) are rebuilt by the module itself;
    they are neither recorded nor expected when a checkpoint is loaded back.
    """
    state = module.state_dict(keep_vars=True)
    return {name: b for name, b in module.named_buffers() if name in state}


def tensor_aliases(module: torch.nn.Module) -> dict[str, list[str]]:
    """Other names of tensors reachable under several names (tied weights), by first name.

    Example: ``{"transformer.wte.weight": ["lm_head.weight"]}`` for GPT-2.
    """
    state = module.state_dict(keep_vars=True)
    found: dict[int, list[str]] = {}
    named: Iterable[tuple[str, torch.Tensor]] = [
        *module.named_parameters(remove_duplicate=False),
        *((n, b) for n, b in module.named_buffers(remove_duplicate=False) if n in state),
    ]
    for name, tensor in named:
        found.setdefault(id(tensor), []).append(name)
    return {names[0]: names[1:] for names in found.values() if len(names) > 1}


def model_manifest(module: torch.nn.Module) -> Manifest:
    """Names, kinds (``parameter``/``buffer``), shapes, dtypes and aliases of the tensors."""
    aliases = tensor_aliases(module)
    return [
        {
            "name": name,
            "kind": kind,
            "shape": list(t.shape),
            "dtype": str(t.dtype),
            **({"aliases": aliases[name]} if name in aliases else {}),
        }
        for kind, items in (
            ("parameter", module.named_parameters()),
            ("buffer", persistent_buffers(module).items()),
        )
        for name, t in items
    ]


#: Floating dtypes a tensor recorded in 16 bits may be given in: its values load exactly.
WIDER = {
    "torch.bfloat16": ("torch.float32", "torch.float64"),
    "torch.float16": ("torch.float32", "torch.float64"),
}


def manifest_differences(
    recorded: Sequence[Mapping[str, Any]], current: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Human-readable differences between two manifests (empty when they match).

    A tensor recorded as a 16-bit float may be float32 or float64 now (a run trained in pure
    bfloat16, analyzed in float32): the recorded values are exact in it.
    """
    old = {e["name"]: e for e in recorded}
    new = {e["name"]: e for e in current}
    problems = [f"missing {name}" for name in old.keys() - new.keys()]
    problems += [f"unexpected {name}" for name in new.keys() - old.keys()]
    for name in old.keys() & new.keys():
        for key in ("kind", "shape", "dtype", "aliases"):
            before, now = old[name].get(key, []), new[name].get(key, [])
            widened = key == "dtype" and now in WIDER.get(before, ())
            if before != now and not widened:
                problems.append(f"{name}: {key} {before} recorded, {now} now")
    return sorted(problems)
