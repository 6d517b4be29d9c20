"""Unit tests of the framework-free pieces: plan, fingerprint, optimizer model, tensor encoding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from source_callback.fingerprint import dataset_fingerprint, sample_indices
from source_callback.optim import (
    UpdateRule,
    WeightDecay,
    classify,
    describe_optimizer,
    optimizer_state_by_name,
    step_hyperparameters,
)
from source_callback.record.plan import interior_steps
from source_callback.store import schema


@pytest.mark.parametrize(
    ("steps", "parts", "expected"),
    [
        (60, 6, [10, 20, 30, 40, 50]),
        (16, 6, [3, 5, 8, 11, 13]),
        (3, 6, [1, 2]),
        (1, 6, []),
        (100, 1, []),
        (math.inf, 6, []),
    ],
)
def test_interior_steps(steps: float, parts: int, expected: list[int]) -> None:
    assert interior_steps(steps, parts) == expected


def test_sample_indices_cover_ends_and_are_unique() -> None:
    idx = sample_indices(1000)
    assert idx[0] == 0 and idx[-1] == 999 and len(set(idx)) == len(idx) == 16
    assert sample_indices(5) == [0, 1, 2, 3, 4]


def test_fingerprint_stable_and_sensitive() -> None:
    x = torch.arange(40.0).reshape(20, 2)
    y = torch.arange(20)
    ds = torch.utils.data.TensorDataset(x, y)
    same = torch.utils.data.TensorDataset(x.clone(), y.clone())
    assert dataset_fingerprint(ds) == dataset_fingerprint(same)
    changed = x.clone()
    changed[19, 1] += 1  # the last item is always sampled
    assert dataset_fingerprint(torch.utils.data.TensorDataset(changed, y)) != dataset_fingerprint(
        ds
    )
    shorter = torch.utils.data.TensorDataset(x[:19], y[:19])
    assert dataset_fingerprint(shorter) != dataset_fingerprint(ds)
    # dtype matters, not just values
    as_f64 = torch.utils.data.TensorDataset(x.double(), y)
    assert dataset_fingerprint(as_f64) != dataset_fingerprint(ds)


def test_fingerprint_of_dicts_strings_and_iterables() -> None:
    items = [{"text": f"s{i}", "label": i % 2, "ids": np.arange(i)} for i in range(30)]
    assert dataset_fingerprint(items) == dataset_fingerprint([dict(d) for d in items])
    items2 = [*items[:-1], {"text": "other", "label": 1, "ids": np.arange(29)}]
    assert dataset_fingerprint(items2) != dataset_fingerprint(items)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):  # pragma: no cover - never iterated
            yield 1

    assert dataset_fingerprint(Stream()) is None


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]


@pytest.mark.parametrize(
    ("make", "rule", "decay"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), UpdateRule.SGD, WeightDecay.NONE),
        (
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4),
            UpdateRule.SGD_MOMENTUM,
            WeightDecay.COUPLED,
        ),
        (lambda p: torch.optim.Adam(p, weight_decay=0.1), UpdateRule.ADAM, WeightDecay.COUPLED),
        (lambda p: torch.optim.Adam(p), UpdateRule.ADAM, WeightDecay.NONE),
        (
            lambda p: torch.optim.Adam(p, weight_decay=0.1, decoupled_weight_decay=True),
            UpdateRule.ADAMW,
            WeightDecay.DECOUPLED,
        ),
        (lambda p: torch.optim.AdamW(p), UpdateRule.ADAMW, WeightDecay.DECOUPLED),
        (lambda p: torch.optim.Adagrad(p), UpdateRule.UNKNOWN, WeightDecay.NONE),
    ],
)
def test_classify(make, rule: UpdateRule, decay: WeightDecay) -> None:
    assert classify(make(_params())) == (rule, decay)


def test_subclass_counts_as_unknown() -> None:
    class MySGD(torch.optim.SGD):
        pass

    assert classify(MySGD(_params(), lr=0.1))[0] is UpdateRule.UNKNOWN


def test_describe_optimizer_groups_and_json_roundtrip() -> None:
    a, b = _params()
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=1e-3)
    record = describe_optimizer(opt, {id(a): "a", id(b): "b"})
    assert record.class_name == "torch.optim.adamw.AdamW"
    assert [g.params for g in record.groups] == [["a"], ["b"]]
    assert record.groups[1].hyperparameters["lr"] == 0.5
    assert record.groups[0].hyperparameters["betas"] == [0.9, 0.999]
    assert type(record).from_json(record.to_json()) == record


def test_step_hyperparameters_fields_match_schema() -> None:
    sgd = step_hyperparameters(torch.optim.SGD(_params(), lr=0.1, momentum=0.8).param_groups[0])
    adam = step_hyperparameters(torch.optim.Adam(_params(), betas=(0.7, 0.9)).param_groups[0])
    assert tuple(sgd) == tuple(adam) == schema.STEP_GROUP_FIELDS
    assert sgd["momentum"] == 0.8 and math.isnan(sgd["beta2"]) and math.isnan(sgd["eps"])
    assert adam["momentum"] == 0.7 and adam["beta2"] == 0.9 and math.isnan(adam["dampening"])


def test_optimizer_state_by_name_picks_the_needed_state() -> None:
    a, b = _params()
    opt = torch.optim.Adam([a, b], lr=0.1)
    (a.sum() + b.sum()).backward()
    opt.step()
    state = optimizer_state_by_name(opt, {id(a): "a", id(b): "b"}, UpdateRule.ADAM)
    assert set(state) == {"exp_avg_sq", "step"}  # exp_avg is not needed by the analysis
    assert state["exp_avg_sq"]["b"] is opt.state[b]["exp_avg_sq"]


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.float8_e4m3fn],
)
@pytest.mark.parametrize("shape", [(4, 3), ()])
def test_tensor_encoding_roundtrip_keeps_dtype(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = (torch.randn(shape) * 3).to(dtype)
    encoded = schema.encode_tensor(t)
    assert isinstance(encoded.array, np.ndarray)
    back = schema.decode_array(encoded.array, encoded.torch_dtype)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_checkpoint_keys_sort_by_step_then_end_before_start() -> None:
    keys = [
        schema.checkpoint_key(16, schema.ROLE_START),
        schema.checkpoint_key(16, schema.ROLE_END),
        schema.checkpoint_key(3, schema.ROLE_INTERIOR),
        schema.checkpoint_key(120, schema.ROLE_INTERIOR),
    ]
    assert [schema.parse_checkpoint_key(k) for k in sorted(keys)] == [
        (3, "interior"),
        (16, "stage-end"),
        (16, "stage-start"),
        (120, "interior"),
    ]
