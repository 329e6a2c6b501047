"""How many tokens a prompt or an answer has, at most, without a tokenizer.

No tokenizer in use makes more tokens of a text than it has UTF-8 bytes (byte-level
BPE, and SentencePiece with byte fallback, both emit at most one token per byte),
and each chat message adds a few tokens of its own framing. A budget reserves at
these bounds (``services.budgets``); a provider's part of an answer that ended
before the provider said its usage is counted at them (``stages.streamed``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from workers.types import AssembledPrompt, ChatMessage, Usage

MESSAGE_FRAMING_TOKENS = 8  # a chat message's role and separators, in any provider's format, at most


def message_token_bound(messages: Iterable[ChatMessage]) -> int:
    return sum(len(json.dumps(m.to_dict(), ensure_ascii=False).encode()) + MESSAGE_FRAMING_TOKENS for m in messages) + MESSAGE_FRAMING_TOKENS


def assembled_prompt_bound(prompt: AssembledPrompt) -> int:
    """The prompt tokens of an assembled prompt, at most: its turns (the answer so far
    included, on a failover), tools and options."""
    options = prompt.options.to_dict()
    return message_token_bound(prompt.turns) + (len(json.dumps(options, ensure_ascii=False).encode()) if options else 0)


def usage_bound(prompt: AssembledPrompt, written: str) -> Usage:
    """The usage of a provider's call that ended without saying it: the prompt at its
    bound, and what it wrote at its bytes (never more than ``max_tokens``)."""
    return Usage(assembled_prompt_bound(prompt), min(len(written.encode()), prompt.max_tokens))
