"""Property tests: the deduplication key and the retry backoff."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys

from hypothesis import assume, given
from hypothesis import strategies as st

from pipeline.resilience.backoff import BackoffPolicy, backoff_ceiling, retry_delay
from pipeline.resilience.dedup import dedup_key
from pipeline.types import PromptRequest
from tests.conftest import ROOT

text = st.text(max_size=20)
requests = st.builds(
    PromptRequest,
    request_id=text,
    tenant_id=text,
    session_id=text,
    prompt=text,
    worker=text,
    model=text,
    max_tokens=st.integers(1, 4096),
    temperature=st.none() | st.floats(0, 2),
    stop=st.lists(st.text(min_size=1, max_size=5), max_size=3).map(tuple),
    metadata=st.dictionaries(text, text, max_size=2),
)


@given(requests, text, st.dictionaries(text, text, max_size=2), st.randoms())
def test_equal_requests_give_equal_keys(request: PromptRequest, other_id: str, other_metadata: dict, rnd: random.Random) -> None:
    stops = list(request.stop)
    rnd.shuffle(stops)
    # A session the client did not name is the request's own: the twin's is its own too
    # (and a named one cannot be the twin's fresh request id).
    implicit = request.session_id == request.request_id
    assume(implicit or other_id != request.session_id)
    session = other_id if implicit else request.session_id
    twin = dataclasses.replace(request, request_id=other_id, session_id=session, metadata=other_metadata, stop=tuple(stops))
    assert dedup_key(twin) == dedup_key(request)


ANSWER_FIELDS = ["tenant_id", "session_id", "prompt", "worker", "model", "max_tokens", "temperature", "stop", "config_version", "seed"]


@given(requests, st.sampled_from(ANSWER_FIELDS), st.data())
def test_any_difference_that_changes_the_answer_changes_the_key(request: PromptRequest, field: str, data: st.DataObject) -> None:
    current = getattr(request, field)
    if field in ("max_tokens", "config_version", "seed"):
        new = data.draw(st.integers(1, 4096).filter(lambda v: v != current))
    elif field == "temperature":
        new = data.draw((st.none() | st.floats(0, 2)).filter(lambda v: v != current))
    elif field == "stop":
        new = data.draw(st.lists(st.text(min_size=1, max_size=5), max_size=3).map(tuple).filter(lambda v: set(v) != set(current)))
    elif field == "session_id":
        # A session named by the client: one equal to the request's id is no session at all.
        new = data.draw(text.filter(lambda v: v not in (current, request.request_id)))
        assume(current != request.request_id)
    else:
        new = data.draw(text.filter(lambda v: v != current))
    assert dedup_key(dataclasses.replace(request, **{field: new})) != dedup_key(request)


def test_keys_are_stable_across_processes_and_releases() -> None:
    request = PromptRequest(
        request_id="r", tenant_id="t", session_id="s", prompt="héllo", worker="echo", model="echo-1", max_tokens=16, temperature=0.5, stop=("b", "a")
    )
    code = (
        "from pipeline.resilience.dedup import dedup_key; from pipeline.types import PromptRequest; "
        "print(dedup_key(PromptRequest(request_id='other', tenant_id='t', session_id='s', prompt='héllo', worker='echo', model='echo-1', max_tokens=16, temperature=0.5, stop=('a', 'b'))))"
    )
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert other.stdout.strip() == dedup_key(request)
    # Pinned: a change here invalidates every key in Redis; bump KEY_VERSION with it.
    assert dedup_key(request) == GOLDEN


GOLDEN = "bf6a4f11e045f5d5cad925b355419c5695ce95d61d881ac4d79c7a8ecca95046"  # KEY_VERSION 5


policies = st.builds(BackoffPolicy, base_s=st.floats(0.001, 5), max_s=st.floats(0.01, 60), attempts=st.integers(1, 10), retry_after_cap_s=st.floats(0, 120))


@given(policies, st.integers(0, 200), st.randoms())
def test_backoff_stays_within_zero_and_the_ceiling(policy: BackoffPolicy, attempt: int, rnd: random.Random) -> None:
    delay = retry_delay(policy, attempt, retry_after=None, rng=rnd)
    if attempt + 1 >= policy.attempts:
        assert delay is None
    else:
        assert delay is not None and 0.0 <= delay <= backoff_ceiling(policy, attempt) <= policy.max_s


@given(policies, st.integers(0, 200))
def test_the_ceiling_doubles_until_the_maximum(policy: BackoffPolicy, attempt: int) -> None:
    ceiling, following = backoff_ceiling(policy, attempt), backoff_ceiling(policy, attempt + 1)
    assert following == min(policy.max_s, ceiling * 2) or following == policy.max_s or attempt >= 64


@given(policies, st.floats(-10, 10_000), st.randoms())
def test_retry_after_is_honoured_up_to_the_cap(policy: BackoffPolicy, retry_after: float, rnd: random.Random) -> None:
    delay = retry_delay(dataclasses.replace(policy, attempts=max(policy.attempts, 2)), 0, retry_after=retry_after, rng=rnd)
    assert delay == min(max(retry_after, 0.0), policy.retry_after_cap_s)


def test_full_jitter_spreads_over_the_whole_range() -> None:
    rnd = random.Random(7)
    delays = [retry_delay(BackoffPolicy(base_s=1, max_s=8, attempts=5), 3, retry_after=None, rng=rnd) for _ in range(2000)]
    assert min(d for d in delays if d is not None) < 0.1 and max(d for d in delays if d is not None) > 7.9


def test_requests_without_a_session_of_their_own_meet() -> None:
    def stateless(request_id: str) -> PromptRequest:
        return PromptRequest(request_id=request_id, tenant_id="t", session_id=request_id, prompt="p", worker="echo", model="echo-1", max_tokens=8)

    assert dedup_key(stateless("r1")) == dedup_key(stateless("r2"))  # implicit sessions have no history
    named = dataclasses.replace(stateless("r3"), session_id="conversation-7")
    assert dedup_key(named) != dedup_key(stateless("r1"))  # a named session's turns are part of the prompt
