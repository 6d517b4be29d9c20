"""Shared fixtures. ``s3``: a bucket on a local moto S3 server (loopback only, no internet)."""

from __future__ import annotations

import gc
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import pytest

_BUCKETS = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers:
        # pytest-xdist workers share the cores: OpenMP threads beyond them spin against each
        # other (one test took 56 s instead of 3 s with two workers of two threads on 2 cores).
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads() // int(workers)))
    # s3fs with skip_instance_cache leaves aiohttp sessions for the garbage collector.
    config.addinivalue_line(
        "filterwarnings", "ignore:Unclosed client session:ResourceWarning:aiohttp.*"
    )


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a free port), shared by the whole test session."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_SECURITY_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            env.setenv(name, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3(s3_endpoint: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """A fresh, empty bucket: ``(url_prefix, storage_options)``, e.g. ``("s3://bkt-3", {...})``.

    moto's backend is process-global, so every test gets its own bucket.
    """
    import boto3

    bucket = f"test-bucket-{next(_BUCKETS)}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    storage_options = {
        "endpoint_url": s3_endpoint,
        "key": "testing",
        "secret": "testing",
        "skip_instance_cache": True,
    }
    try:
        yield f"s3://{bucket}", storage_options
    finally:
        client.close()
        gc.collect()  # close the test's unreferenced s3fs sessions while output is captured
