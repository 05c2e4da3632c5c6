"""`rta world outcomes` as a process on the real broker: outcomes for passed requests only, one per
label, delayed along the funnel; truth chunks picked up while it runs; SIGTERM commits and exits."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from live_log_support import committed_offsets
from worker_support import read_topic, wait_for, worker_env

from stream.events import decode_outcome, encode_decisions
from stream.kafka import make_producer, produce_waiting
from training.world_cli import TruthChunks

pytestmark = pytest.mark.slow

TASKS = ("click", "online", "cart", "deal")


def test_outcomes_only_for_passed_requests_each_label_once(settings, tmp_path: Path):
    n = 400
    rng = np.random.default_rng(3)
    ids = [f"o{i}" for i in range(n)]
    click = rng.random(n) < 0.5
    online = click & (rng.random(n) < 0.5)
    cart = online & (rng.random(n) < 0.5)
    deal = online & (rng.random(n) < 0.5)
    labels = {"click": click, "online": online, "cart": cart, "deal": deal}
    truth = pa.table({"request_id": ids, "ts_ms": np.zeros(n, np.int64),
                      **{t: pa.array(labels[t].astype(np.int8)) for t in TASKS}})
    block = rng.random(n) < 0.4
    now = int(time.time() * 1000)
    bodies = encode_decisions(ids, block, np.where(block, "score", "uncertain"), rng.random(n), rng.random(n),
                              rng.random((n, 4)), threshold=0.5, target_ratio=0.4, model="m", ts_ms=now,
                              latency_ms=1.0)
    truth_dir = tmp_path / "truth"
    group = f"rta-outcomes.{settings.topic('requests')}"
    chunks = TruthChunks(truth_dir, seed=0, rows=10**9)
    chunks.add(truth.slice(0, 200))
    chunks.flush()  # the second half of the truth arrives after the decisions: they wait for it
    p = make_producer(settings)
    for v, k in zip(bodies, ids, strict=True):
        produce_waiting(p, settings.topic("decisions"), v, k)
    assert p.flush(30) == 0
    proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "world", "outcomes", "--truth", str(truth_dir),
                             "--time-scale", "1000", "--group", group], env=worker_env(settings), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        chunks.add(truth.slice(200))
        chunks.close()
        passed = ~block
        expected = {(ids[i], t) for t in TASKS for i in np.flatnonzero(labels[t] & passed).tolist()}
        got = [decode_outcome(m.value()) for m in read_topic(settings, "outcomes", len(expected), timeout=90,
                                                             quiet=1.0)]
        wait_for(lambda: sum(max(o, 0) for o in committed_offsets(settings, group, "decisions").values())
                 == n, 30, "decisions committed")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    pairs = [(o["request_id"], o["event"]) for o in got]
    assert len(pairs) == len(set(pairs)) and set(pairs) == expected
    ts = {pair: o["ts_ms"] for pair, o in zip(pairs, got, strict=True)}
    assert all(ts[(r, "online")] > ts[(r, "click")] for r, e in expected if e == "online")
    assert all(ts[(r, "click")] >= now for r, e in expected if e == "click")
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["passed"] == int(passed.sum()) and summary["blocked"] == int(block.sum())
    assert summary["no_truth"] == 0 and summary["truth_files"] == 2
    assert sum(summary["published"].values()) == len(expected)
