"""The canary judged on its own arm's outcomes (training/canary_judge.py), truth known."""

from __future__ import annotations

import numpy as np
import pytest

from stream.canary import canary_arm
from training.canary_judge import judge_canary
from training.gate import GateConfig

TASKS = ("click", "deal")
WEIGHTS = {"click": 0.2, "deal": 0.8}


def _arms(keep_deal_canary: float, n: int = 300_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows split by the real route (share 0.2); each positive is kept with the arm's rate
    (current keeps 60 % of deal positives and 70 % of clicks), 10 % of rows not matured yet."""
    rng = np.random.default_rng(seed)
    to_canary = canary_arm([f"j{seed}-{i}" for i in range(n)], 0.2)
    y = rng.random((n, 2)) < np.array([0.05, 0.01])
    keep = np.where(to_canary[:, None], [0.7, keep_deal_canary], [0.7, 0.6])
    kept = (y & (rng.random((n, 2)) < keep)).astype(np.float64)
    kept[rng.random(n) < 0.1] = np.nan
    return kept, to_canary


def test_a_clearly_better_canary_is_promoted_with_an_interval_that_excludes_0():
    kept, arm = _arms(0.75, n=1_000_000)
    out = judge_canary(kept, arm, TASKS, WEIGHTS, GateConfig(boot=400))
    lo, hi = out["value"]["difference_ci"]
    assert out["decision"] == "promote" and lo > 0, out["why"]
    # truth: deal +25 % of current's kept deal positives, click equal -> value +0.8 x 0.25 = +0.2
    assert lo < 0.2 < hi
    assert out["guard_rails"]["deal"]["state"] == "holds" and out["evidence"] == "canary"


def test_a_clearly_worse_canary_is_refused_on_its_guard_rail():
    kept, arm = _arms(0.40, seed=1)
    out = judge_canary(kept, arm, TASKS, WEIGHTS, GateConfig(boot=400))
    assert out["decision"] == "refuse" and out["value"]["difference_ci"][1] < 0, out["why"]
    assert out["guard_rails"]["deal"]["state"] == "fails"


@pytest.mark.parametrize("seed", [2, 3])
def test_an_equal_canary_is_not_refused(seed):
    kept, arm = _arms(0.60, seed=seed)
    out = judge_canary(kept, arm, TASKS, WEIGHTS, GateConfig(boot=400))
    assert out["decision"] in ("promote", "inconclusive"), out["why"]
    lo, hi = out["value"]["difference_ci"]
    assert lo < 0 < hi


def test_too_few_positives_is_inconclusive_and_shapes_are_checked():
    kept, arm = _arms(0.75, n=3000, seed=4)
    out = judge_canary(kept, arm, TASKS, WEIGHTS, GateConfig(boot=200, min_positives=50))
    assert out["decision"] == "inconclusive"
    with pytest.raises(ValueError, match="aligned"):
        judge_canary(kept[:, :1], arm, TASKS, WEIGHTS)


def test_evidence_from_the_logged_layout_keeps_only_rows_on_their_hashed_arm():
    import pyarrow as pa

    from stream.features import FeatureSpec
    from training.canary_judge import canary_evidence
    from training.logs import LogSet

    n = 4000
    ids = np.asarray([f"e{i}" for i in range(n)], dtype=object)
    hashed = canary_arm(ids, 0.25)
    model = np.where(hashed, "v2", "v1").astype(object)
    model[2000:2040] = "v1"  # a worker that could not load the canary: current decided its share too
    ts = np.arange(n, dtype=np.int64) * 1000 + 1_000_000
    blocked = np.arange(n) % 4 == 0
    labels = np.where(blocked, np.nan, (np.arange(n) % 7 == 0)).astype(np.float32)[:, None]
    labels[-10:] = np.nan  # the newest rows' window (5 s) is still open
    as_of = int(ts[-1]) + 1
    logs = LogSet(spec=FeatureSpec((), ()), num=np.zeros((n, 0), np.float32), cat=np.zeros((n, 0), object),
                  labels=labels, truth=None, request_id=ids, ts_ms=ts, tasks=("deal",),
                  decisions=pa.table({"model": model.tolist(), "decision": np.where(blocked, "block", "pass").tolist()}),
                  info={"as_of_ms": as_of, "attribution_windows_s": {"deal": 5.0}})
    kept, to_canary, info = canary_evidence(logs, "v1", "v2", 0.25)
    first, last = np.flatnonzero(model == "v2")[[0, -1]]
    period = (np.arange(n) >= first) & (np.arange(n) <= last)
    on_arm = period & (hashed == (model == "v2"))
    assert info["left_out_off_arm"] == int((hashed[2000:2040]).sum()) > 0
    assert len(kept) == int(on_arm.sum()) and to_canary.sum() == int((on_arm & hashed).sum())
    # blocked rows whose window closed kept 0 positives; rows whose window is open stay unknown
    open_ = (as_of - ts) < 5000
    want = np.where(blocked & ~open_, 0.0, labels[:, 0])[on_arm]
    np.testing.assert_array_equal(kept[:, 0], want)
    assert np.isnan(kept[:, 0][open_[on_arm]]).all() and (kept[:, 0][(blocked & ~open_)[on_arm]] == 0).all()
    with pytest.raises(ValueError, match="no logged decision of v3"):
        canary_evidence(logs, "v1", "v3", 0.25)


def test_a_refusal_on_a_handful_of_positives_is_inconclusive():
    """The watch stops a canary on the judge's refusal: 6 deal positives on current's arm and
    none on the canary's (exact conditional p = 0.031) came out "refuse" while only promotions
    needed `min_positives` (review of session 2)."""
    rng = np.random.default_rng(1)
    n = 1000
    kept = np.zeros((2 * n, 2))
    kept[:, 0] = rng.random(2 * n) < 0.05
    kept[:6, 1] = 1.0  # current's arm: 6 deal positives; the canary's: 0
    arm = np.r_[np.zeros(n, bool), np.ones(n, bool)]
    out = judge_canary(kept, arm, TASKS, WEIGHTS, GateConfig(confidence=0.99, boot=400, min_positives=10),
                       gate_task="deal")
    assert out["decision"] == "inconclusive" and "fewer than 10" in out["why"], out["why"]


def test_evidence_is_the_runs_own_span_not_an_older_canary_of_the_same_version():
    """An older canary of v2 beside v0, then v1 alone, then the canary being judged: only the
    judged run's rows form the arms (its canary-start and the entry that ended it)."""
    import pyarrow as pa

    from stream.features import FeatureSpec
    from training.canary_judge import canary_evidence
    from training.logs import LogSet

    n = 4000
    ids = np.asarray([f"o{i}" for i in range(n)], dtype=object)
    hashed = canary_arm(ids, 0.5)
    ts = np.arange(n, dtype=np.int64) * 1000
    model = np.empty(n, dtype=object)
    model[:1000] = np.where(hashed[:1000], "v2", "v0")  # the old canary, beside v0
    model[1000:3000] = "v1"  # v1 alone
    model[3000:] = np.where(hashed[3000:], "v2", "v1")  # the judged run: started at ts 3,000,000
    logs = LogSet(spec=FeatureSpec((), ()), num=np.zeros((n, 0), np.float32), cat=np.zeros((n, 0), object),
                  labels=np.zeros((n, 1), np.float32), truth=None, request_id=ids, ts_ms=ts, tasks=("deal",),
                  decisions=pa.table({"model": model.tolist(), "decision": ["pass"] * n}),
                  info={"as_of_ms": int(ts[-1]) + 10**7, "attribution_windows_s": {"deal": 1.0}})
    _, to_canary, info = canary_evidence(logs, "v1", "v2", 0.5, since_ms=3_000_000)
    run_v2 = np.flatnonzero(model[3000:] == "v2") + 3000
    assert len(to_canary) == run_v2[-1] - run_v2[0] + 1 and info["period_ms"][0] >= 3_000_000, info
    assert info["period_source"] == "the run's start and stop"
    # without the span the old canary's v2 rows and v1's solo rows join the arms
    _, whole, _ = canary_evidence(logs, "v1", "v2", 0.5)
    assert len(whole) > 2000
    # a log on another clock (nothing of the candidate inside the span) keeps the candidate's rows
    _, other, info = canary_evidence(logs, "v1", "v2", 0.5, since_ms=10**12)
    assert len(other) == len(whole) and info["period_source"].startswith("the candidate's logged rows")
