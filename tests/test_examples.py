"""The README's examples, run in a reduced form (fewer epochs, checkpoints and queries)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from source_callback import load_analysis, open_run
from source_callback.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def examples_path():
    sys.path.insert(0, str(EXAMPLES))
    yield
    sys.path.remove(str(EXAMPLES))


@pytest.fixture
def one_thread():
    """Tiny models do ~60 small ops per step, where a second intra-op thread only adds waiting:
    with two threads on a busy 2-core machine, the LoRA example trained 20 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_lora_language_model(tmp_path, examples_path, one_thread, capsys) -> None:
    from lora_language_model import PLACES, attribute, decode, record, training_sets

    store = tmp_path / "lora.zarr"
    model = record(store, quick=True, progress=False)
    run = open_run(store)
    pretrain, finetune = run.stages
    adapters = {name for name, _ in model.named_parameters() if ".lora_" in name}
    assert len(adapters) == 2 * 6 * 2  # layers × projections × (A, B)
    assert set(finetune.trainable) == adapters and set(pretrain.frozen) == adapters
    assert set(finetune.frozen) == set(pretrain.trainable)  # the base model, frozen for LoRA
    assert "blocks.0.q.base.weight" in finetune.frozen and "head.weight" in finetune.frozen
    assert finetune.optimizer.update_rule.value == "adamw"
    assert set(run.checkpoints[-1].params(include_frozen=False)) == adapters

    completion, result = attribute(store, model, "the fox lives in the", quick=True)
    out = capsys.readouterr().out
    assert "most helpful fine-tuning facts" in out and "stage effects" in out
    home = completion.split()[0]
    assert home in PLACES  # the fine-tuned model answers with a place
    facts = training_sets(quick=True)["finetune"]
    top = np.argsort(-np.asarray(result.scores["finetune"][0]))[:3]
    for index in top:  # about the prompt's animal or the generated place: 1 in 8 at random
        words = decode(facts.ids[index]).split()
        assert "fox" in words or home in words, words
    assert result.last_stage_exact[0] > 1  # the fine-tuning made the completion likely


def test_mislabeled_digits(tmp_path, examples_path, one_thread, capsys) -> None:
    pytest.importorskip("sklearn")
    from mislabeled_digits import corrupted_digits, record, self_influence
    from two_stage_digits import rotated_digits

    train, corrupted = corrupted_digits(0.15)
    clean = rotated_digits([0]).tensors[1]
    assert corrupted.sum() == round(0.15 * 1697)
    assert np.array_equal((train.tensors[1] != clean).numpy(), corrupted)

    store = tmp_path / "mislabeled.zarr"
    model = record(store, train, epochs=2, checkpoints=3, progress=False)
    aucs = self_influence(store, model, train, corrupted, queries=150, verbose=False)
    out = capsys.readouterr().out
    assert "corrupted found among the top 10%" in out and "tracin" in out
    assert aucs["source"] > 0.9 and min(aucs.values()) > 0.8, aucs
    influence = load_analysis(store, "if")  # self-influence gᵀ(H + δ)⁻¹g / N is positive
    assert (np.asarray(influence.scores["train"])[np.arange(150), np.arange(150)] > 0).all()


def test_hf_lora_finetune(tmp_path, examples_path, one_thread, capsys) -> None:
    pytest.importorskip("peft")
    from hf_lora_finetune import attribute, record
    from lora_language_model import PLACES

    store = tmp_path / "hf.zarr"
    model = record(store, quick=True, progress=False)
    run = open_run(store)
    pretrain, finetune = run.stages
    adapters = {name for name, _ in model.named_parameters() if ".lora_" in name}
    assert len(adapters) == 2 * 7 * 2  # layers × projections × (A, B)
    assert set(finetune.trainable) == adapters and not pretrain.frozen
    continuation = run.continuation(1)
    assert set(continuation.previous.values()) == set(pretrain.trainable)
    assert set(continuation.matched_by.values()) == {"identity"}
    assert set(finetune.frozen) == set(continuation.previous)  # the base model, frozen for LoRA

    completion, result = attribute(store, model, "the fox lives in the", quick=True)
    out = capsys.readouterr().out
    assert "most helpful fine-tuning facts" in out and "stage effects" in out
    assert completion.split()[0] in PLACES  # the fine-tuned model answers with a place
    assert result.scores["pretrain"].shape == (1, pretrain.num_examples)
    assert np.isfinite(result.stage_effects).all()


def test_hf_trainer_sft_records_both_trainers_and_attributes(
    tmp_path, examples_path, one_thread
) -> None:
    pytest.importorskip("trl")
    from hf_trainer_sft import run

    store = tmp_path / "sft.zarr"
    result = run(store, quick=True, verbose=False)
    recorded = open_run(store)
    assert [(s.name, s.recorded_by) for s in recorded.stages] == [
        ("pretrain", "transformers"),
        ("sft", "transformers"),
    ]
    assert [s.num_examples for s in recorded.stages] == [32, 10]
    assert result.scores["pretrain"].shape == (3, 32) and result.scores["sft"].shape == (3, 10)
    # The queries are SFT examples: the most helpful SFT example is the query itself (or its
    # duplicate: the SFT set holds every pair twice).
    for q, top in enumerate(np.argmax(result.scores["sft"], axis=1)):
        assert top % 5 == q
    assert np.isfinite(result.stage_effects).all()
