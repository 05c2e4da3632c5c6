"""`rta bench latency`: both runs on fresh topics at one rate, every request answered, and the
worker's added latency is the difference of the two runs' percentiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_passthrough_and_worker_at_one_rate_on_fresh_topics(settings, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTA_")}
    env.update({"RTA_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "RTA_REDIS_URL": settings.redis_url})
    out = tmp_path / "latency.json"
    res = subprocess.run([sys.executable, "-m", "infra.cli", "bench", "latency", "--rate", "300", "--seconds", "2",
                          "--features", "28", "--rounds", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout)
    assert json.loads(out.read_text()) == result
    assert [r["order"] for r in result["rounds"]] == [["passthrough", "worker"], ["worker", "passthrough"]]
    for r in result["rounds"]:
        for phase in ("passthrough", "worker"):
            row = r[phase]
            assert row["decided"] == 600 and row["missing"] == 0, row
            assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["p999_ms"] <= row["max_ms"]
            stages = row["stages"]
            assert 0 <= stages["sent_to_produced"]["p50_ms"] <= row["p99_ms"]
        assert "sent_to_decided" in r["worker"]["stages"] and "sent_to_decided" not in r["passthrough"]["stages"]
        assert r["worker_added"]["p99_ms"] == pytest.approx(r["worker"]["p99_ms"] - r["passthrough"]["p99_ms"], abs=0.02)
