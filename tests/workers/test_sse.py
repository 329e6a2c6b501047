"""The SSE parser follows the event-stream format: fields, multi-line data, comments, dispatch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hypothesis import given
from hypothesis import strategies as st

from workers.sse import SseEvent, SseParser, aiter_sse


def parse(text: str) -> list[SseEvent]:
    async def lines() -> AsyncIterator[str]:
        for line in text.split("\n"):
            yield line

    async def run() -> list[SseEvent]:
        return [e async for e in aiter_sse(lines())]

    return asyncio.run(run())


def test_plain_data_events() -> None:
    assert parse("data: a\n\ndata: b\n\n") == [SseEvent("message", "a"), SseEvent("message", "b")]


def test_named_events_and_ids() -> None:
    events = parse("event: message_start\nid: 7\ndata: {}\n\n")
    assert events == [SseEvent("message_start", "{}", "7")]


def test_multi_line_data_is_joined_with_newlines() -> None:
    assert parse("data: one\ndata: two\n\n")[0].data == "one\ntwo"


def test_comments_and_unknown_fields_are_ignored() -> None:
    assert parse(": keep-alive\nretry: 100\nfoo: bar\ndata: x\n\n") == [SseEvent("message", "x")]


def test_only_one_leading_space_is_stripped() -> None:
    assert parse("data:  two spaces\n\ndata:none\n\n") == [SseEvent("message", " two spaces"), SseEvent("message", "none")]


def test_crlf_line_endings() -> None:
    assert parse("data: a\r\n\r\n") == [SseEvent("message", "a")]


def test_trailing_event_without_blank_line_is_dropped() -> None:
    assert parse("data: complete\n\ndata: partial") == [SseEvent("message", "complete")]


def test_blank_lines_alone_dispatch_nothing() -> None:
    parser = SseParser()
    assert parser.feed_line("") is None
    assert parser.feed_line("") is None


def test_field_without_colon_and_id_with_nul() -> None:
    parser = SseParser()
    assert parser.feed_line("data") is None  # a field named "data" with an empty value
    assert parser.feed_line("id: a\0b") is None  # ignored, as the spec says
    assert parser.feed_line("") == SseEvent("message", "", None)


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=30), min_size=1, max_size=8))
def test_any_data_lines_round_trip(payloads: list[str]) -> None:
    text = "".join(f"data: {p}\n\n" for p in payloads)
    assert [e.data for e in parse(text)] == payloads
