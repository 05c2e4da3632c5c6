"""Input novelty: how unlike the training traffic a request's features are, in one cheap pass.

Why: the SWAG variance of sampled probabilities measures ambiguity (it peaks where p is near
0.5), not novelty: a request whose features the model has never seen can get a confident, low
p and a low variance, and be blocked. A request from a new source shows itself in its inputs:
values on another scale, categories never seen. This module scores exactly that, as the
surprise of the request's novelty events under the training traffic, each column independent:

    numeric column j:  event = v_j outside [lo_j, hi_j]      v = the preprocessor's value
                       (signed log1p where it logs the column), lo/hi the training quantiles
                       `tail` and 1 - `tail` widened by `margin` x their distance
    categorical j:     event = a non-missing value outside the preprocessor's vocabulary
    weight w_j = -log(max(training event rate_j, 1 / n_fit))     (rare events weigh more)
    novelty = sum_j w_j * event_j                                 (nats; 0 = nothing unusual)

A category that is often out of vocabulary in training (the Zipf tail of device models) weighs
little; one that never is (channel) weighs log(n_fit). `model/export.py` computes the same
formula inside the student's ONNX graph (numpy here, op for op there), so the served value is
the teacher-side value exactly. Numpy only: no torch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.preprocess import MISSING_INDEX, UNKNOWN_INDEX, Preprocessor, signed_log1p

DEFAULT_TAIL = 0.0005
DEFAULT_MARGIN = 0.5


def log_values(pre: Preprocessor, num: np.ndarray) -> np.ndarray:
    """The preprocessor's value v per numeric column (before centring), float32, NaN = missing."""
    num = np.asarray(num, dtype=np.float32)
    return np.where(pre.num_log, signed_log1p(num), num).astype(np.float32, copy=False)


@dataclass
class Novelty:
    """Fitted novelty ranges and weights for one preprocessor (stored in the manifest)."""

    lo: np.ndarray  # float32[n_num]
    hi: np.ndarray  # float32[n_num]
    w_num: np.ndarray  # float32[n_num]
    w_cat: np.ndarray  # float32[n_cat]
    n_fit: int
    tail: float = DEFAULT_TAIL
    margin: float = DEFAULT_MARGIN

    @classmethod
    def fit(cls, pre: Preprocessor, num: np.ndarray, cat: np.ndarray, tail: float = DEFAULT_TAIL,
            margin: float = DEFAULT_MARGIN) -> Novelty:
        """Ranges and event rates from the training rows (the preprocessor's own fit rows)."""
        v = log_values(pre, num)
        n = max(len(v), 1)
        finite = np.where(np.isfinite(v), v, np.nan)  # +-inf is out of any range, not a bound
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-missing column: no range
            q_lo = np.nanquantile(finite, tail, axis=0) if len(v) else np.zeros(v.shape[1])
            q_hi = np.nanquantile(finite, 1.0 - tail, axis=0) if len(v) else np.zeros(v.shape[1])
        q_lo = np.where(np.isfinite(q_lo), q_lo, 0.0)
        q_hi = np.where(np.isfinite(q_hi), q_hi, 0.0)
        width = np.maximum(q_hi - q_lo, 1e-6)
        lo = (q_lo - margin * width).astype(np.float32)
        hi = (q_hi + margin * width).astype(np.float32)
        num_rate = ((v < lo) | (v > hi)).mean(axis=0)  # NaN compares False: missing is no event
        _, idx = pre.transform(num, cat)
        cat_rate = (idx == UNKNOWN_INDEX).mean(axis=0) if idx.shape[1] else np.zeros(0)
        floor = 1.0 / n
        return cls(lo=lo, hi=hi,
                   w_num=(-np.log(np.maximum(num_rate, floor))).astype(np.float32),
                   w_cat=(-np.log(np.maximum(cat_rate, floor))).astype(np.float32),
                   n_fit=int(n), tail=float(tail), margin=float(margin))

    def events(self, pre: Preprocessor, num: np.ndarray, cat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(numeric out-of-range bool[N, n_num], categorical unseen bool[N, n_cat])."""
        v = log_values(pre, num)
        out = (v < self.lo) | (v > self.hi)
        _, idx = pre.transform(num, cat)
        return out, idx == UNKNOWN_INDEX

    def score(self, pre: Preprocessor, num: np.ndarray, cat: np.ndarray) -> np.ndarray:
        """novelty float32[N] (module docstring)."""
        out, unseen = self.events(pre, num, cat)
        return (out.astype(np.float32) @ self.w_num + unseen.astype(np.float32) @ self.w_cat).astype(np.float32)

    def shares(self, pre: Preprocessor, num: np.ndarray, cat: np.ndarray) -> dict[str, np.ndarray]:
        """The unweighted statistics: out-of-range share of numeric, unseen share of present categoricals."""
        out, unseen = self.events(pre, num, cat)
        _, idx = pre.transform(num, cat)
        present = np.maximum((idx != MISSING_INDEX).sum(axis=1), 1)
        return {"out_of_range_share": out.mean(axis=1).astype(np.float32),
                "unseen_category_share": (unseen.sum(axis=1) / present).astype(np.float32)}

    def to_dict(self) -> dict[str, Any]:
        return {"lo": self.lo.tolist(), "hi": self.hi.tolist(), "w_num": self.w_num.tolist(),
                "w_cat": self.w_cat.tolist(), "n_fit": self.n_fit, "tail": self.tail, "margin": self.margin}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Novelty:
        f32 = np.float32
        return cls(lo=np.asarray(d["lo"], f32), hi=np.asarray(d["hi"], f32), w_num=np.asarray(d["w_num"], f32),
                   w_cat=np.asarray(d["w_cat"], f32), n_fit=int(d["n_fit"]), tail=float(d["tail"]),
                   margin=float(d["margin"]))
