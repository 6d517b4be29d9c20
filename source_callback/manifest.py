"""A model's manifest: the names, kinds, shapes and dtypes of its parameters and buffers.

Recording stores it once per run; later stages and the analysis compare their model with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def model_manifest(module: torch.nn.Module) -> Manifest:
    """Names, kinds (``parameter``/``buffer``), shapes and dtypes of ``module``'s tensors."""
    return [
        {"name": name, "kind": kind, "shape": list(t.shape), "dtype": str(t.dtype)}
        for kind, items in (
            ("parameter", module.named_parameters()),
            ("buffer", persistent_buffers(module).items()),
        )
        for name, t in items
    ]


def manifest_differences(
    recorded: Sequence[Mapping[str, Any]], current: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Human-readable differences between two manifests (empty when they match)."""
    old = {e["name"]: e for e in recorded}
    new = {e["name"]: e for e in current}
    problems = [f"missing {name}" for name in old.keys() - new.keys()]
    problems += [f"unexpected {name}" for name in new.keys() - old.keys()]
    for name in old.keys() & new.keys():
        for key in ("kind", "shape", "dtype"):
            if old[name][key] != new[name][key]:
                problems.append(f"{name}: {key} {old[name][key]} recorded, {new[name][key]} now")
    return sorted(problems)
