"""Helpers for tests that train in subprocesses (crash and DDP tests)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).parent / "scripts"

_DISTRIBUTED = (
    "LOCAL_RANK",
    "NODE_RANK",
    "GLOBAL_RANK",
    "GROUP_RANK",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PL_GLOBAL_SEED",
    "PL_TRAINER_DEVICES",
    "SLURM_NTASKS",
    "SLURM_JOB_ID",
    "CUDA_VISIBLE_DEVICES",
)


def load_script(path: Path) -> ModuleType:
    """Import a script under ``tests/scripts`` as a module (to share its model and data)."""
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def subprocess_env() -> dict[str, str]:
    """The test's environment minus any distributed settings, pinned to loopback, one thread.

    One thread gives the same arithmetic as reference runs made in the test process.
    """
    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED}
    env.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONWARNINGS": "ignore::DeprecationWarning",
        }
    )
    return env
