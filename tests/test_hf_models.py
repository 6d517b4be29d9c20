"""Tiny Hugging Face GPT-2 and Llama (built from configs) recorded and analyzed end to end.

Every trained parameter is attributed through (coverage 1.0): GPT-2's ``Conv1D`` projections,
its tied ``wte``/``lm_head``, position embeddings, LayerNorms and biases; Llama's embeddings,
RMSNorm weights and linear layers. ``modules=`` narrows the units, and the memory estimate stops
an analysis that will not fit before any pass.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hf_models import CausalLM, TokenSequences, tiny_gpt2, tiny_llama
from torch.utils.data import DataLoader

from source_callback import AnalysisError, ModuleSelection, SourceCallback, analyze

pytest.importorskip("transformers")

BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


class LM(CausalLM):
    """The tiny GPT-2 or Llama, seeded, trained with AdamW on next-token cross-entropy."""

    def __init__(self, build: str) -> None:
        torch.manual_seed(0)
        super().__init__(BUILDERS[build]())


def _record(tmp_path, build: str) -> tuple[str, TokenSequences]:
    data = TokenSequences(16, seed=1)
    store = str(tmp_path / f"{build}.zarr")
    pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SourceCallback(store, stage="lm")],
    ).fit(LM(build), DataLoader(data, batch_size=4))
    return store, data


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def recorded(request, tmp_path_factory):
    return request.param, *_record(tmp_path_factory.mktemp(request.param), request.param)


def _analyze(recorded, **options):
    build, store, data = recorded
    settings = {"segments": 1, "batch_size": 8, "name": None, **options}
    return analyze(
        store,
        model=LM(build),
        task="language_modeling",
        train={"lm": data},
        queries=TokenSequences(3, seed=2),
        **settings,
    )


def test_every_trained_parameter_is_attributed(recorded, capsys) -> None:
    build = recorded[0]
    result = _analyze(recorded, verbose=True)
    assert result.coverage == {"lm": 1.0}
    assert result.config["coverage"] == {"lm": 1.0}
    row = capsys.readouterr().out.split("trained parameters covered\n")[1].splitlines()[0]
    assert row.split()[0] == "lm" and row.endswith("100.0%")
    scores = result.scores["lm"]
    assert scores.shape == (3, 16) and np.isfinite(scores).all() and np.abs(scores).max() > 0
    assert np.isfinite(result.stage_effects).all()
    modules = result.config["modules"]
    if build == "gpt2":
        assert "model.transformer.wte+model.lm_head" in modules  # the tie is one unit
        assert {"model.transformer.h.0.attn.c_attn", "model.transformer.wpe"} <= set(modules)
        assert "model.transformer.h.0.ln_1" in modules
    else:
        assert {"model.model.embed_tokens", "model.lm_head", "model.model.norm"} <= set(modules)


def test_excluded_units_lower_the_coverage_and_are_listed(recorded, capsys) -> None:
    result = _analyze(
        recorded, modules=ModuleSelection(exclude=("*lm_head*", "*norm*", "*ln_*")), verbose=True
    )
    assert 0 < result.coverage["lm"] < 1
    assert not any("lm_head" in m for m in result.config["modules"])
    assert "not attributed in stage 'lm': " in capsys.readouterr().out
    assert np.isfinite(result.scores["lm"]).all()


def test_an_analysis_that_will_not_fit_stops_before_any_pass(recorded, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_CALLBACK_MEMORY_LIMIT", "200MiB")  # the chunks alone take 256
    with pytest.raises(AnalysisError, match="would hold about") as error:
        _analyze(recorded, verbose=False)
    assert "Largest units: 'model." in str(error.value)


def test_the_projected_cache_serves_every_kind_of_unit(recorded) -> None:
    """With ``projection_dim`` above every side the projection is exact: the cached scores
    (float32 gradients) equal the direct ones."""
    direct = _analyze(recorded, verbose=False)
    cached = _analyze(recorded, verbose=False, cache="projected", projection_dim=64, name="c")
    np.testing.assert_allclose(cached.scores["lm"], direct.scores["lm"], rtol=2e-3, atol=1e-6)
