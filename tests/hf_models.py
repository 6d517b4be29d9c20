"""Tiny Hugging Face models built from configs (no downloads) in a LightningModule."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import Dataset

from source_callback.analysis.task import LanguageModelingTask

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB, LENGTH = 24, 8


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
        attn_implementation="eager",  # differentiable twice (the unrolled ground truth)
    )
    return LlamaForCausalLM(config)


def seeded_llama() -> nn.Module:
    """:func:`tiny_llama` with the weights of seed 0."""
    torch.manual_seed(0)
    return tiny_llama()


def trainer_arguments(out: Any, kind: Any = None, **overrides: Any) -> Any:
    """``TrainingArguments`` (or ``kind``, e.g. TRL's ``SFTConfig``) for a quiet CPU run."""
    from transformers import TrainingArguments

    settings: dict[str, Any] = {
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "num_train_epochs": 1,
        "learning_rate": 0.01,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    return (kind or TrainingArguments)(**{**settings, **overrides})


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_positions=LENGTH,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config)


def tiny_opt() -> nn.Module:
    """OPT: its feed-forward layers and final LayerNorm see the batch's tokens as ``[B·T, n]``."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        ffn_dim=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=LENGTH,
        word_embed_proj_dim=8,
        dropout=0.0,
        attn_implementation="eager",
    )
    return OPTForCausalLM(config)


def add_lora(model: nn.Module, targets: list[str]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, target_modules=targets, lora_dropout=0.0))


class CausalLM(pl.LightningModule):
    """A Hugging Face causal LM trained with AdamW on the mean token loss."""

    def __init__(self, model: nn.Module, lr: float = 0.01, weight_decay: float = 0.01) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.task = LanguageModelingTask()

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch, batch_idx):
        return self.task.loss(self, batch).mean()

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


class TokenSequences(Dataset):
    """Random token sequences as Hugging Face batches (``input_ids``, ``attention_mask``)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long)}


class LabelledSequences(TokenSequences):
    """Token sequences with ``labels`` (the Hugging Face models' own loss needs them)."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class SameNames(pl.LightningModule):
    """A causal LM trained by Lightning under the LM's own tensor names, on its own loss.

    The module holds the LM's children (``model``, ``lm_head``), not the LM, so its parameters
    are named as the Hugging Face ``Trainer`` names them: stages of one store recorded by
    either framework name the same tensors alike. ``training_step`` is ``lm(**batch).loss``,
    the ``Trainer``'s loss.
    """

    def __init__(self, lm: nn.Module, optimizer, scheduler=None) -> None:
        super().__init__()
        for name, child in lm.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "lm", lm)  # not a child: no "lm." prefix
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler

    def training_step(self, batch, batch_idx):
        return self.lm(**batch).loss

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
