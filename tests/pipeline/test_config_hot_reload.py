"""Hot reload under traffic, through a real gateway, a real real-time worker, a real
prefork batch worker and the real scheduler, all following one config scope: a change made with the CLI or by
saving the watched file reaches every process within a second; an invalid edit and a
breaking edit are refused while traffic goes on; a process that was down during a
change runs it when it starts; and no request fails or is dropped meanwhile.

The processes' timer check is 30 s here, so only the Postgres signal (and the file
watcher) can meet the second."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from pipeline.models import PipelineConfigVersion, Tenant
from tests.conftest import ROOT, Fakes, TenantFixture, process_env, start_celery_worker, start_gateway, stop_process
from tests.orchestrator_site.test_cli import SCRIPT

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

EVERY = {"gateway", "worker-realtime", "worker-batch", "beat"}
VERSION = re.compile(r"^orchestrator_config_version\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$", re.MULTILINE)


class Traffic(threading.Thread):
    """Requests one after another until stopped; every answer's status is kept."""

    def __init__(self, url: str, key: str) -> None:
        super().__init__(daemon=True)
        self.url, self.key = url, key
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop_event.is_set():
                try:
                    resp = client.post(
                        f"{self.url}/api/v1/infer",
                        json={"prompt": "steady traffic", "worker": "openai", "stream": False},
                        headers={"Authorization": f"Bearer {self.key}"},
                    )
                    self.statuses.append(resp.status_code)
                    if resp.status_code != 200:
                        self.errors.append(resp.text)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=60)


def config_versions(exposition: str) -> dict[tuple[str, str], int]:
    """(process, pid) → the config version it reports, from a Prometheus exposition."""
    found = {}
    for match in VERSION.finditer(exposition):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        found[(labels["process"], labels.get("pid", ""))] = int(float(match["value"]))
    return found


def versions_by_process(url: str) -> dict[tuple[str, str], int]:
    """Every process's version, from the gateway's /metrics (every process's)."""
    return config_versions(httpx.get(f"{url}/metrics", timeout=5).text)


def everyone_on(url: str, version: int) -> bool:
    """Every process reports ``version``: each of the four kinds, and every pid of them."""
    reported = versions_by_process(url)
    return {p for p, _ in reported} >= EVERY and set(reported.values()) == {version}


def seconds_until(predicate: Callable[[], bool], timeout_s: float) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s} s")
        time.sleep(0.02)
    return time.monotonic() - start


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), "config", *args], capture_output=True, text=True, timeout=60, env=env, check=False)


def latest_version(scope: str) -> PipelineConfigVersion:
    version = PipelineConfigVersion.objects.filter(scope=scope).order_by("-id").first()
    assert version is not None
    return version


def test_hot_reload_reaches_every_process_under_traffic(tmp_path: Path, session_fakes: Fakes, owner: TenantFixture, outsider: TenantFixture) -> None:
    fakes = session_fakes
    fakes.reset()
    base = Path(os.environ["PIPELINE_CONFIG"]).read_text(encoding="utf-8")
    config = tmp_path / "pipeline.toml"
    config.write_text(base, encoding="utf-8")
    name = f"hot{uuid.uuid4().hex[:8]}"
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {
        "PIPELINE_CONFIG": str(config),
        "REDIS_KEY_PREFIX": name,
        "CELERY_BROKER_KEY_PREFIX": f"{name}:",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "PIPELINE_CONFIG_CHECK_S": "30",
    }
    full_env = process_env(env)
    scope = full_env["PIPELINE_CONFIG_SCOPE"]
    Tenant.objects.filter(id=owner.tenant.id).update(requests_per_minute=0)  # the traffic's tenant: never rate-limited
    worker = start_celery_worker("realtime", f"{name}@localhost", tmp_path / "worker.log", env, concurrency=8)
    batch = start_celery_worker("batch.low", f"{name}-batch@localhost", tmp_path / "batch.log", env, concurrency=1, extra_args=("-P", "prefork"))
    gateway, url = start_gateway(tmp_path / "gateway.log", env)
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "orchestrator_site", "beat", "-s", str(tmp_path / "schedule"), "--loglevel", "WARNING"],
        cwd=ROOT,
        env=full_env,
        stdout=(tmp_path / "beat.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    traffic = Traffic(url, owner.key)
    try:
        first = PipelineConfigVersion.objects.get(scope=scope, is_active=True)
        seconds_until(lambda: {p for (p, _), v in versions_by_process(url).items() if v == first.id} == EVERY, timeout_s=30)
        traffic.start()
        seconds_until(lambda: len(traffic.statuses) >= 3, timeout_s=30)

        # A rate limit lowered with the CLI: every process within a second, and the gateway enforces it.
        config.with_name("limited.toml").write_text(base + "\n[rate_limits]\nrequests_per_minute = 2\n", encoding="utf-8")
        pushed = cli(full_env, "push", str(config.with_name("limited.toml")), "--activate")
        assert pushed.returncode == 0, pushed.stderr
        limited = latest_version(scope)
        took = seconds_until(lambda: everyone_on(url, limited.id), timeout_s=5)
        assert took < 1.0, f"the rate limit reached every process after {took:.2f} s"
        probe = [
            httpx.post(f"{url}/api/v1/infer", json={"prompt": f"probe {n}", "stream": False}, headers={"Authorization": f"Bearer {outsider.key}"}, timeout=30)
            for n in range(3)
        ]
        assert [r.status_code for r in probe] == [200, 200, 429] and probe[2].json()["error"]["code"] == "rate_limited"

        # A system prompt changed by saving the watched file: in the next answer.
        config.write_text(base + '\n[assemble]\nsystem_prompt = "Answer like a pirate."\n', encoding="utf-8")
        saved_at = time.monotonic()
        seconds_until(lambda: latest_version(scope).id > limited.id and latest_version(scope).is_active, timeout_s=5)
        pirate = latest_version(scope)
        seconds_until(lambda: everyone_on(url, pirate.id), timeout_s=5)
        took = time.monotonic() - saved_at
        assert took < 1.0, f"the saved file reached every process after {took:.2f} s"
        fakes.openai.requests.clear()
        answer = httpx.post(
            f"{url}/api/v1/infer",
            json={"prompt": "who are you", "worker": "openai", "stream": False},
            headers={"Authorization": f"Bearer {owner.key}"},
            timeout=30,
        )
        assert answer.status_code == 200
        asked = [b for b in [r["body"] for r in list(fakes.openai.requests)] if any("who are you" in str(m.get("content")) for m in b.get("messages", []))]
        assert asked and asked[-1]["messages"][0] == {"role": "system", "content": "Answer like a pirate."}

        # An invalid edit: stored as rejected, the running version stays, traffic goes on.
        served = len(traffic.statuses)
        config.write_text(base + "\n[rag]\ntop_k = 0\n", encoding="utf-8")
        seconds_until(lambda: PipelineConfigVersion.objects.filter(scope=scope, valid=False).exists(), timeout_s=5)
        rejected = PipelineConfigVersion.objects.get(scope=scope, valid=False)
        assert rejected.problems[0]["path"].endswith("rag.top_k") or rejected.problems[0]["path"] == "rag.top_k"
        time.sleep(0.5)
        assert set(versions_by_process(url).values()) >= {pirate.id} and latest_version(scope).id == rejected.id
        assert PipelineConfigVersion.objects.get(scope=scope, is_active=True).id == pirate.id
        seconds_until(lambda: len(traffic.statuses) > served + 3, timeout_s=30)

        # A breaking edit: refused with its reasons.
        breaking_file = config.with_name("breaking.toml")
        breaking_file.write_text(base + "\n[queues]\nrealtime_concurrency = 3\n", encoding="utf-8")
        refused = cli(full_env, "push", str(breaking_file), "--activate")
        assert refused.returncode == 1 and "queues.realtime_concurrency: 32 → 3: read when a process starts" in refused.stderr
        assert PipelineConfigVersion.objects.get(scope=scope, is_active=True).id == pirate.id

        # A worker down during a change runs it when it starts.
        stop_process(worker)
        later_file = config.with_name("later.toml")
        later_file.write_text(base + '\n[assemble]\nsystem_prompt = "Version while the worker was down."\n', encoding="utf-8")
        assert cli(full_env, "push", str(later_file), "--activate").returncode == 0
        later = latest_version(scope)
        worker = start_celery_worker("realtime", f"{name}-2@localhost", tmp_path / "worker2.log", env, concurrency=8)
        assert versions_by_process(url)[("worker-realtime", str(worker.pid))] == later.id
        served = len(traffic.statuses)
        seconds_until(lambda: len(traffic.statuses) > served + 3, timeout_s=30)
    finally:
        traffic.stop()
        for proc in (beat, gateway, worker, batch):
            stop_process(proc)
    assert traffic.errors == [] and set(traffic.statuses) == {200} and len(traffic.statuses) >= 10
