"""A Hugging Face Llama pretrained, then fine-tuned with peft LoRA: which sequences, which stage?

The canonical two-stage flow, recorded as people run it: a ``LlamaForCausalLM`` built from a
config (nothing is downloaded) inside a LightningModule is pretrained on generated stories
("the old fox chases the owl .") with AdamW; then ``peft.get_peft_model`` wraps it with LoRA
adapters on every attention and MLP projection, and only the adapters are fine-tuned on facts
about where each animal lives ("where does the fox live ? in the forest .") with AdamW and a
warmup + cosine schedule. One ``SourceCallback`` records both stages into one store: the second
stage's model has other names (``base_model.model.``, ``.base_layer``) and new tensors (the
adapters), and the record says which tensor continues which. The fine-tuned model completes a
prompt, and ``analyze`` attributes the completion to the sequences of both stages and to each
stage. Needs the ``hf`` extra (``pip install -e ".[hf]"``). About 2 minutes on 2 CPU cores;
``--quick`` about 30 seconds.

    python examples/hf_lora_finetune.py [--store runs/hf_lora.zarr] [--prompt TEXT] [--quick]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lora_language_model import (
    INDEX,
    LENGTH,
    VOCAB,
    Sequences,
    complete,
    encode,
    show,
    train_stages,
    training_sets,
    warmup_cosine,
)
from torch import nn

from source_callback import AnalysisResult, LanguageModelingTask, analyze

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def llama() -> nn.Module:
    """A 2-layer Llama-architecture causal LM over the example's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=LENGTH,
        pad_token_id=INDEX["<pad>"],
        bos_token_id=INDEX["<s>"],
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def with_lora(model: nn.Module) -> nn.Module:
    """``model`` wrapped by peft with rank-4 LoRA adapters on every projection (in place)."""
    from peft import LoraConfig, get_peft_model

    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=projections, lora_dropout=0.0)
    return get_peft_model(model, config)


class CausalLM(pl.LightningModule):
    """A Hugging Face causal LM trained on the mean token loss of its sequences.

    Pretraining uses AdamW at a constant rate; once :meth:`add_lora` has wrapped the model,
    only the adapters train, with AdamW and a warmup + cosine schedule.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.task = LanguageModelingTask()  # training loss = the analysis' loss

    def add_lora(self) -> None:
        """Wrap the model with LoRA adapters; peft freezes the base weights."""
        self.model = with_lora(self.model)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits ``[B, T, V]``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.task.loss(self, batch).mean()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not hasattr(self.model, "peft_config"):
            return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        return warmup_cosine(optimizer, int(self.trainer.estimated_stepping_batches))


def record(store: Path, quick: bool = False, progress: bool = True) -> CausalLM:
    """Pretrain, add LoRA, fine-tune: both stages recorded into ``store`` (replaced)."""
    torch.manual_seed(0)
    model = CausalLM(llama())
    train_stages(store, model, model.add_lora, quick, progress)
    return model


def attribute(
    store: Path, model: CausalLM, prompt: str, quick: bool = False, top: int = 5
) -> tuple[str, AnalysisResult]:
    """Complete ``prompt``, attribute the completion's loss, and print the findings."""
    completion = complete(model, prompt)
    query = Sequences([f"{prompt} {completion}"], prompt_tokens=len(encode(prompt)))
    train = training_sets(quick)
    final = CausalLM(llama())  # the final architecture: the same model with the same adapters
    final.add_lora()
    result = analyze(
        store,
        model=final,  # weights of every stage come from the store
        task="language_modeling",
        train=train,
        queries=query,
        segments=1 if quick else 2,
        batch_size=64,
        verbose=not quick,
    )
    show(model, query, result, train, top)
    return completion, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("runs/hf_lora.zarr"))
    parser.add_argument("--prompt", default="the fox lives in the", help="text to complete")
    parser.add_argument("--quick", action="store_true", help="smaller corpora, shorter training")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small ops: a second thread only adds waiting (see the LoRA example)
    unknown = [w for w in args.prompt.split() if w not in INDEX]
    if unknown:
        parser.error(f"words not in the vocabulary: {unknown}; known: {' '.join(VOCAB[2:])}")
    model = record(args.store, args.quick, progress=not args.quick)
    attribute(args.store, model, args.prompt, args.quick)


if __name__ == "__main__":
    main()
