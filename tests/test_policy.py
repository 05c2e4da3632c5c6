"""The decision policy: the rule's order and invariants, targets' feasibility, score functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stream.errors import ConfigError, InfeasibleTargets
from stream.policy import (
    DEGRADED,
    EXPLORE,
    INVALID,
    NAN_OUTPUT,
    REASONS,
    SCORE,
    UNCERTAIN,
    ScorePolicy,
    Targets,
    check_targets,
    decide,
)

unit = st.floats(0.0, 1.0, allow_nan=False)
maybe_bad = st.one_of(unit, st.just(float("nan")), st.just(float("inf")))


@st.composite
def batches(draw):
    n = draw(st.integers(0, 60))
    e = draw(hnp.arrays(np.float64, n, elements=maybe_bad))
    u = draw(hnp.arrays(np.float64, n, elements=maybe_bad))
    valid = draw(hnp.arrays(bool, n))
    d = draw(hnp.arrays(np.float64, n, elements=st.floats(0.0, 0.999999)))
    theta = draw(unit)
    tau = draw(st.one_of(unit, st.just(math.inf)))
    eps = draw(unit)
    return e, u, valid, d, theta, tau, eps


@settings(max_examples=300, deadline=None)
@given(batches(), st.booleans())
def test_rule_invariants(batch, degraded):
    e, u, valid, draw, theta, tau, eps = batch
    d = decide(e, u, valid, draw, theta, tau, eps, degraded)
    n = len(e)
    # exactly one decision per row, with a known reason
    assert d.block.shape == d.reason.shape == d.stage.shape == d.propensity.shape == (n,)
    assert d.reason.max(initial=0) < len(REASONS)
    ok = valid & np.isfinite(e) & np.isfinite(u)
    # 1. invalid rows pass as invalid, forced
    assert (d.stage[~ok] == INVALID).all() and (d.reason[~valid] == INVALID).all()
    # ... and a valid row the model scored NaN/inf has its own reason (a model fault)
    assert (d.reason[valid & ~ok] == NAN_OUTPUT).all()
    assert not d.block[~ok].any() and (d.propensity[~ok] == 1.0).all()
    # 2. explore before anything else, propensity epsilon, never degraded
    ex = ok & (draw < eps)
    assert (d.stage[ex] == EXPLORE).all() and (d.reason[ex] == EXPLORE).all()
    assert not d.block[ex].any() and np.allclose(d.propensity[ex], np.float32(eps))
    rule = ok & ~ex
    # 3. uncertain passes
    unc = rule & (u >= tau)
    assert (d.stage[unc] == UNCERTAIN).all() and not d.block[unc].any()
    # 4. score: block iff e < theta
    sc = rule & ~unc
    assert (d.stage[sc] == SCORE).all()
    assert (d.block[sc] == (e[sc] < theta)).all()
    assert np.allclose(d.propensity[rule], np.float32(1 - eps))
    # only score-stage rows are ever blocked
    assert not d.block[d.stage != SCORE].any()
    # degraded relabels exactly the rule path and changes no decision
    plain = decide(e, u, valid, draw, theta, tau, eps, False)
    assert (plain.block == d.block).all() and (plain.stage == d.stage).all()
    if degraded:
        assert (d.reason[rule] == DEGRADED).all()
    else:
        assert (d.reason[ok | ~valid] == d.stage[ok | ~valid]).all()


def test_rule_order_by_hand():
    e = np.array([0.1, 0.1, 0.1, 0.9, 0.1, np.nan])
    u = np.array([0.0, 0.0, 0.5, 0.0, 0.0, 0.0])
    valid = np.array([True, True, True, True, False, True])
    draw = np.array([0.5, 0.01, 0.5, 0.5, 0.5, 0.5])
    d = decide(e, u, valid, draw, theta=0.2, tau_u=0.3, epsilon=0.05)
    assert [REASONS[r] for r in d.reason] == ["score", "explore", "uncertain", "score", "invalid", "nan_output"]
    assert d.block.tolist() == [True, False, False, False, False, False]
    assert d.propensity.tolist() == pytest.approx([0.95, 0.05, 0.95, 0.95, 1.0, 1.0])
    assert list(d.reason_names()) == ["score", "explore", "uncertain", "score", "invalid", "nan_output"]


def test_decide_rejects_bad_inputs():
    with pytest.raises(InfeasibleTargets):
        decide(np.zeros(2), np.zeros(2), None, np.zeros(2), 0.5, 1.0, 1.5)
    with pytest.raises(ValueError):
        decide(np.zeros(2), np.zeros(3), None, np.zeros(2), 0.5, 1.0, 0.0)


@pytest.mark.parametrize("r,p,e", [(-0.1, 0, 0), (1.0, 0, 0), (0.5, 0.4, 0.2), (0.2, -0.1, 0),
                                   (0.2, 0, 1.1), (float("nan"), 0, 0), (0.9, 0.05, 0.051)])
def test_infeasible_targets(r, p, e):
    with pytest.raises(InfeasibleTargets):
        Targets(r, p, e)


@pytest.mark.parametrize("r,p,e", [(0, 0, 0), (0.3, 0.05, 0.01), (0.9, 0.05, 0.05), (0.999, 0, 0)])
def test_feasible_targets(r, p, e):
    check_targets(r, p, e)
    assert Targets(r, p, e).to_dict() == {"r": r, "p_u": p, "epsilon": e}


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float64, (20, 4), elements=st.floats(1e-6, 1 - 1e-6)),
       st.integers(0, 3), st.floats(1e-3, 0.5), st.sampled_from(["logit", "linear"]))
def test_score_is_monotone_in_each_task(p, task, bump, space):
    pol = ScorePolicy.from_manifest(score_function={"kind": "weighted", "space": space,
                                                    "weights": {"click": 0.1, "online": 0.2,
                                                                "cart": 0.3, "deal": 0.4}})
    q = p.copy()
    q[:, task] = np.minimum(q[:, task] + bump, 1 - 1e-6)
    assert (pol.score(q) >= pol.score(p)).all()


def test_score_defaults_and_overrides():
    pol = ScorePolicy.from_manifest({"tasks": ["click", "online", "cart", "deal"]})
    assert pol.source == "click" and pol.space == "logit"
    assert pol.weights.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    p = np.array([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.9]], dtype=np.float32)
    e = pol.score(p)
    assert e[0] == pytest.approx(0.5) and e[1] > e[0]
    unc = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    assert pol.uncertainty(unc).tolist() == [1.0]
    assert ScorePolicy.from_manifest(source="deal").uncertainty(unc).tolist() == [4.0]
    only = ScorePolicy.from_manifest(score_function={"kind": "task", "task": "deal"})
    assert only.score(p).tolist() == pytest.approx([0.5, 0.9])
    m = {"tasks": ["a", "b"], "uncertainty_source": {"b": "a"},
         "score_function": {"kind": "weighted", "weights": {"b": 1}}}
    pol2 = ScorePolicy.from_manifest(m)
    assert pol2.source == "a" and pol2.weights.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("spec", [{"kind": "nope"}, {"kind": "weighted", "weights": {"zzz": 1}},
                                  {"kind": "weighted", "weights": {"deal": -1}},
                                  {"kind": "weighted", "space": "cubic"}, {"kind": "task", "task": "x"}])
def test_bad_score_functions(spec):
    with pytest.raises(ConfigError):
        ScorePolicy.from_manifest(score_function=spec)
    with pytest.raises(ConfigError):
        ScorePolicy.from_manifest(source="nope")
