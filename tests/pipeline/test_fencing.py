"""Attempts, owners and leases (``pipeline.tokenbus.fencing``, ``producer``) against
the real Redis: who may begin a request, who may write its stream, and what a lapsed
lease becomes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from asgiref.sync import async_to_sync
from hypothesis import given
from hypothesis import strategies as st

from orchestrator_site.errors import RequestCancelled
from pipeline.tokenbus import BusEvent, RequestStatus, TokenBus, fencing
from pipeline.tokenbus.fencing import BeginOutcome, LapseOutcome, Run
from pipeline.tokenbus.producer import Fenced, Producer
from pipeline.tokenbus.reader import AttemptFilter, read_events
from tests.conftest import begun_run, scratch_bus


@pytest.fixture
def bus() -> Iterator[TokenBus]:
    with scratch_bus("fence", maxlen=1000) as bus:
        yield bus


def record(bus: TokenBus, rid: str = "r", *, attempt: int = 1, deadline_at: float | None = None, **extra: str) -> None:
    deadline = f"{deadline_at if deadline_at is not None else time.time() + 60:.6f}"
    payload = json.dumps({"request_id": rid})
    bus.set_record(rid, tenant_id="t", session_id="s", status="queued", attempt=str(attempt), owner="", payload=payload, deadline_at=deadline, **extra)


def begin(bus: TokenBus, run: Run, lease_s: float = 30) -> fencing.Begun:
    return fencing.begin(bus, run, lease_s=lease_s, executed_by="host:1")


def lease_of(bus: TokenBus, rid: str = "r") -> float | None:
    score = bus.redis.client.zscore(bus.leases_key, rid)
    return None if score is None else float(score)


def expire_lease(bus: TokenBus, rid: str = "r") -> None:
    bus.redis.client.zadd(bus.leases_key, {rid: time.time() - 1})


def lapse(bus: TokenBus, rid: str = "r", *, max_runs: int = 2) -> fencing.Lapsed:
    return fencing.lapse(bus, rid, next_lease_s=10, max_runs=max_runs)


# --- begin ----------------------------------------------------------------------------


def test_a_run_begins_the_current_attempt_and_holds_its_lease(bus: TokenBus) -> None:
    record(bus, deadline_at=1234.5)
    begun = begin(bus, Run.new("r", 1), lease_s=7)
    assert begun.outcome is BeginOutcome.RUN and begun.payload == {"request_id": "r"} and begun.deadline_at == 1234.5
    state = bus.get_record("r")
    assert state["status"] == "running" and state["owner"].startswith("1:") and state["runs"] == "1" and state["executed_by"] == "host:1"
    assert time.time() + 6 < (lease_of(bus) or 0) <= time.time() + 7


@pytest.mark.parametrize(
    ("prepare", "expected"),
    [
        ("none", BeginOutcome.MISSING),
        ("completed", BeginOutcome.FINISHED),
        ("failed", BeginOutcome.FINISHED),
        ("attempt 2", BeginOutcome.SUPERSEDED),
        ("begun", BeginOutcome.TAKEN),
    ],
)
def test_a_stale_or_duplicate_message_does_not_begin(bus: TokenBus, prepare: str, expected: BeginOutcome) -> None:
    if prepare != "none":
        record(bus, attempt=2 if prepare == "attempt 2" else 1)
    if prepare in ("completed", "failed"):
        bus.set_record("r", status=prepare)
    if prepare == "begun":
        assert begin(bus, Run.new("r", 1)).outcome is BeginOutcome.RUN
    before = bus.get_record("r")
    assert begin(bus, Run.new("r", 1)).outcome is expected
    assert bus.get_record("r").get("owner") == before.get("owner")  # nothing taken over


# --- writing: only the owner -------------------------------------------------------------


def test_only_the_owner_writes_the_stream_and_settles_once(bus: TokenBus) -> None:
    owner = begun_run(bus, "r")
    stranger = Producer(bus, Run.new("r", 1))  # the same attempt, never begun by this run
    assert owner.publish_token(0, "a") is True
    with pytest.raises(Fenced):
        stranger.publish_token(0, "b")
    assert stranger.finish("done", {}, status=RequestStatus.COMPLETED) is False
    assert owner.finish("done", {"text": "a"}, status=RequestStatus.COMPLETED) is True
    assert owner.finish("error", {}, status=RequestStatus.FAILED) is False  # settled already
    events = bus.read_all("r")
    assert [(e.type, e.attempt) for e in events] == [("token", 1), ("done", 1)]
    assert bus.get_record("r")["status"] == "completed" and bus.get_record("r")["streamed"] == "1"
    assert lease_of(bus) is None


def test_a_run_whose_attempt_was_republished_is_fenced_out(bus: TokenBus) -> None:
    old = begun_run(bus, "r")
    expire_lease(bus)
    assert lapse(bus).outcome is LapseOutcome.REPUBLISH
    with pytest.raises(Fenced):
        old.publish_token(0, "late")
    new = Producer(bus, Run.new("r", 2))
    assert fencing.begin(bus, new.run, lease_s=30, executed_by="b").outcome is BeginOutcome.RUN
    assert new.publish_token(0, "fresh") and new.finish("done", {}, status=RequestStatus.COMPLETED)
    assert old.finish("done", {}, status=RequestStatus.COMPLETED) is False
    assert [(e.type, e.attempt, e.data.get("text")) for e in bus.read_all("r")] == [("token", 2, "fresh"), ("done", 2, None)]


# --- leases: renewed, lapsed -------------------------------------------------------------------


def test_renewal_extends_only_current_runs(bus: TokenBus) -> None:
    current = begun_run(bus, "r").run
    record(bus, "waiting")  # a message received, not begun: held by attempt, no owner
    fencing.lease_published(bus, "waiting", lease_s=1)
    stale = Run.new("r", 1)  # an owner that is not the record's
    assert fencing.renew(bus, [current, Run("waiting", 1), stale], lease_s=50) == 2
    assert (lease_of(bus, "r") or 0) > time.time() + 45 and (lease_of(bus, "waiting") or 0) > time.time() + 45
    assert fencing.renew(bus, [], lease_s=50) == 0


def test_renewal_never_brings_back_a_finished_request(bus: TokenBus) -> None:
    producer = begun_run(bus, "r")
    producer.finish("done", {}, status=RequestStatus.COMPLETED)
    assert fencing.renew(bus, [producer.run], lease_s=50) == 0 and lease_of(bus) is None


def test_a_published_lease_does_not_shorten_a_runs(bus: TokenBus) -> None:
    begun_run(bus, "r")
    held = lease_of(bus)
    fencing.lease_published(bus, "r", lease_s=1)
    assert lease_of(bus) == held


def test_only_lapsed_leases_are_swept(bus: TokenBus) -> None:
    record(bus, "young")
    fencing.lease_published(bus, "young", lease_s=60)
    record(bus, "old")
    expire_lease(bus, "old")
    assert fencing.lapsed(bus, now=time.time()) == ["old"]
    assert lapse(bus, "young").outcome is LapseOutcome.ALIVE  # renewed meanwhile: not decided


def test_a_lapsed_request_without_tokens_is_published_again(bus: TokenBus) -> None:
    begun_run(bus, "r")
    expire_lease(bus)
    decided = lapse(bus)
    assert (decided.outcome, decided.attempt, decided.tenant_id) == (LapseOutcome.REPUBLISH, 2, "t")
    state = bus.get_record("r")
    assert state["attempt"] == "2" and state["owner"] == "" and state["status"] == "queued"
    assert time.time() + 9 < (lease_of(bus) or 0) <= time.time() + 10  # the next attempt's lease
    assert lapse(bus).outcome is LapseOutcome.ALIVE  # decided once


def test_a_message_that_never_began_is_published_again_whatever_its_runs(bus: TokenBus) -> None:
    record(bus)
    expire_lease(bus)
    assert lapse(bus, max_runs=1).outcome is LapseOutcome.REPUBLISH  # no run died: not counted


def test_a_lapsed_request_after_its_first_token_fails_worker_lost(bus: TokenBus) -> None:
    producer = begun_run(bus, "r")
    producer.publish_token(0, "partial")
    expire_lease(bus)
    decided = lapse(bus)
    assert decided.outcome is LapseOutcome.LOST and decided.attempt == 1
    last = bus.read_all("r")[-1]
    assert (last.type, last.attempt, last.data["code"]) == ("error", 1, "worker_lost")
    assert bus.get_record("r")["status"] == "failed" and lease_of(bus) is None
    with pytest.raises(Fenced):
        producer.publish_token(1, "too late")


def test_a_request_whose_runs_keep_dying_fails_worker_lost(bus: TokenBus) -> None:
    begun_run(bus, "r")
    expire_lease(bus)
    assert lapse(bus, max_runs=2).outcome is LapseOutcome.REPUBLISH
    assert fencing.begin(bus, Run.new("r", 2), lease_s=30, executed_by="b").outcome is BeginOutcome.RUN
    expire_lease(bus)
    assert lapse(bus, max_runs=2).outcome is LapseOutcome.LOST


def test_a_lapsed_request_past_its_deadline_fails_worker_timeout(bus: TokenBus) -> None:
    record(bus, deadline_at=time.time() - 1, dedup_key="k")
    expire_lease(bus)
    decided = lapse(bus)
    assert (decided.outcome, decided.dedup_key) == (LapseOutcome.TIMEOUT, "k")
    assert bus.read_all("r")[-1].data["code"] == "worker_timeout"


def test_a_finished_requests_lease_is_only_cleared(bus: TokenBus) -> None:
    record(bus)
    bus.set_record("r", status="completed")
    expire_lease(bus)
    assert lapse(bus).outcome is LapseOutcome.GONE and lease_of(bus) is None and bus.read_all("r") == []


def test_fail_answers_an_unanswered_request_once(bus: TokenBus) -> None:
    record(bus, dedup_key="k")
    fencing.lease_published(bus, "r", lease_s=60)
    assert fencing.fail(bus, "r", RequestCancelled("revoked")) == ("t", "k")
    assert fencing.fail(bus, "r", RequestCancelled("again")) is None
    assert [e.data["message"] for e in bus.read_all("r")] == ["revoked"] and lease_of(bus) is None


# --- readers: by attempt and sequence ------------------------------------------------------


def event(kind: str, attempt: int, seq: int | None = None) -> BusEvent:
    return BusEvent(id="0-0", type=kind, attempt=attempt, data={} if seq is None else {"seq": seq})


def test_readers_drop_older_attempts_and_repeated_tokens() -> None:
    passed = AttemptFilter()
    events = [event("token", 1, 0), event("token", 1, 0), event("token", 2, 0), event("token", 1, 1), event("token", 2, 1), event("done", 1), event("done", 2)]
    assert [(e.attempt, e.type, e.data.get("seq")) for e in events if passed.accepts(e)] == [
        (1, "token", 0),
        (2, "token", 0),
        (2, "token", 1),
        (2, "done", None),
    ]


def test_a_reader_skips_a_stale_attempts_events(bus: TokenBus) -> None:
    producer = begun_run(bus, "r", attempt=2)
    producer.publish_token(0, "fresh")
    bus.append("r", "token", {"seq": 1, "text": "stale"}, attempt=1)  # as a run without fencing would
    producer.finish("done", {}, status=RequestStatus.COMPLETED)

    async def read() -> list[tuple[str, int]]:
        return [(e.type, e.attempt) async for e in read_events(bus, "r", timeout_s=2)]

    assert async_to_sync(read)() == [("token", 2), ("done", 2)]


@given(st.lists(st.tuples(st.integers(1, 3), st.sampled_from(["token", "token", "token", "done"]), st.integers(0, 5)), max_size=40))
def test_whatever_reaches_a_reader_it_passes_one_attempt_at_a_time_in_order(raw: list[tuple[int, str, int]]) -> None:
    """For any events a stream could hold (duplicates, late attempts, out-of-order
    sequence numbers), what a reader passes never goes back to an older attempt, and
    within an attempt its tokens' sequence numbers only rise."""
    passed = AttemptFilter()
    out = [e for e in (event(kind, attempt, seq if kind == "token" else None) for attempt, kind, seq in raw) if passed.accepts(e)]
    attempts = [e.attempt for e in out]
    assert attempts == sorted(attempts)
    for attempt in set(attempts):
        seqs = [e.data["seq"] for e in out if e.attempt == attempt and e.type == "token"]
        assert seqs == sorted(set(seqs))
