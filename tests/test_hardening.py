"""Production hardening (issue 13), each fault against the real broker and Redis.

A poison pill, an endless replay, a rewind that skips, Redis errors other than a lost
connection, bad bundles, NaN outputs, targets after a Redis restart, clock steps, exactly-once
fencing, settings precedence, Redis ACL users, and an independent Kafka client (aiokafka).
Fault tests restore what they break in try/finally and poll for states with deadlines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from student_data import random_batch
from worker_support import (
    MALFORMED,
    RTA,
    committed,
    decisions,
    produce,
    read_topic,
    request_values,
    running,
    serving,
    spawn_worker,
    wait_for,
    worker_env,
    worker_process,
)

from infra.stack import free_port
from model.bundle import publish, update_manifest
from stream.checkpoint import (
    Checkpoint,
    CheckpointDeliveryError,
    CheckpointRewindError,
    DeliveryReports,
)
from stream.controller import ControllerConfig, RatioController
from stream.errors import ConfigError, InfeasibleTargets
from stream.events import encode_requests
from stream.kafka import make_consumer, make_producer
from stream.policy import Targets, decide
from stream.window import ACL_ROLES, RedisStore, StoreUnavailable
from stream.worker import DLQ_MAX_BYTES, Worker, WorkerConfig


def _big_request(rid: str, size: int = 2_000_000) -> bytes:
    """A request of `size` bytes that compresses to almost nothing (the broker takes it)."""
    pad = b"a" * size
    return b'{"v":1,"request_id":"' + rid.encode() + b'","ts_ms":1,"features":{"n0":"' + pad + b'"}}'


# --- 1. an oversized request costs only itself --------------------------------------------


@pytest.mark.slow
def test_oversized_compressed_request_is_dead_lettered_truncated_and_the_worker_goes_on(settings, bundle, targets):
    ids, values = request_values(600)
    big = _big_request("big0")
    p = make_producer(settings, **{"compression.type": "gzip", "message.max.bytes": 5_000_000})
    topic = settings.topic("requests")
    for i, (k, v) in enumerate(zip(ids, values, strict=True)):
        if i == 300:
            p.produce(topic, big, b"big0", partition=0)
        p.produce(topic, v, k)
    assert p.flush(30) == 0
    with running(settings, group_id="h-big", seed=0, commit_interval_s=0.2) as w:
        wait_for(lambda: w.stats.events >= 601, 60, "every request decided")
        # the worker did not die and committed past the big one
        wait_for(lambda: sum(committed(settings, "h-big").values()) == 601, 30, "offsets committed")
    got = decisions(settings, 601, quiet=0.5)
    by_id = {d["request_id"]: d for d in got}
    assert set(by_id) == {*ids, "big0"}
    assert by_id["big0"]["decision"] == "pass" and by_id["big0"]["reason"] == "invalid"
    dlq = read_topic(settings, "dlq", 1, quiet=0.5)
    assert len(dlq) == 1
    h = dict(dlq[0].headers())
    assert h["rta-error-code"] == b"oversized" and h["rta-truncated"] == str(len(big)).encode()
    assert dlq[0].value() == big[:DLQ_MAX_BYTES]


# --- 2. a permanent produce failure backs off ---------------------------------------------


@pytest.mark.slow
def test_permanently_failing_dlq_backs_off_names_the_topic_and_turns_unhealthy(settings, bundle, targets, caplog):
    bad = dataclasses.replace(settings, topics={**settings.topics, "dlq": "no such topic!"})  # invalid name
    ids, values = request_values(2000)
    produce(settings, values + MALFORMED[:3], ids + ["bad0", "bad1", "bad2"])
    caplog.set_level(logging.ERROR, logger="rta.worker")
    with running(bad, group_id="h-dlq", seed=0, commit_interval_s=0.1, checkpoint_backoff_s=0.5,
                 checkpoint_backoff_max_s=4.0) as w:
        wait_for(lambda: w.stats.checkpoint_failures >= 3, 90, "three failed checkpoints")
        ok, health = w.metrics.health()
        assert not ok and "checkpoint_failing" in health["alerts"] and health["checkpoint_failing"] >= 3
        assert w.metrics.failing_checkpoints._value.get() >= 3
        # from here the pauses are 2, 4, 4 ... s: in >= 8 s at most 3 more replays (no backoff:
        # one every commit interval, i.e. dozens)
        t0, before = time.monotonic(), w.stats.checkpoint_failures
        time.sleep(8.0)
        replays = (w.stats.checkpoint_failures - before) / max(1.0, (time.monotonic() - t0) / 8.0)
        assert replays <= 3, f"{replays} replays in 8 s"
        assert not w._stop.is_set()  # still serving, still trying
    done = committed(settings, "h-dlq")  # the dead letters' checkpoint never commits: nothing skipped
    assert sum(max(o, 0) for o in done.values()) < 2003, done
    lines = [r.getMessage() for r in caplog.records if "checkpoint failed" in r.getMessage()]
    assert lines and all("no such topic!" in line and "in a row" in line for line in lines)


class _CommitFails(Consumer):
    """A real group consumer whose first `left` offset commits fail the way a group coordinator's
    refusal does (fault injection at the client; the broker is real)."""

    left = 0

    def commit(self, *args, **kwargs):
        if type(self).left > 0:
            type(self).left -= 1
            raise KafkaException(KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE, "injected: commit refused"))
        return super().commit(*args, **kwargs)


def test_a_failed_offset_commit_rewinds_replays_and_is_counted(settings, bundle, targets, monkeypatch):
    n, fails = 1000, 2
    ids, values = request_values(n)
    produce(settings, values, ids)
    monkeypatch.setattr(_CommitFails, "left", fails)
    with monkeypatch.context() as m:  # only the worker's consumer
        m.setattr("stream.kafka.Consumer", _CommitFails)
        worker = Worker(settings, WorkerConfig(group_id="h-commit", seed=0, commit_interval_s=0.2,
                                               checkpoint_backoff_s=0.1))
    with serving(worker, "worker-h-commit") as w:
        wait_for(lambda: sum(committed(settings, "h-commit").values()) == n, 60, "every offset committed")
    assert _CommitFails.left == 0 and w.stats.checkpoint_failures == fails
    # the metric by value, as /metrics exports it
    failures = w.metrics.registry.get_sample_value("rta_checkpoint_failures_total", {"kind": "CheckpointCommitError"})
    assert failures == fails
    # rewound: the failed checkpoints' requests were decided again (their first decisions had been
    # delivered, so they appear twice), and nothing is missing
    got = decisions(settings, n, quiet=0.5)
    assert {d["request_id"] for d in got} == set(ids)
    assert w.stats.events == len(got) > n


# --- 3. a rewind that cannot seek back never commits over the gap -------------------------


class _SeekFails(Consumer):
    """A real consumer whose seek() fails the way librdkafka's does for a partition it is not
    fetching (`Local: Erroneous state`): fault injection, the broker is real."""

    def seek(self, partition: TopicPartition) -> None:
        raise KafkaException(KafkaError(KafkaError._STATE, "Failed to seek: Local: Erroneous state"))


def test_failed_seek_during_rewind_refuses_every_later_commit(settings):
    topic = settings.topic("requests")
    p = make_producer(settings)
    for i in range(30):
        p.produce(topic, f"m{i}".encode(), partition=0)
    assert p.flush(15) == 0
    reports = DeliveryReports()
    producer = make_producer(settings, **reports.producer_config())
    consumer = _SeekFails({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "h-seek",
                           "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition(topic, 0, 0)])
    cp = Checkpoint(consumer, producer, reports, commit_interval_s=0)

    def batch(n: int) -> list:
        out: list = []
        deadline = time.monotonic() + 30
        while len(out) < n and time.monotonic() < deadline:
            out += [m for m in consumer.consume(n - len(out), 0.5) if m.error() is None]
        assert len(out) == n
        return out

    try:
        first = batch(20)
        for m in first:  # decisions that the broker refuses (invalid topic name)
            producer.produce("no such topic!", m.value())
        cp.store_offsets(topic, np.zeros(20, np.int32), np.array([m.offset() for m in first]))
        with pytest.raises(CheckpointDeliveryError):
            cp.commit()
        with pytest.raises(CheckpointRewindError, match="seek failed"):
            cp.rewind()
        # the consumer is past the undelivered 20: the next batch's good decisions must not commit
        nxt = batch(10)
        for m in nxt:
            producer.produce(settings.topic("decisions"), m.value())
        cp.store_offsets(topic, np.zeros(10, np.int32), np.array([m.offset() for m in nxt]))
        with pytest.raises(CheckpointRewindError):
            cp.commit()
        got = consumer.committed([TopicPartition(topic, 0)], 10)[0].offset
        assert got < 0, f"committed {got}: decisions of offsets 0..19 were never delivered"
    finally:
        consumer.close()


# --- 4. Redis refusing (not unreachable) degrades, never raises ---------------------------


def _batch(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    e, u = rng.random(n), rng.random(n) * 0.1
    return e, u, decide(e, u, None, rng.random(n), 0.5, 0.09, 0.0)


def _drive(ctl: RatioController, until, what: str, timeout: float = 30.0) -> None:
    """Observe batches until `until(ctl)` holds (the hot path must never raise meanwhile)."""
    e, u, d = _batch()
    wait_for(lambda: (ctl.observe(e, u, d), ctl.thresholds(), until(ctl))[-1], timeout, what, step=0.05)


@contextlib.contextmanager
def _refusing(redis_client, kind: str, url: str):
    """Make the session's Redis refuse writes the way production does; always undo it."""
    if kind == "OOM":
        before = redis_client.config_get("maxmemory*")
        redis_client.config_set("maxmemory-policy", "noeviction")
        redis_client.config_set("maxmemory", 1)
        try:
            yield url
        finally:
            redis_client.config_set("maxmemory", before["maxmemory"])
            redis_client.config_set("maxmemory-policy", before["maxmemory-policy"])
    elif kind == "READONLY":  # a failover demoted this server to a replica (of a dead master)
        redis_client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        try:
            yield url
        finally:
            redis_client.execute_command("REPLICAOF", "NO", "ONE")
    else:  # NOPERM: the worker's ACL user lost its write permission
        user = f"h13-{uuid.uuid4().hex[:6]}"
        redis_client.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "+@all", "-hset", "-set")
        try:
            yield url.replace("redis://", f"redis://{user}:pw@", 1)
        finally:
            redis_client.execute_command("ACL", "DELUSER", user)


@pytest.mark.parametrize("kind", ["OOM", "READONLY", "NOPERM"])
def test_redis_refusing_writes_degrades_the_controller_and_it_rejoins(settings, redis_client, kind):
    RedisStore.from_url(settings.redis_url, settings.redis_prefix).set_targets(Targets(0.3), "test", kind)
    cfg = ControllerConfig(refresh_interval=0.05, backoff_initial=0.05, backoff_max=0.2)
    with _refusing(redis_client, kind, settings.redis_url) as url:
        ctl = RatioController.from_settings(dataclasses.replace(settings, redis_url=url), cfg)
        _drive(ctl, lambda c: c.degraded, f"degraded under {kind}")
        assert ctl.thresholds().degraded and ctl.last_error.startswith("redis refused")
        if kind == "NOPERM":  # the user stays refused: rejoining is the next block's job
            return
    _drive(ctl, lambda c: not c.degraded, "rejoined")
    assert ctl.thresholds().targets.r == 0.3


# --- 5. a bad bundle is refused, never a crash --------------------------------------------


def _edit_graph(bundle_dir: Path, build) -> Path:
    """Rename the graph's `p` output to `p_raw`, let `build(graph)` add nodes producing `p`, and
    re-hash the manifest: a bundle that passes every static check."""
    import json

    import onnx

    # the graph the worker serves: the manifest's serving graph (bundle format 2), else student.onnx
    served = json.loads((bundle_dir / "manifest.json").read_text()).get("serving", {}).get("file", "student.onnx")
    model = onnx.load(str(bundle_dir / served))
    for node in model.graph.node:
        node.output[:] = ["p_raw" if o == "p" else o for o in node.output]
    build(model.graph)
    onnx.save(model, str(bundle_dir / served))
    update_manifest(bundle_dir)
    return bundle_dir


def _fails_at_run_time(graph) -> None:
    """p reshaped to 5 rows: loads fine, onnxruntime fails on any other batch size."""
    from onnx import helper, numpy_helper

    graph.initializer.append(numpy_helper.from_array(np.array([5, 4], np.int64), "h13_shape"))
    graph.node.append(helper.make_node("Reshape", ["p_raw", "h13_shape"], ["p"]))


def _nan_when_huge(graph) -> None:
    """p = NaN for rows whose first numeric feature is > 1e30 (a model fault on odd input)."""
    from onnx import helper, numpy_helper

    for name, arr in {"s0": np.array([0], np.int64), "s1": np.array([1], np.int64),
                      "big": np.array(1e30, np.float32), "nan": np.array(np.nan, np.float32)}.items():
        graph.initializer.append(numpy_helper.from_array(arr, f"h13_{name}"))
    graph.node.extend([helper.make_node("Slice", ["num", "h13_s0", "h13_s1", "h13_s1"], ["h13_x"]),
                       helper.make_node("Greater", ["h13_x", "h13_big"], ["h13_mask"]),
                       helper.make_node("Where", ["h13_mask", "h13_nan", "p_raw"], ["p"])])


def _nan_always(graph) -> None:
    """p = p_raw + NaN: loads and runs, and scores every row NaN (the smoke test's batch too)."""
    from onnx import helper, numpy_helper

    graph.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "h13_nan_all"))
    graph.node.append(helper.make_node("Add", ["p_raw", "h13_nan_all"], ["p"]))


def _variant(model_dir: Path, name: str, edit) -> Path:
    """A copy of v1 named `name`, changed by `edit(dir, manifest)` (manifest written after)."""
    out = model_dir / name
    shutil.copytree(model_dir / "v1", out)
    m = json.loads((out / "manifest.json").read_text())
    m["version"] = name
    edit(out, m)
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def _point_current(model_dir: Path, version: str) -> None:
    """Swap `current` as any tool could (publish() itself refuses a bad manifest)."""
    tmp = model_dir / f".tmp-{uuid.uuid4().hex[:6]}"
    os.symlink(version, tmp)
    os.replace(tmp, model_dir / "current")


def _bad_bundles(model_dir: Path) -> list[tuple[str, str]]:
    """(version, what its refusal must say) for each way a bundle is bad."""
    def types(d, m):
        m["tasks"] = "click,online"

    def dev_zero(d, m):  # would hang the hash
        m["files"]["/dev/zero"] = "0" * 64

    def escape(d, m):
        m["files"]["../v1/student.onnx"] = m["files"]["student.onnx"]

    def directory(d, m):  # read_bytes -> IsADirectoryError (PermissionError takes the same path)
        (d / "student.onnx").unlink()
        (d / "student.onnx").mkdir()

    def graph_edit(build):
        def edit(d, m):
            _edit_graph(d, build)
            m.clear()
            m.update(json.loads((d / "manifest.json").read_text()), version=d.name)
        return edit

    out = []
    for name, edit, says in (("bad-types", types, "'tasks'"), ("bad-devzero", dev_zero, "/dev/zero"),
                             ("bad-escape", escape, "../v1/student.onnx"), ("bad-dir", directory, "student.onnx"),
                             ("bad-ort", graph_edit(_fails_at_run_time), "smoke-test"),
                             ("bad-nan", graph_edit(_nan_always), "non-finite")):
        _variant(model_dir, name, edit)
        out.append((name, says))
    return out


@pytest.mark.slow
def test_bad_bundles_are_refused_while_the_old_one_serves_and_training_files_are_not_read(
        settings, bundle, targets, caplog):
    caplog.set_level(logging.ERROR, logger="rta.worker")
    model_dir = Path(settings.model_dir)
    bad = _bad_bundles(model_dir)

    def fifo_teacher(d, m):  # a serving-only bundle whose listed teacher would block any reader
        os.mkfifo(d / "teacher.pt")
        m["files"]["teacher.pt"] = "0" * 64
        (d / "student.pt").unlink()
    _variant(model_dir, "v2", fifo_teacher)
    ids, values = request_values(200)
    with running(settings, group_id="h-bundle", seed=0, reload_interval_s=0.1) as w:
        for k, (version, says) in enumerate(bad, start=1):
            _point_current(model_dir, version)
            wait_for(lambda k=k: w.stats.refused_reloads >= k, 30, f"{version} refused")
            assert w.scorer.version == "v1"
            line = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()][-1]
            assert version in line and says in line and len(line.splitlines()) == 1, line
        produce(settings, values, ids)
        wait_for(lambda: w.stats.events >= 200, 60, "decided by the old model")
        publish(model_dir / "v2")
        wait_for(lambda: w.scorer.version == "v2", 30, "the serving-only bundle served")
    got = decisions(settings, 200, quiet=0.5)
    assert {d["model"] for d in got} == {"v1"} and len(got) == 200


@pytest.mark.slow
def test_a_worker_whose_current_bundle_is_bad_says_so_and_exits_nonzero(settings, bundle, tmp_path):
    _bad_bundles(Path(settings.model_dir))
    _point_current(Path(settings.model_dir), "bad-ort")
    r = subprocess.run([*RTA, "serve", "--no-metrics"], env=worker_env(settings), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = [line for line in r.stderr.splitlines() if line.strip()][-1]
    assert "bad-ort" in last and "smoke-test" in last


# --- 6. NaN outputs have their own reason, metric and alert; unknown features are counted --


@pytest.mark.slow
def test_nan_outputs_are_counted_apart_from_invalid_and_unknown_features_exported(settings, bundle, targets):
    _variant(Path(settings.model_dir), "vnan", lambda d, m: None)
    _edit_graph(Path(settings.model_dir) / "vnan", _nan_when_huge)
    publish(Path(settings.model_dir) / "vnan")
    n = 600
    spec, num, cat = random_batch(n, seed=3)
    num[::12, 0] = 1e35  # 50 requests the model scores NaN
    ids = [f"r{i}" for i in range(n)]
    values = encode_requests(ids, np.full(n, int(time.time() * 1000)), num, cat, spec)
    odd = [orjson.dumps({"v": 1, "request_id": f"odd{i}", "ts_ms": 1, "features": {"n1": 1.0, "other_schema": 2}})
           for i in range(20)]
    produce(settings, values + odd, ids + [f"odd{i}" for i in range(20)])
    with running(settings, group_id="h-nan", seed=0, metrics_port=0) as w:
        wait_for(lambda: w.stats.events >= n + 20, 60, "all decided")
        port = w.server.port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).read())
    got = {d["request_id"]: d for d in decisions(settings, n + 20, quiet=0.5)}
    nan_ids = {f"r{i}" for i in range(0, n, 12)}
    assert {rid for rid, d in got.items() if d["reason"] == "nan_output"} == nan_ids
    assert all(got[rid]["decision"] == "pass" and got[rid]["score"] is None for rid in nan_ids)
    assert not any(d["reason"] == "invalid" for d in got.values())
    assert read_topic(settings, "dlq", 1, timeout=2) == []  # a model fault is not bad input
    assert "rta_nan_outputs_total 50.0" in text and "rta_unknown_features_total 20.0" in text
    assert 'rta_decisions_total{decision="pass",reason="nan_output"} 50.0' in text
    assert "nan_outputs" in health["alerts"] and health["nan_outputs"] == 50


# --- 7. targets survive a Redis that restarts empty ---------------------------------------


def test_a_worker_started_after_redis_restarted_empty_takes_the_fleets_targets(settings, redis_server):
    RedisStore.from_url(settings.redis_url, settings.redis_prefix).set_targets(Targets(0.3, 0.05, 0.01), "op", "t")
    cfg = ControllerConfig(refresh_interval=0.05, backoff_initial=0.05, backoff_max=0.2)
    old = RatioController.from_settings(settings, cfg, controller_id="old")
    _drive(old, lambda c: c.thresholds().targets.r == 0.3, "the old worker reads r")
    try:
        redis_server.restart()  # no persistence: comes back empty
    finally:
        if not redis_server.running:
            redis_server.start()
    assert RedisStore.from_url(settings.redis_url, settings.redis_prefix).get_targets()[0] is None
    _drive(old, lambda c: not c.degraded and c.refreshes > 0 and c.targets_source == "last", "old worker back")
    new = RatioController.from_settings(settings, cfg, controller_id="new")
    _drive(new, lambda c: c.targets_source == "peers", "the new worker adopted the fleet's targets")
    assert new.thresholds().targets == old.thresholds().targets == Targets(0.3, 0.05, 0.01)
    # and an operator's set (the record) wins again
    RedisStore.from_url(settings.redis_url, settings.redis_prefix).set_targets(Targets(0.2), "op", "restore")
    _drive(new, lambda c: c.thresholds().targets == Targets(0.2) and c.targets_source == "redis", "restored")


# --- 8. a wall-clock step does not freeze the thresholds; skew against Redis TIME -----------


def test_a_clock_step_back_keeps_refreshing_and_skew_is_measured(settings):
    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
    store.set_targets(Targets(0.3), "op", "t")
    assert RatioController.from_settings(settings).timer is time.monotonic  # production default
    step = [0.0]

    def wall() -> float:  # the host clock, stepped back by NTP or an operator
        return time.time() + step[0]

    cfg = ControllerConfig(refresh_interval=0.05, skew_interval=0.05)
    ctl = RatioController.from_settings(settings, cfg, clock=wall, timer=time.monotonic)
    _drive(ctl, lambda c: c.thresholds().targets.r == 0.3 and c.clock_skew is not None, "first refresh")
    assert abs(ctl.clock_skew) < 1.0
    step[0] = -3600.0
    before = ctl.refreshes
    store.set_targets(Targets(0.1), "op", "after the step")
    _drive(ctl, lambda c: c.thresholds().targets.r == 0.1 and c.refreshes > before + 3, "refreshing on")
    wait_for(lambda: (ctl.thresholds(), ctl.clock_skew < -3590)[-1], 10, "skew seen")
    assert ctl.status()["clock_skew_s"] == pytest.approx(-3600, abs=5)


# --- 9. exactly-once: a replacement fences its crashed predecessor --------------------------


def _ids_seen(settings, isolation: str, expect: set[str], timeout: float) -> set[str]:
    """Request ids on the decisions topic as a reader with this isolation level sees them."""
    c = make_consumer(settings, f"iso-{uuid.uuid4().hex[:6]}", **{"isolation.level": isolation})
    c.assign([TopicPartition(settings.topic("decisions"), p, 0) for p in range(settings.partitions)])
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not expect <= seen:
            seen |= {orjson.loads(m.value())["request_id"] for m in c.consume(5000, 0.2) if m.error() is None}
    finally:
        c.close()
    return seen


@pytest.mark.slow
def test_exactly_once_replacement_fences_the_crashed_worker_so_readers_do_not_stall(settings, bundle, targets,
                                                                                    tmp_path):
    ids, values = request_values(3000)
    produce(settings, values, ids)
    want = set(ids)
    # the first worker decides everything inside one open transaction (commit due in 40 s) ...
    first = spawn_worker(settings, tmp_path, "--group", "h-eos", "--exactly-once", "--commit-interval-ms", "40000")
    second = None
    try:
        assert _ids_seen(settings, "read_uncommitted", want, 90) == want
        os.kill(first.pid, signal.SIGKILL)  # ... and dies before committing it
        first.wait(10)
        # same host, same default slot id (<group>-<hostname>): init_transactions aborts the
        # predecessor's transaction, so read_committed readers move on at once
        second = spawn_worker(settings, tmp_path, "--group", "h-eos", "--exactly-once", "--commit-interval-ms", "200")
        seen = _ids_seen(settings, "read_committed", want, 45)
        assert seen == want, f"{len(want - seen)} decisions still hidden behind the dead transaction"
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
def test_a_fenced_exactly_once_worker_stops_with_one_line_instead_of_looping(settings, bundle, targets, tmp_path):
    # `rta serve` in a subprocess: librdkafka once crashed (SIGSEGV) with a fenced transactional
    # producer inside the pytest process, which took the whole session down; here a crash is
    # this test's failure (exit -11), not everyone's
    ids, values = request_values(400)
    first = set(ids[:200])
    with worker_process(settings, tmp_path, "--group", "h-fence", "--exactly-once", "--transactional-id",
                        "slot-0", "--commit-interval-ms", "200") as proc:
        produce(settings, values[:200], ids[:200])
        assert _ids_seen(settings, "read_committed", first, 90) == first  # a first transaction committed
        # a second process takes the same slot: its init_transactions fences the worker's producer
        twin = make_producer(settings, **{"transactional.id": "slot-0"})
        twin.init_transactions(30)
        produce(settings, values[200:], ids[200:])  # the worker's next commit meets the fence
        code = proc.wait(90)
    (log,) = tmp_path.glob("worker-*.log")
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    assert code == 2, (code, lines[-5:])  # stopped by itself with exit 2: not looping, not crashed
    assert lines[-1].startswith("rta: ") and "fenced" in lines[-1], lines[-5:]
    assert "Traceback" not in "\n".join(lines)


def test_exactly_once_against_a_frozen_coordinator_is_one_line_not_a_hang(settings, bundle, targets, kafka, capfd):
    # Tansu grants every transactional producer (it accepts any transaction.timeout.ms, so it
    # cannot be made to refuse one): a frozen broker (SIGSTOP) is the coordinator that never answers
    cfg = WorkerConfig(group_id="h-eos-frozen", exactly_once=True, flush_timeout_s=3.0, startup_timeout_s=0)
    kafka.freeze()
    try:
        with pytest.raises(ConfigError) as err:
            Worker(settings, cfg)
    finally:
        kafka.thaw()
    msg = str(err.value)
    assert msg.startswith("--exactly-once:") and "\n" not in msg and "Timed out" in msg, msg
    # nothing else on stderr (librdkafka's own log lines): `rta serve` prints this one line
    stderr = capfd.readouterr().err
    assert stderr.strip() == "", stderr[-2000:]


# --- 10. the user's librdkafka settings win; no secret in any output ------------------------


def test_user_librdkafka_settings_beat_the_producer_defaults(settings):
    user = dataclasses.replace(settings, kafka={**settings.kafka, "queue.buffering.max.messages": "10"})
    p = make_producer(user)  # our default is 500,000: with the user's 10, the 11th does not fit
    with pytest.raises(BufferError):
        for i in range(11):
            p.produce(settings.topic("requests"), f"m{i}".encode())
    assert p.flush(15) == 0


def test_passwords_never_printed_or_recorded(kafka, redis_server, tmp_path, clean_env):
    secret = f"s3cret-{uuid.uuid4().hex[:6]}"
    dead = f"redis://rta:{secret}@127.0.0.1:{free_port()}/0"
    r = subprocess.run([*RTA, "ratio", "--redis-url", dead, "get"], env=clean_env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and secret not in r.stdout + r.stderr and "rta:***@" in r.stderr
    # an external Redis with a password: `rta dev up` records it redacted, `status` still probes it
    user = f"h13-{uuid.uuid4().hex[:6]}"
    admin = redis.Redis.from_url(redis_server.url)
    admin.execute_command("ACL", "SETUSER", user, "on", f">{secret}", "~*", "+@all")
    try:
        url = redis_server.url.replace("redis://", f"redis://{user}:{secret}@", 1)
        env = {**clean_env, "RTA_REDIS_URL": url, "RTA_KAFKA_BOOTSTRAP": kafka.bootstrap}
        for verb in ("up", "status"):
            done = subprocess.run([*RTA, "dev", verb], env=env, capture_output=True, text=True,
                                  timeout=120, cwd=tmp_path)
            assert done.returncode == 0, done.stderr[-1000:]
            assert secret not in done.stdout + done.stderr and f"{user}:***@" in done.stdout
        assert secret not in (Path(env["RTA_STATE_DIR"]) / "stack.json").read_text()
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()


# --- 11. least privilege: a worker's Redis user cannot change r -----------------------------


def test_worker_credentials_cannot_change_targets_and_operators_cannot_write_the_window(
        settings, redis_client, capsys, monkeypatch):
    from test_operators import rta

    prefix = settings.redis_prefix
    users = {role: f"h13-{role}-{uuid.uuid4().hex[:6]}" for role in ACL_ROLES}
    for role in ACL_ROLES:
        monkeypatch.setenv(f"RTA_{role.upper()}_REDIS_PASSWORD", f"pw-{role}")
    code, out, err = rta(capsys, "ratio", "--redis-url", settings.redis_url, "--redis-prefix", prefix, "acl",
                         "--apply", "--worker-user", users["worker"], "--operator-user", users["operator"])
    assert code == 0 and "pw-" not in out + err, err

    def url(role: str) -> str:
        return settings.redis_url.replace("redis://", f"redis://{users[role]}:pw-{role}@", 1)

    try:
        operator = RedisStore.from_url(url("operator"), prefix)
        operator.set_targets(Targets(0.3), "alice", "start")
        worker = RedisStore.from_url(url("worker"), prefix)
        # the worker's whole job works with its user: window, epoch, status, targets read, TIME
        ctl = RatioController(worker, ControllerConfig(refresh_interval=0.05), controller_id="w1")
        _drive(ctl, lambda c: c.refreshes > 2 and not c.degraded and c.thresholds().targets.r == 0.3, "worker ok")
        ctl.refresh()
        assert ctl.clock_skew is not None and [c["id"] for c in operator.controllers()] == ["w1"]
        # ... but it cannot change r, nor rewrite the audit trail
        with pytest.raises(StoreUnavailable, match="refused"):
            worker.update_targets("mallory", "take over", r=0.9)
        raw = redis.Redis.from_url(url("worker"))
        for cmd in (("HSET", f"{prefix}:ratio:targets", "r", "0.9"), ("DEL", f"{prefix}:ratio:targets"),
                    ("LPUSH", f"{prefix}:ratio:audit", "{}"), ("DEL", f"{prefix}:ratio:audit"),
                    ("FLUSHDB",), ("CONFIG", "SET", "maxmemory", "1")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                raw.execute_command(*cmd)
        raw.close()
        assert operator.get_targets()[0] == Targets(0.3) and len(operator.history()) == 1
        # the operator writes targets (step-limited) but not the window
        with pytest.raises(InfeasibleTargets, match="max step"):
            operator.update_targets("alice", "fat finger", r=0.9, max_step=0.25)
        operator.update_targets("alice", "step", r=0.5, max_step=0.25)
        assert operator.get_targets()[0].r == 0.5
        with pytest.raises(StoreUnavailable, match="refused"):
            operator.put("op", {1: np.zeros(operator.spec.size, np.int64)})
    finally:
        for user in users.values():
            redis_client.execute_command("ACL", "DELUSER", user)


def test_audit_topic_holds_every_change_before_redis_does(settings, capsys, monkeypatch):
    from test_operators import rta

    monkeypatch.setenv("RTA_KAFKA_BOOTSTRAP", settings.kafka_bootstrap)
    monkeypatch.setenv("RTA_TOPIC_AUDIT", settings.topic("audit"))
    base = ("ratio", "--redis-url", settings.redis_url, "--redis-prefix", settings.redis_prefix)
    for r in ("0.2", "0.4"):
        code, _, err = rta(capsys, *base, "set", r, "--reason", f"to {r}", "--who", "carol")
        assert code == 0, err
    code, _, err = rta(capsys, *base, "set", "0.9", "--reason", "fat finger")  # beyond the step limit
    assert code == 2 and "max step" in err and len(err.strip().splitlines()) == 1
    got = [orjson.loads(m.value()) for m in read_topic(settings, "audit", 2, quiet=0.5)]
    assert sorted(e["new"]["r"] for e in got) == [0.2, 0.4] and {e["who"] for e in got} == {"carol"}
    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
    assert [h["version"] for h in store.history()] == sorted((e["version"] for e in got), reverse=True)


# --- 12. teacher weights: verified first, tensors only --------------------------------------


class _Payload:
    """A pickle that runs code when loaded (what a planted teacher.pt would carry)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_teacher_weights_are_verified_before_loading_and_never_run_code(tmp_path, torch_one_thread):
    import torch

    from model.bundle import sha256_file
    from stream.errors import BundleError
    from training.pipeline import load_teacher

    b, marker = tmp_path / "t1", tmp_path / "code-ran"
    b.mkdir()
    torch.save({"format": 1, "evil": _Payload(marker)}, b / "teacher.pt")
    (b / "preprocess.json").write_text("{}")
    manifest = {"format": 1, "version": "t1", "feature_spec": {}, "tasks": ["click"], "uncertainty": {},
                "files": {"teacher.pt": "0" * 64, "preprocess.json": sha256_file(b / "preprocess.json")}}
    (b / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="sha256 mismatch"):  # planted after the manifest: refused
        load_teacher(b)
    assert not marker.exists()
    manifest["files"]["teacher.pt"] = sha256_file(b / "teacher.pt")  # the manifest rewritten too
    (b / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unreadable"):  # weights only: no code runs
        load_teacher(b)
    assert not marker.exists()


# --- 13. an independent client (aiokafka) talks to the embedded broker and the worker --------


@pytest.mark.slow
def test_aiokafka_produces_requests_and_reads_decisions_from_a_served_worker(settings, bundle, targets, tmp_path):
    import asyncio

    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka import TopicPartition as AioTP

    ids, values = request_values(500)
    want = set(ids)

    async def send() -> None:
        p = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, compression_type="gzip")
        await p.start()
        try:
            for rid, v in zip(ids, values, strict=True):
                await p.send(settings.topic("requests"), v, key=rid.encode())
            await p.flush()
        finally:
            await p.stop()

    async def receive(timeout: float) -> dict[str, dict]:
        c = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                             isolation_level="read_committed")
        await c.start()
        got: dict[str, dict] = {}
        try:
            c.assign([AioTP(settings.topic("decisions"), p) for p in range(settings.partitions)])
            await c.seek_to_beginning()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not want <= set(got):
                for msgs in (await c.getmany(timeout_ms=500)).values():
                    for m in msgs:
                        doc = orjson.loads(m.value)
                        got[doc["request_id"]] = {**doc, "_headers": dict(m.headers), "_key": m.key}
        finally:
            await c.stop()
        return got

    port = free_port()  # `rta serve` with a scrapable metrics address (compose needs --metrics-host)
    cmd = [*RTA, "serve", "--group", "h-aio", "--batch-wait-ms", "20", "--metrics-host", "127.0.0.1",
           "--metrics-port", str(port)]
    log = open(tmp_path / "aio-worker.log", "wb")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(cmd, env=worker_env(settings), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        asyncio.run(send())
        got = asyncio.run(receive(90))
        assert set(got) == want
        assert all(d["_key"] == d["request_id"].encode() and d["_headers"]["rta-model"] == b"v1" for d in got.values())
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "rta_events_total 500.0" in text
    finally:
        worker.terminate()
        worker.wait(30)
        log.close()


# --- the soak, scaled down (`rta bench soak` runs the full one) -----------------------------


@pytest.mark.slow
def test_soak_kill_redis_restart_and_malformed_input_lose_nothing(settings, redis_server, tmp_path):
    from bench.soak import SoakConfig, run_soak

    # disturbances 14 s apart: a kill costs a group rebalance (one session timeout, 6 s) before
    # the share can settle; 6 s x 4000/s after each settle: the share's noise is ~0.3 pp
    cfg = SoakConfig(requests=168_000, rate=4000, workers=2, kills=1, redis_restarts=1, malformed=200,
                     oversized=5, settle_s=8.0, timeout_s=120, partitions=settings.partitions)
    try:
        out = run_soak(cfg, settings, redis_server, tmp_path / "soak")
    finally:
        if not redis_server.running:
            redis_server.start()
    assert out["missing"] == 0 and out["decided"] == 168_000
    assert out["workers_alive_at_end"] and out["worker_exit_codes"] == [0, 0]
    assert out["malformed_decided_invalid"] == 200 and out["dlq_truncated"] >= 5
    assert [e["kind"] for e in out["disturbances"]] == ["kill", "redis"]
    judged = [s for s in out["segments"][1:] if s["decisions"] >= 2000]
    assert len(judged) == 2, out["segments"]
    assert out["max_block_share_error_pp"] <= 1.0, out["segments"]
    assert (tmp_path / "soak" / "soak.png").stat().st_size > 0
