"""Encoder-decoder language models (T5, BART): the seq2seq task, and their runs attributed.

Ground truth: the models' own loss for the task; exact unrolled differentiation through a
recorded BART run for the scores; the measured change of the queries' loss for a T5 stage's
effect. (Per-example gradients against autograd: ``test_architectures``.)
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hf_models import Pairs, Seq2SeqLM, add_lora, tiny_bart, tiny_t5, trainer_arguments
from test_analyze import _replay_steps, _spearman, _trainer
from torch.func import functional_call
from torch.utils.data import DataLoader, default_collate
from unroll import leave_one_out_effects, sgd_replay

from source_callback import AnalysisError, Seq2SeqTask, SourceCallback, analyze, open_run

pytest.importorskip("transformers")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

BUILDERS = {"t5": tiny_t5, "bart": tiny_bart}


def _batch(data, idx=None) -> dict[str, torch.Tensor]:
    return default_collate([data[int(i)] for i in (range(len(data)) if idx is None else idx)])


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` negative log-likelihoods of the labels, 0 where they are -100."""
    logp = torch.log_softmax(logits, -1)
    picked = logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return -(picked * (labels != -100))


@pytest.mark.parametrize("build", sorted(BUILDERS))
def test_losses_are_the_models_own(build: str) -> None:
    """Each example's loss is the model's loss on it alone; with ``tokens_per_example`` their
    mean is the model's loss on the batch (a token mean); the decoder's inputs are the same
    whether the model shifts the labels, the task does, or the batch brings them."""
    torch.manual_seed(0)
    model = BUILDERS[build]().double().eval()
    data = Pairs(6, seed=0, padded=True)
    batch = _batch(data)
    labelled = (batch["labels"] != -100).sum(1).double()
    assert labelled.min() < labelled.max()  # targets of different lengths
    alone = torch.stack([model(**_batch(data, [i])).loss for i in range(len(data))])
    task = Seq2SeqTask()
    torch.testing.assert_close(task.loss(model, batch), alone)
    torch.testing.assert_close(task.probe_loss(model, batch), alone)
    token_mean = Seq2SeqTask(tokens_per_example=float(labelled.mean()))
    torch.testing.assert_close(token_mean.loss(model, batch).mean(), model(**batch).loss)
    shifted = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    logits = model(**batch).logits
    expected = _token_nll(logits, batch["labels"]).sum(1)
    for forms in (
        (model, batch),  # the model's prepare_decoder_input_ids_from_labels
        (Seq2SeqLM(model), batch),  # a wrapper without it: called with labels=
        (model, {**batch, "decoder_input_ids": shifted}),  # the batch's own
    ):
        torch.testing.assert_close(task.measurement(*forms), expected)
    with pytest.raises(TypeError, match=r"got a mapping with keys \['input_ids'\].*'labels'"):
        task.loss(model, {"input_ids": batch["input_ids"]})


def test_pseudo_labels_are_drawn_at_the_labelled_positions() -> None:
    torch.manual_seed(0)
    model = tiny_t5().double().eval()
    batch = _batch(Pairs(6, seed=0, padded=True))
    task = Seq2SeqTask()
    draws = [task.pseudo_loss(model, batch, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    torch.testing.assert_close(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])
    # an example whose labels are all -100 carries no pseudo-loss
    empty = {**batch, "labels": batch["labels"].masked_fill(torch.arange(6)[:, None] == 2, -100)}
    assert task.pseudo_loss(model, empty, torch.Generator().manual_seed(0))[2] == 0


N, BATCH, EPOCHS, LR = 12, 4, 3, 0.5


def _bias_share() -> float:
    """The share of T5's parameters in its relative position biases."""
    model = tiny_t5()
    biases = sum(p.numel() for n, p in model.named_parameters() if "relative_attention" in n)
    return biases / sum(p.numel() for p in model.parameters())


def test_bart_scores_correlate_with_exact_unrolling(tmp_path) -> None:
    """A BART (learned positions expanded to the batch, a scaled embedding tied to its head)
    trained with SGD on its own loss, against the exact leave-one-out derivative."""
    data, queries = Pairs(N, seed=1), Pairs(4, seed=2)
    torch.manual_seed(0)
    lm = Seq2SeqLM(tiny_bart(), optimizer="sgd", lr=LR).double()
    start = {n: p.detach().clone() for n, p in lm.named_parameters()}
    store = tmp_path / "run.zarr"
    callback = SourceCallback(store, stage="s2s", checkpoints_per_stage=6)
    _trainer([callback], max_epochs=EPOCHS).fit(lm, DataLoader(data, batch_size=BATCH))
    lrs = open_run(store).learning_rates()[:, 0]

    def nll(params, pairs, idx):
        out = functional_call(lm, params, (), _batch(pairs, idx))
        return _token_nll(out.logits, pairs.labels[idx])

    def final(weights):
        loss = lambda m, p, idx: nll(p, data, idx).mean(1)  # noqa: E731 (every target is whole)
        return sgd_replay(lm, start, _replay_steps(N, BATCH, EPOCHS), loss, lrs, weights)

    replayed = final(torch.ones(N, dtype=torch.float64))
    for name, param in lm.named_parameters():  # the replay is the recorded run
        torch.testing.assert_close(replayed[name].detach(), param.detach(), msg=name)
    measure = lambda m, p: nll(p, queries, range(len(queries))).sum(1)  # noqa: E731
    truth = leave_one_out_effects(lm, final, measure, N).numpy()
    torch.manual_seed(0)
    result = analyze(
        store,
        model=Seq2SeqLM(tiny_bart()).double(),
        task="seq2seq",
        train={"s2s": data},
        queries=queries,
        segments=2,
        batch_size=8,
        name=None,
        verbose=False,
    )
    assert result.coverage == {"s2s": 1.0}
    rho = _spearman(result.scores["s2s"], truth)
    print(f"BART SGD: Spearman {rho:.3f}")
    assert rho > 0.5


def test_t5_with_lora_added_between_stages(tmp_path) -> None:
    """T5 pretrained with AdamW, then LoRA adapters on its attention: the analysis names the
    relative position biases it cannot attribute through, runs with them left out (the
    pretraining stage's coverage says so), and the LoRA stage's exact effect is the change of
    the queries' loss."""
    torch.manual_seed(0)
    lm = Seq2SeqLM(tiny_t5(), lr=0.01).double()
    pretrain, sft, queries = Pairs(16, seed=1, padded=True), Pairs(8, seed=3), Pairs(3, seed=4)
    store = tmp_path / "run.zarr"
    callback = SourceCallback(store, stage="pretrain")
    _trainer([callback], max_epochs=2).fit(lm, DataLoader(pretrain, batch_size=4))
    lm.model = add_lora(lm.model, ["q", "v"])
    before = Seq2SeqLM(tiny_t5())
    before.model = add_lora(before.model, ["q", "v"])
    before.double().load_state_dict(lm.state_dict())
    callback.next_stage("sft")
    _trainer([callback], max_epochs=2).fit(lm, DataLoader(sft, batch_size=4))

    def analysis(**options):
        final = Seq2SeqLM(add_lora(tiny_t5(), ["q", "v"])).double()
        train = {"pretrain": pretrain, "sft": sft}
        return analyze(store, model=final, task="seq2seq", train=train, queries=queries,
                       segments=1, name=None, verbose=False, **options)  # fmt: skip

    with pytest.raises(AnalysisError, match=r"relative_attention_bias.*relative_attention_bias"):
        analysis()
    result = analysis(modules={"exclude": ["*relative_attention_bias*"]})
    assert result.coverage["pretrain"] == pytest.approx(1 - _bias_share())
    assert result.coverage["sft"] == 1.0
    for stage in ("pretrain", "sft"):
        scores = result.scores[stage]
        assert np.isfinite(scores).all() and np.abs(scores).max() > 0
    task, batch = Seq2SeqTask(), _batch(queries)
    with torch.no_grad():
        expected = task.measurement(before.eval(), batch) - task.measurement(lm.eval(), batch)
    np.testing.assert_allclose(result.last_stage_exact, expected.double().numpy(), rtol=1e-5)


def test_a_seq2seq_trainer_run_is_recorded_and_analyzed(tmp_path) -> None:
    """Hugging Face's ``Seq2SeqTrainer`` on a T5: the probe's recorded losses (the model's own
    loss on single examples) are what the task computes, so the analysis accepts the run."""
    pytest.importorskip("accelerate")
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from source_callback import SourceTrainerCallback

    data, queries = Pairs(12, seed=1, padded=True), Pairs(3, seed=2)
    torch.manual_seed(0)
    store = tmp_path / "run.zarr"
    Seq2SeqTrainer(
        model=tiny_t5(),
        args=trainer_arguments(tmp_path / "out", Seq2SeqTrainingArguments),
        train_dataset=data,
        callbacks=[SourceTrainerCallback(store, stage="sft", checkpoints_per_stage=3)],
    ).train()
    torch.manual_seed(0)
    result = analyze(
        store,
        model=tiny_t5(),
        task="seq2seq",
        train={"sft": data},
        queries=queries,
        modules={"exclude": ["*relative_attention_bias*"]},
        segments=1,
        name=None,
        verbose=False,
    )
    assert result.coverage["sft"] == pytest.approx(1 - _bias_share())
    assert np.isfinite(result.scores["sft"]).all() and np.abs(result.scores["sft"]).max() > 0
    assert all(c.probe() is not None for c in open_run(store).checkpoints)  # and it was checked
