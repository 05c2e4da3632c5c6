"""The control plane's HTTP API against the real broker and Redis (httpx, a real uvicorn server):
auth and roles, targets with expected_version, bad input (one JSON error, nothing changed),
browser sessions and the Origin check, fleet/series from real workers, models, reports,
health/metrics, and the start-up refusal of the workers' Redis credentials."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import subprocess
import sys
import threading
import time
import uuid

import pytest
from control_support import control_plane
from worker_support import request_values, running, wait_for

from control.auth import AuthError, TokenStore
from stream.policy import Targets
from stream.window import ACL_ROLES, RedisStore, apply_acl

READS = ["/api/v1/fleet", "/api/v1/series", "/api/v1/targets", "/api/v1/audit", "/api/v1/models",
         "/api/v1/reports", "/api/v1/session"]


def _state(settings) -> tuple:
    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
    t, meta = store.get_targets()
    return t, meta.get("version"), len(store.history(1000))


def _audit_topic(settings, timeout: float = 20.0) -> list[dict]:
    """The whole audit topic, read with an independent client (aiokafka) up to its end offsets
    (every writer waited for the broker's ack, so "nothing more" is an assertion, not a guess)."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka import TopicPartition as AioTP

    async def read() -> list[dict]:
        c = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
        await c.start()
        out: list[dict] = []
        try:
            tps = [AioTP(settings.topic("audit"), p) for p in range(settings.partitions)]
            c.assign(tps)
            await c.seek_to_beginning()
            ends = await c.end_offsets(tps)
            deadline = time.monotonic() + timeout
            while [tp for tp in tps if await c.position(tp) < ends[tp]]:
                if time.monotonic() > deadline:
                    raise AssertionError(f"audit topic not read to its end {ends} in {timeout:.0f} s")
                for msgs in (await c.getmany(timeout_ms=500)).values():
                    out += [json.loads(m.value) for m in msgs]
        finally:
            await c.stop()
        return sorted(out, key=lambda e: e.get("ts_ms", 0))

    # in a thread of its own: the caller may be inside an event loop (playwright's sync API)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, read()).result()


def test_roles_tokens_and_target_changes_with_versions(settings, tmp_path):
    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
    store.set_targets(Targets(0.3, 0.05, 0.02), "setup", "start")
    with control_plane(settings, tmp_path) as cp:
        # tokens are stored hashed only
        raw = (tmp_path / "tokens.json").read_text()
        assert cp.operator not in raw and cp.viewer not in raw and "sha256" in raw
        anon, viewer, op = cp.client(), cp.client(cp.viewer), cp.client(cp.operator)
        for path in READS:
            r = anon.get(path)
            assert r.status_code == 401 and set(r.json()) == {"error"}, (path, r.text)
            assert cp.client("rta_not-a-token").get(path).status_code == 401
            assert viewer.get(path).status_code == 200, (path, viewer.get(path).text)
        assert anon.get("/api/v1/fleet", headers={"Authorization": "Basic abc"}).status_code == 401

        got = viewer.get("/api/v1/targets").json()
        assert got["targets"] == {"r": 0.3, "p_u": 0.05, "epsilon": 0.02} and got["version"] == 1
        before = _state(settings)
        body = {"r": 0.4, "reason": "more", "expected_version": 1}
        # a viewer cannot write; nothing changes
        r = viewer.post("/api/v1/targets", json=body)
        assert r.status_code == 403 and "viewer" in r.json()["error"]
        assert anon.post("/api/v1/targets", json=body).status_code == 401
        assert _state(settings) == before
        # the operator can; the audit's who is the token's owner, never a request field
        r = op.post("/api/v1/targets", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["who"] == "alice" and r.json()["version"] == 2
        entry = store.history(1)[0]
        assert entry["who"] == "alice" and entry["new"]["r"] == 0.4 and entry["via"] == "rta control"
        topic = _audit_topic(settings)
        assert [(e["who"], e["new"]["r"], e["version"]) for e in topic] == [("alice", 0.4, 2)]
        assert op.post("/api/v1/targets", json={**body, "who": "mallory"}).status_code == 422
        # a stale expected_version: 409, nothing changed
        before = _state(settings)
        r = op.post("/api/v1/targets", json={"r": 0.45, "reason": "stale", "expected_version": 1})
        assert r.status_code == 409 and "version 2" in r.json()["error"]
        assert _state(settings) == before
        assert len(_audit_topic(settings)) == 1  # the refused change never reached the topic
        audit = viewer.get("/api/v1/audit", params={"n": 5}).json()["entries"]
        assert audit[0]["who"] == "alice" and len(audit) == 2


@pytest.mark.parametrize("body,status,needle", [
    ("not json", 422, "JSON"),
    ([1, 2], 422, "JSON object"),
    ({"reason": "x", "expected_version": 2}, 422, "'r' is required"),
    ({"r": "0.4", "reason": "x", "expected_version": 2}, 422, "finite number"),
    ({"r": 1.5, "reason": "x", "expected_version": 2}, 422, "[0, 1)"),
    ({"r": 0.4, "p_u": 0.5, "epsilon": 0.2, "reason": "x", "expected_version": 2}, 422, "infeasible"),
    ({"r": 0.4, "reason": " ", "expected_version": 2}, 422, "reason"),
    ({"r": 0.4, "reason": "x"}, 422, "expected_version"),
    ({"r": 0.4, "reason": "x", "expected_version": True}, 422, "expected_version"),
    ({"r": 0.9, "reason": "fat finger", "expected_version": 2}, 422, "max step"),
    ({"r": 0.4, "reason": "x", "expected_version": 2, "extra": 1}, 422, "unknown field"),
])
def test_bad_target_input_is_one_json_error_and_changes_nothing(settings, tmp_path, body, status, needle):
    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
    store.set_targets(Targets(0.3), "setup", "start")
    store.set_targets(Targets(0.3), "setup", "again")  # version 2
    with control_plane(settings, tmp_path, audit_topic=False) as cp:
        before = _state(settings)
        op = cp.client(cp.operator)
        if isinstance(body, str):
            r = op.post("/api/v1/targets", content=body, headers={"Content-Type": "application/json"})
        else:
            r = op.post("/api/v1/targets", json=body)
        assert r.status_code == status and list(r.json()) == ["error"], r.text
        assert needle in r.json()["error"] and "\n" not in r.json()["error"]
        assert _state(settings) == before


def test_browser_session_cookie_origin_check_rate_limit_and_revocation(settings, tmp_path):
    RedisStore.from_url(settings.redis_url, settings.redis_prefix).set_targets(Targets(0.3), "setup", "start")
    with control_plane(settings, tmp_path, writes_per_minute=1.0) as cp:
        c = cp.client()
        assert c.post("/api/v1/session", json={"token": "rta_wrong"}).status_code == 401
        assert c.post("/api/v1/session", json={"nope": 1}).status_code == 400
        r = c.post("/api/v1/session", json={"token": cp.operator})
        assert r.status_code == 200 and r.json() == {"name": "alice", "role": "operator"}
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert c.get("/api/v1/session").json()["via"] == "cookie"
        body = {"r": 0.35, "reason": "cookie", "expected_version": 1}
        # a cookie-authenticated write needs this server's Origin
        before = _state(settings)
        assert c.post("/api/v1/targets", json=body).status_code == 403
        r = c.post("/api/v1/targets", json=body, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "cross-origin" in r.json()["error"]
        assert _state(settings) == before
        r = c.post("/api/v1/targets", json=body, headers={"Origin": cp.url})
        assert r.status_code == 200 and r.json()["who"] == "alice"
        # rate limit (burst 5, then 1/min): the 7th write in a row is refused with 429
        codes = [c.post("/api/v1/targets", json={"r": 0.35, "reason": "x", "expected_version": v},
                        headers={"Origin": cp.url}).status_code for v in range(2, 8)]
        assert codes[:4] == [200] * 4 and codes[-1] == 429, codes
        # revoking the token ends its session at the next request
        assert cp.tokens.revoke("alice") == 1
        assert c.get("/api/v1/fleet").status_code == 401
        assert c.delete("/api/v1/session").status_code == 200


def test_fleet_and_series_from_real_workers_and_health_metrics(settings, bundle, tmp_path):
    from worker_support import feeding

    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
    store.set_targets(Targets(0.3, 0.05, 0.02), "setup", "start")
    ids, values = request_values(6000, seed=3)
    with control_plane(settings, tmp_path) as cp, running(settings, group_id="ctl-fleet", batch_wait_ms=20) as w:
        v = cp.client(cp.viewer)
        with feeding(settings, values, ids, rate=1500):
            wait_for(lambda: any(x.get("events", 0) > 0 for x in v.get("/api/v1/fleet").json()["workers"]),
                     30, "the worker's status record")
            wait_for(lambda: sum(t or 0 for t in v.get("/api/v1/series").json()["series"]["total"]) > 1500,
                     30, "series with traffic")
        fleet = v.get("/api/v1/fleet").json()
        (rec,) = fleet["workers"]
        assert rec["id"] == w.config.worker_id and rec["model"] == "v1" and fleet["models"] == ["v1"]
        assert rec["targets"]["r"] == 0.3 and rec["targets_source"] == "redis" and rec["degraded"] is False
        assert rec["request_age_ms"] is not None and rec["last_seen_s"] < 15 and not fleet["mixed_models"]
        assert rec["theta"] is not None and rec["partitions"] == settings.partitions
        s = v.get("/api/v1/series", params={"seconds": 60}).json()["series"]
        assert len(s["t"]) == len(s["block"]) == len(s["r"]) and set(s["r"]) == {0.3}
        busy = [b for b, n in zip(s["block"], s["total"], strict=True) if n and n > 200]
        assert busy and all(0.0 <= b <= 1.0 for b in busy)
        assert w.status.published >= 1 and w.status.errors == 0
        # the record is published at a bounded cadence: ~1 per 2 s, not per batch
        assert w.status.published <= w.stats.batches and w.status.published < 30
        for bad in ({"seconds": "x"}, {"seconds": 0}, {"seconds": 10**9}):
            r = v.get("/api/v1/series", params=bad)
            assert r.status_code == 422 and "seconds" in r.json()["error"]
        h = cp.client().get("/healthz")
        assert h.status_code == 200 and h.json()["redis"] == "ok"
        m = cp.client().get("/metrics").text
        assert "rta_control_workers 1.0" in m and "rta_control_requests_total" in m
        assert cp.client().get("/nope").json() == {"error": "no such path /nope"}
    # the record expires with its TTL once the worker stopped
    assert store.r.ttl(f"{settings.redis_prefix}:status:worker:{w.config.worker_id}") <= 15


def test_models_list_show_promote_job_rollback_and_reports(settings, bundle, tmp_path):
    from student_data import make_bundle

    make_bundle(settings.model_dir, "v2", seed=1, publish=False)
    reports = tmp_path / "reports"
    with control_plane(settings, tmp_path) as cp:
        (reports / "replay-1").mkdir()
        (reports / "replay-1" / "report.json").write_text('{"rows": 10}')
        (tmp_path / "secret.json").write_text('{"s": "TOPSECRET"}')
        (reports / "link.json").symlink_to(tmp_path / "secret.json")
        v, op = cp.client(cp.viewer), cp.client(cp.operator)
        ms = v.get("/api/v1/models").json()
        assert ms["current"] == "v1" and {m["version"] for m in ms["versions"]} == {"v1", "v2"}
        assert v.get("/api/v1/models/v2").json()["current"] is False
        assert v.get("/api/v1/models/v9").status_code == 404
        assert v.get("/api/v1/models/..").status_code == 404
        # promote: a background job (rta model promote) whose result is kept; only operators
        assert v.post("/api/v1/models/promote", json={"version": "v2", "reason": "x"}).status_code == 403
        assert op.post("/api/v1/models/promote", json={"version": "v9", "reason": "x"}).status_code == 404
        assert op.post("/api/v1/models/promote", json={"version": "v2"}).status_code == 422
        r = op.post("/api/v1/models/promote", json={"version": "v2", "reason": "try it", "force": True})
        assert r.status_code == 202 and r.json()["state"] == "running"
        job_id = r.json()["id"]
        wait_for(lambda: v.get(f"/api/v1/jobs/{job_id}").json()["state"] != "running", 90, "the promote job")
        job = v.get(f"/api/v1/jobs/{job_id}").json()
        assert job["state"] == "done" and job["result"]["outcome"] == "promoted", job
        assert v.get("/api/v1/models").json()["current"] == "v2"
        assert v.get("/api/v1/jobs/nope").status_code == 404
        # rollback, audited with the token's owner
        assert op.post("/api/v1/models/rollback", json={}).status_code == 422
        r = op.post("/api/v1/models/rollback", json={"reason": "back"})
        assert r.status_code == 200 and r.json()["current"] == "v1", r.text
        switches = [e for e in _audit_topic(settings) if e.get("kind", "").startswith("model.")]
        assert [(e["action"], e["who"]) for e in switches] == [("promote", "alice"), ("rollback", "alice")]
        # reports: listing and files, confined to the directory (no symlink, no ..)
        assert v.get("/api/v1/reports").json()["reports"][0]["path"] == "replay-1/report.json"
        assert len(v.get("/api/v1/reports").json()["reports"]) == 1
        got = v.get("/api/v1/reports/replay-1/report.json")
        assert got.json() == {"rows": 10} and got.headers["content-security-policy"].startswith("sandbox")
        for bad in ("../secret.json", "..%2Fsecret.json", "link.json", "%2Fetc%2Fpasswd", "../tokens.json"):
            r = v.get(f"/api/v1/reports/{bad}")
            assert r.status_code == 404 and "TOPSECRET" not in r.text and "sha256" not in r.text, (bad, r.text)


def test_token_cli_prints_once_and_stores_hash(tmp_path, clean_env):
    rta = [sys.executable, "-c", "from infra.cli import main; main()"]
    tokens = str(tmp_path / "t.json")
    p = subprocess.run([*rta, "control", "token", "add", "--role", "operator", "--name", "ann", "--tokens", tokens],
                       capture_output=True, text=True, env=clean_env, timeout=60)
    assert p.returncode == 0, p.stderr
    token = p.stdout.strip()
    assert token.startswith("rta_") and token not in (tmp_path / "t.json").read_text()
    assert TokenStore(tokens).check(token) == ("ann", "operator")
    bad = subprocess.run([*rta, "control", "token", "add", "--role", "admin", "--name", "x", "--tokens", tokens],
                         capture_output=True, text=True, env=clean_env, timeout=60)
    assert bad.returncode == 2 and "admin" in bad.stderr and "Traceback" not in bad.stderr
    listed = subprocess.run([*rta, "control", "token", "list", "--tokens", tokens], capture_output=True, text=True,
                            env=clean_env, timeout=60)
    assert "ann" in listed.stdout and token not in listed.stdout


def test_serve_refuses_the_workers_redis_credentials(settings, redis_client, tmp_path, clean_env):
    """At start-up: the workers' user is refused by name and by what it cannot write; the
    operator's user starts and can change targets."""
    prefix = settings.redis_prefix
    users = {role: f"ctl-{role}-{uuid.uuid4().hex[:6]}" for role in ACL_ROLES}
    for role in ACL_ROLES:
        apply_acl(redis_client, prefix, role, users[role], f"pw-{role}")

    def url(role: str) -> str:
        return settings.redis_url.replace("redis://", f"redis://{users[role]}:pw-{role}@", 1)

    rta = [sys.executable, "-c", "from infra.cli import main; main()"]
    base = [*rta, "control", "serve", "--port", "0", "--redis-prefix", prefix, "--tokens", str(tmp_path / "t.json")]
    try:
        for worker_user in (users["worker"], "rta-worker"):  # named as the workers' user, or not
            p = subprocess.run([*base, "--redis-url", url("worker"), "--worker-user", worker_user],
                               capture_output=True, text=True, env=clean_env, timeout=60)
            assert p.returncode == 2, p.stderr
            assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
            assert "worker" in p.stderr and "pw-worker" not in p.stderr, p.stderr
        # the operator's credentials start, and the API works with the operator ACL user
        op_settings = dataclasses.replace(settings, redis_url=url("operator"))
        RedisStore.from_url(url("operator"), prefix).set_targets(Targets(0.3), "setup", "start")
        with control_plane(op_settings, tmp_path, audit_topic=False) as cp:
            op = cp.client(cp.operator)
            r = op.post("/api/v1/targets", json={"r": 0.4, "reason": "acl", "expected_version": 1})
            assert r.status_code == 200, r.text
            assert op.get("/api/v1/fleet").status_code == 200 and op.get("/api/v1/series").status_code == 200
        proc = subprocess.Popen([*base, "--redis-url", url("operator"), "--worker-user", users["worker"]],
                                stderr=subprocess.PIPE, text=True, env=clean_env)
        try:
            line = proc.stderr.readline()
            if line.startswith("warning: no tokens"):
                line = proc.stderr.readline()
            assert "control plane on http://127.0.0.1:" in line and users["operator"] in line, line
        finally:
            proc.terminate()
            proc.wait(20)
    finally:
        for user in users.values():
            redis_client.execute_command("ACL", "DELUSER", user)


def test_dev_up_with_control_records_pid_and_url_and_down_stops_it(kafka, redis_server, clean_env, tmp_path):
    import httpx

    from infra.stack import alive, free_port
    from stream.config import DEFAULT_TOPICS

    prefix = f"ctl{uuid.uuid4().hex[:8]}"
    env = {**clean_env, "RTA_KAFKA_BOOTSTRAP": kafka.bootstrap, "RTA_REDIS_URL": redis_server.url,
           "RTA_REDIS_PREFIX": prefix,
           **{f"RTA_TOPIC_{role.upper()}": f"{prefix}.{name}" for role, name in DEFAULT_TOPICS.items()}}
    port = free_port()
    rta = [sys.executable, "-m", "infra.cli", "dev"]
    up = subprocess.run([*rta, "up", "--with-control", "--control-port", str(port)], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=90)
    state = json.loads((tmp_path / "state" / "stack.json").read_text())
    try:
        assert up.returncode == 0, up.stderr
        url = f"http://127.0.0.1:{port}/"
        assert state["control"]["url"] == url and alive(state["control"]["pid"]) and url in up.stdout
        assert httpx.get(url + "healthz", timeout=10).json()["redis"] == "ok"
        assert httpx.get(url + "api/v1/fleet", timeout=10).status_code == 401
        status = subprocess.run([*rta, "status"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "control up" in status.stdout, status.stdout
    finally:
        down = subprocess.run([*rta, "down"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert down.returncode == 0 and "control: stopped" in down.stdout, down.stdout + down.stderr
    assert not alive(state["control"]["pid"])


def test_fleet_shows_mixed_models_during_a_reload_and_survives_a_bad_record(settings, redis_client, tmp_path):
    from test_status import _worker

    from stream.status import StatusPublisher, status_key

    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
    for wid, version in (("w-a", "v1"), ("w-b", "v2")):
        w = _worker()
        w.scorer.version = version
        assert StatusPublisher(store, wid).maybe_publish(w, now=0.0)
    redis_client.set(status_key(settings.redis_prefix, "w-bad"), b"\xff not json", ex=15)
    with control_plane(settings, tmp_path) as cp:
        fleet = cp.client(cp.viewer).get("/api/v1/fleet").json()
    assert [w["id"] for w in fleet["workers"]] == ["w-a", "w-b"]
    assert fleet["models"] == ["v1", "v2"] and fleet["mixed_models"] is True


def test_concurrent_changes_from_one_version_one_wins_and_the_topic_records_only_it(settings, tmp_path):
    """Five operators submit against the same version at once: exactly one change lands (200), the
    others get 409, and the audit topic holds exactly the one change that was made (a change that
    lost the race must not leave a record of a change that never happened)."""
    RedisStore.from_url(settings.redis_url, settings.redis_prefix).set_targets(Targets(0.3), "setup", "start")
    with control_plane(settings, tmp_path) as cp:
        clients = [cp.client(cp.operator) for _ in range(5)]
        barrier = threading.Barrier(len(clients))

        def post(i: int) -> int:
            barrier.wait(10)
            return clients[i].post("/api/v1/targets", json={"r": 0.3 + 0.01 * (i + 1), "reason": f"op {i}",
                                                            "expected_version": 1}).status_code

        with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
            codes = sorted(pool.map(post, range(len(clients))))
        assert codes == [200, 409, 409, 409, 409], codes
        t, version, n_audit = _state(settings)
        assert version == "2" and n_audit == 2
        topic = _audit_topic(settings)
        assert [(e["version"], e["new"]["r"]) for e in topic] == [(2, t.r)], topic


def test_writes_need_a_json_media_type_and_a_login_from_elsewhere_is_refused(settings, tmp_path):
    """A cross-origin page can send a "simple" request without a CORS preflight, whose
    Content-Type is text/plain with any parameters: it must not pass for JSON. A login posted
    from another origin (login CSRF) is refused."""
    RedisStore.from_url(settings.redis_url, settings.redis_prefix).set_targets(Targets(0.3), "setup", "start")
    with control_plane(settings, tmp_path, audit_topic=False) as cp:
        op = cp.client(cp.operator)
        before = _state(settings)
        body = json.dumps({"r": 0.35, "reason": "simple request", "expected_version": 1})
        for ctype in ("text/plain; a=application/json", "text/plain;charset=application/json",
                      "application/jsonx", "multipart/form-data; boundary=application/json"):
            r = op.post("/api/v1/targets", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 422 and "application/json" in r.json()["error"], (ctype, r.text)
        assert _state(settings) == before
        ok = op.post("/api/v1/targets", content=body, headers={"Content-Type": "Application/JSON; charset=utf-8"})
        assert ok.status_code == 200, ok.text
        c = cp.client()
        r = c.post("/api/v1/session", json={"token": cp.operator}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "set-cookie" not in r.headers
        assert c.post("/api/v1/session", json={"token": cp.operator}, headers={"Origin": cp.url}).status_code == 200


def test_a_bad_audit_entry_hides_nothing_and_the_sampler_keeps_running(settings, redis_client, tmp_path):
    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
    store.set_targets(Targets(0.3), "setup", "start")
    redis_client.lpush(store.k_audit, b"\xff not json", b"[1, 2]")
    with control_plane(settings, tmp_path, sample_interval=0.2) as cp:
        v = cp.client(cp.viewer)
        r = v.get("/api/v1/audit")
        assert r.status_code == 200 and [e["who"] for e in r.json()["entries"]] == ["setup"], r.text
        wait_for(lambda: cp.service.samples >= 3, 20, "three sampler ticks")
        assert cp.service._thread is not None and cp.service._thread.is_alive()


def test_the_token_file_is_never_served_as_a_report(settings, tmp_path):
    """`rta demo` (or a careless deployment) may put the token file inside the reports dir: its
    hashes are not listed or served to viewers."""
    (tmp_path / "r.json").write_text("{}")
    with control_plane(settings, tmp_path, reports_dir=tmp_path) as cp:
        v = cp.client(cp.viewer)
        listed = [r["path"] for r in v.get("/api/v1/reports").json()["reports"]]
        assert "r.json" in listed and "tokens.json" not in listed, listed
        r = v.get("/api/v1/reports/tokens.json")
        assert r.status_code == 404 and "sha256" not in r.text
        assert v.get("/api/v1/reports/./tokens.json").status_code == 404


def test_the_sampler_survives_a_bad_window_bucket_in_its_back_fill(settings, redis_client, tmp_path):
    """A malformed bucket field (3 bytes: not a vector of u32) in the window Redis still holds: the
    back-fill tick fails, is counted, and the sampler goes on (it used to end the thread)."""
    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
    store.set_targets(Targets(0.3), "setup", "start")
    redis_client.hset(store.bucket_key(int(time.time()) - 30), "w-bad", b"\x00\x01\x02")
    with control_plane(settings, tmp_path, sample_interval=0.2) as cp:
        wait_for(lambda: cp.service.samples >= 3, 20, "three sampler ticks after a failed back-fill")
        assert cp.service.sampler_errors >= 1 and cp.service._thread.is_alive()
        health = cp.client().get("/healthz").json()
        assert health["sampler_errors"] >= 1 and health["samples"] >= 3


def test_model_changes_one_at_a_time_with_timeouts_and_any_child_output(settings, bundle, tmp_path):
    """The job machinery around `rta model promote|rollback`, with stand-in children (a hang, a
    crash printing bytes that are not UTF-8): a second model change while a promote runs is a 409;
    a job always ends (timed out: the child killed, state failed); a hung rollback is one 503."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    garbage = [sys.executable, "-c", "import sys; sys.stdout.buffer.write(b'\\xff\\xfe{\\n'); "
               "sys.stderr.buffer.write(b'rta: broken \\xff\\n'); sys.exit(1)"]
    with control_plane(settings, tmp_path) as cp:
        op, v, svc = cp.client(cp.operator), cp.client(cp.viewer), cp.service
        svc.job_timeout_s, svc.rollback_timeout_s = 5.0, 1.0  # 5 s: the 409s below land well inside it
        svc._rta_model = lambda args: sleeper  # type: ignore[method-assign]
        r = op.post("/api/v1/models/promote", json={"version": "v1", "reason": "slow gate"})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        again = op.post("/api/v1/models/promote", json={"version": "v1", "reason": "again"})
        assert again.status_code == 409 and job_id in again.json()["error"], again.text
        rb = op.post("/api/v1/models/rollback", json={"reason": "meanwhile"})
        assert rb.status_code == 409 and job_id in rb.json()["error"], rb.text
        wait_for(lambda: v.get(f"/api/v1/jobs/{job_id}").json()["state"] != "running", 30, "the job's timeout")
        job = v.get(f"/api/v1/jobs/{job_id}").json()
        assert job["state"] == "failed" and "timed out" in job["error"] and job["ended_ms"] is not None, job
        # the next change is accepted again; a child's undecodable output still ends the job
        svc._rta_model = lambda args: garbage  # type: ignore[method-assign]
        r = op.post("/api/v1/models/promote", json={"version": "v1", "reason": "crash"})
        assert r.status_code == 202, r.text
        wait_for(lambda: v.get(f"/api/v1/jobs/{r.json()['id']}").json()["state"] != "running", 30, "the crash")
        job = v.get(f"/api/v1/jobs/{r.json()['id']}").json()
        assert job["state"] == "failed" and "broken" in job["error"] and job["exit_code"] == 1, job
        svc._rta_model = lambda args: sleeper  # type: ignore[method-assign]
        rb = op.post("/api/v1/models/rollback", json={"reason": "hangs"})
        assert rb.status_code == 503 and "timed out" in rb.json()["error"], rb.text
        assert v.get("/api/v1/models").json()["current"] == "v1"


def test_sessions_are_bounded_per_token_and_the_token_file_stays_private(tmp_path):
    """A token holder logging in in a loop cannot grow the server's memory or push anyone else's
    session out: past the per-token cap its own oldest session ends. The token file is 0600 even
    when a stale temporary file with wider permissions was left beside it."""
    import os

    from control.auth import MAX_SESSIONS_PER_TOKEN, Auth

    (tmp_path / "t.tmp").write_text("{}")
    os.chmod(tmp_path / "t.tmp", 0o644)
    tokens = TokenStore(tmp_path / "t.json")
    alice, _ = tokens.add("alice", "operator")
    assert (tmp_path / "t.json").stat().st_mode & 0o777 == 0o600
    bob, _ = tokens.add("bob", "viewer")
    auth = Auth(tokens)
    bob_sid, _ = auth.login(bob)
    sids = [auth.login(alice)[0] for _ in range(MAX_SESSIONS_PER_TOKEN + 1)]
    assert len(auth._sessions) == MAX_SESSIONS_PER_TOKEN + 1  # alice's cap + bob's one
    assert auth.authenticate(None, bob_sid).name == "bob"
    assert auth.authenticate(None, sids[-1]).name == "alice" and auth.authenticate(None, sids[1]).name == "alice"
    with pytest.raises(AuthError) as err:
        auth.authenticate(None, sids[0])  # alice's oldest session
    assert err.value.status == 401


def test_start_up_warnings_say_what_weakens_this_start(tmp_path):
    from control.cli import start_up_warnings

    assert start_up_warnings("127.0.0.1", "rta-operator", False, True, tmp_path) == []
    assert start_up_warnings("::1", "rta-operator", False, True, tmp_path) == []
    got = start_up_warnings("0.0.0.0", "default", False, False, tmp_path / "t.json")
    assert len(got) == 3 and "no tokens" in got[0] and "'default'" in got[1] and "--secure-cookie" in got[2]
    assert start_up_warnings("0.0.0.0", "rta-operator", True, True, tmp_path) == []
