"""The batch tests' fixtures."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.fakes.tcp_proxy import TcpProxy


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """The chunks a test's code queued (job, first, last, queue, countdown), kept
    here instead of sent: the test runs them itself."""
    from batches.tasks import run_batch_chunk

    seen: list[tuple[Any, ...]] = []
    monkeypatch.setattr(run_batch_chunk, "apply_async", lambda args, **options: seen.append((*args, options["queue"], options["countdown"])))
    return seen


@pytest.fixture
def deliveries_queued(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The jobs whose delivery was queued, kept here: the test delivers them itself."""
    from batches.tasks import deliver_batch

    seen: list[str] = []
    monkeypatch.setattr(deliver_batch, "apply_async", lambda args, **options: seen.append(args[0]))
    return seen


@dataclass
class S3:
    """moto's standalone S3 server on loopback, reached through a proxy that a test can
    cut (``proxy.cut()``) and restore; ``bucket`` is this test's own, empty."""

    proxy: TcpProxy
    bucket: str

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    def client(self) -> Any:
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def body(self, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def keys(self) -> list[str]:
        return [item["Key"] for item in self.client().list_objects_v2(Bucket=self.bucket).get("Contents", [])]

    def uploads(self) -> list[dict[str, Any]]:
        return list(self.client().list_multipart_uploads(Bucket=self.bucket).get("Uploads", []))


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def moto_server() -> Iterator[int]:
    """``moto_server`` (a real S3 protocol over HTTP) in a process of its own; its port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **S3_ENV},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start (exit {server.poll()})")
            time.sleep(0.1)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def s3(moto_server: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    proxy = TcpProxy("127.0.0.1", moto_server)
    found = S3(proxy=proxy, bucket=f"results-{uuid.uuid4().hex[:12]}")
    found.client().create_bucket(Bucket=found.bucket)
    yield found
    proxy.close()
