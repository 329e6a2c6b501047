"""Config versions in Postgres: the source every process reads.

A version is a ``pipeline.toml`` text, validated when it is stored. Activating one
makes it the scope's only active version and, in the same transaction, sends a
Postgres ``NOTIFY``: delivered when (and only if) the activation commits, to every
process that follows the scope (``pipeline.config.reload``).

A version whose changes cannot apply to running processes (``breaking_changes``)
is refused for live activation with ``ConfigNeedsRestart``; it may be activated
"at restart", and processes take it up when they start.

The ``PIPELINE_CONFIG`` file is imported as a version when its text differs from
the last one imported from it, at start and when it changes (``import_file``).
An activation made in the admin or the CLI after that import wins until the file
changes again.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import structlog
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from orchestrator_site.errors import ConfigNeedsRestart, NotFound
from pipeline.config.loading import check_text, invalid, read_text
from pipeline.config.problems import Problem
from pipeline.config.schema import PipelineSettings
from pipeline.models import ConfigApplies, ConfigSource, PipelineConfigVersion

log = structlog.get_logger("pipeline.config")
CHANNEL = "orchestrator_config"  # NOTIFY's channel; the payload is "scope:version"
# Who else may be using a worker (batch jobs register theirs: pipeline does not import batches).
_usage: list[Callable[[], set[str]]] = []


def register_worker_usage(source: Callable[[], set[str]]) -> None:
    """``source()`` names the workers something long-running still uses."""
    if source not in _usage:
        _usage.append(source)


def current_scope() -> str:
    return str(settings.PIPELINE_CONFIG_SCOPE)


def digest_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _lock_scope(scope: str) -> None:
    """Serialize every write to a scope's versions (an advisory lock, released at commit)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"pipeline_config:{scope}"])


def version_build(*, text: str, source: ConfigSource, author: str = "", comment: str = "", scope: str | None = None) -> PipelineConfigVersion:
    """An unsaved version of ``text``, its validation recorded in it."""
    checked = check_text(text)
    return PipelineConfigVersion(
        scope=scope or current_scope(),
        text=text,
        digest=digest_of(text),
        source=source,
        author=author[:150],
        comment=comment[:500],
        valid=checked.settings is not None,
        problems=[p.to_dict() for p in checked.problems],
    )


def version_create(*, text: str, source: ConfigSource, author: str = "", comment: str = "", scope: str | None = None) -> PipelineConfigVersion:
    """Store a version. From the admin or the CLI an invalid text is refused
    (``ConfigInvalid``, nothing stored); from the file it is stored as invalid, so the
    rejection is visible in the admin."""
    version = version_build(text=text, source=source, author=author, comment=comment, scope=scope)
    if not version.valid and source != ConfigSource.FILE:
        raise invalid(source.label, tuple(Problem(**p) for p in version.problems))
    version.save()
    return version


def diff_against_active(version: PipelineConfigVersion) -> str:
    """A unified diff from the scope's active version to ``version`` ("" when it is the active one)."""
    active = version_active(scope=version.scope)
    if active is None or active.id == version.id:
        return ""
    lines = difflib.unified_diff(
        active.text.splitlines(keepends=True), version.text.splitlines(keepends=True), f"version {active.id} (active)", f"version {version.id or 'new'}"
    )
    return "".join(lines)


def version_active(*, scope: str | None = None) -> PipelineConfigVersion | None:
    return PipelineConfigVersion.objects.filter(scope=scope or current_scope(), is_active=True).first()


def version_get(*, version_id: int, scope: str | None = None) -> PipelineConfigVersion:
    version = PipelineConfigVersion.objects.filter(scope=scope or current_scope(), id=version_id).first()
    if version is None:
        raise NotFound(f"no config version {version_id}", data={"version": version_id})
    return version


def settings_of(version: PipelineConfigVersion) -> PipelineSettings:
    checked = check_text(version.text)
    if checked.settings is None:
        raise invalid(f"version {version.id}", checked.problems)
    return checked.settings


@functools.lru_cache(maxsize=16)
def _stored(scope: str, version_id: int) -> PipelineSettings | None:
    version = PipelineConfigVersion.objects.filter(scope=scope, id=version_id, valid=True).first()
    return None if version is None else settings_of(version)


def stored_settings(version_id: int) -> PipelineSettings | None:
    """The settings of a stored valid version of this scope (versions never change,
    so they are cached), or None."""
    return _stored(current_scope(), version_id)


def workers_in_use() -> set[str]:
    """Workers that real-time requests in flight or active batch jobs use."""
    from pipeline.resilience import admission
    from pipeline.shared_redis import get_redis, redis_errors
    from pipeline.tokenbus.bus import record_key

    used: set[str] = set()
    for source in _usage:
        used |= source()
    shared = get_redis()  # not the token bus: a command-line process has no pipeline config to size it
    client = shared.client
    with redis_errors("read the requests in flight"):
        for request_id in client.zrange(admission.keys(shared.prefix, "")[0], 0, -1):
            payload = client.hget(record_key(shared, str(request_id)), "payload")
            if payload:
                used.add(str(json.loads(payload).get("worker", "")))
    return used


def breaking_changes(old: PipelineSettings, new: PipelineSettings, *, in_use: set[str]) -> list[str]:
    """Why ``new`` cannot replace ``old`` in running processes, one reason per field."""
    reasons = []
    for name, worker in old.workers.items():
        if name not in in_use:
            continue
        if name not in new.workers:
            reasons.append(f"workers.{name}: removed while requests or batch jobs use it")
        elif new.workers[name].kind != worker.kind:
            reasons.append(f"workers.{name}.kind: {worker.kind} → {new.workers[name].kind} while requests or batch jobs use it")
    for field in type(old.queues).model_fields:
        before, after = getattr(old.queues, field), getattr(new.queues, field)
        if before != after:
            reasons.append(f"queues.{field}: {before} → {after}: read when a process starts (the queue topology and its bounds)")
    return reasons


def version_activate(*, version_id: int, by: str, at_restart: bool = False, scope: str | None = None) -> PipelineConfigVersion:
    """Make a version the active one, and tell every process. ``ConfigNeedsRestart``
    names each change that cannot apply live, unless ``at_restart``."""
    scope = scope or current_scope()
    with transaction.atomic():
        _lock_scope(scope)
        version = version_get(version_id=version_id, scope=scope)
        if not version.valid:
            raise invalid(f"version {version.id}", tuple(Problem(**p) for p in version.problems))
        active = version_active(scope=scope)
        if active is not None and active.id == version.id and not at_restart:
            return version
        if active is not None and not at_restart:
            reasons = breaking_changes(settings_of(active), settings_of(version), in_use=workers_in_use())
            if reasons:
                raise ConfigNeedsRestart(
                    f"version {version.id} cannot apply to running processes: " + "; ".join(reasons) + ". Activate it at restart, then restart every process.",
                    data={"version": version.id, "changes": reasons},
                )
        PipelineConfigVersion.objects.filter(scope=scope, is_active=True).update(is_active=False)
        version.is_active, version.activated_at, version.activated_by = True, timezone.now(), by[:150]
        version.applies = ConfigApplies.AT_RESTART if at_restart else ConfigApplies.LIVE
        version.save(update_fields=["is_active", "activated_at", "activated_by", "applies"])
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, f"{scope}:{version.id}"])
    log.info("config_activated", version=version.id, scope=scope, by=by, applies=version.applies)
    return version


def import_file(path: str | Path, *, scope: str | None = None) -> PipelineConfigVersion | None:
    """Import the file as a new version and activate it, when its text differs from the
    last version imported from it. Returns the version it imported, if any.

    An invalid file is stored (visible in the admin) and not activated; a file whose
    changes need a restart is activated at restart. Concurrent starts import once: the
    scope's lock is held from the comparison to the activation."""
    scope = scope or current_scope()
    file = Path(path)
    if not file.exists():
        return None
    text = read_text(file)
    with transaction.atomic():
        _lock_scope(scope)
        last = PipelineConfigVersion.objects.filter(scope=scope, source=ConfigSource.FILE).order_by("-id").first()
        if last is not None and last.digest == digest_of(text):
            active = version_active(scope=scope)
            if active is not None and active.id != last.id and last.valid:
                log.warning("config_file_not_active", file=str(file), file_version=last.id, active_version=active.id, outcome="kept")
            return None
        version = version_create(text=text, source=ConfigSource.FILE, author="file", comment=str(file), scope=scope)
        if not version.valid:
            log.error("config_file_rejected", file=str(file), version=version.id, problems=version.problems, outcome="rejected")
            return version
        try:
            version_activate(version_id=version.id, by="file", scope=scope)
        except ConfigNeedsRestart as exc:
            log.warning("config_file_needs_restart", file=str(file), version=version.id, changes=exc.data["changes"], outcome="at_restart")
            version_activate(version_id=version.id, by="file", at_restart=True, scope=scope)
    return version


def history(*, scope: str | None = None, limit: int = 20) -> list[PipelineConfigVersion]:
    return list(PipelineConfigVersion.objects.filter(scope=scope or current_scope()).order_by("-id")[:limit])
