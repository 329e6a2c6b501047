"""vLLM's OpenAI-compatible server: the OpenAI protocol with ``max_tokens``, and a
partial answer continued (``continue_final_message``)."""

from __future__ import annotations

from typing import Any

from workers.openai import OpenAIWorker
from workers.types import AssembledPrompt


class VllmWorker(OpenAIWorker):
    max_tokens_field = "max_tokens"
    continues_prefix = True

    def body(self, prompt: AssembledPrompt, *, stream: bool) -> dict[str, Any]:
        body = super().body(prompt, stream=stream)
        if prompt.prefix:
            # The chat template ends on the assistant's open turn, which the model continues.
            body.update(continue_final_message=True, add_generation_prompt=False)
        return body
