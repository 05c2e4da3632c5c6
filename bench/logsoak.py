"""`rta bench soak --logger`: the logger under a stalled worker, kill -9 and odd inputs.

Offers `--requests` requests at `--rate` (each stamped with its planned send time) to one
`rta serve` and one `rta log`, while it (1) SIGSTOPs the worker for `--stall-s` (a stall the
logger must ride out by back-pressure), (2) kill -9s the logger `--logger-kills` times (a
replacement starts at once), and (3) mixes in odd inputs: 20 requests stamped 10 minutes ahead
and one in year 9999, 100 with a 64-bit integer field, 100 with `"gdpr": true`. Outcomes (a
click for every fifth passed request) are published once the decisions are in. Then it reads
the log back with the production reader (training.logs.load_logged: its dedup) and checks:

- every request is logged exactly once after dedup, with the decision the worker published and
  every decision field; no outcome of a passed request is lost;
- the loggers' counters name every odd input (summed over the loggers' JSON logs: a logger
  killed with kill -9 loses its in-memory counters, and a replay counts a row again, so these
  are at-least counts).

Prints one JSON object (and writes logsoak.json under `--out`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.soak import _Feeder, _Reader, _spawn, _wait, stop_threads
from stream.config import Settings
from stream.kafka import ensure_topics, make_admin, make_consumer, make_producer, produce_waiting
from stream.policy import Targets
from stream.window import RedisStore

BIG_INT = 2**63 - 25
YEAR_9999_MS = 253_402_300_000_000


@dataclass(frozen=True)
class LoggerSoakConfig:
    """One logger soak (the `rta bench soak --logger` flags)."""

    requests: int = 300_000
    rate: int = 5000
    stall_s: float = 120.0
    logger_kills: int = 2
    ahead: int = 20  # stamped 10 minutes ahead (plus one in year 9999)
    big_ints: int = 100
    gdpr: int = 100
    features: int = 28
    partitions: int = 4
    max_buffered: int = 200_000
    idle_s: float = 30.0  # the logger's --idle-s
    timeout_s: float = 600.0  # for the worker and the logger to catch up after the feed


def _traffic(cfg: LoggerSoakConfig, model_dir: Path, t0_ms: int, seed: int = 0
             ) -> tuple[list[bytes], list[str], dict[str, str]]:
    """(values, ids, odd: id -> what) with request i stamped t0 + i / rate; a bundle for the spec."""
    from bench.worker import _bundle, _world
    from stream.events import encode_requests

    spec, num, cat = _world(min(cfg.requests, 20_000), cfg.features, seed)
    _bundle(model_dir, spec, num, cat)
    rows = len(num)
    ids = [f"s{i}" for i in range(cfg.requests)]
    ts = t0_ms + (np.arange(cfg.requests) * 1000 // cfg.rate).astype(np.int64)
    values: list[bytes] = []
    for start in range(0, cfg.requests, rows):
        part = ids[start:start + rows]
        values += encode_requests(part, ts[start:start + len(part)], num[:len(part)], cat[:len(part)], spec)
    rng = np.random.default_rng(seed)
    n_odd = cfg.ahead + 1 + cfg.big_ints + cfg.gdpr
    at = rng.choice(np.arange(cfg.requests // 10, cfg.requests), n_odd, replace=False).tolist()
    odd: dict[str, str] = {}
    for k, i in enumerate(at):
        doc = orjson.loads(values[i])
        if k < cfg.ahead:
            doc["ts_ms"], what = int(ts[i]) + 600_000, "ahead"
        elif k == cfg.ahead:
            doc["ts_ms"], what = YEAR_9999_MS, "year_9999"
        elif k <= cfg.ahead + cfg.big_ints:
            doc["features"]["uid"], what = BIG_INT - k, "big_int"
        else:
            doc["features"]["gdpr"], what = True, "gdpr"
        values[i] = orjson.dumps(doc)
        odd[ids[i]] = what
    return values, ids, odd


def _group(settings: Settings) -> str:
    """The logger's group, per topic set (a group id reused with other topics can stall a join)."""
    return f"soak-logger.{settings.topic('requests')}"


def _spawn_logger(settings: Settings, cwd: Path, n: int, cfg: LoggerSoakConfig) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTA_")}
    env.update({"RTA_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "RTA_MODEL_DIR": str(settings.model_dir),
                "RTA_STATE_DIR": str(settings.state_dir),
                **{f"RTA_TOPIC_{r.upper()}": t for r, t in settings.topics.items()}})
    log = open(cwd / f"logger-{n}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "infra.cli", "log", "--out", str(cwd / "log"), "--no-metrics",
                             "--group", _group(settings), "--roll-seconds", "2", "--max-buffered",
                             str(cfg.max_buffered), "--idle-s", str(cfg.idle_s)], env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def _committed_all(settings: Settings, roles: tuple[str, ...], seen: list[tuple[int, ...]]) -> bool:
    """The logger group has committed the end of every partition of `roles`, and its commits
    stood still since the last call (the embedded broker's high watermark can lag a batch)."""
    from confluent_kafka import TopicPartition

    c = make_consumer(settings, _group(settings))
    try:
        tps = [TopicPartition(settings.topic(r), p) for r in roles for p in range(settings.partitions)]
        got = c.committed(tps, 10)
        offsets = tuple(tp.offset for tp in got)
        at_end = all(tp.offset >= c.get_watermark_offsets(tp, timeout=10)[1] for tp in got)
    finally:
        c.close()
    still = bool(seen) and seen[-1] == offsets
    seen.append(offsets)
    return at_end and still


def _odd_counts(workdir: Path) -> dict[str, int]:
    """Odd inputs the loggers named, summed over their JSON logs (at-least counts, see above)."""
    out: dict[str, int] = {}
    for path in workdir.glob("logger-*.log"):
        for line in path.read_bytes().splitlines():
            if b'"odd_input"' in line:
                doc = orjson.loads(line)
                out[doc["what"]] = out.get(doc["what"], 0) + int(doc["rows"])
    return out


def run_logger_soak(cfg: LoggerSoakConfig, settings: Settings, workdir: Path,
                    progress: bool = False) -> dict[str, Any]:
    """The logger soak on `settings`' broker and Redis; returns the figures (see the module)."""
    from stream.logger.schema import MAX_LOG_TS_MS
    from training.logs import Attribution, load_logged

    say = (lambda msg: print(f"soak: {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    workdir.mkdir(parents=True, exist_ok=True)
    ensure_topics(make_admin(settings), settings.topics.values(), settings.partitions)
    t_gen = time.time()
    values, ids, odd = _traffic(cfg, Path(settings.model_dir), int((t_gen + 30) * 1000))
    RedisStore.from_url(settings.redis_url, settings.redis_prefix).set_targets(
        Targets(0.25, 0.05, 0.01), "soak", "logger soak start")
    reader = _Reader(settings, "decisions")
    reader.start()
    worker = _spawn(settings, workdir, 0)
    loggers = [_spawn_logger(settings, workdir, 0, cfg)]
    events: list[dict[str, Any]] = []
    t_start = time.time()
    feeder = _Feeder(settings, values, ids, cfg.rate)
    try:
        t_feed = time.time()
        feeder.start()
        _wait(lambda: feeder.sent >= 0.25 * len(values) or feeder.error is not None,
              cfg.requests / cfg.rate * 3 + 60, "a quarter of the feed", [worker])

        def kill_logger() -> None:
            loggers[-1].send_signal(signal.SIGKILL)
            loggers[-1].wait(30)
            loggers.append(_spawn_logger(settings, workdir, len(loggers), cfg))
            events.append({"kind": "kill_logger", "at_s": round(time.time() - t_feed, 1), "offered": feeder.sent})
            say(f"logger killed at {time.time() - t_feed:.1f} s ({feeder.sent} offered)")

        # the stall; the first kill -9 halfway through it (the logger holds paused partitions and
        # a full buffer), the others while the worker catches up after it
        os.kill(worker.pid, signal.SIGSTOP)
        events.append({"kind": "stall", "at_s": round(time.time() - t_feed, 1), "s": cfg.stall_s,
                       "offered": feeder.sent})
        say(f"worker stopped at {time.time() - t_feed:.1f} s ({feeder.sent} offered)")
        if cfg.logger_kills:
            time.sleep(cfg.stall_s / 2)
            kill_logger()
            time.sleep(cfg.stall_s / 2)
        else:
            time.sleep(cfg.stall_s)
        os.kill(worker.pid, signal.SIGCONT)
        say(f"worker continued at {time.time() - t_feed:.1f} s ({feeder.sent} offered)")
        for _ in range(cfg.logger_kills - 1):
            time.sleep(max(5.0, cfg.stall_s / 8))
            kill_logger()
        feeder.join()
        if feeder.error is not None:
            raise feeder.error
        t_fed = time.time()
        want = set(ids)
        _wait(lambda: want <= {r[0] for r in reader.rows}, cfg.timeout_s, "every request decided", [worker])
        t_decided = time.time()
        decided = {}
        for rid, block, reason, _ in reader.rows:
            decided.setdefault(rid, set()).add(("block" if block else "pass", reason))
        passed = sorted(r for r in ids if any(d == "pass" for d, _ in decided[r]))
        clicks = passed[::5]
        p = make_producer(settings)
        now = int(time.time() * 1000)
        for rid in clicks:
            produce_waiting(p, settings.topic("outcomes"), b'{"request_id":"%s","event":"click","ts_ms":%d}'
                            % (rid.encode(), now), rid)
        if p.flush(60):
            raise RuntimeError("soak: outcomes not delivered")
        say(f"all decided {t_decided - t_fed:.1f} s after the feed; {len(clicks)} outcomes published")
        seen: list[tuple[int, ...]] = []
        _wait(lambda: _committed_all(settings, ("requests", "decisions", "outcomes"), seen) or time.sleep(3),
              cfg.timeout_s, "the logger committed everything", [worker, loggers[-1]])
        t_logged = time.time()
        for proc in (loggers[-1], worker):
            proc.send_signal(signal.SIGTERM)
        codes = [loggers[-1].wait(60), worker.wait(60)]
    finally:
        for proc in (*loggers, worker):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stop_threads(feeder, reader)
    # The question is whether the LOGGER kept every row, so the reader's clock admits every stamp
    # the layout can name: by default the training readers set aside (and count) rows stamped past
    # the wall clock, such as the soak's year-9999 request and, by the time they are read, some of
    # those sent 10 minutes ahead (issue 27 item 6).
    logs = load_logged(workdir / "log", attribution=Attribution(now_ms=MAX_LOG_TS_MS))
    logged = logs.request_id.tolist()
    logged_set = set(logged)
    dec = logs.decisions
    decision = dec["decision"].to_pylist()
    reason = dec["reason"].to_pylist()
    fields = ("decision", "reason", "model", "decision_ts_ms", "latency_ms", "target_ratio")  # on every decision
    null_fields = {c: dec[c].null_count for c in fields if dec[c].null_count}
    mismatched = sum(1 for r, d, why in zip(logged, decision, reason, strict=True)
                     if r in decided and (d, why) not in decided[r])
    import pyarrow.dataset as ds

    outcomes = ds.dataset(workdir / "log" / "outcomes", format="parquet", partitioning="hive").to_table(
        columns=["request_id", "event"])
    got_outcomes = set(zip(outcomes["request_id"].to_pylist(), outcomes["event"].to_pylist(), strict=True))
    counted = _odd_counts(workdir)
    expected = {"future_ts": cfg.ahead + 1, "int_beyond_2^53": cfg.big_ints, "feature_type": cfg.gdpr}
    out = {
        "bench": "soak --logger", "config": asdict(cfg),
        "times": {"offered_in_s": round((feeder.done_at or t_fed) - t_feed, 1),
                  "offered_rate": round(len(values) / max((feeder.done_at or t_fed) - t_feed, 1e-9)),
                  "feed_s": round(t_fed - t_feed, 1), "decided_after_feed_s": round(t_decided - t_fed, 1),
                  "logged_after_decided_s": round(t_logged - t_decided, 1), "total_s": round(time.time() - t_start, 1)},
        "events": events,
        "requests": len(ids), "logged_after_dedup": len(logged), "logged_rows_read": logs.info["counts"].get(
            "impression_rows_read"), "duplicates_dropped": logs.info["counts"].get("duplicate_impressions"),
        "missing": len(set(ids) - logged_set), "unexpected": len(logged_set - set(ids)),
        "without_decision": decision.count(None), "decision_differs_from_worker": mismatched,
        "null_decision_fields": null_fields,
        "outcomes_published": len(clicks), "outcomes_logged": len(got_outcomes & {(r, "click") for r in clicks}),
        "odd_inputs_sent": expected, "odd_inputs_counted": counted,
        "odd_inputs_all_named": all(counted.get(k, 0) >= v for k, v in expected.items()),
        "odd_logged": {what: sum(1 for r, w in odd.items() if w == what and r in logged_set)
                       for what in sorted(set(odd.values()))},
        "exit_codes": {"logger": codes[0], "worker": codes[1]}, "logger_processes": len(loggers),
    }
    out["ok"] = bool(out["missing"] == 0 and out["unexpected"] == 0 and out["without_decision"] == 0
                     and not mismatched and not null_fields and out["outcomes_logged"] == len(clicks)
                     and out["odd_inputs_all_named"] and codes == [0, 0])
    (workdir / "logsoak.json").write_text(json.dumps(out, indent=1))
    return out
