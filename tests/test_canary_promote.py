"""`rta model promote` on a canary's own arms: the logged layout of a canary, the world's outcomes
known, judged by the gate's rule (training/canary_judge.py -> training/gate.py `decide`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from student_data import TASKS, fitted, make_bundle, make_student
from test_logged_layout import impressions, outcomes, put
from worker_support import RTA

from model import registry
from stream import canary
from stream.canary import canary_arm, read_canary
from stream.logger.schema import IMPRESSIONS_DIR, OUTCOMES_DIR

WINDOWS = "click=60s,online=60s,cart=60s,deal=60s"
RATES = np.array([0.10, 0.05, 0.03, 0.02])  # each task's positives per request (independent draws)


def fidelity_bundle(model_dir: Path, version: str, seed: int) -> Path:
    """A bundle whose manifest records a passed fidelity acceptance (as distillation writes it)."""
    from model.export import export_bundle

    pre, _, _ = fitted(seed=seed)
    export_bundle(Path(model_dir) / version, pre, make_student(pre, seed=seed),
                  metrics={"fidelity": {"acceptance": {"passed": True, "calibration": True}}})
    return Path(model_dir) / version


def canary_logs(out: Path, current: str, candidate: str, share: float, keep_canary: float, n: int = 80_000,
                keep_current: float = 0.6, seed: int = 0) -> dict[str, float]:
    """`rta log`'s layout of a canary at `share`: a request with a positive is passed with its arm's
    keep rate, one without it is blocked 30 % of the time; outcomes for the passed positives.
    Returns the true value difference (relative to current's kept positives, every task)."""
    rng = np.random.default_rng(seed)
    rids = [f"cp{seed}-{i}" for i in range(n)]
    arm = canary_arm(rids, share)
    y = rng.random((n, len(TASKS))) < RATES
    good = y.any(axis=1)
    keep = np.where(arm, keep_canary, keep_current)
    passed = np.where(good, rng.random(n) < keep, rng.random(n) >= 0.3)
    t0 = 1_767_225_600_000  # 2026-01-01: every attribution window long closed
    ts = (t0 + np.arange(n) * 40).tolist()  # ~53 minutes
    put(out, IMPRESSIONS_DIR, impressions(rids, ts, np.where(passed, "pass", "block").tolist(),
                                          model=pa.array(np.where(arm, candidate, current).tolist())), t0)
    events = [(rids[i], TASKS[j], ts[i] + 1000) for i, j in zip(*np.nonzero(y & passed[:, None]), strict=True)]
    put(out, OUTCOMES_DIR, outcomes(events), t0)
    return {"current": keep_current, "canary": keep_canary, "relative": keep_canary / keep_current - 1}


def promote(model_dir: Path, logs: Path, version: str, env: dict[str, str], *extra: str):
    return subprocess.run([*RTA, "model", "promote", version, "--model-dir", str(model_dir), "--logs", str(logs),
                           "--attribution", WINDOWS, "--reason", "canary evidence", "--no-audit-topic", *extra],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def env(clean_env):
    return {**clean_env, "RTA_REDIS_URL": "redis://127.0.0.1:1/0"}


def test_a_clearly_better_canary_is_promoted_on_its_arms_with_an_interval_that_excludes_0(tmp_path, env):
    models = tmp_path / "models"
    make_bundle(models, "v1", seed=0)
    fidelity_bundle(models, "v2", seed=1)
    canary.start(models, "v2", 0.3, "test", "canary of v2")
    truth = canary_logs(tmp_path / "logs", "v1", "v2", 0.3, keep_canary=0.8)
    res = promote(models, tmp_path / "logs", "v2", env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    gate = out["gate"]
    assert out["outcome"] == "promoted" and gate["evidence"] == "canary" and gate["decision"] == "promote"
    v = gate["value"]
    lo, hi = v["difference_ci"]
    assert lo > 0, gate["verdict"]["why"]
    # truth: every task's kept positives per request +33 %; the value is in units of current's kept
    # positives per task, so its relative difference is the same +33 %
    assert lo / v["current"] < truth["relative"] < hi / v["current"]
    assert abs(v["rows"]["canary"] / (v["rows"]["canary"] + v["rows"]["current"]) - 0.3) < 0.01
    # audited with the evidence, gate.json says so, and the canary is over
    entry = [e for e in registry.read_log(models) if e["action"] == "promote"][-1]
    assert entry["gate"]["estimate"]["evidence"] == "canary" and entry["gate"]["decision"] == "promote"
    assert entry["gate"]["estimate"]["value_ci"][0] > 0 and entry["gate"]["window"]["rows"] > 70_000
    assert registry.read_gate(models / "v2")["evidence"] == "canary"
    assert read_canary(models) is None and (models / "current").resolve().name == "v2"
    assert "canary evidence" not in res.stderr or "not used" not in res.stderr


def test_a_clearly_worse_canary_is_refused_on_its_arms_and_bad_evidence_is_one_line(tmp_path, env):
    models = tmp_path / "models"
    make_bundle(models, "v1", seed=0)
    fidelity_bundle(models, "v2", seed=1)
    canary.start(models, "v2", 0.3, "test", "canary of v2")
    canary_logs(tmp_path / "logs", "v1", "v2", 0.3, keep_canary=0.35, seed=1)
    res = promote(models, tmp_path / "logs", "v2", env)
    assert res.returncode == 3, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["outcome"] == "refused" and out["gate"]["evidence"] == "canary"
    assert out["gate"]["value"]["difference_ci"][1] < 0 and (models / "current").resolve().name == "v1"
    assert read_canary(models).version == "v2"  # a refused promotion leaves the canary to its operator
    # --evidence canary for a version no canary ran: one line, exit 2, nothing switched
    fidelity_bundle(models, "v3", seed=2)
    bad = promote(models, tmp_path / "logs", "v3", env, "--evidence", "canary")
    assert bad.returncode == 2 and "no canary evidence for v3" in bad.stderr and "Traceback" not in bad.stderr
    # a canary of v3 whose logs hold none of its decisions: --evidence canary names the problem
    canary.start(models, "v3", 0.2, "test", "canary of v3")
    bad = promote(models, tmp_path / "logs", "v3", env, "--evidence", "canary")
    assert bad.returncode == 2 and "no logged decision of v3" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_retrain_with_canary_gates_then_starts_a_canary_instead_of_switching(tmp_path):
    from gate_support import rta, split_world_and_v0

    from infra.stack import free_port

    train, holdout, models = split_world_and_v0(tmp_path, 30_000, seed=5)
    args = ["retrain", "--logs", str(train), "--gate-logs", str(holdout), "--model-dir", str(models),
            "--since-hours", "24", "--profile", "tiny", "--reason", "nightly", "--ratio", "0.5",
            "--pass-share", "0.02", "--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--no-audit-topic",
            "--quiet", "--threads", "1", "--fidelity", "no-regression"]
    bad = rta(*args, "--version", "c0", "--canary", "1.5")
    assert bad.returncode == 2 and "--canary" in bad.stderr and "Traceback" not in bad.stderr
    res = rta(*args, "--version", "c1", "--canary", "0.2")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["outcome"] == "canary" and out["gate"]["passed"] and out["canary"]["share"] == 0.2
    assert (models / "current").resolve().name == "v0"  # not switched
    state = read_canary(models)
    assert state.version == "c1" and state.share == 0.2
    start = registry.read_log(models)[-1]
    assert (start["action"], start["old"], start["new"]) == ("canary-start", "v0", "c1")
    assert start["gate"]["decision"] == "promote" and start["reason"] == "retrain: nightly"


def test_the_watch_stops_a_clearly_worse_canary_on_its_value_guard_rail_audited_and_status_shows_it(
        tmp_path, env):
    """The value guard rail, live: `rta model canary-watch --once` judges the arms' matured outcomes,
    writes per-arm values with intervals (canary status, /metrics) and stops a worse canary."""
    from training.canary_judge import WatchMetrics, watch_once
    from training.gate import GateConfig
    from training.logs import Attribution

    models = tmp_path / "models"
    make_bundle(models, "v1", seed=0)
    fidelity_bundle(models, "v2", seed=1)
    canary.start(models, "v2", 0.3, "test", "canary of v2")
    logs = tmp_path / "logs"
    # an equal canary: judged, not stopped; status carries each arm's value with its interval
    canary_logs(logs, "v1", "v2", 0.3, keep_canary=0.6, n=20_000, seed=2)
    cfg = GateConfig(confidence=0.99, boot=400)
    rec = watch_once(models, logs, cfg, Attribution.parse(WINDOWS))
    assert rec["state"] == "judged" and not rec.get("stopped") and read_canary(models) is not None
    for arm in ("current", "canary"):
        lo, hi = rec["arms"][arm]["ci"]
        assert lo < rec["arms"][arm]["value"] < hi
    st = subprocess.run([*RTA, "model", "canary", "status", "--model-dir", str(models)], capture_output=True,
                        text=True, env=env, timeout=60)
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["value"]["arms"]["canary"]["ci"] == rec["arms"]["canary"]["ci"]
    m = WatchMetrics()
    m.observe(rec)
    assert m.registry.get_sample_value("rta_canary_value", {"arm": "canary", "bound": "low"}) == \
        rec["arms"]["canary"]["ci"][0]
    # a clearly worse canary (it keeps 35 % of the positives current keeps 60 % of): the CLI's
    # one round stops it, automatic and audited with the evidence
    import shutil

    shutil.rmtree(logs)
    canary_logs(logs, "v1", "v2", 0.3, keep_canary=0.35, n=20_000, seed=3)
    res = subprocess.run([*RTA, "model", "canary-watch", "--once", "--model-dir", str(models), "--logs", str(logs),
                          "--attribution", WINDOWS, "--no-audit-topic"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    assert rec["stopped"] and rec["value_decision"] == "refuse" and rec["difference_ci"][1] < 0
    assert read_canary(models) is None
    entry = registry.read_log(models)[-1]
    assert entry["action"] == "canary-stop" and entry["automatic"]
    assert entry["reason"].startswith("automatic rollback: value guard rail:") and "\n" not in entry["reason"]
    assert entry["evidence"]["difference_ci"][1] < 0 and entry["evidence"]["rows"]["canary"] > 5000


def test_the_control_plane_shows_the_canary_and_its_value_to_viewers(settings, bundle, tmp_path):
    from control_support import control_plane

    fidelity_bundle(settings.model_dir, "v2", seed=1)
    canary.start(settings.model_dir, "v2", 0.25, "test", "canary of v2")
    (settings.model_dir / canary.VALUE_FILE).write_text(json.dumps(
        {"version": "v2", "state": "judged", "arms": {"canary": {"value": 1.1, "ci": [1.0, 1.2]}}}))
    with control_plane(settings, tmp_path) as cp:
        got = cp.client(cp.viewer).get("/api/v1/canary")
        assert got.status_code == 200, got.text
        doc = got.json()
        assert doc["canary"]["version"] == "v2" and doc["canary"]["share"] == 0.25 and doc["current"] == "v1"
        assert doc["value"]["arms"]["canary"]["ci"] == [1.0, 1.2] and doc["last"]["action"] == "canary-start"
        assert cp.client(None).get("/api/v1/canary").status_code == 401


def canary_of_two_layouts(world: Path, current: Path, candidate: Path, share: float, tmp: Path) -> Path:
    """A canary's logged layout: both bundles filter the same world (make_logged_layout), each row
    taken from the layout of its hashed arm (`canary_arm`), with that layout's outcomes."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from training.logs import load_logs
    from training.offline_log import _write_hours, make_logged_layout
    from training.replay import Step

    world_logs = load_logs(world)
    imp, out = [], []
    for d in (current, candidate):
        make_logged_layout(d, world_logs, tmp / d.name, Step(0.5, 0.02, 0.2), seed=1)
        imp.append(pa.concat_tables(pq.read_table(f) for f in sorted((tmp / d.name / IMPRESSIONS_DIR).rglob("*.parquet"))))
        out.append(pa.concat_tables(pq.read_table(f) for f in sorted((tmp / d.name / OUTCOMES_DIR).rglob("*.parquet"))))
    cur, cand = imp[0], imp[1].take(pc.index_in(imp[0]["request_id"], imp[1]["request_id"]))
    rids = np.asarray(cur["request_id"].to_pylist(), dtype=object)
    arm = canary_arm(rids, share)
    table = pa.concat_tables([cur.filter(pa.array(~arm)), cand.filter(pa.array(arm))])
    root = tmp / "canary"
    _write_hours(table, table["ts_ms"].to_numpy(), root / IMPRESSIONS_DIR)
    kept = [o.filter(pc.is_in(o["request_id"], value_set=pa.array(rids[a].tolist(), pa.string())))
            for o, a in ((out[0], ~arm), (out[1], arm))]
    outcomes_t = pa.concat_tables(kept)
    _write_hours(outcomes_t, outcomes_t["ts_ms"].to_numpy(), root / OUTCOMES_DIR)
    return root


@pytest.mark.slow
def test_canary_fidelity_is_judged_on_the_canary_window_not_the_recorded_acceptance(tmp_path):
    """Two trained bundles (teachers included); the candidate's manifest records a failed
    distillation-time acceptance on a check the current's holds. The canary's evidence judges
    fidelity as the off-policy gate does (teacher vs student on the canary period's rows, with
    intervals), so the recorded failure alone does not refuse it; the watch judges value only."""
    from gate_support import WINDOWS as GATE_WINDOWS
    from gate_support import split_world, train_tiny
    from replay_support import world_log

    from model import bundle
    from training.canary_judge import canary_gate, watch_once
    from training.gate import GateConfig
    from training.logs import Attribution

    world = world_log(tmp_path / "world", 30_000, seed=7)
    train, holdout = split_world(world / "part-00000.parquet", tmp_path / "split")
    models = tmp_path / "models"
    v1, v2 = train_tiny(train, models, "v1", seed=0), train_tiny(train, models, "v2", seed=1)
    bundle.publish(v1)
    # the recorded acceptance: a check the current passed, failed by the candidate (manifest not hashed)
    check = next(k for k in bundle.read_manifest(v2)["metrics"]["fidelity"]["acceptance"] if k != "passed")
    for d, ok in ((v1, True), (v2, False)):
        m = json.loads((d / bundle.MANIFEST).read_text())
        m["metrics"]["fidelity"]["acceptance"].update({check: ok, "passed": ok})
        (d / bundle.MANIFEST).write_text(json.dumps(m, indent=2))
    registry.verify(v2)  # still a verifiable bundle
    canary.start(models, "v2", 0.5, "test", "canary of v2")
    logs = canary_of_two_layouts(holdout, v1, v2, 0.5, tmp_path / "layouts")
    as_of = int(pq_newest(logs)) + 86_400_000  # every attribution window closed
    att = Attribution.parse(",".join(f"{k}={v:g}" for k, v in GATE_WINDOWS.items()), as_of)
    cfg = GateConfig(fidelity="no-regression", boot=400)

    res = canary_gate(models, "v2", logs, cfg, att, write=False)
    fid = res["fidelity"]
    assert fid["source"] == "gate window", fid
    assert fid["passed"], fid.get("why")
    assert fid["candidate"]["rows"] > 4000 and fid["current"] is not None  # the canary period's rows, re-scored
    assert not any(r.startswith("fidelity") for r in res["reasons"]), res["reasons"]
    assert res["decision"] == res["verdict"]["decision"]  # fidelity did not override the value's verdict
    assert res["value"]["rows"]["canary"] > 2000 and res["value"]["rows"]["current"] > 2000
    # the watch judges value only: a round neither refuses nor stops the canary on fidelity
    rec = watch_once(models, logs, cfg, att, stop=True)
    assert rec["state"] == "judged" and not rec.get("stopped"), rec
    assert rec["decision"] == rec["value_decision"] and read_canary(models).version == "v2"


def pq_newest(root: Path) -> int:
    import pyarrow.parquet as pq

    return max(int(pq.read_table(f, columns=["ts_ms"])["ts_ms"].to_numpy().max())
               for f in (root / IMPRESSIONS_DIR).rglob("*.parquet"))
