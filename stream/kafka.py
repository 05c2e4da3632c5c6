"""Thin wrappers around confluent-kafka: the only module that builds librdkafka clients.

Everything above this module asks for a producer, consumer or admin by role and gets one
configured from `Settings` (bootstrap + pass-through), with the defaults the data plane needs.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from stream.config import Settings
from stream.errors import StackError

# Throughput-oriented producer defaults; idempotence keeps retries from duplicating. The
# partitioner is the Java client's (murmur2; random for a null key): a key lands on the same
# partition whichever client produced it, which the logger's join of requests and decisions by
# partition needs (librdkafka's own default, consistent_random, is CRC32).
PRODUCER_DEFAULTS: dict[str, Any] = {
    "partitioner": "murmur2_random",
    "linger.ms": 5,
    "batch.num.messages": 10000,
    "queue.buffering.max.messages": 500000,
    "compression.type": "lz4",
    "enable.idempotence": True,
    "acks": "all",
}
# Manual commits only: offsets move when the checkpoint says so. Fetch timing (measured on the
# embedded broker, docs/benchmarks.md "Latency where it is made"): its fetch never wakes on new
# data, it re-checks after half the remaining wait, so `fetch.wait.max.ms` is a latency floor
# for a caught-up consumer, and each check lists the partition's stored batches. librdkafka's
# `fetch.queue.backoff.ms` (default 1000) stops fetching for that long whenever the local queue
# holds `queued.min.messages`: a worker working through a backlog then ran dry for most of a
# second at a time (its events/s roughly doubled at 50 ms). The user's settings win over these.
CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "fetch.wait.max.ms": 50,
    "fetch.queue.backoff.ms": 50,
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


def consume_ready(consumer: Consumer, max_messages: int, wait_s: float) -> list[Any]:
    """A batch as soon as there is data: wait up to `wait_s` for the first message, then take
    whatever else is already queued (up to `max_messages`) without waiting.

    librdkafka's `consume(n, timeout)` waits the whole timeout unless n messages arrive, so a
    batch of a consumer that keeps up waited the full batch wait, and grew meanwhile, before
    any of it was decided (docs/benchmarks.md, "A batch that does not wait to fill"). Behind,
    the queue holds a full batch and this costs one extra call per batch."""
    first = consumer.consume(1, wait_s)
    if not first or max_messages <= 1:
        return first
    return first + consumer.consume(max_messages - 1, 0)


def make_admin(settings: Settings, **overrides: Any) -> AdminClient:
    return AdminClient(settings.kafka_config(**overrides))


def probe_cluster(bootstrap: str, kafka_conf: dict[str, Any] | None, timeout: float) -> None:
    """One metadata round trip; raises if the cluster does not answer within `timeout`.

    A plain TCP connect comes first (plaintext only): librdkafka logs every failed connection
    to stderr, so asking it before anything listens prints a line per retry."""
    if not (kafka_conf or {}).get("security.protocol"):
        _any_connects([a.strip().split("://")[-1] for a in bootstrap.split(",") if a.strip()], timeout)
    md = AdminClient({"bootstrap.servers": bootstrap, **(kafka_conf or {})}).list_topics(timeout=max(timeout, 1.0))
    if not md.brokers:
        raise StackError("no brokers in metadata")


def _any_connects(addresses: list[str], timeout: float) -> None:
    """A TCP connect to any one bootstrap address (one broker down in a rolling restart is not
    an unreachable cluster); raises the last address's error when none answers."""
    last: OSError = OSError("no bootstrap address")
    for address in addresses:
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection(((host or address).strip("[]"), int(port) if port.isdigit() else 9092),
                                          timeout=timeout):
                return
        except OSError as exc:
            last = exc
    raise last


def wait_reachable(settings: Settings, timeout: float) -> None:
    """Block until the configured cluster answers, else one StackError line naming it: tools
    and the worker fail fast and clearly at start-up instead of retrying silently forever."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StackError(f"cannot reach Kafka at {settings.kafka_bootstrap} within {timeout:g}s ({last})")
        try:
            probe_cluster(settings.kafka_bootstrap, settings.kafka, min(left, 2.0))
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"; the last is reported
            last = (str(exc).splitlines() or [type(exc).__name__])[0] or type(exc).__name__
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


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
