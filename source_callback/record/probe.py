"""The probe: the training loss of a few fixed examples, recorded with every checkpoint.

The analysis recomputes these losses with the model, data and task it is given; a difference
beyond float noise means one of them is not what was trained (``analysis.probes``). This module
holds the framework-free part: which examples, and how a computation leaves the random number
generators as it found them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from source_callback.store import schema


class ProbeUnavailable(Exception):
    """The training framework cannot give the probe's losses; the message says why."""


#: Examples per stage whose training loss every checkpoint records.
PROBE_SIZE = 8
#: Seed of the choice of probed examples, and of the generators while their losses are computed.
PROBE_SEED = 0


def probe_indices(num_examples: int, size: int = PROBE_SIZE) -> list[int]:
    """The probed examples of a training set of ``num_examples``: fixed, seeded, sorted."""
    rng = np.random.default_rng(PROBE_SEED)
    chosen = rng.choice(num_examples, size=min(size, num_examples), replace=False)
    return sorted(int(i) for i in chosen)


@contextmanager
def preserved_rng(seed: int = PROBE_SEED) -> Iterator[None]:
    """Run the block with Python's, numpy's and torch's generators seeded, then restore them.

    Training that computes a probe draws the same random numbers as training that does not,
    and any randomness in the probe's own computation is the same at every checkpoint.
    """
    python, numpy_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def probing(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, the generators and buffers preserved; the modes restored after.

    Training that computes a probe continues exactly as it would have without it: a training
    step may update buffers (a batch counter, a running average), whose values are put back,
    and modules sharded with FSDP2 are resharded (a root module keeps its parameters gathered
    after a forward pass: training's next forward would then skip the gather that the other
    ranks make, and the model would show its gathered parameters rather than its shards).
    """
    modes = [(m, m.training) for m in module.modules()]
    buffers = [(name, b, b.clone()) for name, b in module.named_buffers()]
    module.eval()
    try:
        with torch.no_grad(), preserved_rng():
            yield
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for name, original, value in buffers:
                original.copy_(value)
                owner, _, attribute = name.rpartition(".")
                setattr(module.get_submodule(owner), attribute, original)
        _reshard(module)


def _reshard(module: torch.nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 module in ``module`` (a local operation)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()


def probe_tensors(indices: Sequence[int], losses: Sequence[float]) -> dict[str, torch.Tensor]:
    """The probe section of a checkpoint: indices (int64) and losses (float64)."""
    return {
        schema.PROBE_INDEX: torch.tensor(list(indices), dtype=torch.int64),
        schema.PROBE_LOSS: torch.tensor(list(losses), dtype=torch.float64),
    }
