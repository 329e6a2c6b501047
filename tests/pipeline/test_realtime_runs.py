"""One visible answer per request, whatever happens to the workers running it: two
real real-time workers, one of them killed (SIGKILL) or frozen (SIGSTOP) in the
middle of a request, and the client reading the stream through a real gateway.

The leases here are short (``run_lease_s`` 1.5 s, renewed every 0.5 s; the sweep
runs every second) and everything else is long (the provider hangs for 30 s, the
request's deadline is 15 s): only the lease sweep can meet the 5 s the issue gives
for noticing a lost run.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from pipeline.models import SessionTurn
from tests.cluster import Cluster, SseReader, start_cluster
from tests.conftest import Fakes, TenantFixture

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

NOTICED_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, session_fakes: Fakes, django_db_setup: None) -> Iterator[Cluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("runs"), limits={"run_lease_s": 1.5})
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster(platform: Cluster, fakes: Fakes) -> Cluster:
    platform.keep_workers(2)  # the ones an earlier test killed, replaced
    return platform


def test_a_worker_killed_before_the_first_token_is_replaced(cluster: Cluster, owner: TenantFixture, fakes: Fakes) -> None:
    fakes.openai.mode, fakes.openai.hang_s = "hang", 30  # the first run waits on its provider
    stream = SseReader(cluster, owner.key, {"prompt": "survive a kill", "worker": "openai"})
    _, start = stream.wait_for("start")
    request_id = start["request_id"]
    first = cluster.pid_running(request_id)
    fakes.openai.mode = "ok"  # the next run's provider answers
    cluster.signal(first, signal.SIGKILL)
    killed_at = time.monotonic()
    record = cluster.wait_for(request_id, lambda r: r.get("attempt") == "2", timeout_s=NOTICED_WITHIN_S + 1)
    noticed_after = time.monotonic() - killed_at
    events = stream.finish()
    assert noticed_after < NOTICED_WITHIN_S
    assert [e["type"] for e in events][-1] == "done" and "".join(e["text"] for e in events if e["type"] == "token") == "Hello, world!"
    record = cluster.record(request_id)
    assert record["status"] == "completed" and int(record["executed_by"].rsplit(":", 1)[1]) != first
    assert SessionTurn.objects.filter(request_id=request_id).count() == 2


def test_a_worker_killed_after_tokens_reached_the_client_ends_in_worker_lost(cluster: Cluster, owner: TenantFixture, fakes: Fakes) -> None:
    fakes.openai.tokens, fakes.openai.token_delay_s = ["word "] * 60, 0.25  # a 15 s answer
    stream = SseReader(cluster, owner.key, {"prompt": "die mid-answer", "worker": "openai", "max_tokens": 100})
    stream.wait_for("token")
    _, start = stream.wait_for("start")
    cluster.signal(cluster.pid_running(start["request_id"]), signal.SIGKILL)
    killed_at = time.monotonic()
    arrived, error = stream.wait_for("error", timeout_s=NOTICED_WITHIN_S + 2)
    assert error["code"] == "worker_lost" and error["data"]["request_id"] == start["request_id"]
    assert arrived - killed_at < NOTICED_WITHIN_S
    assert stream.finish()[-1]["type"] == "error" and "done" not in stream.kinds()
    assert cluster.record(start["request_id"])["status"] == "failed"


def test_two_runs_of_one_request_give_one_clean_stream_and_one_turn(cluster: Cluster, owner: TenantFixture, fakes: Fakes) -> None:
    """The first run is frozen (a long pause, a partition) before its first token: its
    lease lapses and the request is published again, to the other worker. Thawed, the
    first run finds itself fenced out: its tokens never reach the stream."""
    fakes.openai.tokens, fakes.openai.token_delay_s = ["a ", "b ", "c ", "d"], 1.0  # the first token after 1 s
    stream = SseReader(cluster, owner.key, {"prompt": "two runs", "worker": "openai", "session_id": "two-runs"})
    _, start = stream.wait_for("start")
    request_id = start["request_id"]
    first = cluster.pid_running(request_id)
    cluster.signal(first, signal.SIGSTOP)
    try:
        cluster.wait_for(request_id, lambda r: r.get("attempt") == "2" and r.get("status") == "running", timeout_s=NOTICED_WITHIN_S + 2)
    finally:
        cluster.signal(first, signal.SIGCONT)  # both runs now stream from the provider at once
    events = stream.finish()
    assert [e["type"] for e in events] == ["start", "token", "token", "token", "token", "done"]
    assert [e["seq"] for e in events if e["type"] == "token"] == [0, 1, 2, 3]
    written = cluster.bus.read_all(request_id)
    assert {e.attempt for e in written} == {2} and [e.type for e in written].count("done") == 1
    turns = SessionTurn.objects.filter(request_id=request_id)
    assert sorted(turns.values_list("role", "attempt")) == [("assistant", 2), ("user", 2)]
    assert turns.get(role="assistant").content == "a b c d"
