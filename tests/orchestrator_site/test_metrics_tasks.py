"""``orchestrator_gateway_asyncio_tasks``: the gateway's /metrics counts the asyncio
tasks of the event loop it runs on (the leak watch of the streaming tests), and
only a gateway scrape carries it (a worker's exposition has no event loop)."""

from __future__ import annotations

import asyncio
import re

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient

from orchestrator_site import metrics as exposition
from orchestrator_site.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

GAUGE = re.compile(r"^orchestrator_gateway_asyncio_tasks (\S+)$", re.MULTILINE)


def tasks_in(text: str) -> int:
    match = GAUGE.search(text)
    assert match, "no orchestrator_gateway_asyncio_tasks in the exposition"
    return int(float(match.group(1)))


async def scrape_with(extra_tasks: int) -> int:
    """A scrape on this loop while ``extra_tasks`` tasks sleep on it."""
    stop = asyncio.Event()
    sleepers = [asyncio.ensure_future(stop.wait()) for _ in range(extra_tasks)]
    await asyncio.sleep(0)
    try:
        resp = await AsyncClient().get("/metrics")
        assert resp.status_code == 200
        return tasks_in(resp.content.decode())
    finally:
        stop.set()
        await asyncio.gather(*sleepers)


def test_the_gauge_counts_the_tasks_of_the_gateways_loop() -> None:
    async def both() -> tuple[int, int]:
        return await scrape_with(0), await scrape_with(25)

    quiet, busy = async_to_sync(both)()
    assert quiet >= 1 and busy - quiet == 25


def test_the_gauge_is_served_over_asgi_as_the_gateway_serves_it() -> None:
    from channels.testing import HttpCommunicator

    async def scenario() -> tuple[int, str]:
        communicator = HttpCommunicator(application, "GET", "/metrics", headers=[(b"host", b"127.0.0.1")])
        response = await communicator.get_response(timeout=20)
        return response["status"], response["body"].decode()

    status, body = async_to_sync(scenario)()
    assert status == 200 and tasks_in(body) >= 1


def test_a_worker_exposition_has_no_gateway_task_count() -> None:
    from prometheus_client import generate_latest

    text = generate_latest(exposition.exposition_registry()).decode()
    assert GAUGE.search(text) is None


def test_the_collector_reports_what_it_was_given() -> None:
    (family,) = list(exposition.GatewayTasks(7).collect())
    assert family.name == "orchestrator_gateway_asyncio_tasks" and family.samples[0].value == 7


def test_other_methods_than_get_are_refused() -> None:
    async def post() -> int:
        return (await AsyncClient().post("/metrics")).status_code

    assert async_to_sync(post)() == 405
