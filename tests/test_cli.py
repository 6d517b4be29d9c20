"""The ``source-callback`` ``inspect`` and ``analyze`` commands, in-process and as
``python -m source_callback``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import zarr
from models import TinyClassifier, loader, query_set, trainer, two_stage_sets

from source_callback import SourceCallback, analyze, load_analysis, open_run
from source_callback.cli import main, parse_storage_options
from source_callback.store.writer import StoreWriter


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _halve_every_4_steps(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)


def _adamw_two_groups(params: Any) -> torch.optim.Optimizer:
    weight, bias = params
    return torch.optim.AdamW(
        [{"params": [weight]}, {"params": [bias], "lr": 1e-3, "weight_decay": 0.0}],
        lr=1e-2,
        weight_decay=0.05,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two stages: SGD with momentum and a step schedule on the whole model (48 examples, 12
    steps), then AdamW with two param groups on the last layer only (40 examples, 5 steps)."""
    root = tmp_path_factory.mktemp("cli")
    path = root / "run.zarr"
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier(optimizer=_sgd, scheduler=_halve_every_4_steps)
    callback = SourceCallback(path, stage="pretrain", checkpoints_per_stage=2)
    data = two_stage_sets()
    trainer([callback], root, max_epochs=2).fit(model, loader(data["pretrain"]))
    model.net[0].requires_grad_(False)
    model.optimizer_factory, model.scheduler_factory = _adamw_two_groups, None
    callback.next_stage("finetune")
    trainer([callback], root, max_epochs=1).fit(model, loader(data["finetune"]))
    return path


def inspect(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["inspect", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_summarizes_the_run(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = inspect(capsys, str(store))
    assert (code, err) == (0, "")
    assert f"store           {store}" in out
    assert "format version  2" in out
    assert "status          complete" in out
    assert "torch " in out and "zarr " in out
    assert "parameters  4 tensors, 83 values, 332 B" in out
    assert "stages (2)" in out
    pretrain = next(line for line in out.splitlines() if "  pretrain  complete" in line)
    finetune = next(line for line in out.splitlines() if "  finetune  complete" in line)
    for cell in ("0..11", " 12 ", " 48 ", "8 x 1 x 1", "32-true", "SGD (sgd-momentum, wd none)"):
        assert cell in pretrain, cell
    assert "4/0" in pretrain
    for cell in ("12..16", " 5 ", " 40 ", "AdamW (adamw, wd decoupled)", "2/2"):
        assert cell in finetune, cell
    assert "pretrain  group 0: 0.1 -> 0.025 (min 0.025, max 0.1)" in out
    assert "finetune  group 0: 0.01 (constant)" in out
    assert "finetune  group 1: 0.001 (constant)" in out
    assert "checkpoints (6, 6 committed)" in out
    assert "warning" not in out
    checkpoints = out.split("checkpoints (")[1].split("\n\n")[0]
    checkpoint_rows = [line.split() for line in checkpoints.splitlines()[2:]]
    assert [(r[0], r[1], r[2], r[3]) for r in checkpoint_rows] == [
        ("0", "pretrain", "stage-start", "yes"),
        ("6", "pretrain", "interior", "yes"),
        ("12", "pretrain", "stage-end", "yes"),
        ("12", "finetune", "stage-start", "yes"),
        ("14", "finetune", "interior", "yes"),
        ("17", "finetune", "stage-end", "yes"),
    ]
    assert "size on disk    unknown" not in out
    assert "analyses (0)\n  none" in out


def test_inspect_warns_about_uncommitted_checkpoints(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    key = open_run(copy).checkpoints[1].key
    zarr.open_group(copy / "checkpoints" / key, mode="r+").attrs["committed"] = False
    code, out, _ = inspect(capsys, str(copy))
    assert code == 0
    assert "checkpoints (6, 5 committed)" in out
    assert f"warning: 1 uncommitted checkpoint(s) (interrupted writes, incomplete data): {key}" in (
        out
    )
    assert "6     pretrain  interior     NO" in out


def test_inspect_shows_an_interrupted_stage(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    root = zarr.open_group(copy, mode="r+")
    root.attrs["status"] = "recording"
    stages = root["stages"].attrs["stages"]
    stages[-1] = {**stages[-1], "status": "recording", "last_step": None}
    root["stages"].attrs["stages"] = stages
    code, out, _ = inspect(capsys, str(copy))
    assert code == 0
    assert "status          recording" in out
    assert "warning: the store is still recording" in out
    finetune = next(line for line in out.splitlines() if "  finetune  recording" in line)
    assert "12..16 (interrupted)  5 " in finetune


def test_inspect_new_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    StoreWriter.open(str(tmp_path / "empty.zarr"))
    code, out, err = inspect(capsys, str(tmp_path / "empty.zarr"))
    assert (code, err) == (0, "")
    assert "stages (0)" in out
    assert "checkpoints (0, 0 committed)" in out


def test_missing_store_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = inspect(capsys, str(tmp_path / "absent.zarr"))
    assert (code, out) == (1, "")
    assert err.startswith("source-callback: error: no store at ")
    assert "Traceback" not in err


def test_directory_that_is_not_a_store_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    code, out, err = inspect(capsys, str(tmp_path))
    assert (code, out) == (1, "")
    assert "is not a Zarr store" in err


def test_foreign_zarr_group_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs["hello"] = "world"
    code, _, err = inspect(capsys, str(tmp_path / "other.zarr"))
    assert code == 1
    assert "not a source-callback store" in err


def test_newer_format_version_exits_1(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    zarr.open_group(copy, mode="r+").attrs["source_callback"] = {
        "format": "source-callback",
        "version": 99,
    }
    code, out, err = inspect(capsys, str(copy))
    assert (code, out) == (1, "")
    assert "format version 99" in err and "Upgrade source-callback" in err


def test_help_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "inspect" in capsys.readouterr().out
    assert main(["inspect", "--help"]) == 0
    assert "--storage-option" in capsys.readouterr().out
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err
    assert main(["inspect", "x.zarr", "--storage-option", "novalue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_parse_storage_options() -> None:
    assert parse_storage_options([]) is None
    assert parse_storage_options(["anon=false", "a=b=c", "n=3", "s=x y"]) == {
        "anon": False,
        "a": "b=c",
        "n": 3,
        "s": "x y",
    }


def test_inspect_s3_store_with_storage_options(
    store: Path, s3: tuple[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    import s3fs

    prefix, options = s3
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(store), f"{prefix}/run.zarr", recursive=True)
    code, out, err = inspect(
        capsys,
        f"{prefix}/run.zarr",
        *("--storage-option", f"endpoint_url={options['endpoint_url']}"),
        *("-o", "key=testing", "-o", "secret=testing", "-o", "skip_instance_cache=true"),
    )
    assert (code, err) == (0, "")
    assert f"store           {prefix}/run.zarr" in out
    assert "checkpoints (6, 6 committed)" in out
    assert "size on disk    unknown" not in out


def test_python_dash_m_entry_point(store: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "source_callback", "inspect", str(store)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "pretrain" in result.stdout and "finetune" in result.stdout
    assert "checkpoints (6, 6 committed)" in result.stdout


def test_reading_and_the_command_line_do_not_import_the_training_frameworks() -> None:
    """Lightning alone takes seconds to import; only the callbacks need it (or transformers)."""
    code = (
        "import sys, source_callback, source_callback.cli; "
        "print(sorted(m for m in ('lightning', 'transformers', 'peft') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


ANALYZE_CONFIG = {
    "task": "classification",
    "data": "models:two_stage_sets",
    "queries": "models:query_set",
    "model_kwargs": {"hidden": 8},
    "segments": 1,
    "batch_size": 16,
    "name": "cli",
}


def analyze_cli(
    capsys: pytest.CaptureFixture[str], store: Path, config: Path, *args: str
) -> tuple[int, str, str]:
    argv = ["analyze", str(store), "--module", "models:TinyClassifier", "--config", str(config)]
    code = main([*argv, "--quiet", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze_stores_what_analyze_computes(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    config = tmp_path / "analysis.json"
    config.write_text(json.dumps(ANALYZE_CONFIG))
    code, out, err = analyze_cli(capsys, copy, config)
    assert (code, err) == (0, "")
    assert "source analysis of 3 queries; stages pretrain (48 examples), finetune (40" in out
    assert f"stored in {copy} under analyses/cli" in out
    rows = out.split("without the stage):\n")[1].splitlines()
    assert rows[0].split() == ["query", "pretrain", "finetune"]
    stored = load_analysis(copy, "cli")
    first = [float(v) for v in rows[1].split()[1:]]
    np.testing.assert_allclose(first, stored.stage_effects[0], rtol=1e-3)
    direct = analyze(
        copy,
        model=TinyClassifier(),
        task="classification",
        train=two_stage_sets(),
        queries=query_set(),
        segments=1,
        batch_size=16,
        name=None,
        verbose=False,
    )
    for stage in ("pretrain", "finetune"):
        np.testing.assert_allclose(np.asarray(stored.scores[stage]), direct.scores[stage])
    code, out, _ = inspect(capsys, str(copy))
    listed = out.split("analyses (1)\n")[1].splitlines()
    assert listed[0].split() == [
        "name",
        "method",
        "committed",
        "at",
        "queries",
        "segments",
        "cache",
        "status",
    ]
    name, method, when, queries, segments, cache, status = listed[1].split()
    assert (name, method, queries, segments, cache, status) == (
        "cli",
        "source",
        "3",
        "2",
        "no",
        "committed",
    )
    assert when.startswith("20") and when.endswith("+00:00")


def test_analyze_reads_toml(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    config = tmp_path / "analysis.toml"
    config.write_text(
        'task = "classification"\ndata = "models:two_stage_sets"\nqueries = "models:query_set"\n'
        'method = "tracin"\nsegments = 1\nname = "tracin"\ndiagonal_above = 1000\n'
    )
    code, out, err = analyze_cli(capsys, copy, config)
    assert (code, err) == (0, ""), err
    assert out.startswith("tracin analysis of 3 queries")
    stored = load_analysis(copy, "tracin").config
    assert (stored["method"], stored["diagonal_above"]) == ("tracin", 1000)  # any option's name


@pytest.mark.parametrize(
    ("module", "config", "code", "message"),
    [
        ("no_such_module_q:Net", {}, 1, "--module no_such_module_q:Net: cannot import"),
        ("models:Absent", {}, 1, "'models' has no function or class 'Absent'"),
        (
            "models:make_dataset",
            {"model_kwargs": {}},
            1,
            "--module built a TensorDataset, not a torch.nn.Module",
        ),
        ("models:TinyClassifier", {"model_kwargs": {"width": 3}}, 1, "unexpected keyword"),
        ("models:TinyClassifier", {"data": None}, 1, "missing key(s) data (needs task, data"),
        ("models:TinyClassifier", {"epochs": 3}, 1, "unknown key(s) epochs; known: task"),
        ("models:TinyClassifier", {"batch_size": "16"}, 1, "batch_size must be an int, got '16'"),
        ("models:TinyClassifier", {"segments": 0}, 1, "analysis.json: segments must be >= 1"),
        ("models:TinyClassifier", {"method": "loo"}, 1, "method must be one of ('source'"),
        ("models:TinyClassifier", {"name": 3}, 1, "name must be text"),
        ("models:TinyClassifier", {"collate_fn": "models:query_set"}, 1, "not a function"),
        (
            "models:TinyClassifier",
            {"collate_fn": "models:numbered_collators"},
            1,
            "collate_fn of stage(s) ['finetune'] is not a function",
        ),
        (
            "models:TinyClassifier",
            {"collate_fn": "models:refusing_collator"},
            1,
            "cannot be collated into a batch (ValueError: this collator refuses 2 examples)",
        ),
        ("models:TinyClassifier", {"queries": "models"}, 1, "config 'queries': expected MODULE"),
        ("models:TinyClassifier", {"queries": "models:nothing"}, 1, "has no function or class"),
        ("models:TinyClassifier", {"task": "ranking"}, 1, "unknown task 'ranking'"),
        ("models:TinyClassifier", {"task": 1, "model_kwargs": [8]}, 1, "task, model_kwargs must"),
        ("models:TinyClassifier", {"task": "models:query_set"}, 1, "not a Task"),
        ("models:TinyClassifier", {"data": "models:query_set"}, 1, "not a mapping"),
        ("models", {}, 2, "expected MODULE:FUNCTION (or MODULE:CLASS), got 'models'"),
    ],
)
def test_analyze_errors(
    store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    module: str,
    config: dict[str, Any],
    code: int,
    message: str,
) -> None:
    settings = {k: v for k, v in {**ANALYZE_CONFIG, **config}.items() if v is not None}
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps(settings))
    argv = ["analyze", str(store), "--module", module, "--config", str(path), "--quiet"]
    result = main(argv)
    out, err = capsys.readouterr()
    assert (result, out) == (code, "")
    assert message in err, err
    assert code == 2 or len(err.strip().splitlines()) == 1  # failures: one line
    assert not (store / "analyses" / "cli").exists()


def test_analyze_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--module MODULE:CLASS" in help_text and "model_kwargs" in help_text
    assert main(["analyze", str(tmp_path / "x.zarr"), "--config", "c.json"]) == 2
    assert "the following arguments are required: --module" in capsys.readouterr().err
    argv = ["analyze", "x.zarr", "--module", "m:C", "--config", "c.json", "--device", "gpu9"]
    assert main(argv) == 2
    assert "--device" in capsys.readouterr().err
    code, out, err = analyze_cli(capsys, tmp_path / "x.zarr", tmp_path / "absent.json")
    assert (code, out) == (1, "")
    assert "No such file" in err and "absent.json" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{task: 1")
    code, _, err = analyze_cli(capsys, tmp_path / "x.zarr", bad)
    assert code == 1 and f"config {bad}: cannot parse it" in err
