"""A small threaded HTTP/1.1 server on loopback that fakes providers.

A test sets ``fake.mode`` to choose the behaviour of the next requests:

- ``ok``: a normal reply (JSON, or SSE when the request asks to stream);
- ``429``: rate limited, with ``Retry-After: fake.retry_after``;
- ``500`` / ``503`` / ``529`` / ``401``: that status with the provider's error body;
- ``hang``: accept the request and answer nothing until ``hang_s`` has passed (a
  client that closes the connection meanwhile is seen, in ``client_aborts``);
- ``malformed``: a body (or one SSE event) that is not valid JSON;
- ``drop``: stream some events, then close the socket mid-body
  (no terminating chunk: the client sees an incomplete chunked body);
- ``cut``: stream some events, then end the body cleanly but without the
  protocol's final event.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class SseReply:
    events: list[bytes]
    drop_after: int | None = None  # close the socket after this many events
    delay_s: float = 0.0


@dataclass
class Hang:
    seconds: float


def json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status=status, body=json.dumps(payload).encode(), headers=headers or {})


def sse_event(data: str, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + f"data: {data}\n\n").encode()


class FakeProvider:
    """Base class: subclasses implement ``reply(path, body)`` for their protocol."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.fail_times = 0
        self.fail_mode = "503"
        self.retry_after = "2"
        self.tokens = ["Hello", ",", " world", "!"]
        self.token_delay_s = 0.0
        self.reply_delay_s = 0.0  # before a whole (not streamed) reply
        self.hang_s = 3.0
        # The model's context window, in the fake's tokens (words): a longer request is
        # refused in the provider's own words (its ``context_error``). None: no window.
        self.context_window: int | None = None
        self.requests: list[dict[str, Any]] = []
        self.headers_seen: list[dict[str, str]] = []
        self.open_connections = 0
        self.connections_made = 0  # every connection a client opened, over the fake's life
        self.in_flight = 0  # requests being answered right now
        self.max_in_flight = 0
        self.active_streams = 0  # SSE bodies being written right now
        self.client_aborts: list[float] = []  # time.monotonic() of each stream its client closed
        self.streams_written = 0  # SSE bodies written to their end
        self.events_sent = 0  # SSE events written to clients, over the fake's life
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> FakeProvider:
        fake = self

        class Handler(_Handler):
            provider = fake

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("fake not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # --- behaviour -------------------------------------------------------------
    def reply(self, path: str, body: dict[str, Any]) -> Reply | SseReply | Hang:
        raise NotImplementedError

    def dispatch(self, path: str, body: dict[str, Any]) -> Reply | SseReply | Hang:
        with self._lock:
            failing = self.fail_times > 0  # the next `fail_times` requests fail with `fail_mode`
            if failing:
                self.fail_times -= 1
        if not failing:
            return self._answer(self.mode, path, body)
        saved, self.mode = self.mode, self.fail_mode
        try:
            return self._answer(self.fail_mode, path, body)
        finally:
            self.mode = saved

    def _answer(self, mode: str, path: str, body: dict[str, Any]) -> Reply | SseReply | Hang:
        if mode == "hang":
            return Hang(self.hang_s)
        if mode.isdigit():
            status = int(mode)
            headers = {"Retry-After": self.retry_after} if status in (429, 503, 529) else {}
            return json_reply(status, self.error_body(status), headers)
        return self.reply(path, body)

    def error_body(self, status: int) -> dict[str, Any]:
        return {"error": {"message": f"fake error {status}", "type": "server_error", "code": status}}


class _QuietServer(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: twenty clients connecting at once
    # overflow it and see resets, which no real provider (backlog 511+) would cause.
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gives up (timeout, cancelled stream) resets the socket; that is the point of the test.
        return


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, chunked bodies
    provider: FakeProvider

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return

    def setup(self) -> None:
        super().setup()
        with self.provider._lock:
            self.provider.open_connections += 1
            self.provider.connections_made += 1

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.provider._lock:
                self.provider.open_connections -= 1

    def do_GET(self) -> None:
        self._handle({})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"_raw": raw.decode("utf-8", "replace")}
        self._handle(body)

    def _handle(self, body: dict[str, Any]) -> None:
        provider = self.provider
        with provider._lock:
            provider.in_flight += 1
            provider.max_in_flight = max(provider.max_in_flight, provider.in_flight)
        try:
            self._respond(body)
        finally:
            with provider._lock:
                provider.in_flight -= 1

    def _respond(self, body: dict[str, Any]) -> None:
        self.provider.requests.append({"path": self.path, "body": body})
        self.provider.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
        result = self.provider.dispatch(self.path, body)
        if isinstance(result, Hang):
            self._hang(result.seconds)
            return
        if isinstance(result, Reply):
            time.sleep(self.provider.reply_delay_s)  # a provider that takes a while to answer
            self.send_response(result.status)
            self.send_header("Content-Type", result.content_type)
            self.send_header("Content-Length", str(len(result.body)))
            for key, value in result.headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(result.body)
            return
        self._stream(result)

    def _hang(self, seconds: float) -> None:
        """Answer nothing for ``seconds``, noticing a client that closes the connection
        meanwhile (recorded in ``client_aborts``, as a cancelled stream is)."""
        ends = time.monotonic() + seconds
        self.close_connection = True
        while (left := ends - time.monotonic()) > 0:
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
            if readable:
                try:
                    gone = self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    gone = True
                if gone:
                    with self.provider._lock:
                        self.provider.client_aborts.append(time.monotonic())
                    return

    def _stream(self, reply: SseReply) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        provider = self.provider
        with provider._lock:
            provider.active_streams += 1
        try:
            self._write_events(reply)
            with provider._lock:
                provider.streams_written += 1
        except OSError:  # BrokenPipe, ConnectionReset, ...
            # The client closed the stream (a cancelled request): what a real provider sees.
            with provider._lock:
                provider.client_aborts.append(time.monotonic())
            self.close_connection = True
        finally:
            with provider._lock:
                provider.active_streams -= 1

    def _write_events(self, reply: SseReply) -> None:
        for n, event in enumerate(reply.events):
            if reply.drop_after is not None and n >= reply.drop_after:
                # Mid-stream drop: no terminating zero-length chunk, socket closed.
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if reply.delay_s:
                time.sleep(reply.delay_s)
            self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            self.wfile.flush()
            with self.provider._lock:
                self.provider.events_sent += 1
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


# --- what the fakes' "model" decides, the same for every provider --------------------------
def tool_arguments(parameters: dict[str, Any] | None, text: str) -> dict[str, Any]:
    """The arguments the fakes call a tool with: the user's words in its first parameter."""
    names = list(((parameters or {}).get("properties") or {}).keys())
    return {names[0]: text} if names else {}


def pieces(text: str, size: int = 4) -> list[str]:
    """``text`` in the small pieces a provider streams arguments in."""
    return [text[i : i + size] for i in range(0, len(text), size)]


def tool_result_reply(result: str) -> list[str]:
    """The fakes' answer once a tool's result is in: they say what it said."""
    return ["Tool", " said", ": ", result]


def continued(tokens: list[str], prefix: str) -> list[str]:
    """What the fakes' "model" writes after a prefix of its own answer (a prefill): the
    rest of it, from inside the token the prefix ends in; all of it for another prefix."""
    answer = "".join(tokens)
    if not prefix or not answer.startswith(prefix):
        return tokens
    written = 0
    for place, token in enumerate(tokens):
        if written + len(token) > len(prefix):
            return [token[len(prefix) - written :], *tokens[place + 1 :]]
        written += len(token)
    return []
