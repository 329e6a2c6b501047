from __future__ import annotations

import io
from collections.abc import Mapping
from typing import IO, Any

from rest_framework.parsers import JSONParser

from orchestrator_site.errors import PromptTooLarge
from pipeline.config import get_config


def body_limit() -> int:
    # A prompt of max_prompt_chars characters takes at most 4 bytes each in UTF-8
    # (6 as a JSON \\u escape), plus room for the other fields.
    return get_config().limits.max_prompt_chars * 6 + 64 * 1024


class LimitedJSONParser(JSONParser):
    """JSON, read with a size cap so that a huge body is refused before it is held in memory."""

    def limit(self) -> int:
        return body_limit()

    def parse(self, stream: IO[Any], media_type: str | None = None, parser_context: Mapping[str, Any] | None = None) -> Any:
        limit = self.limit()
        raw = stream.read(limit + 1) if stream is not None else b""
        if len(raw) > limit:
            raise PromptTooLarge(f"request body is larger than {limit} bytes")
        return super().parse(io.BytesIO(raw), media_type, parser_context)
