"""The language-modeling task: losses, masks, the sampled Fisher, and analyze() end to end."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from source_callback import SourceCallback, analyze, open_run
from source_callback.analysis import task as task_module
from source_callback.analysis.ekfac import covariances, tracked_modules
from source_callback.analysis.task import LanguageModelingTask, sample_labels

VOCAB, WIDTH, LENGTH = 7, 5, 6


class TinyLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.task = LanguageModelingTask()

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.embed(input_ids)))

    def training_step(self, batch, batch_idx):
        return self.task.loss(self, batch).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


class Sequences(Dataset):
    def __init__(self, n: int, seed: int, pad_from: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
        self.mask = torch.ones(n, LENGTH, dtype=torch.long)
        if pad_from is not None:
            self.mask[::2, pad_from:] = 0  # every other sequence is shorter

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


def _batch(ds: Dataset) -> dict[str, torch.Tensor]:
    return next(iter(DataLoader(ds, batch_size=len(ds))))


def test_losses_follow_the_shifted_tokens_and_masks() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    batch = _batch(Sequences(4, seed=0, pad_from=4))
    logits = model(batch["input_ids"])
    logp = torch.log_softmax(logits, -1)[:, :-1]
    targets = batch["input_ids"][:, 1:]
    token_nll = -logp.gather(-1, targets[..., None])[..., 0]
    keep = batch["attention_mask"][:, 1:].bool()
    expected_sum = (token_nll * keep).sum(1)
    task = LanguageModelingTask()
    torch.testing.assert_close(task.measurement(model, batch), expected_sum)
    torch.testing.assert_close(task.loss(model, batch), expected_sum / keep.sum(1))
    assert keep.sum(1).tolist() == [3, 5, 3, 5]
    fixed = LanguageModelingTask(tokens_per_example=4.0)
    torch.testing.assert_close(fixed.loss(model, batch), expected_sum / 4)
    labels = {**batch, "labels": torch.full_like(batch["input_ids"], -100)}
    assert torch.all(task.measurement(model, labels) == 0)


@pytest.mark.parametrize("bad", [0, -3.5, float("nan"), float("inf"), "64"])
def test_tokens_per_example_must_be_a_positive_number(bad) -> None:
    with pytest.raises(ValueError, match="tokens_per_example must be a positive number"):
        LanguageModelingTask(tokens_per_example=bad)


def test_sampled_fisher_of_the_head_is_unbiased() -> None:
    """E[Σ_t s_t s_tᵀ] over sampled next tokens equals Σ_t (diag p_t − p_t p_tᵀ) / n²."""
    torch.manual_seed(1)
    model = TinyLM().double()
    data = Sequences(3000, seed=2)
    batches = list(DataLoader(data, batch_size=500))
    modules = {"head": tracked_modules(model)["head"]}
    gen = torch.Generator().manual_seed(0)
    sampled = covariances(model, modules, LanguageModelingTask(), batches, gen)["head"].mean()[1]
    with torch.no_grad():
        p = torch.softmax(model(data.ids)[:, :-1].double(), -1)  # [N, T-1, V]
        n = LENGTH - 1
        exact = (torch.diag_embed(p) - p[..., :, None] * p[..., None, :]).sum(1).mean(0) / n**2
    torch.testing.assert_close(sampled, exact, rtol=0.08, atol=2e-3)


def test_sampled_labels_follow_the_softmax_whatever_the_blocks(monkeypatch) -> None:
    """Drawn labels have the softmax's frequencies; the blocks they are drawn in change none."""
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, float("-inf"), -3.0]).repeat(2, 50_000, 1)
    drawn = sample_labels(logits, torch.Generator().manual_seed(0))
    assert drawn.shape == (2, 50_000) and drawn.dtype == torch.long
    counts = torch.bincount(drawn.flatten(), minlength=6).double()
    expected = torch.softmax(logits[0, 0].double(), 0) * drawn.numel()
    assert counts[4] == 0  # probability zero: never drawn
    seen = expected > 0
    chi2 = float((((counts - expected)[seen]) ** 2 / expected[seen]).sum())
    assert chi2 < 20.5  # 5 degrees of freedom (the 5 classes that can be drawn): p = 0.001
    monkeypatch.setattr(task_module, "SAMPLING_BLOCK", 7 * 6)  # 7 rows per block
    again = sample_labels(logits, torch.Generator().manual_seed(0))
    assert torch.equal(again, drawn)


def test_analyze_a_language_model_record(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    data = Sequences(24, seed=3, pad_from=4)
    pl.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SourceCallback(tmp_path / "lm.zarr", stage="lm")],
    ).fit(model, DataLoader(data, batch_size=4))
    queries = Sequences(3, seed=4)
    result = analyze(
        tmp_path / "lm.zarr",
        model=TinyLM(),
        task="language_modeling",
        train={"lm": data},
        queries=queries,
        segments=2,
        verbose=False,
        name=None,
    )
    scores = result.scores["lm"]
    assert scores.shape == (3, 24) and np.isfinite(scores).all() and np.abs(scores).max() > 0
    assert result.config["modules"] == ["embed", "head"]  # embeddings are units too
    # the last stage's exact effect: f at the stage's start minus f at the end
    start = TinyLM()
    start.load_state_dict(open_run(tmp_path / "lm.zarr").checkpoints[0].params())
    task, batch = LanguageModelingTask(), _batch(queries)
    with torch.no_grad():
        expected = task.measurement(start, batch) - task.measurement(model, batch)
    np.testing.assert_allclose(result.last_stage_exact, expected.double().numpy(), rtol=1e-5)
    assert np.isfinite(result.stage_effects).all()

    # A query whose labels are all -100 measures nothing: zero scores, and said so.
    masked = [{**queries[i], "labels": queries[i]["input_ids"]} for i in range(3)]
    masked[1]["labels"] = torch.full((LENGTH,), -100)
    with pytest.warns(UserWarning, match=r"1 query has a measurement with no gradient \(1\)"):
        nothing = analyze(
            tmp_path / "lm.zarr", model=TinyLM(), task="language_modeling", train={"lm": data},
            queries=masked, segments=1, verbose=False, name=None,
        )  # fmt: skip
    rows = np.abs(nothing.scores["lm"]).max(1)
    assert rows[1] == 0 and (rows[[0, 2]] > 0).all()
