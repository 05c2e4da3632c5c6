"""The score step shared by the worker and replay: features -> student -> policy score.

`rta serve` and `rta replay` must decide a request the same way, so both call
`score_batch`: the bundle's student gives per-task probabilities `p` and uncertainties
`u_tasks`, the bundle's `ScorePolicy` turns them into the score `e` and the uncertainty `u`
the decision rule reads. Decoding (JSON -> matrices) and deciding (`stream.policy.decide`
with the controller's thresholds) stay with the caller.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from stream.policy import ScorePolicy
from stream.scorer import Scorer


class Scored(NamedTuple):
    """One batch after the student and the score function (all rows aligned)."""

    p: np.ndarray  # float32[N, T] per-task probability
    u_tasks: np.ndarray  # float32[N, T] per-task uncertainty
    e: np.ndarray  # float32[N] score e = f(p)
    u: np.ndarray  # float32[N] uncertainty of the policy's source task


def score_batch(scorer: Scorer, policy: ScorePolicy, num: np.ndarray, cat: np.ndarray) -> Scored:
    """num float32[N, n_num] (NaN = missing), cat object[N, n_cat] ("" = missing) -> Scored."""
    p, u_tasks = scorer.score(num, cat)
    return Scored(p, u_tasks, policy.score(p), policy.uncertainty(u_tasks))
