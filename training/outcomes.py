"""`rta world outcomes`: the downstream of the filter, simulated. Passed requests reach a bidder
and some of them click, go online, add to cart, buy; blocked ones are never seen again.

The simulator consumes the decisions topic (its own group, `rta-outcomes`) and, for **passed**
requests only, publishes outcome events (`stream.events.encode_outcome`) to the outcomes topic.
Which events happen is the world's own label draw for that request (click/online/cart/deal, read
from the truth chunks `rta world stream --truth DIR` writes): the outcome is the label, so a log
joined with its outcomes has exactly the world's labels on passed traffic. When they happen:

    click  = decision time + D_click      D_click  ~ lognormal, median  5 s
    online = click         + D_online     D_online ~ lognormal, median 30 s
    cart   = online        + D_cart       D_cart   ~ lognormal, median  2 min
    deal   = (cart if the request carted, else online) + D_deal,   median 5 min

each divided by `--time-scale`, and published when the wall clock reaches it (its `ts_ms`), so
the funnel order is the time order. Labels are clipped to the funnel (online needs a click,
cart and deal need online), as the world draws them anyway.

A decision whose truth has not arrived yet waits (the world writes truth in chunks once a
second) up to `--truth-wait-s`, then is counted (`no_truth`) and skipped. Offsets: a decision's
offset is committed only after every outcome it schedules was produced and flushed, so a crash
republishes (at-least-once; the logger's readers drop duplicate (request_id, event) pairs).
Only this simulator and the evaluation read the truth; the logger and the trainer never do.
The truth of every request sent stays in memory (an id and a small int each, ~100 bytes), so a
decision read again after a rebalance still finds it.
"""

from __future__ import annotations

import functools
import heapq
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import orjson
import pyarrow.parquet as pq
from confluent_kafka import KafkaException, TopicPartition

from stream.config import Settings, load_settings
from stream.errors import ConfigError
from stream.events import OUTCOME_EVENTS, encode_outcome
from stream.kafka import make_consumer, make_producer, produce_waiting

log = logging.getLogger("rta.outcomes")

# median delay (s) of each step after the previous one, and the spread of its log
MEDIAN_DELAY_S = {"click": 5.0, "online": 30.0, "cart": 120.0, "deal": 300.0}
DELAY_SIGMA = 0.6
_BITS = {t: 1 << i for i, t in enumerate(OUTCOME_EVENTS)}  # click 1, online 2, cart 4, deal 8


@dataclass
class SimulatorConfig:
    """Knobs of the downstream simulator (the `rta world outcomes` flags)."""

    truth_dir: Path
    time_scale: float = 1.0
    seed: int = 0
    group_id: str = "rta-outcomes"
    batch_size: int = 5000
    truth_wait_s: float = 120.0
    truth_poll_s: float = 0.5
    commit_interval_s: float = 1.0

    def __post_init__(self) -> None:
        self.truth_dir = Path(self.truth_dir)
        if self.time_scale <= 0:
            raise ConfigError(f"--time-scale must be > 0, got {self.time_scale}")


@dataclass
class SimulatorStats:
    decisions: int = 0
    passed: int = 0
    blocked: int = 0
    malformed: int = 0
    no_truth: int = 0
    scheduled: int = 0
    published: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOME_EVENTS, 0))
    redelivered: int = 0  # outcomes the broker did not acknowledge, sent again
    truth_rows: int = 0
    truth_files: int = 0


def outcome_times(bits: np.ndarray, base_ms: np.ndarray, rng: np.random.Generator,
                  time_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Event time (ms) of each funnel step per request; -1 where the step does not happen.

    `bits` holds the labels (click 1, online 2, cart 4, deal 8), clipped to the funnel here.
    """
    n = len(bits)
    click = (bits & 1) > 0
    online = click & ((bits & 2) > 0)
    cart = online & ((bits & 4) > 0)
    deal = online & ((bits & 8) > 0)
    d = {t: np.exp(rng.normal(np.log(MEDIAN_DELAY_S[t]), DELAY_SIGMA, n)) * 1000.0 / time_scale
         for t in OUTCOME_EVENTS}
    t_click = base_ms + d["click"]
    t_online = t_click + d["online"]
    t_cart = t_online + d["cart"]
    t_deal = np.where(cart, t_cart, t_online) + d["deal"]
    out = {}
    for name, t, happens in (("click", t_click, click), ("online", t_online, online),
                             ("cart", t_cart, cart), ("deal", t_deal, deal)):
        out[name] = np.where(happens, np.floor(t), -1).astype(np.int64)
    return out


class Simulator:
    """Decisions in, delayed outcomes of passed requests out: `run()` until `stop()`."""

    def __init__(self, settings: Settings, config: SimulatorConfig) -> None:
        self.settings, self.config = settings, config
        self.stats = SimulatorStats()
        self._stop = threading.Event()
        self._rng = np.random.default_rng(config.seed)
        self.decisions_topic = settings.topic("decisions")
        self.outcomes_topic = settings.topic("outcomes")
        self._truth: dict[str, int] = {}  # request_id -> label bits
        self._seen_files: set[str] = set()
        self._next_poll = 0.0
        # passed decisions waiting for their truth: (request_id, decision ts_ms, tp, offset, since)
        self._waiting: list[tuple[str, int, tuple[str, int], int, float]] = []
        self._heap: list[tuple[int, int, str, str, tuple[str, int], int]] = []  # (due ms, seq, ...)
        self._seq = 0
        self._outstanding: dict[tuple[str, int], dict[int, int]] = {}  # tp -> offset -> outcomes left
        self._next: dict[tuple[str, int], int] = {}
        self._committed: dict[tuple[str, int], int] = {}
        self._last_commit = time.monotonic()
        self.producer = make_producer(settings)
        self.consumer = make_consumer(settings, config.group_id,
                                      **{"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
                                         **settings.kafka})

    def run(self, install_signals: bool = False) -> SimulatorStats:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        self.consumer.subscribe([self.decisions_topic], on_revoke=self._on_revoke)
        try:
            while not self._stop.is_set():
                msgs = self.consumer.consume(self.config.batch_size, 0.05)
                if msgs:
                    self._decisions(msgs)
                now = time.monotonic()
                if now >= self._next_poll:
                    self._load_truth()
                    self._next_poll = now + self.config.truth_poll_s
                self._resolve(now)
                self._publish_due()
                if now - self._last_commit >= self.config.commit_interval_s:
                    self._commit()
        finally:
            self._commit()
            self.consumer.close()
            self.producer.flush(30)
        return self.stats

    def stop(self) -> None:
        self._stop.set()

    # --- input ----------------------------------------------------------------------------

    def _decisions(self, msgs: list[Any]) -> None:
        now = time.monotonic()
        for m in msgs:
            if m.error() is not None:
                continue
            tp = (m.topic(), m.partition())
            self._next[tp] = m.offset() + 1
            self.stats.decisions += 1
            try:
                doc = orjson.loads(m.value())
                rid, decision, ts = doc["request_id"], doc["decision"], doc["ts_ms"]
                if type(rid) is not str or decision not in ("pass", "block") or type(ts) is not int:
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                self.stats.malformed += 1
                continue
            if decision == "block":
                self.stats.blocked += 1  # never reaches a bidder: no outcome, ever
                continue
            self.stats.passed += 1
            self._hold(tp, m.offset(), 1)  # held until its truth is known
            self._waiting.append((rid, ts, tp, m.offset(), now))

    def _load_truth(self) -> None:
        """New truth chunks (whole files only: the world renames them into place)."""
        if not self.config.truth_dir.is_dir():
            return
        for path in sorted(self.config.truth_dir.glob("truth-*.parquet")):
            if path.name in self._seen_files:
                continue
            t = pq.read_table(path, columns=["request_id", *OUTCOME_EVENTS])
            bits = np.zeros(t.num_rows, np.int64)
            for name, bit in _BITS.items():
                bits |= np.where(t.column(name).to_numpy(zero_copy_only=False) > 0, bit, 0)
            self._truth.update(zip(t.column("request_id").to_pylist(), bits.tolist(), strict=True))
            self._seen_files.add(path.name)
            self.stats.truth_rows += t.num_rows
            self.stats.truth_files += 1

    def _resolve(self, now: float) -> None:
        """Waiting decisions whose truth is known -> scheduled outcomes (vectorised per call)."""
        if not self._waiting:
            return
        truth, wait = self._truth, self.config.truth_wait_s
        found = [w for w in self._waiting if w[0] in truth]
        expired = [w for w in self._waiting if w[0] not in truth and now - w[4] >= wait]
        if not found and not expired:
            return
        self._waiting = [w for w in self._waiting if w[0] not in truth and now - w[4] < wait]
        for _rid, _, tp, off, _ in expired:
            self.stats.no_truth += 1
            self._hold(tp, off, -1)
        if not found:
            return
        # kept, not popped: a rebalance (or a replayed decision) reads a decision again
        bits = np.fromiter((truth[w[0]] for w in found), np.int64, len(found))
        base = np.fromiter((w[1] for w in found), np.int64, len(found)).astype(np.float64)
        times = outcome_times(bits, base, self._rng, self.config.time_scale)
        for event, t in times.items():
            for i in np.flatnonzero(t >= 0).tolist():
                rid, _, tp, off, _ = found[i]
                self._seq += 1
                heapq.heappush(self._heap, (int(t[i]), self._seq, rid, event, tp, off))
                self._hold(tp, off, 1)
                self.stats.scheduled += 1
        for _, _, tp, off, _ in found:
            self._hold(tp, off, -1)  # the truth is known: only its scheduled outcomes hold it now

    # --- output ---------------------------------------------------------------------------

    def _publish_due(self) -> None:
        now_ms = time.time_ns() // 1_000_000
        heap = self._heap
        while heap and heap[0][0] <= now_ms:
            item = heapq.heappop(heap)
            due, _, rid, event, _, _ = item
            # the decision's offset stays held until the broker acknowledged this outcome
            produce_waiting(self.producer, self.outcomes_topic, encode_outcome(rid, event, due), rid,
                            on_delivery=functools.partial(self._delivered, item))
        self.producer.poll(0)

    def _delivered(self, item: tuple[int, int, str, str, tuple[str, int], int], err: Any, _msg: Any) -> None:
        """Delivery report: an acknowledged outcome releases its decision's offset; a refused or
        timed-out one goes back on the heap (sent again, its offset still held)."""
        _, _, _, event, tp, off = item
        if err is None:
            self.stats.published[event] += 1
            self._hold(tp, off, -1)
        else:
            self.stats.redelivered += 1
            heapq.heappush(self._heap, item)

    def _hold(self, tp: tuple[str, int], offset: int, delta: int) -> None:
        per = self._outstanding.setdefault(tp, {})
        left = per.get(offset, 0) + delta
        if left > 0:
            per[offset] = left
        else:
            per.pop(offset, None)

    def _commit(self) -> None:
        """Flush what was produced, then commit each partition up to its first decision that
        still has an outcome to publish (or a truth to wait for)."""
        self._last_commit = time.monotonic()
        if self.producer.flush(30):
            log.error("outcomes not acknowledged within 30 s; not committing", extra={"event": "flush"})
            return
        offsets = []
        for tp, nxt in self._next.items():
            per = self._outstanding.get(tp)
            c = min(per) if per else nxt
            if c > self._committed.get(tp, -1):
                offsets.append(TopicPartition(tp[0], tp[1], c))
        if offsets:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=False)
                for tp in offsets:
                    self._committed[(tp.topic, tp.partition)] = tp.offset
            except KafkaException as exc:
                log.error("commit failed (will retry): %s", exc, extra={"event": "commit_failed"})

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._commit()
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._waiting = [w for w in self._waiting if w[2] not in gone]
        self._heap = [h for h in self._heap if h[4] not in gone]
        heapq.heapify(self._heap)
        for tp in gone:
            self._outstanding.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)


@click.command("outcomes")
@click.option("--truth", "truth_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory `rta world stream --truth` writes (read as it fills).")
@click.option("--time-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Divide every delay by this (60: a 5-minute deal comes after 5 s).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Delay sample seed.")
@click.option("--group", "group_id", default="rta-outcomes", show_default=True, help="Consumer group id.")
@click.option("--truth-wait-s", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="How long a passed decision waits for its truth before it is skipped (counted).")
@click.option("--bootstrap", default=None, help="Kafka bootstrap servers (else env/config/dev stack).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Config file (TOML/JSON).")
def outcomes_cmd(truth_dir: Path, time_scale: float, seed: int, group_id: str, truth_wait_s: float,
                 bootstrap: str | None, config_file: str | None) -> None:
    """Downstream simulator: outcome events for passed requests only, with funnel delays."""
    from stream.logger.cli import check_topics
    from stream.logs import setup_json_logging

    setup_json_logging("info")
    settings = load_settings(config_file, kafka_bootstrap=bootstrap)
    check_topics(settings, ("decisions", "outcomes"))
    sim = Simulator(settings, SimulatorConfig(truth_dir=truth_dir, time_scale=time_scale, seed=seed,
                                              group_id=group_id, truth_wait_s=truth_wait_s))
    stats = sim.run(install_signals=True)
    click.echo(json.dumps({k: v for k, v in vars(stats).items()}))
