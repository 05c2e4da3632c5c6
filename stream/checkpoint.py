"""The checkpoint: what the worker has processed, and committing it only once it is safe.

One object owns the delivery guarantee. The worker tells it which input offsets a batch
covered (`store_offsets`) after producing that batch's decisions; `commit()` makes those
offsets durable only after the producer has acknowledged every decision produced since the
last commit. A crash anywhere in between replays from the last commit (at-least-once).
With `exactly_once=True` the same steps run inside a Kafka transaction: decisions and input
offsets become visible together (`send_offsets_to_transaction`), or not at all.

Failures have names, so the worker can react to each (`CheckpointProducerTimeout`,
`CheckpointDeliveryError`, `CheckpointCommitError`); after any of them `rewind()` seeks the
consumer back to the first offset of the failed checkpoint, so nothing is skipped. If that
seek cannot be made (a failed `seek`, an unreadable assignment), the consumer's position is
past decisions that were never delivered: the checkpoint turns `broken`, refuses every later
commit (`CheckpointRewindError`) and the worker exits, so its successor replays from the last
committed offset instead of committing over the gap.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from stream.errors import RtaError

log = logging.getLogger(__name__)


class CheckpointError(RtaError):
    """The checkpoint could not be committed; offsets were not moved (replay is safe)."""


class CheckpointProducerTimeout(CheckpointError):
    """Some decisions were still unacknowledged when the flush timeout ran out."""


class CheckpointDeliveryError(CheckpointError):
    """The broker refused (or the producer gave up on) at least one decision."""


class CheckpointCommitError(CheckpointError):
    """Every decision was delivered but committing the input offsets failed."""


class CheckpointFatalError(CheckpointError):
    """Nothing can be committed safely any more: the worker must stop (its successor replays)."""


class CheckpointRewindError(CheckpointFatalError):
    """A rewind could not seek back: committing anything now could skip undelivered decisions."""


class CheckpointFencedError(CheckpointFatalError):
    """Exactly-once: another producer with this transactional.id took over (or the producer hit
    another fatal error); this one can never commit again."""


class InvalidStoredOffset(CheckpointError):
    """An offset at or below one already processed in this checkpoint: a bug, never data."""


# Delivery errors after which an idempotent (not transactional) producer's identity is spent:
# the broker no longer accepts its producer id / epoch / sequence, so every later message fails
# the same way. Seen on the embedded broker after a hang longer than message.timeout.ms, with
# err.fatal() False. Only a new producer (a new producer id) delivers again.
STALE_PRODUCER_CODES = frozenset(
    getattr(KafkaError, name) for name in (
        "PRODUCER_FENCED", "_FENCED", "INVALID_PRODUCER_EPOCH", "UNKNOWN_PRODUCER_ID",
        "OUT_OF_ORDER_SEQUENCE_NUMBER", "INVALID_PRODUCER_ID_MAPPING", "_GAPLESS_GUARANTEE")
    if hasattr(KafkaError, name))


class DeliveryReports:
    """Producer `on_delivery` callback that remembers failures only.

    The producer is configured with `delivery.report.only.error=true`, so librdkafka calls
    this only for messages it could not deliver: successful deliveries cost no Python.
    """

    def __init__(self) -> None:
        self.failed = 0
        self.first_errors: list[str] = []
        self.topics: set[str] = set()  # topics with a failure since the last take()
        self.stale_producer = False  # a failure said the producer's identity is spent (see above)
        self._lock = threading.Lock()

    def __call__(self, err: KafkaError | None, msg: Any) -> None:
        if err is None:
            return
        if err.code() in STALE_PRODUCER_CODES:
            self.stale_producer = True
        self.record(str(msg.topic()), f"{msg.topic()}[{msg.partition()}]: {err.str()}")

    def record(self, topic: str, error: str) -> None:
        """A message that will not be delivered (also produce() errors the worker caught)."""
        with self._lock:
            self.failed += 1
            self.topics.add(topic)
            if len(self.first_errors) < 5:
                self.first_errors.append(error)

    def take(self) -> tuple[int, list[str]]:
        """Failures since the last call, and reset."""
        with self._lock:
            out = self.failed, self.first_errors
            self.failed, self.first_errors, self.topics = 0, [], set()
        return out

    def producer_config(self) -> dict[str, Any]:
        """Producer settings that route delivery failures here and skip successful reports."""
        return {"on_delivery": self, "delivery.report.only.error": True}


class Checkpoint:
    """Processed input offsets per (topic, partition) since the last commit, and the commit.

    `commit_interval_s` / `commit_every` bound how much is replayed after a crash: the worker
    asks `expired()` between batches. Both 0 commits after every batch.
    """

    TXN_RETRIES = 3  # retriable transaction-commit errors are retried this often

    def __init__(
        self,
        consumer: Consumer,
        producer: Producer,
        reports: DeliveryReports,
        *,
        exactly_once: bool = False,
        commit_interval_s: float = 1.0,
        commit_every: int = 0,
        flush_timeout_s: float = 30.0,
    ) -> None:
        self._consumer = consumer
        self._producer = producer
        self._reports = reports
        self.exactly_once = exactly_once
        self.commit_interval_s = max(float(commit_interval_s), 0.0)
        self.commit_every = int(commit_every)
        self.flush_timeout_s = float(flush_timeout_s)
        # (topic, partition) -> last processed offset / first processed offset in this checkpoint
        self._offsets: dict[tuple[str, int], int] = {}
        self._first: dict[tuple[str, int], int] = {}
        self._count = 0
        self._started = time.monotonic()
        self._in_txn = False
        self.commits = 0  # successful commits (metrics, tests)
        self.broken: str | None = None  # set by a rewind that could not seek back
        if exactly_once:
            self._begin()

    # --- what has been processed ----------------------------------------------------------

    def store_offset(self, topic: str, partition: int, offset: int) -> None:
        """Record one processed message. Offsets must increase per (topic, partition)."""
        tp = (topic, int(partition))
        last = self._offsets.get(tp, -1)
        if offset <= last:
            raise InvalidStoredOffset(f"{topic}[{partition}]: offset {offset} <= already processed {last}")
        self._offsets[tp] = int(offset)
        self._first.setdefault(tp, int(offset))
        self._count += 1

    def store_offsets(self, topic: str, partitions: np.ndarray, offsets: np.ndarray) -> None:
        """Record a batch from one topic: int arrays of partition and offset, one per message.

        Vectorised: per partition only the lowest offset is checked against the stored one and
        the highest is kept. Within a partition a consumer delivers offsets in order.
        """
        partitions = np.asarray(partitions)
        offsets = np.asarray(offsets, dtype=np.int64)
        if partitions.size == 0:
            return
        order = np.argsort(partitions, kind="stable")
        part_sorted = partitions[order]
        off_sorted = offsets[order]
        starts = np.flatnonzero(np.r_[True, part_sorted[1:] != part_sorted[:-1]])
        lows = np.minimum.reduceat(off_sorted, starts)
        highs = np.maximum.reduceat(off_sorted, starts)
        for p, lo, hi in zip(part_sorted[starts].tolist(), lows.tolist(), highs.tolist(), strict=True):
            tp = (topic, p)
            last = self._offsets.get(tp, -1)
            if lo <= last:
                raise InvalidStoredOffset(f"{topic}[{p}]: offset {lo} <= already processed {last}")
            self._offsets[tp] = hi
            self._first.setdefault(tp, lo)
        self._count += int(partitions.size)

    def empty(self) -> bool:
        return not self._offsets

    def expired(self) -> bool:
        """Time (or message count) says it is time to commit."""
        if self.empty():
            return False
        if 0 < self.commit_every <= self._count:
            return True
        return time.monotonic() - self._started >= self.commit_interval_s

    def pending(self) -> dict[tuple[str, int], int]:
        """Last processed offset per (topic, partition), not yet committed."""
        return dict(self._offsets)

    # --- the commit -----------------------------------------------------------------------

    def commit(self) -> None:
        """Make the processed offsets durable, only after every decision is acknowledged.

        1. Flush the producer: wait until every message produced since the last commit is
           acknowledged by the broker (or `flush_timeout_s` passes ->
           CheckpointProducerTimeout; offsets untouched).
        2. Check the delivery reports: any message the broker refused or the producer gave up
           on -> CheckpointDeliveryError (offsets untouched).
        3. Commit offsets (last processed + 1 per (topic, partition)):
           at-least-once: a synchronous consumer commit;
           exactly-once: `send_offsets_to_transaction` + `commit_transaction`, so decisions
           and offsets become visible together; then a new transaction begins.
           A failure -> CheckpointCommitError.
        4. Start the next checkpoint: forget the committed offsets, restart the clock.

        With nothing processed this is a no-op (an open transaction stays open). After a
        rewind that could not seek back (`broken`) every commit raises CheckpointRewindError.
        """
        if self.broken:
            raise CheckpointRewindError(self.broken)
        if self.empty():
            self._started = time.monotonic()
            return
        # Step 1. Flush the producer.
        remaining = self.serve(self._producer.flush, self.flush_timeout_s)
        if remaining > 0:
            raise CheckpointProducerTimeout(
                f"{remaining} decisions not acknowledged within {self.flush_timeout_s:g}s; "
                "offsets not committed (is the broker reachable?)")
        # Step 2. Delivery reports.
        topics = sorted(self._reports.topics)
        failed, errors = self._reports.take()
        if failed:
            raise CheckpointDeliveryError(
                f"{failed} messages to {', '.join(topics)} were not delivered ({'; '.join(errors)}); "
                "offsets not committed")
        # Step 3. Commit offsets.
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in self._offsets.items()]
        if self.exactly_once:
            self._commit_transaction(offsets)
            self._in_txn = False
        else:
            try:
                result = self._consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                raise CheckpointCommitError(f"offset commit failed: {exc.args[0].str()}") from None
            bad = [f"{tp.topic}[{tp.partition}]: {tp.error.str()}" for tp in result or [] if tp.error]
            if bad:
                raise CheckpointCommitError(f"offset commit failed: {'; '.join(bad)}")
        # Step 4. Next checkpoint.
        self._reset()
        self.commits += 1
        if self.exactly_once:
            self._begin()

    def rewind(self) -> None:
        """After a failed commit: drop the checkpoint and seek back to its first offsets.

        Those messages are consumed and decided again (at-least-once: the decisions that did
        get through appear twice). In exactly-once mode the open transaction is aborted, so
        the decisions of the dropped checkpoint never become visible to read_committed readers.
        """
        if self.exactly_once and self._in_txn:
            self._abort()
        else:
            # Let in-flight messages settle so their reports do not leak into the next checkpoint.
            self.serve(self._producer.flush, self.flush_timeout_s)
        self._reports.take()
        try:
            assigned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        except (KafkaException, RuntimeError) as exc:
            self._break(f"rewind: cannot read the assignment ({_kafka_str(exc)})")
        failed = []
        for (t, p), first in self._first.items():
            if (t, p) not in assigned:
                continue  # revoked: the group's committed offset decides where the next owner starts
            try:
                self._consumer.seek(TopicPartition(t, p, first))
            except (KafkaException, RuntimeError) as exc:
                failed.append(f"{t}[{p}] to {first}: {_kafka_str(exc)}")
        if failed:
            self._break(f"rewind: seek failed ({'; '.join(failed)})")
        self._reset()
        if self.exactly_once:
            self._begin()

    def poll(self, timeout: float = 0.0) -> int:
        """Serve the producer's delivery reports (the worker's poll; fatal errors named)."""
        return self.serve(self._producer.poll, timeout)

    def serve(self, call: Any, timeout: float) -> int:
        """`producer.poll/flush`: a FATAL producer error (a fenced transactional producer)
        surfaces there as a KafkaException, or as a SystemError wrapping it when it is pending
        while a delivery callback runs (confluent-kafka 2.x): both become CheckpointFencedError."""
        try:
            return call(timeout)
        except (KafkaException, SystemError) as exc:
            err = next((e.args[0] for e in (exc, exc.__context__) if isinstance(e, KafkaException)
                        and e.args and isinstance(e.args[0], KafkaError)), None)
            if err is None:
                raise
            if err.fatal():
                raise CheckpointFencedError(_fenced(err)) from None
            raise CheckpointDeliveryError(f"producer error: {err.str()}; offsets not committed") from None

    def replace_producer(self, producer: Producer) -> None:
        """Deliver through a new producer from now on (at-least-once only: a transactional
        producer that is fenced stays fatal, its successor must replay)."""
        if self.exactly_once:
            raise CheckpointFencedError("a transactional producer cannot be replaced in place")
        self._producer = producer

    def forget(self, partitions: list[TopicPartition]) -> None:
        """Drop tracked offsets of partitions this member no longer owns (lost, not revoked)."""
        for tp in partitions:
            self._offsets.pop((tp.topic, tp.partition), None)
            self._first.pop((tp.topic, tp.partition), None)

    def close(self) -> None:
        """Leave nothing open: an exactly-once transaction with nothing committed is aborted."""
        if self.exactly_once and self._in_txn:
            self._abort()

    # --- internals ------------------------------------------------------------------------

    def _break(self, why: str) -> None:
        """The consumer may be past undelivered decisions: never commit again (see module doc)."""
        self.broken = (f"{why}; decisions after the last commit may be undelivered, so nothing more "
                       "is committed: restart the worker to replay from the committed offsets")
        if self.exactly_once and self._in_txn:
            self._abort()
        raise CheckpointRewindError(self.broken)

    def _commit_transaction(self, offsets: list[TopicPartition]) -> None:
        """send_offsets + commit, each retried on a retriable error (librdkafka's advice);
        an abortable error -> CheckpointCommitError (the caller rewinds, which aborts)."""
        p, timeout = self._producer, self.flush_timeout_s
        steps = (lambda: p.send_offsets_to_transaction(offsets, self._consumer.consumer_group_metadata(), timeout),
                 lambda: p.commit_transaction(timeout))
        for step in steps:
            for attempt in range(self.TXN_RETRIES + 1):
                try:
                    step()
                    break
                except KafkaException as exc:
                    err: KafkaError = exc.args[0]
                    if err.retriable() and attempt < self.TXN_RETRIES:
                        log.warning("transaction commit: retriable error, retrying: %s", err.str())
                        time.sleep(min(0.1 * 2**attempt, 1.0))
                        continue
                    if err.fatal():
                        raise CheckpointFencedError(_fenced(err)) from None
                    raise CheckpointCommitError(f"transaction commit failed: {err.str()}") from None


    def _abort(self) -> None:
        try:
            self._producer.abort_transaction(self.flush_timeout_s)
        except KafkaException as exc:
            log.warning("abort_transaction failed: %s", exc.args[0].str())
        self._in_txn = False

    def _begin(self) -> None:
        try:
            self._producer.begin_transaction()
        except KafkaException as exc:
            raise CheckpointFencedError(_fenced(exc.args[0])) from None
        self._in_txn = True

    def _reset(self) -> None:
        self._offsets.clear()
        self._first.clear()
        self._count = 0
        self._started = time.monotonic()


def _fenced(err: KafkaError) -> str:
    return (f"transactional producer failed fatally ({err.str()}); another worker with the same "
            "transactional.id has probably fenced this one: give each worker slot its own --transactional-id")


def _kafka_str(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else None
    return arg.str() if isinstance(arg, KafkaError) else str(exc)
