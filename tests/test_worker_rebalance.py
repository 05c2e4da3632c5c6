"""What docs/operations.md promises about group membership, liveness and broker outages, on
the real broker: a rebalance commits before partitions move (nothing decided twice), a member
whose partitions are lost does not commit them (the new owner replays, nothing is skipped),
`/healthz` turns 503 when the loop stalls and 200 again when it turns, and a broker that hangs
for longer than the producer and commit timeouts costs no decision."""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import replace

import pytest
from worker_support import (
    assigned,
    committed,
    decisions,
    feeding,
    produce,
    read_topic,
    request_values,
    running,
    spawn_worker,
    wait_for,
)

from stream.errors import WorkerError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("targets")]  # `bundle`: conftest


def test_a_member_joining_mid_stream_gets_committed_offsets_and_repeats_nothing(settings, bundle):
    n, rate = 30_000, 3000
    ids, values = request_values(n)
    # commits only at the rebalance: a 60 s interval never comes due in this test, so nothing but
    # the revoke's own commit can keep the second member from deciding the first one's work again
    with running(settings, group_id="rb", seed=1, commit_interval_s=60.0) as a, \
            feeding(settings, values, ids, rate) as feeder:
        wait_for(lambda: assigned(a) == 3 and a.stats.events >= 5000, 60, "the first member deciding")
        with running(settings, group_id="rb", seed=2) as b:
            wait_for(lambda: assigned(a) and assigned(b) and assigned(a) + assigned(b) == 3, 60,
                     "the partitions split between the two members")
            feeder.join(60)
            wait_for(lambda: a.stats.events + b.stats.events >= n, 60, "all decided")
            assert b.stats.events > 0
    got = decisions(settings, n, quiet=1.0)
    counts = Counter(d["request_id"] for d in got)
    assert set(counts) == set(ids)
    # the revoke committed everything the first member had decided: the second starts after it
    assert max(counts.values()) == 1, f"{sum(c > 1 for c in counts.values())} requests decided twice"


def test_a_member_that_lost_its_partitions_does_not_commit_them(settings, bundle, tmp_path):
    n, rate = 30_000, 2000
    ids, values = request_values(n)
    stopped = spawn_worker(settings, tmp_path / "a", "--group", "rb-lost", "--commit-interval-ms", "500")
    try:
        with feeding(settings, values, ids, rate) as feeder:
            wait_for(lambda: len(read_topic(settings, "decisions", 3000, timeout=1)) >= 3000, 60,
                     "the first member deciding", step=0.5)
            with running(settings, group_id="rb-lost", seed=2) as b:
                wait_for(lambda: assigned(b) >= 1, 60, "the second member joining")
                # freeze the first member past its session timeout (6 s): the group takes its
                # partitions away; when it wakes up they are lost, not revoked
                os.kill(stopped.pid, signal.SIGSTOP)
                try:
                    wait_for(lambda: assigned(b) == 3, 60, "the second member owning everything")
                finally:
                    os.kill(stopped.pid, signal.SIGCONT)
                log = next((tmp_path / "a").glob("worker-*.log"))
                wait_for(lambda: '"event": "lost"' in log.read_text(errors="replace")
                         or '"event":"lost"' in log.read_text(errors="replace"), 60,
                         "the first member noticing it lost its partitions")
                feeder.join(60)
                try:  # (read to the end of every partition: duplicates make `n` arrive early)
                    wait_for(lambda: len({d["request_id"] for d in decisions(settings, n, timeout=10, quiet=0.5)})
                             >= n, 90, "every request decided", step=1.0)
                except AssertionError:
                    raise AssertionError(f"undecided requests per partition (first, last, count): "
                                         f"{_undecided(settings, ids)}; committed {committed(settings, 'rb-lost')}, "
                                         f"second member owns {sorted(p for _, p in b.assignment)}") from None
        stopped.send_signal(signal.SIGTERM)
        assert stopped.wait(30) == 0  # it rejoined and drained normally
    finally:
        if stopped.poll() is None:
            stopped.kill()
            stopped.wait()
    got = decisions(settings, n, quiet=1.0)
    assert {d["request_id"] for d in got} == set(ids)  # nothing skipped by the handover


def _undecided(settings, ids: list[str]) -> dict[int, tuple[int, int, int]]:
    where = {m.key().decode(): (m.partition(), m.offset()) for m in read_topic(settings, "requests", len(ids))}
    have = {d["request_id"] for d in decisions(settings, len(ids), timeout=10, quiet=0.5)}
    per: dict[int, list[int]] = {}
    for rid in ids:
        if rid not in have:
            per.setdefault(where[rid][0], []).append(where[rid][1])
    return {p: (min(v), max(v), len(v)) for p, v in per.items()}


def test_healthz_turns_503_when_the_loop_stalls(settings, bundle):
    ids, values = request_values(200)
    produce(settings, values, ids)
    gate = threading.Event()
    gate.set()
    with running(settings, group_id="rb-health", metrics_port=0) as w:
        w.metrics.health = functools.partial(w.metrics.health, stall_s=1.0)  # the test's patience
        score = w.scorer.score

        def gated_score(num, cat):
            gate.wait(60)
            return score(num, cat)

        w.scorer.score = gated_score
        url = f"http://127.0.0.1:{w.server.port}/healthz"

        seen: dict[int, dict] = {}

        def status() -> int:
            try:
                res = urllib.request.urlopen(url, timeout=5)
            except urllib.error.HTTPError as exc:  # 503 comes as an HTTPError
                res = exc
            seen[res.status] = json.loads(res.read())
            return res.status

        wait_for(lambda: w.stats.events >= 200, 60, "the first requests decided")
        wait_for(lambda: status() == 200, 10, "healthy while the loop turns")
        gate.clear()  # the next batch blocks inside scoring: the loop stops turning
        more_ids, more_values = request_values(10, prefix="s")
        produce(settings, more_values, more_ids)
        try:
            wait_for(lambda: status() == 503, 30, "503 while the loop is stalled")
            assert seen[503]["state"] == "running" and seen[503]["loop_age_s"] >= 1.0, seen[503]
        finally:
            gate.set()
        wait_for(lambda: w.stats.events >= 210, 30, "the stalled batch decided")
        wait_for(lambda: status() == 200, 10, "healthy again")


def test_a_broker_outage_costs_no_decision(settings, bundle, kafka):
    n, rate = 24_000, 2000
    ids, values = request_values(n)
    # the worker's producer gives up on a message after 3 s: decisions produced while the broker
    # hangs fail for real, and only replaying their checkpoint gets them out
    impatient = replace(settings, kafka={**settings.kafka, "message.timeout.ms": "3000"})
    stopped: list[BaseException] = []
    with feeding(settings, values, ids, rate) as feeder:
        try:
            with running(impatient, group_id="rb-outage", seed=0, flush_timeout_s=3.0) as w:
                wait_for(lambda: assigned(w) == 3 and w.stats.events >= 4000, 60, "deciding before the outage")
                kafka.freeze()
                try:  # longer than the flush and message timeouts: checkpoints and deliveries fail
                    time.sleep(8)
                finally:
                    kafka.thaw()
                feeder.join(120)
                wait_for(lambda: w._fatal is not None or len({d["request_id"] for d in decisions(
                    settings, n, timeout=10, quiet=0.5)}) >= n, 120, "decided, or stopped", step=1.0)
                # the outage was felt: failed checkpoints, or the group took the partitions away
                assert w.stats.checkpoint_failures + w.stats.lost_partitions >= 1, w.stats
        except WorkerError as exc:
            # On the embedded broker the idempotent producer can come back fenced (fatal): the
            # worker then stops with one line instead of replaying for ever, and what it did not
            # commit is replayed by its replacement, as after a crash.
            stopped.append(exc)
            assert "fatally" in str(exc) and "\n" not in str(exc)
        if stopped:
            with running(settings, group_id="rb-outage", seed=1) as again:
                wait_for(lambda: len({d["request_id"] for d in decisions(settings, n, timeout=10, quiet=0.5)})
                         >= n, 120, "every request decided by the replacement", step=1.0)
                assert again.stats.events > 0
    got = decisions(settings, n, quiet=1.0)
    assert {d["request_id"] for d in got} == set(ids)
