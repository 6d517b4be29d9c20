"""TRL on a tiny Llama built from a config, with a word-level tokenizer built in the test.

``SFTTrainer`` with a prompt-completion dataset (loss on the completion tokens only) is recorded
and analyzed end to end; ``DPOTrainer`` is refused with the reason before anything is written.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hf_models import VOCAB, seeded_llama, trainer_arguments

from source_callback import (
    AnalysisError,
    SourceCallbackError,
    SourceTrainerCallback,
    analyze,
    open_run,
)
from source_callback.analysis.task import LanguageModelingTask

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# TRL's configs turn gradient checkpointing on through transformers' deprecated name.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated")

WORDS = [f"w{i}" for i in range(VOCAB - 2)]  # and <pad>, <eos>


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate([*WORDS, "<pad>", "<eos>"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>"
    )


def sentences(rng: random.Random, lengths: tuple[int, int]) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*lengths)))


def prompt_completions(n: int, seed: int):
    """Prompts of 2-3 words, completions of 1-3 (the Trainer appends <eos>): 4-7 tokens."""
    rng = random.Random(seed)
    rows = [(sentences(rng, (2, 3)), " " + sentences(rng, (1, 3))) for _ in range(n)]
    return datasets.Dataset.from_dict(
        {"prompt": [p for p, _ in rows], "completion": [c for _, c in rows]}
    )


def sft_trainer(out: Path, seed: int, store: Path) -> Any:
    """An SFTTrainer on 12 prompt-completion pairs, loss on the completions, recorded."""
    return trl.SFTTrainer(
        model=seeded_llama(),
        args=config(trl.SFTConfig, out, completion_only_loss=True, learning_rate=0.003),
        train_dataset=prompt_completions(12, seed=seed),
        processing_class=word_tokenizer(),
        callbacks=[SourceTrainerCallback(store, stage="sft")],
    )


def config(kind: Any, out: Path, **overrides: Any) -> Any:
    return trainer_arguments(out, kind, num_train_epochs=2, **overrides)


def test_sft_trainer_is_recorded_and_analyzed_on_the_completion_tokens(tmp_path) -> None:
    store = tmp_path / "sft.zarr"
    trainer = sft_trainer(tmp_path / "out", 1, store)
    trainer.train()
    # What the Trainer trained on: the tokenized dataset (prompt tokens labelled -100) and the
    # collator that pads it. analyze() gets both.
    trained = trainer.get_train_dataloader().dataset
    labels = [np.array(trained[i]["labels"]) for i in range(len(trained))]
    assert all((row[:2] == -100).all() and (row[-1] != -100) for row in labels)
    assert len({int((row != -100).sum()) for row in labels}) > 1  # completions of 2-4 tokens

    run = open_run(store)
    (stage,) = run.stages
    assert (stage.name, stage.num_examples, stage.num_steps) == ("sft", 12, 6)
    assert stage.recorded_by == "transformers" and stage.probe is None
    assert run.learning_rates()[0, 0] == 0.003  # linear decay from the base rate
    assert np.isfinite(run.steps()["loss"]).all()

    common = {
        "model": seeded_llama(),
        "train": {"sft": trained},
        "queries": trained.select(range(3)),
        "collate_fn": trainer.data_collator,
        "segments": 1,
        "batch_size": 8,
        "name": None,
        "verbose": False,
    }
    # The probe (each probed example's own loss in training) holds with the completion-token
    # task; a task on every token does not reproduce the training loss and is refused.
    result = analyze(store, task=LanguageModelingTask(), **common)
    scores = result.scores["sft"]
    assert scores.shape == (3, 12) and np.isfinite(scores).all() and np.abs(scores).max() > 0

    class EveryToken(LanguageModelingTask):
        @staticmethod
        def _logits_and_labels(model, batch):
            everything = {**batch, "labels": batch["input_ids"]}
            return LanguageModelingTask._logits_and_labels(model, everything)

    with pytest.raises(AnalysisError, match="do not reproduce the training loss") as refused:
        analyze(store, task=EveryToken(), **common)
    # named as the Trainer computed it, not as a LightningModule would have
    assert "(the Trainer's loss, the model's own, in eval mode)" in str(refused.value)
    assert "training_step" not in str(refused.value)


def test_sft_on_completions_of_different_lengths_weights_examples_by_their_tokens(
    tmp_path,
) -> None:
    """The Trainer's loss is the mean over a step's labelled tokens: longer completions weigh
    more. ``LanguageModelingTask(tokens_per_example=c)``, c the stage's mean labelled tokens
    per example, has that objective as its dataset mean; its probe loss is still each
    example's own token mean, which the probe recorded, so analyze() accepts it."""
    store = tmp_path / "sft.zarr"
    trainer = sft_trainer(tmp_path / "out", 3, store)
    trainer.train()
    trained, collate = trainer.get_train_dataloader().dataset, trainer.data_collator
    # c as the docs say: labelled tokens after the first position (the ones a label predicts).
    counts = [int((np.array(example["labels"][1:]) != -100).sum()) for example in trained]
    assert len(set(counts)) > 1
    task = LanguageModelingTask(tokens_per_example=float(np.mean(counts)))

    model = trainer.model.eval()
    stage = collate([trained[i] for i in range(len(trained))])
    with torch.no_grad():
        token_mean = model(**stage).loss  # the Trainer's objective over the whole stage
        np.testing.assert_allclose(task.loss(model, stage).mean(), token_mean, rtol=1e-5)
        example_mean = LanguageModelingTask().loss(model, stage).mean()
        assert abs(example_mean - token_mean) > 1e-3 * token_mean
        alone = torch.stack([model(**collate([trained[i]])).loss for i in range(4)])
        first = collate([trained[i] for i in range(4)])  # padded to the longest
        np.testing.assert_allclose(task.probe_loss(model, first), alone, rtol=1e-5)
        own = LanguageModelingTask().loss(model, first) * torch.tensor(counts[:4])
        np.testing.assert_allclose(task.loss(model, first) * np.mean(counts), own, rtol=1e-5)

    result = analyze(
        store,
        task=task,
        model=seeded_llama(),
        train={"sft": trained},
        queries=trained.select(range(3)),
        collate_fn=collate,
        segments=1,
        batch_size=8,
        name=None,
        verbose=False,
    )
    assert np.isfinite(result.scores["sft"]).all()


def test_dpo_trainer_is_refused_with_the_reason(tmp_path) -> None:
    rng = random.Random(0)
    pairs = datasets.Dataset.from_dict(
        {
            "prompt": [sentences(rng, (2, 3)) for _ in range(4)],
            "chosen": [" " + sentences(rng, (1, 2)) for _ in range(4)],
            "rejected": [" " + sentences(rng, (1, 2)) for _ in range(4)],
        }
    )
    store = tmp_path / "dpo.zarr"
    trainer = trl.DPOTrainer(
        model=seeded_llama(),
        ref_model=seeded_llama(),  # built here: by default TRL would load it by the model's name
        args=config(trl.DPOConfig, tmp_path / "out"),
        train_dataset=pairs,
        processing_class=word_tokenizer(),
        callbacks=[SourceTrainerCallback(store, stage="dpo")],
    )
    with pytest.raises(SourceCallbackError, match=r"DPOConfig.*reference model"):
        trainer.train()
    assert not store.exists()
