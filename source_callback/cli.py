"""The ``source-callback`` command line: ``inspect`` summarizes a record, ``report`` writes HTML."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import torch

from source_callback.describe import batch_label, optimizer_label, stage_span
from source_callback.errors import SourceCallbackError
from source_callback.manifest import Manifest
from source_callback.store.reader import Checkpoint, Run, open_run
from source_callback.store.schema import Stage

PROG = "source-callback"
EXIT_FAILURE = 1  # the command could not do its job
EXIT_USAGE = 2  # bad arguments (argparse's status)


# -- formatting helpers ----------------------------------------------------------------------


def format_bytes(size: float) -> str:
    """A byte count for people, in binary units.

    Parameters
    ----------
    size
        Number of bytes.

    Returns
    -------
    str
        E.g. ``"512 B"``, ``"1.5 KiB"``, ``"3.0 GiB"``.

    Examples
    --------
    >>> format_bytes(512)
    '512 B'
    >>> format_bytes(1536)
    '1.5 KiB'

    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  "
) -> list[str]:
    """Left-aligned columns, two spaces apart, under a header line."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    return [
        indent + "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in (headers, *rows)
    ]


def _itemsize(dtype: str) -> int:
    """Bytes per element of a manifest dtype such as ``torch.float32`` (0 when unknown)."""
    kind = getattr(torch, dtype.removeprefix("torch."), None)
    return kind.itemsize if isinstance(kind, torch.dtype) else 0


# -- sections --------------------------------------------------------------------------------


def _header_lines(run: Run, disk_size: int | None) -> list[str]:
    """Store URL, format version, status, library versions and size on disk."""
    versions = ", ".join(f"{k} {v}" for k, v in run.library_versions.items()) or "unknown"
    size = "unknown" if disk_size is None else format_bytes(disk_size)
    return [
        f"store           {run.url}",
        f"format version  {run.format_version}",
        f"status          {run.status}",
        f"libraries       {versions}",
        f"size on disk    {size}",
    ]


def _manifest_lines(manifest: Manifest) -> list[str]:
    """Number, element count and size of the model's parameters and buffers."""
    lines = []
    for kind in ("parameter", "buffer"):
        entries = [e for e in manifest if e["kind"] == kind]
        numel = sum(int(np.prod(e["shape"], dtype=np.int64)) for e in entries)
        nbytes = sum(
            int(np.prod(e["shape"], dtype=np.int64)) * _itemsize(e["dtype"]) for e in entries
        )
        label = f"{kind}s"
        lines.append(
            f"  {label:<10}  {len(entries)} tensors, {numel:,} values, {format_bytes(nbytes)}"
        )
    return ["model", *lines]


def _stage_lines(stages: Sequence[Stage], stage_column: np.ndarray) -> list[str]:
    """One table row per stage."""
    headers = (
        "#",
        "name",
        "status",
        "first..last",
        "steps",
        "examples",
        "batch x accum x world",
        "precision",
        "optimizer",
        "trainable/frozen",
    )
    rows = []
    for stage in stages:
        span, count = stage_span(stage, stage_column)
        examples = "?" if stage.num_examples is None else f"{stage.num_examples:,}"
        rows.append(
            (
                str(stage.index),
                stage.name,
                stage.status,
                span,
                str(count),
                examples,
                batch_label(stage),
                stage.precision,
                optimizer_label(stage),
                f"{len(stage.trainable)}/{len(stage.frozen)}",
            )
        )
    return [f"stages ({len(stages)})", *(_format_table(headers, rows) if rows else [])]


def _lr_range(values: np.ndarray) -> str:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return "not recorded"
    first, last, low, high = values[0], values[-1], values.min(), values.max()
    if low == high:
        return f"{first:.4g} (constant)"
    return f"{first:.4g} -> {last:.4g} (min {low:.4g}, max {high:.4g})"


def _learning_rate_lines(
    stages: Sequence[Stage], stage_column: np.ndarray, learning_rates: np.ndarray
) -> list[str]:
    """First, last, min and max learning rate per stage and parameter group."""
    lines = ["learning rates"]
    for stage in stages:
        lr = learning_rates[stage_column == stage.index]
        for group in range(max(len(stage.optimizer.groups), 1)):
            column = lr[:, group] if group < lr.shape[1] else np.empty(0)
            lines.append(f"  {stage.name}  group {group}: {_lr_range(column)}")
    return lines if stages else [*lines, "  none recorded"]


def _checkpoint_lines(checkpoints: Sequence[Checkpoint], stages: Sequence[Stage]) -> list[str]:
    """One table row per checkpoint, then a warning naming the uncommitted ones."""
    names = {s.index: s.name for s in stages}
    rows = [
        (
            str(c.step),
            names.get(c.stage, str(c.stage)),
            c.role,
            "yes" if c.committed else "NO",
            format_bytes(c.nbytes()),
        )
        for c in checkpoints
    ]
    committed = sum(c.committed for c in checkpoints)
    lines = [f"checkpoints ({len(checkpoints)}, {committed} committed)"]
    if rows:
        lines += _format_table(("step", "stage", "role", "committed", "size (uncompressed)"), rows)
    uncommitted = [c.key for c in checkpoints if not c.committed]
    if uncommitted:
        lines.append(
            f"warning: {len(uncommitted)} uncommitted checkpoint(s) (interrupted writes, "
            f"incomplete data): {', '.join(uncommitted)}"
        )
    return lines


def store_size(url: str, storage_options: dict[str, Any] | None = None) -> int | None:
    """Total size of a store's files as stored (compressed).

    Parameters
    ----------
    url
        Local path or fsspec URL of the store.
    storage_options
        fsspec options for URLs.

    Returns
    -------
    int or None
        Bytes, or ``None`` when the filesystem cannot tell (the summary then says ``unknown``).
        On object stores this lists every object: one request per thousand objects on S3.

    """
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        return int(fs.du(path, total=True))
    except Exception:  # size is a nicety: never fail the summary for it
        return None


def summarize(run: Run, storage_options: dict[str, Any] | None = None) -> str:
    """The human-readable summary of a recorded run that ``inspect`` prints.

    Parameters
    ----------
    run
        The run, from :func:`source_callback.open_run`.
    storage_options
        The fsspec options the run was opened with (used to measure its size).

    Returns
    -------
    str
        Several sections separated by blank lines: store, model, stages, learning rates and
        checkpoints.

    """
    steps = run.steps()  # empty until the first block of steps is written
    stage_column = steps.get("stage", np.empty(0, dtype=np.int32))
    learning_rates = steps.get("lr", np.empty((0, 0)))
    stages = run.stages
    sections = [_header_lines(run, store_size(run.url, storage_options))]
    if run.status != "complete":
        sections[0].append(
            "warning: the store is still recording, or its last stage was interrupted"
        )
    sections += [
        _manifest_lines(run.manifest),
        _stage_lines(stages, stage_column),
        _learning_rate_lines(stages, stage_column, learning_rates),
        _checkpoint_lines(run.checkpoints, stages),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections)


# -- command line ----------------------------------------------------------------------------


def parse_storage_options(pairs: Sequence[str]) -> dict[str, Any] | None:
    """``KEY=VALUE`` pairs as fsspec options; values are parsed as JSON when they can be.

    Parameters
    ----------
    pairs
        The ``--storage-option`` arguments.

    Returns
    -------
    dict or None
        The options, or ``None`` when there are none.

    Raises
    ------
    ValueError
        A pair has no ``=`` or an empty key.

    Examples
    --------
    >>> parse_storage_options(["anon=true", "endpoint_url=http://localhost:9000"])
    {'anon': True, 'endpoint_url': 'http://localhost:9000'}

    """
    if not pairs:
        return None
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"storage option {pair!r} is not of the form KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", metavar="STORE", help="local path or fsspec URL of the store")
    parser.add_argument(
        "--storage-option",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec option for URLs (repeatable), e.g. endpoint_url=http://localhost:9000; "
        "VALUE is read as JSON when it parses (true, 3, ...), else as a string",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def data_function(spec: str) -> tuple[str, str]:
    """The ``(module, function)`` named by ``--data MODULE:FUNCTION``.

    Parameters
    ----------
    spec
        E.g. ``"mydata:training_sets"``.

    Returns
    -------
    tuple of str
        Module and function name.

    Raises
    ------
    argparse.ArgumentTypeError
        ``spec`` is not of the form ``MODULE:FUNCTION``.

    """
    module, _, function = spec.partition(":")
    if not module or not function:
        raise argparse.ArgumentTypeError(f"expected MODULE:FUNCTION, got {spec!r}")
    return module, function


def load_datasets(module_name: str, function_name: str) -> Mapping[str, Any]:
    """Import the user's module and call its function that returns the training datasets.

    Only ever called for ``--data``: user code runs when the user names it, never otherwise.

    Parameters
    ----------
    module_name
        Importable from the working directory or ``sys.path``, e.g. ``mydata`` or
        ``project.data``.
    function_name
        A function of that module, called without arguments.

    Returns
    -------
    Mapping
        ``{stage name: dataset}`` as the function returned it.

    Raises
    ------
    ValueError
        The module cannot be imported, has no such function, or it returned no mapping.

    """
    spec = f"{module_name}:{function_name}"
    cwd = os.getcwd()
    sys.path.insert(0, cwd)  # as ``python -m`` would, for a module beside the user
    try:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"--data {spec}: cannot import {module_name!r}: {error}") from error
        function = getattr(module, function_name, None)
        if not callable(function):
            raise ValueError(f"--data {spec}: {module_name!r} has no function {function_name!r}")
        datasets = function()
    finally:
        sys.path.remove(cwd)
    if not isinstance(datasets, Mapping):
        raise ValueError(
            f"--data {spec} returned {type(datasets).__name__}, not a mapping "
            "{stage name: dataset}"
        )
    return datasets


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``source-callback`` command.

    Returns
    -------
    argparse.ArgumentParser
        A parser with the subcommands ``inspect`` and ``report``; each sets ``run``, the
        function that carries it out.

    """
    from source_callback import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect and report on source-callback training records."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect",
        help="summarize a recorded run",
        description="Print a summary of a recorded run: stages, steps, optimizers, checkpoints.",
    )
    _add_store_arguments(inspect)
    inspect.set_defaults(run=_run_inspect)
    report = commands.add_parser(
        "report",
        help="write an HTML report of a run and an analysis",
        description="Write one self-contained HTML page: stages, learning-rate schedule and "
        "loss curve, and with --analysis the stage effects, score distributions and top "
        "training examples per query (by stage and index; with --data, shown).",
    )
    _add_store_arguments(report)
    report.add_argument(
        "--analysis", metavar="NAME", help="a stored analysis to include (analyze(name=...))"
    )
    report.add_argument(
        "--out", default="report.html", metavar="PATH", help="HTML file to write (report.html)"
    )
    report.add_argument(
        "--queries",
        nargs="+",
        type=int,
        metavar="Q",
        help="queries whose top examples are listed (default: the first three)",
    )
    report.add_argument(
        "--top",
        type=_positive_int,
        default=5,
        metavar="K",
        help="examples listed per query and side (5)",
    )
    report.add_argument(
        "--data",
        type=data_function,
        metavar="MODULE:FUNCTION",
        help="show the top examples themselves: imports MODULE (from the working directory "
        "or sys.path) and calls FUNCTION(), which returns {stage name: training dataset}. "
        "This runs your code; nothing is imported unless you name it",
    )
    report.set_defaults(run=_run_report)
    return parser


def _run_inspect(args: argparse.Namespace, storage_options: dict[str, Any] | None) -> None:
    """Open the store and print its summary to standard output."""
    run = open_run(args.store, storage_options=storage_options)
    print(summarize(run, storage_options))


def _run_report(args: argparse.Namespace, storage_options: dict[str, Any] | None) -> None:
    """Write the HTML report and say where."""
    from source_callback.report import write_report  # matplotlib, only when reporting

    path = write_report(
        args.store,
        args.out,
        analysis=args.analysis,
        examples=None if args.data is None else load_datasets(*args.data),
        queries=args.queries,
        top=args.top,
        storage_options=storage_options,
    )
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    """Run the ``source-callback`` command line.

    Parameters
    ----------
    argv
        Arguments without the program name; ``sys.argv[1:]`` when ``None``.

    Returns
    -------
    int
        Exit status: 0 on success, 1 when the command fails (a store that cannot be read, an
        unknown analysis: one line on standard error), 2 on a usage error.

    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        try:
            options = parse_storage_options(args.storage_option)
        except ValueError as error:
            parser.error(str(error))
        if args.command == "report" and args.analysis is None and (args.queries or args.data):
            parser.error("report: --queries and --data need --analysis NAME")
    except SystemExit as exit_:  # --help, --version and usage errors
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        args.run(args, options)
    except (SourceCallbackError, OSError, ValueError, KeyError) as error:
        # A KeyError's str() is its message in quotes.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_FAILURE
    return 0
