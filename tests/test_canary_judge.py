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
