"""One worker instance serves many threads (Celery's thread pool) and many streams in one loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from tests.fakes.openai import FakeOpenAI
from workers.base import WorkerSettings
from workers.openai import OpenAIWorker
from workers.types import AssembledPrompt, ChatMessage, Completion

PROMPT = AssembledPrompt(messages=(ChatMessage("user", "hi"),), model="m", max_tokens=10)


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI().start()
    yield fake
    fake.stop()


def test_many_threads_hold_the_connection_limit_together(fake: FakeOpenAI) -> None:
    """Each thread has a client of its own (a shared httpcore pool closed connections
    under other threads: EBADF), and all of them together hold ``max_connections``."""
    fake.reply_delay_s = 0.02  # each reply takes a while: the threads overlap
    worker = OpenAIWorker(WorkerSettings(name="o", kind="openai", base_url=fake.url + "/v1", max_connections=4))
    results: list[Completion] = []
    lock = threading.Lock()

    def call() -> None:
        for _ in range(5):
            completion = worker.infer(PROMPT)
            with lock:
                results.append(completion)

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 60 and {r.text for r in results} == {"Hello, world!"}
    assert 1 < fake.max_in_flight <= 4  # the limit holds over all threads
    assert fake.connections_made <= 12  # one kept-alive connection per thread at most: reused, not one per call


def test_many_streams_in_one_event_loop(fake: FakeOpenAI) -> None:
    fake.token_delay_s = 0.01
    worker = OpenAIWorker(WorkerSettings(name="o", kind="openai", base_url=fake.url + "/v1"))

    async def one() -> str:
        return "".join([c.text async for c in worker.infer_stream(PROMPT)])

    async def many() -> list[str]:
        return await asyncio.gather(*(one() for _ in range(20)))

    assert asyncio.run(many()) == ["Hello, world!"] * 20


def test_a_cancelled_stream_releases_its_connection(fake: FakeOpenAI) -> None:
    fake.token_delay_s = 0.05
    worker = OpenAIWorker(WorkerSettings(name="o", kind="openai", base_url=fake.url + "/v1"))

    async def first_token_then_stop() -> str:
        stream = worker.infer_stream(PROMPT)
        async for chunk in stream:
            await stream.aclose()  # type: ignore[attr-defined]
            return chunk.text
        return ""

    async def run() -> list[str]:
        return [await first_token_then_stop() for _ in range(3)]

    assert asyncio.run(run()) == ["Hello"] * 3
    assert len(fake.requests) == 3
