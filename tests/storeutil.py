"""Helpers to compare stores on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from source_callback import Run


def tree_digest(root: str | Path) -> dict[str, str]:
    """Hash of every file under ``root`` by relative path (to prove nothing changed)."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_same_record(run: Run, ref: Run) -> None:
    """``run`` holds what ``ref`` does: stages, step rows, committed checkpoints and probes."""
    assert run.stages == ref.stages
    steps, ref_steps = run.steps(), ref.steps()
    assert steps.keys() == ref_steps.keys()
    for name in steps:
        np.testing.assert_allclose(steps[name], ref_steps[name], rtol=1e-6, err_msg=name)
    assert [c.key for c in run.checkpoints] == [c.key for c in ref.checkpoints]
    for ours, theirs in zip(run.checkpoints, ref.checkpoints, strict=True):
        assert ours.committed
        for name, tensor in theirs.params().items():
            torch.testing.assert_close(ours.params()[name], tensor)
        state = ours.optimizer_state()
        assert state.keys() == theirs.optimizer_state().keys()
        for name, values in theirs.optimizer_state().items():
            for key, value in values.items():
                torch.testing.assert_close(state[name][key], value)
        # the probe continues on the same examples, with the same losses
        (indices, losses), (ref_indices, ref_losses) = ours.probe(), theirs.probe()
        np.testing.assert_array_equal(indices, ref_indices)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
