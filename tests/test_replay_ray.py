"""`rta replay --engine ray`: scoring on Ray actors decides exactly as the local engine does.
Ray is opt-in (extra `[ray]`, in `dev`); replay's default path never imports it. Ray runs in
`rta replay` child processes, never inside the test process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from replay_support import world_and_bundle

from training.offline_log import make_logged_layout
from training.replay import Step

ROWS = 6_000


def test_the_local_engine_never_imports_ray():
    code = ("import sys, training.replay, training.logs, training.logs_sql\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-500:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_scoring_gives_the_local_decisions_and_estimates(tmp_path):
    pytest.importorskip("ray")
    world, bundle = world_and_bundle(tmp_path, ROWS, seed=4)
    make_logged_layout(bundle, world, tmp_path / "log", Step(0.3, 0.02, 0.05), seed=1)
    env = {**os.environ, "RTA_TORCH_THREADS": "1", "RTA_RAY_BLOCK_CHUNKS": "1"}  # 3 blocks over 2 actors
    env.pop("RTA_RAY_ADDRESS", None)
    for mode, flags in (("logged", ["--thresholds", "logged"]),
                        ("live", ["--ratio", "0.3", "--pass-share", "0.02", "--explore", "0.05"])):
        reports, tables = {}, {}
        for engine in ("local", "ray"):
            out = tmp_path / f"{mode}-{engine}"
            r = subprocess.run([sys.executable, "-m", "infra.cli", "replay", "--model", str(bundle), "--logs",
                                str(tmp_path / "log"), "--out", str(out), *flags, "--engine", engine,
                                "--workers", "2", "--no-plots", "--quiet"],
                               capture_output=True, text=True, timeout=300, env=env)
            assert r.returncode == 0, r.stderr[-2000:]
            reports[engine] = json.loads((out / "report.json").read_text())
            tables[engine] = pq.read_table(out / "decisions.parquet")
        assert reports["ray"]["engine"] == {"name": "ray", "workers": 2}
        assert tables["ray"].num_rows == ROWS and tables["ray"].equals(tables["local"]), mode
        # every summary, off-policy estimates included, is the same
        assert reports["ray"]["runs"] == reports["local"]["runs"], mode
        if mode == "logged":
            assert reports["ray"]["runs"][0]["match"]["decision_and_reason_match"] == 1.0
