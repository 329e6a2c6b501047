"""Arbitrary JSON bodies at POST /api/v1/infer never get a 5xx."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Fakes, TenantFixture, WorkerProcess

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
fields = st.sampled_from(["prompt", "session_id", "worker", "model", "max_tokens", "temperature", "stop", "metadata", "wait", "stream", "extra"])
# Bodies that look like ours (known keys, arbitrary values), and anything else JSON can be.
bodies = (
    st.dictionaries(fields, values, max_size=8)
    | st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=50)},
        optional={
            "wait": st.booleans(),
            "worker": st.sampled_from(["echo", "openai", "nope"]),
            "max_tokens": st.integers(-5, 10_000),
            "stop": st.lists(st.text(max_size=70), max_size=6),
        },
    )
    | values
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies)
def test_arbitrary_json_never_gets_a_5xx(owner: TenantFixture, realtime_worker: WorkerProcess, fakes: Fakes, body: object) -> None:
    resp = owner.client.generic("POST", "/api/v1/infer", json.dumps(body), content_type="application/json")
    assert resp.status_code < 500, (body, resp.content)
    payload = resp.json()
    if resp.status_code >= 400:
        assert set(payload) == {"error"} and payload["error"]["code"]
    else:
        assert payload["status"] in ("completed", "queued")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_never_get_a_5xx(owner: TenantFixture, raw: bytes) -> None:
    resp = owner.client.generic("POST", "/api/v1/infer", raw, content_type="application/json")
    assert resp.status_code < 500, raw
