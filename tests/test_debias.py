"""Training on the filter's own logs: IPS weights, explore-only labels, the weighted loss, and
`rta train --parent/--anchor/--debias` end to end on an offline log (lineage, warm start,
candidate vs published)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from stream.errors import DataError
from stream.features import FeatureSpec
from training.debias import apply_debias, pass_probability
from training.logs import LogSet
from training.pipeline import task_loss


def _logset() -> LogSet:
    """Six logged rows at epsilon 0.05: two rule passes, an explore row the rule would have
    blocked, an explore row it would have passed, an uncertain pass and a blocked row."""
    reason = ["score", "score", "explore", "explore", "uncertain", "score"]
    decision = ["pass", "pass", "pass", "pass", "pass", "block"]
    prop = [0.95, 0.95, 0.05, 0.05, 0.95, 0.95]
    score = [0.9, 0.8, 0.1, 0.7, 0.2, 0.1]
    theta = [0.5] * 6
    u = [0.0, 0.0, 0.0, 0.0, 0.9, 0.0]
    tau = [0.5] * 6
    d = pa.table({"decision": decision, "reason": reason, "propensity": prop, "score": score,
                  "threshold": theta, "uncertainty": u, "tau_u": tau})
    labels = np.array([[1], [0], [1], [0], [1], [np.nan]], np.float32)
    n = len(reason)
    return LogSet(spec=FeatureSpec(("x",), ()), num=np.arange(n, dtype=np.float32)[:, None],
                  cat=np.zeros((n, 0), object), labels=labels, truth=None,
                  request_id=np.array([f"r{i}" for i in range(n)], object), ts_ms=np.arange(n, dtype=np.int64),
                  tasks=("deal",), decisions=d)


def test_pass_probability_is_epsilon_only_where_the_rule_would_have_blocked():
    p = pass_probability(_logset())
    assert p.tolist() == pytest.approx([1.0, 1.0, 0.05, 1.0, 1.0, 0.05])


def test_ips_weights_are_clipped_and_normalised_over_the_labelled_rows():
    logs, info = apply_debias(_logset(), "ips", clip=10.0)
    w = logs.weights
    # raw 1, 1, 20 (clipped to 10), 1, 1 over five labelled rows; the blocked row weighs nothing
    assert w[5] == 0.0 and info["clipped_rows"] == 1 and info["upweighted_rows"] == 1
    assert w[:5].mean() == pytest.approx(1.0)
    assert w[2] / w[0] == pytest.approx(10.0)
    # taking rows keeps the weights aligned
    assert logs.take(np.array([2, 0])).weights.tolist() == pytest.approx([w[2], w[0]])


def test_explore_only_keeps_the_explore_labels_and_none_changes_nothing():
    logs, info = apply_debias(_logset(), "explore-only")
    assert np.isnan(logs.labels[[0, 1, 4, 5], 0]).all() and logs.labels[[2, 3], 0].tolist() == [1.0, 0.0]
    assert info["labelled_rows"] == 2
    same, info = apply_debias(_logset(), "none")
    assert same.weights is None and np.array_equal(same.labels, _logset().labels, equal_nan=True)
    with pytest.raises(DataError, match="expected one of"):
        apply_debias(_logset(), "magic")


def test_weighted_loss_is_self_normalised_and_skips_unobserved_labels():
    logits = torch.tensor([[0.3], [-1.0], [2.0], [0.0]])
    y = torch.tensor([[1.0], [0.0], [float("nan")], [1.0]])
    w = torch.tensor([1.0, 3.0, 5.0, 2.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y), reduction="none")[:, 0]
    want = (bce[0] * 1 + bce[1] * 3 + bce[3] * 2) / 6
    assert task_loss(logits, y, w).item() == pytest.approx(want.item(), rel=1e-6)
    assert task_loss(logits, y, 7 * w).item() == pytest.approx(want.item(), rel=1e-6)  # scale-free
    assert task_loss(logits, y, torch.ones(4)).item() == pytest.approx(task_loss(logits, y).item(), rel=1e-6)


def test_a_time_window_outside_the_log_is_one_line():
    with pytest.raises(DataError, match="no rows with"):
        _logset().between(100, 200)
    assert len(_logset().between(2, 5)) == 3


def _rta(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RTA_TORCH_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


@pytest.mark.slow
def test_retraining_on_an_offline_log_warm_starts_records_lineage_and_stays_a_candidate(tmp_path: Path):
    from training.offline_log import make_logged_layout
    from training.replay import Step
    from training.world import WorldConfig, write

    cfg = WorldConfig(span_days=20_000 / 1000 / 86_400)  # 1000 rows per event-second
    write(tmp_path / "world", rows=20_000, seed=3, config=cfg, progress=False)
    res = _rta("train", "--logs", "world", "--out", "models", "--profile", "tiny", "--version", "v1",
               "--quiet", "--no-report", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "models" / "current").resolve().name == "v1"  # the first version bootstraps
    info = make_logged_layout(tmp_path / "models" / "v1", tmp_path / "world", tmp_path / "log",
                              Step(0.5, 0.02, 0.05), seed=1)
    as_of = info["newest_event_ms"] + 86_400_000
    since = 1735660800000 + 2_000  # drop the first 2 event-seconds
    res = _rta("train", "--logs", "log", "--out", "models", "--profile", "tiny", "--version", "v2",
               "--parent", "v1", "--anchor", "v1", "--debias", "ips", "--since-ms", str(since),
               "--attribution", "click=10m,online=10m,cart=10m,deal=30m", "--as-of-ms", str(as_of),
               "--quiet", "--no-report", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "warm start" in res.stderr and "promote with: rta model promote v2" in res.stderr
    assert (tmp_path / "models" / "current").resolve().name == "v1"  # a candidate, not published
    manifest = json.loads((tmp_path / "models" / "v2" / "manifest.json").read_text())
    lin = manifest["lineage"]
    assert lin["parent"] == "v1" and lin["anchor"] == "v1" and lin["debias"] == "ips"
    assert lin["profile"] == "tiny" and lin["warm_start"] is True and lin["logs"] == "log"
    assert lin["data_from_ms"] >= since and lin["data_to_ms"] > lin["data_from_ms"]
    assert lin["trained_at"].endswith("Z") and len(lin["logs_fingerprint"]) == 16
    student = manifest["metrics"]["student"]
    assert student["epochs_run"] == 1  # the tiny profile's warm_student_epochs
    from model.bundle import verify_files

    verify_files(tmp_path / "models" / "v2", manifest)  # the lineage update kept every hash valid
    # --anchor pulls the student toward the anchor's p: the same run without it ends farther
    # from v1 (both warm-start from v1 with the same seed; only the anchor term differs)
    res = _rta("train", "--logs", "log", "--out", "models", "--profile", "tiny", "--version", "v2n",
               "--parent", "v1", "--debias", "ips", "--since-ms", str(since),
               "--attribution", "click=10m,online=10m,cart=10m,deal=30m", "--as-of-ms", str(as_of),
               "--quiet", "--no-report", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    from stream.scorer import Scorer
    from training.logs import load_logs

    rows = load_logs(tmp_path / "world")
    p = {v: Scorer.load(tmp_path / "models" / v).run(["p"], rows.num, rows.cat)[0] for v in ("v1", "v2", "v2n")}
    gap = {v: float(np.mean(np.abs(p[v] - p["v1"]))) for v in ("v2", "v2n")}
    assert gap["v2"] < 0.8 * gap["v2n"], gap
    assert json.loads((tmp_path / "models" / "v2n" / "manifest.json").read_text())["lineage"]["anchor"] is None
    res = _rta("train", "--logs", "log", "--out", "models", "--profile", "tiny", "--version", "v3",
               "--debias", "explore-only", "--publish", "--as-of-ms", str(as_of),
               "--attribution", "click=10m,online=10m,cart=10m,deal=30m", "--quiet", "--no-report", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "models" / "current").resolve().name == "v3"  # --publish forces it
    lin3 = json.loads((tmp_path / "models" / "v3" / "manifest.json").read_text())["lineage"]
    assert lin3["parent"] is None and lin3["debias"] == "explore-only"
    res = _rta("train", "--logs", "log", "--out", "models", "--profile", "tiny", "--version", "v4",
               "--parent", "nope", "--quiet", cwd=tmp_path)
    assert res.returncode == 2 and "nope" in res.stderr.strip().splitlines()[-1], res.stderr[-1000:]
    assert "Traceback" not in res.stderr
