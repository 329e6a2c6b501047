"""The fakes themselves must stay faithful: chunked SSE, real status lines, keep-alive, drops."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.fakes.openai import FakeOpenAI


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI().start()
    yield fake
    fake.stop()


def raw_request(url: str, body: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=3) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_streams_use_chunked_transfer_and_event_stream(fake: FakeOpenAI) -> None:
    raw = raw_request(fake.url, b'{"model": "m", "messages": [], "stream": true}')
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head and b"text/event-stream" in head
    assert body.endswith(b"0\r\n\r\n") and b"data: [DONE]" in body


def test_a_drop_never_sends_the_final_chunk(fake: FakeOpenAI) -> None:
    fake.mode = "drop"
    raw = raw_request(fake.url, b'{"model": "m", "messages": [], "stream": true}')
    assert b"data: [DONE]" not in raw and not raw.endswith(b"0\r\n\r\n")


def test_429_carries_retry_after_and_the_openai_error_body(fake: FakeOpenAI) -> None:
    fake.mode, fake.retry_after = "429", "11"
    resp = httpx.post(f"{fake.url}/v1/chat/completions", json={"model": "m", "messages": []})
    assert resp.status_code == 429 and resp.headers["retry-after"] == "11"
    assert resp.json()["error"]["code"] == "rate_limit_exceeded"


def test_models_listing_and_unknown_paths(fake: FakeOpenAI) -> None:
    assert httpx.get(f"{fake.url}/v1/models").json()["data"][0]["id"] == "gpt-fake"
    assert httpx.post(f"{fake.url}/v1/nope", json={}).status_code == 404


def test_keep_alive_reuses_one_connection(fake: FakeOpenAI) -> None:
    with httpx.Client() as client:
        for _ in range(3):
            client.post(f"{fake.url}/v1/chat/completions", json={"model": "m", "messages": []})
        assert fake.open_connections == 1
    assert len(fake.requests) == 3
