"""The broker's queue order: a batch worker takes from the first of its queues that
has a message (kombu's ``priority`` strategy on the Redis transport), so
``batch.high`` empties before ``batch.default`` and that before ``batch.low``."""

from __future__ import annotations

import uuid

from kombu import Consumer, Exchange, Queue

from orchestrator_site.celery import app


def test_the_first_queue_is_always_read_first() -> None:
    assert app.conf.broker_transport_options["queue_order_strategy"] == "priority"
    exchange = Exchange(f"prio-{uuid.uuid4().hex[:8]}", type="direct")
    names = [f"{exchange.name}.{level}" for level in ("high", "default", "low")]
    queues = [Queue(name, exchange, routing_key=name) for name in names]
    got: list[str] = []
    with app.connection_for_write() as conn:
        producer = conn.Producer()
        for name in reversed(names):  # the low one first: arrival order must not matter
            for n in range(2):
                producer.publish({"queue": name, "n": n}, exchange=exchange, routing_key=name, declare=[queues[names.index(name)]], serializer="json")
        with Consumer(conn, queues=queues, callbacks=[lambda body, message: (got.append(body["queue"]), message.ack())], accept=["json"]):
            while len(got) < 6:
                conn.drain_events(timeout=5)
        for queue in queues:
            queue(conn.default_channel).delete()
    assert got == [names[0], names[0], names[1], names[1], names[2], names[2]]
