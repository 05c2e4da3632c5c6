"""The worker against the real broker and Redis: decisions, DLQ, commits, reload, metrics, drain."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.request
from collections import Counter

import pytest
from student_data import make_bundle
from worker_support import (
    MALFORMED,
    RTA,
    assigned,
    committed,
    decisions,
    end_offsets,
    produce,
    read_topic,
    request_values,
    running,
    spawn_worker,
    wait_for,
)

from model.bundle import publish
from stream.policy import Targets
from stream.window import RedisStore

pytestmark = pytest.mark.slow  # each test joins a consumer group (~3 s on the embedded broker)


@pytest.fixture
def bundle(settings):
    return make_bundle(settings.model_dir, "v1", seed=0)


@pytest.fixture
def targets(settings):
    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
    store.set_targets(Targets(0.3, 0.05, 0.02), "test", "worker test")
    return store


def test_every_request_gets_one_decision_and_bad_ones_go_to_the_dlq(settings, bundle, targets):
    ids, values = request_values(5000)
    keys: list[str | None] = list(ids)
    bad_ids = [f"bad{i}" for i in range(50)]
    for i, rid in enumerate(bad_ids):  # malformed bodies keyed by request id (some without a key)
        at = 100 * i + 7
        values.insert(at, MALFORMED[i % len(MALFORMED)].replace(b'"request_id": "r"', f'"request_id": "{rid}"'.encode()))
        keys.insert(at, rid if i % 5 else None)
    produce(settings, values, keys)
    with running(settings, group_id="g1", seed=1) as w:
        wait_for(lambda: w.stats.events >= len(values), 60, "all requests decided")
    assert w.stats.invalid == 50

    got = decisions(settings, len(values), quiet=0.5)
    assert len(got) == len(values)
    rid_counts = Counter(d["request_id"] for d in got)
    # no duplicates without a crash (identical unkeyed garbage shares its "invalid:<sha1>" id)
    assert max(c for rid, c in rid_counts.items() if not rid.startswith("invalid:")) == 1
    assert set(ids) <= set(rid_counts)
    assert all(d["_headers"]["rta-model"] == b"v1" and d["model"] == "v1" for d in got)
    assert all(d["_key"] == d["request_id"].encode() for d in got)
    invalid = [d for d in got if d["reason"] == "invalid"]
    assert len(invalid) == 50 and all(d["decision"] == "pass" and d["p"] is None for d in invalid)
    keyed = {rid for i, rid in enumerate(bad_ids) if i % 5}
    assert keyed <= {d["request_id"] for d in invalid}  # id taken from the Kafka key
    assert {d["reason"] for d in got} >= {"score", "invalid"}

    dlq = read_topic(settings, "dlq", 50, quiet=0.5)
    assert len(dlq) == 50
    for m in dlq:
        h = dict(m.headers())
        assert h["rta-error-code"] and h["rta-error"] and h["rta-source-topic"] == settings.topic("requests").encode()
    assert sorted(m.value() for m in dlq) == sorted(values[100 * i + 7] for i in range(50))

    # drained: every offset committed, after every decision was delivered
    assert committed(settings, "g1") == end_offsets(settings, len(values))


def test_hot_reload_switches_model_and_refuses_a_corrupt_one(settings, bundle, targets):
    ids, values = request_values(3000)
    with running(settings, group_id="g2", reload_interval_s=0.1) as w:
        wait_for(lambda: assigned(w) == 3, 30, "partition assignment")
        produce(settings, values[:1000], ids[:1000])
        wait_for(lambda: w.stats.events >= 1000, 30, "first 1000 decided")
        v2 = make_bundle(settings.model_dir, "v2", seed=1, publish=False)
        publish(v2)
        wait_for(lambda: w.scorer.version == "v2", 10, "reload to v2")
        produce(settings, values[1000:2000], ids[1000:2000])
        wait_for(lambda: w.stats.events >= 2000, 30, "second 1000 decided")
        # a corrupt bundle: the student's bytes no longer match the manifest
        v3 = settings.model_dir / "v3"
        shutil.copytree(v2, v3)
        onnx = v3 / "student.onnx"
        onnx.write_bytes(onnx.read_bytes()[:-10] + b"0123456789")
        publish(v3)
        wait_for(lambda: w.stats.refused_reloads == 1, 10, "v3 refused")
        produce(settings, values[2000:], ids[2000:])
        wait_for(lambda: w.stats.events >= 3000, 30, "third 1000 decided")
        assert w.scorer.version == "v2" and w.stats.reloads == 1
    got = {d["request_id"]: d["model"] for d in decisions(settings, 3000)}
    assert {got[i] for i in ids[:1000]} == {"v1"}
    assert {got[i] for i in ids[2000:]} == {"v2"}  # still v2 after v3 was refused


def test_metrics_and_health_endpoints(settings, bundle, targets):
    ids, values = request_values(2000)
    produce(settings, values, ids)
    with running(settings, group_id="g3", metrics_port=0) as w:
        wait_for(lambda: w.stats.events >= 2000, 60, "all decided")
        wait_for(lambda: w.stats.commits >= 1, 10, "a checkpoint committed")
        base = f"http://127.0.0.1:{w.server.port}"
        health = urllib.request.urlopen(f"{base}/healthz", timeout=5)
        assert health.status == 200 and b'"running"' in health.read()
        text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    assert "rta_events_total 2000.0" in text
    assert 0 < w.stats.commit_max_s <= w.stats.commit_s  # checkpoint time, as the histogram sees it
    for name in ("rta_batch_seconds_bucket", "rta_commit_seconds_bucket", "rta_block_share", "rta_theta", "rta_tau_u",
                 'rta_model_info{fingerprint=', 'rta_redis_state{state="ok"} 1.0', "rta_dlq",
                 "rta_uncertain_share", "rta_explore_share"):
        assert name in text, name
    with pytest.raises(OSError):  # the server is gone with the worker
        urllib.request.urlopen(f"{base}/healthz", timeout=2)


def test_sigterm_drains_commits_and_exits_zero(settings, bundle, targets, tmp_path):
    ids, values = request_values(4000)
    produce(settings, values, ids)
    proc = spawn_worker(settings, tmp_path / "w", "--group", "g4", "--commit-interval-ms", "60000")
    try:
        got = decisions(settings, 4000, timeout=60)
        assert len({d["request_id"] for d in got}) == 4000
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the 60 s commit interval never came due: only the drain committed
    assert committed(settings, "g4") == end_offsets(settings, 4000)
    (log,) = (tmp_path / "w").glob("worker-*.log")
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    stopped = [r for r in records if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["events"] == 4000 and stopped[0]["commits"] >= 1
    assert 0 < stopped[0]["commit_max_s"] <= stopped[0]["commit_s"]


def test_exactly_once_mode(settings, bundle, targets):
    ids, values = request_values(3000)
    produce(settings, values, ids)
    with running(settings, group_id="g5", exactly_once=True, commit_interval_s=0.2) as w:
        wait_for(lambda: w.stats.events >= 3000, 60, "all decided")
        wait_for(lambda: w.stats.commits >= 1, 10, "a transaction committed")
    got = decisions(settings, 3000, quiet=0.5)
    assert sorted(d["request_id"] for d in got) == sorted(ids)
    assert committed(settings, "g5") == end_offsets(settings, 3000)


def test_bad_flags_are_one_line_errors(tmp_path):
    r = subprocess.run([*RTA, "serve", "--batch-size", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "batch-size" in r.stderr and "Traceback" not in r.stderr
    empty = tmp_path / "empty-models"
    empty.mkdir()
    r = subprocess.run([*RTA, "serve", "--model-dir", str(empty), "--no-metrics"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "no model published" in r.stderr and "Traceback" not in r.stderr
