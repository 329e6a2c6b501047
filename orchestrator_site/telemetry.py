"""OpenTelemetry tracing: one trace per request, from the gateway through Celery
to the five ``pipeline.<stage>`` spans and the worker's HTTP call.

Configured by the standard OTel environment: tracing is on when an OTLP
endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and ``OTEL_SDK_DISABLED`` is not true.
The exporter reads the rest (headers, timeout, compression, ``OTEL_BSP_*``).

Off, nothing is installed: no SDK, no instrumentation patching Django, Celery,
httpx or Redis, and ``span()`` is a ``nullcontext`` — the cost of tracing off
is one attribute check per stage. The workers' streamed provider calls (aiohttp)
are traced here, by ``http_client_span``: no instrumentation of aiohttp matches
the OpenTelemetry release the others are pinned to.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any
from urllib.parse import urlsplit

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
AttributeValue = str | bool | int | float


class _State:
    enabled = False
    tracer: Any = None
    trace: Any = None  # the opentelemetry.trace module, once tracing is on
    inject: Any = None  # opentelemetry.propagate.inject


_state = _State()
_OFF = contextlib.nullcontext()  # stateless, so one instance serves every span of every thread
_lock = threading.Lock()


def tracing_requested(environ: Mapping[str, str] = os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def service_name(argv: list[str] | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """``OTEL_SERVICE_NAME``, or the role of this process: gateway, worker, beat, manage."""
    if environ.get("OTEL_SERVICE_NAME"):
        return environ["OTEL_SERVICE_NAME"]
    args = argv if argv is not None else sys.argv
    joined = " ".join(args)
    if "celery" in joined:
        for role in ("worker", "beat", "flower"):
            if role in args:
                return f"orchestrator-{role}"
        return "orchestrator-celery"
    if "daphne" in joined or "uvicorn" in joined:
        return "orchestrator-gateway"
    return "orchestrator-manage"


def configure_tracing() -> bool:
    """Install the SDK and the instrumentations once per process, if requested.
    Returns whether tracing is on. Must run before Django builds its middleware
    (it does: ``OrchestratorSiteConfig.ready``)."""
    with _lock:
        if _state.enabled or not tracing_requested():
            return _state.enabled
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.instrumentation.django import DjangoInstrumentor
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
        from opentelemetry.instrumentation.redis import RedisInstrumentor
        from opentelemetry.propagate import inject
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": service_name()}))
        # Batched and exported from a background thread: a slow collector never delays a request.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        DjangoInstrumentor().instrument()
        CeleryInstrumentor().instrument()
        HTTPXClientInstrumentor().instrument()
        RedisInstrumentor().instrument()
        _state.tracer = trace.get_tracer("pipeline")
        _state.trace = trace
        _state.inject = inject
        _state.enabled = True
        return True


def enabled() -> bool:
    return _state.enabled


def span(name: str, attributes: Mapping[str, AttributeValue]) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current one, or nothing when tracing is off."""
    if not _state.enabled:
        return _OFF
    return _state.tracer.start_as_current_span(name, attributes=attributes)


def http_client_span(method: str, url: str, headers: MutableMapping[str, str]) -> contextlib.AbstractContextManager[Any]:
    """A CLIENT span around an outgoing HTTP call, with its trace context written into
    ``headers`` (W3C ``traceparent``) for the server; nothing when tracing is off.
    Attributes as OpenTelemetry's HTTP client conventions name them."""
    if not _state.enabled:
        return _OFF
    return _client_span(method, url, headers)


@contextlib.contextmanager
def _client_span(method: str, url: str, headers: MutableMapping[str, str]) -> Iterator[Any]:
    parts = urlsplit(url)
    attributes: dict[str, AttributeValue] = {"http.request.method": method, "url.full": url, "server.address": parts.hostname or ""}
    if parts.port is not None:
        attributes["server.port"] = parts.port
    with _state.tracer.start_as_current_span(method, kind=_state.trace.SpanKind.CLIENT, attributes=attributes) as current:
        _state.inject(headers)
        yield current


def http_status(span: Any, status: int) -> None:
    """A traced call's response status (an error from 400 on, as the conventions say)."""
    if span is None:
        return
    span.set_attribute("http.response.status_code", status)
    if status >= 400:
        span.set_status(_state.trace.Status(_state.trace.StatusCode.ERROR))


def annotate(**attributes: AttributeValue | None) -> None:
    """Set attributes on the current span (the request's server or task span)."""
    if not _state.enabled:
        return
    current = _state.trace.get_current_span()
    for key, value in attributes.items():
        if value is not None:
            current.set_attribute(key, value)


def add_trace_context(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the current trace and span ids on every log line, so a
    log line leads to its trace in Jaeger."""
    if _state.enabled:
        context = _state.trace.get_current_span().get_span_context()
        if context.is_valid:
            event.setdefault("trace_id", f"{context.trace_id:032x}")
            event.setdefault("span_id", f"{context.span_id:016x}")
    return event
