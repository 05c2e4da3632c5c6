"""`rta replay --engine ray`: scoring on Ray actors decides exactly as the local engine does.
Ray is opt-in (extra `[ray]`, in `dev`); replay's default path never imports it. Ray runs in
`rta replay` child processes, never inside the test process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from replay_support import world_and_bundle

from stream.errors import ConfigError
from training.offline_log import make_logged_layout
from training.replay import SCORE_CHUNK, Step

# RTA_RAY_BLOCK_CHUNKS=2: blocks of 4096, 4096, 1808 rows (the last block and its last chunk
# partial), so an actor that scored a block other than chunk by chunk would be seen
ROWS = 10_000


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
    env = _no_ray_env({**os.environ, "RTA_TORCH_THREADS": "1", "RTA_RAY_BLOCK_CHUNKS": "2"})  # 3 blocks, 2 actors
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


def _no_ray_env(env: dict[str, str]) -> dict[str, str]:
    """Local mode must start its own Ray, whatever the caller's environment names: the caller's
    RTA_RAY_ADDRESS and RAY_ADDRESS are dropped, and RAY_ADDRESS then names a port where nothing
    listens (as a KubeRay pod's or a `ray start` on this box would name a cluster), which local
    mode must ignore."""
    env.pop("RTA_RAY_ADDRESS", None)
    env["RAY_ADDRESS"] = "127.0.0.1:9"
    return env


def test_a_bad_block_size_is_one_line(monkeypatch):
    from training.replay_ray import RayScoring, block_chunks

    for bad in ("abc", "0", "-2", "1.5"):
        monkeypatch.setenv("RTA_RAY_BLOCK_CHUNKS", bad)
        with pytest.raises(ConfigError, match="RTA_RAY_BLOCK_CHUNKS") as err:
            RayScoring("no-such-bundle")  # refused before the bundle is read or Ray imported
        assert "\n" not in str(err.value)
    monkeypatch.setenv("RTA_RAY_BLOCK_CHUNKS", " 3 ")
    assert block_chunks() == 3


def test_the_actor_scores_from_shipped_bytes_chunk_by_chunk_as_the_local_path(tmp_path):
    """No Ray here: the actor class itself, fed the bytes the driver ships, with the driver's
    bundle directory gone (as on a cluster node), scores every float as the local engine."""
    from stream.policy import ScorePolicy
    from stream.scorer import Scorer
    from training.replay import score_logs
    from training.replay_ray import _ScoreActor, bundle_files

    logs, bundle = world_and_bundle(tmp_path, 5_000, seed=3)
    scorer = Scorer.load(bundle)
    policy = ScorePolicy.from_manifest(scorer.manifest)
    files = bundle_files(bundle)
    assert "manifest.json" in files and not any(n.endswith(".pt") for n in files)
    shutil.rmtree(bundle)
    actor = _ScoreActor(files, 1)

    def blocks(num, cat, chunk):  # what RayScoring.blocks does, minus Ray: 2 chunks a call
        size = 2 * chunk
        for s in range(0, len(num), size):
            sl = slice(s, min(len(num), s + size))
            yield sl, actor.score(num[sl], cat[sl], chunk)

    assert len(logs) > 2 * SCORE_CHUNK and len(logs) % SCORE_CHUNK  # 2 blocks, the last chunk partial
    local, shipped = score_logs(logs, scorer, policy), score_logs(logs, scorer, policy, blocks=blocks)
    for f in ("p", "u_tasks", "e", "u"):
        assert np.array_equal(getattr(local, f), getattr(shipped, f), equal_nan=True), f


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_actor_that_cannot_load_the_bundle_is_one_line(tmp_path):
    """The shipped bytes are checked against the manifest in the actor; a failure there (a
    RayActorError on the first call, no RtaError) reaches the user as one line."""
    pytest.importorskip("ray")
    _, bundle = world_and_bundle(tmp_path, 1_000, seed=2)
    graph = bundle / "student_codes.onnx"
    if not graph.exists():
        graph = bundle / "student.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    code = ("import sys, numpy as np\n"
            "from stream.errors import RtaError\n"
            "from training.replay_ray import RayScoring\n"
            "try:\n"
            f"    with RayScoring({str(bundle)!r}, 1) as pool:\n"
            "        list(pool.blocks(np.zeros((10, 3), np.float32), np.zeros((10, 2), np.int64), 2048))\n"
            "except RtaError as e:\n"
            "    print(e)\n"
            "    sys.exit(2)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                       env=_no_ray_env({**os.environ}))
    assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("--engine ray: scoring failed ("), r.stdout
