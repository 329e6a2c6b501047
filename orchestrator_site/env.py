"""The one place that reads the process environment for infrastructure settings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from orchestrator_site.errors import ConfigInvalid

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, *, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigInvalid(f"{name} must be a boolean (1/0, true/false), got {raw!r}", data={"variable": name})


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigInvalid(f"{name} must be an integer, got {raw!r}", data={"variable": name}) from exc


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


@dataclass(frozen=True)
class DatabaseUrl:
    name: str
    user: str
    password: str
    host: str
    port: int


def parse_database_url(url: str) -> DatabaseUrl:
    """Parse ``postgres://user:password@host:port/name`` (``postgresql://`` too)."""
    parts = urlsplit(url)
    if parts.scheme not in {"postgres", "postgresql"}:
        raise ConfigInvalid(
            f"DATABASE_URL must start with postgres:// or postgresql://, got scheme {parts.scheme!r}",
            data={"variable": "DATABASE_URL"},
        )
    name = parts.path.lstrip("/")
    if not name:
        raise ConfigInvalid("DATABASE_URL must name a database", data={"variable": "DATABASE_URL"})
    try:
        port = parts.port or 5432
    except ValueError as exc:
        raise ConfigInvalid("DATABASE_URL has an invalid port", data={"variable": "DATABASE_URL"}) from exc
    return DatabaseUrl(
        name=unquote(name),
        user=unquote(parts.username or "postgres"),
        password=unquote(parts.password or ""),
        host=parts.hostname or "127.0.0.1",
        port=port,
    )
