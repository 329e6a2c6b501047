"""How the gateway process is started: uvicorn, on the ASGI application.

uvicorn (with uvloop and httptools) replaced Daphne as the gateway's server: side
by side in one run it streamed 20-30 % more requests per second and halved the
open-loop TTFT overhead at P99 (BENCHMARKS.md). Its own logging is limited to
warnings (the gateway writes its JSON access log itself) and lifespan events are
off (Channels' router has no lifespan app). ``make run``, docker/compose.yml,
the tests and the benchmarks start the gateway with this command.
"""

from __future__ import annotations

APPLICATION = "orchestrator_site.asgi:application"


def gateway_command(host: str, port: int, *, executable: tuple[str, ...] = ("uvicorn",)) -> list[str]:
    return [
        *executable,
        APPLICATION,
        "--host",
        host,
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--ws",
        "websockets-sansio",
        "--lifespan",
        "off",
        "--no-access-log",
        "--log-level",
        "warning",
        "--timeout-graceful-shutdown",
        "5",
    ]
