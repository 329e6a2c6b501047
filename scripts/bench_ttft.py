"""Time to first token: directly against an OpenAI-style upstream, and through the
orchestrator over the WebSocket, SSE and ``/v1/chat/completions``, interleaved in
one run (issue #3's benchmark).

The upstream is a small asyncio HTTP/1.1 server in its own process (``--upstream``
mode of this script): each streamed chat completion waits a fixed first-token
delay, then writes its tokens as OpenAI SSE chunks. The platform is the gateway
(uvicorn, or Daphne with ``--server daphne``) and real-time Celery worker
processes on loopback, with Postgres and Redis (or ``--broker`` for another
Celery broker, RabbitMQ say), as ``bench_path.py`` sets them up; the tenant has no
documents (its search finds nothing); deduplication is on and every prompt is
unique. One more concurrency-1 phase sends WebSocket prompts for a tenant with
one document, which no prompt matches. Another sends whole (not streamed)
``/v1/chat/completions`` requests beside whole requests straight to the upstream:
the overhead on a whole answer, against the streamed first token's.

The model ``fake-paced`` writes its tokens one every ``--token-interval-ms``, as
a model does: ten such streams at once, against one alone, give the 10-stream
TTFT ratio with streams that overlap as real ones do. It is measured twice: with
the ten clients started together (streams of one length sent back to back stay
in step, so each round of ten arrives at once: a burst) and started a tenth of a
stream apart (each new stream arrives beside nine others in flight). The
back-to-back figure, with every reply written at once, is mostly a throughput
test: ten clients sending ~300 requests a second.

Every client request is timed from sending to the first token's text, and read
to its end. Reported: P50/P99 of TTFT per transport, the overhead over the
direct call at the same percentile, and the completed streamed requests per
second. At concurrency 1 and in the open loop, each request's TTFT is also split
around the upstream's own delay: from the client's send to the upstream reading
the request, and from the upstream writing the first token to the client reading
it (the upstream records both per prompt, on the machine's monotonic clock, which
the client reads too). Prints Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_path import ENV, ROOT, free_port, manage, pct, realtime_worker_command, start, stop_all, wait_for_gateway

from orchestrator_site.gateway import gateway_command

TRANSPORTS = ("direct", "websocket", "sse", "v1")
WHOLE = ("direct_whole", "v1_whole")  # not streamed: the answer in one JSON body
STAGE_TIMES: list[dict[str, int]] = []
ERRORS: collections.Counter[str] = collections.Counter()  # what failed requests said, for the report


def failed(transport: str, exc: BaseException) -> None:
    """A request that failed: counted by what it said (the first 200 characters)."""
    ERRORS[f"{transport}: {type(exc).__name__}: {str(exc)[:200]}"] += 1


# --- the fake upstream (its own process) ---------------------------------------------------


PACED_MODEL = "fake-paced"  # the upstream writes this model's tokens one every --token-interval-ms, as a model does


def _chunk(payload: dict[str, object] | str) -> bytes:
    """One SSE event as one HTTP/1.1 chunk."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    event = f"data: {data}\n\n".encode()
    return f"{len(event):x}\r\n".encode() + event + b"\r\n"


@functools.cache
def _reply(model: str, tokens: int, usage: bool) -> tuple[bytes, ...]:
    """A streamed reply's pieces: the head, the role chunk and one chunk per token, then
    the end (finish, usage, [DONE], the last chunk). Built once per kind of reply: the
    fake upstream shares the two cores with everything it measures."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": model}
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    role = _chunk({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    words = [_chunk({**base, "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}]}) for i in range(tokens)]
    end = _chunk({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage:
        end += _chunk({**base, "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}})
    return (head, role, *words, end + _chunk("[DONE]") + b"0\r\n\r\n")


@functools.cache
def _whole_reply(model: str, tokens: int) -> bytes:
    """A chat completion that was not streamed: the whole answer in one JSON body."""
    body = json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(f"tok{i} " for i in range(tokens))}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens},
        },
        separators=(",", ":"),
    ).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


# Per prompt (the 32 hex digits of its text), when the upstream read the request and when
# it wrote the first token, on the machine's monotonic clock (the client's clock too):
# they split a request's overhead into the way to the upstream and the way back.
HOPS: dict[str, tuple[int, int]] = {}
PROMPT_ID = re.compile(rb"benchmark prompt ([0-9a-f]{32})")


def _hops_reply() -> bytes:
    """``GET /bench/hops``: what was recorded since the last call, then forgotten."""
    body = json.dumps(HOPS).encode()
    HOPS.clear()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


_NOT_FOUND_BODY = b'{"error": {"message": "not found", "type": "invalid_request_error"}}'
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(_NOT_FOUND_BODY), _NOT_FOUND_BODY)


async def _upstream_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first_token_s: float, tokens: int, interval_s: float = 0.0) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            arrived = time.monotonic_ns()
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            raw = await reader.readexactly(length) if length else b"{}"
            body = json.loads(raw)
            path = head.split(b" ", 2)[1]
            if path == b"/bench/hops":
                writer.write(_hops_reply())
                continue
            if path != b"/v1/chat/completions":
                writer.write(NOT_FOUND)
                continue
            model = str(body.get("model", "fake-1"))
            found = PROMPT_ID.search(raw)
            if not body.get("stream"):
                await asyncio.sleep(first_token_s)
                writer.write(_whole_reply(model, tokens))
                await writer.drain()
                continue
            reply = _reply(model, tokens, bool((body.get("stream_options") or {}).get("include_usage")))
            writer.write(reply[0])
            await asyncio.sleep(first_token_s)
            if found:
                HOPS[found.group(1).decode()] = (arrived, time.monotonic_ns())
            if model == PACED_MODEL:
                writer.write(reply[1])
                for i, piece in enumerate(reply[2:-1]):
                    if i:
                        await asyncio.sleep(interval_s)
                    writer.write(piece)
                    await writer.drain()
                writer.write(reply[-1])
            else:
                writer.write(b"".join(reply[1:]))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve_upstream(port: int, first_token_s: float, tokens: int, interval_s: float = 0.0) -> None:
    server = await asyncio.start_server(lambda r, w: _upstream_conn(r, w, first_token_s, tokens, interval_s), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


# --- clients --------------------------------------------------------------------------------


@dataclass
class Sample:
    transport: str
    ttft_ms: float
    total_ms: float
    tokens: int  # upstream tokens received (several may come in one event)
    prompt_id: str = ""  # the 32 hex digits of its prompt: the upstream's HOPS key
    sent_ns: int = 0  # monotonic clock: sent, and the first token's text read
    first_ns: int = 0

    @classmethod
    def timed(cls, transport: str, prompt_id: str, sent_ns: int, first_ns: int, tokens: int) -> Sample:
        now = time.monotonic_ns()
        return cls(transport, (first_ns - sent_ns) / 1e6, (now - sent_ns) / 1e6, tokens, prompt_id, sent_ns, first_ns)


def http_session() -> aiohttp.ClientSession:
    """The client's HTTP connections (kept alive, up to 200). aiohttp, not httpx: with 32
    streams at once httpx's pool cost the client 5.5-6.3 ms of CPU per streamed request
    against aiohttp's 0.8-0.9 (BENCHMARKS.md), and the client shares the two cores
    with what it measures: with httpx, the upstream alone reached ~100-150 req/s."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200), timeout=aiohttp.ClientTimeout(total=60))


@dataclass
class Clients:
    gateway: str
    upstream: str
    key: str
    http: aiohttp.ClientSession
    sockets: list[object] = field(default_factory=list)
    tokens: int = 20
    model: str = "fake-1"

    @staticmethod
    def prompt(prompt_id: str) -> str:
        return f"benchmark prompt {prompt_id}"

    async def direct(self) -> Sample:
        pid = uuid.uuid4().hex
        body = {"model": self.model, "stream": True, "messages": [{"role": "user", "content": self.prompt(pid)}]}
        return await self._sse("direct", pid, f"{self.upstream}/v1/chat/completions", body, {}, openai=True)

    async def sse(self) -> Sample:
        pid = uuid.uuid4().hex
        body = {"prompt": self.prompt(pid), "worker": "bench", "model": self.model, "stream": True}
        return await self._sse("sse", pid, f"{self.gateway}/api/v1/infer", body, {"Authorization": f"Bearer {self.key}"}, openai=False)

    async def v1(self) -> Sample:
        pid = uuid.uuid4().hex
        body = {"model": f"bench/{self.model}", "stream": True, "messages": [{"role": "user", "content": self.prompt(pid)}]}
        return await self._sse("v1", pid, f"{self.gateway}/v1/chat/completions", body, {"Authorization": f"Bearer {self.key}"}, openai=True)

    async def direct_whole(self) -> Sample:
        pid = uuid.uuid4().hex
        body = {"model": self.model, "messages": [{"role": "user", "content": self.prompt(pid)}]}
        return await self._whole("direct_whole", pid, f"{self.upstream}/v1/chat/completions", body, {})

    async def v1_whole(self) -> Sample:
        pid = uuid.uuid4().hex
        body = {"model": f"bench/{self.model}", "messages": [{"role": "user", "content": self.prompt(pid)}]}
        return await self._whole("v1_whole", pid, f"{self.gateway}/v1/chat/completions", body, {"Authorization": f"Bearer {self.key}"})

    async def _whole(self, transport: str, pid: str, url: str, body: Mapping[str, object], headers: dict[str, str]) -> Sample:
        """A whole answer: its "first token" is the whole body, read."""
        started = time.monotonic_ns()
        async with self.http.post(url, json=body, headers=headers) as resp:
            answer = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{transport}: HTTP {resp.status}: {answer[:300]!r}")
        text = json.loads(answer)["choices"][0]["message"]["content"]
        return Sample.timed(transport, pid, started, time.monotonic_ns(), text.count("tok"))

    async def hops(self) -> dict[str, tuple[int, int]]:
        """The upstream's record since the last call (and it forgets it)."""
        async with self.http.get(f"{self.upstream}/bench/hops") as resp:
            return {pid: (int(a), int(b)) for pid, (a, b) in (await resp.json()).items()}

    async def _sse(self, transport: str, pid: str, url: str, body: dict[str, object], headers: dict[str, str], *, openai: bool) -> Sample:
        started = time.monotonic_ns()
        first, count = 0, 0
        async with self.http.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{transport}: HTTP {resp.status}: {(await resp.read())[:300]!r}")
            async for raw in resp.content:  # line by line, as they arrive
                if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(raw[6:])
                if openai:
                    if "error" in event:
                        raise RuntimeError(f"{transport}: {event['error']}")
                    text = event["choices"][0]["delta"].get("content") if event.get("choices") else None
                elif event["type"] == "error":
                    raise RuntimeError(f"{transport}: {event['code']}: {event['message']}")
                else:
                    text = event.get("text") if event["type"] == "token" else None
                if text:
                    count += text.count("tok")
                    first = first or time.monotonic_ns()
        return Sample.timed(transport, pid, started, first, count)

    async def websocket(self, ws: websockets.ClientConnection) -> Sample:
        pid = uuid.uuid4().hex
        started = time.monotonic_ns()
        await ws.send(json.dumps({"type": "prompt", "prompt": self.prompt(pid), "worker": "bench", "model": self.model}))
        first, count = 0, 0
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "token":
                count += event["text"].count("tok")
                first = first or time.monotonic_ns()
            elif event["type"] == "error":
                raise RuntimeError(f"websocket: {event['code']}: {event['message']}")
            elif event["type"] == "done":
                STAGE_TIMES.append(event["timings_us"])
                return Sample.timed("websocket", pid, started, first, count)


async def open_socket(clients: Clients) -> websockets.ClientConnection:
    url = clients.gateway.replace("http://", "ws://") + "/api/v1/stream"
    ws = await websockets.connect(url, additional_headers={"Authorization": f"Bearer {clients.key}"}, max_queue=None)
    await ws.recv()  # authenticated
    return ws


async def one(clients: Clients, transport: str, ws: websockets.ClientConnection | None) -> Sample:
    if transport == "websocket":
        if ws is None:
            raise RuntimeError("a WebSocket prompt needs a connection")
        return await clients.websocket(ws)
    call: Callable[[], Awaitable[Sample]] = getattr(clients, transport)
    return await call()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """This client's own cycle collector off while a phase is timed (collected before
    it, on again after). A full collection here took up to 30 ms: the sample in
    flight then carried the client's pause as if it were the platform's, or the
    upstream's. The platform's processes keep their collectors, as deployed."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def closed_loop(
    clients: Clients, *, concurrency: int, per_client: int, transports: tuple[str, ...], stagger_s: float = 0.0
) -> tuple[list[Sample], float, int]:
    """``concurrency`` loops, each sending ``per_client`` requests back to back,
    cycling through ``transports`` (each loop starts at a different one). Loop ``n``
    sends its first request ``n * stagger_s`` after the first loop: streams of one
    length sent back to back keep the phase they started in, so without a stagger
    every round of them arrives at once."""
    samples: list[Sample] = []
    errors = 0

    async def loop(n: int) -> None:
        nonlocal errors
        ws = await open_socket(clients)
        try:
            await asyncio.sleep(n * stagger_s)
            cycle = itertools.islice(itertools.cycle(transports), n % len(transports), None)
            for transport in itertools.islice(cycle, per_client):
                try:
                    samples.append(await one(clients, transport, ws))
                except (RuntimeError, aiohttp.ClientError, websockets.WebSocketException) as exc:
                    failed(transport, exc)
                    errors += 1
        finally:
            await ws.close()

    with collector_paused():
        started = time.perf_counter()
        await asyncio.gather(*(loop(n) for n in range(concurrency)))
        took = time.perf_counter() - started
    return samples, took, errors


class SocketPool:
    """WebSocket connections, each carrying one prompt at a time: a prompt takes an idle
    one, or opens a new one, as a browser tab would. (Prompts sharing a connection at
    once would each need the other's events: one reader per connection.) A connection
    that failed is not reused."""

    def __init__(self, open_one: Callable[[], Awaitable[Any]]) -> None:
        self._open = open_one
        self.idle: list[Any] = []
        self.opened: list[Any] = []

    async def warm(self, n: int) -> None:
        """``n`` connections open and idle before the clock starts."""
        for ws in [await self.acquire() for _ in range(n)]:
            self.release(ws)

    async def acquire(self) -> Any:
        if self.idle:
            return self.idle.pop()
        ws = await self._open()
        self.opened.append(ws)
        return ws

    def release(self, ws: Any, *, broken: bool = False) -> None:
        if not broken:
            self.idle.append(ws)

    async def close(self) -> None:
        for ws in self.opened:
            await ws.close()


async def open_loop(clients: Clients, *, rate: float, seconds: float) -> tuple[list[Sample], int]:
    """Requests sent at a fixed rate whatever the answers take, cycling through every
    transport (each WebSocket prompt on a connection of its own while it runs)."""
    pool = SocketPool(lambda: open_socket(clients))
    await pool.warm(8)
    samples: list[Sample] = []
    errors = 0

    async def fire(transport: str) -> None:
        nonlocal errors
        ws = await pool.acquire() if transport == "websocket" else None
        broken = False
        try:
            samples.append(await one(clients, transport, ws))
        except (RuntimeError, aiohttp.ClientError, websockets.WebSocketException) as exc:
            failed(transport, exc)
            errors += 1
            broken = True
        finally:
            if ws is not None:
                pool.release(ws, broken=broken)

    tasks = []
    with collector_paused():
        started = time.perf_counter()
        for n, transport in enumerate(itertools.islice(itertools.cycle(TRANSPORTS), int(rate * seconds))):
            delay = started + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(fire(transport)))
        await asyncio.gather(*tasks)
    await pool.close()
    return samples, errors


# --- throughput with wrk (a load generator that costs little CPU) -------------------------------

# Every body is read to its end; one without its terminal event (SSE "event: done",
# OpenAI "data: [DONE]") is an error: a stream that ends in an error event still
# answers 200, and must not count as a completed request.
WRK_SCRIPT = """
local counter, threads = 0, {}
function setup(thread) thread:set("tid", #threads); table.insert(threads, thread) end
function init(args) incomplete = 0 end
function request()
  counter = counter + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["Authorization"] = "Bearer KEY"}, string.format([[BODY]], tid, counter))
end
function response(status, headers, body)
  if status == 200 and not (string.find(body, "event: done", 1, true) or string.find(body, "data: [DONE]", 1, true)) then
    incomplete = incomplete + 1
  end
end
function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do total = total + thread:get("incomplete") end
  io.write(string.format("Incomplete streams: %d\\n", total))
end
"""


def wrk_run(url: str, key: str, body: str, *, connections: int, seconds: int) -> tuple[float, int, str, str]:
    """Completed requests/s (without error), failed requests (non-2xx, socket errors,
    streams without their terminal event) and the P50/P99 of whole responses (every
    streamed body read to its end) for ``body`` (a JSON template with two %d) POSTed
    to ``url``."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT.replace("KEY", key).replace("BODY", body))
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name, url]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    return parse_wrk(text)


def parse_wrk(text: str) -> tuple[float, int, str, str]:
    total, number, unit = re.search(r"(\d+) requests in ([\d.]+)(m?s)", text).groups()  # type: ignore[union-attr]
    seconds = float(number) / (1000 if unit == "ms" else 1)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    incomplete = re.search(r"Incomplete streams: (\d+)", text)
    failed = (int(bad.group(1)) if bad else 0) + (sum(int(n) for n in errors.groups()) if errors else 0) + (int(incomplete.group(1)) if incomplete else 0)
    rate = max(0, int(total) - failed) / seconds
    p50 = re.search(r"\s50%\s+(\S+)", text).group(1)  # type: ignore[union-attr]
    p99 = re.search(r"\s99%\s+(\S+)", text).group(1)  # type: ignore[union-attr]
    return rate, failed, p50, p99


def wrk_cases(gateway: str, upstream: str) -> tuple[tuple[str, str, str], ...]:
    """(label, URL, body template) of each wrk run."""

    def prompt() -> str:
        # A nonce per case: no prompt repeats one that is still in the deduplication window
        # (an earlier run's, or the case before: a /v1 call with one message and an SSE
        # prompt of the same text are the same request, and the second would be answered
        # from the first's cache).
        return f"benchmark prompt {uuid.uuid4().hex[:12]} %d-%d"

    cases = (
        ("SSE `POST /api/v1/infer`", f"{gateway}/api/v1/infer", '{"prompt": "' + prompt() + '", "worker": "bench", "stream": true}'),
        (
            "`/v1/chat/completions`, streaming",
            f"{gateway}/v1/chat/completions",
            '{"model": "bench/fake-1", "stream": true, "messages": [{"role": "user", "content": "' + prompt() + '"}]}',
        ),
        (
            "direct (the upstream alone)",
            f"{upstream}/v1/chat/completions",
            '{"model": "fake-1", "stream": true, "messages": [{"role": "user", "content": "' + prompt() + '"}]}',
        ),
    )
    return cases


def wrk_rows(gateway: str, upstream: str, key: str, *, seconds: int) -> list[str]:
    rows = []
    for label, url, body in wrk_cases(gateway, upstream):
        rate, failed, p50, p99 = wrk_run(url, key, body, connections=32, seconds=seconds)
        rows.append(f"| {label} (wrk) | {failed} | {rate:.0f} | {p50} / {p99} |")
    return rows


# --- CPU per request ------------------------------------------------------------------------


TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int) -> tuple[str, list[str]] | None:
    """A process's command name and the fields of /proc/<pid>/stat after it (state,
    ppid, …); None once it has gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    head, _, rest = text.rpartition(")")
    return head.partition("(")[2], rest.split()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (0 once it has gone)."""
    stat = proc_stat(pid)
    return 0.0 if stat is None else (int(stat[1][11]) + int(stat[1][12])) / TICKS_PER_S


def processes() -> Iterator[tuple[int, str, int]]:
    """Every process now: pid, command name, parent's pid."""
    for entry in Path("/proc").iterdir():
        stat = proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None:
            yield int(entry.name), stat[0], int(stat[1][1])


def pids_named(*names: str) -> list[int]:
    """Every process whose command name is one of ``names`` (Redis, Postgres's backends)."""
    return [pid for pid, name, _ppid in processes() if name in names]


def with_children(pids: list[int]) -> list[int]:
    """The processes and their children (a prefork pool's processes: their CPU time is
    their own, not their parent's)."""
    return [*pids, *(pid for pid, _name, ppid in processes() if ppid in pids)]


def machine_cpu_seconds() -> tuple[float, float]:
    """CPU time used on the whole machine since boot, by every process and the kernel,
    and the time the hypervisor kept the virtual CPUs from running (steal), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / TICKS_PER_S, steal / TICKS_PER_S


@dataclass(frozen=True)
class Outside:
    """Over a phase: CPU used outside the measured groups (other services on the
    machine, the kernel), the hypervisor's steal, and the phase's wall time."""

    cpu_s: float
    steal_s: float
    wall_s: float

    def line(self, phase: str) -> str:
        per_s = 1000 / max(self.wall_s, 1e-9)
        return (
            f"During the {phase} phase, processes outside the benchmark's (other services, the kernel) used "
            f"{self.cpu_s * per_s:.0f} ms of CPU per second, and the hypervisor took {self.steal_s * per_s:.0f} ms per second "
            f"(of {os.cpu_count() or 0} x 1,000): their bursts land in single requests' times."
        )


class CpuClock:
    """CPU time per request of each group of processes, over a phase: the capacity a
    request costs, less dependent on how the two cores were shared than a rate. Each
    group's processes are looked up when a phase starts (Postgres's backends open as
    the workers connect); one that starts later is not counted. The rest of the
    machine's CPU time over the phase is ``outside``."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._start: dict[str, dict[int, float]] = {}
        self._machine = (0.0, 0.0)
        self._wall = 0.0

    def start(self) -> None:
        self._start = {group: {pid: cpu_seconds(pid) for pid in find()} for group, find in self.groups.items()}
        self._machine = machine_cpu_seconds()
        self._wall = time.monotonic()

    def _used(self) -> dict[str, float]:
        return {group: sum(max(0.0, cpu_seconds(pid) - before) for pid, before in pids.items()) for group, pids in self._start.items()}

    def outside(self) -> Outside:
        """Since ``start``: the machine's CPU time less the groups', and the steal."""
        used, (cpu, steal) = self._used(), machine_cpu_seconds()
        return Outside(max(0.0, cpu - self._machine[0] - sum(used.values())), steal - self._machine[1], time.monotonic() - self._wall)

    def per_request_ms(self, requests: int) -> dict[str, float]:
        """Milliseconds of CPU per request since ``start``, by group, and ``all``."""
        per = {group: seconds * 1000 / max(requests, 1) for group, seconds in self._used().items()}
        per["all"] = sum(per.values())
        return per


# --- the report -------------------------------------------------------------------------------


def ttft_rows(title: str, samples: list[Sample], transports: tuple[str, ...] = TRANSPORTS) -> list[str]:
    """Per transport, P50/P99 TTFT and the overhead over the first transport (the direct call)."""
    by = {t: [s.ttft_ms for s in samples if s.transport == t] for t in transports}
    direct = by[transports[0]]
    rows = []
    for transport in transports:
        values = by[transport]
        if not values:
            continue
        p50, p99 = pct(values, 0.5), pct(values, 0.99)
        over = "-" if transport == transports[0] else f"{p50 - pct(direct, 0.5):+.2f} / {p99 - pct(direct, 0.99):+.2f}"
        rows.append(f"| {title} | {transport} | {len(values)} | {p50:.2f} | {p99:.2f} | {over} |")
    return rows


def overhead_p50(samples: list[Sample], transport: str, direct: str) -> float:
    return pct([s.ttft_ms for s in samples if s.transport == transport], 0.5) - pct([s.ttft_ms for s in samples if s.transport == direct], 0.5)


def hop_rows(title: str, samples: list[Sample], hops: dict[str, tuple[int, int]]) -> list[str]:
    """Each request's TTFT in two: from the client's send to the upstream reading the
    request (the gateway, the queue, the worker's stages before the call), and from the
    upstream writing the first token to the client reading it (the worker's stream,
    the token bus, the gateway). The upstream's own first-token delay is neither."""
    rows = []
    for transport in TRANSPORTS:
        matched = [(s, hops[s.prompt_id]) for s in samples if s.transport == transport and s.prompt_id in hops]
        if not matched:
            continue
        there = [(arrived - s.sent_ns) / 1e6 for s, (arrived, _first) in matched]
        back = [(s.first_ns - first) / 1e6 for s, (_arrived, first) in matched]
        rows.append(
            f"| {title} | {transport} | {len(matched)} | {pct(there, 0.5):.2f} / {pct(there, 0.99):.2f} | {pct(back, 0.5):.2f} / {pct(back, 0.99):.2f} |"
        )
    return rows


HOPS_HEAD = (
    "| load | transport | requests | client's send → upstream reads the request, P50 / P99 ms "
    "| upstream writes the first token → client reads it, P50 / P99 ms |\n| --- | --- | --- | --- | --- |\n"
)


def write_config(upstream: str, path: Path) -> None:
    path.write_text(
        f"""default_worker = "bench"

[workers.bench]
kind = "openai"
base_url = "{upstream}/v1"
models = ["fake-1", "{PACED_MODEL}"]
timeout_s = 30
max_connections = 200
retry = {{ attempts = 1 }}
"""
    )


def cpu_cell(used: dict[str, float]) -> str:
    return f"{used['all']:.1f} ({used['gateway']:.1f}, {used['workers']:.1f}, {used['redis']:.1f}, {used['postgres']:.1f})"


DOCUMENTED = "concurrency 1, a tenant with a document"


async def measure(clients: Clients, args: argparse.Namespace, cpu: CpuClock, *, documented_key: str) -> None:
    out = sys.stdout
    # Warm: connections, pools, first-use imports in every process, and in every thread of
    # the workers' pools (each has its own event loop, HTTP client and connections): at
    # as many clients as the pools have threads, or the later phases measure cold threads.
    await closed_loop(clients, concurrency=max(8, args.worker_processes * args.worker_threads), per_client=12, transports=TRANSPORTS)

    out.write("| load | transport | requests | TTFT P50 ms | TTFT P99 ms | overhead over direct, P50 / P99 ms |\n| --- | --- | --- | --- | --- | --- |\n")
    STAGE_TIMES.clear()
    await clients.hops()  # forget the warm-up's
    cpu.start()
    lone, _took, lone_errors = await closed_loop(clients, concurrency=1, per_client=args.requests, transports=TRANSPORTS)
    lone_outside = cpu.outside()
    hops = hop_rows("concurrency 1", lone, await clients.hops())
    out.write("\n".join(ttft_rows("concurrency 1", lone)) + "\n")
    whole, _took, whole_errors = await closed_loop(clients, concurrency=1, per_client=args.requests // 2, transports=WHOLE)
    out.write("\n".join(ttft_rows("concurrency 1, not streamed (whole answer)", whole, WHOLE)) + "\n")
    inside = {stage: pct([t[stage] / 1000 for t in STAGE_TIMES], 0.5) for stage in ("rag", "assemble", "inference")}
    STAGE_TIMES.clear()
    # The same, for a tenant whose search runs (it has a document): WebSocket and direct, interleaved.
    documented = dataclasses.replace(clients, key=documented_key)
    with_document, _took, documented_errors = await closed_loop(documented, concurrency=1, per_client=args.requests // 2, transports=("direct", "websocket"))
    out.write("\n".join(ttft_rows(DOCUMENTED, with_document)) + "\n")
    searched_rag = pct([t["rag"] / 1000 for t in STAGE_TIMES], 0.5)
    STAGE_TIMES.clear()
    await clients.hops()
    ten, _took, ten_errors = await closed_loop(clients, concurrency=10, per_client=args.requests // 16, transports=TRANSPORTS)
    out.write("\n".join(ttft_rows("concurrency 10", ten)) + "\n")
    await clients.hops()
    opened, open_errors = await open_loop(clients, rate=args.rate, seconds=args.seconds)
    hops += hop_rows(f"open loop, {args.rate:g} req/s", opened, await clients.hops())
    out.write("\n".join(ttft_rows(f"open loop, {args.rate:g} req/s", opened)) + "\n")
    busy, _took, busy_errors = await closed_loop(clients, concurrency=32, per_client=args.requests // 32, transports=TRANSPORTS)
    out.write("\n".join(ttft_rows("concurrency 32", busy)) + "\n")

    out.write(
        "\n| throughput, concurrency 32 | requests | errors | completed req/s | tokens per request | P50 / P99 total ms "
        "| CPU ms per request: all (gateway, workers, Redis, Postgres) |\n| --- | --- | --- | --- | --- | --- | --- |\n"
    )
    for transports, label in (
        (("websocket",), "WebSocket"),
        (("sse",), "SSE"),
        (("v1",), "/v1/chat/completions"),
        (("websocket", "sse", "v1"), "all three, interleaved"),
        (("direct",), "direct (the upstream alone)"),
    ):
        cpu.start()
        samples, took, errors = await closed_loop(clients, concurrency=32, per_client=args.throughput_requests // 32, transports=transports)
        used = cpu.per_request_ms(len(samples) + errors)
        totals = [s.total_ms for s in samples]
        tokens = sorted({s.tokens for s in samples})
        out.write(
            f"| {label} | {len(samples)} | {errors} | {len(samples) / took:.0f} | {tokens[0] if len(tokens) == 1 else tokens} | {pct(totals, 0.5):.1f} / {pct(totals, 0.99):.1f} "
            f"| {cpu_cell(used)} |\n"
        )

    out.write("\nWhere the time to first token goes: each request's, on either side of the upstream's own delay.\n\n" + HOPS_HEAD + "\n".join(hops) + "\n")
    out.write("\n" + lone_outside.line("concurrency 1") + "\n")
    streamed, not_streamed = overhead_p50(lone, "v1", "direct"), overhead_p50(whole, "v1_whole", "direct_whole")
    out.write(
        f"\n`/v1/chat/completions` at concurrency 1, overhead at P50: a whole answer {not_streamed:+.2f} ms, the streamed first token "
        f"{streamed:+.2f} ms (target: whole no more than streamed + 1 ms: {'met' if not_streamed <= streamed + 1 else 'missed'}).\n"
    )
    out.write(
        "\nInside the worker, WebSocket prompts at concurrency 1 (P50 of the done events' timings): "
        + ", ".join(f"{stage} {ms:.2f} ms" for stage, ms in inside.items())
        + f" (inference: the whole upstream call, first token and the rest); rag for the tenant with a document (searched): {searched_rag:.2f} ms.\n"
    )

    def ws_p99(samples: list[Sample]) -> float:
        return pct([s.ttft_ms for s in samples if s.transport == "websocket"], 0.99)

    # Streams as a model writes them: one token every --token-interval-ms. Ten such
    # streams at once, each client starting its next as soon as one ends, against one alone.
    paced = dataclasses.replace(clients, model=PACED_MODEL)
    paced_lone, _took, paced_lone_errors = await closed_loop(paced, concurrency=1, per_client=args.paced_requests, transports=("websocket",))
    paced_ten, _took, paced_ten_errors = await closed_loop(paced, concurrency=10, per_client=args.paced_requests // 5, transports=("websocket",))
    # The same ten streams, their starts spread over one stream's length: at any moment
    # ten are in flight, and each new one starts beside nine others already streaming.
    stream_s = (args.first_token_ms + args.tokens * args.token_interval_ms) / 1000
    spread, _took, spread_errors = await closed_loop(
        paced, concurrency=10, per_client=args.paced_requests // 5, transports=("websocket",), stagger_s=stream_s / 10
    )
    out.write(
        f"\nWebSocket TTFT P99, 10 concurrent streams / one alone: back to back ({args.tokens} tokens at once, each client sending its next "
        f"prompt as soon as one ends): {ws_p99(ten):.2f} / {ws_p99(lone):.2f} ms = {ws_p99(ten) / ws_p99(lone):.2f}x; "
        f"paced streams ({args.tokens} tokens, one every {args.token_interval_ms:g} ms), the ten started together, so that each round "
        f"of ten arrives at once: {ws_p99(paced_ten):.2f} / {ws_p99(paced_lone):.2f} ms = {ws_p99(paced_ten) / ws_p99(paced_lone):.2f}x; "
        f"the ten started {stream_s * 100:.0f} ms apart (a tenth of a stream), each arriving beside nine in flight: "
        f"{ws_p99(spread):.2f} / {ws_p99(paced_lone):.2f} ms = {ws_p99(spread) / ws_p99(paced_lone):.2f}x "
        f"({len(paced_ten)}, {len(spread)} and {len(paced_lone)} streams). "
        f"Errors in the TTFT runs: {lone_errors + whole_errors + documented_errors + ten_errors + open_errors + busy_errors + paced_lone_errors + paced_ten_errors + spread_errors}.\n"
    )
    if ERRORS:
        out.write("\nWhat the failed requests said (every phase): " + "; ".join(f"{text} (x{n})" for text, n in ERRORS.most_common()) + "\n")


def one_document(gateway: str, key: str) -> None:
    """The tenant's one document (through the API), unless an earlier run added it. No
    benchmark prompt matches it: its search finds nothing, as the other tenant's would."""
    headers = {"Authorization": f"Bearer {key}"}
    if not httpx.get(f"{gateway}/api/v1/documents?limit=1", headers=headers, timeout=10).raise_for_status().json()["results"]:
        body = {"title": "Kettles", "body": "A kettle boils water for tea."}
        httpx.post(f"{gateway}/api/v1/documents", json=body, headers=headers, timeout=10).raise_for_status()


def server_command(server: str, port: int) -> list[str]:
    if server == "daphne":
        return [sys.executable, "-m", "daphne", "-v", "0", "-b", "127.0.0.1", "-p", str(port), "orchestrator_site.asgi:application"]
    return gateway_command("127.0.0.1", port, executable=(sys.executable, "-m", "uvicorn"))  # as make run starts it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", type=int, metavar="PORT", help="run only the fake upstream on this port")
    parser.add_argument("--first-token-ms", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--token-interval-ms", type=float, default=20.0, help="between the tokens of a paced stream")
    parser.add_argument(
        "--paced-requests", type=int, default=200, help="paced streams alone (ten at once: twice as many); 200: a P99 that is not just the maximum"
    )
    parser.add_argument("--requests", type=int, default=800, help="at concurrency 1, the transports in turn (200 each: a P99 that is not just the maximum)")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--throughput-requests", type=int, default=960)
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--server", choices=("uvicorn", "daphne"), default="uvicorn", help="the ASGI server of the gateway (uvicorn: as make run)")
    parser.add_argument("--worker-processes", type=int, default=2)
    parser.add_argument("--worker-threads", type=int, default=16, help="per worker: threads, or processes with --worker-pool prefork")
    parser.add_argument("--worker-pool", choices=("threads", "prefork"), default="threads", help="the real-time workers' Celery pool (threads: as make run)")
    parser.add_argument("--broker", help="the Celery broker's URL (default: a database of the suite's Redis; amqp://… for RabbitMQ)")
    args = parser.parse_args(argv)
    if args.broker:
        ENV["CELERY_BROKER_URL"] = args.broker  # the gateway's and the workers' (bench_path's ENV)
    if args.upstream:
        asyncio.run(serve_upstream(args.upstream, args.first_token_ms / 1000, args.tokens, args.token_interval_ms / 1000))
        return 0

    subprocess.run([sys.executable, "scripts/ensure_database.py"], cwd=ROOT, env=ENV, check=True)
    manage("migrate", "--no-input", "-v", "0")
    key = manage("create_tenant", "ttft-bench", "--reuse", "--key-name", "ttft").strip()
    documented_key = manage("create_tenant", "ttft-bench-documented", "--reuse", "--key-name", "ttft").strip()
    upstream_port, port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    config = Path(tempfile.mkdtemp(prefix="bench-ttft-")) / "pipeline.toml"
    write_config(upstream, config)
    ENV["PIPELINE_CONFIG"] = str(config)
    # Shared state of its own (breaker, deduplication window, limits): a circuit opened by
    # an earlier run's shutdown (its upstream stops first) must not fail this run fast.
    ENV["REDIS_KEY_PREFIX"] = f"ttft-{uuid.uuid4().hex[:8]}"
    ENV["PIPELINE_CONFIG_SCOPE"] = ENV["REDIS_KEY_PREFIX"]  # its config versions too
    procs = [
        start(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--upstream",
                str(upstream_port),
                "--first-token-ms",
                str(args.first_token_ms),
                "--tokens",
                str(args.tokens),
                "--token-interval-ms",
                str(args.token_interval_ms),
            ]
        ),
        start(server_command(args.server, port)),
    ]
    procs += [start(realtime_worker_command(f"ttft-{port}-{n}@%h", threads=args.worker_threads, pool=args.worker_pool)) for n in range(args.worker_processes)]
    gateway = f"http://127.0.0.1:{port}"
    try:
        wait_for_gateway(gateway)
        one_document(gateway, documented_key)
        time.sleep(2)  # the workers connect to the broker
        # The client (this process) and the fake upstream are counted in "all" too.
        cpu = CpuClock(
            {
                "gateway": lambda: [procs[1].pid],
                "workers": lambda: with_children([p.pid for p in procs[2:]]),
                "redis": lambda: pids_named("redis-server"),
                "postgres": lambda: pids_named("postgres"),
                "upstream": lambda: [procs[0].pid],
                "client": lambda: [os.getpid()],
            }
        )

        async def run() -> None:
            async with http_session() as http:
                await measure(Clients(gateway, upstream, key, http, tokens=args.tokens), args, cpu, documented_key=documented_key)

        sys.stdout.write(
            f"Upstream: first token after {args.first_token_ms:g} ms, then {args.tokens} tokens at once (paced: one every {args.token_interval_ms:g} ms); "
            f"platform: {args.server} + "
            f"{args.worker_processes} real-time worker(s), {args.worker_pool} pool x {args.worker_threads}.\n\n"
        )
        asyncio.run(run())
        if shutil.which("wrk"):
            sys.stdout.write("\n| throughput, 32 connections, wrk | errors | completed req/s | P50 / P99 whole response |\n| --- | --- | --- | --- |\n")
            sys.stdout.write("\n".join(wrk_rows(gateway, upstream, key, seconds=args.wrk_seconds)) + "\n")
    finally:
        stop_all(procs)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
