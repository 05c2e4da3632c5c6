"""The registry: the chain of `current`, registry.jsonl, the audit topic, and workers following
promote and rollback on the real broker and Redis."""

from __future__ import annotations

import json

import pytest
from student_data import make_bundle
from test_operators import rta  # the CLI's own entry point, in process
from worker_support import (
    assigned,
    decisions,
    produce,
    read_topic,
    request_values,
    running,
    wait_for,
)

from infra.stack import free_port
from model import bundle, registry
from stream.errors import BundleError, ConfigError


def _switch(capsys, md, *args: str) -> tuple[int, str, str]:
    return rta(capsys, "model", *args, "--model-dir", str(md), "--no-audit-topic", "--who", "ops")


def test_promote_and_rollback_walk_the_chain(capsys, tmp_path):
    md = tmp_path / "models"
    make_bundle(md, "v1")  # the bootstrap version, published by training
    make_bundle(md, "v2", seed=1, publish=False)
    make_bundle(md, "v3", seed=2, publish=False)
    assert registry.previous_version(md) is None
    for v in ("v2", "v3"):
        code, out, err = _switch(capsys, md, "promote", v, "--force", "--reason", f"ship {v}")
        assert code == 0 and json.loads(out)["forced"] is True, err
    assert registry.history_chain(md) == ["v1", "v2", "v3"]
    code, out, _ = _switch(capsys, md, "rollback", "--reason", "v3 misbehaves")
    assert code == 0 and "v3 -> v2" in out and bundle.current_version(md) == "v2"
    code, out, _ = _switch(capsys, md, "rollback", "--reason", "v2 too")
    assert code == 0 and "v2 -> v1" in out and bundle.current_version(md) == "v1"
    code, _, err = _switch(capsys, md, "rollback", "--reason", "again")
    assert code == 2 and "no previous version" in err and len(err.strip().splitlines()) == 1
    log = registry.read_log(md)
    assert [(e["action"], e["old"], e["new"]) for e in log] == [
        ("promote", "v1", "v2"), ("promote", "v2", "v3"), ("rollback", "v3", "v2"), ("rollback", "v2", "v1")]
    assert all(e["who"] == "ops" and e["kind"] == f"model.{e['action']}" and not e["audit_topic"] for e in log)
    code, out, _ = rta(capsys, "model", "list", "--model-dir", str(md))
    assert code == 0 and "* v1" in out and "rollback by ops" in out and "4 switches" in out
    rows = json.loads(rta(capsys, "model", "list", "--model-dir", str(md), "--json")[1])
    assert [r["version"] for r in rows] == ["v1", "v2", "v3"] and rows[0]["current"]
    bundle.publish(md / "v3")  # e.g. `rta train --publish`: not through the registry
    code, _, err = _switch(capsys, md, "rollback", "--reason", "which one?")
    assert code == 2 and "was not switched through `rta model`" in err


def test_a_verdict_won_against_an_older_current_does_not_switch(tmp_path):
    # two overlapping retrains both gated against v1: the second must not replace the first's
    # promotion of v2 without being judged against v2
    md = tmp_path / "models"
    make_bundle(md, "v1")
    make_bundle(md, "v2", seed=1, publish=False)
    make_bundle(md, "v3", seed=2, publish=False)
    registry.switch(md, "v2", "promote", "cron", "nightly", expect_current="v1")
    with pytest.raises(BundleError, match="current moved to v2 while this promote was decided against v1"):
        registry.switch(md, "v3", "promote", "cron", "nightly", expect_current="v1")
    assert bundle.current_version(md) == "v2" and [e["new"] for e in registry.read_log(md)] == ["v2"]


def test_torn_log_line_old_bundles_and_bad_names(tmp_path):
    md = tmp_path / "models"
    make_bundle(md, "v1")
    make_bundle(md, "v2", seed=1, publish=False)
    registry.switch(md, "v2", "promote", "ops", "first")
    with open(md / registry.REGISTRY_LOG, "a") as f:
        f.write('{"action": "promote", "old": "v2", "ne')  # a crash mid-append
    assert len(registry.read_log(md)) == 1 and registry.previous_version(md) == "v1"
    lin = registry.lineage(md / "v1")  # a bundle from before lineage: tolerated, marked
    assert lin["recorded"] is False and lin["parent"] is None and lin["data_to_ms"] is None
    for name in ("../v1", "current", ""):
        with pytest.raises(ConfigError):
            registry.version_dir(md, name)
    with pytest.raises(ConfigError, match="needs --reason"):
        registry.switch(md, "v1", "rollback", "ops", "  ")
    (md / "v2" / "student.onnx").write_bytes(b"tampered")
    registry.switch(md, "v1", "rollback", "ops", "back")
    with pytest.raises(BundleError, match="sha256 mismatch"):  # never switch to a bundle that fails
        registry.switch(md, "v2", "promote", "ops", "again")
    assert bundle.current_version(md) == "v1"


def test_no_switch_without_the_audit_topic_when_kafka_is_away(capsys, tmp_path, monkeypatch):
    md = tmp_path / "models"
    make_bundle(md, "v1")
    make_bundle(md, "v2", seed=1, publish=False)
    monkeypatch.setenv("RTA_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")
    code, _, err = rta(capsys, "model", "promote", "v2", "--model-dir", str(md), "--force", "--reason", "x")
    assert code == 2 and "audit topic not written" in err and "NOT changed" in err
    assert len(err.strip().splitlines()) == 1
    assert bundle.current_version(md) == "v1" and registry.read_log(md) == []


@pytest.mark.slow
def test_workers_follow_promote_and_rollback_and_the_audit_topic_has_both(capsys, settings, bundle, targets,
                                                                          monkeypatch):
    monkeypatch.setenv("RTA_KAFKA_BOOTSTRAP", settings.kafka_bootstrap)
    monkeypatch.setenv("RTA_TOPIC_AUDIT", settings.topic("audit"))
    md = settings.model_dir
    make_bundle(md, "v2", seed=1, publish=False)
    ids, values = request_values(3000)
    with running(settings, group_id="reg", reload_interval_s=0.1) as w:
        wait_for(lambda: assigned(w) == 3, 30, "partition assignment")
        produce(settings, values[:1000], ids[:1000])
        wait_for(lambda: w.stats.events >= 1000, 30, "first 1000 decided")
        code, _, err = rta(capsys, "model", "promote", "v2", "--model-dir", str(md), "--force",
                           "--reason", "canary", "--who", "alice")
        assert code == 0, err
        wait_for(lambda: w.scorer.version == "v2", 5, "reload to v2")
        produce(settings, values[1000:2000], ids[1000:2000])
        wait_for(lambda: w.stats.events >= 2000, 30, "second 1000 decided")
        code, _, err = rta(capsys, "model", "rollback", "--model-dir", str(md), "--reason", "canary bad",
                           "--who", "alice")
        assert code == 0, err
        wait_for(lambda: w.scorer.version == "v1", 5, "reload back to v1")
        produce(settings, values[2000:], ids[2000:])
        wait_for(lambda: w.stats.events >= 3000, 30, "third 1000 decided")
    got = {d["request_id"]: d["model"] for d in decisions(settings, 3000)}
    assert {got[i] for i in ids[:1000]} == {"v1"}
    assert {got[i] for i in ids[1000:2000]} == {"v2"}
    assert {got[i] for i in ids[2000:]} == {"v1"}
    msgs = read_topic(settings, "audit", 2, timeout=20)
    assert [m.key() for m in msgs] == [b"model", b"model"]  # told apart from `ratio` changes
    audit = [json.loads(m.value()) for m in msgs]
    assert [(e["kind"], e["old"], e["new"], e["who"]) for e in audit] == [
        ("model.promote", "v1", "v2", "alice"), ("model.rollback", "v2", "v1", "alice")]
    assert audit[0]["forced"] is True and audit[1]["reason"] == "canary bad"
    assert [e["new"] for e in registry.read_log(md)] == ["v2", "v1"]


def test_the_gate_window_starts_after_what_the_candidate_its_parent_or_current_trained_on(tmp_path):
    from training.gate import holdout_start

    md = tmp_path / "models"
    for v, parent, logs, to_ms in (("v1", None, "logs", 5_000), ("v2", "v1", "logs", 3_000),
                                   ("w", None, "world", 9_000)):
        make_bundle(md, v, publish=v == "v1")
        bundle.update_manifest(md / v, lineage={"parent": parent, "logs": logs, "data_to_ms": to_ms, "anchor": None})
    # v2 trained on rows up to 3000, but was warm-started from v1, which saw up to 5000
    assert holdout_start(md / "v2", None)[0] == 5_001
    # another log set's timestamps are other rows: they do not move the window
    assert holdout_start(md / "v2", None, md / "w")[0] == 5_001
    assert holdout_start(md / "w", None, md / "v2") == (9_001, "lineage data_to_ms")
    assert holdout_start(md / "v2", 42) == (42, "--holdout-from-ms")


# --- issue 27 item 7: one locked, verified, logged path for every switch of `current` ----------


def test_train_publish_and_bootstrap_switch_through_the_registry_so_rollback_walks_back(capsys, tmp_path):
    """On main `rta train --publish` called bundle.publish directly: no lock, no registry line, and
    rollback then refused ("was not switched through `rta model`")."""
    from training.pipeline import _publish_or_not

    md = tmp_path / "models"
    make_bundle(md, "v1", publish=False)
    make_bundle(md, "v2", seed=1, publish=False)
    _publish_or_not(md / "v1", None)  # the first version: bootstrap
    _publish_or_not(md / "v2", True)  # rta train --publish
    log = registry.read_log(md)
    assert [(e["action"], e["old"], e["new"], e["forced"]) for e in log] == [
        ("bootstrap", None, "v1", False), ("publish", "v1", "v2", True)]
    code, out, err = _switch(capsys, md, "rollback", "--reason", "v2 was not gated")
    assert code == 0 and "v2 -> v1" in out and bundle.current_version(md) == "v1", err


def test_a_crash_between_the_registry_line_and_the_switch_leaves_rollback_working(capsys, tmp_path, monkeypatch):
    """The line is written first; a switch that then never happened is ignored by the chain. On
    main (switch, then line) a crash after the switch left `current` at a version registry.jsonl
    did not know and rollback refused; here the same fault (the line cannot be written) leaves
    `current` where it was. Breaks tried: publish before the line -> first assertion fails;
    history_chain over read_log instead of applied_log -> the rollback goes to v3."""
    md = tmp_path / "models"
    for v in ("v1", "v2", "v3"):
        make_bundle(md, v, seed=int(v[1]), publish=v == "v1")
    registry.switch(md, "v2", "promote", "ops", "ship v2", forced=True)

    def torn(*_a, **_k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(registry, "_append_log", torn)
        with pytest.raises(OSError):
            registry.switch(md, "v3", "promote", "ops", "ship v3", forced=True)
    assert bundle.current_version(md) == "v2"  # no switch without its line
    with monkeypatch.context() as m:  # the line written, then the process dies before the switch
        m.setattr(bundle, "publish", lambda *_a: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            registry.switch(md, "v3", "promote", "ops", "ship v3", forced=True)
    assert bundle.current_version(md) == "v2" and registry.read_log(md)[-1]["new"] == "v3"
    assert registry.history_chain(md) == ["v1", "v2"] and registry.previous_version(md) == "v1"
    code, out, err = _switch(capsys, md, "rollback", "--reason", "v2 misbehaves")
    assert code == 0 and "v2 -> v1" in out and bundle.current_version(md) == "v1", err


def test_a_version_that_is_a_symlink_is_refused_and_no_other_directory_switches(capsys, tmp_path):
    """On main a link `models/evil -> other/v9` switched `other/current` (publish resolved it)."""
    md, other = tmp_path / "models", tmp_path / "other"
    make_bundle(md, "v1")
    make_bundle(other, "v8")
    make_bundle(other, "v9", seed=1, publish=False)
    (md / "evil").symlink_to(other / "v9")
    code, _, err = _switch(capsys, md, "promote", "evil", "--force", "--reason", "link")
    assert code == 2 and "symlink" in err and len(err.strip().splitlines()) == 1, err
    assert bundle.current_version(md) == "v1" and bundle.current_version(other) == "v8"


def test_the_bundle_is_verified_under_the_lock(tmp_path):
    """A bundle changed while its switch waits for the lock is refused (on main verify ran before
    the lock, so the changed bundle was served). Break tried: verify before the lock -> switched."""
    import fcntl
    import os
    import threading
    import time

    md = tmp_path / "models"
    make_bundle(md, "v1")
    make_bundle(md, "v2", seed=1, publish=False)
    lock = os.open(md / registry.LOCK_FILE, os.O_WRONLY | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another switch holds the lock
    errors: list[BaseException] = []

    def promote() -> None:
        try:
            registry.switch(md, "v2", "promote", "ops", "ship v2", forced=True)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    t = threading.Thread(target=promote)
    t.start()
    time.sleep(1.0)  # the switch is waiting for the lock (on main: verified already)
    assert t.is_alive()
    onnx = next(f for f in (md / "v2").iterdir() if f.suffix == ".onnx")
    onnx.write_bytes(onnx.read_bytes() + b"tampered")
    fcntl.flock(lock, fcntl.LOCK_UN)
    os.close(lock)
    t.join(30)
    assert errors and isinstance(errors[0], BundleError), errors
    assert bundle.current_version(md) == "v1"
