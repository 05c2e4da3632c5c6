"""The gate's paired off-policy estimate on a simulated log whose truth is known (no training).

One task, 200k rows, true deal probability p per row. The logging policy is the rule of
`stream.policy` (pass when score >= threshold) plus a 5% explore slice; labels are seen only where
it passed. Candidate and current are two other filters, so the logging model is neither of them
(a rollback, a shadow). The truth of the difference is sum((k_c - k_u) * p).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from stream.features import FeatureSpec
from training.gate import (
    GateConfig,
    decide,
    logging_pass_probability,
    paired_value,
    task_contributions,
)
from training.logs import LogSet
from training.replay import Scored

N, EPS = 200_000, 0.05


def simulated(seed: int, reward_noise: float = 0.5, offset: float = -4.0) -> tuple[Scored, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=N)
    p = 1 / (1 + np.exp(-(z * 1.5 + offset)))  # ~3% positives (offset -4), concentrated in high z
    y = (rng.random(N) < p).astype(np.float32)
    score = 1 / (1 + np.exp(-(z + rng.normal(0, 1.0, N))))  # the logging model's score
    theta = np.quantile(score, 0.5)
    explore = rng.random(N) < EPS
    rule_pass = score >= theta
    passed = explore | rule_pass
    reason = np.where(explore, "explore", "score")
    prop = np.where(explore, EPS, 1 - EPS)
    q = np.clip(p * np.exp(rng.normal(0, reward_noise, N)), 0, 1)  # an imperfect reward model
    dec = pa.table({"decision": np.where(passed, "pass", "block"), "reason": reason, "propensity": prop,
                    "score": score, "uncertainty": np.zeros(N), "threshold": np.full(N, theta),
                    "tau_u": np.full(N, np.inf), "p_deal": q})
    ts = np.arange(N, dtype=np.int64)
    logs = LogSet(spec=FeatureSpec((), ()), num=np.zeros((N, 0), np.float32), cat=np.zeros((N, 0), object),
                  labels=np.where(passed, y, np.nan).astype(np.float32)[:, None], truth=None,
                  request_id=ts.astype(str).astype(object), ts_ms=ts, tasks=("deal",), decisions=dec,
                  info={"as_of_ms": N + 1, "attribution_windows_s": {"deal": 0.0}})
    sc = Scored(logs=logs, order=np.arange(N), ts_ms=ts, p=p[:, None].astype(np.float32),
                u_tasks=np.zeros((N, 1), np.float32), e=score.astype(np.float32), u=np.zeros(N, np.float32),
                valid=np.ones(N, bool), tasks=["deal"], model="sim", score_s=0.0)
    return sc, p


def test_logged_pass_probability_comes_from_the_logged_fields():
    sc, _ = simulated(0)
    passed, p_pass = logging_pass_probability(sc)
    d = sc.logs.decisions
    rule = np.asarray(d.column("score")) >= np.asarray(d.column("threshold"))
    assert np.all(p_pass[rule] == 1.0)  # the rule passes: explored or not, it passes
    assert np.allclose(p_pass[~rule], EPS)  # the rule blocks: only the explore slice passes
    explore = np.asarray(d.column("reason")) == "explore"
    assert passed[explore].all() and (~passed[~rule & ~explore]).all()


@pytest.mark.parametrize("seed", [1, 2])
def test_the_paired_difference_is_unbiased_and_dr_is_tighter_than_ips(seed):
    sc, p = simulated(seed)
    rng = np.random.default_rng(100 + seed)
    z_hat = np.asarray(sc.e, np.float64)
    # current: a filter close to the logging one; candidate: a better one (reads p with less noise)
    pass_u = z_hat + rng.normal(0, 0.02, N) >= np.quantile(z_hat, 0.5)
    better = p + rng.normal(0, 0.005, N)
    pass_c = better >= np.quantile(better, 0.5)
    truth = float(((pass_c.astype(float) - pass_u) * p).sum())
    logged = logging_pass_probability(sc)
    c = task_contributions(sc, 0, pass_c, pass_u, logged)
    assert np.all(c.dr[pass_c == pass_u] == 0) and np.all(c.ips[pass_c == pass_u] == 0)  # agreeing rows add 0
    v = paired_value({"deal": c}, {"deal": 1.0}, boot=400, confidence=0.95, seed=seed)
    t = v["tasks"]["deal"]
    lo, hi = t["difference_ci"]
    assert lo < truth < hi, (truth, t["difference"], lo, hi)
    assert t["ips_ci"][0] < truth < t["ips_ci"][1]
    # power: the old gate read the explore slice only; rows the candidate blocks and the logging
    # policy passed are seen on every row here, so the standard error is far smaller
    explore = np.asarray(sc.logs.decisions.column("reason")) == "explore"
    y = np.nan_to_num(sc.logs.labels[:, 0])
    d_old = ((pass_c.astype(float) - pass_u) * y)[explore] / EPS
    se_old = float(np.sqrt(len(d_old)) * d_old.std())
    assert v["se"] < 0.75 * se_old, (v["se"], se_old)
    assert truth > 0 and lo > 0  # and it sees a real gain at this sample


def test_three_outcomes_and_the_traffic_that_would_resolve_one():
    def value(d: float, lo: float, hi: float, task_ci=None) -> dict:
        return {"difference": d, "difference_ci": [lo, hi], "current": 1.0, "se": (hi - lo) / 3.92,
                "tasks": {"deal": {"weight": 1.0, "current": 100.0,
                                   "difference_ci": task_ci or [lo * 100, hi * 100]}}}

    cfg = GateConfig()  # delta 1% of current's value, guard margin 5%
    assert decide(value(0.02, 0.005, 0.035), cfg, 10)["decision"] == "promote"
    assert decide(value(0.0, -0.004, 0.004), cfg, 10)["decision"] == "promote"  # equal, tight: non-inferior
    refuse = decide(value(-0.03, -0.05, -0.01), cfg, 10)
    assert refuse["decision"] == "refuse" and refuse["why"].startswith("worse beyond the interval")
    rail = decide(value(0.0, -0.004, 0.004, task_ci=[-9.0, -6.0]), cfg, 10)  # deal drops > 5% of 100
    assert rail["decision"] == "refuse" and "guard rail" in rail["why"]
    unsure = decide(value(0.0, -0.004, 0.004, task_ci=[-7.0, 1.0]), cfg, 10)
    assert unsure["decision"] == "inconclusive" and "guard rail deal" in unsure["why"]
    inc = decide(value(0.01, -0.03, 0.05), cfg, 10.0)
    assert inc["decision"] == "inconclusive"
    # half-width 0.04 must shrink to d + delta = 0.02: 4x the rows, 30 more hours of a 10 h window
    assert inc["more_traffic_factor"] == pytest.approx(4.0) and inc["more_hours"] == pytest.approx(30.0)
    assert inc["mde_relative"] == pytest.approx((1.959964 + 0.8416) * 0.08 / 3.92, rel=1e-3)
    # a skewed interval (the explore-only draws): promotion reads the lower side only, 0.03 must
    # shrink to 0.02 (2.25x the rows), not the mean half-width 0.055 (7.6x)
    skew = decide(value(0.01, -0.02, 0.09), cfg, 10.0)
    assert skew["decision"] == "inconclusive" and skew["more_traffic_factor"] == pytest.approx(2.25)
    assert skew["mde_lower_side_relative"] == pytest.approx((1.959964 + 0.8416) * 0.03 / 1.959964, rel=1e-3)


def test_fidelity_fails_only_beyond_its_interval_and_labels_gate_only_with_enough_positives():
    from training.fidelity import window_fidelity

    def world(n: int, noise: float, seed: int = 0):
        rng = np.random.default_rng(seed)
        t_u = rng.random((n, 2))
        s_u = t_u + rng.normal(0, noise, (n, 2))
        t_p = rng.random((n, 2))
        y = (rng.random((n, 2)) < 0.01).astype(np.float32)
        return t_p, t_u, t_p, s_u, y

    def spear(rep: dict) -> dict:
        return next(c for c in rep["checks"] if c["check"].startswith("spearman_click_uncertainty"))

    # the student's click-u Spearman is ~0.89 (bar 0.9): on 300 rows its interval spans the bar,
    # so it does not fail; on 30,000 rows the same model is below the bar beyond noise
    small = window_fidelity(*world(300, 0.16), ["click", "deal"], "click", boot=200)
    big = window_fidelity(*world(30_000, 0.16), ["click", "deal"], "click", boot=100)
    assert spear(small)["value"] < 0.9 and spear(small)["ci"][1] > 0.9 and not spear(small)["failed"]
    assert spear(big)["ci"][1] < 0.9 and spear(big)["failed"] and not big["passed"]
    # ~3 and ~300 positives: the AUC gap is reported only for the first, checked for the second
    assert {r["check"] for r in small["not_gating"]} == {"auc_gap_click<=0.01", "auc_gap_deal<=0.01"}
    assert any(c["check"] == "auc_gap_deal<=0.01" for c in big["checks"]) and not big["not_gating"]


def test_an_unseen_gain_keeps_the_upper_bound_open_instead_of_refusing():
    # the candidate blocks 800 rows the current passes (seen on every row: it loses their
    # positives, exactly) and passes 20,000 rows the logging policy blocks, of which the explore
    # slice holds ~1,000 rows and, here, no positive. A resample of the rows says "worse,
    # certainly"; the explored positives' Poisson confidence distribution says a gain of up to
    # ~2.5 positives per explored row's weight was possible, so the gate may not refuse.
    sc, p = simulated(3)
    logged = logging_pass_probability(sc)
    passed, p_pass = logged
    labels = sc.logs.labels.copy()
    rule_blocked = p_pass < 1
    labels[rule_blocked, 0] = np.where(np.isfinite(labels[rule_blocked, 0]), 0.0, np.nan)  # no explored positive
    sc.logs.labels = labels
    rng = np.random.default_rng(0)
    pass_u = ~rule_blocked
    pass_c = pass_u.copy()
    pass_c[rng.choice(np.flatnonzero(pass_u), 800, replace=False)] = False
    pass_c[rng.choice(np.flatnonzero(rule_blocked), 20_000, replace=False)] = True
    c = task_contributions(sc, 0, pass_c, pass_u, logged)
    (k_up, w_up, n_up), _ = c.explore_only
    assert k_up == 0 and w_up == pytest.approx(1 / EPS) and n_up > 18_000
    assert c.explore_unit[0] == pytest.approx(1 / EPS)  # one explored positive stands for 1 / eps
    v = paired_value({"deal": c}, {"deal": 1.0}, boot=400, confidence=0.95, seed=0)
    t = v["tasks"]["deal"]
    assert t["difference"] < 0 and t["difference_ci"][1] > 0  # could be better: not "worse beyond the interval"
    assert decide(v, GateConfig(), 1.0)["decision"] != "refuse"
    # the break: resampling the rows alone (no Poisson draw) refuses on this evidence
    rows_only = paired_value({"deal": c}, {"deal": 1.0}, boot=400, confidence=0.95, seed=0,
                             explore_interval="bootstrap")
    assert rows_only["tasks"]["deal"]["difference_ci"][1] < 0
    assert decide(rows_only, GateConfig(), 1.0)["decision"] == "refuse"
    from training.gate import poisson_widening

    assert poisson_widening(0, 20.0, 0.95) == pytest.approx(3.689 * 20, rel=1e-3)


def test_one_coherent_interval_covers_rare_positives_and_is_narrower_than_the_widening():
    # deal-like rarity (~260 positives in 36k rows, ~1 explored positive per side): a resample of
    # the rows alone under-covers (measured 68 % over 60 seeds); the Gamma draw covers, and is
    # narrower than session 1's bootstrap bound + Poisson widening (117 vs 204 over 60 seeds)
    global N
    n_was, N = N, 36_000
    try:
        cover, width = 0, {"gamma": [], "widening": []}
        for seed in range(12):
            sc, p = simulated(seed, offset=-6.0)
            rng = np.random.default_rng(100 + seed)
            pass_u = np.asarray(sc.e) + rng.normal(0, 0.02, N) >= np.quantile(sc.e, 0.5)
            better = p + rng.normal(0, 0.005, N)
            pass_c = better >= np.quantile(better, 0.5)
            truth = float(((pass_c.astype(float) - pass_u) * p).sum())
            c = task_contributions(sc, 0, pass_c, pass_u, logging_pass_probability(sc))
            for mode in width:
                lo, hi = paired_value({"deal": c}, {"deal": 1.0}, boot=200, confidence=0.95, seed=seed,
                                      explore_interval=mode)["tasks"]["deal"]["difference_ci"]
                width[mode].append(hi - lo)
                cover += mode == "gamma" and lo <= truth <= hi
    finally:
        N = n_was
    assert cover >= 11, cover
    assert np.mean(width["gamma"]) < 0.8 * np.mean(width["widening"]), width
