"""``GET /health``: Postgres, Redis and the broker, each with its status and latency."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET
from kombu import Connection
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.backoff import NoBackoff
from redis.retry import Retry

TIMEOUT_S = 2.0


def check_postgres() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def check_redis() -> None:
    # No retries: a health check reports what it sees (redis-py would retry for ~4 s).
    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S, retry=Retry(NoBackoff(), 0))
    try:
        client.ping()
    finally:
        client.close()


def check_broker() -> None:
    with Connection(settings.CELERY_BROKER_URL, connect_timeout=TIMEOUT_S, transport_options={"socket_timeout": TIMEOUT_S}) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=int(TIMEOUT_S))


# The failures each check can raise; anything else is a bug and is not hidden here.
CHECKS: dict[str, tuple[Callable[[], None], tuple[type[Exception], ...]]] = {
    "postgres": (check_postgres, (DatabaseError,)),
    "redis": (check_redis, (redis.RedisError, OSError)),
    "broker": (check_broker, (KombuOperationalError, OSError)),
}


def run_checks() -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for name, (check, failures) in CHECKS.items():
        started = time.perf_counter()
        try:
            check()
        except failures as exc:
            results[name] = {"status": "down", "error": f"{type(exc).__name__}: {exc}"[:300]}
        else:
            results[name] = {"status": "ok", "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
    return results


@require_GET
def health_view(request: HttpRequest) -> JsonResponse:
    checks = run_checks()
    healthy = all(c["status"] == "ok" for c in checks.values())
    return JsonResponse({"status": "ok" if healthy else "unavailable", "checks": checks}, status=200 if healthy else 503)
