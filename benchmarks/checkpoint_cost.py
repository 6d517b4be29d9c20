"""Fixed cost of one checkpoint against its number of tensors: write and read, local and S3.

The background writer's work per checkpoint, measured directly: ``StoreWriter.write_checkpoint``
of N parameters with AdamW-like state (``exp_avg_sq`` plus a 0-d ``step``), then
``Checkpoint.params()`` plus ``optimizer_state()`` from a freshly opened store. Tensors are tiny
(16 floats) by default, so the time is the per-tensor and per-checkpoint overhead, not bytes.
It uses only the API both store formats share, so the same script measures format 1 (the
library before packing, put first on ``PYTHONPATH``) and format 2:

    PYTHONPATH=. python benchmarks/checkpoint_cost.py --out new.json
    git archive 4a96dc1 source_callback | tar -x -C /tmp/format1
    PYTHONPATH=/tmp/format1:. python benchmarks/checkpoint_cost.py --out old.json
    python benchmarks/checkpoint_cost.py --s3 ...   # also on a local moto S3 server
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch

from source_callback.store import schema
from source_callback.store.reader import open_run
from source_callback.store.writer import StoreWriter, snapshot_checkpoint


def tensors(count: int, numel: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(count)
    return {f"layers.{i}.weight": torch.randn(numel, generator=g) for i in range(count)}


def measure(
    url: str, options: dict[str, Any] | None, count: int, numel: int, reps: int
) -> dict[str, float]:
    """Median seconds to write one checkpoint and to read it back, over ``reps`` checkpoints."""
    params = tensors(count, numel)
    state = {
        "exp_avg_sq": {n: p.square() for n, p in params.items()},
        "step": {n: torch.tensor(3.0) for n in params},
    }
    writer = StoreWriter.open(url, options)
    writes, reads = [], []
    for rep in range(reps):
        start = time.perf_counter()
        writer.write_checkpoint(
            rep, schema.ROLE_INTERIOR, 0, snapshot_checkpoint(params, {}, state)
        )
        writes.append(time.perf_counter() - start)
    for checkpoint in open_run(url, storage_options=options).checkpoints:
        start = time.perf_counter()
        checkpoint.params()
        checkpoint.optimizer_state()
        reads.append(time.perf_counter() - start)
    return {"write_s": statistics.median(writes), "read_s": statistics.median(reads)}


def s3_location() -> tuple[Callable[[], tuple[str, dict[str, Any]]], Callable[[], None]]:
    """A moto S3 server on 127.0.0.1: a factory of fresh store URLs, and its stop function."""
    import boto3
    from moto.server import ThreadedMotoServer

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "testing")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="bench")
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}

    def fresh() -> tuple[str, dict[str, Any]]:
        return f"s3://bench/{uuid.uuid4().hex}.zarr", options

    return fresh, server.stop


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--numel", type=int, default=16, help="elements per tensor (16)")
    parser.add_argument("--reps", type=int, default=5, help="checkpoints per measurement (5)")
    parser.add_argument("--s3", action="store_true", help="also measure on a moto S3 server")
    parser.add_argument("--out", help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, Any] = {"format": schema.FORMAT_VERSION, "numel": args.numel, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        locations: dict[str, Callable[[], tuple[str, dict[str, Any] | None]]] = {
            "local": lambda: (os.path.join(tmp, f"{uuid.uuid4().hex}.zarr"), None)
        }
        stop = None
        if args.s3:
            locations["s3"], stop = s3_location()
        try:
            for where, fresh in locations.items():
                for count in args.tensors:
                    url, options = fresh()
                    row = {"where": where, "tensors": count}
                    row.update(measure(url, options, count, args.numel, args.reps))
                    results["rows"].append(row)
                    print(
                        f"format {schema.FORMAT_VERSION}  {where:<5}  {count:>5} tensors  "
                        f"write {row['write_s'] * 1e3:8.1f} ms  read {row['read_s'] * 1e3:8.1f} ms"
                    )
        finally:
            if stop is not None:
                stop()
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=1)
    return results


if __name__ == "__main__":
    main()
