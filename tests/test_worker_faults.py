"""Acceptance of the streaming worker (issue 5), against the real broker and Redis.

Traffic is produced at a steady rate (as in production) so the controller sees a live window.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from collections import Counter

import numpy as np
import pytest
from student_data import random_batch
from worker_support import (
    MALFORMED,
    RTA,
    assigned,
    committed,
    decisions,
    feeding,
    make_spread_bundle,
    produce,
    read_topic,
    request_values,
    running,
    spawn_worker,
    wait_for,
    worker_process,
)

from infra.stack import free_port
from stream.events import decode_requests
from stream.policy import Targets
from stream.window import RedisStore

pytestmark = pytest.mark.slow

R, P_U, EPS = 0.25, 0.05, 0.01


@pytest.fixture
def bundle(settings):
    return make_spread_bundle(settings.model_dir, "v1", seed=0)


@pytest.fixture
def store(settings):
    s = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
    s.set_targets(Targets(R, P_U, EPS), "test", "acceptance")
    return s


def _by_index(got: list[dict], prefix: str = "r") -> dict[int, dict]:
    return {int(d["request_id"][len(prefix):]): d for d in got if d["request_id"].startswith(prefix)}


def _block_share(docs: list[dict]) -> float:
    return sum(d["decision"] == "block" for d in docs) / len(docs)


def test_100k_requests_each_decided_once_and_block_share_holds(settings, bundle, store):
    n = 100_000
    ids, values = request_values(n)
    with running(settings, group_id="acc", seed=0) as w:
        wait_for(lambda: assigned(w) == 3, 30, "assignment")
        produce(settings, values, ids, rate=5000)
        wait_for(lambda: w.stats.events >= n, 60, "all decided")
    got = decisions(settings, n, quiet=0.5)
    counts = Counter(d["request_id"] for d in got)
    assert len(got) == n and set(counts) == set(ids)  # none missing, none twice
    last = [d for i, d in sorted(_by_index(got).items()) if i >= n - 50_000]
    share = _block_share(last)
    assert abs(share - R) <= 0.01, f"block share {share:.4f} vs r={R}"


def test_ratio_change_mid_stream_is_held_after_settling(settings, bundle, store):
    n, rate = 90_000, 6000
    ids, values = request_values(n)
    with running(settings, group_id="acc-set", seed=0) as w, feeding(settings, values, ids, rate) as feeder:
        wait_for(lambda: w.stats.events >= 30_000, 60, "a first third decided")
        r = subprocess.run(
            [*RTA, "ratio", "--redis-url", settings.redis_url, "--redis-prefix", settings.redis_prefix,
             "set", "0.1", "--pass-share", str(P_U), "--explore", str(EPS), "--reason", "test step",
             "--no-audit-topic"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        changed_ms = time.time() * 1000
        feeder.join(120)
        wait_for(lambda: w.stats.events >= n, 60, "all decided")
    got = decisions(settings, n, quiet=0.5)
    settled = [d for d in got if d["ts_ms"] >= changed_ms + 4000]  # decided 4 s after the change
    assert len(settled) > 5000
    assert all(d["target_ratio"] == 0.1 for d in settled)
    share = _block_share(settled)
    assert abs(share - 0.1) <= 0.01, f"block share {share:.4f} after the step to r=0.1"


def test_two_workers_in_one_group_hold_the_global_share(settings, bundle, store):
    n, rate = 60_000, 6000
    ids, values = request_values(n)
    with running(settings, group_id="acc-2", seed=1) as a, running(settings, group_id="acc-2", seed=2) as b:
        wait_for(lambda: assigned(a) + assigned(b) == 3 and assigned(a) and assigned(b), 60,
                 "partitions split between the two workers")
        produce(settings, values, ids, rate=rate)
        wait_for(lambda: a.stats.events + b.stats.events >= n, 60, "all decided")
        assert a.stats.events > 5000 and b.stats.events > 5000
    got = _by_index(decisions(settings, n, quiet=0.5))
    assert len(got) == n
    share = _block_share([d for i, d in got.items() if i >= n // 3])
    assert abs(share - R) <= 0.01, f"global block share {share:.4f} vs r={R}"


def test_kill_9_mid_stream_then_restart_leaves_no_request_undecided(settings, bundle, store, tmp_path):
    n, interval_ms, rate = 40_000, 500, 5000
    ids, values = request_values(n)
    args = ("--group", "acc-kill", "--commit-interval-ms", str(interval_ms))
    procs = [spawn_worker(settings, tmp_path, *args)]
    try:
        # the feed starts once the first worker owns the partitions, so it decides at the feed's
        # pace (a backlog would be decided in a burst just before the kill)
        wait_for(lambda: any('"event":"assigned"' in f.read_text(errors="replace")
                             for f in tmp_path.glob("worker-*.log")), 60, "the first worker's assignment")
        with feeding(settings, values, ids, rate=rate) as feeder:
            # long enough (~6 s at this rate) that replaying more than one commit interval shows
            wait_for(lambda: len(read_topic(settings, "decisions", 30_000, timeout=2)) >= 30_000, 60,
                     "the first worker deciding", step=0.5)
            os.kill(procs[0].pid, signal.SIGKILL)
            procs[0].wait(10)
            at_kill = committed(settings, "acc-kill")  # where the replacement starts
            procs.append(spawn_worker(settings, tmp_path, *args))
            feeder.join(60)
        got = decisions(settings, n, timeout=90, quiet=1.0)
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    counts = Counter(d["request_id"] for d in got)
    missing = set(ids) - set(counts)
    assert not missing, f"{len(missing)} requests without a decision"
    assert max(counts.values()) <= 2  # one crash, so at most one replay of anything
    dups = [rid for rid, c in counts.items() if c == 2]
    assert len(got) == n + len(dups)  # every decision is one request's first or its one replay
    # Every duplicate is a request the killed worker decided after its last commit (the
    # replacement replays from the committed offset, from nowhere earlier) ...
    where = {m.key().decode(): (m.partition(), m.offset()) for m in read_topic(settings, "requests", n)}
    early = [rid for rid in dups if where[rid][1] < at_kill[where[rid][0]]]
    assert not early, f"{len(early)} requests before the committed offset were decided twice"
    # ... and the replay is at most one commit interval's worth of the feed (docs/operations.md,
    # "Commits"), + 250 ms of it for a batch and the commit's own flush. A worker that never
    # committed would replay all ~30,000 it decided; one committing every 2 s, ~10,000.
    allowed = rate * (interval_ms + 250) / 1000
    assert len(dups) <= allowed, f"{len(dups)} duplicates, one interval allows {allowed:.0f}"


def test_redis_outage_degrades_then_recovers(settings, bundle, store, redis_server):
    rate = 2000
    ids, values = request_values(rate * 90)  # the feed is stopped once recovery has been seen
    with running(settings, group_id="acc-redis", seed=0) as w:
        wait_for(lambda: assigned(w) == 3, 30, "assignment")
        with feeding(settings, values, ids, rate):
            wait_for(lambda: w.stats.events >= 5 * rate, 60, "deciding before the outage")
            redis_server.stop()
            try:
                wait_for(lambda: w.controller.degraded, 30, "the controller noticing the outage")
                t_degraded = time.time() * 1000
                before = w.stats.events
                wait_for(lambda: w.stats.events >= before + 5 * rate, 60, "deciding on through the outage")
            finally:  # a failed assert must not leave Redis down for every later test
                t_start = time.time() * 1000  # before start(): the worker may rejoin while it returns
                redis_server.start()
            # a Redis without persistence comes back empty and nobody sets the targets again: the
            # worker keeps its last ones (docs/operations.md, "Redis restarted empty")
            wait_for(lambda: not w.controller.degraded, 60, "the controller rejoining")
            t_rejoin = time.time() * 1000
            after = w.stats.events
            wait_for(lambda: w.stats.events >= after + 4 * rate, 60, "deciding after the rejoin")
        sent = {m.key().decode() for m in read_topic(settings, "requests", 1, quiet=2.0)}
        wait_for(lambda: w.stats.events >= len(sent), 60, "every sent request decided")
        assert w.stats.degraded > 0
    got = decisions(settings, len(sent), quiet=0.5)
    assert {d["request_id"] for d in got} == sent
    # the last targets held through the outage and after the empty Redis (defaults: r = 0)
    assert w.controller.targets_source == "last"
    assert all(d["target_ratio"] == R for d in got), Counter(d["target_ratio"] for d in got)
    # while Redis was down (the controller degraded, Redis not yet back) every rule decision says so
    gap = [d for d in got if t_degraded + 500 < d["ts_ms"] < t_start]
    rule = [d for d in gap if d["reason"] not in ("explore", "invalid")]
    assert len(rule) >= 0.5 * 5 * rate and all(d["reason"] == "degraded" for d in rule)
    late = [d for d in got if d["ts_ms"] > t_rejoin + 1000]
    assert len(late) >= 2 * rate and all(d["reason"] != "degraded" for d in late)
    # the window recovered: the global store holds the recent seconds again
    now = int(time.time())
    snap = store.read(range(now - 10, now + 1))
    assert sum(int(v[0]) for v in snap.buckets.values()) > 0


def test_serve_with_redis_unreachable_from_the_start_serves_degraded(settings, bundle, tmp_path):
    # nothing listens on this port: the worker starts anyway and decides from its own window
    dead = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    n = 2000
    ids, values = request_values(n)
    produce(settings, values, ids)
    with worker_process(dead, tmp_path, "--group", "acc-no-redis") as proc:
        got = decisions(settings, n, timeout=90, quiet=0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert sorted(d["request_id"] for d in got) == sorted(ids)
    # it never read any targets: the defaults (block nothing), and every rule decision says degraded
    rule = [d for d in got if d["reason"] not in ("explore", "invalid")]
    assert len(rule) == n and all(d["reason"] == "degraded" and d["decision"] == "pass" for d in rule)
    assert all(d["target_ratio"] == 0.0 for d in got)
    (log,) = tmp_path.glob("worker-*.log")
    events = [json.loads(line).get("event") for line in log.read_text().splitlines() if line.startswith("{")]
    assert "degraded" in events and "stopped" in events


def test_1000_malformed_messages_all_dead_lettered_and_passed(settings, bundle, store):
    n, n_bad = 20_000, 1000
    ids, values = request_values(n)
    keys: list[str | None] = list(ids)
    rng = np.random.default_rng(0)
    bad_values: list[bytes] = []
    for k, at in enumerate(sorted(rng.choice(n, n_bad, replace=False).tolist(), reverse=True)):
        bad_values.append(MALFORMED[k % len(MALFORMED)].replace(b'"request_id": "r"', f'"request_id": "bad{k}"'.encode()))
        values.insert(at, bad_values[-1])
        keys.insert(at, f"bad{k}")
    after_ids, after_values = request_values(100, prefix="after")
    with running(settings, group_id="acc-bad", seed=0) as w:
        wait_for(lambda: assigned(w) == 3, 30, "assignment")
        produce(settings, values, keys, rate=10_000)
        wait_for(lambda: w.stats.events >= n + n_bad, 60, "all decided")
        # still serving after the malformed ones: requests sent afterwards are decided too
        produce(settings, after_values, after_ids)
        wait_for(lambda: w.stats.events >= n + n_bad + 100, 60, "the requests sent afterwards")
    assert w.stats.invalid == n_bad
    dlq = read_topic(settings, "dlq", n_bad, quiet=0.5)
    assert len(dlq) == n_bad
    # each dead letter carries the code the decoder gives its own bytes, and a message
    spec = random_batch(1)[0]
    expected = Counter(e.code for e in decode_requests(bad_values, None, spec, fingerprint=spec.fingerprint()).errors)
    codes = Counter(dict(m.headers())["rta-error-code"].decode() for m in dlq)
    assert codes == expected and len(expected) == 9  # the ten kinds of MALFORMED give nine codes
    assert all(dict(m.headers())["rta-error"] for m in dlq)
    got = decisions(settings, n + n_bad + 100, quiet=0.5)
    bad = [d for d in got if d["request_id"].startswith("bad")]
    assert len(bad) == n_bad and all(d["decision"] == "pass" and d["reason"] == "invalid" for d in bad)
    assert {d["request_id"] for d in got if not d["request_id"].startswith("bad")} == set(ids) | set(after_ids)
