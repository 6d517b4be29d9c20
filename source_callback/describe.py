"""Short descriptions of a recorded stage and plain-text tables, shared by the commands.

Used by ``inspect``, ``report`` and the summary ``analyze`` prints.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from source_callback.store.schema import Stage


def stage_span(stage: Stage, stage_column: np.ndarray) -> tuple[str, int]:
    """``first..last`` global steps of a stage and its number of recorded steps.

    Parameters
    ----------
    stage
        The stage.
    stage_column
        The stage index of every recorded step (``Run.steps()``).

    Returns
    -------
    span, count
        E.g. ``("0..11", 12)``; an interrupted stage's span ends with ``(interrupted)``.

    """
    count = int(np.count_nonzero(stage_column == stage.index))
    if stage.last_step is not None:
        return f"{stage.first_step}..{stage.last_step}", count
    last = stage.first_step + count - 1
    return f"{stage.first_step}..{last if count else '?'} (interrupted)", count


def optimizer_label(stage: Stage) -> str:
    """The stage's optimizer: class name, update rule and kind of weight decay.

    Parameters
    ----------
    stage
        The stage.

    Returns
    -------
    str
        E.g. ``"SGD (sgd-momentum, wd none)"``.

    """
    opt = stage.optimizer
    short_class = opt.class_name.rsplit(".", 1)[-1]
    return f"{short_class} ({opt.update_rule.value}, wd {opt.weight_decay.value})"


def batch_label(stage: Stage) -> str:
    """Per-process batch size × accumulated batches × processes, e.g. ``"8 x 1 x 1"``.

    Parameters
    ----------
    stage
        The stage.

    Returns
    -------
    str
        ``?`` stands for a batch size that was not recorded.

    """
    batch = "?" if stage.batch_size is None else str(stage.batch_size)
    return f"{batch} x {stage.accumulate_grad_batches} x {stage.world_size}"


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  "
) -> list[str]:
    """Left-aligned columns, two spaces apart, under a header line.

    Parameters
    ----------
    headers
        The column titles.
    rows
        The cells, as many per row as ``headers``.
    indent
        Put before every line.

    Returns
    -------
    list of str
        The header line, then one line per row, without trailing spaces.

    """
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    return [
        indent + "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in (headers, *rows)
    ]
