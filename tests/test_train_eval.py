"""Log loading errors, the metrics, and `rta train --profile tiny` + `rta eval` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stream.errors import DataError
from training.logs import load_logs, split
from training.metrics import auc_roc, average_precision, residual_mask, top_overlap

TASKS = ("click", "online", "cart", "deal")


def _table(n: int = 50, seed: int = 0, **override) -> pa.Table:
    rng = np.random.default_rng(seed)
    cols = {
        "request_id": pa.array([f"r{seed}-{i}" for i in range(n)]),
        "ts_ms": pa.array(np.arange(n, dtype=np.int64)),
        "age": pa.array(rng.normal(30, 5, n).astype(np.float32)),
        "city": pa.array(rng.choice(["a", "b", None], n).tolist()).dictionary_encode(),
        **{t: pa.array((rng.random(n) < 0.3).astype(np.int8)) for t in TASKS},
    }
    cols.update(override)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def _rta(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "RTA_TORCH_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _one_line_error(res: subprocess.CompletedProcess, needle: str) -> None:
    # the error is one line of its own (progress lines such as "[rta eval] labels ..." may precede it)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    err = lines[-1]
    assert err.startswith("rta: ") and needle in err, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and all(line.startswith("[rta ") for line in lines[:-1]), res.stderr[-2000:]


# ---- loading ------------------------------------------------------------------------------
def test_load_reads_kinds_missing_values_and_labels(tmp_path: Path):
    pq.write_table(_table(seed=1), tmp_path / "part-0.parquet")
    pq.write_table(_table(seed=2), tmp_path / "part-1.parquet")
    logs = load_logs(tmp_path)
    assert logs.spec.numeric == ("age",) and logs.spec.categorical == ("city",)
    assert len(logs) == 100 and logs.labels.shape == (100, 4) and logs.truth is None
    assert set(logs.cat[:, 0]) <= {"a", "b", ""} and "" in set(logs.cat[:, 0])
    train, test = split(logs, 0.2, seed=3)
    assert len(train) == 80 and len(test) == 20
    assert not set(train.request_id) & set(test.request_id)


def test_no_label_columns_names_the_file(tmp_path: Path):
    pq.write_table(_table(**{t: None for t in TASKS}), tmp_path / "part-0.parquet")
    with pytest.raises(DataError, match=r"part-0.parquet: no label columns \(expected click"):
        load_logs(tmp_path)


def test_one_missing_label_column_is_named(tmp_path: Path):
    pq.write_table(_table(deal=None), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="label column 'deal' is missing"):
        load_logs(tmp_path / "x.parquet")


def test_empty_file_and_file_without_rows(tmp_path: Path):
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.parquet: empty file"):
        load_logs(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(_table().slice(0, 0), other / "zero.parquet")
    with pytest.raises(DataError, match=r"zero.parquet: no rows"):
        load_logs(other)


def test_schema_mismatch_names_column_and_file(tmp_path: Path):
    pq.write_table(_table(seed=1), tmp_path / "part-0.parquet")
    pq.write_table(_table(seed=2, age=pa.array(["old"] * 50)), tmp_path / "part-1.parquet")
    with pytest.raises(DataError, match=r"schema mismatch: column 'age' is categorical in .*part-1.parquet"):
        load_logs(tmp_path)
    (tmp_path / "part-1.parquet").unlink()
    pq.write_table(_table(seed=2, city=None), tmp_path / "part-1.parquet")
    with pytest.raises(DataError, match=r"part-1.parquet lacks column 'city'"):
        load_logs(tmp_path)


def test_bad_labels_and_jsonl(tmp_path: Path):
    pq.write_table(_table(click=pa.array([2] * 50, pa.int8())), tmp_path / "a.parquet")
    with pytest.raises(DataError, match="label column 'click' has values other than 0/1"):
        load_logs(tmp_path / "a.parquet")
    rows = [{"request_id": f"j{i}", "ts_ms": i, "age": None if i % 3 else 1.5, "city": "x",
             **{t: i % 2 for t in TASKS}} for i in range(10)]
    (tmp_path / "logs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    logs = load_logs(tmp_path / "logs.jsonl")
    assert logs.spec.numeric == ("age",) and np.isnan(logs.num[1, 0]) and logs.num[0, 0] == 1.5


def test_cli_reports_bad_logs_in_one_line(tmp_path: Path):
    pq.write_table(_table(**{t: None for t in TASKS}), tmp_path / "part-0.parquet")
    res = _rta("train", "--logs", str(tmp_path), "--out", str(tmp_path / "m"), "--profile", "tiny")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no label columns" in lines[0] and "part-0.parquet" in lines[0]


# ---- metrics ------------------------------------------------------------------------------
def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = rng.integers(0, 10, 300).astype(float)  # many ties
    pos, neg = s[y], s[~y]
    pairs = [(p > q) + 0.5 * (p == q) for p, q in product(pos, neg)]
    assert auc_roc(y, s) == pytest.approx(np.mean(pairs))
    assert np.isnan(auc_roc(np.zeros(5), np.arange(5)))


def test_average_precision_by_hand():
    # ranking: 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg): AP = 1/2 * 1 + 1/2 * 2/3
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.5 + 1 / 3)
    # a tie between a positive and a negative counts as one threshold: precision 1/2 there
    assert average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)


def test_residual_mask_and_overlap():
    u = np.array([0.1, 0.9, 0.5, 0.7, 0.2])
    assert residual_mask(u, 0.4).tolist() == [True, False, True, False, True]
    assert top_overlap(u, u, 0.4) == 1.0 and top_overlap(u, -u, 0.4) == 0.0


def test_fig2_downstream_deals_by_hand():
    """Fig. 2's definition on ten rows, worked out by hand (training/evaluate.py docstring)."""
    from training.evaluate import downstream_deals

    y = np.array([1, 0, 0, 0, 1, 0, 1, 1, 0, 1])  # 5 deals: rows 0, 4, 6, 7, 9
    p = np.array([0.01, 0.9, 0.5, 0.05, 0.7, 0.2, 0.03, 0.8, 0.6, 0.02])
    u = np.array([0.9, 0.1, 0.8, 0.2, 0.3, 0.4, 0.5, 0.05, 0.6, 0.15])
    # share 0.2: rows 0 and 2 (the most uncertain) pass directly, one deal; of the REST the 3
    # lowest p are blocked (rows 9, 6, 3: two deals; row 0, the lowest p of all, passed); rows 4
    # and 7 keep theirs
    assert downstream_deals(y, p, u, 0.2, 0.3) == {"direct": 1, "kept": 2, "total": 3, "blocked_deals": 2}
    # share 0: nothing passes; the 3 lowest p overall are rows 0, 9, 6 (three deals lost)
    assert downstream_deals(y, p, u, 0.0, 0.3) == {"direct": 0, "kept": 2, "total": 2, "blocked_deals": 3}
    # block share 0.2: share 0.1 passes row 0 and blocks rows 9 and 6; share 0 blocks rows 0 and 9
    assert downstream_deals(y, p, u, 0.1, 0.2) == {"direct": 1, "kept": 2, "total": 3, "blocked_deals": 2}
    assert downstream_deals(y, p, u, 0.0, 0.2) == {"direct": 0, "kept": 3, "total": 3, "blocked_deals": 2}


# ---- end to end ---------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_train_then_eval_end_to_end(tmp_path: Path):
    from training.world import write

    write(tmp_path / "world", rows=8000, seed=3, progress=False)
    res = _rta("train", "--logs", str(tmp_path / "world"), "--out", str(tmp_path / "models"),
               "--profile", "tiny", "--version", "t1", "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    bundle = tmp_path / "models" / "t1"
    for name in ("teacher.pt", "preprocess.json", "train_log.json", "loss.png", "loss.json",
                 "report/report.json", "report/report.md", "report/table2.png", "report/fig2.png"):
        assert (bundle / name).exists(), name
    history = json.loads((bundle / "train_log.json").read_text())["history"]
    assert len(history["epochs"]) == 3 and history["swag_from_epoch"] == 1

    res = _rta("eval", "--model", str(tmp_path / "models"), "--logs", str(tmp_path / "world"),
               "--out", str(tmp_path / "report"), "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["rows"] == 1600 and report["scope"].startswith("held-out test split")
    daum = report["table1"]["DAUM (SWAG, M-sample mean)"]
    assert 0.6 < daum["click"]["auc_roc"] < 1.0  # learned something on a balanced task
    t2 = report["table2"]["prob_var"]
    assert [r["share"] for r in t2["click_by_click"]] == [0.0, 0.05, 0.1, 0.15, 0.2]
    assert t2["click_by_click"][2]["n"] == 1440
    f2 = report["fig2"]
    # deals are accounted for at every point of every curve: kept (direct passes included) plus
    # blocked is all deals of the split, and the block share holds, so nothing is counted twice
    for curve in [f2["random"], *(f2[m][t] for m in ("prob_var", "logit_var") for t in ("click", "deal"))]:
        assert all(k + b == f2["deals"] for k, b in zip(curve["total"], curve["blocked_deals"], strict=True))
        assert all(0 <= d <= k for d, k in zip(curve["direct"], curve["total"], strict=True))
        # passing share 0 passes nothing, and a larger share passes a superset of requests
        assert curve["direct"][0] == 0 and curve["direct"] == sorted(curve["direct"]), curve["direct"]
    # at share 0 no u plays a part: every curve blocks the same requests
    assert len({c["blocked_deals"][0] for c in [f2["random"], *(f2[m][t] for m in ("prob_var", "logit_var")
                                                                for t in ("click", "deal"))]}) == 1
    assert "calibration" in report["truth"] and "uncertainty_vs_error" in report["truth"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Table I analog" in md and "Table II analog" in md and "Fig. 2 analog" in md
    # the served student against the teacher on the same rows
    student = report["student"]
    assert set(student["tasks"]) == {"click", "online", "cart", "deal"}
    # the student's click u follows the teacher's (tiny profile: ~0.43 measured; a u head that
    # learned nothing scores ~0, a NaN fails too)
    assert student["tasks"]["click"]["uncertainty"]["spearman"] > 0.15
    assert abs(student["tasks"]["click"]["auc_gap"]) < 0.2  # a distilled student, not noise
    assert "Student (ONNX, as served) vs teacher" in md
    for plot in student["plots"]:
        assert (tmp_path / "report" / plot).exists(), plot

    # the inference benchmark times this bundle's own student.onnx against its teacher
    from test_bench_inference import check_result

    res = _rta("bench", "inference", "--model", str(tmp_path / "models"), "--batches", "8",
               "--repeats", "2", "--samples", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    timed = json.loads(res.stdout)
    assert timed["mode"] == "bundle" and timed["bundle"] == str(bundle)
    check_result(timed, [8])
    # bad input to the same verbs: one line each, naming the problem, nothing overwritten
    res = _rta("train", "--logs", str(tmp_path / "world"), "--out", str(tmp_path / "models"),
               "--profile", "tiny", "--version", "t1", "--quiet")
    _one_line_error(res, "t1")
    assert (bundle / "teacher.pt").exists()
    from training.world import WorldConfig

    write(tmp_path / "narrow", rows=500, seed=4, config=WorldConfig(features=40), progress=False)
    res = _rta("eval", "--model", str(tmp_path / "models"), "--logs", str(tmp_path / "narrow"),
               "--out", str(tmp_path / "r2"), "--quiet")
    _one_line_error(res, "feature")
    res = _rta("eval", "--model", str(tmp_path / "nope"), "--logs", str(tmp_path / "world"),
               "--out", str(tmp_path / "r3"), "--quiet")
    _one_line_error(res, "nope")

    import shutil

    shutil.copytree(bundle, tmp_path / "teacher-only")
    (tmp_path / "teacher-only" / "student.onnx").unlink()
    res = _rta("bench", "inference", "--model", str(tmp_path / "teacher-only"), "--batches", "8")
    assert res.returncode != 0 and "has no student" in res.stderr and "Traceback" not in res.stderr

    # the teacher part loads back and predicts the same DAUM numbers
    from training.logs import load_logs
    from training.pipeline import load_teacher, make_splits, teacher_predict

    model, swag, pre, cfg = load_teacher(bundle)
    logs = load_logs(tmp_path / "world")
    test = make_splits(logs, cfg["profile"], cfg["meta"]["seed"]).test
    pred = teacher_predict(model, swag, pre, test, cfg["profile"], seed=cfg["meta"]["seed"])
    from training.metrics import auc_roc as auc

    assert auc(test.labels[:, 0], pred.mean[:, 0]) == pytest.approx(daum["click"]["auc_roc"], abs=1e-6)
