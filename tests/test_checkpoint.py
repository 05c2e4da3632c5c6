"""The checkpoint against the real broker: offsets move only after every decision is acknowledged."""

from __future__ import annotations

import time

import numpy as np
import pytest
from confluent_kafka import TopicPartition

from infra.stack import free_port
from stream.checkpoint import (
    Checkpoint,
    CheckpointDeliveryError,
    CheckpointProducerTimeout,
    DeliveryReports,
    InvalidStoredOffset,
)
from stream.kafka import make_consumer, make_producer

N = 60


def _fill(settings, n: int = N) -> str:
    topic = settings.topic("requests")
    p = make_producer(settings)
    for i in range(n):
        p.produce(topic, f"m{i}".encode(), partition=i % 3)
    assert p.flush(15) == 0
    return topic


def _consumer(settings, group: str):
    c = make_consumer(settings, group)
    topic = settings.topic("requests")
    c.assign([TopicPartition(topic, p, 0) for p in range(3)])
    return c


def _consume(c, n: int, timeout: float = 15.0) -> list:
    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += [m for m in c.consume(n - len(out), 0.5) if m.error() is None]
    return out


def _committed(c, topic: str) -> dict[int, int]:
    return {tp.partition: tp.offset for tp in c.committed([TopicPartition(topic, p) for p in range(3)], 10)}


def _store(cp: Checkpoint, topic: str, msgs: list) -> None:
    cp.store_offsets(topic, np.array([m.partition() for m in msgs]), np.array([m.offset() for m in msgs]))


def _checkpoint(settings, group: str, **kw):
    reports = DeliveryReports()
    producer = make_producer(settings, **reports.producer_config(), **kw.pop("producer", {}))
    consumer = _consumer(settings, group)
    return consumer, producer, Checkpoint(consumer, producer, reports, commit_interval_s=0, **kw)


def test_commit_only_after_delivery(settings):
    topic = _fill(settings)
    consumer, producer, cp = _checkpoint(settings, "cp-ok")
    msgs = _consume(consumer, N)
    assert len(msgs) == N
    for m in msgs:
        producer.produce(settings.topic("decisions"), m.value())
    _store(cp, topic, msgs)
    assert cp.expired()
    assert _committed(consumer, topic) == {0: -1001, 1: -1001, 2: -1001}  # nothing before commit
    cp.commit()
    assert len(producer) == 0  # every decision acknowledged
    assert _committed(consumer, topic) == {0: N // 3, 1: N // 3, 2: N // 3}
    assert cp.empty() and cp.commits == 1
    consumer.close()


def test_non_increasing_offset_refused(settings):
    consumer, _, cp = _checkpoint(settings, "cp-order")
    topic = settings.topic("requests")
    cp.store_offsets(topic, np.array([0, 0, 1]), np.array([5, 6, 2]))
    assert cp.pending() == {(topic, 0): 6, (topic, 1): 2}
    with pytest.raises(InvalidStoredOffset):
        cp.store_offsets(topic, np.array([1, 0]), np.array([3, 6]))
    with pytest.raises(InvalidStoredOffset):
        cp.store_offset(topic, 1, 2)
    consumer.close()


def test_delivery_failure_keeps_offsets_and_rewind_replays(settings):
    topic = _fill(settings)
    # A topic that does not exist (and may not be auto-created): every message times out.
    consumer, producer, cp = _checkpoint(
        settings, "cp-fail", producer={"message.timeout.ms": 300, "allow.auto.create.topics": False})
    msgs = _consume(consumer, N)
    for m in msgs:
        producer.produce(f"{topic}.missing", m.value())
    _store(cp, topic, msgs)
    with pytest.raises(CheckpointDeliveryError, match="not delivered"):
        cp.commit()
    assert _committed(consumer, topic) == {0: -1001, 1: -1001, 2: -1001}
    cp.rewind()
    again = _consume(consumer, N)
    assert sorted((m.partition(), m.offset()) for m in again) == sorted((m.partition(), m.offset()) for m in msgs)
    consumer.close()


def test_producer_timeout_keeps_offsets(settings):
    topic = _fill(settings)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: nothing can be acknowledged
    reports = DeliveryReports()
    producer = make_producer(settings, **reports.producer_config(), **{"bootstrap.servers": dead})
    consumer = _consumer(settings, "cp-timeout")
    cp = Checkpoint(consumer, producer, reports, commit_interval_s=0, flush_timeout_s=0.5)
    msgs = _consume(consumer, N)
    for m in msgs:
        producer.produce(settings.topic("decisions"), m.value())
    _store(cp, topic, msgs)
    with pytest.raises(CheckpointProducerTimeout, match=f"{N} decisions not acknowledged"):
        cp.commit()
    assert _committed(consumer, topic) == {0: -1001, 1: -1001, 2: -1001}
    producer.purge()
    consumer.close()


def test_exactly_once_commits_offsets_in_the_transaction(settings):
    topic = _fill(settings)
    consumer, producer, cp = None, None, None
    reports = DeliveryReports()
    producer = make_producer(settings, **reports.producer_config(), **{"transactional.id": f"cp-{topic}"})
    producer.init_transactions(15)
    consumer = _consumer(settings, "cp-eos")
    cp = Checkpoint(consumer, producer, reports, exactly_once=True, commit_interval_s=0)
    msgs = _consume(consumer, N)
    for m in msgs:
        producer.produce(settings.topic("decisions"), m.value())
    _store(cp, topic, msgs)
    cp.commit()
    assert _committed(consumer, topic) == {0: N // 3, 1: N // 3, 2: N // 3}
    cp.close()  # the next (empty) transaction is aborted, not left open
    consumer.close()
