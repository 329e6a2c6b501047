"""django-prometheus's metric names, recorded by the platform's own middleware and
database backend: HTTP responses by status, view and method with a latency histogram
by view; statements, their duration and errors, and connections, against the real
Postgres (pooled, as the gateway runs it, too)."""

from __future__ import annotations

import asyncio

import pytest
from django.db import DatabaseError, connection, connections
from django.test import AsyncClient, Client
from prometheus_client import REGISTRY

from orchestrator_site.db.postgresql.base import DatabaseWrapper
from tests.conftest import TenantFixture

NOT_FOUND = "pipeline.api.errors.not_found_view"  # a view without a URL name: its dotted path


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def responses(status: str, view: str, method: str = "GET") -> float:
    return sample("django_http_responses_total_by_status_view_method_total", status=status, view=view, method=method)


def latencies(view: str, method: str = "GET") -> float:
    return sample("django_http_requests_latency_seconds_by_view_method_count", view=view, method=method)


def test_a_response_is_counted_by_status_view_and_method_and_timed() -> None:
    before = (responses("404", NOT_FOUND), latencies(NOT_FOUND), sample("django_http_requests_total_by_method_total", method="GET"))
    assert Client().get("/v1/nope").status_code == 404
    after = (responses("404", NOT_FOUND), latencies(NOT_FOUND), sample("django_http_requests_total_by_method_total", method="GET"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]


@pytest.mark.django_db
def test_the_views_are_named_and_each_status_apart(owner: TenantFixture) -> None:
    before_ok, before_denied = responses("200", "openai-models"), responses("401", "openai-models")
    assert owner.client.get("/v1/models").status_code == 200
    assert Client().get("/v1/models", HTTP_AUTHORIZATION="Bearer po_00000000_wrong").status_code == 401
    assert (responses("200", "openai-models") - before_ok, responses("401", "openai-models") - before_denied) == (1, 1)


def test_the_async_path_records_too_and_an_invalid_method_is_one_label() -> None:
    before = responses("404", NOT_FOUND, "<invalid method>")
    response = asyncio.run(AsyncClient().generic("BREW", "/v1/nope"))
    assert response.status_code == 404
    assert responses("404", NOT_FOUND, "<invalid method>") - before == 1


@pytest.mark.django_db
def test_statements_their_time_and_their_errors_are_counted() -> None:
    labels = {"alias": "default", "vendor": "postgresql"}
    before = (sample("django_db_execute_total", **labels), sample("django_db_query_duration_seconds_count", **labels))
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.executemany("SELECT %s", [(1,), (2,), (3,)])
    after = (sample("django_db_execute_total", **labels), sample("django_db_query_duration_seconds_count", **labels))
    assert (after[0] - before[0], after[1] - before[1]) == (4, 2)
    many = sample("django_db_execute_many_total", **labels)
    errors = sample("django_db_errors_total", **labels, type="DataError")
    with pytest.raises(DatabaseError), connection.cursor() as cursor:
        cursor.execute("SELECT 1 / 0")
    assert sample("django_db_errors_total", **labels, type="DataError") - errors == 1
    assert many >= 3


@pytest.mark.django_db
def test_a_pooled_connection_is_counted_once_however_often_it_is_taken() -> None:
    settings = {**connections["default"].settings_dict}
    settings["OPTIONS"] = {**settings.get("OPTIONS", {}), "pool": {"min_size": 1, "max_size": 1, "timeout": 5}}
    pooled = DatabaseWrapper(settings, alias="pooled")
    labels = {"alias": "pooled", "vendor": "postgresql"}
    connections.settings["pooled"] = settings  # django.contrib.postgres looks a new connection up by its alias
    connections["pooled"] = pooled
    try:
        taken, executed = [], []
        for _ in range(3):
            pooled.connect()
            taken.append(pooled.connection)
            with pooled.cursor() as cursor:
                cursor.execute("SELECT 1")
            executed.append(sample("django_db_execute_total", **labels))
            pooled.close()  # back to the pool
        assert taken[0] is taken[1] is taken[2]  # one physical connection, taken three times
        assert sample("django_db_new_connections_total", **labels) == 1
        # Each statement counted once on every checkout: no wrapper nested per checkout
        # (the first checkout also ran django.contrib.postgres's type lookups).
        assert (executed[1] - executed[0], executed[2] - executed[1]) == (1, 1)
    finally:
        pooled.close_pool()
        del connections["pooled"]
        del connections.settings["pooled"]


@pytest.mark.django_db
def test_a_connection_that_fails_is_counted() -> None:
    settings = {**connections["default"].settings_dict, "PORT": "1", "OPTIONS": {"connect_timeout": 2}}
    broken = DatabaseWrapper(settings, alias="unreachable")
    with pytest.raises(DatabaseError):
        broken.ensure_connection()
    assert sample("django_db_new_connection_errors_total", alias="unreachable", vendor="postgresql") == 1
