"""SourceTrainerCallback under real DDP on CPU: two processes (gloo) started by torchrun.

The training lives in ``tests/scripts/train_hf_ddp.py``; every rank also saves its own account
of the run (examples per step, the Trainer's learning rates, the model and AdamW state before
every step and at the end), which the store is compared with here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import LabelledSequences, tiny_llama
from processes import SCRIPTS, load_script
from storeutil import tree_digest
from test_ddp import run_script

from source_callback import analyze, open_run

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

TRAIN_HF_DDP = SCRIPTS / "train_hf_ddp.py"
WORLD_SIZE = 2


def test_trainer_ddp_is_recorded_once_with_the_global_batch(tmp_path) -> None:
    store = tmp_path / "ddp.zarr"
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}"]
    code, output = run_script([*launcher, str(TRAIN_HF_DDP), str(store), str(tmp_path)])
    assert code == 0, output
    assert "DONE rank=0" in output and "DONE rank=1" in output, output
    script = load_script(TRAIN_HF_DDP)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}

    # One writer: rank 0 opened the store, rank 1 nothing; one row per optimizer step.
    assert ranks[0]["opened"] == [str(store)] and ranks[1]["opened"] == []
    run = open_run(store)
    (stage,) = run.stages
    assert run.status == "complete" and stage.recorded_by == "transformers"
    assert (stage.world_size, stage.batch_size) == (WORLD_SIZE, script.PER_DEVICE_BATCH)
    assert (stage.accumulate_grad_batches, stage.num_examples) == (2, script.EXAMPLES)
    assert (stage.first_step, stage.last_step, stage.planned_checkpoints) == (0, 5, [2, 4])
    assert run.num_steps == len(ranks[0]["examples"]) == 6

    # Examples per step: the sum of what each rank's forward passes saw (the last step of an
    # epoch has one micro-batch per rank).
    steps = run.steps()
    per_step = np.sum([r["examples"] for r in ranks], axis=0)
    assert per_step.tolist() == [16, 16, 8, 16, 16, 8]
    np.testing.assert_array_equal(steps["examples"], per_step)
    assert steps["epoch"].tolist() == [0, 0, 0, 1, 1, 1]
    assert np.isfinite(steps["loss"]).all()

    # Learning rates: the Trainer's log (the same on both ranks), in both parameter groups.
    assert ranks[0]["lr"] == ranks[1]["lr"]
    lrs = run.learning_rates()
    np.testing.assert_allclose(lrs[:, 0], ranks[0]["lr"], rtol=1e-12)
    np.testing.assert_array_equal(lrs[:, 0], lrs[:, 1])
    assert lrs[0, 0] == 0.0  # the warmup's first step
    np.testing.assert_allclose(steps["weight_decay"], [[0.1, 0.0]] * 6)

    # Clipping: the factor, from the averaged gradients' norm before the Trainer clipped them
    # (measured after DDP averaged them), as the Trainer's log has it.
    assert ranks[0]["grad_norm"] == ranks[1]["grad_norm"]
    clipped = [min(1.0, script.MAX_GRAD_NORM / (n + 1e-6)) for n in ranks[0]["grad_norm"]]
    assert 0 < sum(c < 1 for c in clipped) < 6
    np.testing.assert_allclose(steps["scale"], clipped, rtol=1e-5)

    # Checkpoints: the parameters and AdamW state rank 0 had before the step, and at the end
    # the final model, which DDP keeps identical on both ranks.
    for name, value in ranks[0]["final"]["params"].items():
        assert torch.equal(ranks[1]["final"]["params"][name], value), name
    assert [(c.step, c.role) for c in run.checkpoints] == [
        (0, "stage-start"),
        (2, "interior"),
        (4, "interior"),
        (6, "stage-end"),
    ]
    for checkpoint in run.checkpoints:
        assert checkpoint.committed
        end = checkpoint.role == "stage-end"
        truth = ranks[0]["final"] if end else ranks[0]["before"][checkpoint.step]
        params = checkpoint.params()
        assert params.keys() == truth["params"].keys()
        for name, value in truth["params"].items():
            assert torch.equal(params[name], value), name
        state = checkpoint.optimizer_state()
        assert state.keys() == truth["state"].keys()
        for name, values in truth["state"].items():
            assert torch.equal(state[name]["exp_avg_sq"], values["exp_avg_sq"]), name
            assert state[name]["step"].item() == values["step"].item()
    assert not [p for p in tree_digest(store) if p.endswith(".partial")]

    # The probe was recorded on rank 0 and the analysis reproduces it on one process.
    assert stage.probe is None
    torch.manual_seed(0)
    result = analyze(
        store,
        model=tiny_llama(),
        task="language_modeling",
        train={"pretrain": LabelledSequences(script.EXAMPLES, seed=1)},
        queries=LabelledSequences(2, seed=9),
        segments=1,
        batch_size=8,
        name=None,
        verbose=False,
    )
    assert result.scores["pretrain"].shape == (2, script.EXAMPLES)
    assert np.isfinite(result.scores["pretrain"]).all()
