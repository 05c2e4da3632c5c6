"""Uncertainty measures from M sampled teacher outputs, and the per-task source map.

Given the logits l_m (m = 1..M) of one request for one task under M SWAG weight samples:

    prob_var            Var_m[ sigmoid(l_m) ]                the paper's measure (Alg. 1)
    logit_var           Var_m[ l_m ]                         log-odds space: no squashing
    base_rate_relative  Var_m[ sigmoid(l_m - logit(pi)) ]    the paper's measure with the
                                                             task's base rate pi as reference

Why base_rate_relative takes this form: the probability variance of a sample is roughly
(q(1-q))^2 Var[l], so it peaks where the prediction q sits at 0.5 - the decision boundary of a
balanced task. Under imbalance (deal, pi ~ 1%) the uninformative requests sit at pi, and a
request at q = 0.5 is a confident positive, yet prob_var calls it the most uncertain (the
paper's Sec. III-C). Shifting the logits by logit(pi) moves the peak to the base rate: the
measure is largest for requests whose sampled odds straddle the base-rate odds, i.e. where the
model cannot tell whether the request is better or worse than average. For a balanced task
(pi ~ 0.5) it equals prob_var. Dividing prob_var by pi(1-pi) was rejected: a per-task
constant leaves every within-task ranking - and so every passing decision - unchanged.

Variances are population variances (1/M), as in Algorithm 1 of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MEASURES = ("prob_var", "logit_var", "base_rate_relative")
DEFAULT_SOURCE_MAP = {"click": "click", "online": "online", "cart": "click", "deal": "click"}


@dataclass
class TeacherPrediction:
    """Per-request, per-task summaries of the M sampled teacher outputs (all float32[N, T])."""

    mean: np.ndarray  # mean of the sampled probabilities (DAUM's score)
    var: np.ndarray  # variance of the sampled probabilities ("prob_var", the paper's measure)
    logit_var: np.ndarray  # variance of the sampled logits
    relative: np.ndarray  # "base_rate_relative"

    def measure(self, name: str) -> np.ndarray:
        """The uncertainty measure called `name` (one of MEASURES)."""
        by_name = {"prob_var": self.var, "logit_var": self.logit_var, "base_rate_relative": self.relative}
        if name not in by_name:
            raise KeyError(f"unknown uncertainty measure {name!r}; known: {', '.join(MEASURES)}")
        return by_name[name]

    def take(self, rows: np.ndarray) -> TeacherPrediction:
        return TeacherPrediction(self.mean[rows], self.var[rows], self.logit_var[rows], self.relative[rows])

    def __len__(self) -> int:
        return int(self.mean.shape[0])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def base_rate_logit(base_rate: np.ndarray | None, n_tasks: int) -> np.ndarray:
    """logit(pi) per task; 0 (pi = 0.5) when no base rate is known."""
    if base_rate is None:
        return np.zeros(n_tasks)
    pi = np.clip(np.asarray(base_rate, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(pi / (1 - pi))


def summarise_samples(logits: np.ndarray, base_rate: np.ndarray | None = None) -> TeacherPrediction:
    """logits [M, N, T] under M weight samples -> TeacherPrediction (vectorised over all axes)."""
    logits = np.asarray(logits, dtype=np.float64)
    probs = _sigmoid(logits)
    shifted = _sigmoid(logits - base_rate_logit(base_rate, logits.shape[-1]))
    f32 = np.float32
    return TeacherPrediction(
        mean=probs.mean(axis=0).astype(f32),
        var=probs.var(axis=0).astype(f32),
        logit_var=logits.var(axis=0).astype(f32),
        relative=shifted.var(axis=0).astype(f32),
    )


def source_uncertainty(pred: TeacherPrediction, tasks: tuple[str, ...], measure: str = "prob_var",
                       source_map: dict[str, str] | None = None) -> np.ndarray:
    """u[:, t] = the chosen measure of task source_map[t] (default: cart and deal take click's)."""
    smap = DEFAULT_SOURCE_MAP if source_map is None else source_map
    u = pred.measure(measure)
    cols = [tasks.index(smap.get(t, t)) for t in tasks]
    return u[:, cols]
