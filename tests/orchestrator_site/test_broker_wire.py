"""What a real-time task looks like on the broker: JSON, on the `realtime` queue."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection

from orchestrator_site.celery import app
from pipeline.tasks import run_realtime

BROKER = "redis://127.0.0.1:6379/10"


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(BROKER)
    client.delete("realtime", "batch.default", "celery")
    yield client
    client.delete("realtime", "batch.default", "celery")
    client.close()


def test_realtime_task_is_a_json_message_on_the_realtime_list(broker: redis.Redis) -> None:
    payload = {"request_id": "r1", "prompt": "p"}
    with Connection(BROKER) as conn:
        run_realtime.apply_async(args=(payload,), connection=conn)
    assert broker.llen("realtime") == 1 and broker.llen("celery") == 0
    message = json.loads(broker.lindex("realtime", 0))
    assert message["content-type"] == "application/json" and message["headers"]["task"] == "pipeline.tasks.run_realtime"
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert args == [payload] and kwargs == {}
    assert message["properties"]["delivery_info"]["routing_key"] == "realtime"


def test_unrouted_tasks_go_to_batch_default(broker: redis.Redis) -> None:
    with Connection(BROKER) as conn:
        app.send_task("batches.tasks.not_yet_written", args=(1,), connection=conn)
    assert broker.llen("batch.default") == 1 and broker.llen("celery") == 0


def test_the_same_message_over_rabbitmq_lands_on_a_durable_realtime_queue() -> None:
    amqp = "amqp://guest:guest@127.0.0.1:5672//"
    with Connection(amqp) as conn:
        channel = conn.channel()
        for queue in app.conf.task_queues:  # declare (idempotent) so that a first-ever run has them
            queue.bind(channel).declare()
        channel.queue_purge("realtime")
        run_realtime.apply_async(args=({"request_id": "amqp-1"},), connection=conn)
        # The publish went out on the producer's channel, this count comes on another:
        # RabbitMQ orders each channel's frames, not the two channels' against each other.
        deadline = time.monotonic() + 5
        while (count := channel.queue_declare("realtime", passive=True)[1]) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert count == 1
        message = channel.basic_get("realtime", no_ack=True)
        assert message.content_type == "application/json" and message.headers["task"] == "pipeline.tasks.run_realtime"
        assert json.loads(message.body)[0] == [{"request_id": "amqp-1"}]
        assert message.properties["delivery_mode"] == 2  # persistent: survives a broker restart
        channel.close()
