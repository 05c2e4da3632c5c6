"""`rta log` against the real broker: the join, orphans, malformed input, rolling, the commit rule.

Requests and decisions are produced here directly (the codecs the worker uses), so each test
controls exactly which pairs exist; the live pipeline is tests/test_live_log.py.
"""

from __future__ import annotations

import signal
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from live_log_support import (
    duckdb_count,
    group_of,
    logging_to,
    open_files_buffered,
    read_log,
    scrape,
    spawn_logger,
)
from student_data import random_batch
from worker_support import committed, wait_for

from stream.config import Settings
from stream.events import encode_decisions, encode_outcome, encode_requests
from stream.kafka import make_producer, produce_waiting
from stream.logger.schema import DECISION_COLUMNS, MAX_LOG_TS_MS, partition_dir, task_columns
from training.logs import load_logged

pytestmark = pytest.mark.slow  # each test joins a consumer group (~3 s on the embedded broker)

TASKS = ("click", "online", "cart", "deal")
T0 = 1_764_000_000_000  # 2025-11-24 16:00 UTC: requests span two event hours below


def _requests(n: int, prefix: str, t0: int = T0, seed: int = 0) -> tuple[list[str], np.ndarray, list[bytes]]:
    spec, num, cat = random_batch(n, seed=seed)
    ids = [f"{prefix}{i}" for i in range(n)]
    ts = t0 + np.arange(n, dtype=np.int64) * 1000  # one request per second of event time
    return ids, ts, encode_requests(ids, ts, num, cat, spec)


def _decisions(ids: list[str], ts: np.ndarray, seed: int = 0) -> tuple[list[bytes], dict[str, np.ndarray]]:
    n = len(ids)
    rng = np.random.default_rng(seed)
    cols = {"block": rng.random(n) < 0.3, "score": rng.random(n), "uncertainty": rng.random(n) / 10,
            "p": rng.random((n, 4)) / 5, "u": rng.random((n, 4)) / 20, "theta": rng.random(n),
            "tau_u": rng.random(n), "propensity": np.where(rng.random(n) < 0.5, 0.99, 0.01)}
    reason = np.where(cols["block"], "score", "uncertain")
    bodies = encode_decisions(ids, cols["block"], reason, cols["score"], cols["uncertainty"], cols["p"],
                              threshold=cols["theta"], target_ratio=0.3, model="v7", ts_ms=ts + 5,
                              latency_ms=5.0, tasks=TASKS, propensity=cols["propensity"], tau_u=cols["tau_u"],
                              u_tasks=cols["u"])
    return bodies, cols


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(lg) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{lg.server.port}/metrics", timeout=5) as r:
        return r.read().decode()


def _produce(settings: Settings, role: str, values: list[bytes], keys: list[str | None]) -> None:
    p = make_producer(settings)
    for v, k in zip(values, keys, strict=True):
        produce_waiting(p, settings.topic(role), v, k)
    assert p.flush(30) == 0


def test_requests_join_their_decisions_into_hourly_parquet_and_offsets_commit(settings, tmp_path: Path):
    n = 6000
    ids, ts, reqs = _requests(n, "a")
    bodies, cols = _decisions(ids, ts)
    # decisions first for a third of them: the join works in either order
    _produce(settings, "decisions", bodies[:2000], ids[:2000])
    _produce(settings, "requests", reqs, ids)
    _produce(settings, "decisions", bodies[2000:], ids[2000:])
    outcome_ids = ids[:300:3]
    _produce(settings, "outcomes", [encode_outcome(r, "click", int(t) + 2000) for r, t in
                                    zip(outcome_ids, ts[:300:3], strict=True)], outcome_ids)
    out = tmp_path / "log"
    with logging_to(settings, out, roll_seconds=0.5, batch_wait_ms=20, metrics_port=0) as lg:
        wait_for(lambda: lg.stats.impressions >= n and lg.stats.outcomes >= len(outcome_ids), 60, "rows written")
        wait_for(lambda: sum(committed(settings, group_of(settings)).values()) == n, 30, "requests committed")
        wait_for(lambda: 'rta_log_lag{topic="requests"} 0.0' in _metrics(lg), 30, "lag gauge at 0")
        text = _metrics(lg)
    assert 'rta_log_rows_total{kind="impressions"} 6000.0' in text
    assert 'rta_log_messages_total{topic="decisions"} 6000.0' in text
    assert "rta_log_open_files " in text and 'rta_log_buffered{side="requests"}' in text
    assert lg.stats.orphan_requests == lg.stats.orphan_decisions == lg.stats.duplicates == 0

    table = read_log(out)
    assert table.num_rows == n and sorted(table["request_id"].to_pylist()) == sorted(ids)
    # layout: partitioned by the request's event hour; columns per stream.logger.schema
    expected_dirs = {partition_dir(int(t)) for t in ts}
    assert len(expected_dirs) == 2
    assert {str(p.parent.relative_to(out / "impressions")) for p in (out / "impressions").rglob("*.parquet")} \
        == expected_dirs
    for name in ("request_id", "ts_ms", *DECISION_COLUMNS, *task_columns(TASKS), "kafka_partition",
                 "kafka_offset", "n0", "c0"):
        assert name in table.column_names, name
    rows = table.sort_by("request_id").to_pylist()
    at = {rid: i for i, rid in enumerate(ids)}
    for row in rows:
        i = at[row["request_id"]]
        assert row["ts_ms"] == ts[i]
        assert row["decision"] == ("block" if cols["block"][i] else "pass")
        assert row["threshold"] == cols["theta"][i] and row["tau_u"] == cols["tau_u"][i]  # full precision
        assert row["model"] == "v7" and row["decision_ts_ms"] == ts[i] + 5
        assert row["p_deal"] == pytest.approx(cols["p"][i, 3], rel=1e-5)
        assert row["u_click"] == pytest.approx(cols["u"][i, 0], rel=1e-5)
    # an independent reader sees the same rows
    assert duckdb_count(out, "impressions") == (n, n)
    assert duckdb_count(out, "outcomes") == (len(outcome_ids), len(outcome_ids))


def test_orphans_malformed_and_reserved_names_are_counted_never_fatal(settings, tmp_path: Path):
    ids, ts, reqs = _requests(400, "b")
    bodies, _ = _decisions(ids, ts)
    # requests 0..299 get decisions; 300..399 never do. Decisions for "ghost" ids have no request.
    ghosts = [f"ghost{i}" for i in range(20)]
    ghost_bodies, _ = _decisions(ghosts, np.full(20, T0, np.int64))
    late_ids, late_ts, late_reqs = _requests(50, "late", t0=T0 + 10 * 3_600_000, seed=1)  # move time on
    late_bodies, _ = _decisions(late_ids, late_ts)
    bad = [b"not json", b'{"v": 1, "request_id": "x", "ts_ms": -1, "features": {}}', b"",
           b'{"v": 1, "request_id": "y", "ts_ms": 5, "features": {"n0": [1, 2]}}']  # kept: n0 null, counted
    reserved = b'{"v": 1, "request_id": "rsv", "ts_ms": %d, "features": {"n0": 1.5, "score": 9}}' % T0
    _produce(settings, "requests", reqs + bad + [reserved] + late_reqs, ids + [None, "x", None, "y", "rsv"] + late_ids)
    _produce(settings, "decisions", bodies[:300] + ghost_bodies + [b"{}", b"[1]"] + late_bodies,
             ids[:300] + ghosts + [None, None] + late_ids)
    _produce(settings, "outcomes", [b"nope", encode_outcome("b1", "deal", T0)], [None, "b1"])
    out = tmp_path / "log"
    with logging_to(settings, out, roll_seconds=0.5, batch_wait_ms=20, join_timeout_s=60) as lg:
        # "rsv" and "y" wait for a decision that never comes and expire like the other 100
        wait_for(lambda: lg.stats.orphan_requests >= 102 and lg.stats.orphan_decisions >= 20
                 and lg.stats.impressions >= 452, 60, "orphans expired and written")
    assert lg.stats.orphan_requests == 102 and lg.stats.orphan_decisions == 20
    assert lg.stats.malformed == {"requests": 3, "decisions": 2, "outcomes": 1}
    assert lg.stats.reserved_features == 1 and lg.stats.odd == {"feature_type": 1}
    table = read_log(out)
    assert table.num_rows == 452
    orphans = table.filter(table["decision"].is_null())
    assert sorted(orphans["request_id"].to_pylist()) == sorted(ids[300:] + ["rsv", "y"])
    assert orphans["score"].null_count == orphans.num_rows and orphans["n0"].null_count < orphans.num_rows
    rsv = [r for r in table.to_pylist() if r["request_id"] == "rsv"][0]
    assert rsv["n0"] == 1.5 and rsv["score"] is None  # the reserved feature never posed as a decision field


def test_a_waiting_request_holds_its_partition_commit_back(settings, tmp_path: Path):
    ids, ts, reqs = _requests(600, "c")
    bodies, _ = _decisions(ids, ts)
    hold = 10  # request c10 gets no decision yet
    _produce(settings, "requests", reqs, ids)
    _produce(settings, "decisions", bodies[:hold] + bodies[hold + 1:], ids[:hold] + ids[hold + 1:])
    out = tmp_path / "log"
    with logging_to(settings, out, roll_seconds=0.3, batch_wait_ms=20, join_timeout_s=3600) as lg:
        wait_for(lambda: lg.stats.impressions >= 599, 60, "599 rows durable")
        wait_for(lambda: lg.stats.commits >= 1, 30, "a commit")
        got = committed(settings, group_of(settings))
        pending = lg._req_index[ids[hold]]
        held_partition, held_offset = pending[0].tp[1], int(pending[0].offsets[pending[1]])
        assert got[held_partition] == held_offset, (got, held_offset)  # not one past the waiting request
        others = {p: c for p, c in got.items() if p != held_partition}
        assert all(c > 0 for c in others.values())
        # its decision arrives: the row is written and the commit moves on
        _produce(settings, "decisions", [bodies[hold]], [ids[hold]])
        wait_for(lambda: lg.stats.impressions >= 600, 30, "the held row written")
        wait_for(lambda: committed(settings, group_of(settings))[held_partition] > held_offset, 30, "commit moved")
    assert read_log(out).num_rows == 600


def test_files_roll_by_size_and_sigterm_drains(settings, tmp_path: Path):
    ids, ts, reqs = _requests(2990, "d")
    tail_ids, tail_ts, tail_reqs = _requests(10, "dt", t0=T0 + 5 * 3_600_000, seed=1)  # too few to roll
    ids, ts, reqs = ids + tail_ids, np.r_[ts, tail_ts], reqs + tail_reqs
    bodies, _ = _decisions(ids, ts)
    _produce(settings, "requests", reqs, ids)
    _produce(settings, "decisions", bodies, ids)
    out = tmp_path / "log"
    port = _free_port()
    proc = spawn_logger(settings, out, tmp_path, "--roll-mb", "0.05", "--roll-seconds", "3600",
                        "--batch-wait-ms", "20", "--batch-size", "100", metrics_port=port)
    try:
        wait_for(lambda: len(list((out / "impressions").rglob("*.parquet"))) >= 3, 20, "size rolls")
        # every pair read and joined; the last rows sit in an open file (no time roll) when SIGTERM comes
        wait_for(lambda: scrape(port, 'rta_log_messages_total{topic="decisions"}') == 3000, 60, "all read",
                 step=0.2)
        wait_for(lambda: scrape(port, 'rta_log_buffered{side="open_files"}') >= 10, 10, "rows in open files")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    files = list((out / "impressions").rglob("*.parquet"))
    assert len(files) >= 3, files
    assert not list(out.rglob("*.tmp"))
    # drained: every buffered row is in a renamed file, and exactly those offsets are committed
    # (break tried: _drain without its roll -> the open file's rows are missing here)
    table = read_log(out)
    assert table.num_rows == 3000 and set(table["request_id"].to_pylist()) == set(ids)
    assert sum(committed(settings, group_of(settings)).values()) == 3000


def test_two_members_split_the_partitions_and_a_rebalance_loses_nothing(settings, tmp_path: Path):

    ids, ts, reqs = _requests(8000, "e")
    bodies, _ = _decisions(ids, ts)
    _produce(settings, "requests", reqs[:4000], ids[:4000])
    _produce(settings, "decisions", bodies[:4000], ids[:4000])
    out = tmp_path / "log"
    with logging_to(settings, out, roll_seconds=0.3, batch_wait_ms=20, batch_size=500) as a:
        wait_for(lambda: a.stats.impressions > 0, 60, "the first member's rows")
        with logging_to(settings, out, roll_seconds=0.3, batch_wait_ms=20, batch_size=500) as b:
            wait_for(lambda: a.assignment and b.assignment, 60, "both members assigned")
            # range assignment: a member owns partition p of requests and decisions together
            for lg in (a, b):
                parts = {role: {p for t, p in lg.assignment if t == settings.topic(role)}
                         for role in ("requests", "decisions")}
                assert parts["requests"] == parts["decisions"], parts
            _produce(settings, "requests", reqs[4000:], ids[4000:])
            _produce(settings, "decisions", bodies[4000:], ids[4000:])
            wait_for(lambda: sum(committed(settings, group_of(settings)).values()) == 8000, 60, "all committed")
    assert a.stats.orphan_requests == b.stats.orphan_requests == 0
    logs = load_logged(out)  # the production reader drops the rebalance's duplicates
    assert len(logs) == 8000 and logs.decisions["decision"].null_count == 0
    assert b.stats.impressions > 0


def test_nothing_is_committed_before_its_file_is_renamed_and_kill_9_loses_nothing(settings, tmp_path: Path):
    import socket

    ids, ts, reqs = _requests(2000, "k")
    bodies, _ = _decisions(ids, ts)
    _produce(settings, "requests", reqs, ids)
    _produce(settings, "decisions", bodies, ids)
    out = tmp_path / "log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # every row joined but held in an open file: never rolled by size or time
    proc = spawn_logger(settings, out, tmp_path, "--roll-mb", "1000", "--roll-seconds", "3600",
                        "--batch-wait-ms", "20", metrics_port=port)

    def buffered() -> float:
        return open_files_buffered(port)

    try:
        wait_for(lambda: buffered() == 2000, 60, "every row joined and buffered", step=0.3)
        got = committed(settings, group_of(settings))
        assert all(o <= 0 for o in got.values()), got  # nothing durable yet: nothing past offset 0
        proc.kill()  # SIGKILL: the open file is lost, and so is nothing else
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list(out.rglob("*.parquet"))
    with logging_to(settings, out, roll_seconds=0.3, batch_wait_ms=20) as lg:
        wait_for(lambda: sum(committed(settings, group_of(settings)).values()) == 2000, 60, "all committed")
    assert lg.stats.impressions == 2000 and set(read_log(out)["request_id"].to_pylist()) == set(ids)


def test_a_restart_can_write_a_decided_request_again_without_its_decision_and_dedup_keeps_the_decided_one(
        settings, tmp_path: Path):
    """The case stream.logger.schema's dedup rule is for: request 0 waits (no decision yet), so the
    requests commit stays at it, while requests 1.. and their decisions are written and the
    decisions commit moves past them. After a restart requests 1.. are read again, their
    decisions are not: they expire without one, next to their decided copies."""

    ids, ts, reqs = _requests(50, "g")
    bodies, _ = _decisions(ids, ts)

    def put(role: str, values: list[bytes], keys: list[str]) -> None:
        p = make_producer(settings)
        for v, k in zip(values, keys, strict=True):
            produce_waiting(p, settings.topic(role), v, k, partition=0)  # one partition: one order
        assert p.flush(30) == 0

    put("requests", reqs, ids)
    put("decisions", bodies[1:], ids[1:])
    out = tmp_path / "log"
    with logging_to(settings, out, roll_seconds=0.3, batch_wait_ms=20, join_timeout_s=3600) as lg:
        wait_for(lambda: lg.stats.impressions >= 49, 60, "49 decided rows written")
        wait_for(lambda: committed(settings, group_of(settings)).get(0) == 0 and lg.stats.commits >= 1, 30,
                 "requests held at the waiting one")
    # request 0's decision arrives much later in event time (it also moves the decisions' clock)
    late, _ = _decisions(ids[:1], ts[:1] + 3_600_000)
    put("decisions", late, ids[:1])
    with logging_to(settings, out, roll_seconds=0.3, batch_wait_ms=20, join_timeout_s=60) as lg:
        wait_for(lambda: lg.stats.orphan_requests >= 49 and lg.stats.impressions >= 50, 60, "replayed rows")
    raw = read_log(out)
    assert raw.num_rows == 99 and raw["decision"].null_count == 49
    # the production reader (what rta train / replay use) keeps the decided copy of each
    logs = load_logged(out)
    assert len(logs) == 50 and sorted(logs.request_id.tolist()) == sorted(ids)
    assert logs.decisions["decision"].null_count == 0 and logs.info["counts"]["duplicate_impressions"] == 49


def _put(settings: Settings, role: str, values: list[bytes], keys: list[str], partition: int | None = 0) -> None:
    """Produce to one partition (one order), or by key with partition=None."""
    p = make_producer(settings)
    for v, k in zip(values, keys, strict=True):
        if partition is None:
            produce_waiting(p, settings.topic(role), v, k)
        else:
            produce_waiting(p, settings.topic(role), v, k, partition=partition)
    assert p.flush(30) == 0


def test_a_stalled_worker_pauses_the_requests_and_costs_no_row(settings, tmp_path: Path):
    """Issue 27 item 1: decisions stop (a stalled worker) while requests go on. The requests
    partition that runs ahead is paused at its share of --max-buffered; nothing is written without
    its decision, and once decisions come back every request is logged with its own. On main the
    overflow expiry wrote ~2,400 of them without a decision (and max_wait would after 300 s)."""
    n, decided = 3000, 300
    ids, ts, reqs = _requests(n, "s")
    bodies, _ = _decisions(ids, ts)
    _put(settings, "requests", reqs, ids)
    _put(settings, "decisions", bodies[:decided], ids[:decided])
    out = tmp_path / "log"
    with logging_to(settings, out, roll_seconds=0.3, batch_wait_ms=20, batch_size=200, max_buffered=600,
                    metrics_port=0) as lg:
        wait_for(lambda: lg.stats.pauses >= 1 and lg.stats.impressions >= decided, 60, "requests paused")
        time.sleep(3)  # the stall goes on: nothing expires, memory stays bounded
        waiting = sum(b.n_alive for b in lg._req.values())
        assert lg.stats.orphan_requests == 0 and waiting <= 600 + 200, waiting
        assert 'rta_log_paused_partitions{topic="requests"} 1.0' in _metrics(lg)
        assert committed(settings, group_of(settings)).get(0, 0) <= decided  # held at the first waiting
        _put(settings, "decisions", bodies[decided:], ids[decided:])  # the worker is back
        wait_for(lambda: lg.stats.impressions >= n, 90, "every request written")
        wait_for(lambda: committed(settings, group_of(settings)).get(0) == n, 30, "all committed")
    assert lg.stats.orphan_requests == lg.stats.orphan_decisions == 0
    table = read_log(out)
    assert table.num_rows == n and table["decision"].null_count == 0


def test_one_request_stamped_ahead_moves_no_watermark_and_is_counted(settings, tmp_path: Path):
    """Issue 27 item 2: a request 10 minutes ahead and one in year 9999 are decided at once; the
    decisions of the others come 3 s later. On main their decisions' watermark jumped (to the
    future, bounded at wall clock + 1 h), every other request of the partition expired without
    its decision and the late decisions were dropped as orphans."""
    now = int(time.time() * 1000)
    spec, num, cat = random_batch(200, seed=3)
    ids, ts = [f"w{i}" for i in range(200)], now - 3000 + np.arange(200, dtype=np.int64) * 10
    reqs = encode_requests(ids, ts, num, cat, spec)
    odd_ids, odd_ts = ["ahead", "y9999"], np.array([now + 600_000, MAX_LOG_TS_MS - 1], np.int64)
    spec, num, cat = random_batch(2, seed=2)
    odd_reqs = encode_requests(odd_ids, odd_ts, num, cat, spec)
    odd_bodies = encode_decisions(odd_ids, np.zeros(2, bool), ["score"] * 2, np.ones(2), np.ones(2),
                                  np.ones((2, 4)), threshold=0.5, target_ratio=0.3, model="v7", ts_ms=now,
                                  latency_ms=(now - odd_ts).astype(float))
    bodies, _ = _decisions(ids, ts)
    _put(settings, "requests", reqs + odd_reqs, ids + odd_ids)
    _put(settings, "decisions", odd_bodies, odd_ids)
    out = tmp_path / "log"
    with logging_to(settings, out, roll_seconds=0.3, batch_wait_ms=20, join_timeout_s=60) as lg:
        wait_for(lambda: lg.stats.impressions >= 2, 60, "the odd pair written")
        time.sleep(3)
        _put(settings, "decisions", bodies, ids)
        wait_for(lambda: lg.stats.impressions >= 202, 60, "every request written")
    assert lg.stats.orphan_requests == lg.stats.orphan_decisions == 0
    assert lg.stats.odd["future_ts"] == 2
    table = read_log(out)
    assert table.num_rows == 202 and table["decision"].null_count == 0
    assert sorted(table.filter(pc.is_in(table["request_id"], pa.array(odd_ids)))["ts_ms"].to_pylist()) \
        == sorted(odd_ts.tolist())  # written with their own time


def test_a_decisions_topic_with_another_partition_count_is_refused_in_one_line(settings, tmp_path: Path):
    """Issue 27 item 5: the join needs one partition count; on main `rta log` started anyway."""
    import subprocess

    from worker_support import worker_env

    from stream.kafka import ensure_topics, make_admin

    admin = make_admin(settings)
    for fut in admin.delete_topics([settings.topic("decisions")], operation_timeout=10).values():
        fut.result(15)
    wait_for(lambda: settings.topic("decisions") not in admin.list_topics(timeout=5).topics, 30, "deleted")
    ensure_topics(admin, [settings.topic("decisions")], settings.partitions + 1)
    try:
        r = subprocess.run([sys.executable, "-c", "from infra.cli import main; main()", "log", "--out",
                            str(tmp_path / "log"), "--no-metrics"], env=worker_env(settings), cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("rta log started with mismatched partition counts")
    lines = [x for x in r.stderr.strip().splitlines() if not x.startswith("%")]
    assert r.returncode == 2 and len(lines) == 1 and "partitions" in lines[0], r.stderr[-2000:]


def test_a_request_and_its_decision_on_other_partition_numbers_are_counted(settings, tmp_path: Path):
    """Issue 27 item 5: when the producers partition one key differently the join still works on
    a member holding both, and the mismatch is visible (rta_log_cross_partition_joins)."""
    ids, ts, reqs = _requests(20, "x")
    bodies, _ = _decisions(ids, ts)
    _put(settings, "requests", reqs + reqs, ids + ids, partition=0)  # each request twice (a replay)
    _put(settings, "decisions", bodies, ids, partition=1)
    with logging_to(settings, tmp_path / "log", roll_seconds=0.3, batch_wait_ms=20, metrics_port=0) as lg:
        wait_for(lambda: lg.stats.impressions >= 20, 60, "rows written")
        text = _metrics(lg)
        assert "rta_log_cross_partition_joins_total 20.0" in text
        assert 'rta_log_duplicates_total{side="request"} 20.0' in text
    assert lg.stats.cross_partition_joins == 20 and lg.stats.duplicates == 20
    assert read_log(tmp_path / "log").num_rows == 20


def test_every_producer_partitions_a_key_as_the_java_client_does(settings):
    """Issue 27 item 5: murmur2 (checked with aiokafka's own partitioner, an independent client);
    librdkafka's default (CRC32) put most of these keys elsewhere."""
    from aiokafka.partitioner import murmur2
    from confluent_kafka import Consumer

    keys = [f"key-{i}" for i in range(60)]
    _put(settings, "requests", [b"{}"] * len(keys), keys, partition=None)
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group_of(settings),
                  "auto.offset.reset": "earliest"})
    c.subscribe([settings.topic("requests")])
    got: dict[str, int] = {}
    deadline = time.monotonic() + 60
    while len(got) < len(keys) and time.monotonic() < deadline:
        for m in c.consume(100, 0.5):
            if m.error() is None:
                got[m.key().decode()] = m.partition()
    c.close()
    n = settings.partitions
    assert got == {k: (murmur2(k.encode()) & 0x7FFFFFFF) % n for k in keys}


def test_a_full_disk_stops_the_logger_in_one_line_and_commits_nothing_unwritten(settings, tmp_path: Path):
    """Issue 27 item 9: a write that fails (here EFBIG from a file-size limit, as a full disk
    gives ENOSPC) stops `rta log` with one `rta:` line, exit 2, no traceback, and commits no
    offset past the file that failed. Break tried: catching OSError in roll and carrying on ->
    the offsets committed, rows lost."""
    import resource
    import subprocess

    from worker_support import worker_env

    ids, ts, reqs = _requests(500, "f")
    bodies, _ = _decisions(ids, ts)
    _produce(settings, "requests", reqs, ids)
    _produce(settings, "decisions", bodies, ids)

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    r = subprocess.run([sys.executable, "-c", "from infra.cli import main; main()", "log", "--out",
                        str(tmp_path / "log"), "--no-metrics", "--group", group_of(settings),
                        "--roll-seconds", "0.3", "--batch-wait-ms", "20"],
                       env=worker_env(settings), cwd=tmp_path, capture_output=True, text=True, timeout=90,
                       preexec_fn=small_files)
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("rta:")]
    assert r.returncode == 2 and len(lines) == 1 and "cannot write under" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert all(o <= 0 for o in committed(settings, group_of(settings)).values())
    assert not list((tmp_path / "log").rglob("*.parquet"))
