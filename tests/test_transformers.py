"""Hugging Face transformers recorded in stages, LoRA added by peft between them, attributed.

Ground truth: exact unrolled differentiation through both recorded stages (``unroll.py``), the
base weights carrying their first-stage graph through the LoRA stage.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import CausalLM, TokenSequences, add_lora, tiny_llama
from test_analyze import _replay_steps, _spearman, _trainer
from torch.func import functional_call
from torch.utils.data import DataLoader, default_collate
from unroll import adam_replay, leave_one_out_effects

from source_callback import SourceCallback, analyze, open_run
from source_callback.analysis.task import LanguageModelingTask
from source_callback.cli import summarize

pytest.importorskip("peft")

N1, N2, QUERIES, BATCH, EPOCHS, DECAY = 24, 16, 4, 8, 2, 0.01
TARGETS = ["q_proj", "v_proj"]


class Bound:
    """``model`` called with ``params`` substituted, as the task calls a model."""

    def __init__(self, model, params) -> None:
        self.model, self.params = model, params

    def __call__(self, input_ids, attention_mask=None):
        kwargs = {"attention_mask": attention_mask}
        return functional_call(self.model, self.params, (input_ids,), kwargs)


def _batch(data, idx):
    return default_collate([data[int(i)] for i in idx])


def _record(store, lm, pretrain, sft, same_callback: bool):
    callback = SourceCallback(store, stage="pretrain", checkpoints_per_stage=4)
    _trainer([callback], max_epochs=EPOCHS).fit(lm, DataLoader(pretrain, batch_size=BATCH))
    lm.model = add_lora(lm.model, TARGETS)
    lm.double()
    lora_start = {n: p.detach().clone() for n, p in lm.named_parameters() if "lora_" in n}
    if same_callback:
        callback.next_stage("sft")
    else:
        callback = SourceCallback(store, stage="sft", checkpoints_per_stage=4)
    _trainer([callback], max_epochs=EPOCHS).fit(lm, DataLoader(sft, batch_size=BATCH))
    return lora_start


@pytest.fixture(scope="module")
def llama_lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    lm = CausalLM(tiny_llama()).double()
    start = {n: p.detach().clone() for n, p in lm.named_parameters()}
    pretrain, sft, queries = TokenSequences(N1, 1), TokenSequences(N2, 2), TokenSequences(4, 9)
    lora_start = _record(root / "run.zarr", lm, pretrain, sft, same_callback=True)
    run = open_run(root / "run.zarr")
    lrs = run.learning_rates()[:, 0]
    first = run.stages[1].first_step
    continues = run.continuation(1).previous
    task = LanguageModelingTask()
    stage1 = CausalLM(tiny_llama()).double()
    final_model = CausalLM(add_lora(tiny_llama(), TARGETS)).double()

    def loss(data):
        return lambda m, params, idx: task.loss(Bound(m, params), _batch(data, idx))

    def final(weights):
        base = adam_replay(
            stage1,
            start,
            _replay_steps(N1, BATCH, EPOCHS),
            loss(pretrain),
            lrs[:first],
            weights[:N1],
            weight_decay=DECAY,
        )
        carried = {new: base[old] for new, old in continues.items()}
        return adam_replay(
            final_model,
            {**carried, **lora_start},
            _replay_steps(N2, BATCH, EPOCHS),
            loss(sft),
            lrs[first:],
            weights[N1:],
            weight_decay=DECAY,
            frozen=frozenset(carried),
        )

    replayed = final(torch.ones(N1 + N2, dtype=torch.float64))
    for name, param in lm.named_parameters():  # the replay is the recorded run
        torch.testing.assert_close(replayed[name].detach(), param.detach(), rtol=1e-6, atol=1e-8)

    def measure(m, params):
        return task.measurement(Bound(m, params), _batch(queries, range(len(queries))))

    truth = leave_one_out_effects(final_model, final, measure, N1 + N2).numpy()
    return root / "run.zarr", lm, pretrain, sft, queries, truth


def test_peft_stage_continues_the_pretrained_model(llama_lora) -> None:
    store, lm, *_ = llama_lora
    run = open_run(store)
    continuation = run.continuation(1)
    stage0 = {e["name"] for e in run.stage_manifest(0)}
    assert set(continuation.previous.values()) == stage0  # every pretrained tensor continues
    assert set(continuation.matched_by.values()) == {"identity"}
    q = "model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert continuation.previous[q] == "model.model.layers.0.self_attn.q_proj.weight"
    added = {e["name"] for e in run.stage_manifest(1)} - set(continuation.previous)
    assert added == {n for n, _ in lm.named_parameters() if "lora_" in n} and len(added) == 4
    assert set(run.stages[1].trainable) == added
    text = summarize(run)
    assert "model.lm_head.weight -> model.base_model.model.lm_head.weight (identity)" in text
    assert "12 tensors continue (12 by identity), 4 added, 0 dropped" in text


def test_a_new_callback_matches_by_wrapper_rules(tmp_path, llama_lora) -> None:
    store, *_ = llama_lora
    torch.manual_seed(0)
    lm = CausalLM(tiny_llama()).double()
    _record(tmp_path / "run.zarr", lm, TokenSequences(N1, 1), TokenSequences(N2, 2), False)
    ours, theirs = open_run(tmp_path / "run.zarr"), open_run(store)
    assert ours.continuation(1).previous == theirs.continuation(1).previous
    assert set(ours.continuation(1).matched_by.values()) == {"rule"}


def test_llama_lora_scores_match_unrolling(llama_lora) -> None:
    store, _, pretrain, sft, queries, truth = llama_lora
    result = analyze(
        store,
        model=CausalLM(add_lora(tiny_llama(), TARGETS)).double(),
        task="language_modeling",
        train={"pretrain": pretrain, "sft": sft},
        queries=queries,
        segments=2,
        batch_size=8,
        name=None,
        verbose=False,
    )
    scores = np.concatenate([result.scores["pretrain"], result.scores["sft"]], axis=1)
    both = _spearman(scores, truth)
    per_stage = [
        _spearman(result.scores["pretrain"], truth[:, :N1]),
        _spearman(result.scores["sft"], truth[:, N1:]),
    ]
    print(f"Llama + LoRA: Spearman {both:.3f}, per stage {per_stage[0]:.3f} / {per_stage[1]:.3f}")
    assert both > 0.0


def test_batches_in_hugging_face_form_and_clear_errors() -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from source_callback.analysis.task import ClassificationTask

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=24,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=3,
        pad_token_id=0,
    )
    model = LlamaForSequenceClassification(config)
    ids = torch.randint(1, 24, (4, 6))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([0, 2, 1, 2]),
    }
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    torch.testing.assert_close(ClassificationTask().loss(model, batch), expected)
    lm = CausalLM(tiny_llama())
    with pytest.raises(TypeError, match=r"got a list of 2 items.*mapping with 'input_ids'"):
        LanguageModelingTask().loss(lm, [ids, ids])
    with pytest.raises(TypeError, match=r"got a mapping with keys \['ids'\].*'labels'"):
        ClassificationTask().loss(model, {"ids": ids})
