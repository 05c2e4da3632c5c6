"""Production hardening (issue 13), each fault against the real broker and Redis.

A poison pill, an endless replay, a rewind that skips, Redis errors other than a lost
connection, bad bundles, NaN outputs, targets after a Redis restart, clock steps, exactly-once
fencing, settings precedence, Redis ACL users, and an independent Kafka client (aiokafka).
Fault tests restore what they break in try/finally and poll for states with deadlines.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from student_data import make_bundle
from worker_support import (
    MALFORMED,
    committed,
    decisions,
    produce,
    read_topic,
    request_values,
    running,
    wait_for,
)

from stream.checkpoint import (
    Checkpoint,
    CheckpointDeliveryError,
    CheckpointRewindError,
    DeliveryReports,
)
from stream.kafka import make_producer
from stream.policy import Targets
from stream.window import RedisStore
from stream.worker import DLQ_MAX_BYTES


@pytest.fixture
def bundle(settings):
    return make_bundle(settings.model_dir, "v1", seed=0)


@pytest.fixture
def targets(settings):
    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
    store.set_targets(Targets(0.3, 0.05, 0.02), "test", "hardening test")
    return store


def _big_request(rid: str, size: int = 2_000_000) -> bytes:
    """A request of `size` bytes that compresses to almost nothing (the broker takes it)."""
    pad = b"a" * size
    return b'{"v":1,"request_id":"' + rid.encode() + b'","ts_ms":1,"features":{"n0":"' + pad + b'"}}'


# --- 1. an oversized request costs only itself --------------------------------------------


@pytest.mark.slow
def test_oversized_compressed_request_is_dead_lettered_truncated_and_the_worker_goes_on(settings, bundle, targets):
    ids, values = request_values(600)
    big = _big_request("big0")
    p = make_producer(settings, **{"compression.type": "gzip", "message.max.bytes": 5_000_000})
    topic = settings.topic("requests")
    for i, (k, v) in enumerate(zip(ids, values, strict=True)):
        if i == 300:
            p.produce(topic, big, b"big0", partition=0)
        p.produce(topic, v, k)
    assert p.flush(30) == 0
    with running(settings, group_id="h-big", seed=0, commit_interval_s=0.2) as w:
        wait_for(lambda: w.stats.events >= 601, 60, "every request decided")
        # the worker did not die and committed past the big one
        wait_for(lambda: sum(committed(settings, "h-big").values()) == 601, 30, "offsets committed")
    got = decisions(settings, 601, quiet=0.5)
    by_id = {d["request_id"]: d for d in got}
    assert set(by_id) == {*ids, "big0"}
    assert by_id["big0"]["decision"] == "pass" and by_id["big0"]["reason"] == "invalid"
    dlq = read_topic(settings, "dlq", 1, quiet=0.5)
    assert len(dlq) == 1
    h = dict(dlq[0].headers())
    assert h["rta-error-code"] == b"oversized" and h["rta-truncated"] == str(len(big)).encode()
    assert dlq[0].value() == big[:DLQ_MAX_BYTES]


# --- 2. a permanent produce failure backs off ---------------------------------------------


@pytest.mark.slow
def test_permanently_failing_dlq_backs_off_names_the_topic_and_turns_unhealthy(settings, bundle, targets, caplog):
    bad = dataclasses.replace(settings, topics={**settings.topics, "dlq": "no such topic!"})  # invalid name
    ids, values = request_values(2000)
    produce(settings, values + MALFORMED[:3], ids + ["bad0", "bad1", "bad2"])
    caplog.set_level(logging.ERROR, logger="rta.worker")
    with running(bad, group_id="h-dlq", seed=0, commit_interval_s=0.1, checkpoint_backoff_s=0.5,
                 checkpoint_backoff_max_s=4.0) as w:
        wait_for(lambda: w.stats.checkpoint_failures >= 3, 90, "three failed checkpoints")
        ok, health = w.metrics.health()
        assert not ok and "checkpoint_failing" in health["alerts"] and health["checkpoint_failing"] >= 3
        assert w.metrics.failing_checkpoints._value.get() >= 3
        # from here the pauses are 2, 4, 4 ... s: in >= 8 s at most 3 more replays (no backoff:
        # one every commit interval, i.e. dozens)
        t0, before = time.monotonic(), w.stats.checkpoint_failures
        time.sleep(8.0)
        replays = (w.stats.checkpoint_failures - before) / max(1.0, (time.monotonic() - t0) / 8.0)
        assert replays <= 3, f"{replays} replays in 8 s"
        assert not w._stop.is_set()  # still serving, still trying
    done = committed(settings, "h-dlq")  # the dead letters' checkpoint never commits: nothing skipped
    assert sum(max(o, 0) for o in done.values()) < 2003, done
    lines = [r.getMessage() for r in caplog.records if "checkpoint failed" in r.getMessage()]
    assert lines and all("no such topic!" in line and "in a row" in line for line in lines)


# --- 3. a rewind that cannot seek back never commits over the gap -------------------------


class _SeekFails(Consumer):
    """A real consumer whose seek() fails the way librdkafka's does for a partition it is not
    fetching (`Local: Erroneous state`): fault injection, the broker is real."""

    def seek(self, partition: TopicPartition) -> None:
        raise KafkaException(KafkaError(KafkaError._STATE, "Failed to seek: Local: Erroneous state"))


def test_failed_seek_during_rewind_refuses_every_later_commit(settings):
    topic = settings.topic("requests")
    p = make_producer(settings)
    for i in range(30):
        p.produce(topic, f"m{i}".encode(), partition=0)
    assert p.flush(15) == 0
    reports = DeliveryReports()
    producer = make_producer(settings, **reports.producer_config())
    consumer = _SeekFails({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "h-seek",
                           "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition(topic, 0, 0)])
    cp = Checkpoint(consumer, producer, reports, commit_interval_s=0)

    def batch(n: int) -> list:
        out: list = []
        deadline = time.monotonic() + 30
        while len(out) < n and time.monotonic() < deadline:
            out += [m for m in consumer.consume(n - len(out), 0.5) if m.error() is None]
        assert len(out) == n
        return out

    try:
        first = batch(20)
        for m in first:  # decisions that the broker refuses (invalid topic name)
            producer.produce("no such topic!", m.value())
        cp.store_offsets(topic, np.zeros(20, np.int32), np.array([m.offset() for m in first]))
        with pytest.raises(CheckpointDeliveryError):
            cp.commit()
        with pytest.raises(CheckpointRewindError, match="seek failed"):
            cp.rewind()
        # the consumer is past the undelivered 20: the next batch's good decisions must not commit
        nxt = batch(10)
        for m in nxt:
            producer.produce(settings.topic("decisions"), m.value())
        cp.store_offsets(topic, np.zeros(10, np.int32), np.array([m.offset() for m in nxt]))
        with pytest.raises(CheckpointRewindError):
            cp.commit()
        got = consumer.committed([TopicPartition(topic, 0)], 10)[0].offset
        assert got < 0, f"committed {got}: decisions of offsets 0..19 were never delivered"
    finally:
        consumer.close()
