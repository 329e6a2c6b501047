"""The deduplication key: a hash of the tenant and everything in a request that can change its answer.

Left out, because they cannot change the answer: the request id and the
metadata; the order of the stop sequences. Kept exactly (no case or space
folding): the prompt, since a model may answer "Hi" and "hi " differently.
The session id is in, since the session's history is part of the prompt.
The version prefix changes when this definition does.
"""

from __future__ import annotations

import hashlib
import json

from pipeline.types import PromptRequest

KEY_VERSION = 1


def normalised(request: PromptRequest) -> dict[str, object]:
    return {
        "v": KEY_VERSION,
        "tenant": request.tenant_id,
        "session": request.session_id,
        "prompt": request.prompt,
        "worker": request.worker,
        "model": request.model,
        "max_tokens": request.max_tokens,
        "temperature": None if request.temperature is None else float(request.temperature),
        "stop": sorted(set(request.stop)),
    }


def dedup_key(request: PromptRequest) -> str:
    canonical = json.dumps(normalised(request), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()
