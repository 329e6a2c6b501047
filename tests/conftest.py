from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from rest_framework.test import APIClient

from pipeline.auth import IssuedKey, tenant_create
from pipeline.config import PipelineSettings, set_config


@dataclass
class TenantFixture:
    issued: IssuedKey
    client: APIClient

    @property
    def tenant(self):
        return self.issued.api_key.tenant

    @property
    def key(self) -> str:
        return self.issued.raw


def make_tenant(name: str) -> TenantFixture:
    issued = tenant_create(name=name)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issued.raw}")
    return TenantFixture(issued=issued, client=client)


@pytest.fixture
def owner(db: None) -> TenantFixture:
    return make_tenant("owner")


@pytest.fixture
def outsider(db: None) -> TenantFixture:
    return make_tenant("outsider")


@pytest.fixture
def staff(db: None) -> Any:
    """A Django test client logged in as a superuser (the admin's operator)."""
    from django.contrib.auth.models import User
    from django.test import Client

    User.objects.create_superuser("ops", "ops@example.test", "pw-only-for-tests")
    client = Client()
    client.login(username="ops", password="pw-only-for-tests")
    return client


@pytest.fixture(autouse=True)
def _no_task_outlives_its_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """A transactional test's database is flushed after it. A real-time task it left
    queued (``"wait": false``) or still running would write to it meanwhile (a
    session turn locks its tenant row: seen once as a deadlock with the flush's
    TRUNCATE). So: the leftovers are purged, and the running ones finish first."""
    yield
    marker = request.node.get_closest_marker("django_db")
    if marker is None or not marker.kwargs.get("transaction"):
        return
    import redis
    from django.conf import settings

    from orchestrator_site.celery import app

    app.control.purge()
    # Not get_bus(): a test may still have a dead one installed. A running request holds
    # a lease: the leases name every candidate, however many records the suite has left.
    client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    prefix, leases = settings.REDIS_KEY_PREFIX, f"{settings.REDIS_KEY_PREFIX}:leases"
    deadline = time.monotonic() + 5
    try:
        while True:
            held = client.zrange(leases, 0, -1)
            pipe = client.pipeline(transaction=False)
            for request_id in held:
                pipe.hget(f"{prefix}:req:{request_id}", "status")
            running = [request_id for request_id, status in zip(held, pipe.execute(), strict=True) if status == "running"]
            if not running:
                return
            if time.monotonic() > deadline:  # a run that will never finish (its test broke it): not waited on again
                for request_id in running:
                    client.hset(f"{prefix}:req:{request_id}", "status", "failed")
                    client.zrem(leases, request_id)
                return
            time.sleep(0.05)
    finally:
        client.close()


@pytest.fixture(autouse=True)
def _no_lease_outlives_its_test() -> Iterator[None]:
    """A request a test recorded or published and left unanswered keeps its lease: a
    real-time worker's sweep would publish it again later, into another test's
    metrics. Leases of requests not running at a test's end go with it."""
    yield
    import redis
    from django.conf import settings

    client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    prefix, leases = settings.REDIS_KEY_PREFIX, f"{settings.REDIS_KEY_PREFIX}:leases"
    try:
        held = client.zrange(leases, 0, -1)
        if held:
            pipe = client.pipeline(transaction=False)
            for request_id in held:
                pipe.hget(f"{prefix}:req:{request_id}", "status")
            idle = [request_id for request_id, status in zip(held, pipe.execute(), strict=True) if status != "running"]
            if idle:
                client.zrem(leases, *idle)
    finally:
        client.close()


@pytest.fixture(autouse=True)
def _shared_state_up() -> Iterator[None]:
    """A test that makes Redis fail leaves the process on its local state for a
    second; the next test starts on the shared state again."""
    yield
    from pipeline.resilience.local import LocalBreaker, shared_state

    shared_state.reset()
    LocalBreaker.reset()


@contextlib.contextmanager
def scratch_bus(name: str, *, maxlen: int) -> Iterator[Any]:
    """A TokenBus on the test Redis under a prefix of its own; its keys are deleted afterwards."""
    import uuid

    from django.conf import settings

    from pipeline.shared_redis import SharedRedis
    from pipeline.tokenbus import TokenBus

    shared = SharedRedis(url=settings.REDIS_URL, prefix=f"{name}{uuid.uuid4().hex[:8]}", socket_timeout_s=1.0)
    bus = TokenBus(redis=shared, maxlen=maxlen, ttl_s=30)
    yield bus
    keys = shared.client.keys(f"{shared.prefix}:*")
    if keys:
        shared.client.delete(*keys)


def begun_run(bus: Any, request_id: str, *, attempt: int = 1, payload: dict[str, Any] | None = None) -> Any:
    """A request recorded as the gateway records it, and a run that has begun it: its ``Producer``."""
    import json

    from pipeline.tokenbus import fencing
    from pipeline.tokenbus.producer import Producer

    if not bus.get_record(request_id):
        bus.set_record(request_id, tenant_id="t", session_id="s", status="queued", attempt=str(attempt), owner="", payload=json.dumps(payload or {}))
    run = fencing.Run.new(request_id, attempt)
    begun = fencing.begin(bus, run, lease_s=30, executed_by="test")
    assert begun.outcome is fencing.BeginOutcome.RUN, begun
    return Producer(bus, run)


def queue_request(request: Any, *, attempt: int = 1, deadline_in_s: float = 60.0) -> str:
    """The request's record, as the gateway's start writes it (unpublished)."""
    import json

    from pipeline.tokenbus import get_bus

    now = time.time()
    get_bus().set_record(
        request.request_id,
        tenant_id=request.tenant_id,
        session_id=request.session_id,
        status="queued",
        attempt=str(attempt),
        owner="",
        payload=json.dumps(request.to_dict()),
        created_at=f"{now:.6f}",
        deadline_at=f"{now + deadline_in_s:.6f}",
    )
    return str(request.request_id)


def run_in_process(request: Any, *, deadline_in_s: float = 60.0) -> None:
    """The request recorded, then run here as a real-time worker runs it."""
    from pipeline.services import execute

    execute.realtime_execute(queue_request(request, deadline_in_s=deadline_in_s), 1)


def delete_redis_keys(*patterns: str) -> None:
    from pipeline.shared_redis import get_redis

    shared = get_redis()
    keys = [key for pattern in patterns for key in shared.client.keys(f"{shared.prefix}:{pattern}")]
    if keys:
        shared.client.delete(*keys)


@pytest.fixture
def clean_breakers() -> Iterator[None]:
    """The circuit breakers a test opened are closed again after it."""
    yield
    delete_redis_keys("breaker:*")


@pytest.fixture
def dedup_on() -> Iterator[PipelineSettings]:
    """The session's pipeline config with deduplication on (30 s window); afterwards
    the config back, and the test's dedup entries, slots and rate counts gone."""
    from pipeline.config import DedupConfig, get_config

    original = get_config()
    config = original.model_copy(update={"dedup": DedupConfig(enabled=True, window_s=30)})
    set_config(config)
    yield config
    set_config(original)
    delete_redis_keys("dedup:*", "inflight*", "rate:*")


@pytest.fixture
def anon() -> APIClient:
    return APIClient()


@pytest.fixture
def pipeline_config() -> Iterator[callable]:
    """Swap the process-wide pipeline config for one test."""

    def use(config: PipelineSettings) -> PipelineSettings:
        set_config(config)
        return config

    yield use
    set_config(None)


# --- a real Celery worker consuming `realtime`, and provider fakes it can reach ------------

import hashlib  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from tests.fakes.anthropic import FakeAnthropic  # noqa: E402
from tests.fakes.llamacpp import FakeLlamaCpp  # noqa: E402
from tests.fakes.openai import FakeOpenAI  # noqa: E402
from tests.fakes.server import FakeProvider  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port nothing listens on (just bound and released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Fakes:
    openai: FakeOpenAI
    anthropic: FakeAnthropic
    llamacpp: FakeLlamaCpp
    vllm: FakeOpenAI

    def all(self) -> list[FakeProvider]:
        return [self.openai, self.anthropic, self.llamacpp, self.vllm]

    def reset(self) -> None:
        for fake in self.all():
            fake.mode, fake.token_delay_s, fake.tokens = "ok", 0.0, ["Hello", ",", " world", "!"]
            fake.fail_times, fake.fail_mode = 0, "503"
            fake.context_window = None
            fake.client_aborts.clear()


def _pipeline_toml(fakes: Fakes, output_dir: Path) -> str:
    return f"""
default_worker = "echo"

[workers.echo]
kind = "echo"
models = ["echo-1"]
token_count = 8

[workers.echo_priced]  # the budgets' tests: 8 answer tokens at 0.001 USD each
kind = "echo"
models = ["echo-priced-1"]
token_count = 8
price_input_per_mtok = 0
price_output_per_mtok = 1000

[routes.auto]  # the route groups' tests: echo is free, echo_priced is the strong one
candidates = [{{ worker = "echo" }}, {{ worker = "echo_priced" }}]
long_prompt_chars = 40

[workers.openai]
kind = "openai"
base_url = "{fakes.openai.url}/v1"
models = ["gpt-fake", "gpt-other"]
timeout_s = 2
price_input_per_mtok = 1000  # dear, so that a few tokens show a cost
price_output_per_mtok = 2000
retry = {{ attempts = 1 }}  # the error-mapping tests want the first answer

[workers.openai_retry]
kind = "openai"
base_url = "{fakes.openai.url}/v1"
models = ["gpt-fake"]
timeout_s = 2
retry = {{ attempts = 3, base_ms = 1, max_ms = 20, retry_after_cap_s = 0.05 }}

[workers.flaky]
kind = "openai"
base_url = "{fakes.openai.url}/v1"
models = ["gpt-fake"]
timeout_s = 2
retry = {{ attempts = 1 }}
breaker = {{ failure_threshold = 2, open_s = 60 }}
fallback = "echo"

[workers.flaky_alone]
kind = "openai"
base_url = "{fakes.openai.url}/v1"
models = ["gpt-fake"]
timeout_s = 2
retry = {{ attempts = 1 }}
breaker = {{ failure_threshold = 1, open_s = 60 }}

[workers.gpt_relay]  # mid-stream failover: a dear OpenAI worker whose answers go on on claude_relay
kind = "openai"
base_url = "{fakes.openai.url}/v1"
models = ["gpt-fake"]
timeout_s = 2
retry = {{ attempts = 1 }}
price_input_per_mtok = 1000
price_output_per_mtok = 2000
fallback = "claude_relay"

[workers.claude_relay]
kind = "anthropic"
base_url = "{fakes.anthropic.url}"
models = ["claude-relay"]
timeout_s = 2
retry = {{ attempts = 1 }}
price_input_per_mtok = 3000
price_output_per_mtok = 15000

[routes.relay]  # a group's failover: vllm is chosen (listed first, as free as llamacpp), llamacpp goes on
candidates = [{{ worker = "vllm" }}, {{ worker = "llamacpp" }}]

[workers.anthropic]
kind = "anthropic"
base_url = "{fakes.anthropic.url}"
models = ["claude-fake"]
timeout_s = 2
retry = {{ attempts = 1 }}

[workers.llamacpp]
kind = "llamacpp"
base_url = "{fakes.llamacpp.url}"
timeout_s = 2
retry = {{ attempts = 1 }}

[workers.vllm]
kind = "vllm"
base_url = "{fakes.vllm.url}/v1"
timeout_s = 2
retry = {{ attempts = 1 }}

[dedup]
enabled = false  # most tests repeat prompts on purpose; tests/pipeline/test_dedup.py turns it on

[limits]
max_prompt_chars = 2000
request_timeout_s = 15

[batch]
output_dir = "{output_dir}"  # the file destinations' (tests/batches/test_batch_destinations.py)
"""


@pytest.fixture(scope="session")
def session_fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fakes]:
    from django.conf import settings

    from pipeline.config import load_config

    vllm = FakeOpenAI()
    vllm.dialect = "vllm"
    fakes = Fakes(FakeOpenAI().start(), FakeAnthropic().start(), FakeLlamaCpp().start(), vllm.start())
    path = tmp_path_factory.mktemp("config") / "pipeline.toml"
    path.write_text(_pipeline_toml(fakes, tmp_path_factory.mktemp("batch-output")))
    settings.PIPELINE_CONFIG_PATH = str(path)
    os.environ["PIPELINE_CONFIG"] = str(path)
    set_config(load_config(path))
    yield fakes
    for fake in fakes.all():
        fake.stop()


@pytest.fixture
def fakes(session_fakes: Fakes) -> Iterator[Fakes]:
    session_fakes.reset()
    yield session_fakes
    session_fakes.reset()


def _database_url() -> str:
    from django.conf import settings

    db = settings.DATABASES["default"]
    return f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


def _control_app(env: dict[str, str]) -> Any:
    """A Celery app on the broker (and key prefix) of ``env``, to ping a worker there.
    Celery's broker_url always follows this process's CELERY_BROKER_URL; the read and
    write URLs do not."""
    from celery import Celery

    url, prefix = env["CELERY_BROKER_URL"], env.get("CELERY_BROKER_KEY_PREFIX", "")
    probe = Celery("probe", set_as_current=False)
    probe.conf.update(broker_read_url=url, broker_write_url=url, broker_transport_options={"global_keyprefix": prefix} if prefix else {})
    return probe


def process_env(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process the suite starts: the test database, and the stored
    config versions followed as in production, in a scope of the process's config file
    (processes started on one file share its versions; another file, another scope)."""
    env = {**os.environ, "DATABASE_URL": _database_url(), "PIPELINE_CONFIG_FOLLOW": "1", **(extra_env or {})}
    if "PIPELINE_CONFIG_SCOPE" not in (extra_env or {}):
        config = str(Path(env["PIPELINE_CONFIG"]).resolve())
        env["PIPELINE_CONFIG_SCOPE"] = "test-" + hashlib.sha1(config.encode()).hexdigest()[:12]
    return env


def start_celery_worker(
    queues: str,
    name: str,
    log_path: Path,
    extra_env: dict[str, str] | None = None,
    *,
    concurrency: int | None = 8,
    extra_args: tuple[str, ...] = (),
    measured: bool = True,
) -> subprocess.Popen[bytes]:
    """A real Celery worker process, returned once it answers a ping on its broker
    (``concurrency=None``: no ``-c``, the config's ``[queues]`` decides). ``measured``
    False: outside the suite's coverage, for a worker whose test is its scale (its
    lines are measured by the others), which coverage's tracing would slow threefold."""
    env = process_env(extra_env)
    if not measured:
        env.pop("COVERAGE_PROCESS_CONFIG", None)
        env.pop("COVERAGE_PROCESS_START", None)
    control = _control_app(env)
    cmd = [sys.executable, "-m", "celery", "-A", "orchestrator_site", "--quiet", "worker", "-Q", queues, "-P", "threads"]
    cmd += ["-c", str(concurrency)] if concurrency is not None else []
    cmd += ["-n", name, "--without-gossip", "--without-mingle", "--loglevel", env.get("LOG_LEVEL", "WARNING"), *extra_args]
    log = log_path.open("ab")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"celery worker exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        if control.control.ping(destination=[name], timeout=0.5):
            return proc
    proc.kill()
    raise RuntimeError(f"celery worker did not become ready: {log_path.read_text()[-2000:]}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    metrics_url: str  # the worker's own Prometheus exposition

    @property
    def pid(self) -> int:
        return self.proc.pid


@pytest.fixture(scope="session")
def realtime_worker(
    django_db_setup: None, django_db_blocker: object, session_fakes: Fakes, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A real ``celery worker -Q realtime`` process on the test database and broker,
    serving its metrics on a port of its own, from a metrics directory of its own."""
    from orchestrator_site.celery import app

    app.control.purge()  # leftovers of an interrupted earlier run
    port = free_port()
    env = {"WORKER_METRICS_PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("worker-metrics"))}
    proc = start_celery_worker("realtime", f"realtime-test-{os.getpid()}@localhost", tmp_path_factory.mktemp("celery") / "worker.log", env)
    yield WorkerProcess(proc, f"http://127.0.0.1:{port}/metrics")
    stop_process(proc)


def start_gateway(log: Path, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A real gateway process (uvicorn, as ``make run`` starts it) on the test database; returns it and its base URL
    once ``/health`` answers."""
    import httpx

    from orchestrator_site.gateway import gateway_command

    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            gateway_command("127.0.0.1", port, executable=(sys.executable, "-m", "uvicorn")),
            cwd=ROOT,
            env=process_env(extra_env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code in (200, 503):
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    stop_process(proc)
    raise RuntimeError(f"gateway did not start: {log.read_text()[-2000:]}")


# --- every error of the tree is raised by code under test somewhere in the suite -----------

from tests.error_triggers import pytest_sessionfinish  # noqa: E402, F401  (the hook, registered here)


@pytest.fixture(scope="session", autouse=True)
def _close_database_pool(django_db_setup: None, django_db_blocker: object) -> Iterator[None]:
    """Tests that call the API from threads leave connections in the psycopg pool;
    close it before pytest-django drops the test database."""
    yield
    from django.db import connections

    # The pool is shared by the threads (one per alias, held by the backend class).
    close_pool = getattr(connections["default"], "close_pool", None)
    if close_pool is not None:
        close_pool()


# --- the gateway's broker: kept here, or down ---------------------------------------------------


@pytest.fixture
def unpublished(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """The gateway's side alone: what it would publish to the broker is kept in this
    list (request id, attempt) for the test to run in process, so that no worker of
    the suite takes it meanwhile. The lease starts as after a real publish."""
    from pipeline.services import start
    from pipeline.tokenbus import fencing, get_bus

    kept: list[tuple[str, int]] = []

    def keep(request_id: str, attempt: int, *, queue_lease_s: float, lease: bool = True) -> None:
        kept.append((request_id, attempt))
        if lease:
            fencing.lease_published(get_bus(), request_id, lease_s=queue_lease_s)

    monkeypatch.setattr(start, "realtime_publish", keep)
    return kept


def start_request(request: Any, rates: Any = None) -> Any:
    """``services.start.ainfer_start``, from sync code."""
    from asgiref.sync import async_to_sync

    from pipeline.services import start

    return async_to_sync(start.ainfer_start)(request=request, rates=rates)


@pytest.fixture
def redis_down() -> Iterator[None]:
    """This process's shared Redis is a port nobody listens on (the suite's own stays up)."""
    from pipeline.shared_redis import SharedRedis, set_redis
    from pipeline.tokenbus import TokenBus, set_bus

    dead = SharedRedis(url=f"redis://127.0.0.1:{free_port()}/0", prefix="gone", socket_timeout_s=0.3)
    set_redis(dead)
    set_bus(TokenBus(redis=dead, maxlen=10, ttl_s=10))
    yield
    set_redis(None)
    set_bus(None)


@pytest.fixture
def broker_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's broker is gone: Celery's publish raises as kombu does when it cannot connect."""
    from kombu.exceptions import OperationalError

    from pipeline.tasks import run_realtime

    def down(*_: object, **__: object) -> None:
        raise OperationalError("broker down")

    monkeypatch.setattr(run_realtime, "apply_async", down)


async def asgi_request(
    app: Any, method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None, after_body: Any = None, leave: asyncio.Event | None = None
) -> list[dict[str, Any]]:
    """One HTTP request straight into an ASGI application, as uvicorn makes it: the
    body in one message, then ``http.disconnect`` once the response has ended, or once
    ``leave`` is set (the client went away), or ``after_body`` (a message a server
    should never send). Returns what the app sent. No client library between: what the
    app leaves behind is its own."""
    sent: list[dict[str, Any]] = []
    ended = asyncio.Event()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        if after_body is not None:
            return after_body
        await (leave or ended).wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            ended.set()

    pairs = {"host": "testserver", "content-length": str(len(body)), **(headers or {})}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(name.encode(), value.encode()) for name, value in pairs.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    return sent


async def left_for_the_collector(call: Callable[[int], Awaitable[Any]], *, times: int = 10, warm: int = 2) -> tuple[int, list[Any]]:
    """``call(n)`` ``warm`` times (first-use caches), then ``times`` more with the cycle
    collector off: how many objects it then finds unreachable, and those calls' results."""
    for n in range(warm):
        await call(n)
    gc.collect()
    gc.disable()
    try:
        results = [await call(n) for n in range(warm, warm + times)]
        return gc.collect(), results
    finally:
        gc.enable()
