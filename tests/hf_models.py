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


def tiny_t5() -> nn.Module:
    """T5: relative position biases (a ``[T, T, heads]`` table shared by the batch), a shared
    embedding tied to both stacks and the head, RMS norms, no biases."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB,
        d_model=8,
        d_kv=4,
        d_ff=16,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        attn_implementation="eager",
    )
    return T5ForConditionalGeneration(config)


def tiny_bart() -> nn.Module:
    """BART: learned positions (the decoder's ``[1, T, n]``, shared by the batch), a scaled
    embedding tied to both stacks and the head, LayerNorms and biases."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=VOCAB,
        d_model=8,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        max_position_embeddings=16,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        scale_embedding=True,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        attn_implementation="eager",
    )
    return BartForConditionalGeneration(config)


def loss_scaled_trainer(init_scale: float) -> type:
    """A ``Trainer`` with fp16's loss scaling on CPU (fp16 needs a GPU): accelerate's
    GradScaler, given ``init_scale``, scales the loss and unscales the gradients before the
    Trainer clips them, as accelerate does for fp16."""
    from transformers import Trainer

    class LossScaled(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)

        def _clip_grad_norm(self, model: nn.Module) -> Any:
            self.accelerator.scaler.unscale_(self.optimizer.optimizer)
            return super()._clip_grad_norm(model)

    return LossScaled


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


class Pairs(Dataset):
    """Source sequences and 5-token targets computed from them.

    ``padded`` pads the source of every other example (``attention_mask`` 0 on its last two
    tokens) and marks the last target of every third as no loss (``-100``), as
    ``DataCollatorForSeq2Seq`` pads them.
    """

    def __init__(self, n: int, seed: int, padded: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, LENGTH), generator=g)
        self.labels = (self.ids[:, :5] * 5 + 1) % (VOCAB - 3) + 3
        self.mask = torch.ones(n, LENGTH, dtype=torch.long)
        if padded:
            self.mask[1::2, -2:] = 0
            self.labels[::3, -1] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class Seq2SeqLM(pl.LightningModule):
    """An encoder-decoder trained on its own loss (the token mean of the batch's targets)."""

    def __init__(self, model: nn.Module, optimizer: str = "adamw", lr: float = 0.01) -> None:
        super().__init__()
        self.model = model
        self.optimizer, self.lr = optimizer, lr

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)
