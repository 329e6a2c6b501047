from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.llamacpp import FakeLlamaCpp
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import FakeProvider
from workers.base import StreamingModelWorker, WorkerSettings
from workers.registry import build_worker


@dataclass
class Rig:
    kind: str
    fake: FakeProvider
    worker: StreamingModelWorker


_FAKES = {"openai": (FakeOpenAI, "/v1"), "vllm": (FakeOpenAI, "/v1"), "anthropic": (FakeAnthropic, ""), "llamacpp": (FakeLlamaCpp, "")}


@pytest.fixture(params=sorted(_FAKES))
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    """Each HTTP worker wired to its own fake provider on loopback."""
    kind = request.param
    fake_cls, suffix = _FAKES[kind]
    fake = fake_cls().start()
    settings = WorkerSettings(name=f"{kind}-test", kind=kind, base_url=fake.url + suffix, api_key="sk-test", timeout_s=0.5, connect_timeout_s=0.5)
    yield Rig(kind, fake, build_worker(settings))
    fake.stop()
