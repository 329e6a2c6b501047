"""Post-process: stop sequences, redaction and trimming, over a stream of text pieces.

``TextFilter.feed`` takes pieces as they arrive and returns what is safe to
release; ``finish`` returns the rest. It holds back just enough text that a
stop sequence or a redaction match split across pieces is still caught, so
the output for any split of a text equals the output for the whole text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

import regex

from pipeline.config import PostprocessConfig, RedactionPattern
from pipeline.stages.context import StageContext, require_completion

EMAIL = RedactionPattern(name="email", pattern=r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", max_length=254)
API_KEY = RedactionPattern(
    name="api_key",
    pattern=r"\b(?:sk|pk|rk|po)[-_][A-Za-z0-9_-]{16,}|\bAKIA[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{30,}|\bxox[abposr]-[A-Za-z0-9-]{10,}",
    max_length=256,
)


def patterns_for(config: PostprocessConfig) -> tuple[RedactionPattern, ...]:
    builtin = ([EMAIL] if config.redact_emails else []) + ([API_KEY] if config.redact_api_keys else [])
    return (*builtin, *config.patterns)


@dataclass(frozen=True)
class FilterResult:
    text: str
    stopped: bool


class TextFilter:
    def __init__(self, *, stops: Iterable[str], patterns: Iterable[RedactionPattern], replacement: str, trim: bool) -> None:
        self._stops = tuple(s for s in stops if s)
        combined = "|".join(f"(?:{p.pattern})" for p in patterns)
        # The standard engine finds and replaces matches (it is the faster one); the
        # ``regex`` module only answers "could more text still make a match here?"
        # (partial matches), so that just such a tail is held back while streaming.
        self._regex = re.compile(combined) if combined else None
        self._partial = regex.compile(combined) if combined else None
        self._replacement = replacement
        self._trim = trim
        self._raw = ""  # text received but not yet released
        self._pending_space = ""  # trailing whitespace held until more text follows (trim)
        self._started = not trim
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self._raw += piece
        if self._cut_at_stop():
            return self._release(len(self._raw))
        return self._release(self._safe_cut())

    def feed_last(self, piece: str) -> str:
        """``feed(piece) + finish()`` for a whole reply, without the streaming checks."""
        if not self.stopped:
            self._raw += piece
            self._cut_at_stop()
        return self.finish()

    def finish(self) -> str:
        out = self._release(len(self._raw))
        self._pending_space = ""  # trailing whitespace dropped when trimming
        return out

    def _cut_at_stop(self) -> bool:
        hits = [i for i in (self._raw.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._raw = self._raw[: min(hits)]
            self.stopped = True
        return self.stopped

    def _safe_cut(self) -> int:
        """Where the released text may end: before any tail that is the beginning of a
        stop sequence, and before the first match that more text could still change
        (a partial match at the end, or a complete one that could grow to reach it).
        A match that could not is final."""
        raw = self._raw
        cut = len(raw) - self._stop_prefix(raw)
        if self._regex is None or self._partial is None:
            return cut
        settled = 0
        for match in self._regex.finditer(raw):
            # Held from its start if more text could still make a (longer) match there:
            # "a@b.co" followed by "." may yet become "a@b.co.uk".
            if match.end() >= len(raw) or self._partial.fullmatch(raw, pos=match.start(), partial=True):
                return min(cut, match.start())
            settled = match.end()
        tail = self._partial.search(raw, pos=settled, partial=True)  # the beginning of a match, cut short
        if tail is not None and tail.partial:
            cut = min(cut, tail.start())
        return max(cut, 0)

    def _stop_prefix(self, raw: str) -> int:
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(raw)), longest, -1):
                if raw.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _release(self, cut: int) -> str:
        head, self._raw = self._raw[:cut], self._raw[cut:]
        if self._regex is not None:
            head = self._regex.sub(self._replacement, head)
        return self._trimmed(head)

    def _trimmed(self, text: str) -> str:
        if not self._trim:
            return text
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        body = text.rstrip()
        if not body:
            self._pending_space += text
            return ""
        out = self._pending_space + body
        self._pending_space = text[len(body) :]
        return out


def filter_whole(text: str, text_filter: TextFilter) -> FilterResult:
    out = text_filter.feed_last(text)
    return FilterResult(text=out, stopped=text_filter.stopped)


def filter_text(pieces: Iterable[str], text_filter: TextFilter) -> FilterResult:
    out = "".join(text_filter.feed(p) for p in pieces) + text_filter.finish()
    return FilterResult(text=out, stopped=text_filter.stopped)


def build_filter(config: PostprocessConfig, request_stops: Iterable[str]) -> TextFilter:
    return TextFilter(stops=(*config.stop, *request_stops), patterns=patterns_for(config), replacement=config.replacement, trim=config.trim)


def postprocess(ctx: StageContext, *, config: PostprocessConfig) -> StageContext:
    completion = require_completion(ctx)
    result = filter_whole(completion.text, build_filter(config, ctx.request.stop))
    return replace(ctx, output=result.text, finish_reason="stop" if result.stopped else completion.finish_reason)
