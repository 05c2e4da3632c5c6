"""distill_and_export end to end on a small world with a known 'teacher' (no teacher training)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from student_data import TASKS, random_batch

from model import bundle
from model.preprocess import Preprocessor
from stream.scorer import Scorer
from training.fidelity import deals_kept, residual_auc
from training.metrics import auc_roc, top_overlap


def _world(n: int, seed: int):
    spec, num, cat = random_batch(n, seed=seed, unseen=0.0)
    z = np.nan_to_num(np.clip(num, -20, 20))
    logit = np.stack([0.6 * z[:, 1], 0.4 * z[:, 1] - 1.5, 0.3 * z[:, 3] - 3, 0.3 * z[:, 1] + 0.2 * z[:, 3] - 4], 1)
    logit += (cat[:, :1] == "v1") * 1.0
    prob = 1 / (1 + np.exp(-logit))
    rng = np.random.default_rng(seed + 100)
    labels = (rng.random(prob.shape) < prob).astype(np.float32)
    # a teacher whose variance grows with |feature 3| and is largest near p = 0.5 (like prob_var)
    var = (prob * (1 - prob)) ** 2 * (0.05 + 0.2 * np.abs(np.tanh(z[:, [3]] / 3)))
    pred = SimpleNamespace(mean=prob.astype(np.float32), var=var.astype(np.float32),
                           logit_var=var.astype(np.float32), relative=var.astype(np.float32))
    logs = SimpleNamespace(spec=spec, num=num, cat=cat, labels=labels, tasks=TASKS)
    return logs, pred


@pytest.mark.slow
def test_distill_writes_a_verified_published_bundle(tmp_path):
    train, tp_train = _world(12_000, 0)
    valid, tp_valid = _world(4_000, 1)
    pre = Preprocessor.fit(train.spec, train.num, train.cat)
    cfg = SimpleNamespace(student={"hidden": [64, 32], "epochs": 6, "batch_size": 512, "lr": 3e-3})
    metrics = distill_and_export_ok(tmp_path / "v1", pre, tp_train, train, tp_valid, valid, cfg)
    assert metrics["onnx_vs_torch_max_abs"]["p"] <= 1e-5 and metrics["onnx_vs_torch_max_abs"]["u"] <= 1e-5
    fid = metrics["fidelity"]["tasks"]
    assert fid["click"]["uncertainty"]["spearman"] > 0.8  # learned, not noise
    assert fid["click"]["auc_student"] > 0.6
    assert set(metrics["fidelity"]["tail_winner"]["click"]["top10_overlap"]) == {"log", "mean_match", "quantile"}
    assert bundle.current_version(tmp_path) == "v1"
    scorer = Scorer.load(tmp_path)
    m = scorer.manifest
    assert {"theta", "tau_u", "r", "p_u", "epsilon"} <= set(m["thresholds"])
    for name in ("fidelity/fidelity.json", "fidelity/fidelity_hist.png", "fidelity/fidelity_residual_auc.png",
                 "fidelity/fidelity_deals_kept.png", "student_train_log.json", "student.onnx"):
        assert name in m["files"], name
    assert json.loads((tmp_path / "v1" / "fidelity" / "fidelity.json").read_text())["rows"] == 4_000
    p, u = scorer.score(valid.num[:100], valid.cat[:100])
    assert p.shape == u.shape == (100, 4)


def distill_and_export_ok(*args):
    from training.distill import distill_and_export

    return distill_and_export(*args, progress=False)


def test_fidelity_primitives():
    y = np.array([0, 0, 1, 1], np.float32)
    assert auc_roc(y, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc_roc(y, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert auc_roc(y, np.ones(4)) == 0.5
    assert np.isnan(auc_roc(np.zeros(4), np.arange(4.0)))
    a = np.arange(100.0)
    assert top_overlap(a, a, 0.1) == 1.0 and top_overlap(a, -a, 0.1) == 0.0
    # passing the two rows the model gets wrong raises residual AUC to 1
    y = np.array([0, 0, 0, 1, 1, 1], np.float32)
    s = np.array([0.1, 0.2, 0.9, 0.8, 0.7, 0.05])
    u = np.array([0, 0, 1, 0, 0, 1.0])
    assert residual_auc(y, s, u, 0.0) < 1.0 and residual_auc(y, s, u, 2 / 6) == 1.0
    # pass budget 50% of 6 = 3 rows: the best scores, or the uncertain positive + the 2 best
    s = np.array([0.1, 0.2, 0.6, 0.8, 0.7, 0.05])
    u = np.array([0, 0, 0, 0, 0, 1.0])
    assert deals_kept(y, s, u, 0.0) == pytest.approx(2 / 3)
    assert deals_kept(y, s, u, 1 / 6) == pytest.approx(1.0)
    assert deals_kept(y, s, u, 1 / 6, block_share=5 / 6) == pytest.approx(1 / 3)
