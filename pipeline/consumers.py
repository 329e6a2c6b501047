"""``/api/v1/stream``: the WebSocket API (docs/streaming.md).

A thin consumer: it authenticates (the ``Authorization`` header, or a first
``auth`` message for browsers, which cannot set headers), validates each
message with the same serializer as ``POST /api/v1/infer``, and forwards the
events of ``pipeline.streaming``. Several prompts run at once on one
connection, each in its own task, told apart by ``request_id``. Nothing a
client sends can crash it: every failure becomes an ``error`` message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import structlog
from asgiref.sync import sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from orchestrator_site.errors import (
    ApiKeyMissing,
    InvalidRequest,
    OrchestratorError,
    Overloaded,
    PromptTooLarge,
)
from pipeline import selectors, streaming
from pipeline.api.inputs import InferInput, validated
from pipeline.auth import TenantPrincipal, api_key_authenticate_cached, request_token
from pipeline.config import get_config
from pipeline.services import gates, routes, start

log = structlog.get_logger("pipeline.consumers")

MAX_MESSAGE_BYTES = 1_048_576
MAX_STREAMS_PER_CONNECTION = 32


class ClientGone(Exception):
    """A send found the WebSocket closed."""


def _authenticate(raw: str) -> TenantPrincipal:
    key = api_key_authenticate_cached(raw)
    return TenantPrincipal(tenant=key.tenant, api_key=key)


MAX_ID_CHARS = 128


def client_id(message: dict[str, Any]) -> str | int | None:
    """The message's ``id``, the client's own name for it (a string or an integer)."""
    value = message.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int) or (isinstance(value, str) and not 0 < len(value) <= MAX_ID_CHARS):
        raise InvalidRequest(f"id must be a string of 1-{MAX_ID_CHARS} characters or an integer", data={"field": "id"})
    return value


def tagged(event: dict[str, Any], message_id: str | int | None) -> dict[str, Any]:
    """``event`` with the client's id of the message it answers, when it gave one."""
    return event if message_id is None else {**event, "id": message_id}


class StreamConsumer(AsyncWebsocketConsumer):
    # A message's type and the method that handles it, once the client is
    # authenticated; the batches app adds its own (orchestrator_site.asgi wires it).
    HANDLERS: dict[str, str] = {"prompt": "on_prompt", "resume": "on_resume"}

    principal: TenantPrincipal | None
    streams: dict[str, asyncio.Task[None]]

    async def connect(self) -> None:
        self.principal = None
        self.streams = {}
        await self.accept()
        headers = dict(self.scope.get("headers") or [])
        header, x_api_key = headers.get(b"authorization", b""), headers.get(b"x-api-key")
        if header or x_api_key:
            try:
                token = request_token(header, x_api_key)
                if token is None:
                    raise ApiKeyMissing()
                self.principal = await sync_to_async(_authenticate)(token)
            except OrchestratorError as exc:
                await self.refuse(exc)
                return
            await self.send_event({"type": "authenticated", "tenant_id": self.principal.tenant_id})

    async def disconnect(self, code: int) -> None:
        # The client left: every stream stops reading and signs out of its token
        # stream before the consumer ends (the last reader out stops the request).
        for task in self.streams.values():
            task.cancel()
        await asyncio.gather(*self.streams.values(), return_exceptions=True)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        # The client's id of the message being handled: echoed in every event about it.
        # Messages are handled one at a time, so one attribute holds it.
        self.message_id: str | int | None = None
        try:
            await self.handle(text_data, bytes_data)
        except OrchestratorError as exc:
            await self.send_event(tagged(streaming.error_event(None, exc), self.message_id))
        except Exception as exc:  # consumer boundary: logged, answered as internal_error, the connection lives on
            log.exception("consumer_crashed", outcome="error", error_type=type(exc).__name__)
            await self.send_event(tagged(streaming.error_event(None, OrchestratorError("internal error")), self.message_id))

    async def handle(self, text_data: str | None, bytes_data: bytes | None) -> None:
        raw = text_data if text_data is not None else (bytes_data or b"").decode("utf-8", errors="replace")
        if len(raw) > MAX_MESSAGE_BYTES:
            raise PromptTooLarge(f"a message may be at most {MAX_MESSAGE_BYTES} bytes")
        try:
            message = json.loads(raw)
        except ValueError as exc:
            raise InvalidRequest("a message must be a JSON object") from exc
        if not isinstance(message, dict):
            raise InvalidRequest("a message must be a JSON object")
        self.message_id = client_id(message)
        kind = message.get("type")
        if kind == "auth":
            await self.on_auth(message)
        elif self.principal is None:
            await self.refuse(ApiKeyMissing("authenticate first: an Authorization header, or an auth message"))
        elif isinstance(kind, str) and kind in self.HANDLERS:
            await getattr(self, self.HANDLERS[kind])(message)
        else:
            raise InvalidRequest(f"type must be one of auth, {', '.join(self.HANDLERS)}", data={"type": kind})

    async def on_auth(self, message: dict[str, Any]) -> None:
        key = message.get("api_key")
        if not isinstance(key, str) or not key:
            raise InvalidRequest("auth needs an api_key", data={"field": "api_key"})
        try:
            self.principal = await sync_to_async(_authenticate)(key)
        except OrchestratorError as exc:
            await self.refuse(exc)
            return
        await self.send_event({"type": "authenticated", "tenant_id": self.principal.tenant_id})

    async def on_prompt(self, message: dict[str, Any]) -> None:
        principal = self.principal_or_refuse()
        self.room_for_one_more()
        data = validated(InferInput, {k: v for k, v in message.items() if k != "type"})
        config = get_config()
        fields = data.fields()
        route = await routes.aroute_if_grouped(config, fields, tenant_id=principal.tenant_id, api_key_id=principal.api_key.id)
        request = start.infer_build_request(
            tenant_id=principal.tenant_id,
            api_key_id=principal.api_key.id,
            route=route,
            data=fields,
            config=config,
            tenant_has_documents=principal.tenant.has_documents,
        )
        try:
            started = await start.ainfer_start(request=request, rates=gates.tenant_rates(principal.tenant, config))
        except OrchestratorError as exc:
            await self.send_event(tagged(streaming.error_event(request.request_id, exc), self.message_id))
            return
        events = streaming.prompt_events(request, started, timeout_s=streaming.wait_s(config.limits.request_timeout_s))
        self.forward(request.request_id, events, self.message_id)

    async def on_resume(self, message: dict[str, Any]) -> None:
        principal = self.principal_or_refuse()
        self.room_for_one_more()
        request_id, after_seq = message.get("request_id"), message.get("after_seq", -1)
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequest("resume needs a request_id", data={"field": "request_id"})
        if not isinstance(after_seq, int) or isinstance(after_seq, bool):
            raise InvalidRequest("after_seq must be an integer", data={"field": "after_seq"})
        # Another tenant's request, or one whose stream expired, is not found.
        await sync_to_async(selectors.request_status_for_tenant, thread_sensitive=False)(tenant_id=principal.tenant_id, request_id=request_id)
        timeout_s = streaming.wait_s(get_config().limits.request_timeout_s)
        events = streaming.stream_events(request_id, client_request_id=request_id, timeout_s=timeout_s, after_seq=after_seq)
        self.forward(request_id, events, self.message_id)

    def principal_or_refuse(self) -> TenantPrincipal:
        if self.principal is None:  # handle() refuses first; this keeps the types honest
            raise ApiKeyMissing()
        return self.principal

    def room_for_one_more(self) -> None:
        self.streams = {rid: task for rid, task in self.streams.items() if not task.done()}
        if len(self.streams) >= MAX_STREAMS_PER_CONNECTION:
            raise Overloaded(f"at most {MAX_STREAMS_PER_CONNECTION} streams at once on one connection", data={"limit": MAX_STREAMS_PER_CONNECTION})

    def forward(self, request_id: str, events: Any, message_id: str | int | None) -> None:
        async def pump() -> None:
            try:
                async with contextlib.aclosing(events):  # a cancelled pump signs out of the stream at once
                    async for event in events:
                        await self.send_event(tagged(event, message_id))
            except asyncio.CancelledError:
                raise  # the client left: stop reading
            except ClientGone:
                log.info("stream_client_gone", request_id=request_id, outcome="cancelled")  # signed out above
            except Exception as exc:  # stream boundary: this stream ends with an error, the others go on
                log.exception("stream_crashed", request_id=request_id, outcome="error", error_type=type(exc).__name__)
                await self.send_event(tagged(streaming.error_event(request_id, OrchestratorError("internal error")), message_id))

        self.streams[request_id] = asyncio.ensure_future(pump())

    async def send_event(self, event: dict[str, Any]) -> None:
        try:
            await self.send(text_data=json.dumps(event, separators=(",", ":")))
        except (OSError, RuntimeError) as exc:
            # The connection is closed: uvicorn refuses the send (ClientDisconnected, or
            # "websocket.send after websocket.close") where Daphne drops it silently.
            raise ClientGone from exc

    async def refuse(self, error: OrchestratorError) -> None:
        await self.send_event(streaming.error_event(None, error))
        await self.close(code=error.ws_close_code)
