"""Ranking and calibration metrics in numpy/scipy (no scikit-learn here).

auc_roc is the Mann-Whitney statistic with average ranks for ties; average_precision is the
step-wise sum over distinct score thresholds of (recall increase) x precision, the same
definition as scikit-learn's `average_precision_score`.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata, spearmanr


def auc_roc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    y = np.asarray(y).astype(bool).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, dtype=np.float64).ravel())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """AUC-PR as average precision; NaN without positives."""
    y = np.asarray(y, dtype=np.float64).ravel()
    if y.sum() == 0:
        return float("nan")
    s = np.asarray(score, dtype=np.float64).ravel()
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    fp = np.cumsum(1.0 - y)
    last_of_tie = np.r_[np.diff(s) != 0, True]
    tp, fp = tp[last_of_tie], fp[last_of_tie]
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (NaN if either side is constant)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def top_overlap(u: np.ndarray, err: np.ndarray, share: float = 0.1) -> float:
    """|top share by u  and  top share by err| / size: 1 = the same requests, `share` = chance."""
    n = len(u)
    k = max(1, int(round(n * share)))
    top_u = np.argpartition(-np.asarray(u, np.float64), k - 1)[:k]
    top_e = np.argpartition(-np.asarray(err, np.float64), k - 1)[:k]
    return float(np.intersect1d(top_u, top_e, assume_unique=True).size / k)


def calibration(p: np.ndarray, truth: np.ndarray | None, y: np.ndarray, bins: int = 10) -> dict:
    """Reliability by equal-count bins of p: mean p, mean true probability, label rate per bin.

    ece_truth = sum_b w_b |mean p_b - mean truth_b| (against the world's true probabilities);
    brier_truth = mean (p - truth)^2; ece_label the same against the observed labels.
    """
    p = np.asarray(p, np.float64)
    y = np.asarray(y, np.float64)
    order = np.argsort(p, kind="mergesort")
    groups = np.array_split(order, bins)
    out: dict = {"bins": []}
    ece_t = ece_y = 0.0
    for g in groups:
        if g.size == 0:
            continue
        row = {"n": int(g.size), "p": float(p[g].mean()), "label": float(y[g].mean())}
        ece_y += g.size * abs(row["p"] - row["label"])
        if truth is not None:
            row["truth"] = float(np.asarray(truth, np.float64)[g].mean())
            ece_t += g.size * abs(row["p"] - row["truth"])
        out["bins"].append(row)
    out["ece_label"] = ece_y / p.size
    if truth is not None:
        t = np.asarray(truth, np.float64)
        out["ece_truth"] = ece_t / p.size
        out["brier_truth"] = float(np.mean((p - t) ** 2))
        out["auc_truth_ceiling"] = auc_roc(y, t)  # what the true probabilities themselves score
    return out


def residual_mask(u: np.ndarray, share: float) -> np.ndarray:
    """True for the requests kept after passing the `share` most uncertain (exact count)."""
    n = len(u)
    k = int(round(n * share))
    keep = np.ones(n, dtype=bool)
    if k > 0:
        keep[np.argsort(-np.asarray(u, np.float64), kind="mergesort")[:k]] = False
    return keep
