"""The README's examples, run in a reduced form (fewer epochs, checkpoints and queries)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from source_callback import load_analysis, open_run
from source_callback.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def examples_path():
    sys.path.insert(0, str(EXAMPLES))
    yield
    sys.path.remove(str(EXAMPLES))


def test_two_stage_digits_record_attribution_and_report(
    tmp_path, examples_path, capsys, monkeypatch
) -> None:
    pytest.importorskip("sklearn")
    from attribute_digits import attribute
    from two_stage_digits import run

    store = tmp_path / "digits.zarr"
    run(store, epochs=0.34, quiet=True, checkpoints_per_stage=2)
    recorded = open_run(store)
    assert [s.name for s in recorded.stages] == ["pretrain", "finetune"]
    assert recorded.stages[0].num_examples == 3 * 1697 and recorded.stages[1].num_examples == 1697
    assert recorded.stages[1].optimizer.update_rule.value == "adamw"

    attribute(store, num_queries=2, segments=1, verbose=False)
    out = capsys.readouterr().out
    assert out.count("most helpful:") == 2 and "stage effects" in out
    result = load_analysis(store)
    assert result.scores["pretrain"].shape == (2, 3 * 1697)
    assert result.scores["finetune"].shape == (2, 1697)
    assert result.stage_effects.shape == (2, 2)

    monkeypatch.chdir(EXAMPLES.parent)  # docs/report.md's command, from the repository root
    out = tmp_path / "digits.html"
    data = "examples.two_stage_digits:training_sets"
    args = ["report", str(store), "--analysis", "default", "--out", str(out), "--data", data]
    assert main(args) == 0
    assert out.read_text().count('<img class="example"') == 2 * 2 * 5  # queries × sides × top
