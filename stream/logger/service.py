"""`rta log`: requests + decisions + outcomes -> logged traffic (Parquet, stream.logger.schema).

One consumer-group member (group `rta-logger`) reads the three topics and follows one path:

    consume  ->  decode (stream.logger.codec, columnar)  ->  join request + decision by request_id
    ->  buffer rows per event hour (one open file per hour and kind)
    ->  roll: write to a hidden temp file, fsync, rename, fsync the directory
    ->  commit the offsets that are now durable

The guarantee is at-least-once, and it is the commit rule's: the offset committed for a
(topic, partition) is the smallest offset still held by a row that is not yet in a renamed file
(a request waiting for its decision, a decision waiting for its request, a row in an open file),
else the next offset to consume. A crash anywhere replays from there; rows already renamed are
written again, so readers drop duplicates (stream.logger.schema says how).

The join. Requests and decisions share the key (request_id) and the partition count (checked
at start-up, `rta log` refuses otherwise), so the range assignor (forced, whatever the shared
consumer settings say) gives one member partition p of both topics. A request waits for its
decision and the reverse (decisions can be read first). Expiry is in request event time, so
neither a backlog replayed after a restart nor a stall of the worker expires anything:

* a request whose decision has not come when the decisions of its partition have reached
  request times `--join-timeout-s` past its own (a decision's request time is its `ts_ms` minus
  its `latency_ms`) is written with null decision fields (`rta_log_orphans{side="request"}`);
* a decision whose request has not come when the requests of its partition have passed its
  request time by `--join-timeout-s` is dropped and counted (`rta_log_orphans{side="decision"}`):
  without features it is no impression. When traffic stops no request moves that watermark, so
  a requests partition read to its end (position at its high watermark) and silent for
  `--idle-s` (since its last message or its last resume) counts as at wall clock minus
  `--idle-s` (only this side: a silent decisions partition is a stalled worker);
* an id read again after its pair was joined (a worker deciding a request again after a
  rebalance, a replay) is a duplicate (`rta_log_duplicates`), dropped at once.

Event times are the producers' clocks, so a row whose event time is past its message's broker
timestamp (or the logger's clock) by more than `_CLOCK_SLACK_MS` is an outlier: it never moves a
watermark (neither the request stamped minutes or years ahead nor its decision, which may be
decided long after in a backlog) and waits by its broker time instead. It is counted
(`rta_log_odd_inputs{what="future_ts"}`) and written with its own `ts_ms`.

Memory is bounded by back-pressure, not expiry: when the rows waiting on one (topic, partition)
reach its share of `--max-buffered`, that partition is paused (its side runs ahead of the other:
a stalled worker, a lagging requests topic) and resumed once it is under half its share. A stall
of any length costs latency and lag, never a row. (Should both sides of one partition be over
their share at once, neither is paused: the join cannot make progress with one side stopped.)

Malformed messages (any topic) are counted and skipped; a feature whose name is a reserved column
of the layout is dropped from the row and counted; neither ever stops the logger. pyarrow is
imported here only: the worker never imports this module.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter as Tally
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stream.config import Settings
from stream.errors import ConfigError
from stream.events import MAX_BYTES
from stream.features import CATEGORICAL, DEFAULT_TASKS, NUMERIC, FeatureSpec
from stream.kafka import make_consumer
from stream.logger.codec import (
    Decoded,
    concat,
    decision_schema,
    decode_decisions_generic,
    decode_outcomes_generic,
    decode_requests_generic,
)
from stream.logger.files import Holds, _merge_holds, _Sink, open_root
from stream.logger.schema import (
    IMPRESSIONS_DIR,
    OUTCOMES_DIR,
    reserved_columns,
)
from stream.logger.storage import is_uri
from stream.metrics import MetricsServer

log = logging.getLogger("rta.logger")

ROLES = ("requests", "decisions", "outcomes")
# Range assignment gives one member partition p of every topic (the join needs requests p and
# decisions p together); the short session is the worker's (Tansu, killed members).
GROUP_DEFAULTS: dict[str, Any] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
                                  "partition.assignment.strategy": "range"}
_STRING_FIELDS = ("decision", "reason", "model")


# A row's join clock is its event time bounded by its message's broker timestamp (and the
# logger's clock) plus this: a producer's clock ahead moves no watermark.
_CLOCK_SLACK_MS = 10_000
# A request stamped this far past its broker timestamp is counted as future_ts.
_FUTURE_FLAG_MS = 60_000


@dataclass
class LoggerConfig:
    """Knobs of one logger (the `rta log` flags)."""

    out_dir: Path | str  # a directory or s3://bucket/prefix (stream.logger.storage)
    group_id: str = "rta-logger"
    batch_size: int = 5000
    batch_wait_ms: int = 100
    roll_bytes: int = 64 << 20  # in-memory Arrow bytes of one open file
    roll_seconds: float = 60.0
    join_timeout_s: float = 60.0  # event time
    idle_s: float = 30.0  # a requests partition silent this long counts as at wall clock - idle_s
    max_buffered: int = 200_000  # rows waiting for their pair, beyond which partitions pause
    max_open_files: int = 48  # per kind: one per event hour being filled
    commit_interval_s: float = 1.0
    tasks: tuple[str, ...] = DEFAULT_TASKS
    max_bytes: int = MAX_BYTES
    metrics_port: int | None = None  # None: no HTTP server; 0: any free port
    metrics_host: str = "127.0.0.1"
    logger_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    def __post_init__(self) -> None:
        self.out_dir = str(self.out_dir).rstrip("/") if is_uri(self.out_dir) else Path(self.out_dir)
        if self.batch_size < 1 or self.batch_wait_ms < 0:
            raise ConfigError("batch size must be >= 1 and batch wait >= 0 ms")
        if self.roll_bytes < 1 or self.roll_seconds <= 0:
            raise ConfigError("--roll-mb and --roll-seconds must be positive")
        if self.join_timeout_s < 0 or self.max_buffered < 1 or self.idle_s <= 0:
            raise ConfigError("join timeout must be >= 0 and max buffered >= 1")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks must be distinct and non-empty, got {self.tasks}")


@dataclass
class LoggerStats:
    """Running totals (tests and the CLI summary read them)."""

    consumed: Tally = field(default_factory=Tally)  # by topic role
    malformed: Tally = field(default_factory=Tally)  # by topic role
    impressions: int = 0  # rows in renamed files (incl. orphan requests)
    outcomes: int = 0
    orphan_requests: int = 0
    orphan_decisions: int = 0
    duplicates: int = 0  # a request or decision whose id was already waiting
    cross_partition_joins: int = 0  # a request and its decision on different partition numbers
    pauses: int = 0  # (topic, partition) paused by back-pressure
    reserved_features: int = 0
    odd: Tally = field(default_factory=Tally)  # odd inputs kept going through, by cause
    files: int = 0
    commits: int = 0
    commit_failures: int = 0
    temp_files_removed: int = 0


class LoggerMetrics:
    """What an operator watches on one logger (same endpoint as the worker's)."""

    def __init__(self, logger_id: str) -> None:
        self.logger_id = logger_id
        r = self.registry = CollectorRegistry()
        self.messages = Counter("rta_log_messages", "Messages consumed by topic role.", ["topic"], registry=r)
        self.malformed = Counter("rta_log_malformed", "Malformed messages skipped, by topic role.",
                                 ["topic"], registry=r)
        self.rows = Counter("rta_log_rows", "Rows in renamed (durable) files, by kind.", ["kind"], registry=r)
        self.rows_per_s = Gauge("rta_log_rows_per_second", "Rows made durable per second (last interval).",
                                ["kind"], registry=r)
        self.files = Counter("rta_log_files", "Files renamed into place, by kind.", ["kind"], registry=r)
        self.bytes = Counter("rta_log_bytes", "Parquet bytes written, by kind.", ["kind"], registry=r)
        self.open_files = Gauge("rta_log_open_files", "Files being filled (one per event hour and kind).",
                                registry=r)
        self.buffered = Gauge("rta_log_buffered", "Rows held in memory: requests and decisions waiting "
                              "for their pair, rows in open files.", ["side"], registry=r)
        self.orphans = Counter("rta_log_orphans", "Requests written without a decision / decisions "
                               "dropped without a request, by cause.", ["side", "why"], registry=r)
        self.cross_partition = Counter("rta_log_cross_partition_joins", "Requests joined with a decision "
                                       "from another partition number: the producers partition one key "
                                       "differently (co-partitioning broken).", registry=r)
        self.paused = Gauge("rta_log_paused_partitions", "Partitions paused by back-pressure (their side "
                            "runs ahead of the other), by topic role.", ["topic"], registry=r)
        self.duplicates = Counter("rta_log_duplicates", "Ids already waiting (replays).", ["side"], registry=r)
        self.odd = Counter("rta_log_odd_inputs", "Odd inputs the logger kept its rows through, by cause "
                           "(feature_type, int_beyond_2^53, future_ts, ...).", ["what"], registry=r)
        self.reserved = Counter("rta_log_reserved_features", "Features dropped: the name is a reserved "
                                "column of the layout.", registry=r)
        self.lag = Gauge("rta_log_lag", "Messages behind the end of the assigned partitions.", ["topic"],
                         registry=r)
        self.commits = Counter("rta_log_commits", "Offset commits.", registry=r)
        self.commit_failures = Counter("rta_log_commit_failures", "Failed offset commits.", registry=r)
        self.write_seconds = Histogram("rta_log_write_seconds", "Wall time of one file: write, fsync, rename.",
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
                                       registry=r)
        self.last_loop = time.monotonic()
        self.state = "starting"

    def health(self, stall_s: float = 30.0) -> tuple[bool, dict[str, Any]]:
        """Healthy = the loop turned within `stall_s` and the logger is running."""
        since = time.monotonic() - self.last_loop
        ok = self.state in ("starting", "running", "draining") and since < stall_s
        return ok, {"logger": self.logger_id, "state": self.state, "loop_age_s": round(since, 3)}


class _Pending:
    """Rows of one (topic, partition) batch waiting for their pair."""

    __slots__ = ("seq", "tp", "table", "ids", "ts", "offsets", "alive", "n_alive", "arrived")

    def __init__(self, seq: int, tp: tuple[str, int], rows: Decoded, arrived: float) -> None:
        self.seq, self.tp, self.table, self.ids = seq, tp, rows.table, rows.ids
        self.ts, self.offsets = rows.ts, rows.offsets
        self.alive = np.ones(len(rows.ids), bool)
        self.n_alive = len(rows.ids)
        self.arrived = arrived

    def min_offset(self) -> int | None:
        if not self.n_alive:
            return None
        return int(self.offsets[self.alive].min())



def _take(pairs_batches: list[_Pending], rows: np.ndarray, holds: Holds) -> pa.Table:
    """The rows (`pairs_batches[i]`, `rows[i]`) as one table in that order; they stop waiting."""
    seqs = np.fromiter((b.seq for b in pairs_batches), np.int64, len(pairs_batches))
    order = np.argsort(seqs, kind="stable")
    sorted_seqs = seqs[order]
    starts = np.flatnonzero(np.r_[True, sorted_seqs[1:] != sorted_seqs[:-1]])
    ends = np.r_[starts[1:], len(order)]
    parts = []
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        b = pairs_batches[order[s]]
        idx = rows[order[s:e]]
        parts.append(b.table.take(pa.array(idx)))
        b.alive[idx] = False
        b.n_alive -= len(idx)
        _merge_holds(holds, {b.tp: int(b.offsets[idx].min())})
    table = concat(parts)
    if len(parts) > 1 or (order != np.arange(len(order))).any():
        table = table.take(pa.array(np.argsort(order, kind="stable")))
    return table



def _manifest_specs(model_dir: Path) -> list[FeatureSpec]:
    """Feature specs of the bundles under `model_dir` (and of model_dir itself when it is a
    bundle), the served one (`current`) first."""
    out: list[FeatureSpec] = []
    manifests = [model_dir / "current" / "manifest.json", model_dir / "manifest.json",
                 *sorted(model_dir.glob("*/manifest.json"))]
    for manifest in manifests:
        try:
            out.append(FeatureSpec.from_dict(orjson.loads(manifest.read_bytes())["feature_spec"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def bundle_specs(model_dir: Path) -> dict[str, tuple[str, ...]]:
    """Fingerprint -> feature names of every bundle under `model_dir`: what names a positional
    request's values."""
    return {spec.fingerprint(): spec.names for spec in _manifest_specs(model_dir)}


def bundle_kinds(model_dir: Path) -> dict[str, str]:
    """Feature name -> numeric | categorical, as the bundles read it (the served one wins a
    conflict): the logger writes a feature with the type its bundle and replay expect."""
    kinds: dict[str, str] = {}
    for spec in _manifest_specs(model_dir):
        for name in spec.numeric:
            kinds.setdefault(name, NUMERIC)
        for name in spec.categorical:
            kinds.setdefault(name, CATEGORICAL)
    return kinds


# --------------------------------------------------------------------------- the logger


class Logger:
    """One group member: `run()` until `stop()` (or a signal, from the CLI)."""

    def __init__(self, settings: Settings, config: LoggerConfig) -> None:
        self.settings = settings
        self.config = cfg = config
        self.stats = LoggerStats()
        self.metrics = LoggerMetrics(cfg.logger_id)
        self._stop = threading.Event()
        self.topics = {settings.topic(r): r for r in ROLES}
        self.tasks = cfg.tasks
        self._reserved = reserved_columns(cfg.tasks)
        self._dec_schema = decision_schema(cfg.tasks)
        self._positional = bundle_specs(Path(settings.model_dir))
        self._kinds = bundle_kinds(Path(settings.model_dir))
        self._next_spec_scan = time.monotonic() + 10.0
        fs, root, self.stats.temp_files_removed = open_root(cfg.out_dir)  # a path or s3://
        prefix = f"{int(time.time() * 1000):x}-{uuid.uuid4().hex[:6]}"
        self.impressions = _Sink(root, IMPRESSIONS_DIR, prefix, self._impression_order, fs)
        self.outcomes = _Sink(root, OUTCOMES_DIR, prefix, lambda t: t, fs)
        self._seq = 0
        self._req: dict[int, _Pending] = {}  # seq -> batch, in arrival order
        self._dec: dict[int, _Pending] = {}
        self._req_index: dict[str, tuple[_Pending, int]] = {}
        self._dec_index: dict[str, tuple[_Pending, int]] = {}
        self._req_wm: dict[int, int] = {}  # partition -> newest request event time seen
        self._dec_wm: dict[int, int] = {}  # partition -> newest decided request time seen
        self._next: dict[tuple[str, int], int] = {}  # next offset to consume
        self._committed: dict[tuple[str, int], int] = {}
        self.assignment: set[tuple[str, int]] = set()
        self._paused: set[tuple[str, int]] = set()
        # ids joined lately: a request or decision read again (a worker's replay) is a duplicate,
        # not a row waiting for ever for a pair already written
        self._joined: dict[str, None] = {}
        self._joined_cap = max(100_000, 2 * cfg.max_buffered)
        self._last_msg: dict[tuple[str, int], float] = {}  # monotonic time of the last message
        self._last_commit = time.monotonic()
        self._last_tick = time.monotonic()
        self._tick_rows = {IMPRESSIONS_DIR: 0, OUTCOMES_DIR: 0}
        assignor = settings.kafka.get("partition.assignment.strategy", "range")
        if assignor != "range":
            log.warning("partition.assignment.strategy=%s in the Kafka settings is not used by the logger: "
                        "the join needs partition p of requests and decisions on one member (range)",
                        assignor, extra={"event": "assignor_overridden"})
        self.consumer = make_consumer(settings, cfg.group_id, **{**GROUP_DEFAULTS, **settings.kafka,
                                                                 "partition.assignment.strategy": "range"})
        self.server = (MetricsServer(self.metrics, cfg.metrics_host, cfg.metrics_port)  # type: ignore[arg-type]
                       if cfg.metrics_port is not None else None)

    # --- the loop -------------------------------------------------------------------------

    def run(self, install_signals: bool = False, max_seconds: float | None = None) -> LoggerStats:
        """Consume, join, write and commit until `stop()`; then drain and leave."""
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        deadline = time.monotonic() + max_seconds if max_seconds else None
        cfg = self.config
        self.consumer.subscribe(list(self.topics), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        self.metrics.state = "running"
        log.info("logger %s: %s -> %s", cfg.logger_id, ", ".join(self.topics), cfg.out_dir,
                 extra={"event": "started"})
        try:
            while not self._stop.is_set():
                self.metrics.last_loop = now = time.monotonic()
                msgs = self.consumer.consume(cfg.batch_size, cfg.batch_wait_ms / 1000.0)
                if msgs:
                    self.process(msgs)
                self.expire(now)
                self.pressure()
                rolled = self.roll(due_only=True)
                if rolled or now - self._last_commit >= cfg.commit_interval_s:
                    self.commit()
                if now - self._last_tick >= 2.0:
                    self._tick(now)
                if deadline is not None and time.monotonic() >= deadline:
                    break
        finally:
            self._drain()
        return self.stats

    def stop(self) -> None:
        """Ask the loop to finish, write what is joined, commit and leave (signal-safe)."""
        self._stop.set()

    def process(self, msgs: list[Message]) -> None:
        """One consumed batch: split by (topic, partition), decode, join, buffer."""
        groups: dict[tuple[str, int], list[Message]] = {}
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", err.str(), extra={"event": "consumer_error"})
                continue
            groups.setdefault((m.topic(), m.partition()), []).append(m)
        now = time.monotonic()
        for tp, group in groups.items():
            role = self.topics.get(tp[0])
            if role is None:
                continue
            values = [m.value() for m in group]
            offsets = np.fromiter((m.offset() for m in group), np.int64, len(group))
            broker_ts = np.fromiter((m.timestamp()[1] for m in group), np.int64, len(group))
            self._next[tp] = int(offsets.max()) + 1
            self._last_msg[tp] = now
            self.stats.consumed[role] += len(group)
            self.metrics.messages.labels(role).inc(len(group))
            if role == "requests":
                if now >= self._next_spec_scan:  # a bundle published since may name or type features
                    self._next_spec_scan = now + 10.0
                    self._positional = bundle_specs(Path(self.settings.model_dir))
                    self._kinds = bundle_kinds(Path(self.settings.model_dir))
                rows, bad, reserved = decode_requests_generic(values, offsets, tp[1], self._reserved,
                                                              self.config.max_bytes, self._positional,
                                                              self._kinds)
                if reserved:
                    self.stats.reserved_features += reserved
                    self.metrics.reserved.inc(reserved)
                    log.warning("%d feature values dropped: their names are reserved columns",
                                reserved, extra={"event": "reserved_features"})
                for what, n in rows.odd.items():
                    self._odd(what, n, rows.ids[0] if rows.ids else "")
                self._malformed(role, bad)
                self._on_requests(tp, rows, now, _at(broker_ts, offsets, rows.offsets))
            elif role == "decisions":
                rows, bad = decode_decisions_generic(values, offsets, self.tasks)
                self._malformed(role, bad)
                self._on_decisions(tp, rows, now, _at(broker_ts, offsets, rows.offsets))
            else:
                rows, bad = decode_outcomes_generic(values, offsets)
                self._malformed(role, bad)
                if len(rows.ids):
                    self.outcomes.add(rows.table, {tp: int(rows.offsets.min())})

    def _odd(self, what: str, n: int, example: str) -> None:
        """An odd input the logger kept going through (the row is written; see the causes in
        stream.logger.codec and `_arrive`): counted by name, one warning line per batch."""
        self.stats.odd[what] += n
        self.metrics.odd.labels(what).inc(n)
        log.warning("%d odd input(s): %s (batch of e.g. %s)", n, what, example,
                    extra={"event": "odd_input", "what": what, "rows": n})

    def _malformed(self, role: str, n: int) -> None:
        if n:
            self.stats.malformed[role] += n
            self.metrics.malformed.labels(role).inc(n)

    # --- the join -------------------------------------------------------------------------

    def _new_pending(self, tp: tuple[str, int], rows: Decoded, now: float,
                     index: dict[str, tuple[_Pending, int]], side: str) -> _Pending:
        """A batch that waits; ids already waiting on this side, or joined lately (a replay, a
        worker deciding a request again after a rebalance), are dropped and counted."""
        self._seq += 1
        b = _Pending(self._seq, tp, rows, now)
        joined = self._joined
        dup = np.fromiter((rid in index or rid in joined for rid in b.ids), bool, len(b.ids))
        if len(set(b.ids)) != len(b.ids):
            seen: set[str] = set()
            for i, rid in enumerate(b.ids):
                dup[i] |= rid in seen
                seen.add(rid)
        if dup.any():
            b.alive[dup] = False
            b.n_alive -= int(dup.sum())
            self.stats.duplicates += int(dup.sum())
            self.metrics.duplicates.labels(side).inc(int(dup.sum()))
        return b

    def _on_requests(self, tp: tuple[str, int], rows: Decoded, now: float,
                     broker_ts: np.ndarray | None = None) -> None:
        if len(rows.ids):
            limit = (broker_ts if broker_ts is not None else np.full(len(rows.ids), int(time.time() * 1000)))
            future = rows.ts > np.where(limit > 0, limit, int(time.time() * 1000)) + _FUTURE_FLAG_MS
            if future.any():
                self._odd("future_ts", int(future.sum()), rows.ids[int(np.flatnonzero(future)[0])])
        self._arrive(tp, rows, now, is_req=True, broker_ts=broker_ts)

    def _on_decisions(self, tp: tuple[str, int], rows: Decoded, now: float,
                      broker_ts: np.ndarray | None = None) -> None:
        self._arrive(tp, rows, now, is_req=False, broker_ts=broker_ts)

    def _arrive(self, tp: tuple[str, int], rows: Decoded, now: float, is_req: bool,
                broker_ts: np.ndarray | None = None) -> None:
        """A batch of one side: rows whose pair waits are joined now, the others wait."""
        if not len(rows.ids):
            return
        wm, store = (self._req_wm, self._req) if is_req else (self._dec_wm, self._dec)
        index, other = (self._req_index, self._dec_index) if is_req else (self._dec_index, self._req_index)
        # The join clock: the request's event time, unless it is past the broker's timestamp of
        # the message (or the logger's clock) by more than the slack. Such a row (a producer's
        # clock ahead, year 9999) is an outlier: it never moves the watermark (a decision is
        # stamped when decided, so in a backlog its broker time is far past its request's: no
        # bound derived from it is safe to move the watermark by), and it waits by its broker
        # time instead, so it does not wait for ever either.
        wall = int(time.time() * 1000)
        bound = np.full(len(rows.ids), wall) if broker_ts is None else np.where(broker_ts > 0, broker_ts, wall)
        bound = np.minimum(bound, wall)
        outlier = rows.ts > bound + _CLOCK_SLACK_MS
        if outlier.any():
            rows.ts = np.where(outlier, bound, rows.ts)
        if not outlier.all():
            wm[tp[1]] = max(wm.get(tp[1], 0), int(rows.ts[~outlier].max()))
        b = self._new_pending(tp, rows, now, index, "request" if is_req else "decision")
        live = np.flatnonzero(b.alive)
        hits = list(map(other.pop, (b.ids[i] for i in live.tolist()), repeat(None)))
        matched = np.fromiter((h is not None for h in hits), bool, len(hits))
        if matched.any():
            pairs = [h for h in hits if h is not None]
            mine = ([b] * len(pairs), live[matched])
            theirs = ([p[0] for p in pairs], np.fromiter((p[1] for p in pairs), np.int64, len(pairs)))
            self._join(*(mine + theirs if is_req else theirs + mine))
        waiting = live[~matched].tolist()
        index.update(zip([b.ids[i] for i in waiting], zip(repeat(b), waiting), strict=False))
        if b.n_alive:
            store[b.seq] = b

    def _join(self, req_b: list[_Pending], req_rows: np.ndarray, dec_b: list[_Pending],
              dec_rows: np.ndarray) -> None:
        """Matched (request, decision) rows -> impression rows in the open files."""
        holds: Holds = {}
        cross = sum(r.tp[1] != d.tp[1] for r, d in zip(req_b, dec_b, strict=True))
        if cross:  # one member holds both partitions: joined anyway, but the producers disagree
            self.stats.cross_partition_joins += cross
            self.metrics.cross_partition.inc(cross)
        req = _take(req_b, req_rows, holds)
        dec = _take(dec_b, dec_rows, holds)
        self.impressions.add(self._impression(req, dec.drop_columns(["request_id"])), holds)
        self._joined.update(dict.fromkeys(req.column("request_id").to_pylist()))
        while len(self._joined) > self._joined_cap:  # oldest first (insertion order)
            del self._joined[next(iter(self._joined))]
        self._forget_done()

    def _impression(self, req: pa.Table, dec: pa.Table) -> pa.Table:
        """request columns (lineage last) + decision columns, aligned row by row."""
        front = req.select(req.column_names[:-2])
        cols = front.columns + dec.columns + req.columns[-2:]
        names = front.column_names + dec.column_names + req.column_names[-2:]
        return pa.Table.from_arrays(cols, names=names)

    def _impression_order(self, table: pa.Table) -> pa.Table:
        """File column order: request_id, ts_ms, features, decision, p/u, lineage."""
        tail = list(self._dec_schema.names) + ["kafka_partition", "kafka_offset"]
        tail_set = set(tail)
        feats = [c for c in table.column_names[2:] if c not in tail_set]
        return table.select(["request_id", "ts_ms", *feats, *tail])

    def _forget_done(self) -> None:
        """Drop batches nobody waits in; compact big ones mostly resolved, so a few late rows do
        not pin a whole batch (memory follows the rows waiting, which `max_buffered` bounds)."""
        for store, index in ((self._req, self._req_index), (self._dec, self._dec_index)):
            for seq in [s for s, b in store.items() if not b.n_alive]:
                del store[seq]
            for b in store.values():
                if len(b.ids) >= 1024 and b.n_alive * 4 < len(b.ids):
                    keep = np.flatnonzero(b.alive)
                    b.table = b.table.take(pa.array(keep))
                    b.ids = [b.ids[i] for i in keep.tolist()]
                    b.ts, b.offsets = b.ts[keep], b.offsets[keep]
                    b.alive = np.ones(len(keep), bool)
                    index.update(zip(b.ids, zip(repeat(b), range(len(keep))), strict=False))

    def expire(self, now: float) -> None:
        """Orphans: requests and decisions whose pair will not come (the event-time rule). Nothing
        expires for wall time or memory: `pressure` pauses partitions instead."""
        timeout_ms = int(self.config.join_timeout_s * 1000)
        req_wm = self._idle_requests_watermark(now)
        for b in list(chain(self._req.values(), self._dec.values())):
            is_req = b.seq in self._req
            wm = (self._dec_wm if is_req else req_wm).get(b.tp[1])
            if wm is None:
                continue
            mask = b.alive & (b.ts + timeout_ms < wm)
            if mask.any():
                self._expire(b, np.flatnonzero(mask), is_req, "timeout")
        self._forget_done()

    def _idle_requests_watermark(self, now: float) -> dict[int, int]:
        """The requests' watermarks, where a requests partition that delivered nothing for
        `idle_s` (and is not paused: it is read to its end) counts as having reached wall clock
        - `idle_s`: when traffic stops, a decision whose request never comes (one of another
        partition, a lost one) is still dropped in time instead of holding its commit for ever.
        Only the requests' side: an idle decisions partition is a stalled worker, whose requests
        must wait (back-pressure), not expire."""
        idle_s = self.config.idle_s
        req_t = self.settings.topic("requests")
        out = dict(self._req_wm)
        silent = [tp for tp, last in self._last_msg.items() if tp[0] == req_t and tp in self.assignment
                  and tp not in self._paused and now - last >= idle_s]
        wall_ms = int((time.time() - idle_s) * 1000)
        for _t, p in self._at_end(silent):
            out[p] = max(out.get(p, 0), wall_ms)
        return out

    def _at_end(self, tps: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """The partitions of `tps` whose position is at their high watermark (as last fetched):
        silent because there is nothing to read, not because the logger is behind. A partition
        that delivered nothing since it was assigned has no position yet: silent for `idle_s`
        since the assignment (or its last resume) with nothing fetched, it is at its end."""
        if not tps:
            return []
        try:
            positions = self.consumer.position([TopicPartition(t, p) for t, p in tps])
            out = []
            for tp in positions:
                key = (tp.topic, tp.partition)
                if tp.offset < 0:
                    if key not in self._next:
                        out.append(key)
                    continue
                _, hi = self.consumer.get_watermark_offsets(tp, cached=True)
                if hi >= 0 and tp.offset >= hi:
                    out.append(key)
            return out
        except (KafkaException, RuntimeError):
            return []

    def pressure(self) -> None:
        """Back-pressure: pause a request or decision partition whose waiting rows reached its
        share of `max_buffered` (its side runs ahead: a stalled worker, a lagging topic), resume
        it under half its share. A stall then costs latency, never a row."""
        req_t, dec_t = self.settings.topic("requests"), self.settings.topic("decisions")
        join_tps = [tp for tp in self.assignment if tp[0] in (req_t, dec_t)]
        if not join_tps:
            return
        share = max(1, self.config.max_buffered // len(join_tps))
        waiting: dict[tuple[str, int], int] = dict.fromkeys(join_tps, 0)
        for b in chain(self._req.values(), self._dec.values()):
            if b.tp in waiting:
                waiting[b.tp] += b.n_alive
        pause, resume = [], []
        for tp in join_tps:
            twin = (dec_t if tp[0] == req_t else req_t, tp[1])
            over, twin_over = waiting[tp] >= share, waiting.get(twin, 0) >= share
            if tp not in self._paused and over and not twin_over:
                pause.append(tp)
            elif tp in self._paused and (waiting[tp] < share // 2 or twin_over):
                resume.append(tp)
        try:
            if pause:
                self.consumer.pause([TopicPartition(t, p) for t, p in pause])
            if resume:
                self.consumer.resume([TopicPartition(t, p) for t, p in resume])
                now = time.monotonic()  # silence is counted from here: a paused partition was not idle
                self._last_msg.update(dict.fromkeys(resume, now))
        except KafkaException as exc:  # a partition revoked meanwhile: the next turn sees the truth
            log.warning("pause/resume: %s", exc, extra={"event": "pause_failed"})
            return
        if pause:
            self.stats.pauses += len(pause)
            log.info("paused %s: waiting for the other side (%d rows each at most)",
                     ",".join(f"{t}[{p}]" for t, p in pause), share, extra={"event": "paused"})
        if resume:
            log.info("resumed %s", ",".join(f"{t}[{p}]" for t, p in resume), extra={"event": "resumed"})
        self._paused = (self._paused | set(pause)) - set(resume)
        for role, topic in (("requests", req_t), ("decisions", dec_t)):
            self.metrics.paused.labels(role).set(sum(1 for t, _ in self._paused if t == topic))

    def _expire(self, b: _Pending, rows: np.ndarray, is_req: bool, why: str) -> None:
        ids = [b.ids[i] for i in rows.tolist()]
        n = len(ids)
        if is_req:
            for rid in ids:
                self._req_index.pop(rid, None)
            holds: Holds = {}
            req = _take([b] * n, rows, holds)
            nulls = pa.Table.from_arrays([pa.nulls(n, f.type) for f in self._dec_schema], schema=self._dec_schema)
            self.impressions.add(self._impression(req, nulls), holds)
            self.stats.orphan_requests += n
            self.metrics.orphans.labels("request", why).inc(n)
            log.warning("%d requests written without a decision (%s), e.g. %s", n, why, ids[0],
                        extra={"event": "orphan_requests", "why": why, "rows": n})
        else:
            for rid in ids:
                self._dec_index.pop(rid, None)
            b.alive[rows] = False
            b.n_alive -= n
            self.stats.orphan_decisions += n
            self.metrics.orphans.labels("decision", why).inc(n)
            log.warning("%d decisions dropped without their request (%s), e.g. %s", n, why, ids[0],
                        extra={"event": "orphan_decisions", "why": why, "rows": n})

    # --- files and commits ----------------------------------------------------------------

    def roll(self, due_only: bool) -> int:
        """Write the open files that are due (or all); returns how many were renamed."""
        cfg = self.config
        now = time.monotonic()
        n = 0
        for sink in (self.impressions, self.outcomes):
            hours = (sink.due(now, cfg.roll_bytes, cfg.roll_seconds, cfg.max_open_files) if due_only
                     else list(sink.files))
            for hour in hours:
                t0 = time.perf_counter()
                path, rows, size = sink.roll(hour)
                self.metrics.write_seconds.observe(time.perf_counter() - t0)
                self.metrics.rows.labels(sink.kind).inc(rows)
                self.metrics.files.labels(sink.kind).inc()
                self.metrics.bytes.labels(sink.kind).inc(size)
                self._tick_rows[sink.kind] += rows
                self.stats.files += 1
                if sink.kind == IMPRESSIONS_DIR:
                    self.stats.impressions += rows
                else:
                    self.stats.outcomes += rows
                log.debug("wrote %s (%d rows)", path, rows, extra={"event": "file", "rows": rows})
                n += 1
        return n

    def committable(self) -> list[TopicPartition]:
        """Per assigned (topic, partition): the first offset a durable file does not cover."""
        held: Holds = {}
        for b in chain(self._req.values(), self._dec.values()):
            o = b.min_offset()
            if o is not None:
                _merge_holds(held, {b.tp: o})
        _merge_holds(held, self.impressions.holds())
        _merge_holds(held, self.outcomes.holds())
        out = []
        for tp, nxt in self._next.items():
            if tp not in self.assignment:
                continue
            c = min(held.get(tp, nxt), nxt)
            if c > self._committed.get(tp, -1):
                out.append(TopicPartition(tp[0], tp[1], c))
        return out

    def commit(self) -> bool:
        """Commit what is durable. A failure leaves the offsets where they were (replay is safe)."""
        self._last_commit = time.monotonic()
        offsets = self.committable()
        if not offsets:
            return True
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            self.stats.commit_failures += 1
            self.metrics.commit_failures.inc()
            log.error("commit failed (will retry): %s", exc, extra={"event": "commit_failed"})
            return False
        for tp in offsets:
            self._committed[(tp.topic, tp.partition)] = tp.offset
        self.stats.commits += 1
        self.metrics.commits.inc()
        return True

    def _tick(self, now: float) -> None:
        """Gauges: rows/s since the last tick, buffers, open files, lag."""
        dt = max(now - self._last_tick, 1e-9)
        for kind, rows in self._tick_rows.items():
            self.metrics.rows_per_s.labels(kind).set(rows / dt)
            self._tick_rows[kind] = 0
        self._last_tick = now
        m = self.metrics
        m.open_files.set(len(self.impressions.files) + len(self.outcomes.files))
        m.buffered.labels("requests").set(sum(b.n_alive for b in self._req.values()))
        m.buffered.labels("decisions").set(sum(b.n_alive for b in self._dec.values()))
        m.buffered.labels("open_files").set(self.impressions.buffered_rows + self.outcomes.buffered_rows)
        lag = dict.fromkeys(ROLES, 0)
        try:
            tps = [TopicPartition(t, p) for t, p in self.assignment]
            for tp in self.consumer.position(tps):
                _, hi = self.consumer.get_watermark_offsets(tp, cached=True)
                if hi >= 0 and tp.offset >= 0:
                    lag[self.topics[tp.topic]] += max(0, hi - tp.offset)
        except KafkaException:
            return
        for role, n in lag.items():
            m.lag.labels(role).set(n)

    # --- group membership -----------------------------------------------------------------

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.assignment |= {(tp.topic, tp.partition) for tp in partitions}
        now = time.monotonic()
        self._last_msg.update({(tp.topic, tp.partition): now for tp in partitions})
        log.info("assigned %s", _tps(partitions), extra={"event": "assigned"})

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # Write everything joined and commit before the partitions move; what still waits for
        # its pair is dropped here uncommitted, so the next owner reads it again.
        self.roll(due_only=False)
        self.commit()
        self._forget_partitions({(tp.topic, tp.partition) for tp in partitions})
        log.info("revoked %s", _tps(partitions), extra={"event": "revoked"})

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # Another member may own these already: no commit for them; files stay (duplicates).
        self._forget_partitions({(tp.topic, tp.partition) for tp in partitions})
        log.warning("lost %s", _tps(partitions), extra={"event": "lost"})

    def _forget_partitions(self, tps: set[tuple[str, int]]) -> None:
        for store, index in ((self._req, self._req_index), (self._dec, self._dec_index)):
            for seq in [s for s, b in store.items() if b.tp in tps]:
                b = store.pop(seq)
                for i in np.flatnonzero(b.alive).tolist():
                    index.pop(b.ids[i], None)
        for tp in tps:
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
        self.assignment -= tps
        self._paused -= tps
        for tp in tps:
            self._last_msg.pop(tp, None)

    def _drain(self) -> None:
        self.metrics.state = "draining"
        try:
            self.roll(due_only=False)
            self.commit()
            self.consumer.close()  # leaves the group (revoke -> roll + commit of anything left)
        except (KafkaException, RuntimeError) as exc:
            log.error("while leaving the group: %s", exc, extra={"event": "drain_error"})
        finally:
            self.metrics.state = "stopped"
            if self.server is not None:
                self.server.close()
        st = self.stats
        waiting = sum(b.n_alive for b in chain(self._req.values(), self._dec.values()))
        log.info("logger %s stopped: %d impressions, %d outcomes in %d files; %d orphan requests, "
                 "%d orphan decisions, %d left waiting (uncommitted)", self.config.logger_id, st.impressions,
                 st.outcomes, st.files, st.orphan_requests, st.orphan_decisions, waiting,
                 extra={"event": "stopped", "impressions": st.impressions, "outcomes": st.outcomes})


def _at(values: np.ndarray, offsets: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """`values[i]` of the messages at `wanted` offsets (`offsets` ascending, as consumed)."""
    if not len(wanted):
        return wanted
    order = np.argsort(offsets, kind="stable")
    return values[order[np.searchsorted(offsets[order], wanted)]]


def _tps(partitions: list[TopicPartition]) -> str:
    return ",".join(f"{tp.topic}[{tp.partition}]" for tp in partitions)


