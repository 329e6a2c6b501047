"""The SSE parser follows the event-stream format: fields, multi-line data, comments, dispatch."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers import sse
from workers.sse import MAX_LINE_BYTES, SseEvent, SseParser, aiter_lines, aiter_sse


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


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n"), max_size=30), min_size=1, max_size=8))
def test_any_data_lines_round_trip(payloads: list[str]) -> None:
    text = "".join(f"data: {p}\n\n" for p in payloads)
    assert [e.data for e in parse(text)] == payloads


def lines_of(chunks: Iterable[bytes]) -> list[str]:
    async def feed() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    async def run() -> list[str]:
        return [line async for line in aiter_lines(feed())]

    return asyncio.run(run())


@given(
    st.lists(
        st.tuples(
            st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=12), st.sampled_from(["\n", "\r\n", "\r"])
        ),
        max_size=8,
    ),
    st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=5),
    st.lists(st.integers(min_value=0, max_value=200), max_size=10),
)
def test_lines_of_a_body_cut_anywhere(lines: list[tuple[str, str]], last: str, cuts: list[int]) -> None:
    """Any mix of CRLF, LF and lone CR, any UTF-8 text, the bytes cut at any points (a
    CRLF or a character split across two chunks): the same lines as the whole body."""
    body = ("".join(text + end for text, end in lines) + last).encode()
    points = sorted({min(c, len(body)) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    whole = re.split("\r\n|\r|\n", body.decode())  # a lone CR followed by an LF is one CRLF
    expected = whole if whole[-1] else whole[:-1]
    assert lines_of(chunks) == expected


def test_a_crlf_split_across_chunks_is_one_line_end() -> None:
    assert lines_of([b"data: a\r", b"\n\r", b"\ndata: b\r", b"\r"]) == ["data: a", "", "data: b", ""]


def test_a_line_beyond_the_bound_is_refused() -> None:
    with pytest.raises(ValueError, match=re.escape(f"longer than {MAX_LINE_BYTES} bytes")):
        lines_of([b"data: ", b"x" * MAX_LINE_BYTES])
    assert lines_of([b"data: " + b"x" * (MAX_LINE_BYTES - 6), b"\n"]) == ["data: " + "x" * (MAX_LINE_BYTES - 6)]


def test_a_long_line_in_many_chunks_is_scanned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A line that arrives in many chunks is split once, when its end comes: scanning it
    again with every chunk was quadratic (a 4 MB line in 250 chunks: 5 s of a worker's
    GIL against 0.04)."""
    scanned: list[int] = []
    real = sse._LINE_END

    class Counting:
        def split(self, data: bytes) -> list[bytes]:
            scanned.append(len(data))
            return real.split(data)

    monkeypatch.setattr(sse, "_LINE_END", Counting())
    chunks = [b"data: "] + [b"x" * 1000] * 200 + [b"\r", b"\ndata: y\n\n"]
    assert lines_of(chunks) == ["data: " + "x" * 200_000, "data: y", ""]
    assert sum(scanned) < 2 * sum(map(len, chunks))  # each byte about once (a CR held back is looked at twice)
