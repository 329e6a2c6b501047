"""Every HTTP worker against its protocol-faithful fake: replies, streams and each failure mode."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from orchestrator_site.errors import (
    PermanentWorkerError,
    TransientWorkerError,
    WorkerAuthError,
    WorkerConnectionError,
    WorkerProtocolError,
    WorkerRateLimited,
    WorkerTimeout,
)
from tests.workers.conftest import Rig
from workers.types import AssembledPrompt, ChatMessage, TokenChunk

PROMPT = AssembledPrompt(
    messages=(ChatMessage("system", "be brief"), ChatMessage("user", "say hello world")),
    model="m-1",
    max_tokens=64,
    temperature=0.2,
    stop=("END",),
)


def collect(rig: Rig, prompt: AssembledPrompt = PROMPT) -> list[TokenChunk]:
    async def run() -> list[TokenChunk]:
        return [chunk async for chunk in rig.worker.infer_stream(prompt)]

    return asyncio.run(run())


def test_infer_returns_completion_with_usage(rig: Rig) -> None:
    completion = rig.worker.infer(PROMPT)
    assert completion.text == "Hello, world!"
    assert completion.finish_reason == "stop"
    assert completion.worker == f"{rig.kind}-test"
    assert completion.usage.completion_tokens == 4
    assert completion.usage.prompt_tokens > 0


def test_stream_yields_tokens_then_final_chunk_with_usage(rig: Rig) -> None:
    chunks = collect(rig)
    assert "".join(c.text for c in chunks) == "Hello, world!"
    assert [c.is_final for c in chunks].count(True) == 1 and chunks[-1].is_final
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert [c.index for c in chunks[:-1]] == list(range(len(chunks) - 1))


def test_streams_one_after_another_share_one_connection(rig: Rig) -> None:
    """After the final event the body is read to its end, so the connection goes back
    to the pool: a provider's TCP and TLS handshakes are paid once, not before each
    stream's first token."""

    async def three() -> list[TokenChunk]:
        return [(await asyncio.wait_for(_last(rig.worker.infer_stream(PROMPT)), 5)) for _ in range(3)]

    before = rig.fake.connections_made
    assert all(chunk.is_final for chunk in asyncio.run(three()))
    assert rig.fake.connections_made - before == 1


async def _last(stream: AsyncIterator[TokenChunk]) -> TokenChunk:
    chunks = [chunk async for chunk in stream]
    return chunks[-1]


def test_max_tokens_cut_reports_length(rig: Rig) -> None:
    short = AssembledPrompt(messages=PROMPT.messages, model="m-1", max_tokens=2)
    assert rig.worker.infer(short).finish_reason == "length"
    assert collect(rig, short)[-1].finish_reason == "length"


def test_request_body_follows_the_protocol(rig: Rig) -> None:
    rig.worker.infer(PROMPT)
    collect(rig)
    plain, streamed = rig.fake.requests[-2]["body"], rig.fake.requests[-1]["body"]
    assert streamed["stream"] is True and plain["stream"] is False
    if rig.kind in ("openai", "vllm"):
        assert streamed["stream_options"] == {"include_usage": True}
        assert plain["messages"][0] == {"role": "system", "content": "be brief"}
        assert ("max_completion_tokens" if rig.kind == "openai" else "max_tokens") in plain
        assert rig.fake.headers_seen[-1]["authorization"] == "Bearer sk-test"
    elif rig.kind == "anthropic":
        assert plain["system"] == "be brief" and all(m["role"] != "system" for m in plain["messages"])
        assert plain["stop_sequences"] == ["END"] and plain["max_tokens"] == 64
        assert rig.fake.headers_seen[-1]["x-api-key"] == "sk-test"
        assert rig.fake.headers_seen[-1]["anthropic-version"] == "2023-06-01"
    else:
        assert plain["prompt"].endswith("<|im_start|>assistant\n") and plain["n_predict"] == 64
        assert "END" in plain["stop"]


def test_429_maps_to_rate_limited_with_retry_after(rig: Rig) -> None:
    rig.fake.mode, rig.fake.retry_after = "429", "7"
    with pytest.raises(WorkerRateLimited) as info:
        rig.worker.infer(PROMPT)
    assert info.value.retry_after == 7.0
    assert info.value.data["upstream_status"] == 429
    with pytest.raises(WorkerRateLimited) as streamed:
        collect(rig)
    # A stream refused before its first byte carries the same: the wait, the status, the provider's message.
    assert streamed.value.retry_after == 7.0 and streamed.value.data == info.value.data


@pytest.mark.parametrize("status", ["500", "503"])
def test_5xx_maps_to_transient(rig: Rig, status: str) -> None:
    rig.fake.mode = status
    with pytest.raises(TransientWorkerError) as info:
        rig.worker.infer(PROMPT)
    assert info.value.retryable and info.value.data["upstream_status"] == int(status)
    with pytest.raises(TransientWorkerError):
        collect(rig)


def test_503_carries_retry_after(rig: Rig) -> None:
    rig.fake.mode, rig.fake.retry_after = "503", "3"
    with pytest.raises(TransientWorkerError) as info:
        rig.worker.infer(PROMPT)
    assert info.value.retry_after == 3.0
    with pytest.raises(TransientWorkerError) as streamed:
        collect(rig)
    assert streamed.value.retry_after == 3.0 and streamed.value.data["upstream_status"] == 503


def test_401_maps_to_auth_error(rig: Rig) -> None:
    rig.fake.mode = "401"
    with pytest.raises(WorkerAuthError) as info:
        rig.worker.infer(PROMPT)
    assert not info.value.retryable
    with pytest.raises(WorkerAuthError) as streamed:
        collect(rig)
    assert not streamed.value.retryable and streamed.value.data["upstream_status"] == 401


def test_hang_maps_to_timeout_within_the_limit(rig: Rig) -> None:
    rig.fake.mode, rig.fake.hang_s = "hang", 2.0
    started = time.monotonic()
    with pytest.raises(WorkerTimeout):
        rig.worker.infer(PROMPT)
    with pytest.raises(WorkerTimeout):
        collect(rig)
    assert time.monotonic() - started < 1.9  # both calls gave up at the 0.5 s read timeout


def test_malformed_body_maps_to_protocol_error(rig: Rig) -> None:
    rig.fake.mode = "malformed"
    with pytest.raises(WorkerProtocolError):
        rig.worker.infer(PROMPT)


def test_malformed_event_maps_to_protocol_error(rig: Rig) -> None:
    rig.fake.mode = "malformed"
    with pytest.raises(WorkerProtocolError):
        collect(rig)


def test_connection_dropped_mid_stream_maps_to_connection_error(rig: Rig) -> None:
    rig.fake.mode = "drop"
    seen: list[str] = []

    async def run() -> None:
        async for chunk in rig.worker.infer_stream(PROMPT):
            seen.append(chunk.text)

    with pytest.raises(WorkerConnectionError):
        asyncio.run(run())
    assert seen and "".join(seen) != "Hello, world!"  # some tokens arrived before the drop


def test_stream_ending_without_final_event_is_a_connection_error(rig: Rig) -> None:
    rig.fake.mode = "cut"
    with pytest.raises(WorkerConnectionError):
        collect(rig)


def test_connection_refused_maps_to_connection_error(rig: Rig) -> None:
    rig.fake.stop()
    with pytest.raises(WorkerConnectionError):
        rig.worker.infer(PROMPT)
    with pytest.raises(WorkerConnectionError) as streamed:
        collect(rig)
    assert streamed.value.data == {"worker": rig.worker.name} and "connection failed" in str(streamed.value)


def test_sync_client_reuses_its_pooled_connection(rig: Rig) -> None:
    for _ in range(5):
        rig.worker.infer(PROMPT)
    assert rig.fake.open_connections == 1


def test_other_4xx_is_permanent(rig: Rig) -> None:
    rig.fake.mode = "400"
    with pytest.raises(PermanentWorkerError) as info:
        rig.worker.infer(PROMPT)
    assert not isinstance(info.value, TransientWorkerError)
