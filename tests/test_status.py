"""stream/status.py: the worker's status record is written at a bounded cadence with a TTL, and a
Redis that does not answer costs a counted error, never an exception in the worker's loop."""

from __future__ import annotations

import json
from types import SimpleNamespace

from infra.stack import free_port
from stream.controller import Thresholds
from stream.metrics import WorkerMetrics
from stream.policy import Targets
from stream.status import StatusPublisher, status_key
from stream.window import RedisStore


def _worker(degraded: bool = False) -> SimpleNamespace:
    """The attributes of stream.worker.Worker the publisher reads (no broker needed here)."""
    th = Thresholds(0.42, float("inf"), Targets(0.3, 0.05, 0.02), degraded, 7)
    ctl = SimpleNamespace(thresholds=lambda: th, degraded=degraded, targets_source="redis")
    metrics = WorkerMetrics("w1")
    metrics.lag_ms.set(12.5)
    return SimpleNamespace(controller=ctl, metrics=metrics, scorer=SimpleNamespace(version="v3"),
                           stats=SimpleNamespace(events=100), assignment={("t", 0), ("t", 1)})


def test_status_record_bounded_cadence_ttl_and_content(settings, redis_client):
    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
    pub = StatusPublisher(store, "w1", interval=2.0, ttl=15)
    w = _worker()
    done = [pub.maybe_publish(w, now=t) for t in (0.0, 0.5, 1.9, 2.0, 3.0, 4.1)]
    assert done == [True, False, False, True, False, True] and pub.published == 3
    key = status_key(settings.redis_prefix, "w1")
    rec = json.loads(redis_client.get(key))
    assert 0 < redis_client.ttl(key) <= 15
    assert rec["model"] == "v3" and rec["theta"] == 0.42 and rec["tau_u"] is None  # inf -> null (JSON)
    assert rec["targets"] == {"r": 0.3, "p_u": 0.05, "epsilon": 0.02} and rec["targets_version"] == 7
    assert rec["request_age_ms"] == 12.5 and rec["partitions"] == 2 and rec["events"] == 100


def test_status_never_raises_and_skips_while_degraded(settings):
    dead = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", settings.redis_prefix)
    pub = StatusPublisher(dead, "w1")
    assert pub.maybe_publish(_worker(), now=0.0) is False and pub.errors == 1
    degraded = StatusPublisher(dead, "w2")
    assert degraded.maybe_publish(_worker(degraded=True), now=0.0) is False and degraded.errors == 0



def test_status_never_raises_whatever_building_the_record_hits(settings):
    """A record that cannot be built (here: the controller raises) costs a counted error, never an
    exception in the worker's loop; the next interval tries again."""
    pub = StatusPublisher(RedisStore.from_url(settings.redis_url, settings.redis_prefix), "w1")
    w = _worker()

    def broken() -> None:
        raise RuntimeError("mid-reload")

    w.controller.thresholds = broken
    assert pub.maybe_publish(w, now=0.0) is False and pub.errors == 1 and pub.published == 0
    assert pub.maybe_publish(w, now=1.0) is False and pub.errors == 1  # not before the interval


def test_the_workers_acl_user_may_publish_and_the_operators_read(settings, redis_client):
    import uuid

    from stream.window import apply_acl

    users = {role: f"st-{role}-{uuid.uuid4().hex[:6]}" for role in ("worker", "operator")}
    try:
        for role, user in users.items():
            apply_acl(redis_client, settings.redis_prefix, role, user, "pw")
        url = {r: settings.redis_url.replace("redis://", f"redis://{u}:pw@", 1) for r, u in users.items()}
        pub = StatusPublisher(RedisStore.from_url(url["worker"], settings.redis_prefix), "w1")
        assert pub.maybe_publish(_worker(), now=0.0) and pub.errors == 0
        op = RedisStore.from_url(url["operator"], settings.redis_prefix)
        assert json.loads(op.r.get(status_key(settings.redis_prefix, "w1")))["model"] == "v3"
    finally:
        for user in users.values():
            redis_client.execute_command("ACL", "DELUSER", user)
