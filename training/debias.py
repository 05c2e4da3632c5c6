"""Training on the filter's own logs: labels only where the filter passed, and how to correct for it.

A logged row has a label only if it was passed. Passing depends on the request's features only
(score, uncertainty, a random explore draw), never on its outcome, so P(y | x) on the passed rows
is the population's; what the passed rows misrepresent is *which* x the model sees: few of the
ones the old model scored low. Three ways to train on that (`rta train --debias`):

* ``none``: every observed label weighs 1 (the passed rows as they are).
* ``ips``: each observed label weighs 1 / P(passed | x), the probability the logged policy had of
  passing that row: 1 for a row the rule passed (it passes whatever the explore draw), epsilon
  for an explore row the rule would have blocked (score below the logged threshold and
  uncertainty below the logged tau_u). Weights are clipped at ``clip`` (variance) and
  self-normalised (the loss divides by the sum of weights, so the clip never rescales the loss).
* ``explore-only``: only the explore slice's labels count: a uniform random sample of valid
  traffic, unbiased in x but an epsilon-share of the rows.

`docs/results.md` ("Training on the filter's own logs") measures all three against full labels.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stream.errors import DataError
from training.logs import LogSet

DEBIAS_MODES = ("none", "ips", "explore-only")
DEFAULT_DEBIAS = "none"  # chosen from the table in docs/results.md
DEFAULT_CLIP = 20.0  # largest IPS weight: a 5% explore slice's 1/epsilon, not a 1% slice's 100


def _floats(d: pa.Table, name: str) -> np.ndarray:
    return pc.fill_null(pc.cast(d.column(name), pa.float64()), np.nan).to_numpy(zero_copy_only=False)


def pass_probability(logs: LogSet) -> np.ndarray:
    """P(passed | x) under the logged policy, per row (float64[N]); 1 where it cannot be told.

    Explore rows: the rule's own verdict from the logged score/threshold and uncertainty/tau_u
    decides between 1 (the rule passes it too) and epsilon (its propensity: only the draw let it
    through). Rule-path passes: 1. Blocked rows: 1 - epsilon of being blocked, i.e. a pass
    probability of epsilon (they carry no label, so it only matters for counting)."""
    d = logs.decisions
    n = len(logs)
    if d is None:
        return np.ones(n)
    reason = pc.fill_null(d.column("reason").cast(pa.string()), "").to_numpy(zero_copy_only=False)
    decision = pc.fill_null(d.column("decision").cast(pa.string()), "").to_numpy(zero_copy_only=False)
    prop = _floats(d, "propensity")
    score, theta = _floats(d, "score"), _floats(d, "threshold")
    u, tau = _floats(d, "uncertainty"), _floats(d, "tau_u")
    with np.errstate(invalid="ignore"):
        rule_pass = (score >= theta) | (u >= tau)
    explore = reason == "explore"
    eps = np.where(explore, prop, 1.0 - prop)
    p = np.ones(n)
    low = explore & ~rule_pass & np.isfinite(eps) & (eps > 0)
    p[low] = eps[low]
    blocked = decision == "block"
    p[blocked] = np.where(np.isfinite(eps[blocked]) & (eps[blocked] > 0), eps[blocked], 0.0)
    return p


def apply_debias(logs: LogSet, mode: str, clip: float = DEFAULT_CLIP) -> tuple[LogSet, dict[str, Any]]:
    """The LogSet the trainer should learn from under `mode`, and what was done (for the log and
    the manifest). A log with every label observed (a world log) is returned as it is."""
    if mode not in DEBIAS_MODES:
        raise DataError(f"--debias {mode!r}: expected one of {', '.join(DEBIAS_MODES)}")
    info: dict[str, Any] = {"mode": mode}
    if not logs.masked or logs.decisions is None:
        info["applied"] = False  # full labels: nothing is biased by a filter
        return logs, info
    info["applied"] = True
    reason = pc.fill_null(logs.decisions.column("reason").cast(pa.string()), "").to_numpy(zero_copy_only=False)
    explore = reason == "explore"
    info["explore_rows"] = int(explore.sum())
    if mode == "none":
        return logs, info
    if mode == "explore-only":
        if not explore.any():
            raise DataError(f"{logs.source}: --debias explore-only needs explore rows (reason 'explore'); none logged")
        labels = np.where(explore[:, None], logs.labels, np.nan).astype(np.float32)
        info["labelled_rows"] = int((~np.isnan(labels).all(axis=1)).sum())
        return replace(logs, labels=labels), info
    if clip < 1.0:
        raise DataError(f"IPS clip must be >= 1, got {clip}")
    p = pass_probability(logs)
    w = np.where(p > 0, 1.0 / np.maximum(p, 1e-12), 0.0)
    observed = ~np.isnan(logs.labels).all(axis=1)
    info.update(clip=clip, clipped_rows=int((observed & (w > clip)).sum()),
                upweighted_rows=int((observed & (w > 1.0)).sum()))
    w = np.minimum(w, clip)
    w[~observed] = 0.0
    mean = w[observed].mean() if observed.any() else 1.0
    w = (w / mean).astype(np.float32)  # mean 1 over the labelled rows (the loss self-normalises too)
    info["ess_share"] = round(float(w[observed].sum() ** 2 / max((w[observed] ** 2).sum(), 1e-12))
                              / max(int(observed.sum()), 1), 4)
    return replace(logs, weights=w), info
