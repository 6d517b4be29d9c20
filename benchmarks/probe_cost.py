"""Cost of the probe: 8 training losses per checkpoint, recorded and recomputed.

On the MLP of ``overhead.py`` (2.6 M parameters, AdamW, batch 64, one torch thread), compares
on the training thread the probe (``training_step`` on each of 8 examples alone, in eval mode)
with one optimizer step and with writing a checkpoint (parameters and Adam's second moments);
and, on the analysis side, the functional check of a recorded run (``check_probes``: read the
stage-start and stage-end checkpoints, 8 forward passes at each) with one checkpoint read.

    python benchmarks/probe_cost.py         # about 30 seconds on 2 CPU cores
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from overhead import MLP, Config, make_data
from torch.utils.data import DataLoader

from source_callback import SourceCallback, open_run
from source_callback.analysis.inputs import Collation
from source_callback.analysis.probes import check_probes
from source_callback.analysis.stage_models import run_view
from source_callback.analysis.task import ClassificationTask
from source_callback.lightning import training_step_losses
from source_callback.record.probe import probe_indices
from source_callback.store.writer import StoreWriter, snapshot_checkpoint


class Net(MLP):
    """The benchmark MLP with a forward, which the analysis's task calls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _ms(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn`` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    cfg = Config(steps=40)
    data = make_data(cfg)
    model = Net(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = data.tensors[0][: cfg.batch_size], data.tensors[1][: cfg.batch_size]

    def step() -> None:
        optimizer.zero_grad()
        model.training_step((x, y), 0).backward()
        optimizer.step()

    indices = probe_indices(len(data))
    cpu = torch.device("cpu")
    step_ms = _ms(step, 20)
    probe_ms = _ms(lambda: training_step_losses(model, data, indices, None, cpu), 20)
    named = dict(model.named_parameters())
    second = {n: optimizer.state[p]["exp_avg_sq"] for n, p in named.items()}
    with tempfile.TemporaryDirectory() as root:
        writer = StoreWriter.open(str(Path(root) / "w.zarr"))
        params = {n: p.detach().clone() for n, p in named.items()}
        write_ms = _ms(
            lambda: writer.write_checkpoint(
                0, "interior", 0, snapshot_checkpoint(params, {}, {"exp_avg_sq": second})
            ),
            3,
        )

        store = Path(root) / "run.zarr"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl.Trainer(
                accelerator="cpu",
                max_epochs=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[SourceCallback(store, stage="s", checkpoints_per_stage=2)],
                default_root_dir=root,
            ).fit(Net(cfg), DataLoader(data, batch_size=cfg.batch_size))
        run = run_view(open_run(store), [model])  # one stage
        copy = Net(cfg).eval()
        check_ms = _ms(
            lambda: check_probes(
                run, [copy], ClassificationTask(), {"s": data}, Collation.of(None, ["s"])
            ),
            3,
        )
        read_ms = _ms(lambda: run.boundary(0, "stage-end").params(), 3)

    print(f"MLP {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, 1 thread")
    print(f"optimizer step (batch {cfg.batch_size})      {step_ms:8.2f} ms")
    print(f"probe, {len(indices)} examples (training thread)  {probe_ms:8.2f} ms")
    print(f"checkpoint write (writer thread)    {write_ms:8.2f} ms")
    print(f"analysis check (2 checkpoints)      {check_ms:8.2f} ms")
    print(f"one checkpoint read                 {read_ms:8.2f} ms")


if __name__ == "__main__":
    main()
