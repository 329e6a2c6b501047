"""Every process follows the active config version: the gateway, each Celery worker
process and the scheduler.

At start a process imports the ``PIPELINE_CONFIG`` file if it changed
(``versions.import_file``), then runs the active version. A thread of its own then
``LISTEN``s on Postgres for activations and applies each live one at once; it also
checks every ``PIPELINE_CONFIG_CHECK_S`` without a signal, so a process that missed
one (its connection was down) catches up. A version activated "at restart" is taken
up only when a process starts.

The scheduler also watches the file (``watchfiles``) and imports it when it is saved.

While Postgres cannot be reached at start, the process runs the file as it reads it
and follows the versions once Postgres is back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg
import structlog
from django.conf import settings
from django.db import DatabaseError, close_old_connections, connections

from orchestrator_site.errors import ConfigInvalid
from pipeline import metrics
from pipeline.config.loading import check_text, config_version, load_config, set_config
from pipeline.config.schema import PipelineSettings
from pipeline.config.versions import CHANNEL, current_scope, import_file, settings_of, version_active
from pipeline.models import ConfigApplies, PipelineConfigVersion

log = structlog.get_logger("pipeline.config")
RETRY_S = 1.0  # between attempts to reach Postgres again

_follower: ConfigFollower | None = None
_process = ""


def following() -> bool:
    return _follower is not None


def config_start(process: str, *, follow: bool = True) -> None:
    """At a process's start: import the file if it changed, run the active version, and
    (``follow``) start following activations. Idempotent per process."""
    global _process
    if not settings.PIPELINE_CONFIG_FOLLOW:
        return
    _process = process
    try:
        import_file(settings.PIPELINE_CONFIG_PATH)
        active = version_active()
        if active is not None:
            _apply(settings_of(active), active.id)
        else:
            _apply(load_config(settings.PIPELINE_CONFIG_PATH), 0)
    except DatabaseError as exc:
        log.warning("config_store_unavailable", process=process, outcome="degraded", error_type=type(exc).__name__)
        _apply(load_config(settings.PIPELINE_CONFIG_PATH), 0)
    finally:
        close_old_connections()
    if follow:
        start_following()


def start_following() -> None:
    """The follower thread of this process (a prefork child starts its own)."""
    global _follower
    if not settings.PIPELINE_CONFIG_FOLLOW:
        return
    if _follower is None or not _follower.is_alive():
        _follower = ConfigFollower(scope=current_scope(), check_s=settings.PIPELINE_CONFIG_CHECK_S)
        _follower.start()


def stop_following() -> None:
    global _follower
    if _follower is not None:
        _follower.stop()
        _follower = None


def _apply(config: PipelineSettings, version: int) -> None:
    set_config(config, version=version)
    metrics.CONFIG_VERSION.labels(process=_process or "process").set(version)
    log.info("config_applied", version=version, process=_process, pipeline=config.pipeline.name)


def connection_params() -> dict[str, Any]:
    """What Django connects to the database with (its ``OPTIONS`` included: sslmode and
    the rest), for a connection of the follower's own."""
    return dict(connections["default"].get_connection_params())


class ConfigFollower(threading.Thread):
    """LISTEN for activations on a connection of its own (a pooled Django connection
    cannot hold a LISTEN), and check the active version on each signal and on a timer."""

    WAKE_S = 0.5  # how soon a stopped follower notices, at most

    def __init__(self, *, scope: str, check_s: float, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(name="config-follower", daemon=True)
        self.scope, self.check_s, self.params = scope, check_s, params
        self._stopped = threading.Event()
        self._announced_restart = 0

    def stop(self, *, wait_s: float = 2.0) -> None:
        self._stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(wait_s)

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._follow()
            except psycopg.Error as exc:
                log.warning("config_follow_interrupted", outcome="retry", error_type=type(exc).__name__)
                self._stopped.wait(RETRY_S)

    def _follow(self) -> None:
        with psycopg.connect(**{**(self.params or connection_params()), "autocommit": True}) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self.catch_up(conn)  # what changed while this connection was not listening
            next_check = time.monotonic() + self.check_s
            while not self._stopped.is_set():
                wait_s = min(self.WAKE_S, max(0.0, next_check - time.monotonic()))
                signalled = any(True for _ in conn.notifies(timeout=wait_s, stop_after=1))
                if signalled or time.monotonic() >= next_check:
                    self.catch_up(conn)
                    next_check = time.monotonic() + self.check_s

    def catch_up(self, conn: psycopg.Connection) -> None:
        """Apply the active version if it is not the one this process runs and may apply live."""
        table = PipelineConfigVersion._meta.db_table
        row = conn.execute(f"SELECT id, text, applies FROM {table} WHERE scope = %s AND is_active", [self.scope]).fetchone()
        if row is None or row[0] == config_version():
            return
        version, text, applies = int(row[0]), str(row[1]), str(row[2])
        if applies == ConfigApplies.AT_RESTART:
            if self._announced_restart != version:
                self._announced_restart = version
                log.warning("config_waits_for_restart", version=version, running=config_version(), process=_process, outcome="kept")
            return
        checked = check_text(text)
        if checked.settings is None:  # stored as valid, so only a newer schema can refuse it
            log.error("config_rejected", version=version, problems=[p.to_dict() for p in checked.problems], outcome="kept")
            return
        _apply(checked.settings, version)


class FileWatcher(threading.Thread):
    """Import the config file whenever it is saved (the scheduler runs one)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(name="config-file-watcher", daemon=True)
        self.path = Path(path).resolve()
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        import watchfiles

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Editors save by replacing the file: the directory is watched, the file picked out.
        for changes in watchfiles.watch(self.path.parent, debounce=100, step=20, stop_event=self._stop_event, rust_timeout=1000, yield_on_timeout=False):
            if any(Path(changed).resolve() == self.path for _, changed in changes):
                self.import_now()

    def import_now(self) -> None:
        try:
            import_file(self.path)
        except (ConfigInvalid, DatabaseError) as exc:
            log.error(  # noqa: TRY400  (the error says it all; a traceback would not help an operator)
                "config_file_import_failed", file=str(self.path), outcome="kept", error_type=type(exc).__name__, error=str(exc)
            )
        finally:
            close_old_connections()
