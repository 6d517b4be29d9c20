"""Reading a group of one array per tensor over S3: concurrent ``read_tensors`` against one
request per tensor.

That is the layout of format-1 checkpoints and of the analysis cache's operators (format 2
packs a checkpoint into a few arrays: ``benchmarks/checkpoint_cost.py``). A group of many
small tensors (default 200: the shapes of a small transformer's weights, norms and biases) is
written into a local Zarr group with ``store.writer.write_tensors``, uploaded to a
moto S3 server on 127.0.0.1 (its own process, so that its CPU does not share the client's
GIL), and read back in one process by both arms, interleaved (AB, BA, ...):

- ``sequential``: the previous reader, ``array[...]`` for one array after another;
- ``concurrent``: ``source_callback.store.reader.read_tensors``, every array fetched at once
  on Zarr's event loop, at most ``async.concurrency`` in flight.

Both list the group first (zarr fetches the members' metadata concurrently either way; a third
arm, ``listing``, times that alone) and their results are checked equal. moto answers from
Python on loopback, so a request costs its server CPU rather than network latency;
``--latency-ms`` puts a TCP proxy in front of it that delays every packet by half the given
round-trip time each way, as a network would.

    python benchmarks/remote_reads.py                        # 200 tensors, no added latency
    python benchmarks/remote_reads.py --latency-ms 0,20      # also with a 20 ms round trip
    python benchmarks/remote_reads.py --tensors 300 --concurrency 32 --out remote_reads.json

The S3 client's connection pool is sized to the concurrency (``max_pool_connections``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import zarr

from source_callback.store import schema
from source_callback.store.reader import read_tensors
from source_callback.store.writer import write_tensors

BUCKET = "bench"
GROUP = "tensors"


def model_like_tensors(count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``count`` float32 tensors shaped like a small transformer's (width 64), layer by layer."""
    width = 64
    shapes = [
        ("attn.qkv.weight", (3 * width, width)),
        ("attn.qkv.bias", (3 * width,)),
        ("attn.out.weight", (width, width)),
        ("attn.out.bias", (width,)),
        ("norm1.weight", (width,)),
        ("norm1.bias", (width,)),
        ("mlp.up.weight", (4 * width, width)),
        ("mlp.up.bias", (4 * width,)),
        ("mlp.down.weight", (width, 4 * width)),
        ("mlp.down.bias", (width,)),
        ("norm2.weight", (width,)),
        ("norm2.bias", (width,)),
    ]
    generator = torch.Generator().manual_seed(seed)
    return {
        f"blocks.{i // len(shapes)}.{name}": torch.randn(shape, generator=generator)
        for i, (name, shape) in enumerate(itertools.islice(itertools.cycle(shapes), count))
    }


def sequential_read(group: zarr.Group) -> dict[str, torch.Tensor]:
    """The reader before concurrent reads: one ``array[...]`` request after another."""
    return {
        name: schema.decode_array(array[...], array.attrs[schema.ATTR_TORCH_DTYPE])
        for name, array in sorted(group.arrays())
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server in a subprocess on 127.0.0.1; yields its endpoint URL."""
    import boto3

    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for _ in range(200):
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:  # not listening yet
                time.sleep(0.05)
        else:
            raise RuntimeError("the moto server did not start")
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Forward bytes, each packet ``delay`` seconds after it arrived, in order."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            queue.put_nowait((time.monotonic() + delay, data))
    queue.put_nowait((0.0, b""))
    with contextlib.suppress(ConnectionError):
        await sender


@contextlib.contextmanager
def latency_proxy(target: str, round_trip: float) -> Iterator[str]:
    """A TCP proxy to ``target`` (``http://host:port``) adding ``round_trip`` seconds per
    request and response pair, on its own event loop thread; yields the proxy's URL."""
    host, port = target.removeprefix("http://").split(":")
    loop = asyncio.new_event_loop()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(host, int(port))
        await asyncio.gather(
            _pump(client_r, server_w, round_trip / 2), _pump(server_r, client_w, round_trip / 2)
        )

    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def upload(local: Path, endpoint: str, prefix: str) -> str:
    """Copy a local store to ``s3://BUCKET/prefix``; returns the URL."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
    fs.put(str(local), f"{BUCKET}/{prefix}", recursive=True)
    return f"s3://{BUCKET}/{prefix}"


def measure(url: str, options: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Seconds per read of the group's tensors, per arm, interleaved AB, BA, ..."""
    arms = {
        "sequential": sequential_read,
        "concurrent": read_tensors,
        "listing": lambda group: dict(group.arrays()),  # the part both arms share
    }
    times: dict[str, list[float]] = {name: [] for name in arms}
    reference = None
    for repeat in range(repeats + 1):  # the first pair warms connections up and is dropped
        order = list(arms) if repeat % 2 == 0 else list(reversed(arms))
        for name in order:
            root = zarr.open_group(url, mode="r", zarr_format=3, storage_options=options)
            group = root[GROUP]
            start = time.perf_counter()
            tensors = arms[name](group)
            elapsed = time.perf_counter() - start
            reference = tensors if reference is None else reference
            assert tensors.keys() == reference.keys()
            if name != "listing":
                assert all(torch.equal(tensors[k], reference[k]) for k in reference)
            if repeat:
                times[name].append(elapsed)
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print a table; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, default=200, help="tensors in the checkpoint")
    parser.add_argument("--repeats", type=int, default=5, help="timed reads per arm")
    parser.add_argument(
        "--latency-ms", default="0", help="comma list of added round-trip times (ms)"
    )
    parser.add_argument("--concurrency", type=int, help="zarr async.concurrency (default 10)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "testing")
    if args.concurrency is not None:
        zarr.config.set({"async.concurrency": args.concurrency})

    tensors = model_like_tensors(args.tensors)
    results: dict[str, Any] = {
        "tensors": len(tensors),
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "concurrency": zarr.config.get("async.concurrency"),
        "repeats": args.repeats,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp, moto_server() as endpoint:
        local = Path(tmp) / "run.zarr"
        write_tensors(zarr.open_group(local, mode="w").create_group(GROUP), tensors)
        prefix = upload(local, endpoint, "run.zarr")
        for latency_ms in (float(v) for v in args.latency_ms.split(",")):
            with contextlib.ExitStack() as stack:
                url = endpoint
                if latency_ms:
                    url = stack.enter_context(latency_proxy(endpoint, latency_ms / 1000))
                options = {
                    "endpoint_url": url,
                    "key": "testing",
                    "secret": "testing",
                    "skip_instance_cache": True,
                    # botocore's pool holds 10 connections by default: size it to the
                    # concurrency, or more requests in flight would only queue for one.
                    "config_kwargs": {"max_pool_connections": results["concurrency"]},
                }
                times = measure(prefix, options, args.repeats)
            sequential, concurrent, listing = (
                statistics.median(times[arm]) for arm in ("sequential", "concurrent", "listing")
            )
            results["rows"].append(
                {
                    "latency_ms": latency_ms,
                    **{f"{arm}_s": values for arm, values in times.items()},
                    "speedup": sequential / concurrent,
                }
            )
            print(
                f"{len(tensors)} tensors, {results['bytes'] / 2**20:.1f} MiB, added round trip "
                f"{latency_ms:g} ms, medians of {args.repeats}: sequential {sequential:.3f} s, "
                f"concurrent {concurrent:.3f} s, {sequential / concurrent:.1f}x (listing alone "
                f"{listing:.3f} s)",
                flush=True,
            )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
