"""Which optimizer steps of a stage get a checkpoint."""

from __future__ import annotations

import math


def interior_steps(estimated_steps: float, checkpoints_per_stage: int) -> list[int]:
    """Stage-local steps of the interior checkpoints.

    The stage is cut into ``checkpoints_per_stage`` equal parts; a checkpoint is taken at the
    start of every part but the first (the first is the stage-start checkpoint, and the end of
    the last part is the stage-end checkpoint). A checkpoint at local step ``t`` holds the
    parameters *before* step ``t``.

    Parameters
    ----------
    estimated_steps
        Optimizer steps the stage is expected to take (``trainer.estimated_stepping_batches``);
        ``inf`` when unbounded, which plans no interior checkpoints.
    checkpoints_per_stage
        Number of equal parts; ``1`` plans only the stage-start and stage-end checkpoints.

    Examples
    --------
    >>> interior_steps(60, 6)
    [10, 20, 30, 40, 50]
    >>> interior_steps(3, 6)
    [1, 2]

    """
    if not math.isfinite(estimated_steps) or estimated_steps <= 1:
        return []
    total = int(estimated_steps)
    steps = {round(k * total / checkpoints_per_stage) for k in range(1, checkpoints_per_stage)}
    return sorted(s for s in steps if 0 < s < total)
