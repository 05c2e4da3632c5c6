"""stream.kafka.consume_ready: a batch waits for its first message only (the worker's loop).

librdkafka's consume(n, timeout) waits the whole timeout unless n messages arrive; the worker
used it with its 20 ms batch wait, so a caught-up worker held every batch for the full wait.
These tests use a long wait so that "returned as soon as data was there" cannot be noise."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import TopicPartition

from stream.config import Settings
from stream.kafka import consume_ready, make_consumer, make_producer

WAIT_S = 30.0  # far above a group join on a loaded box; the plain consume() would take all of it


def _produce(settings: Settings, n: int) -> None:
    p = make_producer(settings)
    for i in range(n):
        p.produce(settings.topic("requests"), f"m{i}".encode(), f"k{i}".encode())
    assert p.flush(30) == 0


def test_a_batch_returns_once_data_is_there_without_waiting_to_fill(settings: Settings) -> None:
    _produce(settings, 50)
    c = make_consumer(settings, f"ready-{uuid.uuid4().hex[:6]}")
    # assigned, not subscribed: a group join's own wait (seconds on a loaded box) is not measured
    c.assign([TopicPartition(settings.topic("requests"), p, 0) for p in range(settings.partitions)])
    try:
        t0 = time.monotonic()
        first = consume_ready(c, 1000, WAIT_S)  # the first fetch, then no wait to fill
        took = time.monotonic() - t0
        assert first and all(m.error() is None for m in first)
        assert took < WAIT_S / 2, f"waited {took:.1f}s for a batch of {len(first)}: it waited to fill"
        got = [m.value() for m in first]
        deadline = time.monotonic() + 60
        while len(got) < 50 and time.monotonic() < deadline:
            got += [m.value() for m in consume_ready(c, 1000, 1.0) if m.error() is None]
        assert sorted(got) == sorted(f"m{i}".encode() for i in range(50))  # each once, none lost
        # at most max_messages, and an idle topic returns empty after the wait for a first message
        _produce(settings, 5)
        one = []
        while not one and time.monotonic() < deadline:
            one = consume_ready(c, 1, 1.0)
        assert len(one) == 1
        while consume_ready(c, 1000, 0.5):
            pass
        t0 = time.monotonic()
        assert consume_ready(c, 1000, 0.3) == []
        assert time.monotonic() - t0 >= 0.25
    finally:
        c.close()
