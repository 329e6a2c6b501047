"""Server-sent events parsing (the WHATWG event-stream format) over text lines."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass


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


async def aiter_sse(lines: AsyncIterator[str]) -> AsyncIterator[SseEvent]:
    """Events from an async iterator of lines. A trailing event with no blank line is dropped (spec)."""
    parser = SseParser()
    async for line in lines:
        event = parser.feed_line(line.rstrip("\r"))
        if event is not None:
            yield event


async def read_to_end(rest: AsyncIterator[SseEvent]) -> None:
    """What follows a stream's final event: by the protocols, nothing but the body's
    end (HTTP/1.1's last, empty chunk). It is read, not left: httpx puts a connection
    back in its pool only once the response has been read to its end, and closes it
    otherwise, so each stream would pay a new TCP (and, to a provider, TLS) handshake
    before its first token."""
    async for _ in rest:
        pass
