"""A tenant known to have no documents is not searched, and a document added is never
missed (``pipeline.presence``, ``services.ReadAhead``): against the real Redis and
Postgres, through ``realtime_execute`` as a worker runs it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import transaction
from structlog.testing import capture_logs

from pipeline import engine, presence, selectors, services
from pipeline.config import PipelineSettings
from pipeline.resilience.breaker import BreakerPolicy, CircuitBreaker
from pipeline.stages.rag import search_args
from pipeline.tokenbus import TokenBus, get_bus
from pipeline.types import PromptRequest
from tests.conftest import TenantFixture, free_port, scratch_bus


@pytest.fixture
def known(monkeypatch: pytest.MonkeyPatch) -> presence.EmptyTenants:
    """This process's knowledge, fresh for the test."""
    fresh = presence.EmptyTenants()
    monkeypatch.setattr(presence, "empty_tenants", fresh)
    return fresh


@pytest.fixture
def bus() -> Iterator[TokenBus]:
    with scratch_bus("presence", maxlen=10) as scratch:
        yield scratch


# --- the generation ---------------------------------------------------------------


def test_a_generation_is_created_at_random_then_changed_by_one(bus: TokenBus) -> None:
    key = presence.generation_key(bus, "t1")
    presence.documents_changed("t1", bus=bus)
    first = int(bus.client.get(key))
    presence.documents_changed("t1", bus=bus)
    assert int(bus.client.get(key)) == first + 1
    bus.client.delete(key)  # Redis flushed: created again, not at a value it had
    presence.documents_changed("t1", bus=bus)
    assert int(bus.client.get(key)) not in (first, first + 1)
    assert bus.client.get(presence.generation_key(bus, "t2")) is None  # per tenant


def test_a_generation_that_cannot_be_changed_is_logged_not_raised() -> None:
    dead = TokenBus(url=f"redis://127.0.0.1:{free_port()}/0", prefix="gone", maxlen=10, ttl_s=10, socket_timeout_s=0.5)
    with capture_logs() as logs:
        presence.documents_changed("t1", bus=dead)
    assert [(e["event"], e["tenant_id"], e["outcome"]) for e in logs] == [("documents_change_unrecorded", "t1", "error")]


@pytest.mark.django_db(transaction=True)
def test_a_document_added_changes_its_tenants_generation_once_committed(owner: TenantFixture) -> None:
    bus, tenant = get_bus(), str(owner.tenant.id)
    key = presence.generation_key(bus, tenant)
    bus.client.delete(key)
    services.document_create(tenant=owner.tenant, title="a", body="b")  # outside a transaction: at once
    first = bus.client.get(key)
    assert first is not None
    with transaction.atomic():
        services.document_create(tenant=owner.tenant, title="c", body="d")
        assert bus.client.get(key) == first  # not before the commit
    assert int(bus.client.get(key)) == int(first) + 1
    doc = selectors.document_list_for_tenant(tenant_id=tenant, limit=1, offset=0)[0]
    doc.title = "renamed"
    doc.save()  # not an addition
    services.document_delete(tenant_id=tenant, document_id=str(doc.id))  # nor is a deletion
    assert int(bus.client.get(key)) == int(first) + 1


def test_a_tasks_start_reads_the_generation_in_its_one_round_trip(bus: TokenBus) -> None:
    from tests.pipeline.test_io_budget import redis_round_trips

    breaker = CircuitBreaker(bus.client, prefix=bus.prefix, worker="w", policy=BreakerPolicy())
    key = presence.generation_key(bus, "t1")
    breaker.begin_and_allow(bus, "r0", executed_by="host:1", generation=(presence.generation_key(bus, "t0"), "1"))  # warm: connection, script
    with redis_round_trips() as trips:
        started = breaker.begin_and_allow(bus, "r1", executed_by="host:1", generation=(key, "77"))
    assert trips[0] == 1 and started is not None and started[2] == "77"  # missing: created with the value given
    assert bus.client.get(key) == "77"
    presence.documents_changed("t1", bus=bus)
    started = breaker.begin_and_allow(bus, "r2", executed_by="host:1", generation=(key, "5"))
    assert started is not None and started[2] == "78"  # present: read, not replaced
    started = breaker.begin_and_allow(bus, "r3", executed_by="host:1")
    assert started is not None and started[2] is None and started[1].allowed  # not asked


# --- what a process knows ------------------------------------------------------------


def test_what_is_known_empty_is_trusted_for_trust_s_and_can_be_forgotten() -> None:
    now = [100.0]
    known = presence.EmptyTenants(trust_s=60, clock=lambda: now[0])
    assert known.empty_at("t") is None and known.latest("t") is None
    known.read("t", "7")
    known.learned("t", "7")
    now[0] += 60
    assert known.empty_at("t") == "7" and known.latest("t") == "7"
    now[0] += 0.001
    assert known.empty_at("t") is None  # no longer trusted: searched again
    known.learned("t", "8")
    known.forget("t")
    assert known.empty_at("t") is None


def test_what_is_known_is_bounded() -> None:
    known = presence.EmptyTenants(size=3)
    for n in range(3):
        known.read(f"t{n}", "1")
        known.learned(f"t{n}", "1")
    known.read("t0", "2")  # a tenant already there: nothing forgotten
    known.learned("t0", "2")
    assert known.latest("t2") == "1" and known.empty_at("t2") == "1"
    known.read("t3", "1")
    known.learned("t3", "1")
    assert known.latest("t0") is None and known.empty_at("t0") is None  # full: forgotten, costing a search each
    assert known.latest("t3") == "1" and known.empty_at("t3") == "1"


# --- through a real-time task ----------------------------------------------------------


def request_for(owner: TenantFixture, prompt: str, **data: Any) -> PromptRequest:
    return services.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": prompt, **data}, config=PipelineSettings())


@dataclasses.dataclass
class Watch:
    """Which searches a task sent, and which documents its assemble stage got."""

    searches: list[str] = dataclasses.field(default_factory=list)
    documents: list[list[str]] = dataclasses.field(default_factory=list)

    def run(self, owner: TenantFixture, prompt: str = "kettle", **data: Any) -> None:
        request = request_for(owner, prompt, **data)
        services.realtime_execute(request.to_dict())
        assert get_bus().read_all(request.request_id)[-1].type == "done"


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> Watch:
    seen = Watch()
    real_ahead, real_search, real_assemble = selectors.document_search_ahead, selectors.document_search, engine.assemble

    def ahead(**args: Any) -> selectors.SearchAhead:
        seen.searches.append("ahead, asking presence" if args["presence"] else "ahead")
        return real_ahead(**args)

    def search(**args: Any) -> Any:
        seen.searches.append("in the stage")
        return real_search(**args)

    def assemble(ctx: Any, **kwargs: Any) -> Any:
        seen.documents.append([d.title for d in ctx.documents])
        return real_assemble(ctx, **kwargs)

    monkeypatch.setattr(selectors, "document_search_ahead", ahead)
    monkeypatch.setattr(selectors, "document_search", search)
    monkeypatch.setattr(engine, "assemble", assemble)
    return seen


@pytest.mark.django_db(transaction=True)
def test_a_tenant_seen_without_documents_is_not_searched_until_one_is_added(owner: TenantFixture, known: presence.EmptyTenants, watch: Watch) -> None:
    tenant = str(owner.tenant.id)
    watch.run(owner)  # no generation read yet in this process: a plain search
    watch.run(owner)  # one was: the search asks whether the tenant has any document
    assert watch.searches == ["ahead", "ahead, asking presence"] and known.empty_at(tenant) is not None
    watch.searches.clear()
    for _ in range(3):
        watch.run(owner)
    assert watch.searches == [] and watch.documents[-3:] == [[], [], []]  # not searched, and nothing missed
    services.document_create(tenant=owner.tenant, title="Kettles", body="a kettle boils water")
    watch.run(owner)
    assert watch.searches == ["in the stage"] and watch.documents[-1] == ["Kettles"]  # the next task finds it
    assert known.empty_at(tenant) is None
    watch.run(owner)
    assert watch.searches == ["in the stage", "ahead, asking presence"] and known.empty_at(tenant) is None  # it has one now


@pytest.mark.django_db(transaction=True)
def test_another_processs_document_is_found_by_this_one(owner: TenantFixture, known: presence.EmptyTenants, watch: Watch) -> None:
    """The generation lives in Redis: a document added through another gateway or the
    admin (here: the change alone, as another process would make it) voids what this
    worker process knew."""
    watch.run(owner)
    watch.run(owner)
    assert known.empty_at(str(owner.tenant.id)) is not None
    presence.documents_changed(str(owner.tenant.id))
    watch.searches.clear()
    watch.run(owner)
    assert watch.searches == ["in the stage"]


@pytest.mark.django_db(transaction=True)
def test_a_tenant_with_documents_is_always_searched(owner: TenantFixture, known: presence.EmptyTenants, watch: Watch) -> None:
    services.document_create(tenant=owner.tenant, title="Kettles", body="a kettle boils water")
    for _ in range(3):
        watch.run(owner, "the weather")  # nothing found, but the tenant has a document
    assert watch.searches == ["ahead", "ahead, asking presence", "ahead, asking presence"]
    assert known.empty_at(str(owner.tenant.id)) is None


@pytest.mark.django_db(transaction=True)
def test_a_skipped_search_still_reads_the_sessions_turns_beside_the_start(
    owner: TenantFixture, known: presence.EmptyTenants, watch: Watch, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch.run(owner, session_id="chat")
    watch.run(owner, session_id="chat")
    assert known.empty_at(str(owner.tenant.id)) is not None
    read: list[bool] = []
    real = selectors.session_history

    def history(**args: Any) -> Any:
        import inspect

        read.append(any(frame.function == "script_beside" for frame in inspect.stack()))
        return real(**args)

    monkeypatch.setattr(selectors, "session_history", history)
    watch.searches.clear()
    watch.run(owner, "and again?", session_id="chat")
    assert watch.searches == [] and read == [True]  # the turns, and only them, beside the start


@pytest.mark.django_db(transaction=True)
def test_what_is_learned_is_the_generation_read_before_the_search(owner: TenantFixture, known: presence.EmptyTenants) -> None:
    """A document committed after the search looked, and before the start's generation
    was read, would be missed if the start's generation were kept: it is the one read
    before the search was sent that is."""
    tenant = str(owner.tenant.id)
    request = request_for(owner, "kettle")
    known.read(tenant, "before")
    ahead = services.ReadAhead(request, PipelineSettings(), known)
    ahead.run()
    ahead.started("after")
    assert known.empty_at(tenant) == "before" and known.latest(tenant) == "after"
    skipping = services.ReadAhead(request, PipelineSettings(), known)
    skipping.run()
    skipping.started("after")  # not the generation it was seen empty at
    assert known.empty_at(tenant) is None
    assert skipping(**search_args(request, PipelineSettings().rag)).documents == ()  # searched by the stage


@pytest.mark.django_db(transaction=True)
def test_a_start_that_read_no_generation_searches(owner: TenantFixture, known: presence.EmptyTenants) -> None:
    tenant = str(owner.tenant.id)
    known.learned(tenant, "7")
    request = request_for(owner, "kettle")
    ahead = services.ReadAhead(request, PipelineSettings(), known)
    ahead.run()
    ahead.started(None)
    assert known.empty_at(tenant) is None
    (key, first), (_, second) = ahead.generation(get_bus()), ahead.generation(get_bus())
    assert key == presence.generation_key(get_bus(), tenant) and int(first) > 0 and first != second  # a number, fresh each time
