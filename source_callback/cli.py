"""The ``source-callback`` command line: ``inspect``, ``verify``, ``analyze``, ``report``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tomllib
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import fsspec
import numpy as np
import torch

from source_callback import AnalysisOptions, AnalysisResult, Task, analyze
from source_callback.analysis.options import option_names
from source_callback.describe import batch_label, format_table, optimizer_label, stage_span
from source_callback.errors import DamagedStoreError, SourceCallbackError
from source_callback.manifest import Manifest
from source_callback.store.analyses import StoredAnalysis
from source_callback.store.reader import Checkpoint, Run, open_run
from source_callback.store.schema import (
    INFO_CONFIG,
    INFO_CREATED,
    STEP_LR,
    STEP_SCALE,
    STEP_STAGE,
    Stage,
)

PROG = "source-callback"
EXIT_FAILURE = 1  # the command could not do its job
EXIT_USAGE = 2  # bad arguments (argparse's status)
EXIT_DAMAGED = 3  # verify found damage


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


SHOWN_CHANGES = 5  # renamed, added and dropped tensors listed per stage by ``inspect``


def _listed(label: str, names: Sequence[str]) -> list[str]:
    """``label`` and the first names, one a line, then how many more."""
    more = len(names) - SHOWN_CHANGES
    lines = [f"      {label if i == 0 else '':<8} {n}" for i, n in enumerate(names[:SHOWN_CHANGES])]
    return lines + ([f"      {'':<8} ... {more} more"] if more > 0 else [])


def _model_change_lines(run: Run) -> list[str]:
    """Per stage that changed the model: how its tensors continue the previous stage's."""
    lines = []
    for index, change in run.model_changes().items():
        lines.append(f"  {index} {run.stages[index].name}: {change.summary()}")
        lines += _listed("renamed", [f"{old} -> {new} ({by})" for old, new, by in change.renamed])
        lines += _listed("added", change.added)
        lines += _listed("dropped", change.dropped)
    return ["model changes between stages", *lines] if lines else []


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
    unprobed = [
        f"  no probe in stage {stage.name!r}: {stage.probe} (analyze and retrain cannot check "
        "that the model and data they are given reproduce its training loss)"
        for stage in stages
        if stage.probe is not None
    ]
    return [f"stages ({len(stages)})", *(format_table(headers, rows) if rows else []), *unprobed]


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


def _scale_lines(
    stages: Sequence[Stage], stage_column: np.ndarray, scales: np.ndarray | None
) -> list[str]:
    """Per stage, its steps' gradient scales other than 1 (``scale`` in the step rows).

    Scaled (clipping, a short accumulation window), skipped (fp16's loss scaler), or scaled by
    an unknown factor; no lines where every step is 1.
    """
    if scales is None or np.all(scales == 1):
        return []
    lines = ["gradient scales (the steps' scale column; 1 elsewhere)"]
    for stage in stages:
        column = scales[stage_column == stage.index]
        scaled = column[(column > 0) & (column != 1)]
        parts = []
        if len(scaled):
            parts.append(f"{len(scaled)} scaled ({scaled.min():.3g} to {scaled.max():.3g})")
        if (skipped := int((column == 0).sum())) > 0:
            parts.append(f"{skipped} skipped (fp16's loss scaler)")
        if (unknown := int(np.isnan(column).sum())) > 0:
            parts.append(f"{unknown} by an unknown factor (analyzed as 1)")
        lines.append(f"  {stage.name}  {', '.join(parts) or 'none'} of {len(column)} steps")
    return lines


def _size(checkpoint: Checkpoint) -> str:
    """The checkpoint's size, or what keeps it from being read (``verify`` says more)."""
    try:
        return format_bytes(checkpoint.nbytes())
    except ValueError:  # an array's metadata is not JSON: damage that verify names
        return "unreadable"


def _checkpoint_lines(checkpoints: Sequence[Checkpoint], stages: Sequence[Stage]) -> list[str]:
    """One table row per checkpoint, then a warning naming the uncommitted ones."""
    names = {s.index: s.name for s in stages}
    rows = [
        (
            str(c.step),
            names.get(c.stage, str(c.stage)),
            c.role,
            "yes" if c.committed else "NO",
            _size(c),
        )
        for c in checkpoints
    ]
    committed = sum(c.committed for c in checkpoints)
    lines = [
        f"checkpoints ({len(checkpoints)}, {committed} committed); contents not checked here: "
        f"{PROG} verify STORE checks them"
    ]
    if rows:
        lines += format_table(("step", "stage", "role", "committed", "size (uncompressed)"), rows)
    uncommitted = [c.key for c in checkpoints if not c.committed]
    if uncommitted:
        lines.append(
            f"warning: {len(uncommitted)} uncommitted checkpoint(s) (interrupted writes, "
            f"incomplete data): {', '.join(uncommitted)}"
        )
    return lines


def _analysis_lines(analyses: Sequence[StoredAnalysis]) -> list[str]:
    """One row per stored analysis: method, when, queries, segments, cache and status."""
    rows = []
    for entry in analyses:
        config = entry.info.get(INFO_CONFIG, {})
        if entry.committed:
            status = "committed" + ("; a newer write was interrupted" if entry.writing else "")
        else:
            status = "never committed (interrupted)" if entry.writing else "empty"
        rows.append(
            (
                entry.name,
                str(config.get("method", "-")),
                str(entry.info.get(INFO_CREATED, "-")),
                str(entry.queries) if entry.committed else "-",
                str(len(config.get("segments", []))) if entry.committed else "-",
                "yes" if entry.cache else "no",
                status,
            )
        )
    headers = ("name", "method", "committed at", "queries", "segments", "cache", "status")
    return [f"analyses ({len(rows)})", *(format_table(headers, rows) if rows else ["  none"])]


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
        Several sections separated by blank lines: store, model (and its changes between
        stages), stages, learning rates, checkpoints and stored analyses.

    """
    sections = [_header_lines(run, store_size(run.url, storage_options))]
    try:
        steps = run.steps()  # empty until the first block of steps is written
    except DamagedStoreError as error:
        steps = {}
        sections[0].append(
            f"warning: the step rows are damaged ({error.problems[0]}), so the learning rates "
            f"are left out below; {PROG} verify STORE lists every problem"
        )
    stage_column = steps.get(STEP_STAGE, np.empty(0, dtype=np.int32))
    learning_rates = steps.get(STEP_LR, np.empty((0, 0)))
    stages = run.stages
    if run.status != "complete":
        sections[0].append(
            "warning: the store is still recording, or its last stage was interrupted"
        )
    sections += [
        _manifest_lines(run.manifest),
        *filter(None, [_model_change_lines(run)]),
        _stage_lines(stages, stage_column),
        _learning_rate_lines(stages, stage_column, learning_rates),
        *filter(None, [_scale_lines(stages, stage_column, steps.get(STEP_SCALE))]),
        _checkpoint_lines(run.checkpoints, stages),
        _analysis_lines(run.stored_analyses()),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections)


def verify_report(run: Run) -> tuple[list[str], bool]:
    """What ``source-callback verify`` prints: one line per problem, then a summary line.

    Parameters
    ----------
    run
        The run, from :func:`source_callback.open_run`.

    Returns
    -------
    lines, intact
        The lines, and whether no problem was found.

    """
    problems = run.verify()
    committed = sum(c.committed for c in run.checkpoints)
    try:
        stages = run.stages
    except DamagedStoreError:  # among the problems; what depends on them is not counted
        stages = []
    frozen = sum(bool(stage.frozen) for stage in stages)
    digested = sum(map(partial(_has_example_digests, run), range(len(stages))))
    checks = (
        "checked against their checksums and digests"
        if run.format_version > 1
        else "read back (format 1 recorded no checksums: only what fails to read is found)"
    )
    found = f"{len(problems)} problem(s)" if problems else "intact"
    skipped = len(run.checkpoints) - committed
    summary = (
        f"{run.url}: {found}: {committed} committed checkpoint(s), {frozen} frozen group(s), "
        f"{run.num_steps} step row(s) and the example digests of {digested} stage(s) {checks}"
        + (f"; {skipped} uncommitted checkpoint(s) skipped" if skipped else "")
    )
    return [f"damaged: {problem}" for problem in problems] + [summary], not problems


def _has_example_digests(run: Run, stage: int) -> bool:
    try:
        return run.example_digests(stage) is not None
    except DamagedStoreError:
        return True


SHOWN_QUERIES = 5  # queries whose stage effects ``analyze`` prints


def analysis_summary(result: AnalysisResult, store: str, name: str | None) -> str:
    """What ``source-callback analyze`` prints: the stage effects of the first queries.

    Parameters
    ----------
    result
        The analysis.
    store
        Where it was run.
    name
        The name it was stored under, or ``None`` when it was not stored.

    Returns
    -------
    str
        The method, numbers of queries and examples, a table of stage effects and where the
        result is stored.

    """
    queries = len(result.stage_effects)
    sizes = ", ".join(f"{n} ({result.scores[n].shape[1]:,} examples)" for n in result.stage_names)
    rows = [
        (str(q), *(f"{value:+.4g}" for value in result.stage_effects[q]))
        for q in range(min(queries, SHOWN_QUERIES))
    ]
    more = [f"  ... {queries - SHOWN_QUERIES} more"] if queries > SHOWN_QUERIES else []
    where = (
        "not stored (name null)"
        if name is None
        else f"stored in {store} under analyses/{name}; show it with: {PROG} report {store} "
        f"--analysis {name}"
    )
    return "\n".join(
        [
            f"{result.config['method']} analysis of {queries} queries; stages {sizes}",
            "stage effects (predicted change of each query's measurement without the stage):",
            *format_table(("query", *result.stage_names), rows),
            *more,
            where,
        ]
    )


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


def _device(text: str) -> torch.device:
    try:
        return torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def import_spec(spec: str) -> tuple[str, str]:
    """The ``(module, name)`` of a ``MODULE:NAME`` argument (``--data``, ``--module``).

    Parameters
    ----------
    spec
        E.g. ``"mydata:training_sets"`` or ``"project.models:Net"``.

    Returns
    -------
    tuple of str
        Module and attribute name.

    Raises
    ------
    argparse.ArgumentTypeError
        ``spec`` is not of the form ``MODULE:NAME``.

    """
    module, _, name = spec.partition(":")
    if not module or not name:
        raise argparse.ArgumentTypeError(
            f"expected MODULE:FUNCTION (or MODULE:CLASS), got {spec!r}"
        )
    return module, name


def call_user_code(spec: tuple[str, str], origin: str, **kwargs: Any) -> Any:
    """Import the user's module and call one of its functions or classes.

    Only ever called for code the user names (``--data``, ``--module``, the ``analyze``
    configuration): user code runs when the user asks for it, never otherwise.

    Parameters
    ----------
    spec
        Module and name, from :func:`import_spec`. The module is importable from the working
        directory or ``sys.path``, e.g. ``mydata`` or ``project.data``.
    origin
        Where the user named it, for messages: ``"--data"``, ``"config 'queries'"``, ...
    **kwargs
        Passed to the call.

    Returns
    -------
    Any
        What the call returned.

    Raises
    ------
    ValueError
        The module cannot be imported, has no such callable, or refuses the keyword arguments.

    """
    module_name, name = spec
    label = f"{origin} {module_name}:{name}"
    cwd = os.getcwd()
    sys.path.insert(0, cwd)  # as ``python -m`` would, for a module beside the user
    try:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"{label}: cannot import {module_name!r}: {error}") from error
        function = getattr(module, name, None)
        if not callable(function):
            raise ValueError(f"{label}: {module_name!r} has no function or class {name!r}")
        try:
            return function(**kwargs)
        except TypeError as error:  # most often keyword arguments it does not take
            raise ValueError(f"{label}: calling it with {kwargs} failed: {error}") from error
    finally:
        sys.path.remove(cwd)


def load_datasets(
    module_name: str, function_name: str, origin: str = "--data"
) -> Mapping[str, Any]:
    """Import the user's module and call its function that returns the training datasets.

    Parameters
    ----------
    module_name
        Importable from the working directory or ``sys.path``.
    function_name
        A function of that module, called without arguments.
    origin
        Where the user named it, for messages.

    Returns
    -------
    Mapping
        ``{stage name: dataset}`` as the function returned it.

    Raises
    ------
    ValueError
        The module cannot be imported, has no such function, or it returned no mapping.

    """
    datasets = call_user_code((module_name, function_name), origin)
    if not isinstance(datasets, Mapping):
        raise ValueError(
            f"{origin} {module_name}:{function_name} returned {type(datasets).__name__}, not a "
            "mapping {stage name: dataset}"
        )
    return datasets


#: Keys an ``analyze`` configuration file must have.
CONFIG_REQUIRED = ("task", "data", "queries")
#: Keys it may have besides those and the fields of :class:`~source_callback.AnalysisOptions`.
CONFIG_OPTIONAL = ("model_kwargs", "name", "collate_fn")


def read_analyze_config(path: str) -> tuple[dict[str, Any], AnalysisOptions]:
    """The configuration of ``source-callback analyze``: a JSON file, or TOML (``.toml``).

    Parameters
    ----------
    path
        The file. It holds ``task`` (a built-in task name, or ``MODULE:NAME`` called without
        arguments to make a :class:`~source_callback.Task`), ``data`` (``MODULE:FUNCTION``
        returning ``{stage name: training dataset}``), ``queries`` (``MODULE:FUNCTION``
        returning the query dataset), optionally ``model_kwargs`` (keyword arguments of the
        model's constructor), ``name`` (of the stored analysis, ``"default"``; ``null``: not
        stored), ``collate_fn`` (``MODULE:FUNCTION`` returning the function that collates
        examples into batches, e.g. a Hugging Face Trainer's ``data_collator``, or a mapping
        from every stage's name to its own) and any fields
        of :class:`~source_callback.AnalysisOptions`, by their names.

    Returns
    -------
    config, options
        The keys that are no analysis options, and the options (checked by
        :meth:`AnalysisOptions.from_json <source_callback.AnalysisOptions.from_json>`).

    Raises
    ------
    ValueError
        The file does not parse, is not a table, lacks or has unknown keys, or a value has the
        wrong type or is out of range.
    OSError
        The file cannot be read.

    """
    with open(path, "rb") as file:
        content = file.read()
    try:
        config = tomllib.loads(content.decode()) if path.endswith(".toml") else json.loads(content)
    except (ValueError, UnicodeDecodeError) as error:  # JSON and TOML decode errors
        raise ValueError(f"config {path}: cannot parse it: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"config {path}: expected a table of settings, got {config!r}")
    missing = [key for key in CONFIG_REQUIRED if key not in config]
    if missing:
        raise ValueError(
            f"config {path}: missing key(s) {', '.join(missing)} (needs task, data and queries)"
        )
    known = (*CONFIG_REQUIRED, *CONFIG_OPTIONAL, *option_names())
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(
            f"config {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )
    wrong = [key for key in CONFIG_REQUIRED if not isinstance(config[key], str)]
    if not isinstance(config.get("model_kwargs", {}), dict):
        wrong.append("model_kwargs")
    if not isinstance(config.get("name", ""), str | None):
        wrong.append("name")
    if not isinstance(config.get("collate_fn", ""), str):
        wrong.append("collate_fn")
    if wrong:
        raise ValueError(
            f"config {path}: {', '.join(wrong)} must be text (task, data, queries, name, "
            "collate_fn) or a table (model_kwargs)"
        )
    settings = {key: config.pop(key) for key in option_names() if key in config}
    try:
        return config, AnalysisOptions.from_json(settings)
    except ValueError as error:
        raise ValueError(f"config {path}: {error}") from error


def _config_spec(config: Mapping[str, Any], key: str) -> tuple[str, str]:
    """The ``MODULE:NAME`` that configuration ``key`` holds."""
    try:
        return import_spec(config[key])
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"config {key!r}: {error}") from error


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``source-callback`` command.

    Returns
    -------
    argparse.ArgumentParser
        A parser with the subcommands ``inspect``, ``verify``, ``analyze`` and ``report``;
        each sets ``run``, the function that carries it out (returning an exit status or
        ``None`` for 0).

    """
    from source_callback import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect, analyze and report on source-callback training records."
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
    verify = commands.add_parser(
        "verify",
        help="check a record for damage",
        description="Read every committed checkpoint, frozen group, step row and stage's example "
        "digests and check them against the checksums and digests recorded with them (a store "
        "of format 1 recorded none: only what fails to read is found). Prints one line per "
        "problem, naming the checkpoint or record and the tensors affected, "
        f"and a summary; exits with {EXIT_DAMAGED} when anything is damaged.",
    )
    _add_store_arguments(verify)
    verify.set_defaults(run=_run_verify)
    analyze_ = commands.add_parser(
        "analyze",
        help="attribute queries to training examples and stages, into the store",
        description="Run analyze() on a record and store the result under analyses/NAME: the "
        "model is built by --module MODULE:CLASS, everything else comes from --config (JSON, "
        "or TOML for a .toml file): task (a built-in name, or MODULE:NAME), data "
        "(MODULE:FUNCTION returning {stage name: training dataset}), queries (MODULE:FUNCTION "
        "returning the query dataset), optionally model_kwargs, name (of the stored analysis), "
        "collate_fn (MODULE:FUNCTION returning the collate function, e.g. a Hugging Face "
        "Trainer's data_collator, or {stage name: collate function}) and the analysis "
        "options (AnalysisOptions' fields): "
        f"{', '.join(option_names())}. "
        "This imports and runs your code: the modules named there and in --module, from the "
        "working directory or sys.path.",
    )
    _add_store_arguments(analyze_)
    analyze_.add_argument(
        "--module",
        required=True,
        type=import_spec,
        metavar="MODULE:CLASS",
        help="the trained architecture: CLASS(**model_kwargs) builds it (weights come from the "
        "store)",
    )
    analyze_.add_argument(
        "--config", required=True, metavar="PATH", help="the analysis settings (JSON or TOML)"
    )
    analyze_.add_argument(
        "--device", default="cpu", type=_device, help="where to compute, e.g. cuda (cpu)"
    )
    analyze_.add_argument("--quiet", action="store_true", help="no progress bars")
    analyze_.set_defaults(run=_run_analyze)
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
        type=import_spec,
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


def _run_verify(args: argparse.Namespace, storage_options: dict[str, Any] | None) -> int:
    """Verify the store, print the problems and the summary; the exit status."""
    lines, intact = verify_report(open_run(args.store, storage_options=storage_options))
    print("\n".join(lines))
    return 0 if intact else EXIT_DAMAGED


def _run_analyze(args: argparse.Namespace, storage_options: dict[str, Any] | None) -> None:
    """Build the model and data from the user's code, analyze, and print a summary."""
    config, options = read_analyze_config(args.config)
    model = call_user_code(args.module, "--module", **config.get("model_kwargs", {}))
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--module built a {type(model).__name__}, not a torch.nn.Module")
    task = config["task"]
    if ":" in task:
        task = call_user_code(_config_spec(config, "task"), "config 'task'")
        if not isinstance(task, Task):
            raise ValueError(f"config 'task' made a {type(task).__name__}, not a Task")
    name = config.get("name", "default")
    collate_fn = None
    if "collate_fn" in config:
        collate_fn = call_user_code(_config_spec(config, "collate_fn"), "config 'collate_fn'")
        if not (callable(collate_fn) or isinstance(collate_fn, Mapping)):
            raise ValueError(
                f"config 'collate_fn' made a {type(collate_fn).__name__}, not a function (or "
                "a mapping from stage names to functions)"
            )
    result = analyze(
        args.store,
        model=model.to(args.device),
        task=task,
        train=load_datasets(*_config_spec(config, "data"), origin="config 'data'"),
        queries=call_user_code(_config_spec(config, "queries"), "config 'queries'"),
        storage_options=storage_options,
        collate_fn=collate_fn,
        name=name,
        verbose=not args.quiet,
        options=options,
    )
    print(analysis_summary(result, args.store, name))


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
        unknown analysis, user code that cannot be imported, a bad configuration: one line on
        standard error), 2 on a usage error, 3 when ``verify`` found damage.

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
        status = args.run(args, options)
    except (SourceCallbackError, OSError, ValueError, TypeError, KeyError) as error:
        # A KeyError's str() is its message in quotes.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_FAILURE
    return status or 0
