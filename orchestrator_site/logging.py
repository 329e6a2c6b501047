"""structlog set-up: JSON lines in production, readable lines in development.

Standard-library loggers (Django, Celery, httpx) go through the same renderer,
so every line a process writes has one format.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

from orchestrator_site.telemetry import add_trace_context

# Fields that carry what users wrote, what models answered, or credentials.
SENSITIVE_FIELDS = frozenset({"prompt", "text", "content", "messages", "response", "completion", "authorization", "api_key", "password", "secret"})
# Credentials that can hide inside any string: our keys, provider keys, bearer headers.
SECRET_PATTERN = re.compile(
    r"\bpo_[0-9a-f]{8}_[A-Za-z0-9_-]{8,}|\b(?:sk|pk|rk)[-_][A-Za-z0-9_-]{16,}|\bBearer\s+[A-Za-z0-9._~+/=-]{8,}|\bAKIA[0-9A-Z]{16}\b",
)
REDACTED = "[REDACTED]"


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return SECRET_PATTERN.sub(REDACTED, value)
    if isinstance(value, Mapping):
        return {k: REDACTED if str(k).lower() in SENSITIVE_FIELDS else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def redact(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Prompts, replies and credentials never reach a log line, whoever logs them."""
    for key in list(event):
        if key.lower() in SENSITIVE_FIELDS:
            event[key] = REDACTED
        else:
            event[key] = _scrub(event[key])
    return event


def configure_logging(*, level: str, fmt: str) -> None:
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_context,
    ]
    # Last before rendering, after exc_info is formatted: tracebacks are scrubbed too.
    tail: list[structlog.types.Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.format_exc_info, redact]
    renderer: structlog.types.Processor = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: tests (and a log-level change at run time) reconfigure processors,
        # which cached loggers would never see.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[*tail, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Python warnings (Celery's, Django's) become log lines in the same format.
    logging.captureWarnings(True)
    # httpx logs every request at INFO with the full URL; keep it for debugging only.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


# Loggers whose level the pipeline config set, so that a config without them puts
# them back (NOTSET: their parent's level again).
_configured: set[str] = set()
_configured_lock = threading.Lock()


def set_levels(*, root: str, loggers: Mapping[str, str]) -> None:
    """The root logger's level and single loggers' levels, as a config gives them;
    applied at once in this process (a reloaded config changes them live)."""
    with _configured_lock:
        logging.getLogger().setLevel(root.upper())
        for name in _configured - set(loggers):
            logging.getLogger(name).setLevel(logging.NOTSET)
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level.upper())
        _configured.clear()
        _configured.update(loggers)
