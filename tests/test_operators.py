"""`rta ratio get|set|history` through the real CLI entry point against the real Redis."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from infra.cli import main
from infra.stack import free_port
from stream.controller import RatioController
from stream.policy import Targets, decide
from stream.window import RedisStore


@pytest.fixture
def prefix(redis_server) -> Iterator[str]:
    p = f"test:ops:{uuid.uuid4().hex[:8]}"
    yield p
    RedisStore.from_url(redis_server.url, p).clear()


def rta(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_set_get_history(capsys, redis_server, prefix):
    base = ("ratio", "--redis-url", redis_server.url, "--redis-prefix", prefix)
    code, out, _ = rta(capsys, *base, "set", "0.3", "--pass-share", "0.05", "--explore", "0.01",
                       "--reason", "launch", "--who", "alice", "--no-audit-topic")
    assert code == 0 and "r: - -> 0.3" in out and "version 1" in out
    code, out, _ = rta(capsys, *base, "set", "0.45", "--reason", "budget left", "--who", "bob",
                       "--no-audit-topic")
    assert code == 0 and "r: 0.3 -> 0.45" in out and "p_u: 0.05 -> 0.05" in out
    code, out, _ = rta(capsys, *base, "get", "--json")
    got = json.loads(out)
    assert got["targets"] == {"r": 0.45, "p_u": 0.05, "epsilon": 0.01}
    assert got["version"] == 2 and got["updated_by"] == "bob" and got["observed"]["total"] == 0
    code, out, _ = rta(capsys, *base, "history", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["who"] for r in rows] == ["bob", "alice"]
    assert rows[0]["old"]["r"] == 0.3 and rows[0]["new"]["r"] == 0.45 and rows[0]["reason"] == "budget left"
    code, out, _ = rta(capsys, *base, "history", "-n", "1")
    assert code == 0 and len(out.splitlines()) == 1 and "bob: r=0.3->0.45" in out


@pytest.mark.parametrize("args,needle", [
    (("1.0",), "r must be in [0, 1)"),
    (("-0.1",), "r must be in [0, 1)"),
    (("0.5", "--pass-share", "0.4", "--explore", "0.2"), "infeasible targets"),
    (("0.2", "--explore", "-0.01"), "epsilon"),
    (("abc",), "abc"),
])
def test_set_refuses_bad_targets(capsys, redis_server, prefix, args, needle):
    base = ("ratio", "--redis-url", redis_server.url, "--redis-prefix", prefix)
    code, out, err = rta(capsys, *base, "set", *args, "--reason", "x", "--no-audit-topic")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert RedisStore.from_url(redis_server.url, prefix).history() == []


def test_set_refuses_infeasible_against_kept_values(capsys, redis_server, prefix):
    store = RedisStore.from_url(redis_server.url, prefix)
    store.set_targets(Targets(0.3, 0.3, 0.1), "alice", "start")
    code, _, err = rta(capsys, "ratio", "--redis-url", redis_server.url, "--redis-prefix", prefix,
                       "set", "0.7", "--reason", "too much", "--no-audit-topic")
    assert code == 2 and "infeasible" in err
    assert store.get_targets()[0] == Targets(0.3, 0.3, 0.1) and len(store.history()) == 1


def test_redis_unreachable_is_one_line(capsys):
    url = f"redis://127.0.0.1:{free_port()}/0"
    for sub in (("get",), ("history",), ("set", "0.2", "--reason", "x", "--no-audit-topic")):
        code, _, err = rta(capsys, "ratio", "--redis-url", url, *sub)
        assert code == 2 and "unreachable" in err and len(err.strip().splitlines()) == 1


def test_get_reports_window_and_controllers(capsys, redis_server, prefix):
    settings = type("S", (), {"redis_url": redis_server.url, "redis_prefix": prefix})()
    RedisStore.from_url(redis_server.url, prefix).set_targets(Targets(0.25, 0.0, 0.0), "t", "x")
    ctl = RatioController.from_settings(settings, controller_id="w1")
    rng = np.random.default_rng(0)
    for _ in range(20):  # real clock: these land in the current seconds
        e = rng.random(500)
        th = ctl.thresholds()
        d = decide(e, np.zeros(500), None, rng.random(500), th.theta, th.tau_u, 0.0, th.degraded)
        ctl.observe(e, np.zeros(500), d)
        ctl.refresh()  # force it (the cadence is 0.25 s); also publishes its status
    code, out, _ = rta(capsys, "ratio", "--redis-url", redis_server.url, "--redis-prefix", prefix, "get", "--json")
    got = json.loads(out)
    assert got["observed"]["total"] == 10_000
    assert 0.15 < got["observed"]["blocked_share"] < 0.3
    assert [c["id"] for c in got["controllers"]] == ["w1"] and got["controllers"][0]["theta"] > 0
    code, out, _ = rta(capsys, "ratio", "--redis-url", redis_server.url, "--redis-prefix", prefix, "get")
    assert "targets: r=0.25" in out and "10000 decisions" in out and "controller w1: theta=" in out


def test_no_change_without_the_durable_audit_record_when_kafka_is_away(capsys, redis_server, prefix, monkeypatch):
    monkeypatch.setenv("RTA_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")
    code, out, err = rta(capsys, "ratio", "--redis-url", redis_server.url, "--redis-prefix", prefix,
                         "set", "0.2", "--reason", "no kafka")
    assert code == 2 and "audit topic" in err and "NOT changed" in err and len(err.strip().splitlines()) == 1
    store = RedisStore.from_url(redis_server.url, prefix)
    assert store.get_targets()[0] is None and store.history() == []
    code, out, err = rta(capsys, "ratio", "--redis-url", redis_server.url, "--redis-prefix", prefix,
                         "set", "0.2", "--reason", "no kafka", "--no-audit-topic")  # explicit opt-out
    assert code == 0 and "version 1" in out and store.history()[0]["reason"] == "no kafka"


@pytest.mark.slow
def test_audit_entry_reaches_the_audit_topic(capsys, settings, monkeypatch):
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    from stream.kafka import make_consumer

    monkeypatch.setenv("RTA_KAFKA_BOOTSTRAP", settings.kafka_bootstrap)
    monkeypatch.setenv("RTA_TOPIC_AUDIT", settings.topic("audit"))
    code, _, err = rta(capsys, "ratio", "--redis-url", settings.redis_url, "--redis-prefix",
                       settings.redis_prefix, "set", "0.35", "--reason", "to kafka", "--who", "carol")
    assert code == 0 and err == ""
    consumer = make_consumer(settings, f"g-{uuid.uuid4().hex[:6]}")
    consumer.assign([TopicPartition(settings.topic("audit"), p, OFFSET_BEGINNING)
                     for p in range(settings.partitions)])
    try:
        deadline = time.monotonic() + 20
        msg = None
        while time.monotonic() < deadline and (msg is None or msg.error()):
            msg = consumer.poll(0.5)
        assert msg is not None and not msg.error()
        entry = json.loads(msg.value())
        assert entry["who"] == "carol" and entry["new"]["r"] == 0.35 and msg.key() == b"ratio"
    finally:
        consumer.close()
