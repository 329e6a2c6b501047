"""The post-process filter works on a token stream: any split of a text gives the
same output as the whole text (stops and redactions across chunk borders)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import PostprocessConfig
from pipeline.stages.postprocess import TextFilter, build_filter, filter_text, filter_whole


def splits(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(text[last:p])
        last = p
    pieces.append(text[last:])
    return pieces


alphabet = st.sampled_from([*"ab @.-_xyzSTOP\n ", "sk-", "bob@ex.com", "STOP", "AKIA"])
texts = st.lists(alphabet, max_size=40).map("".join)


@settings(max_examples=300)
@given(texts, st.lists(st.integers(0, 400), max_size=12), st.booleans())
def test_any_split_gives_the_whole_text_output(text: str, cuts: list[int], trim: bool) -> None:
    config = PostprocessConfig(stop=("STOP",), trim=trim)
    whole = filter_text([text], build_filter(config, ()))
    streamed = filter_text(splits(text, cuts), build_filter(config, ()))
    assert streamed == whole
    assert filter_whole(text, build_filter(config, ())) == whole  # the post stage's path for a whole reply


def test_stop_split_across_chunks() -> None:
    f = build_filter(PostprocessConfig(stop=("<|end|>",)), ())
    out = [f.feed(p) for p in ["Hello <|", "en", "d|> ignored"]]
    assert "".join(out) + f.finish() == "Hello" and f.stopped
    assert f.feed("more") == ""


def test_email_split_across_chunks_never_leaks() -> None:
    f = build_filter(PostprocessConfig(), ())
    released = [f.feed(p) for p in ["contact jo", "hn.doe@exa", "mple.com now"]]
    released.append(f.finish())
    assert "".join(released) == "contact [REDACTED] now"
    assert not any("john" in r or "example" in r for r in released)


def test_long_key_is_held_until_it_ends() -> None:
    g = build_filter(PostprocessConfig(trim=False), ())
    key = "sk-" + "a" * 400
    out = g.feed("key " + key[:200]) + g.feed(key[200:]) + g.feed(" done") + g.finish()
    assert out == "key [REDACTED] done"


def test_without_stops_or_patterns_everything_is_released_at_once() -> None:
    f = TextFilter(stops=(), patterns=(), replacement="X", trim=False)
    assert f.feed("abc") == "abc" and f.finish() == ""


def test_text_is_released_early_when_safe() -> None:
    f = build_filter(PostprocessConfig(redact_emails=False, redact_api_keys=False, trim=False), ("STOP",))
    assert f.feed("hello world ") == "hello world "  # nothing here could begin "STOP"
    assert f.feed("and ST") == "and "  # "ST" might: held
    assert f.feed("ART ") == "START "  # it did not
    assert f.feed("then STO") == "then " and f.feed("P and more") == "" and f.stopped
    assert f.finish() == ""


def test_only_a_tail_that_could_still_match_is_held() -> None:
    f = build_filter(PostprocessConfig(trim=False), ())
    assert f.feed("mail bob") == "mail "  # "bob" may be the start of an address
    assert f.feed("@ex.com") == ""  # an address, which may still grow
    assert f.feed(".") == ""  # "bob@ex.com." may yet be "bob@ex.com.uk"
    assert f.feed(" Then") == "[REDACTED]. "  # it cannot any more; "Then" may begin another
    assert f.feed(" more") == "Then "
    assert f.finish() == "more"
