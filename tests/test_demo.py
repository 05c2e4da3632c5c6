"""`rta demo` end to end on the session's broker and Redis, tiny profile: nothing undecided,
the live change of r shows in the block share, the filter keeps more deals than chance, and the
loop (new source -> logs -> v2 -> gate -> live reload) reports its section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_tiny_demo_decides_everything_and_follows_the_live_ratio(kafka, redis_server, clean_env: dict[str, str],
                                                                 tmp_path: Path):
    env = {**clean_env, "RTA_KAFKA_BOOTSTRAP": kafka.bootstrap, "RTA_REDIS_URL": redis_server.url}
    # 5 s of warm-up: the worker joins its group and the controller leaves its cold start before
    # phase 1 (the warm-up passes everything until then; it is reported, not judged).
    res = subprocess.run(
        [sys.executable, "-m", "infra.cli", "demo", "--profile", "tiny", "--rows", "12000",
         "--events", "16000", "--loop-events", "24000", "--rate", "2000", "--warmup-s", "5",
         "--ratios", "0.3,0.6", "--workdir", str(tmp_path / "demo")],
        env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "using the running stack" in res.stderr  # reused, not an embedded stack of its own
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    # the status page ran beside the story (rta control serve) and its URL was printed
    assert summary["status_page"].startswith("http://127.0.0.1:") and summary["status_page"] in res.stderr
    # a v2 the off-policy gate passes goes through a canary first (16k requests at 2000/s, 8 s)
    canary = summary["loop"]["canary"]
    phases = [p for p in summary["phases"] if p["phase"] != "canary"]
    assert summary["events_sent"] == 10_000 + 16_000 + 24_000 + 6_000 + 24_000 + (16_000 if canary else 0)
    assert summary["missing_decisions"] == 0 and summary["events_decided"] == summary["events_sent"]
    warm, one, two, before, switch, after = phases
    assert [p["phase"] for p in summary["phases"]] == ["warm-up", "phase 1", "phase 2", "new source, v1",
                                                       *(["canary"] if canary else []),
                                                       "switch-over", "new source, v2"]
    if canary:  # both arms decided, judged on their own outcomes; the summary carries the evidence
        assert set(canary["served_by"]) == {"v1", "v2"} and canary["decision"] in ("promote", "refuse",
                                                                                   "inconclusive")
        assert abs(canary["served_by"]["v2"] / canary["requests"] - 0.5) < 0.1  # minus the reload's first 2 s
        assert canary["evidence"]["rows"]["canary"] > 0 and canary["evidence"]["arms"]["canary"]["ci"]
    for phase in (one, two):
        assert phase["decided"] == phase["requests"] == 8000
        assert abs(phase["block_share_settled"] - phase["target_r"]) < 0.05, phase
        assert phase["deals_kept"] > phase["deals_kept_random"], phase
        # every decision of the phase carries a latency measured from its request's own ts_ms
        # (the world stamps it at send time, so it is positive; a decision made before its
        # request was sent, or a missing ts_ms, would fail here)
        assert phase["latency_ms"]["n"] == phase["decided"], phase
        assert phase["latency_ms"]["p50"] > 0, phase
    assert two["block_share_settled"] - one["block_share_settled"] > 0.2
    # the loop: v1 served the new source, v2 was trained from the logs and serves the last phase
    loop = summary["loop"]
    assert loop["v1"] == "v1" and loop["v2"] == "v2" and loop["r"] == 0.6
    # v2 serves the last phase when the gate promoted it (the tiny profile's student may fail the
    # gate's fidelity bar: then v1 goes on serving, and the summary says so)
    serving = "v2" if loop["promoted"] else "v1"
    assert before["models"] == {"v1": before["decided"]} and after["models"] == {serving: after["decided"]}
    assert loop["served_by"] == {"before": before["models"], "after": after["models"]}
    for key in ("new_source_deals_kept", "deals_kept", "deals_kept_oracle", "deals_kept_vs_oracle"):
        assert set(loop[key]) == {"before", "after"} and all(0 <= abs(v) <= 1 for v in loop[key].values()), key
    assert loop["new_source_deals_kept"]["before"] == before["new_source_deals_kept"]
    assert loop["new_source_deals_kept"]["after"] == after["new_source_deals_kept"]
    assert 0.05 < before["new_source_requests"] / before["requests"] < 0.15  # the 10% new source
    assert isinstance(loop["promoted"], bool) and "churn" in loop
    manifest = json.loads((tmp_path / "demo" / "models" / "v2" / "manifest.json").read_text())
    assert manifest["lineage"]["parent"] == "v1" and "/log/" in manifest["lineage"]["logs"]
    assert "new-source deals kept" in res.stdout
    assert "request->decision latency p50 / p99 ms: all" in res.stdout
