"""The decision policy of DESIGN.md: arrays in, arrays out, shared by the worker and replay.

It knows nothing of Kafka, Redis or the controller: the caller hands it a batch's scores,
uncertainties, validity, exploration draws and the current thresholds, and gets back one
decision per row. Typical use (the worker and replay do exactly this)::

    policy = ScorePolicy.from_manifest(manifest)          # once per model bundle
    e, u = policy.score(p), policy.uncertainty(unc)      # p, unc: float32[N, n_tasks]
    th = controller.thresholds()                         # stream.controller
    d = decide(e, u, valid, rng.random(len(e)), th.theta, th.tau_u,
               th.targets.epsilon, th.degraded)
    controller.observe(e, u, d)

The rule, row by row, in this order (exactly one decision per row):

1. invalid (``valid`` false, or ``e``/``u`` not finite) -> pass, reason ``invalid``,
   propensity 1 (forced). A valid request whose ``e``/``u`` is not finite (the model
   returned NaN/inf) takes the same path with its own reason ``nan_output``, so a model fault
   is never mistaken for bad input.
2. exploration (``explore_draw < epsilon``) -> pass, reason ``explore``, propensity
   ``epsilon``: the explore set is a uniform random ``epsilon``-sample of valid traffic, so
   weighting its labels by ``1/propensity`` estimates anything over all valid traffic.
3. ``u >= tau_u`` -> pass, reason ``uncertain``.
4. otherwise block iff ``e < theta``, reason ``score``.
   Rows on the rule path (3, 4) carry propensity ``1 - epsilon`` (the chance they were not
   sampled for exploration).

Degraded: when the controller is degraded (Redis unreachable, thresholds from the last
refresh and a local window), rows decided on the rule path (3 and 4) get reason ``degraded``
instead of ``uncertain``/``score``; the decision itself (block/pass) is the same rule with the
same thresholds. ``invalid`` and ``explore`` rows keep their reason because they do not
depend on thresholds (and the explore sample must stay identifiable for retraining). The
path a row actually took is always in ``Decisions.stage`` (never ``degraded``), which is what
the controller counts.

Score function ``e = f(p)`` (from the manifest's ``score_function``, overridable):

- ``{"kind": "weighted", "weights": {task: w >= 0}, "space": "logit"}`` (default space):
  ``e = sigmoid(sum_t w_t * logit(p_t))`` with weights normalised to sum 1, i.e. the odds of
  ``e`` are the weighted geometric mean of the tasks' odds. Monotone in every ``p_t`` and
  scale-free: a sparse task (deal, base rate ~1e-3) moves ``e`` as much per unit of log-odds
  as a balanced one (click), which a linear blend of raw probabilities would not allow.
- ``"space": "linear"``: ``e = sum_t w_t * p_t`` (weights normalised).
- ``{"kind": "task", "task": name}``: ``e = p_task``.

Default: weighted in logit space, ``click 0.1, online 0.2, cart 0.3, deal 0.4`` (toward
deal). Uncertainty: ``u = unc[:, source]``; ``source`` is the manifest's
``uncertainty_source`` entry for the primary task (deal if present, else the last task),
default ``click`` guides deal (the paper's cross-task transfer).

Ambiguity and novelty (``combine_uncertainty``): a bundle whose manifest has an
``uncertainty.novelty`` section serves, per task, ``unc = a + [n > gate] * ceiling * (1 + n /
max(gate, 1))``: ``a`` the distilled ambiguity (the teacher's SWAG measure), ``n`` the request's
input novelty (``model/novelty.py``, nats), ``gate`` the novelty that at most a small share of
validation traffic exceeds and ``ceiling`` the largest ambiguity on validation. A request the
training traffic never looked like outranks every merely ambiguous one, more novel first, so
the pass share ``p_u`` goes first where the model's score means least (a model cannot be
trusted to block what it has never seen) and what is left goes to the most ambiguous known
requests. The student's ONNX graph computes exactly this (one pass); this function is its
reference, and the rule below reads the result like any other ``u``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream.errors import ConfigError, InfeasibleTargets

REASONS: tuple[str, ...] = ("score", "uncertain", "explore", "invalid", "degraded", "nan_output")
SCORE, UNCERTAIN, EXPLORE, INVALID, DEGRADED = range(5)
NAN_OUTPUT = REASONS.index("nan_output")  # valid request, the model returned NaN/inf: pass

DEFAULT_TASKS = ("click", "online", "cart", "deal")
DEFAULT_WEIGHTS = {"click": 0.1, "online": 0.2, "cart": 0.3, "deal": 0.4}
DEFAULT_SOURCE = {"deal": "click"}
_P_CLIP = 1e-7  # probabilities are clipped into [_P_CLIP, 1 - _P_CLIP] before logit


@dataclass(frozen=True)
class Targets:
    """Live targets: block share ``r``, direct (uncertain) pass share ``p_u``, explore share
    ``epsilon``; all shares of ALL decided traffic."""

    r: float = 0.0
    p_u: float = 0.0
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        check_targets(self.r, self.p_u, self.epsilon)

    def to_dict(self) -> dict[str, float]:
        return {"r": self.r, "p_u": self.p_u, "epsilon": self.epsilon}


def check_targets(r: float, p_u: float, epsilon: float) -> None:
    """Raise InfeasibleTargets unless 0 <= r < 1, 0 <= p_u, epsilon and r + p_u + epsilon <= 1."""
    for name, value in (("r", r), ("pass share p_u", p_u), ("explore epsilon", epsilon)):
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise InfeasibleTargets(f"{name} must be a finite number, got {value!r}")
    if not 0.0 <= r < 1.0:
        raise InfeasibleTargets(f"r must be in [0, 1), got {r}")
    if not 0.0 <= p_u <= 1.0:
        raise InfeasibleTargets(f"pass share p_u must be in [0, 1], got {p_u}")
    if not 0.0 <= epsilon <= 1.0:
        raise InfeasibleTargets(f"explore epsilon must be in [0, 1], got {epsilon}")
    if r + p_u + epsilon > 1.0 + 1e-12:
        raise InfeasibleTargets(
            f"infeasible targets: r + p_u + epsilon = {r + p_u + epsilon:.4g} > 1 "
            f"(r={r}, p_u={p_u}, epsilon={epsilon}); lower one of them"
        )


@dataclass(frozen=True)
class Decisions:
    """One decision per row. ``reason`` is what is published; ``stage`` is the rule's path
    (same codes, never DEGRADED) and is what the controller counts."""

    block: np.ndarray  # bool[N]
    reason: np.ndarray  # uint8[N], index into REASONS
    stage: np.ndarray  # uint8[N], index into REASONS (SCORE, UNCERTAIN, EXPLORE, INVALID)
    propensity: np.ndarray  # float32[N]

    def __len__(self) -> int:
        return len(self.block)

    def reason_names(self) -> np.ndarray:
        """Reasons as strings (object array), for events and reports."""
        return np.asarray(REASONS, dtype=object)[self.reason]


def decide(
    e: np.ndarray,
    u: np.ndarray,
    valid: np.ndarray | None,
    explore_draw: np.ndarray,
    theta: float,
    tau_u: float,
    epsilon: float,
    degraded: bool = False,
) -> Decisions:
    """Apply the rule (module docstring) to a batch; ``explore_draw`` is uniform on [0, 1)."""
    e = np.asarray(e, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    draw = np.asarray(explore_draw, dtype=np.float64)
    n = e.shape[0]
    if u.shape != (n,) or draw.shape != (n,) or e.ndim != 1:
        raise ValueError(f"e, u, explore_draw must be 1-d of one length; got {e.shape}, {u.shape}, {draw.shape}")
    if not 0.0 <= epsilon <= 1.0:
        raise InfeasibleTargets(f"explore epsilon must be in [0, 1], got {epsilon}")
    ok = np.isfinite(e) & np.isfinite(u)
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)

    explore = ok & (draw < epsilon)
    rule = ok & ~explore
    with np.errstate(invalid="ignore"):
        uncertain = rule & (u >= tau_u)
        scored = rule & ~uncertain
        block = scored & (e < theta)

    stage = np.full(n, INVALID, dtype=np.uint8)
    stage[explore] = EXPLORE
    stage[uncertain] = UNCERTAIN
    stage[scored] = SCORE
    reason = np.where(rule, np.uint8(DEGRADED), stage).astype(np.uint8) if degraded else stage.copy()
    nan_out = ~(np.isfinite(e) & np.isfinite(u))
    if valid is not None:
        nan_out &= np.asarray(valid, dtype=bool)
    reason[nan_out] = NAN_OUTPUT
    propensity = np.where(explore, np.float32(epsilon), np.float32(1.0 - epsilon)).astype(np.float32)
    propensity[~ok] = 1.0
    return Decisions(block=block, reason=reason, stage=stage, propensity=propensity)


def combine_uncertainty(ambiguity: np.ndarray, novelty: np.ndarray, gate: float,
                        ceiling: np.ndarray) -> np.ndarray:
    """Served per-task uncertainty from ambiguity float32[N, T] and novelty float32[N] (module
    docstring); ``ceiling`` float32[T]. float32 math, as the graph does it."""
    a = np.asarray(ambiguity, np.float32)
    n = np.asarray(novelty, np.float32).reshape(-1, 1)
    on = (n > np.float32(gate)).astype(np.float32)
    boost = on * np.asarray(ceiling, np.float32) * (np.float32(1.0) + n / np.float32(max(gate, 1.0)))
    return (a + boost).astype(np.float32)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _P_CLIP, 1.0 - _P_CLIP)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class ScorePolicy:
    """``e = f(p)`` and ``u = unc[:, source]`` for a bundle's task order."""

    tasks: tuple[str, ...]
    weights: np.ndarray  # float64[n_tasks], >= 0, sums to 1
    space: str  # "logit" | "linear"
    source: str

    @classmethod
    def from_manifest(
        cls,
        manifest: Mapping[str, Any] | None = None,
        score_function: Mapping[str, Any] | None = None,
        source: str | None = None,
    ) -> ScorePolicy:
        """Build from a manifest dict (``tasks``, ``score_function``, ``uncertainty_source``);
        ``score_function``/``source`` override it."""
        manifest = manifest or {}
        tasks = tuple(manifest.get("tasks") or DEFAULT_TASKS)
        spec = dict(score_function or manifest.get("score_function") or {"kind": "weighted"})
        kind = spec.get("kind", "weighted")
        if kind == "task":
            name = spec.get("task")
            if name not in tasks:
                raise ConfigError(f"score function: task {name!r} not among the bundle's tasks {list(tasks)}")
            weights = {name: 1.0}
            space = "linear"
        elif kind == "weighted":
            weights = spec.get("weights") or {t: w for t, w in DEFAULT_WEIGHTS.items() if t in tasks}
            if not weights:  # a bundle with none of the default tasks: equal weights
                weights = {t: 1.0 for t in tasks}
            space = spec.get("space", "logit")
            if space not in ("logit", "linear"):
                raise ConfigError(f"score function: space must be 'logit' or 'linear', got {space!r}")
        else:
            raise ConfigError(f"score function: unknown kind {kind!r}; use 'weighted' or 'task'")
        unknown = set(weights) - set(tasks)
        if unknown:
            raise ConfigError(f"score function weights name unknown task(s) {sorted(unknown)}; tasks: {list(tasks)}")
        w = np.array([float(weights.get(t, 0.0)) for t in tasks])
        if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"score function weights must be >= 0 with a positive sum, got {weights}")

        primary = "deal" if "deal" in tasks else tasks[-1]
        src_map = manifest.get("uncertainty_source") or DEFAULT_SOURCE
        if isinstance(src_map, str):
            src_map = {primary: src_map}
        chosen = source or src_map.get(primary, primary)
        if chosen not in tasks:
            raise ConfigError(f"uncertainty source {chosen!r} not among the bundle's tasks {list(tasks)}")
        return cls(tasks=tasks, weights=w / w.sum(), space=space, source=chosen)

    @property
    def source_index(self) -> int:
        return self.tasks.index(self.source)

    def score(self, p: np.ndarray) -> np.ndarray:
        """float32[N] score from per-task probabilities float32[N, n_tasks]; NaN rows stay NaN."""
        p = np.asarray(p, dtype=np.float64)
        active = np.flatnonzero(self.weights)
        if self.space == "logit":
            z = _logit(p[:, active]) @ self.weights[active]
            e = 1.0 / (1.0 + np.exp(-z))
        else:
            e = p[:, active] @ self.weights[active]
        return e.astype(np.float32)

    def uncertainty(self, unc: np.ndarray) -> np.ndarray:
        """float32[N] uncertainty of the source task."""
        return np.asarray(unc, dtype=np.float32)[:, self.source_index]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "weighted",
            "space": self.space,
            "weights": {t: float(w) for t, w in zip(self.tasks, self.weights, strict=True) if w > 0},
            "uncertainty_source": self.source,
        }

