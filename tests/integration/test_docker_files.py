"""docker/compose.yml and docker/Dockerfile checked against the code (no Docker engine here)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import yaml

from pipeline.queues import Queue
from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text())
# The environment is read in settings.py, and by telemetry.py (OTEL_*) and metrics.py.
SETTINGS_SOURCE = "".join((ROOT / "orchestrator_site" / name).read_text() for name in ("settings.py", "telemetry.py", "metrics.py"))


def app_services() -> dict[str, dict]:
    return {name: svc for name, svc in COMPOSE["services"].items() if "build" in svc}


def test_every_process_of_the_platform_is_there() -> None:
    assert set(app_services()) == {"migrate", "gateway", "worker-realtime", "worker-batch", "beat", "flower"}
    assert {"postgres", "redis", "rabbitmq", "nats"} <= set(COMPOSE["services"])


def test_commands_point_at_real_modules_and_queues() -> None:
    for name, svc in app_services().items():
        command = svc["command"]
        if command[0] == "celery":
            assert command[1:3] == ["-A", "orchestrator_site"], name
            importlib.import_module("orchestrator_site.celery")
            if "-Q" in command:
                queues = command[command.index("-Q") + 1].split(",")
                assert set(queues) <= {q.value for q in Queue}, name
        elif command[0] == "uvicorn":
            from orchestrator_site.gateway import gateway_command

            assert command == gateway_command("0.0.0.0", 8000), name  # the same server settings as make run
            module, attr = command[1].split(":")
            assert callable(getattr(importlib.import_module(module), attr))
        else:
            assert command[:2] == ["python", "manage.py"], name
    realtime = app_services()["worker-realtime"]["command"]
    batch = app_services()["worker-batch"]["command"]
    assert realtime[realtime.index("-Q") + 1] == "realtime" and "realtime" not in batch[batch.index("-Q") + 1]


def test_environment_variables_are_ones_the_settings_read() -> None:
    env = {**app_services()["gateway"]["environment"], **app_services()["worker-realtime"]["environment"]}
    for name in env:
        assert re.search(rf'"{name}"', SETTINGS_SOURCE), name
    assert env["ORCHESTRATOR_ENV"] == "production" and env["DJANGO_SECRET_KEY"].startswith("${DJANGO_SECRET_KEY:?")


def test_ports_bind_to_loopback_only() -> None:
    for svc in COMPOSE["services"].values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), port


def test_dockerfile_copies_every_package_and_installs_the_pinned_requirements() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    for package in ("orchestrator_site", "pipeline", "batches", "workers"):
        assert f"COPY {package}/ {package}/" in dockerfile
    assert "pip install --no-cache-dir -r requirements/base.txt" in dockerfile
    assert "USER app" in dockerfile  # not root
    for path in re.findall(r"^COPY (\S+)", dockerfile, re.MULTILINE):
        assert (ROOT / path.rstrip("/")).exists(), path


def test_the_mounted_pipeline_file_exists() -> None:
    volume = app_services()["gateway"]["volumes"][0]
    source = volume.split(":")[0]
    assert (ROOT / "docker" / source).resolve() == (ROOT / "pipeline.example.toml").resolve()
    assert Path(ROOT / "pipeline.example.toml").is_file()
