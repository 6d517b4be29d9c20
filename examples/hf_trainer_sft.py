"""Pretraining with the Hugging Face ``Trainer``, then SFT with TRL's ``SFTTrainer``, attributed.

A ``LlamaForCausalLM`` built from a config (nothing is downloaded) with a word-level tokenizer
built in code is pretrained with the plain ``Trainer`` on generated sentences ("the fox chases
the owl ."), then fine-tuned with ``SFTTrainer`` on prompt-completion pairs ("where does the fox
live ?" -> " in the forest .") with the loss on the completion tokens only. One
``SourceTrainerCallback`` in ``callbacks=[...]`` records both stages into one store, and
``analyze`` attributes the model's answers to the examples of both stages and to each stage,
with the task that matches SFT's loss (``LanguageModelingTask`` reads the ``labels`` the
trainers built: -100 on the prompt) and the collator the trainers padded with. Needs the ``hf``
extra (``pip install -e ".[hf]"``). About a minute on 2 CPU cores; ``--quick`` a few seconds.

    python examples/hf_trainer_sft.py [--store runs/hf_sft.zarr] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from source_callback import AnalysisResult, LanguageModelingTask, SourceTrainerCallback, analyze

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ANIMALS = {"fox": "forest", "owl": "barn", "fish": "river", "bee": "hive", "mole": "field"}
VERBS = ["chases", "sees", "follows", "greets"]
WORDS = sorted(
    {"the", ".", "where", "does", "live", "?", "in", *ANIMALS, *ANIMALS.values(), *VERBS}
)


def tokenizer() -> Any:
    """A word-level tokenizer over the example's words (with ``<pad>`` and ``<eos>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate([*WORDS, "<pad>", "<eos>"])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>"
    )


def llama(vocab_size: int) -> torch.nn.Module:
    """A 2-layer Llama-architecture causal LM, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(config)


def pretraining_set(tok: Any, n: int, seed: int = 0) -> Any:
    """Sentences "the A verb the B ." tokenized, every token carrying loss."""
    import datasets

    rng = random.Random(seed)
    animals = list(ANIMALS)
    texts = [
        f"the {rng.choice(animals)} {rng.choice(VERBS)} the {rng.choice(animals)} ."
        for _ in range(n)
    ]
    ids = [tok(text)["input_ids"] + [tok.eos_token_id] for text in texts]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def sft_set(repeats: int) -> Any:
    """Prompt-completion pairs: where each animal lives."""
    import datasets

    pairs = [(f"where does the {a} live ?", f" in the {p} .") for a, p in ANIMALS.items()]
    pairs = pairs * repeats
    return datasets.Dataset.from_dict(
        {"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]}
    )


def run(store: str | os.PathLike[str], *, quick: bool = False, verbose: bool = True) -> Any:
    """Record both stages into ``store`` and attribute three answers; returns the result."""
    import trl
    from transformers import Trainer, TrainingArguments

    tok = tokenizer()
    model = llama(len(tok))
    collator = trl.trainer.sft_trainer.DataCollatorForLanguageModeling(tok.pad_token_id)
    common: dict[str, Any] = {
        "per_device_train_batch_size": 8,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    out = Path(store).parent / "trainer_output"
    callback = SourceTrainerCallback(
        store, stage="pretrain", checkpoints_per_stage=2 if quick else 6
    )

    # Stage 1: the plain Trainer, language modeling on every token.
    pretrain = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out), num_train_epochs=1 if quick else 4, learning_rate=3e-3, **common
        ),
        train_dataset=pretraining_set(tok, 32 if quick else 256),
        data_collator=collator,
        callbacks=[callback],
    )
    pretrain.train()

    # Stage 2: TRL's SFTTrainer, the loss on the completion tokens only.
    callback.next_stage("sft")
    sft = trl.SFTTrainer(
        model=model,
        args=trl.SFTConfig(
            output_dir=str(out),
            num_train_epochs=1 if quick else 8,
            learning_rate=1e-3,
            completion_only_loss=True,
            gradient_checkpointing=False,
            **common,
        ),
        train_dataset=sft_set(2 if quick else 4),
        processing_class=tok,
        callbacks=[callback],
    )
    sft.train()

    # What each Trainer trained on: its tokenized, column-pruned dataset (analyze checks it
    # against the recorded size and digests) and the collator that padded it.
    trained = {
        "pretrain": pretrain.get_train_dataloader().dataset,
        "sft": sft.get_train_dataloader().dataset,
    }
    queries = trained["sft"].select(range(3))
    result = analyze(
        store,
        model=llama(len(tok)),
        task=LanguageModelingTask(),
        train=trained,
        queries=queries,
        collate_fn=collator,
        segments=1 if quick else 2,
        batch_size=16,
        verbose=False,
    )
    if verbose:
        show(result, trained, queries, tok)
    return result


def _text(tok: Any, example: dict[str, Any]) -> str:
    """The example's text, its loss-free (prompt) tokens in brackets."""
    words = [
        tok.convert_ids_to_tokens(t) if label != -100 else f"[{tok.convert_ids_to_tokens(t)}]"
        for t, label in zip(example["input_ids"], example["labels"], strict=True)
    ]
    return " ".join(words)


def show(result: AnalysisResult, trained: dict[str, Any], queries: Any, tok: Any) -> None:
    """Print, per query, the most helpful example of each stage and the stage effects."""
    for q in range(len(queries)):
        print(f"query: {_text(tok, queries[q])}")
        for stage, scores in result.scores.items():
            best = int(np.argmax(scores[q]))
            print(f"  most helpful in {stage}: {_text(tok, trained[stage][best])}")
        effects = ", ".join(
            f"{name} {value:+.3g}"
            for name, value in zip(result.scores, result.stage_effects[q], strict=True)
        )
        print(f"  stage effects: {effects}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="runs/hf_sft.zarr")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if Path(args.store).exists():
        raise SystemExit(f"{args.store} exists; choose a new --store")
    run(args.store, quick=args.quick)


if __name__ == "__main__":
    main()
