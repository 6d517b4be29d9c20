"""Sharded runs (FSDP, FSDP2 ``fully_shard``, DeepSpeed) are refused at fit start, on every rank.

Until sharded recording exists, ``SourceCallback`` must fail such a run before the store is
created, with the same error on every rank, rather than write rank 0's shard or hang. The
two-process run uses Lightning's ModelParallelStrategy with ``fully_shard`` on CPU (gloo), in
``tests/scripts/train_sharded.py`` since Lightning's launcher re-executes the script per rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from models import TinyClassifier, loader, make_dataset, trainer
from processes import SCRIPTS
from test_ddp import run_script
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from source_callback import SourceCallback
from source_callback.errors import SourceCallbackError
from source_callback.lightning import refuse_sharded

TRAIN_SHARDED = SCRIPTS / "train_sharded.py"
REFUSAL = "Sharded recording (FSDP, DeepSpeed, fully_shard) is not supported yet"


def test_model_parallel_fully_shard_is_refused_on_every_rank_before_the_store(tmp_path) -> None:
    store = tmp_path / "sharded.zarr"
    code, output = run_script([str(TRAIN_SHARDED), str(store), "2"])

    assert code == 3, output  # the script's exit status for a SourceCallbackError
    for rank in (0, 1):
        line = next((x for x in output.splitlines() if x.startswith(f"REFUSED rank={rank}:")), None)
        assert line is not None, output
        assert "the trainer's strategy is ModelParallelStrategy" in line, output
        assert REFUSAL in line and "Train with DDP or on a single device" in line, output
    assert "DONE" not in output and "StoreError" not in output, output
    assert not store.exists()
    assert not list(tmp_path.rglob("*.zarr"))  # nor a default store under default_root_dir


class _HandSharded(TinyClassifier):
    """FSDP2 applied by hand under the default single-device strategy."""

    def configure_model(self) -> None:
        fully_shard(self.net, mesh=init_device_mesh("cpu", (1,)))


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fully_shard_by_hand_is_refused_by_its_dtensor_parameters(
    tmp_path, one_process_group
) -> None:
    store = tmp_path / "run.zarr"
    fit = trainer([SourceCallback(store)], tmp_path, max_epochs=1)
    assert isinstance(fit.strategy, SingleDeviceStrategy)

    with pytest.raises(SourceCallbackError, match="4 parameters are sharded DTensors") as info:
        fit.fit(_HandSharded(), loader(make_dataset(16)))

    assert "'net.0.weight'" in str(info.value) and REFUSAL in str(info.value)
    assert not store.exists()


@pytest.mark.parametrize("kind", [FSDPStrategy, DeepSpeedStrategy])
def test_fsdp_and_deepspeed_strategies_are_refused(kind: type[Strategy]) -> None:
    # Neither can be constructed on this machine (FSDP refuses the CPU, DeepSpeed is not
    # installed): the refusal looks at the strategy's class only.
    strategy = kind.__new__(kind)
    with pytest.raises(SourceCallbackError, match=f"the trainer's strategy is {kind.__name__}"):
        refuse_sharded(strategy, TinyClassifier())


def test_ddp_with_plain_parameters_is_not_refused() -> None:
    refuse_sharded(DDPStrategy(), TinyClassifier())
    refuse_sharded(SingleDeviceStrategy(torch.device("cpu")), TinyClassifier())


def test_trainer_with_fully_shard_by_hand_is_refused(tmp_path, one_process_group) -> None:
    """The Hugging Face adapter refuses DTensor parameters too, before creating the store."""
    pytest.importorskip("transformers")
    from hf_models import LabelledSequences, seeded_llama, trainer_arguments
    from transformers import Trainer

    from source_callback import SourceTrainerCallback

    model = seeded_llama()
    for layer in model.model.layers:
        fully_shard(layer, mesh=init_device_mesh("cpu", (1,)))
    store = tmp_path / "run.zarr"
    fit = Trainer(
        model=model,
        args=trainer_arguments(tmp_path / "out"),
        train_dataset=LabelledSequences(16, seed=0),
        callbacks=[SourceTrainerCallback(store)],
    )
    with pytest.raises(SourceCallbackError, match="is a sharded DTensor") as info:
        fit.train()
    assert "'model.layers.0." in str(info.value)
    assert not store.exists() and not list(tmp_path.rglob("*.zarr"))
