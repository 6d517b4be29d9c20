"""``analyze`` on 2 CPU processes (gloo): Fabric-launched and torchrun-launched ranks give the
single-process result, and a rank that fails makes every rank fail with its error, without a hang.

The ranks run ``tests/scripts/analyze_ddp.py`` in subprocesses (Fabric's DDP launcher re-executes
the calling script), against a run recorded here once.
"""

from __future__ import annotations

import numpy as np
import pytest
from models import adamw, loader, sgd_momentum, trainer
from processes import SCRIPTS, load_script
from test_ddp import run_script
from test_progress import OVERALL

from source_callback import SourceCallback, load_analysis, open_run
from source_callback.analysis.results import AnalysisResult

ANALYZE_DDP = SCRIPTS / "analyze_ddp.py"
script = load_script(ANALYZE_DDP)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[str, dict[str, AnalysisResult]]:
    """A two-stage run (SGD with momentum, then AdamW) and its single-process analyses: by
    launch mode, the one it must equal."""
    root = tmp_path_factory.mktemp("distributed")
    store = str(root / "run.zarr")
    model = script.TinyClassifier(optimizer=sgd_momentum)
    callback = SourceCallback(store, stage="pretrain", checkpoints_per_stage=4)
    sets = script.training_sets()
    trainer([callback], root, max_epochs=1).fit(model, loader(sets["pretrain"], script.BATCH))
    model.optimizer_factory = adamw
    callback.next_stage("finetune")
    trainer([callback], root, max_epochs=2).fit(model, loader(sets["finetune"], 32))
    full = script.analyze_run(store, name=None)
    subset = script.analyze_run(store, name=None, curvature_examples=script.SUBSET)
    return store, {"fabric": full, "external": full, "subset": subset}


def _assert_equal_results(
    saved: dict[str, np.ndarray], expected: AnalysisResult, launch: str
) -> None:
    # The torchrun launch scores from a float32 cache of gradients.
    tolerance = 1e-6 if launch == "external" else 1e-12
    for name in expected.stage_names:
        scale = np.abs(expected.scores[name]).max()
        np.testing.assert_allclose(
            saved[f"scores_{name}"], expected.scores[name], rtol=0, atol=tolerance * scale
        )
    np.testing.assert_allclose(saved["effects"], expected.stage_effects, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(saved["last_exact"], expected.last_stage_exact, rtol=1e-9)


@pytest.mark.parametrize("launch", ["fabric", "external", "subset"])
def test_two_ranks_equal_one_process(recorded, tmp_path, launch: str) -> None:
    """``subset``: each rank fits the curvature on its share of the same subset of examples.

    ``fabric`` runs verbose: only rank 0 shows progress, of its own share of the data.
    """
    store, analyses = recorded
    expected = analyses[launch]
    command = [str(ANALYZE_DDP), store, str(tmp_path), launch]
    if launch == "external":
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command]
    code, output = run_script(command)
    assert code == 0, output
    assert "DONE rank=0" in output and "DONE rank=1" in output, output
    if launch == "fabric":
        _assert_only_rank_zero_shows_progress(output)
    for rank in (0, 1):  # every rank returns the whole result
        _assert_equal_results(dict(np.load(tmp_path / f"rank{rank}.npz")), expected, launch)
    stored = load_analysis(store, "distributed")
    assert {**stored.config, "cache": None} == expected.config
    _assert_equal_results(
        {
            **{f"scores_{n}": np.asarray(stored.scores[n][...]) for n in stored.stage_names},
            "effects": stored.stage_effects,
            "last_exact": stored.last_stage_exact,
        },
        expected,
        launch,
    )


def test_a_failing_rank_fails_every_rank(recorded, tmp_path) -> None:
    store, _ = recorded
    code, output = run_script([str(ANALYZE_DDP), store, str(tmp_path), "fail"])
    assert code != 0, output
    assert "DONE" not in output, output
    assert "RuntimeError: rank one cannot read its data" in output, output  # rank 1's own error
    assert "RankFailedError: rank 1 of the distributed analysis failed" in output, output
    assert "failed" not in open_run(store).analyses  # nothing half-written is committed


def test_a_non_finite_value_on_one_rank_fails_every_rank(recorded, tmp_path) -> None:
    store, _ = recorded
    code, output = run_script([str(ANALYZE_DDP), store, str(tmp_path), "nan"])
    assert code != 0, output
    assert "DONE" not in output, output
    error = f"NonFiniteError: the loss of example {script.NAN_AT} of stage 'pretrain'"
    assert error in output, output  # rank 1's own error, with the global index
    assert f"rank 1 of the distributed analysis failed: {error}" in output, output
    assert "non-finite" not in open_run(store).analyses


def _assert_only_rank_zero_shows_progress(output: str) -> None:
    assert output.count("source analysis of 21 queries") == 1, output  # the summary
    shown = [tuple(int(n) for n in found) for found in OVERALL.findall(output)]
    assert len({(passes, planned) for _, passes, _, planned in shown}) == 1, output
    at, passes, done, planned = shown[-1]
    # rank 0's own share of the data: its plan is what it ran
    assert (at, done) == (passes, planned), output
