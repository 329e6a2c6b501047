"""Postgres down while a key that is not in the gateway's cache is looked up: a 503
``service_unavailable`` with ``Retry-After``, through the real gateway, never a 500."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from asgiref.sync import async_to_sync

from tests.conftest import free_port, start_gateway, stop_process

pytestmark = pytest.mark.slow

UNKNOWN_KEY = "po_00000000_not-in-any-cache"


@pytest.fixture(scope="module")
def gateway_without_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log: Path = tmp_path_factory.mktemp("no-postgres") / "gateway.log"
    env = {"DATABASE_URL": f"postgres://postgres@127.0.0.1:{free_port()}/gone", "DATABASE_POOL_TIMEOUT_S": "1"}
    proc, url = start_gateway(log, env)
    yield url
    stop_process(proc)


@pytest.mark.parametrize("path", ["/api/v1/infer", "/v1/chat/completions"])
def test_a_key_lookup_without_postgres_is_503_with_retry_after(gateway_without_postgres: str, path: str) -> None:
    body = {"prompt": "hi"} if path == "/api/v1/infer" else {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    resp = httpx.post(f"{gateway_without_postgres}{path}", json=body, headers={"Authorization": f"Bearer {UNKNOWN_KEY}"}, timeout=30)
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    if path.startswith("/v1/"):  # OpenAI's shape: the SDK raises InternalServerError, retries after Retry-After
        assert (error["code"], error["type"]) == ("service_unavailable", "server_error")
    else:
        assert error["code"] == "service_unavailable" and error["data"]["service"] == "postgres"
    assert resp.headers["Retry-After"] == "5"


def test_a_sync_view_answers_the_same(gateway_without_postgres: str) -> None:
    resp = httpx.get(f"{gateway_without_postgres}/api/v1/documents", headers={"Authorization": f"Bearer {UNKNOWN_KEY}"}, timeout=30)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "service_unavailable" and resp.headers["Retry-After"] == "5"


def test_the_websocket_closes_with_4503(gateway_without_postgres: str) -> None:
    async def connect() -> tuple[dict, int | None]:
        url = gateway_without_postgres.replace("http://", "ws://") + "/api/v1/stream"
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {UNKNOWN_KEY}"}) as ws:
            event = json.loads(await ws.recv())
            await ws.wait_closed()
            return event, ws.close_code

    event, code = async_to_sync(connect)()
    assert event["code"] == "service_unavailable" and code == 4503
