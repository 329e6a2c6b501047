"""The ``webhook`` destination, in this process against a real HTTP receiver on
loopback: the results in signed POSTs of a few lines and a ``batch.completed``
event, checked line by line against the items; a receiver that fails in the middle,
then recovers (the next attempt resumes, each message keeps its id); one that never
recovers (dead-lettered, replayed by the admin); redirects not followed; and the
URLs refused at submission and at delivery."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from batches import destinations, services, webhooks
from batches.models import BatchDelivery, BatchJob
from batches.services import Prompt, batch_create, batch_results, batch_run_chunk
from pipeline.config import get_config, set_config
from tests.batches.test_batch_services import with_batch
from tests.conftest import TenantFixture

pytestmark = pytest.mark.django_db


@dataclass
class Receiver:
    """An HTTP server on loopback that records each POST and answers from ``plan``
    (statuses, in order; 200 once it runs out)."""

    port: int = 0
    plan: list[int] = field(default_factory=list)
    posts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/batch"

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [p["body"] for p in self.posts if p["status"] == 200 and (kind is None or p["body"]["type"] == kind)]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = found.plan.pop(0) if found.plan else 200
            found.posts.append({"path": self.path, "headers": dict(self.headers), "raw": body, "body": json.loads(body), "status": status})
            self.send_response(status)
            if status in (301, 302, 307, 308):
                self.send_header("Location", f"http://127.0.0.1:{found.port}/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return None  # quiet

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    found.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield found
    server.shutdown()
    server.server_close()


@pytest.fixture
def allowed(fakes: Any, queued: list[Any], deliveries_queued: list[str]) -> Iterator[None]:
    """The suite's config with loopback allowed for webhooks, two lines a POST."""
    original = get_config()
    set_config(with_batch(webhook_allow=["127.0.0.1/32"], webhook_lines=2, delivery_attempts=3, delivery_backoff_s=10))
    yield
    set_config(original)


def completed_job(owner: TenantFixture, url: str, count: int = 5) -> BatchJob:
    prompts = [Prompt(f"line {i}", f"c-{i}") for i in range(count)]
    job = batch_create(tenant=owner.tenant, data={"prompts": prompts, "worker": "echo", "destinations": [{"kind": "webhook", "url": url}]}, config=get_config())
    batch_run_chunk(job_id=str(job.id), first=0, last=count - 1)
    job.refresh_from_db()
    assert job.status == "completed"
    return job


def verified(secret: str, post: dict[str, Any]) -> bool:
    """The receiver's check, as the Standard Webhooks libraries make it."""
    headers = {k.lower(): v for k, v in post["headers"].items()}
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + post["raw"]
    expected = base64.b64encode(hmac.new(base64.b64decode(secret.removeprefix("whsec_")), signed, hashlib.sha256).digest()).decode()
    return headers["webhook-signature"] == f"v1,{expected}"


def test_the_results_arrive_signed_a_few_lines_at_a_time_then_the_completion(owner: TenantFixture, allowed: None, receiver: Receiver) -> None:
    job = completed_job(owner, receiver.url)
    services.batch_deliver(job_id=str(job.id))
    delivery = job.deliveries.get()
    assert (delivery.state, delivery.attempts, delivery.lines) == ("delivered", 1, 5)
    assert [len(e["data"]["lines"]) for e in receiver.events("batch.results")] == [2, 2, 1]
    lines = [line for event in receiver.events("batch.results") for line in event["data"]["lines"]]
    assert lines == batch_results(job=job, after=-1, limit=10)  # line by line, the items' results
    (done,) = receiver.events("batch.completed")
    assert done["data"]["job_id"] == str(job.id) and done["data"]["lines"] == 5 and done["data"]["counts"]["done"] == 5
    secret = owner.client.get("/api/v1/batch/webhook-secret").json()["secret"]
    assert secret.startswith("whsec_") and all(verified(secret, post) for post in receiver.posts)
    assert not verified("whsec_" + base64.b64encode(b"x" * 24).decode(), receiver.posts[0])
    ids = [p["headers"]["webhook-id"] for p in receiver.posts]
    assert len(set(ids)) == 4 and ids[-1].endswith("_completed") and all(p["path"] == "/hooks/batch" for p in receiver.posts)
    assert all(p["headers"]["Host"] == f"127.0.0.1:{receiver.port}" for p in receiver.posts)


def test_a_receiver_failing_midway_is_resumed_where_it_stopped(owner: TenantFixture, allowed: None, receiver: Receiver) -> None:
    receiver.plan = [200, 500]  # the second POST fails once
    job = completed_job(owner, receiver.url)
    (tried,) = destinations.deliver(job, get_config())
    assert (tried.state, tried.attempts, tried.lines) == ("pending", 1, 2) and tried.error["data"]["reason"] == "HTTP 500"
    assert tried.next_attempt_at is not None and job.status == "completed"  # the job does not fail
    (again,) = destinations.deliver(job, get_config(), now=tried.next_attempt_at)
    assert (again.state, again.attempts, again.lines) == ("delivered", 2, 5)
    ids = [p["headers"]["webhook-id"] for p in receiver.posts]
    assert ids[1] == ids[2]  # the refused message again, with its id: a receiver that took it drops the repeat
    assert [e["data"]["lines"][0]["index"] for e in receiver.events("batch.results")] == [0, 2, 4]  # each taken once


def test_a_receiver_that_never_recovers_is_dead_lettered_then_replayed(owner: TenantFixture, allowed: None, receiver: Receiver, staff: Any) -> None:
    receiver.plan = [503] * 3
    job = completed_job(owner, receiver.url, count=2)
    now = None
    for _ in range(3):
        (tried,) = destinations.deliver(job, get_config(), now=now)
        now = tried.next_attempt_at
    assert (tried.state, tried.attempts) == ("failed", 3) and tried.error["code"] == "delivery_failed"
    page = staff.get(f"/admin/batches/batchjob/{job.id}/change/").content.decode()
    assert "webhook" in page and "failed" in page and "HTTP 503" in page
    assert f"<td>{receiver.url}</td>" in page  # where it goes
    staff.post("/admin/batches/batchjob/", {"action": "retry_deliveries", "_selected_action": [str(job.id)]})
    services.batch_deliver(job_id=str(job.id))
    assert job.deliveries.get().state == "delivered" and len(receiver.events("batch.results")) == 1


def test_a_redirect_is_not_followed(owner: TenantFixture, allowed: None, receiver: Receiver) -> None:
    receiver.plan = [302]
    job = completed_job(owner, receiver.url, count=1)
    (tried,) = destinations.deliver(job, get_config())
    assert tried.state == "pending" and "redirect is not followed" in tried.error["data"]["reason"]
    assert [p["path"] for p in receiver.posts] == ["/hooks/batch"]  # /elsewhere never asked


def test_an_address_no_longer_allowed_is_refused_at_delivery(owner: TenantFixture, allowed: None, receiver: Receiver) -> None:
    job = completed_job(owner, receiver.url, count=1)
    set_config(with_batch(webhook_allow=[]))  # the operator took loopback off the list since
    (tried,) = destinations.deliver(job, get_config())
    assert tried.state == "pending" and "127.0.0.1, which is not public" in tried.error["message"] and receiver.posts == []


def test_a_receiver_that_is_gone_fails_the_attempt(owner: TenantFixture, allowed: None, receiver: Receiver) -> None:
    from tests.conftest import free_port

    job = completed_job(owner, f"http://127.0.0.1:{free_port()}/nobody", count=1)
    (tried,) = destinations.deliver(job, get_config())
    assert tried.state == "pending" and tried.error["data"]["reason"].startswith("ConnectError")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1:9/x", "127.0.0.1, which is not public"),
        ("http://localhost/x", "which is not public"),
        ("http://10.1.2.3/x", "10.1.2.3, which is not public"),
        ("http://192.168.0.7/x", "which is not public"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254, which is not public"),  # the cloud metadata service
        ("http://[::1]/x", "::1, which is not public"),
        ("http://[fd00:ec2::254]/x", "which is not public"),
        ("http://0.0.0.0/x", "which is not public"),
        ("http://224.0.0.1/x", "which is not public"),
        ("ftp://example.com/x", "http:// or https://"),
        ("not a url", "http:// or https://"),
        ("https://user:pw@example.com/x", "credentials"),
        ("https://no-such-host.invalid/x", "does not resolve"),
        ("http://example.com:99999/x", "does not resolve"),
        (42, "http(s) URL"),
    ],
)
def test_urls_that_are_not_public_are_refused_at_submission(owner: TenantFixture, fakes: Any, url: object, words: str) -> None:
    body = {"prompts": ["p"], "destinations": [{"kind": "webhook", "url": url}]}
    resp = owner.client.post("/api/v1/batch", body, format="json")
    assert resp.status_code == 400, resp.content
    error = resp.json()["error"]
    assert error["data"]["field"] == "destinations[0].url" and words in error["message"], error
    assert not BatchJob.objects.exists()


def test_an_allowed_network_and_a_public_address_are_taken(owner: TenantFixture, allowed: None) -> None:
    assert webhooks.checked_url("http://127.0.0.1:8080/x", get_config())[1].exploded == "127.0.0.1"
    assert str(webhooks.checked_url("https://93.184.215.14/hook", get_config())[1]) == "93.184.215.14"  # a public address, not resolved
    with pytest.raises(ValueError, match=r"10\.0\.0\.1, which is not public"):
        webhooks.checked_url("http://10.0.0.1/", get_config())
    resp = owner.client.post(
        "/api/v1/batch", {"prompts": ["p"], "destinations": [{"kind": "webhook", "url": "http://127.0.0.1:1/x", "secret": "s"}]}, format="json"
    )
    assert resp.status_code == 400 and resp.json()["error"]["data"]["field"] == "destinations[0].secret"


def test_the_secret_is_made_once_per_tenant(owner: TenantFixture, outsider: TenantFixture) -> None:
    first = owner.client.get("/api/v1/batch/webhook-secret").json()["secret"]
    assert owner.client.get("/api/v1/batch/webhook-secret").json()["secret"] == first
    assert outsider.client.get("/api/v1/batch/webhook-secret").json()["secret"] != first
    assert len(base64.b64decode(first.removeprefix("whsec_"))) == 24


def test_the_allow_list_takes_networks_only() -> None:
    from pydantic import ValidationError

    from pipeline.config import BatchConfig

    assert BatchConfig(webhook_allow=["10.0.0.0/8", "127.0.0.1", "::1/128"]).webhook_allow == ["10.0.0.0/8", "127.0.0.1", "::1/128"]
    with pytest.raises(ValidationError, match="'intranet' is not a network"):
        BatchConfig(webhook_allow=["intranet"])


def test_a_retried_jobs_webhook_starts_again_from_the_first_line(owner: TenantFixture, allowed: None, receiver: Receiver) -> None:
    job = completed_job(owner, receiver.url, count=3)
    services.batch_deliver(job_id=str(job.id))
    assert BatchDelivery.objects.get(job=job).lines == 3
    job.items.filter(index=1).update(status="failed", attempts=1, output="", error={"code": "worker_timeout", "message": "late", "data": {}})
    BatchJob.objects.filter(pk=job.pk).update(items_done=2, items_failed=1)
    assert services.batch_retry_failed(job_id=job.id) == 1 and BatchDelivery.objects.get(job=job).lines == 0


def test_the_signature_is_the_standard_webhooks_one() -> None:
    # The specification's own example (standard-webhooks, "Signature scheme"): secret, id, timestamp, payload.
    secret, message_id, stamp = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330
    assert webhooks.signature(secret, message_id, stamp, b'{"test": 2432232314}') == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert webhooks.signature(secret, message_id, stamp + 1, b'{"test": 2432232314}') != "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_an_ipv6_receiver_is_reached_at_its_checked_address(owner: TenantFixture, allowed: None) -> None:
    set_config(with_batch(webhook_allow=["::1/128"], webhook_lines=2))
    url, address = webhooks.checked_url("http://[::1]:8/hook", get_config())
    assert (url, address.version) == ("http://[::1]:8/hook", 6)
    job = completed_job(owner, url, count=1)
    (tried,) = destinations.deliver(job, get_config())  # nobody listens there: refused by the address, not by the check
    assert tried.state == "pending" and tried.error["data"]["reason"].startswith("ConnectError")


def test_the_job_shows_its_webhook_and_how_its_delivery_stands(owner: TenantFixture, allowed: None, receiver: Receiver) -> None:
    receiver.plan = [500]
    job = completed_job(owner, receiver.url, count=1)
    services.batch_deliver(job_id=str(job.id))
    (shown,) = owner.client.get(f"/api/v1/batch/{job.id}").json()["destinations"]
    assert (shown["kind"], shown["url"], shown["state"], shown["attempts"], shown["lines"]) == ("webhook", receiver.url, "pending", 1, 0)
    assert shown["error"]["code"] == "delivery_failed" and shown["error"]["data"]["kind"] == "webhook"
