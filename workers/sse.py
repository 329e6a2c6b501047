"""Server-sent events parsing (the WHATWG event-stream format): a body's bytes into
lines, lines into events."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

# A line ends at CRLF, LF or a lone CR (the spec allows all three).
_LINE_END = re.compile(rb"\r\n|\r|\n")
MAX_LINE_BYTES = 4 * 1024 * 1024  # one event's line beyond this is not a provider's stream


@dataclass(frozen=True)
class SseEvent:
    event: str
    data: str
    id: str | None = None


class SseParser:
    """Feed it lines (without their line ending); it returns an event at each blank line."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed_line(self, line: str) -> SseEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None  # comment / keep-alive
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        # "retry" and unknown fields are ignored, as the spec says.
        return None

    def _dispatch(self) -> SseEvent | None:
        if not self._data and not self._event:
            return None
        event = SseEvent(event=self._event or "message", data="\n".join(self._data), id=self._id)
        self._event = ""
        self._data = []
        return event


async def aiter_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The lines of a body that arrives in chunks cut anywhere (a CRLF, or a UTF-8
    character, split across two). A last line without its line end is yielded too.
    A line longer than ``MAX_LINE_BYTES`` raises ``ValueError`` (a malformed response)."""
    pending = bytearray()  # the line so far: appended to in place, not copied per chunk
    async for chunk in chunks:
        held_cr = pending.endswith(b"\r")
        pending += chunk
        # Only a chunk with a line end (or after a held CR) is split: a long line arriving in
        # many chunks is not scanned again with each one.
        if held_cr or b"\n" in chunk or b"\r" in chunk:
            # A CR at the end may be the first half of a CRLF: it waits for the next chunk.
            cut = len(pending) - 1 if pending.endswith(b"\r") else len(pending)
            *lines, rest = _LINE_END.split(pending[:cut])
            pending = bytearray(rest + pending[cut:])
            for line in lines:
                yield line.decode("utf-8", "replace")
        if len(pending) > MAX_LINE_BYTES:
            raise ValueError(f"an event-stream line longer than {MAX_LINE_BYTES} bytes")
    if pending:
        yield pending.rstrip(b"\r").decode("utf-8", "replace")


async def aiter_sse(lines: AsyncIterator[str]) -> AsyncIterator[SseEvent]:
    """Events from an async iterator of lines. A trailing event with no blank line is dropped (spec)."""
    parser = SseParser()
    async for line in lines:
        event = parser.feed_line(line.rstrip("\r"))
        if event is not None:
            yield event


async def read_to_end(rest: AsyncIterator[SseEvent]) -> None:
    """What follows a stream's final event: by the protocols, nothing but the body's
    end (HTTP/1.1's last, empty chunk). It is read, not left: the HTTP client puts a
    connection back in its pool only once the response has been read to its end, and
    closes it otherwise, so each stream would pay a new TCP (and, to a provider, TLS)
    handshake before its first token."""
    async for _ in rest:
        pass
