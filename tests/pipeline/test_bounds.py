"""The token bounds without a tokenizer (``pipeline.bounds``): a prompt's turns, its
prefix and its options at their UTF-8 bytes plus framing, and a cut provider's usage."""

from __future__ import annotations

import dataclasses
import json

from hypothesis import given
from hypothesis import strategies as st

from pipeline.bounds import MESSAGE_FRAMING_TOKENS, assembled_prompt_bound, message_token_bound, usage_bound
from workers.types import AssembledPrompt, ChatMessage, GenerationOptions, Usage

PROMPT = AssembledPrompt(messages=(ChatMessage("system", "sé"), ChatMessage("user", "héllo")), model="m", max_tokens=10)


def test_a_prompt_without_options_is_its_turns_bound() -> None:
    assert PROMPT.options.to_dict() == {}
    assert assembled_prompt_bound(PROMPT) == message_token_bound(PROMPT.messages)


def test_the_options_count_at_their_bytes() -> None:
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"type": "object"}}}]
    with_tools = dataclasses.replace(PROMPT, options=GenerationOptions(tools=tools))
    extra = len(json.dumps(with_tools.options.to_dict(), ensure_ascii=False).encode())
    assert assembled_prompt_bound(with_tools) == message_token_bound(PROMPT.messages) + extra and extra > len(b"m\xc3\xa9t\xc3\xa9o")


def test_the_answer_so_far_counts_as_a_turn() -> None:
    continued = dataclasses.replace(PROMPT, prefix="déjà")
    assert assembled_prompt_bound(continued) == message_token_bound((*PROMPT.messages, ChatMessage("assistant", "déjà")))
    assert assembled_prompt_bound(continued) - assembled_prompt_bound(PROMPT) >= len("déjà".encode()) + MESSAGE_FRAMING_TOKENS


@given(texts=st.lists(st.text(max_size=40), min_size=1, max_size=5))
def test_the_bound_is_never_below_the_bytes(texts: list[str]) -> None:
    messages = tuple(ChatMessage("user", t) for t in texts)
    assert message_token_bound(messages) >= sum(len(t.encode()) for t in texts) + MESSAGE_FRAMING_TOKENS * (len(texts) + 1)


def test_a_cut_providers_usage_is_bounded_by_its_bytes_and_max_tokens() -> None:
    assert usage_bound(PROMPT, "héllo") == Usage(assembled_prompt_bound(PROMPT), len("héllo".encode()))
    assert usage_bound(PROMPT, "x" * 50).completion_tokens == PROMPT.max_tokens  # never past max_tokens
