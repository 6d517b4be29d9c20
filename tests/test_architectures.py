"""Per-example gradients on Hugging Face architectures (built from configs) against autograd.

Each tiny model goes through :func:`check_capture`, the check ``analyze`` makes before its first
pass: on four examples, every unit's captured gradient of an example in the batch equals its
gradient captured alone, and their sum autograd's gradient of the batch's loss. The models
cover the layouts real runs bring: fused projections, biases, tied embeddings, embeddings with
their own ``forward`` (OPT's positions, Gemma's scaled rows), feed-forward layers on flattened
``[B·T, n]`` rows (OPT), windows (Swin), patch convolutions (ViT), batch norm (ResNet), and peft
adapters (LoRA, DoRA, a saved head, LoRA on the embeddings, whose parameters sit in a
``ParameterDict`` its module uses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hf_models import LENGTH, VOCAB, Pairs, tiny_bart, tiny_opt, tiny_t5
from torch import nn

from source_callback.analysis.capture_check import check_capture
from source_callback.analysis.task import ClassificationTask, LanguageModelingTask, Seq2SeqTask
from source_callback.analysis.units import find_units
from source_callback.errors import AnalysisError

transformers = pytest.importorskip("transformers")

ATTENTION = {"attn_implementation": "eager"}
DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": LENGTH,
    **ATTENTION,
}
ENCODER = {
    "vocab_size": VOCAB,
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "max_position_embeddings": 16,
    "num_labels": 3,
    **ATTENTION,
}


def _peft(model: nn.Module, **options: Any) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, **{"target_modules": ["q_proj", "v_proj"], **options})
    wrapped = get_peft_model(model, config)
    for name, param in wrapped.named_parameters():
        if "lora_B" in name or "lora_embedding" in name:  # B (embeddings: A) starts at zero
            nn.init.normal_(param)
    return wrapped


def _llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER))


LANGUAGE: dict[str, Callable[[], nn.Module]] = {
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**DECODER)),
    "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**DECODER, head_dim=4)),
    "phi3": lambda: transformers.Phi3ForCausalLM(
        transformers.Phi3Config(**DECODER, pad_token_id=0)
    ),
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=LENGTH,
            **ATTENTION,
        )
    ),
    "opt": tiny_opt,
    "bloom": lambda: transformers.BloomForCausalLM(
        transformers.BloomConfig(vocab_size=VOCAB, hidden_size=8, n_layer=1, n_head=2)
    ),
    "falcon": lambda: transformers.FalconForCausalLM(
        transformers.FalconConfig(
            vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2
        )
    ),
    "llama-lora": lambda: _peft(_llama()),
    "llama-dora": lambda: _peft(_llama(), use_dora=True),
    "llama-lora-saved-head": lambda: _peft(_llama(), modules_to_save=["lm_head"]),
    "llama-lora-embeddings": lambda: _peft(_llama(), target_modules=["q_proj", "embed_tokens"]),
}

SEQ2SEQ: dict[str, Callable[[], nn.Module]] = {
    "t5": tiny_t5,
    "bart": tiny_bart,
    "t5-lora": lambda: _peft(tiny_t5(), target_modules=["q", "v"]),
    "bart-lora": lambda: _peft(tiny_bart()),
}

IMAGES: dict[str, Callable[[], nn.Module]] = {
    "vit": lambda: transformers.ViTForImageClassification(
        transformers.ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=3,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            num_labels=3,
        )
    ),
    "resnet": lambda: transformers.ResNetForImageClassification(
        transformers.ResNetConfig(
            num_channels=3,
            embedding_size=8,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            num_labels=3,
            layer_type="basic",
        )
    ),
    "swin": lambda: transformers.SwinForImageClassification(
        transformers.SwinConfig(
            image_size=8,
            patch_size=2,
            num_channels=3,
            embed_dim=8,
            depths=[1],
            num_heads=[2],
            window_size=2,
            num_labels=3,
        )
    ),
}


class LM(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class Classifier(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).logits


def _units(model: nn.Module, exclude: str = "relative_position_bias") -> dict[str, Any]:
    found = find_units(model).units
    return {name: unit for name, unit in found.items() if exclude not in name}


@pytest.mark.parametrize("build", sorted(LANGUAGE))
def test_language_models_capture_their_examples_gradients(build: str) -> None:
    torch.manual_seed(0)
    model = LM(LANGUAGE[build]()).double().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, LENGTH), generator=g)
    examples = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    assert not find_units(model).uncovered  # Gemma's scaled embedding, tied to its head, too
    check_capture(model, _units(model), LanguageModelingTask().loss, examples)


def _pairs() -> list[dict[str, torch.Tensor]]:
    data = Pairs(4, seed=1, padded=True)
    return [data[i] for i in range(len(data))]


@pytest.mark.parametrize("build", sorted(SEQ2SEQ))
def test_encoder_decoders_capture_their_examples_gradients(build: str) -> None:
    """BART's decoder positions (``[1, T, n]`` for the batch) are expanded to it; T5's relative
    position biases are left out (below)."""
    torch.manual_seed(0)
    model = SEQ2SEQ[build]().double().eval()
    assert not find_units(model).uncovered
    units = _units(model, "relative_attention_bias")
    check_capture(model, units, Seq2SeqTask().loss, _pairs())


def test_t5_relative_position_biases_are_refused_together() -> None:
    """T5 permutes its ``[T, T, heads]`` bias table, so it cannot be expanded to the batch: one
    error names the encoder's and the decoder's, with the exclusion that leaves both out."""
    torch.manual_seed(0)
    model = tiny_t5().double().eval()
    biases = [
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias"
        for stack in ("decoder", "encoder")
    ]
    with pytest.raises(AnalysisError) as error:
        check_capture(model, find_units(model).units, Seq2SeqTask().loss, _pairs())
    assert "are called on tensors shared by the batch" in str(error.value)
    assert f"modules={{'exclude': {biases!r}}}" in str(error.value)


@pytest.mark.parametrize("build", sorted(IMAGES))
def test_image_models_capture_their_examples_gradients(build: str) -> None:
    """Swin's relative position bias is left out: expanded to the batch it no longer fits the
    windows it is added to (an error names it, ``test_units``)."""
    torch.manual_seed(0)
    model = Classifier(IMAGES[build]()).double().eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (4,), generator=g)
    examples = list(zip(images, labels, strict=True))
    check_capture(model, _units(model), ClassificationTask().loss, examples)
