"""Thin wrappers around confluent-kafka: the only module that builds librdkafka clients.

Everything above this module asks for a producer, consumer or admin by role and gets one
configured from `Settings` (bootstrap + pass-through), with the defaults the data plane needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from stream.config import Settings
from stream.errors import StackError

# Throughput-oriented producer defaults; idempotence keeps retries from duplicating.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "linger.ms": 5,
    "batch.num.messages": 10000,
    "queue.buffering.max.messages": 500000,
    "compression.type": "lz4",
    "enable.idempotence": True,
    "acks": "all",
}
# Manual commits only: offsets move when the checkpoint says so.
CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "fetch.wait.max.ms": 50,
    "queued.min.messages": 20000,
}


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    """A producer: data-plane defaults < the user's librdkafka settings < `overrides` (what the
    caller needs to work, e.g. transactional.id, on_delivery)."""
    return Producer(settings.kafka_config(PRODUCER_DEFAULTS, **overrides))


def produce_waiting(producer: Producer, topic: str, value: bytes, key: str | bytes | None = None,
                    **kwargs: Any) -> None:
    """produce(), but wait for deliveries to drain when the local queue is full instead of
    raising BufferError: publishers that must not drop a message (load generators, tools)."""
    while True:
        try:
            producer.produce(topic, value, key, **kwargs)
            return
        except BufferError:
            producer.poll(0.05)


def make_consumer(settings: Settings, group_id: str, defaults: dict[str, Any] | None = None,
                  **overrides: Any) -> Consumer:
    """A manually-committing group consumer: defaults (ours + `defaults`) < the user's settings
    < `overrides`."""
    return Consumer(settings.kafka_config({**CONSUMER_DEFAULTS, **(defaults or {})}, **{"group.id": group_id,
                                                                                   **overrides}))


def make_admin(settings: Settings, **overrides: Any) -> AdminClient:
    return AdminClient(settings.kafka_config(**overrides))


def ensure_topics(
    admin: AdminClient,
    names: Iterable[str],
    partitions: int,
    replication: int = 1,
    timeout: float = 15.0,
) -> dict[str, str]:
    """Create missing topics; existing ones are left alone. Returns name -> "created"|"exists"."""
    names = list(dict.fromkeys(names))
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise StackError(f"cannot reach Kafka to list topics: {exc.args[0].str()}") from None
    result = {n: "exists" for n in names if n in existing}
    todo = [NewTopic(n, num_partitions=partitions, replication_factor=replication) for n in names if n not in existing]
    if todo:
        futures = admin.create_topics(todo, operation_timeout=timeout, request_timeout=timeout)
        for name, fut in futures.items():
            try:
                fut.result(timeout=timeout)
                result[name] = "created"
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    result[name] = "exists"
                else:
                    raise StackError(f"cannot create topic {name}: {err.str()}") from None
    return result
