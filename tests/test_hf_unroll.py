"""SOURCE scores on a tiny GPT-2 (tie, Conv1D, embeddings, LayerNorms: every unit kind)
against the exact unrolled leave-one-out derivative of its recorded SGD run."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
from hf_models import LENGTH, TokenSequences
from test_analyze import _replay_steps, _spearman
from test_hf_models import LM
from torch.nn import functional as F
from torch.utils.data import DataLoader
from unroll import call, leave_one_out_effects, sgd_replay

from source_callback import SourceCallback, analyze, open_run

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
N, BATCH, EPOCHS, LR = 16, 4, 3, 0.1


class SgdLM(LM):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def _token_nll(model, params, ids: torch.Tensor) -> torch.Tensor:
    logits = call(model, params, ids)[:, :-1]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    return nll.reshape(len(ids), LENGTH - 1)


def test_gpt2_scores_correlate_with_exact_unrolling(tmp_path) -> None:
    data, queries = TokenSequences(N, seed=1), TokenSequences(4, seed=2)
    model = SgdLM("gpt2").double()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    store = tmp_path / "run.zarr"
    pl.Trainer(
        accelerator="cpu",
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SourceCallback(store, stage="lm", checkpoints_per_stage=6)],
    ).fit(model, DataLoader(data, batch_size=BATCH))
    lrs = open_run(store).learning_rates()[:, 0]
    steps = _replay_steps(N, BATCH, EPOCHS)

    def final(weights):
        loss = lambda m, p, idx: _token_nll(m, p, data.ids[idx]).mean(1)  # noqa: E731
        return sgd_replay(model, start, steps, loss, lrs, weights)

    truth = leave_one_out_effects(
        model, final, lambda m, p: _token_nll(m, p, queries.ids).sum(1), N
    ).numpy()
    result = analyze(
        store,
        model=SgdLM("gpt2").double(),
        task="language_modeling",
        train={"lm": data},
        queries=queries,
        segments=2,
        batch_size=8,
        name=None,
        verbose=False,
    )
    scores = result.scores["lm"]
    rho = _spearman(scores, truth)
    scale = float((scores * truth).sum() / (scores * scores).sum())
    print(f"GPT-2 SGD: Spearman {rho:.3f}, scale truth/estimate {scale:.2f}")
    # measured: 0.433 (scale 0.21) with tests/hf_models.py's GPT-2 (vocabulary 24, 8 tokens);
    # on a vocabulary of 11 and 6 tokens 0.385, of which leaving out the embeddings and
    # LayerNorms kept 0.256 and TracInCP reached 0.168.
    assert rho > 0.3
