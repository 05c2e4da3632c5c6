"""Input novelty, its in-graph copy, the ambiguity + novelty combination, the automatic choice of
measure and source, the LightGBM baseline, and `rta train` + `rta eval` on a shifted world."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
from student_data import TASKS, fitted, make_student, random_batch

from model.export import build_onnx
from model.novelty import Novelty
from model.uncertainty import TeacherPrediction
from stream.policy import combine_uncertainty


def _novelty(n: int = 5000):
    pre, num, cat = fitted(n)
    return pre, Novelty.fit(pre, num, cat), num, cat


def test_novelty_rises_on_unseen_categories_and_other_scales_not_on_missing() -> None:
    pre, nov, num, cat = _novelty()
    base = nov.score(pre, num, cat)
    assert base.dtype == np.float32 and np.mean(base == 0) > 0.95  # training rows: almost no events
    scaled = num.copy()
    scaled[:, 1] = scaled[:, 1] * 1000  # another unit on one column
    unseen = cat.copy()
    unseen[:, 0] = "never-seen-before"
    missing = num.copy()
    missing[:, 1] = np.nan
    moved = np.isfinite(num[:, 1]) & (np.abs(num[:, 1]) > 0.5)  # values x 1000 that leave the range
    assert np.mean(nov.score(pre, scaled, cat)[moved] > base[moved]) > 0.95
    present = cat[:, 0] != ""
    assert np.all(nov.score(pre, num, unseen)[present] > base[present])
    assert np.all(nov.score(pre, missing, cat) <= base)  # a missing value is no event
    # an event the training rows never had weighs log(n_fit); shares are plain fractions
    assert nov.w_cat[0] == pytest.approx(np.log(len(num)), rel=1e-5)
    shares = nov.shares(pre, scaled, unseen)
    assert np.all((shares["unseen_category_share"] >= 0) & (shares["unseen_category_share"] <= 1))
    assert np.mean(shares["out_of_range_share"][moved] > 0) > 0.95
    again = Novelty.from_dict(json.loads(json.dumps(nov.to_dict())))
    np.testing.assert_array_equal(again.score(pre, scaled, unseen), nov.score(pre, scaled, unseen))


def test_combination_puts_novel_rows_first_and_leaves_the_rest() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((1000, 2)).astype(np.float32) * 0.1
    n = np.zeros(1000, np.float32)
    n[:10] = [5, 6, 7, 8, 9, 50, 60, 70, 80, 90]
    u = combine_uncertainty(a, n, gate=20.0, ceiling=a.max(axis=0))
    np.testing.assert_array_equal(u[:5], a[:5])  # below the gate: ambiguity alone
    np.testing.assert_array_equal(u[10:], a[10:])
    assert np.all(u[5:10].min(axis=0) > a.max(axis=0))  # past it: above every known row
    assert np.all(np.diff(u[5:10] - a[5:10], axis=0) > 0)  # more novel, higher


def test_onnx_novelty_and_served_u_match_numpy() -> None:
    pre, nov, _, _ = _novelty()
    student = make_student(pre, "log")
    _, num, cat = random_batch(4000, seed=2, unseen=0.05)
    num[:200, 0] *= 1e4
    x, idx = pre.transform(num, cat)
    _, t_u = student.predict(x, idx)
    ref_n = nov.score(pre, num, cat)
    gate = 7.0  # below one numeric event (about log(5000 / 3)): every row with an event passes
    combine = {"gate": gate, "ceiling": t_u.max(axis=0).tolist()}
    sess = ort.InferenceSession(build_onnx(pre, student, nov, combine).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    u, ua, n = sess.run(["u", "u_ambiguity", "novelty"], {"num": num, "cat": cat})
    assert n.shape == (4000, 1) and (ref_n > gate).sum() > 100
    np.testing.assert_allclose(n[:, 0], ref_n, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ua, t_u, rtol=1e-4, atol=1e-6)
    ref = combine_uncertainty(t_u, ref_n, gate, np.asarray(combine["ceiling"]))
    np.testing.assert_allclose(u, ref, rtol=1e-4, atol=1e-6)
    # the plain graph is unchanged: its u is the ambiguity head
    plain = ort.InferenceSession(build_onnx(pre, student).SerializeToString(), providers=["CPUExecutionProvider"])
    assert [o.name for o in plain.get_outputs()] == ["p", "u"]
    np.testing.assert_allclose(plain.run(["u"], {"num": num, "cat": cat})[0], ua, rtol=1e-6)


def _pred(n: int, rng: np.random.Generator, y: np.ndarray) -> TeacherPrediction:
    mean = np.clip(rng.random((n, 4)) * 0.05 + 0.01, 0, 1).astype(np.float32)
    noise = rng.random((n, 4)).astype(np.float32)
    return TeacherPrediction(mean=mean, var=noise, logit_var=noise.copy(), relative=noise.copy())


def test_selection_keeps_the_default_unless_clearly_better() -> None:
    from training.ood import select_uncertainty

    rng = np.random.default_rng(1)
    n = 20_000
    y = (rng.random((n, 4)) < [0.5, 0.3, 0.05, 0.05]).astype(np.float32)
    pred = _pred(n, rng, y)
    default = {"click": "click", "online": "online", "cart": "click", "deal": "click"}
    measure, smap, record = select_uncertainty(pred, y, TASKS, "prob_var", default)
    assert measure == "prob_var" and smap == default  # only noise to choose between
    # logit variance of the online column marks the deals: a clearly better choice for deal
    pred.logit_var[:, 1] = y[:, 3] + 0.01 * rng.random(n)
    measure, smap, record = select_uncertainty(pred, y, TASKS, "prob_var", default)
    assert measure == "logit_var" and smap["deal"] == "online"
    assert record["chosen"] == {"measure": "logit_var", "source_map": smap}
    assert record["scores"]["deal"]["logit_var"]["online"] > 0.9


def test_lightgbm_baseline_learns_each_task(tmp_path: Path) -> None:
    from training.evaluate import train_lightgbm
    from training.logs import load_logs
    from training.metrics import auc_roc
    from training.pipeline import make_splits
    from training.profiles import get_profile
    from training.world import write

    write(tmp_path / "w", 12_000, seed=5, progress=False)
    logs = load_logs(tmp_path / "w")
    splits = make_splits(logs, get_profile("tiny"), 0)
    from model.preprocess import Preprocessor

    pre = Preprocessor.fit(splits.fit.spec, splits.fit.num, splits.fit.cat)
    out = train_lightgbm(pre, splits, splits.test, seed=0)
    assert out["p"].shape == (len(splits.test), 4) and set(out["trees"]) == set(TASKS)
    assert auc_roc(splits.test.labels[:, 0], out["p"][:, 0]) > 0.7
    assert np.all((out["p"] > 0) & (out["p"] < 1))


def _rta(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_train_on_before_eval_after_recognises_the_new_source(tmp_path: Path) -> None:
    """`rta train` on the traffic before the new source, `rta eval --baselines` after it."""
    from training.world import WorldConfig, write

    cfg = WorldConfig(span_days=14, new_source_from=0.7, drift_source_from=0.7, new_source_share=0.1)
    write(tmp_path / "before", 20_000, seed=3, config=cfg, progress=False, period="before")
    write(tmp_path / "after", 20_000, seed=3, config=cfg, progress=False, period="after")
    res = _rta("train", "--logs", str(tmp_path / "before"), "--out", str(tmp_path / "models"), "--profile", "tiny",
               "--version", "n1", "--quiet", "--no-report", "--threads", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((tmp_path / "models" / "n1" / "manifest.json").read_text())
    unc = manifest["uncertainty"]
    assert unc["selection"]["chosen"]["measure"] == unc["measure"]
    assert unc["selection"]["chosen"]["source_map"] == manifest["uncertainty_source"]
    assert unc["novelty"]["gate"] > 0 and len(unc["novelty"]["ceiling"]) == 4
    assert unc["novelty"]["valid_share_past_gate"] <= 0.01
    metrics = manifest["metrics"]["onnx_vs_torch_max_abs"]
    assert metrics["novelty"] < 1e-3 and metrics["u_served_rel"] < 1e-4

    res = _rta("eval", "--model", str(tmp_path / "models"), "--logs", str(tmp_path / "after"), "--out",
               str(tmp_path / "report"), "--baselines", "--baseline", "LightGBM (per task)", "--quiet",
               "--threads", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    shift = report["shift"]
    truth = pq.read_table(tmp_path / "after", columns=["true_source"])["true_source"].to_pylist()
    assert shift["sources"]["new"] == truth.count("new") > 300
    served = shift["ood_auroc"]["new"]["served student u (as the policy reads it)"]
    assert min(served.values()) >= 0.9, served
    assert shift["ood_auroc"]["new"]["SWAG prob_var"]["click"] < min(served.values())
    grid = shift["deals_kept"]["served student"]
    assert grid["r=0.5 p_u=0.05"]["new"] > grid["r=0.5 p_u=0"]["new"]
    assert "LightGBM (per task)" in shift["deals_kept"] and "LightGBM (per task)" in report["table1"]
    # a 2-epoch tiny student follows the teacher loosely; the shared novelty term keeps the order close
    assert shift["fidelity_served_vs_teacher"]["click"]["spearman"] > 0.2
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Traffic the model has never seen" in md and (tmp_path / "report" / "ood_auroc.png").exists()
