"""The gateway as it runs in production: a real Daphne process on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, Fakes, TenantFixture, WorkerProcess, _database_url, free_port, stop_process

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture(scope="module")
def gateway(
    django_db_setup: None, django_db_blocker: object, session_fakes: Fakes, realtime_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    port = free_port()
    log_path: Path = tmp_path_factory.mktemp("daphne") / "daphne.log"
    env = {**os.environ, "DATABASE_URL": _database_url()}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "orchestrator_site.asgi:application"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code in (200, 503):
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"daphne did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.1)
    yield url
    stop_process(proc)


def test_health_through_daphne(gateway: str) -> None:
    resp = httpx.get(f"{gateway}/health")
    assert resp.status_code == 200 and resp.json()["status"] == "ok"


def test_infer_through_daphne(gateway: str, owner: TenantFixture) -> None:
    resp = httpx.post(f"{gateway}/api/v1/infer", json={"prompt": "over the wire"}, headers={"Authorization": f"Bearer {owner.key}"}, timeout=20)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["text"].startswith("over the wire") and list(body["timings_us"]) == ["rag", "assemble", "inference", "post", "stream"]


def test_errors_through_daphne(gateway: str, owner: TenantFixture) -> None:
    resp = httpx.post(f"{gateway}/api/v1/infer", content=b"{oops", headers={"Authorization": f"Bearer {owner.key}", "Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "malformed_json"
    missing = httpx.get(f"{gateway}/api/v1/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_static_files_and_admin_login_are_served(gateway: str) -> None:
    assert httpx.get(f"{gateway}/static/admin/css/base.css").status_code == 200
    assert httpx.get(f"{gateway}/admin/login/").status_code == 200


def test_waiting_requests_do_not_serialize(gateway: str, owner: TenantFixture, fakes: Fakes) -> None:
    """Sixteen clients wait at once; each request spends ~0.5 s at the provider.
    Served one at a time they would take ~8 s; concurrently, about two batches of 8 (worker threads)."""
    fakes.openai.mode, fakes.openai.hang_s = "ok", 0.0
    slow = SlowReplies(fakes, 0.5)
    statuses: list[int] = []

    def one() -> None:
        resp = httpx.post(f"{gateway}/api/v1/infer", json={"prompt": "p", "worker": "openai"}, headers={"Authorization": f"Bearer {owner.key}"}, timeout=30)
        statuses.append(resp.status_code)

    threads = [threading.Thread(target=one) for _ in range(16)]
    started = time.monotonic()
    with slow:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elapsed = time.monotonic() - started
    assert statuses == [200] * 16
    assert elapsed < 16 * 0.5 * 0.6, elapsed  # clearly faster than one at a time (8 s)


class SlowReplies:
    """Delays every fake OpenAI reply by ``delay_s`` (a slow provider)."""

    def __init__(self, fakes: Fakes, delay_s: float) -> None:
        self.fake, self.delay_s = fakes.openai, delay_s
        self.original = fakes.openai.reply

    def __enter__(self) -> None:
        original, delay = self.original, self.delay_s

        def slow(path: str, body: dict) -> object:
            time.sleep(delay)
            return original(path, body)

        self.fake.reply = slow  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        self.fake.reply = self.original  # type: ignore[method-assign]


def test_async_form_and_documents_through_daphne(gateway: str, owner: TenantFixture) -> None:
    headers = {"Authorization": f"Bearer {owner.key}"}
    created = httpx.post(f"{gateway}/api/v1/documents", json={"title": "Gateway doc", "body": "served by daphne"}, headers=headers)
    assert created.status_code == 201
    assert [d["title"] for d in httpx.get(f"{gateway}/api/v1/documents", headers=headers).json()["results"]] == ["Gateway doc"]
    queued = httpx.post(f"{gateway}/api/v1/infer", json={"prompt": "later", "wait": False}, headers=headers)
    assert queued.status_code == 202
    request_id = queued.json()["request_id"]
    deadline = time.monotonic() + 10
    while httpx.get(f"{gateway}/api/v1/status/{request_id}", headers=headers).json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert httpx.get(f"{gateway}/api/v1/result/{request_id}", headers=headers).json()["text"].startswith("later")


def test_schema_and_docs_through_daphne(gateway: str) -> None:
    assert httpx.get(f"{gateway}/api/v1/schema/").status_code == 200
    page = httpx.get(f"{gateway}/api/v1/docs/")
    assert page.status_code == 200 and "swagger-ui" in page.text
