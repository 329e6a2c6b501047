"""vLLM's OpenAI-compatible server: the OpenAI protocol with ``max_tokens``."""

from __future__ import annotations

from workers.openai import OpenAIWorker


class VllmWorker(OpenAIWorker):
    max_tokens_field = "max_tokens"
