"""Models that change between stages: matching rules, refusals, and what analyze carries through."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import TinyClassifier, loader, make_dataset, trainer
from storeutil import tree_digest
from torch import nn

from source_callback import AnalysisError, ManifestMismatchError, SourceCallback, analyze, open_run
from source_callback.lineage import match_stages, unwrapped_name
from source_callback.manifest import model_manifest
from source_callback.report import write_report


def _entry(name: str, shape=(2, 2), kind="parameter", dtype="torch.float32") -> dict:
    return {"name": name, "kind": kind, "shape": list(shape), "dtype": dtype}


def test_wrapper_components_are_removed_anywhere_in_a_name() -> None:
    assert unwrapped_name("_orig_mod.net.0.weight") == "net.0.weight"
    assert unwrapped_name("m.base_model.model.a.q.base_layer.bias") == "m.a.q.bias"
    assert unwrapped_name("base_model.weight") == "base_model.weight"  # not the pair
    assert unwrapped_name("net.base_layer") == "net.base_layer"  # never the last component


def test_matching_precedence_and_what_counts_as_new() -> None:
    previous = [_entry("a.weight"), _entry("b.weight"), _entry("head.weight", (3, 2))]
    current = [
        _entry("_orig_mod.a.weight"),
        _entry("x.weight"),  # the same object as b.weight
        _entry("head.weight", (3, 2)),
        _entry("lora.weight"),
    ]
    found = match_stages(previous, current, identity={"x.weight": "b.weight"})
    assert found.previous == {
        "_orig_mod.a.weight": "a.weight",
        "x.weight": "b.weight",
        "head.weight": "head.weight",
    }
    assert found.matched_by == {
        "_orig_mod.a.weight": "rule",
        "x.weight": "identity",
        "head.weight": "name",
    }
    # a head of the same name, re-initialised on purpose, is marked as new
    fresh = match_stages(previous, current, renamed={"head.weight": None})
    assert "head.weight" not in fresh.previous
    explicit = match_stages(previous, current, renamed={"lora.weight": "b.weight"})
    assert explicit.previous["lora.weight"] == "b.weight"
    assert explicit.matched_by["lora.weight"] == "explicit"


def test_a_saved_modules_trained_copy_continues_it_and_its_original_is_new() -> None:
    """peft's ``modules_to_save``: the copy the model computes with, not the frozen original
    (the same object as before, which identity would otherwise match)."""
    previous = [_entry("m.head.weight"), _entry("m.a.weight")]
    wrapped = "m.base_model.model."
    copy, original = (
        f"{wrapped}head.{part}.weight" for part in ("modules_to_save.x", "original_module")
    )
    current = [_entry(original), _entry(copy), _entry(f"{wrapped}a.weight")]
    found = match_stages(previous, current, identity={original: "m.head.weight"})
    assert found.previous == {copy: "m.head.weight", f"{wrapped}a.weight": "m.a.weight"}
    assert found.matched_by[copy] == "rule"
    explicit = match_stages(previous, current, renamed={original: "m.head.weight"})
    assert explicit.previous[original] == "m.head.weight" and copy not in explicit.previous


def test_ambiguous_or_inconsistent_matches_name_the_tensors() -> None:
    previous = [_entry("a.weight")]
    both = [_entry("_orig_mod.a.weight"), _entry("a.base_layer.weight")]
    with pytest.raises(ManifestMismatchError, match=r"\['_orig_mod\.a\.weight', 'a\.base_layer"):
        match_stages(previous, both, stage="sft")
    two_old = [_entry("a.weight"), _entry("_orig_mod.a.weight")]
    with pytest.raises(ManifestMismatchError, match=r"could continue any of"):
        match_stages(two_old, [_entry("a.base_layer.weight")])
    with pytest.raises(ManifestMismatchError, match=r"a\.weight .*shape \[2, 2\] in the previous"):
        match_stages(previous, [_entry("a.weight", (4, 2))])
    with pytest.raises(ManifestMismatchError, match=r"another model"):
        match_stages(previous, [_entry("b.weight")])
    with pytest.raises(ManifestMismatchError, match=r"names tensors the models do not have"):
        match_stages(previous, [_entry("a.weight")], renamed={"zzz": "a.weight"})


def test_tied_tensors_are_listed_once_with_their_aliases() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    manifest = model_manifest(Tied())
    assert [e["name"] for e in manifest] == ["embed.weight"]
    assert manifest[0]["aliases"] == ["head.weight"]


class WithHead(TinyClassifier):
    """TinyClassifier plus a second head that only the second stage trains."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(3, 3)
        nn.init.zeros_(self.extra.weight)
        nn.init.zeros_(self.extra.bias)

    def forward(self, x):
        logits = super().forward(x)
        return logits + self.extra(logits)


def _record_two_stages(tmp_path, between=None):
    torch.manual_seed(0)
    model = TinyClassifier()
    store = tmp_path / "run.zarr"
    callback = SourceCallback(store, stage="first", checkpoints_per_stage=2)
    data = make_dataset(16)
    trainer([callback], tmp_path, max_epochs=1).fit(model, loader(data))
    grown = WithHead()
    grown.load_state_dict(model.state_dict(), strict=False)
    if between is not None:
        between(grown)
    callback = SourceCallback(store, stage="second", checkpoints_per_stage=2)
    trainer([callback], tmp_path, max_epochs=1).fit(grown, loader(data))
    return store, data


def test_a_head_added_in_a_later_stage_is_constant_before(tmp_path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store, data = _record_two_stages(tmp_path)  # the trained weights, loaded: continued
    assert not [w for w in caught if "starts from other values" in str(w.message)]
    run = open_run(store)
    assert set(run.continuation(1).previous) == {e["name"] for e in run.stage_manifest(0)}
    assert list(run.model_changes()) == [1]
    assert run.model_changes()[1].added == ["extra.weight", "extra.bias"]
    page = write_report(store, out=tmp_path / "report.html").read_text()
    assert "Model changes between stages" in page
    assert "Stage 1 (second): 4 tensors continue (4 by name), 2 added, 0 dropped." in page
    result = analyze(
        store,
        model=WithHead(),
        task="classification",
        train={"first": data, "second": data},
        queries=make_dataset(3, seed=5),
        segments=1,
        name=None,
        verbose=False,
    )
    assert result.scores["first"].shape == (3, 16)
    assert torch.isfinite(torch.as_tensor(result.scores["first"])).all()
    assert "extra" in result.config["modules"]


def test_a_run_with_a_saved_head_is_analyzed_through_its_trained_copy(tmp_path) -> None:
    """A LoRA stage with ``modules_to_save=["lm_head"]``: the pretraining stage's head is the
    copy the final model computes with, so its recorded losses are reproduced (they were not)."""
    from hf_models import CausalLM, TokenSequences, seeded_llama
    from peft import LoraConfig, get_peft_model

    store = str(tmp_path / "saved.zarr")
    module, pre, sft = CausalLM(seeded_llama()), TokenSequences(8, seed=1), TokenSequences(8, 2)
    callback = SourceCallback(store, stage="pretrain", checkpoints_per_stage=2)
    trainer([callback], tmp_path, max_epochs=1).fit(module, loader(pre, 4))
    config = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    module.model = get_peft_model(module.model, config)
    callback.next_stage("lora")
    trainer([callback], tmp_path, max_epochs=1).fit(module, loader(sft, 4))
    copy = "model.base_model.model.lm_head.modules_to_save.default.weight"
    assert open_run(store).continuation(1).previous[copy] == "model.lm_head.weight"
    result = analyze(
        store,
        model=module,
        task="language_modeling",
        train={"pretrain": pre, "lora": sft},
        queries=TokenSequences(2, seed=3),
        segments=1,
        name=None,
        verbose=False,
    )
    assert result.coverage == {"pretrain": 1.0, "lora": 1.0}
    assert torch.isfinite(torch.as_tensor(result.scores["pretrain"])).all()


def test_a_tensor_changed_between_stages_is_refused(tmp_path) -> None:
    def perturb(model):
        with torch.no_grad():
            model.net[0].weight.add_(0.5)  # edited outside training

    changed = r"stage 'second' starts from other values than stage 'first' ended with, in 1 of "
    with pytest.warns(
        UserWarning, match=changed + r"the 4 tensors it continues \(net\.0\.weight\)"
    ):
        store, data = _record_two_stages(tmp_path, between=perturb)
    before = tree_digest(store)
    with pytest.raises(AnalysisError, match=r"changed between the end of stage 'first'.*net\.0\.w"):
        analyze(
            store,
            model=WithHead(),
            task="classification",
            train={"first": data, "second": data},
            queries=make_dataset(3, seed=5),
            name="default",
            verbose=False,
        )
    assert tree_digest(store) == before
