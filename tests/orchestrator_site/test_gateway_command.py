"""The gateway's command (``orchestrator_site.gateway``) is the one ``make run`` and
the compose file use, and the HTTP router sends each path to its handler."""

from __future__ import annotations

import re
import shlex

from orchestrator_site.gateway import APPLICATION, gateway_command
from tests.conftest import ROOT


def run_sh_gateway_args() -> list[str]:
    """The arguments ``scripts/run.sh`` gives uvicorn (its line continuations joined)."""
    text = (ROOT / "scripts" / "run.sh").read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.strip().startswith("program gateway ")]
    args = shlex.split(line)[3:]  # program, gateway, "$BIN/uvicorn"
    return ["127.0.0.1" if a == "$GATEWAY_PORT" else a for a in args]


def test_make_run_starts_the_gateway_with_the_same_flags() -> None:
    expected = gateway_command("127.0.0.1", 0)[1:]
    got = run_sh_gateway_args()
    port = got.index("--port")
    assert got[:port] + got[port + 2 :] == expected[:port] + expected[port + 2 :]


def test_the_command_names_the_application_and_keeps_uvicorns_own_logging_quiet() -> None:
    command = gateway_command("0.0.0.0", 8123)
    assert command[:2] == ["uvicorn", APPLICATION]
    flags = {flag: command[command.index(flag) + 1] for flag in ("--host", "--port", "--lifespan", "--log-level", "--ws")}
    assert flags["--host"] == "0.0.0.0" and flags["--port"] == "8123"
    assert flags["--lifespan"] == "off"  # Channels' router has no lifespan app
    assert flags["--log-level"] == "warning" and "--no-access-log" in command  # the gateway writes its own JSON access log
    assert flags["--ws"] == "websockets-sansio"  # the legacy implementation is deprecated (a warning in the logs)


def test_an_executable_can_be_given_as_a_module_run() -> None:
    command = gateway_command("127.0.0.1", 1, executable=("python", "-m", "uvicorn"))
    assert command[:4] == ["python", "-m", "uvicorn", APPLICATION]


def test_the_compose_gateway_listens_where_the_healthcheck_looks() -> None:
    compose = (ROOT / "docker" / "compose.yml").read_text()
    assert re.search(r'"--port", "8000"', compose) and "http://127.0.0.1:8000/health" in compose
