"""What the HTTP metrics cost a request, side by side: Django's ASGI handler, in one
process, serving ``GET /v1/nope`` (the 404 view: no database, no Redis) with (a) no metrics middleware,
(b) django-prometheus's
``PrometheusBeforeMiddleware`` / ``PrometheusAfterMiddleware``, (c) this platform's
``http_metrics`` (the same metric names). Rounds interleave the three, so the
machine's noise falls on each alike. Prints a markdown table of the time per request
(P50, P99) and each setup's cost over (a).

    .venv/bin/python scripts/bench_http_metrics.py [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_site.settings")

import django

django.setup()
logging.disable(logging.CRITICAL)  # the access and 404 lines would cost more than what is measured

from django.conf import settings  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.test import override_settings  # noqa: E402

OURS = "orchestrator_site.middleware.http_metrics"
BASE = [m for m in settings.MIDDLEWARE if m != OURS]
SETUPS = {
    "none": BASE,
    "django-prometheus": ["django_prometheus.middleware.PrometheusBeforeMiddleware", *BASE, "django_prometheus.middleware.PrometheusAfterMiddleware"],
    "http_metrics (ours)": [OURS, *BASE],
}


def handler(middleware: list[str]) -> ASGIHandler:
    with override_settings(MIDDLEWARE=middleware):
        return ASGIHandler()  # the chain is built now, from the setting


async def one(app: ASGIHandler) -> float:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "path": "/v1/nope",
        "raw_path": b"/v1/nope",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "scheme": "http",
    }
    sent: list[dict[str, Any]] = []
    given: list[bool] = []

    async def receive() -> dict[str, Any]:
        if given:
            await asyncio.get_running_loop().create_future()  # the client stays: Django stops listening when it has answered
        given.append(True)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(dict(message))

    started = time.perf_counter()
    await app(scope, receive, send)
    elapsed = time.perf_counter() - started
    if sent[0]["status"] != 404:
        raise SystemExit(f"GET /v1/nope answered {sent[0]['status']}")
    return elapsed


async def run(requests: int) -> dict[str, list[float]]:
    apps = {name: handler(middleware) for name, middleware in SETUPS.items()}
    times: dict[str, list[float]] = {name: [] for name in apps}
    for _ in range(50):  # warm up each
        for app in apps.values():
            await one(app)
    for _ in range(requests):
        for name, app in apps.items():
            times[name].append(await one(app))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    times = asyncio.run(run(args.requests))
    base = statistics.median(times["none"])
    sys.stdout.write("| middleware | P50 µs | P99 µs | cost over none, P50 µs |\n| --- | --- | --- | --- |\n")
    for name, samples in times.items():
        ordered = sorted(samples)
        p50, p99 = statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]
        sys.stdout.write(f"| {name} | {p50 * 1e6:.0f} | {p99 * 1e6:.0f} | {(p50 - base) * 1e6:+.0f} |\n")


if __name__ == "__main__":
    main()
