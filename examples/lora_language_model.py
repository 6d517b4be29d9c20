"""Which training sequences made a LoRA-fine-tuned language model generate this completion?

A small causal transformer (2 layers, width 64, a word-level vocabulary built here) is
pretrained on generated stories ("the old fox chases the owl .", "a hare sleeps in the pond .",
any animal anywhere) and then fine-tuned on facts about where each animal lives ("the quick fox
lives in the forest .", "where does the fox live ? in the forest ."). Every attention and MLP
projection carries a LoRA adapter from the start: frozen (and zero) while pretraining; in the
fine-tuning stage only the adapters train, the base weights frozen, with AdamW and a warmup +
cosine schedule. Both stages are recorded into one store. The fine-tuned model then completes
a prompt, and ``analyze`` attributes the completion's negative log-likelihood to the training
sequences of both stages and to each stage as a whole. About 1.5 minutes on 2 CPU cores;
``--quick`` (smaller corpora, fewer checkpoints and segments) about 20 seconds.

    python examples/lora_language_model.py [--store runs/lora_lm.zarr] [--prompt TEXT] [--quick]
"""

from __future__ import annotations

import argparse
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from torch.utils.data import DataLoader, Dataset

from source_callback import AnalysisResult, LanguageModelingTask, SourceCallback, analyze

ANIMALS = ("fox", "owl", "hare", "wolf", "bear", "frog", "crow", "deer")
PLACES = ("forest", "barn", "meadow", "cave", "den", "pond", "field", "hill")
HOMES = dict(zip(ANIMALS, PLACES, strict=True))  # the facts taught by fine-tuning
ADJECTIVES = ("old", "young", "small", "big", "quick", "quiet")  # or none: see corpus()
VERBS = ("sees", "chases", "follows", "finds")
MOTIONS = ("runs", "walks", "swims", "flies")
SOUNDS = ("yelps", "hoots", "thumps", "howls", "growls", "croaks", "caws", "bells")  # by animal
STORIES = (  # pretraining: any animal, anywhere
    "the {adj} {animal} {verb} the {other} .",
    "the {adj} {animal} {sound} at the {other} .",
    "the {animal} {motion} to the {place} .",
    "a {adj} {animal} sleeps in the {place} .",
)
FACTS = (  # fine-tuning: each animal at its home
    "the {adj} {animal} lives in the {home} .",
    "the {adj} {animal} {motion} home to the {home} .",
    "where does the {adj} {animal} live ? in the {home} .",
    "in the {home} lives the {adj} {animal} .",
)
PAD, BOS = "<pad>", "<s>"
WORDS = ("the", "a", "at", "to", "in", "home", "sleeps", "lives", "where", "does", "live", "?", ".")
VOCAB = (PAD, BOS, *WORDS, *ANIMALS, *PLACES, *ADJECTIVES, *VERBS, *MOTIONS, *SOUNDS)
INDEX = {word: i for i, word in enumerate(VOCAB)}
LENGTH = 12  # tokens per sequence: <s>, at most 10 words, padding


@dataclass(frozen=True)
class Settings:
    """Corpus sizes, training lengths, checkpoints per stage and segments per stage of a run."""

    stories: int
    facts: int
    pretrain_epochs: int
    finetune_epochs: int
    checkpoints: int
    segments: int


FULL = Settings(2000, 400, pretrain_epochs=4, finetune_epochs=16, checkpoints=4, segments=2)
QUICK = Settings(400, 160, pretrain_epochs=6, finetune_epochs=30, checkpoints=2, segments=1)


def corpus(templates: tuple[str, ...], count: int, seed: int) -> list[str]:
    """``count`` sentences, each from a random template with random slot fillers."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        animal, other = rng.sample(ANIMALS, 2)
        sentences.append(
            rng.choice(templates).format(
                adj=rng.choice(("", *ADJECTIVES)),  # split() drops the gap
                animal=animal,
                other=other,
                verb=rng.choice(VERBS),
                motion=rng.choice(MOTIONS),
                place=rng.choice(PLACES),
                home=HOMES[animal],
                sound=SOUNDS[ANIMALS.index(animal)],
            )
        )
    return sentences


def encode(text: str) -> list[int]:
    """Token ids of a sentence, after ``<s>``."""
    return [INDEX[BOS], *(INDEX[word] for word in text.split())]


def decode(ids: torch.Tensor) -> str:
    """The words of a sequence, without ``<s>`` and padding."""
    return " ".join(VOCAB[i] for i in ids.tolist() if VOCAB[i] not in (PAD, BOS))


class Sequences(Dataset):
    """Token sequences padded to ``LENGTH``, as ``{"input_ids", "attention_mask"}`` items.

    With ``prompt_tokens``, items also carry ``labels`` that exclude the first
    ``prompt_tokens`` tokens: the loss and the measurement are then the completion's alone.
    """

    def __init__(self, texts: list[str], prompt_tokens: int | None = None) -> None:
        self.ids = torch.full((len(texts), LENGTH), INDEX[PAD])
        self.mask = torch.zeros(len(texts), LENGTH, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = encode(text)
            self.ids[row, : len(ids)] = torch.tensor(ids)
            self.mask[row, : len(ids)] = 1
        self.labels = None
        if prompt_tokens is not None:
            self.labels = self.ids.clone()
            self.labels[:, :prompt_tokens] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.ids[i], "attention_mask": self.mask[i]}
        return item if self.labels is None else {**item, "labels": self.labels[i]}


def training_sets(quick: bool = False) -> dict[str, Sequences]:
    """Each stage's training set by stage name, in training order."""
    settings = QUICK if quick else FULL
    return {
        "pretrain": Sequences(corpus(STORIES, settings.stories, seed=1)),
        "finetune": Sequences(corpus(FACTS, settings.facts, seed=2)),
    }


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) · B(A(x))``: a linear layer with a low-rank adapter.

    ``B`` starts at zero, so the adapter leaves the layer unchanged until it is trained.
    """

    def __init__(self, d_in: int, d_out: int, rank: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.lora_a = nn.Linear(d_in, rank, bias=False)
        self.lora_b = nn.Linear(rank, d_out, bias=False)
        nn.init.zeros_(self.lora_b.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_b(self.lora_a(x))


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (LoRALinear(width, width) for _ in range(4))
        self.fc1, self.fc2 = LoRALinear(width, 2 * width), LoRALinear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        h = self.norm1(x)
        heads = (f(h).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        q, k, v = heads
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attended.transpose(1, 2).reshape(b, t, w))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TransformerLM(pl.LightningModule):
    """A causal transformer language model whose linear projections carry LoRA adapters.

    Pretraining (``stage = "pretrain"``) trains everything but the adapters; ``finetune()``
    freezes the base model and trains only the adapters.
    """

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), width)
        self.position = nn.Embedding(LENGTH, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, len(VOCAB))
        self.task = LanguageModelingTask()  # training loss = the analysis' loss
        self.stage = "pretrain"
        for name, param in self.named_parameters():
            param.requires_grad_(".lora_" not in name)

    def finetune(self) -> None:
        """Switch to the LoRA stage: only the adapters train."""
        self.stage = "finetune"
        for name, param in self.named_parameters():
            param.requires_grad_(".lora_" in name)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits ``[B, T, V]``.

        ``attention_mask`` is not needed: sequences are right-padded, and causal attention
        keeps padding out of every real position's context.
        """
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.task.loss(self, batch).mean()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.stage == "pretrain":
            return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
        optimizer = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)
        return warmup_cosine(optimizer, int(self.trainer.estimated_stepping_batches))


def warmup_cosine(optimizer: torch.optim.Optimizer, total: int) -> dict[str, Any]:
    """Lightning's optimizer configuration: a linear warmup over a tenth of ``total`` steps,
    then cosine decay, stepped every optimizer step."""
    warmup = max(1, total // 10)
    scheduler = SequentialLR(
        optimizer,
        [
            LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup),
            CosineAnnealingLR(optimizer, T_max=max(1, total - warmup)),
        ],
        milestones=[warmup],
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def record(store: Path, quick: bool = False, progress: bool = True) -> TransformerLM:
    """Pretrain, then LoRA-fine-tune, recording both stages into ``store`` (replaced)."""
    torch.manual_seed(0)
    model = TransformerLM()
    train_stages(store, model, model.finetune, quick, progress)
    return model


def train_stages(
    store: Path,
    model: pl.LightningModule,
    start_finetuning: Callable[[], None],
    quick: bool = False,
    progress: bool = True,
) -> None:
    """Train ``model`` on the stories, then (after ``start_finetuning()``) on the facts,
    recording both stages into ``store`` (replaced)."""
    if store.exists():
        shutil.rmtree(store)
    settings = QUICK if quick else FULL
    callback = SourceCallback(store, checkpoints_per_stage=settings.checkpoints)
    data = training_sets(quick)
    for name, epochs, batch_size in (
        ("pretrain", settings.pretrain_epochs, 32),
        ("finetune", settings.finetune_epochs, 16),
    ):
        if name == "finetune":
            start_finetuning()
        callback.next_stage(name)
        pl.Trainer(
            accelerator="cpu",
            max_epochs=epochs,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
            default_root_dir=str(store.parent),
        ).fit(model, DataLoader(data[name], batch_size=batch_size, shuffle=True))


@torch.no_grad()
def complete(model: nn.Module, prompt: str, max_words: int = 6) -> str:
    """The model's greedy completion of ``prompt``, up to a full stop."""
    model.eval()
    ids = encode(prompt)
    words: list[str] = []
    while len(words) < max_words and len(ids) < LENGTH and "." not in words:
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(token)
        words.append(VOCAB[token])
    return " ".join(words)


def attribute(
    store: Path, model: nn.Module, prompt: str, quick: bool = False, top: int = 5
) -> tuple[str, AnalysisResult]:
    """Complete ``prompt``, attribute the completion's loss, and print the findings.

    Returns
    -------
    completion, result
        The generated words and the analysis (also stored under ``analyses/default``).
    """
    completion = complete(model, prompt)
    query = Sequences([f"{prompt} {completion}"], prompt_tokens=len(encode(prompt)))
    train = training_sets(quick)
    result = analyze(
        store,
        model=TransformerLM(),  # the architecture; weights and frozen parts come from the store
        task="language_modeling",  # measurement: the completion's summed negative log-lik.
        train=train,
        queries=query,
        segments=(QUICK if quick else FULL).segments,
        batch_size=64,
        verbose=not quick,
    )
    show(model, query, result, train, top)
    return completion, result


def show(
    model: nn.Module,
    query: Sequences,
    result: AnalysisResult,
    train: dict[str, Sequences],
    top: int,
) -> None:
    """Print the query, its most helpful and harmful training sequences, and stage effects."""
    with torch.no_grad():
        nll = float(LanguageModelingTask().measurement(model, next(iter(DataLoader(query)))))
    prompt_tokens = int((query.labels[0] == -100).sum())
    prompt, completion = decode(query.ids[0, :prompt_tokens]), decode(query.ids[0, prompt_tokens:])
    print(f"\nprompt:     {prompt}\ncompletion: {completion}   (negative log-likelihood {nll:.3f})")
    first, last = result.stage_names
    for stage, title in ((last, "fine-tuning facts"), (first, "pretraining stories")):
        order = result.scores[stage][0].argsort()
        for side, indices in (("helpful", order[::-1][:top]), ("harmful", order[:top])):
            print(f"\nmost {side} {title} (score: the loss's rise if removed)")
            for i in indices:
                text = decode(train[stage].ids[i])
                print(f"  {result.scores[stage][0, i]:+.2e}  #{i:<5} {text}")
    effects = ", ".join(
        f"{name} {value:+.3f}"
        for name, value in zip(result.stage_names, result.stage_effects[0], strict=True)
    )
    print(f"\nstage effects on the completion's loss (removing the stage): {effects}")
    exact = result.last_stage_exact[0]
    print(f"exact effect of removing {last}: {exact:+.3f} (the above is first order)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("runs/lora_lm.zarr"))
    parser.add_argument("--prompt", default="the fox lives in the", help="text to complete")
    parser.add_argument("--quick", action="store_true", help="smaller corpora, shorter training")
    args = parser.parse_args()
    # ~60 small ops per step: a second intra-op thread only adds waiting, and on a busy
    # 2-core machine made training 20 times slower
    torch.set_num_threads(1)
    unknown = [w for w in args.prompt.split() if w not in INDEX]
    if unknown:
        parser.error(f"words not in the vocabulary: {unknown}; known: {' '.join(VOCAB[2:])}")
    model = record(args.store, args.quick, progress=not args.quick)
    attribute(args.store, model, args.prompt, args.quick)


if __name__ == "__main__":
    main()
