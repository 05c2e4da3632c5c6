"""The local stack and the session fixtures, against real processes."""

from __future__ import annotations

import uuid

from confluent_kafka import TopicPartition

from stream.kafka import make_consumer, make_producer


def test_fixture_round_trip(settings, redis_client):
    topic = settings.topic("requests")
    producer = make_producer(settings)
    for i in range(30):
        producer.produce(topic, key=str(i).encode(), value=f"v{i}".encode())
    assert producer.flush(10) == 0
    consumer = make_consumer(settings, group_id=f"g-{uuid.uuid4().hex}")
    consumer.assign([TopicPartition(topic, p, 0) for p in range(settings.partitions)])
    got = []
    for _ in range(20):
        got += [m.value() for m in consumer.consume(100, 0.5) if not m.error()]
        if len(got) >= 30:
            break
    consumer.close()
    assert sorted(got) == sorted(f"v{i}".encode() for i in range(30))
    key = f"{settings.redis_prefix}:k"
    redis_client.set(key, "1")
    assert redis_client.get(key) == b"1"
