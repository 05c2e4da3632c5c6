"""The promotion gate: is the candidate at least as good as the served model on traffic it never saw?

Steps (a failed 1 or 2 refuses):

1. the candidate bundle verifies (manifest, every file's sha256, feature spec);
2. fidelity on the gate window (`gate_fidelity`: teacher vs student, label-free checks with
   bootstrap intervals, a failure only beyond its interval; a serving-only candidate falls back
   to the acceptance recorded at distillation): `required` (default), or `no-regression`;
3. value: both models are replayed through the worker's engine (`training/replay.py`) on the
   newest logged window NOT used in training (rows with ts_ms > the candidate's lineage
   `data_to_ms`), at the live targets (Redis, else `--ratio`), by the same controller. The value
   (the score function's weights over each task's share of positives kept) is estimated as a
   PAIRED difference candidate - current on the same rows (`task_contributions`: rows where the
   two agree add 0; doubly robust with the logged pass probabilities), with one set of paired
   resamples for the value, every task's guard rail and the MDE (`paired_value`: the positives
   only the explore slice shows drawn from their Poisson confidence distribution inside it).
4. decision (`decide`): refuse when the value is worse beyond the interval or a guard rail fails;
   promote when it is non-inferior (lower bound > -delta) and every guard rail holds; else
   inconclusive (exit 4), with the minimum detectable effect and the traffic that would decide.

The result (both estimates, the interval, fidelity, window, rows, targets) goes to
`<candidate>/gate.json`; `rta model show` prints it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model import bundle, registry
from stream.errors import BundleError, ConfigError, DataError
from stream.policy import ScorePolicy, Targets
from training.churn import flips, load_window, replay_pair
from training.logs import Attribution, newest_logged_ts_ms
from training.replay import Scored, Step, _finite, _logged, bootstrap_sums

FIDELITY_MODES = ("required", "no-regression")
EXPLORE_INTERVALS = ("gamma", "bootstrap", "widening")
REWARD_MODELS = ("binned", "scaled")


@dataclass
class GateConfig:
    """How the gate judges (the `rta model promote` / `rta retrain` flags)."""

    task: str | None = None  # None: the task the score function weighs most
    boot: int = 1000
    confidence: float = 0.95
    min_positives: int = 10
    fidelity: str = "required"
    seed: int = 0
    speedup: float = 1.0
    window_hours: float | None = None  # only the newest hours of the holdout (None: all of it)
    non_inferiority: float = 0.01  # delta: promote while the value's lower bound > -delta * current's value
    guard_margin: float = 0.05  # a task's kept positives may not drop by more than this share of current's
    guards: tuple[str, ...] | None = None  # tasks with a guard rail (None: every task the value weighs)
    fidelity_rows: int = 20_000  # rows of the window the teacher re-scores for fidelity (sampled)
    fidelity_boot: int = 200
    fidelity_min_positives: int = 50  # a label-based fidelity check gates only with this many
    window_fidelity: bool = True  # False: the acceptance recorded at distillation (no re-scoring)
    # the interval of the rows seen only through the explore slice: "gamma" (one coherent
    # interval: their positive count drawn from its Poisson confidence distribution inside the
    # paired bootstrap), "bootstrap" (rows resampled only) or "widening" (the bootstrap bound plus
    # an exact Poisson shortfall per side, added linearly: session 1's rule, kept to compare)
    explore_interval: str = "gamma"
    reward_model: str = "binned"  # DR's q: "binned" (calibrated per bin of q on seen rows), "scaled" (one factor)

    def guard_tasks(self, tasks: dict[str, Any]) -> list[str]:
        return [t for t in tasks if (self.guards is None and tasks[t].get("weight", 0) > 0)
                or (self.guards is not None and t in self.guards)]

    def __post_init__(self) -> None:
        if self.fidelity not in FIDELITY_MODES:
            raise ConfigError(f"--fidelity must be one of {', '.join(FIDELITY_MODES)}, got {self.fidelity!r}")
        if self.boot < 100 or not 0.5 < self.confidence < 1 or self.min_positives < 1:
            raise ConfigError("gate: bootstrap >= 100, 0.5 < confidence < 1 and min positives >= 1")
        if self.window_hours is not None and not self.window_hours > 0:
            raise ConfigError(f"--window-hours must be > 0, got {self.window_hours}")
        if self.explore_interval not in EXPLORE_INTERVALS:
            raise ConfigError(f"explore interval must be one of {', '.join(EXPLORE_INTERVALS)}, "
                              f"got {self.explore_interval!r}")
        if self.reward_model not in REWARD_MODELS:
            raise ConfigError(f"reward model must be one of {', '.join(REWARD_MODELS)}, got {self.reward_model!r}")
        if not 0 <= self.non_inferiority < 1 or not 0 <= self.guard_margin < 1:
            raise ConfigError("--non-inferiority and --guard-margin must be shares in [0, 1)")


def live_targets(settings: Any, ratio: float | None, p_u: float = 0.0, epsilon: float = 0.0) -> tuple[Targets, str]:
    """The live targets from Redis when it answers and holds some; else `--ratio` (with p_u,
    epsilon as given); neither is a one-line error."""
    from stream.config import redact
    from stream.window import RedisStore, StoreUnavailable

    why = "no targets set"
    try:
        store = RedisStore.from_url(settings.redis_url, settings.redis_prefix, socket_timeout=2.0,
                                    connect_timeout=2.0)
        found, _ = store.get_targets()
        if found is not None:
            return found, f"redis {redact(settings.redis_url)}"
    except StoreUnavailable as exc:
        why = f"unreachable ({exc})"
    if ratio is None:
        raise ConfigError(f"no live r: Redis at {redact(settings.redis_url)} {why}; pass --ratio R")
    return Targets(ratio, p_u, epsilon), "--ratio"


def _trained_until(bundle_dir: Path, logs: str | None, depth: int = 8) -> int | None:
    """Newest row of `logs` that a bundle or the ancestors it learnt from (parent warm start,
    anchor) trained on, from their lineage: a warm-started candidate knows what its parent saw.
    Only lineage on the same log set counts (another set's ts_ms are other rows)."""
    seen: list[int] = []
    todo, done = [bundle_dir], set()
    while todo and len(done) < depth:
        d = todo.pop()
        if d in done or not (d / bundle.MANIFEST).is_file():
            continue
        done.add(d)
        lin = registry.lineage(d)
        if lin.get("data_to_ms") is not None and lin.get("logs") == logs:
            seen.append(int(lin["data_to_ms"]))
        todo += [d.parent / str(v) for v in (lin.get("parent"), lin.get("anchor")) if v]
    return max(seen) if seen else None


def holdout_start(candidate: Path, given_ms: int | None, current: Path | None = None) -> tuple[int, str]:
    """First ts_ms of the gate's window: after the newest row that the candidate, its ancestors
    or the current model trained on (a window either has seen is no test of either)."""
    if given_ms is not None:
        return given_ms, "--holdout-from-ms"
    lin = registry.lineage(candidate)
    if lin.get("data_to_ms") is not None:
        found = (_trained_until(candidate, lin.get("logs")),
                 _trained_until(current, lin.get("logs")) if current is not None else None)
        newest = max([int(lin["data_to_ms"]), *(t for t in found if t is not None)])
        return newest + 1, ("lineage data_to_ms" if newest == int(lin["data_to_ms"])
                            else "lineage data_to_ms of an ancestor or the current model")
    newest = newest_logged_ts_ms(lin["logs"]) if lin.get("logs") else None
    if newest is not None:
        return newest + 1, f"newest row of the training logs {lin['logs']} (no lineage window recorded)"
    raise DataError(f"{candidate}: no lineage data_to_ms and its training logs are not readable; "
                    "pass --holdout-from-ms to say which rows it did not train on")


def gate_task(manifest: dict[str, Any], task: str | None) -> str:
    tasks = list(manifest["tasks"])
    if task is not None:
        if task not in tasks:
            raise ConfigError(f"--task {task!r} is not one of the bundle's tasks {tasks}")
        return task
    weights = (manifest.get("score_function") or {}).get("weights") or {}
    weighted = {t: w for t, w in weights.items() if t in tasks and isinstance(w, int | float)}
    return max(weighted, key=lambda t: weighted[t]) if weighted else tasks[-1]


def window_fidelity_of(bundle_dir: Path, manifest: dict[str, Any], window: Any, cfg: GateConfig
                       ) -> dict[str, Any] | None:
    """Teacher vs student of one bundle on (a sample of) the gate window, with intervals
    (`training.fidelity.window_fidelity`); None for a serving-only bundle (no teacher)."""
    from training.pipeline import TEACHER_FILE

    if not (bundle_dir / TEACHER_FILE).is_file():
        return None
    from stream.scorer import Scorer
    from training.distill import _measure
    from training.fidelity import window_fidelity
    from training.pipeline import load_teacher, teacher_predict

    rng = np.random.default_rng(cfg.seed)
    n = len(window)
    sub = window.take(np.sort(rng.choice(n, min(n, cfg.fidelity_rows), replace=False)))
    model, swag, pre, meta = load_teacher(bundle_dir)
    pred = teacher_predict(model, swag, pre, sub, meta["profile"], seed=cfg.seed)
    unc = manifest.get("uncertainty") or {}
    t_u = _measure(pred, unc.get("measure", "prob_var"))
    s_p, s_u = Scorer.load(bundle_dir).run(["p", "u_ambiguity" if unc.get("novelty") else "u"], sub.num, sub.cat)
    return window_fidelity(np.asarray(pred.mean), t_u, s_p, s_u, sub.labels, list(manifest["tasks"]),
                           ScorePolicy.from_manifest(manifest).source, boot=cfg.fidelity_boot,
                           confidence=cfg.confidence, seed=cfg.seed, min_positives=cfg.fidelity_min_positives)


def gate_fidelity(cand_dir: Path, cand_manifest: dict[str, Any], cur_dir: Path, cur_manifest: dict[str, Any],
                  window: Any, cfg: GateConfig) -> dict[str, Any]:
    """Fidelity measured on the gate window (a failure must be beyond its interval); a
    candidate without a teacher falls back to the acceptance recorded at distillation."""
    cand = window_fidelity_of(cand_dir, cand_manifest, window, cfg) if cfg.window_fidelity else None
    if cand is None:
        return {**fidelity_check(cand_manifest, cur_manifest, cfg.fidelity), "source": "recorded at distillation"}
    out: dict[str, Any] = {"mode": cfg.fidelity, "source": "gate window", "candidate": cand}
    failed = cand["failed"]
    if cfg.fidelity == "no-regression":
        cur = window_fidelity_of(cur_dir, cur_manifest, window, cfg)
        out["current"] = cur
        held = set() if cur is None else {c["check"] for c in cur["checks"] if c["passed_point"]}
        failed = [c for c in failed if c in held]
    out.update(passed=not failed, failed=failed)
    if failed:
        detail = {c["check"]: c for c in cand["checks"]}
        what = ", ".join(f"{k} ({detail[k]['value']:.3f} [{detail[k]['ci'][0]:.3f}, {detail[k]['ci'][1]:.3f}])"
                         for k in failed)
        out["why"] = (f"fidelity failed beyond its interval on the gate window: {what}" if cfg.fidelity == "required"
                      else f"fidelity regressed beyond its interval: {what} pass for the current model")
    return out


def fidelity_check(candidate: dict[str, Any], current: dict[str, Any] | None, mode: str) -> dict[str, Any]:
    """The student's recorded acceptance against the gate's fidelity mode."""
    cand = (candidate.get("metrics", {}).get("fidelity") or {}).get("acceptance")
    cur = None if current is None else (current.get("metrics", {}).get("fidelity") or {}).get("acceptance")
    out: dict[str, Any] = {"mode": mode, "candidate": cand, "current": cur}
    if not isinstance(cand, dict):
        out.update(passed=False, why="the candidate records no fidelity acceptance (no student metrics)")
        return out
    checks = {k: v for k, v in cand.items() if k != "passed"}
    if mode == "required":
        failed = [k for k, v in checks.items() if not v]
    else:
        held = {k for k, v in (cur or {}).items() if k != "passed" and v}
        failed = [k for k in sorted(held) if not checks.get(k, False)]
    out.update(passed=not failed, failed=failed)
    if failed:
        out["why"] = (f"fidelity acceptance failed: {', '.join(failed)}" if mode == "required"
                      else f"fidelity regressed: {', '.join(failed)} pass for the current model, not the candidate")
    return out


def logging_pass_probability(sc: Scored) -> tuple[np.ndarray, np.ndarray]:
    """(logged action passed bool[N], P(logging policy passes the row) float64[N]) in scored
    order, from the logged fields only (so it stays right after a rollback, or when the model
    that logged is not `current`).

    The policy (`stream.policy.decide`): an invalid row always passes; a valid one passes if
    explored (probability epsilon) or if the rule passes it (u >= tau_u or score >= threshold).
    So P(pass) = 1 where the rule passes and epsilon where it blocks. epsilon is the logged
    propensity of an explore row and 1 - propensity of a rule-path row; the rule's verdict on
    an explore row is recomputed from its logged score, uncertainty and thresholds."""
    d = sc.logs.decisions.take(pa.array(sc.order))

    def num(name: str) -> np.ndarray:
        return pc.fill_null(d.column(name).cast(pa.float64()), math.nan).to_numpy(zero_copy_only=False)

    def words(name: str, value: str) -> np.ndarray:
        return pc.fill_null(pc.equal(d.column(name), value), False).to_numpy(zero_copy_only=False)

    passed = words("decision", "pass")
    explore = words("reason", "explore")
    forced = words("reason", "invalid") | words("reason", "nan_output")
    prop = num("propensity")
    eps = np.where(explore, prop, 1.0 - prop)
    with np.errstate(invalid="ignore"):
        rule_pass = (num("uncertainty") >= num("tau_u")) | (num("score") >= num("threshold"))
    rule_pass = np.where(explore, rule_pass, passed)  # a rule-path row's decision is the rule's
    p_pass = np.where(forced, 1.0, np.where(rule_pass, 1.0, eps))
    return passed, p_pass


def expected_pass(sc: Scored, run: Any, epsilon: float) -> np.ndarray:
    """A replayed model's probability of passing each row, epsilon + (1 - epsilon) * rule, with its
    rule (u >= tau_u or e >= theta, at the thresholds its replay held for the row) on EVERY row,
    explored or not. Its own explore draws would differ from the log's by chance on ~2 epsilon
    of the rows (the demo's window: 8.9 % of rows), half of them seen only through the explore
    slice; and crediting both models with the logged explore rows would leave every row where
    their rules differ unexplored, so never corrected. With the rule on every row, the logged
    explore rows are the uniform sample that shows what the rows only one rule passes hold."""
    e, u = sc.e.astype(np.float64), sc.u.astype(np.float64)
    ok = sc.valid & np.isfinite(e) & np.isfinite(u)
    with np.errstate(invalid="ignore"):
        rule = (u >= run.tau_u) | (e >= run.theta)
    return np.where(ok, epsilon + (1.0 - epsilon) * rule, 1.0)


@dataclass
class TaskContrib:
    """Per-row contributions of one task to the paired estimate (rows: the task's population)."""

    dr: np.ndarray  # doubly robust difference candidate - current
    ips: np.ndarray  # inverse-propensity difference
    den: np.ndarray  # inverse-propensity weight of an observed row (self-normalisation)
    cur: float  # current's kept positives (DR)
    positives: float  # positives in the population (DR)
    population: int
    observed: int  # rows whose label the difference reads (passed, matured)
    discordant_positives: int  # observed positives where the two models disagree
    # rows the two models disagree on that the logging policy passes only when it explores:
    # (explored positives seen, mean 1 / P(pass), unseen rows) on the candidate's side (+) and current's (-)
    explore_only: tuple[tuple[int, float, int], tuple[int, float, int]] = ((0, 0.0, 0), (0, 0.0, 0))
    # the part of `dr` those explored positives carry (their (k_c - k_u) / P(pass)), per row, and
    # per side the signed contribution of one such positive: the interval draws their count
    # from its Poisson confidence distribution instead of resampling k rows
    dr_explore_pos: np.ndarray | None = None
    explore_unit: tuple[float, float] = (0.0, 0.0)


def calibrate(r: np.ndarray, y: np.ndarray, inv: np.ndarray, seen: np.ndarray, how: str = "binned",
              bins: int = 10) -> np.ndarray:
    """The reward model q for DR, fitted on the rows whose label is seen (matured, passed),
    weighted by 1 / P(logged pass) so the fit speaks for the whole population. "scaled": one
    factor (its weighted mean matches the labels'); "binned": the weighted positive rate per
    decile of r among the seen rows (a calibration curve; no monotone fit needed at 10 bins).
    Any q keeps DR unbiased; a calibrated one lowers its variance where q carries information."""
    sq = float((inv * r)[seen].sum())
    if sq <= 0:
        return r
    scaled = np.clip(r * (float((inv * y)[seen].sum()) / sq), 0.0, 1.0)
    if how == "scaled" or seen.sum() < 20 * bins:
        return scaled
    edges = np.unique(np.quantile(r[seen], np.linspace(0, 1, bins + 1)[1:-1]))
    b_all = np.searchsorted(edges, r, side="right")
    b_seen = b_all[seen]
    den = np.bincount(b_seen, weights=inv[seen], minlength=len(edges) + 1)
    num = np.bincount(b_seen, weights=(inv * y)[seen], minlength=len(edges) + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(den > 0, num / den, np.nan)
    return np.where(np.isfinite(rate[b_all]), rate[b_all], scaled)


def task_contributions(sc: Scored, j: int, pass_c: np.ndarray, pass_u: np.ndarray,
                       logged: tuple[np.ndarray, np.ndarray] | None, q_cand: np.ndarray | None = None,
                       reward_model: str = "binned") -> TaskContrib:
    """The paired value difference of task j, row by row.

    Value of a filter = positives it passes. Difference = sum over rows of (k_c - k_u) * y:
    rows where the two agree add exactly 0. On logged traffic y is seen only where the logging
    policy passed and the window closed: IPS weighs those rows by 1 / P(logged pass); DR adds a
    reward model q (the logging model's own p of the task, logged as `p_<task>`) for every row
    and corrects it where y is seen: (k_c - k_u) * (q + [seen] / P(pass) * (y - q)). On the rows
    only the candidate passes, q is the candidate's own p (`q_cand`, scored order) when given: the
    logging model's p is lowest exactly on the rows it blocks (a new source it never saw), and any
    q keeps DR unbiased; a better one only lowers its variance. Each q is calibrated on the seen
    rows (`calibrate`). A world log (every label) is its own truth: q = y, P = 1."""
    y_all = sc.logs.labels[sc.order, j].astype(np.float64)
    diff = pass_c.astype(np.float64) - pass_u.astype(np.float64)
    if logged is None:
        pop = np.isfinite(y_all)
        y = np.nan_to_num(y_all)
        seen, p_pass, q = pop, np.ones(len(y)), y
    else:
        passed, p_pass = logged
        info = sc.logs.info
        as_of = info.get("as_of_ms", int(sc.ts_ms.max()))
        w_ms = info.get("attribution_windows_s", {}).get(sc.tasks[j], 0.0) * 1000.0
        pop = (as_of - sc.ts_ms) >= w_ms  # the rows whose label could have matured
        seen = pop & passed & np.isfinite(y_all) & (p_pass > 0)
        y = np.nan_to_num(y_all)
        q = np.clip(np.nan_to_num(_logged(sc, f"p_{sc.tasks[j]}")), 0.0, 1.0) \
            if f"p_{sc.tasks[j]}" in sc.logs.decisions.column_names else np.zeros(len(y))
    inv = np.where(seen, 1.0 / np.where(seen, p_pass, 1.0), 0.0)
    q_diff = q
    if logged is not None:
        # a miscalibrated q keeps DR unbiased but, times 1 / epsilon on the explore rows,
        # inflates its variance far past IPS's: calibrate it on the seen rows
        q = calibrate(q, y, inv, seen, reward_model)
        q_diff = q if q_cand is None else np.where(
            diff > 0, calibrate(np.clip(np.nan_to_num(q_cand), 0, 1), y, inv, seen, reward_model), q)
    dr = np.where(pop, diff * (q_diff + inv * (y - q_diff)), 0.0)
    ips = np.where(pop, diff * inv * y, 0.0)
    den = np.where(pop, inv, 0.0)
    kept_u = pass_u.astype(np.float64) * (q + inv * (y - q))
    rare = pop & (p_pass < 1)  # seen only through the explore slice
    pos = rare & seen & (y > 0) & (diff != 0)

    def side(on: np.ndarray) -> tuple[int, float, int]:
        rows = rare & on
        return (int((pos & rows).sum()), float(np.mean(1.0 / p_pass[rows])) if rows.any() else 0.0,
                int((rows & ~seen).sum()))

    def unit(on: np.ndarray) -> float:  # one explored positive's contribution on that side
        rows = rare & on
        if (pos & rows).any():
            return float(np.mean((diff * inv)[pos & rows]))
        return float(np.mean(diff[rows] / p_pass[rows])) if rows.any() else 0.0

    return TaskContrib(dr=dr, ips=ips, den=den, cur=float(kept_u[pop].sum()),
                       positives=float((q + inv * (y - q))[pop].sum()), population=int(pop.sum()),
                       observed=int(seen.sum()), discordant_positives=int((seen & (diff != 0) & (y > 0)).sum()),
                       explore_only=(side(diff > 0), side(diff < 0)),
                       dr_explore_pos=np.where(pos, diff * inv * y, 0.0),
                       explore_unit=(unit(diff > 0), unit(diff < 0)))


def poisson_widening(k: int, weight: float, confidence: float) -> float:
    """How far a percentile bootstrap's bound falls short of an exact Poisson bound when the
    explore slice holds only k positives of a side (in weighted counts). Session 1's rule
    (`explore_interval="widening"`), kept to compare: added to the bootstrap's bound of the
    whole difference it double-counts the explore noise the bootstrap already holds."""
    from statistics import NormalDist

    from scipy.stats import chi2

    alpha = 1 - confidence
    z = NormalDist().inv_cdf(1 - alpha / 2)
    exact = float(chi2.ppf(1 - alpha / 2, 2 * k + 2)) / 2
    return max(0.0, exact - k - z * math.sqrt(k)) * weight


def score_weights(manifest: dict[str, Any]) -> dict[str, float]:
    """The value's task weights: the bundle's score function (normalised), `stream.policy`."""
    pol = ScorePolicy.from_manifest(manifest)
    return {t: float(w) for t, w in zip(pol.tasks, pol.weights, strict=True) if w > 0}


def _quantiles(b: np.ndarray, confidence: float) -> list[float]:
    b = b[np.isfinite(b)]
    if not len(b):
        return [math.nan, math.nan]
    lo = (1 - confidence) / 2
    return [float(np.quantile(b, lo)), float(np.quantile(b, 1 - lo))]


def explore_count_draws(k: int, u: np.ndarray, cap: float) -> np.ndarray:
    """Draws of the expected count of positives a side's explore slice stands for, given k seen:
    the Poisson mean's confidence distribution Gamma(k + 1/2) (mid-p: between Gamma(k), whose
    quantile is Garwood's exact lower bound, and Gamma(k + 1), his upper), at the shared
    uniforms u; capped by what the side's rows could hold. With k = 0 a resample of the rows
    says "exactly 0"; this says "up to ~2.5 at 95 %"."""
    from scipy.stats import gamma

    return np.minimum(gamma.ppf(u, k + 0.5), cap)


def paired_value(contrib: dict[str, TaskContrib], weights: dict[str, float], boot: int, confidence: float,
                 seed: int, explore_interval: str = "gamma") -> dict[str, Any]:
    """The value difference candidate - current (score-function-weighted share of each task's
    positives kept, DR), per-task differences (guard rails), IPS and self-normalised IPS as
    checks; percentile intervals from one paired bootstrap of the rows (`replay.bootstrap_sums`:
    rows where the models agree are one group, so a resample costs O(discordant rows)).

    `explore_interval` "gamma" (default): the positives seen on rows only the explore slice
    shows are not resampled as rows; per side (candidate-only, current-only) their count is
    drawn from `explore_count_draws` in each resample, with ONE uniform per side shared by every
    task (the funnel nests: a deal row is an online row; sharing is the conservative choice), so
    the value, each guard rail and the MDE read one coherent set of replicates. "bootstrap":
    rows only. "widening": rows, then each side's exact-Poisson shortfall added to the bounds."""
    mode = explore_interval
    tasks = list(contrib)
    gamma = mode == "gamma"

    def rest(c: TaskContrib) -> np.ndarray:
        return c.dr - c.dr_explore_pos if gamma and c.dr_explore_pos is not None else c.dr

    cols = np.stack([c for t in tasks for c in (rest(contrib[t]), contrib[t].ips, contrib[t].den)], axis=1)
    live = np.any(cols != 0, axis=1)
    rows, m = cols[live], len(cols)
    # the rows all zero are one more group: pad it so the multinomial draws over all m rows
    if live.sum() < m:
        rows = np.vstack([rows, np.zeros((m - int(live.sum()), cols.shape[1]))])
    rng = np.random.default_rng(seed)
    sums = np.vstack([bootstrap_sums(rows, min(200, boot - s), rng) for s in range(0, boot, 200)])
    u_side = rng.random((len(sums), 2))  # one uniform per resample and side, shared by the tasks
    scale = {t: (weights.get(t, 0.0) / contrib[t].positives if contrib[t].positives > 0 else 0.0) for t in tasks}
    cur_value = sum(scale[t] * contrib[t].cur for t in tasks)
    out: dict[str, Any] = {"tasks": {}}
    val_b = np.zeros(len(sums))
    val = 0.0
    widen = [0.0, 0.0]  # (lower, upper) widening of the value interval ("widening" only)
    for i, t in enumerate(tasks):
        c = contrib[t]
        dr_b, ips_b, den_b = sums[:, 3 * i], sums[:, 3 * i + 1], sums[:, 3 * i + 2]
        with np.errstate(invalid="ignore", divide="ignore"):
            sn_b = c.population * ips_b / den_b
        d = float(c.dr.sum())
        (k_up, w_up, n_up), (k_down, w_down, n_down) = c.explore_only
        wide_lo = wide_hi = 0.0
        if gamma:
            for s, (k, n) in enumerate(((k_up, n_up), (k_down, n_down))):
                unit = c.explore_unit[s]
                if unit != 0:
                    dr_b = dr_b + unit * explore_count_draws(k, u_side[:, s], k + n / max(abs(unit), 1.0))
        elif mode == "widening":
            # never more than the unseen rows of that side could hold (one positive each)
            wide_hi = min(poisson_widening(k_up, w_up, confidence), n_up) if w_up else 0.0
            wide_lo = min(poisson_widening(k_down, w_down, confidence), n_down) if w_down else 0.0
        sn = c.population * float(c.ips.sum()) / float(c.den.sum()) if c.den.sum() > 0 else math.nan
        val += scale[t] * d
        val_b += scale[t] * dr_b
        widen[0] += scale[t] * wide_lo
        widen[1] += scale[t] * wide_hi
        ci = _quantiles(dr_b, confidence)
        ci = [ci[0] - wide_lo, ci[1] + wide_hi]
        out["tasks"][t] = {
            "weight": weights.get(t, 0.0), "population": c.population, "observed": c.observed,
            "positives": round(c.positives, 2), "discordant_positives": c.discordant_positives,
            "current": round(c.cur, 3), "candidate": round(c.cur + d, 3),
            "difference": d, "difference_ci": ci, "se": float(np.std(dr_b, ddof=1)) if len(dr_b) > 1 else math.nan,
            "relative": d / c.cur if c.cur > 0 else math.nan,
            "relative_ci": [v / c.cur for v in ci] if c.cur > 0 else [math.nan, math.nan],
            "explore_only_positives": {"candidate_side": k_up, "current_side": k_down},
            "poisson_widening": [wide_lo, wide_hi],
            "ips": float(c.ips.sum()), "ips_ci": _quantiles(ips_b, confidence),
            "snips": sn, "snips_ci": _quantiles(sn_b, confidence),
        }
    se = float(np.std(val_b, ddof=1)) if len(val_b) > 1 else math.nan
    vci = _quantiles(val_b, confidence)
    how = {"gamma": "the positives only the explore slice shows drawn from their Poisson confidence distribution "
                    "(Gamma(k + 1/2)) inside the same resamples",
           "bootstrap": "rows resampled only",
           "widening": "bounds widened to an exact Poisson bound where the explore slice holds few positives"}[mode]
    out.update(current=cur_value, candidate=cur_value + val, difference=val,
               difference_ci=[vci[0] - widen[0], vci[1] + widen[1]], se=se,
               relative=val / cur_value if cur_value > 0 else math.nan,
               rows=m, discordant_rows=int(live.sum()), bootstrap=boot, confidence=confidence,
               explore_interval=mode,
               estimator=f"doubly robust (reward model: calibrated p), paired bootstrap of the rows; {how}",
               unit="score-weighted share of each task's positives kept")
    return out


# z of a two-sided 95% interval and of 80% power: MDE = (z_a + z_b) * se
_Z_POWER = 0.8416


def decide(value: dict[str, Any], cfg: GateConfig, window_hours: float) -> dict[str, Any]:
    """Promote / refuse / inconclusive (module docstring), the minimum detectable effect at this
    sample and how much more traffic would resolve an inconclusive one."""
    from statistics import NormalDist

    d, (lo, hi), cur = value["difference"], value["difference_ci"], value["current"]
    delta = cfg.non_inferiority * cur
    z = NormalDist().inv_cdf(0.5 + cfg.confidence / 2)
    # the interval's half-width (bootstrap, widened where the explore slice is thin) as z * se
    mde = (z + _Z_POWER) * (hi - lo) / (2 * z) if math.isfinite(hi - lo) else math.nan
    rails, broken, unsure = {}, [], []
    for t, v in value["tasks"].items():
        if t not in cfg.guard_tasks(value["tasks"]):
            continue
        floor = -cfg.guard_margin * v["current"]
        r_lo, r_hi = v["difference_ci"]
        state = "holds" if r_lo > floor else ("fails" if r_hi < floor else "unsure")
        rails[t] = {"margin": cfg.guard_margin, "floor": floor, "difference_ci": [r_lo, r_hi], "state": state}
        (broken if state == "fails" else unsure if state == "unsure" else []).append(t)
    # the MDE of promotion: from the lower side alone (what "promote" reads)
    mde_lo = (z + _Z_POWER) * (d - lo) / z if math.isfinite(d - lo) else math.nan
    out: dict[str, Any] = {"non_inferiority_delta": delta, "guard_rails": rails,
                           "mde": mde, "mde_relative": mde / cur if cur > 0 else math.nan,
                           "mde_lower_side_relative": mde_lo / cur if cur > 0 else math.nan}
    if not all(map(math.isfinite, (d, lo, hi))):
        return {**out, "decision": "inconclusive", "why": "no estimate (no rows with matured labels)"}
    if hi < 0 or broken:
        why = (f"worse beyond the interval: value difference {d:+.4f} [{lo:+.4f}, {hi:+.4f}]" if hi < 0 else
               f"guard rail broken beyond the interval: {', '.join(broken)} drops more than "
               f"{cfg.guard_margin:.0%} of current's kept positives")
        return {**out, "decision": "refuse", "why": why}
    if lo > -delta and not unsure:
        return {**out, "decision": "promote", "why": f"non-inferior: lower bound {lo:+.4f} > -{delta:.4f} "
                                                     f"({cfg.non_inferiority:.0%} of current's value)"}
    # inconclusive: the interval's lower side must shrink to d + delta (to promote) or its upper
    # side to |d| (to refuse); each shrinks as 1/sqrt(rows). The sides differ: the explore-only
    # draws make the interval skewed
    half, target = (d - lo, d + delta) if d + delta > 0 else (hi - d, -d)
    factor = (half / target) ** 2 if target > 0 else math.inf
    more = max(factor - 1.0, 0.0)
    why = (f"inconclusive: value difference {d:+.4f} [{lo:+.4f}, {hi:+.4f}] neither excludes -{delta:.4f} "
           f"nor 0" if not unsure else f"inconclusive: guard rail {', '.join(unsure)} neither holds nor fails")
    return {**out, "decision": "inconclusive", "why": why, "more_traffic_factor": factor,
            "more_hours": more * window_hours if math.isfinite(more) else math.inf}


def run_gate(candidate: str | Path, current: str | Path, logs: str | Path, targets: Targets,
             cfg: GateConfig | None = None, attribution: Attribution | None = None,
             holdout_from_ms: int | None = None, targets_source: str = "given",
             write: bool = True) -> dict[str, Any]:
    """Judge `candidate` against `current` (bundle dirs); the result dict (also gate.json)."""
    cfg = cfg or GateConfig()
    cand_dir, cur_dir = Path(candidate), bundle.resolve_bundle(current)
    result: dict[str, Any] = {"candidate": cand_dir.name, "current": cur_dir.name,
                              "gated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "targets": {**targets.to_dict(), "source": targets_source}, "reasons": []}
    reasons: list[str] = result["reasons"]
    try:
        cand_manifest = registry.verify(cand_dir)
        result["verification"] = "ok"
    except BundleError as exc:
        result.update(verification=str(exc), passed=False, decision="refuse")
        reasons.append(f"bundle verification failed: {exc}")
        result = _finite(result)
        if write and (cand_dir / bundle.MANIFEST).is_file():
            registry.write_gate(cand_dir, result)
        return result
    cur_manifest = bundle.read_manifest(cur_dir)
    from_ms, from_source = holdout_start(cand_dir, holdout_from_ms, cur_dir)
    window = load_window(logs, tuple(cand_manifest["tasks"]), attribution, from_ms)
    if cfg.window_hours is not None:
        window = load_window(window, window.tasks, None, int(window.ts_ms.max() - cfg.window_hours * 3_600_000))
    logged = window.decisions is not None
    if not logged and window.masked:
        raise DataError(f"{window.source}: the gate needs logged traffic (an `rta log` layout) or a world log "
                        "with every label")
    fid = gate_fidelity(cand_dir, cand_manifest, cur_dir, cur_manifest, window, cfg)
    result["fidelity"] = fid
    if not fid["passed"]:
        reasons.append(fid["why"])
    step = Step(targets.r, targets.p_u, targets.epsilon)
    sc_c, run_c, sc_u, run_u = replay_pair(cand_dir, cur_dir, window, step, cfg.seed, cfg.speedup)
    task = gate_task(cand_manifest, cfg.task)
    tasks = list(cand_manifest["tasks"])
    logged_pass = logging_pass_probability(sc_c) if logged else None
    pass_c, pass_u = (~run_c.block, ~run_u.block) if not logged else (
        expected_pass(sc_c, run_c, targets.epsilon), expected_pass(sc_u, run_u, targets.epsilon))
    contrib = {t: task_contributions(sc_c, j, pass_c, pass_u, logged_pass, sc_c.p[:, j], cfg.reward_model)
               for j, t in enumerate(tasks)}
    weights = score_weights(cand_manifest)
    if cfg.task is not None:  # --task: the value is that task alone
        weights = {cfg.task: 1.0}
    value = paired_value(contrib, weights, cfg.boot, cfg.confidence, cfg.seed, explore_interval=cfg.explore_interval)
    span_h = max(float(window.ts_ms.max() - window.ts_ms.min()) / 3.6e6, 1e-9)
    verdict = decide(value, cfg, span_h)
    observed_pos = int(np.nansum(window.labels[:, tasks.index(task)]))
    if observed_pos < cfg.min_positives and verdict["decision"] == "promote":
        verdict.update(decision="inconclusive", why=(
            f"not enough evidence: {observed_pos} matured {task} positives in the window "
            f"(need {cfg.min_positives})"))
    est = {"task": task, "decision": verdict["decision"], "value": value["difference"],
           "value_ci": value["difference_ci"], "value_current": value["current"],
           "value_relative": value["relative"], "mde_relative": verdict["mde_relative"],
           **{k: value["tasks"][task].get(k) for k in ("candidate", "current", "difference", "difference_ci")},
           "positives_in_sample": observed_pos}
    result.update(
        window={"logs": window.source, "layout": "logged" if logged else "world", "from_ms": int(window.ts_ms.min()),
                "to_ms": int(window.ts_ms.max()), "rows": len(window), "holdout_from_ms": from_ms,
                "holdout_from": from_source, "labels_as_of_ms": window.info.get("as_of_ms"),
                "matured": window.info.get("matured")},
        estimate=est, value=value, verdict=verdict,
        tasks={t: {k: v.get(k) for k in ("candidate", "current", "difference", "difference_ci", "observed",
                                         "discordant_positives")} for t, v in value["tasks"].items()},
        block_share={"candidate": float(run_c.block.mean()), "current": float(run_u.block.mean())},
        churn={k: v for k, v in flips(run_u, run_c).items() if k in ("share", "pass_to_block", "block_to_pass")},
    )
    if verdict["decision"] != "promote":
        reasons.append(verdict["why"])
    # a fidelity failure refuses; an inconclusive value stays inconclusive unless something refuses
    result["decision"] = "refuse" if not fid["passed"] else verdict["decision"]
    result["passed"] = result["decision"] == "promote"
    result = _finite(result)
    if write:
        registry.write_gate(cand_dir, result)
    return result


DECISION_WORDS = {"promote": "passed", "refuse": "refused", "inconclusive": "inconclusive"}


def outcome_line(result: dict[str, Any]) -> str:
    """One line for the terminal: the decision, the value difference with its interval, the
    gate task's kept positives, the MDE."""
    decision = result.get("decision") or ("promote" if result.get("passed") else "refuse")
    parts = [f"{result['candidate']} vs {result['current']}: {DECISION_WORDS[decision]}"]
    est, value = result.get("estimate"), result.get("value")
    if value and value.get("difference") is not None and value.get("current") \
            and None not in (value.get("difference_ci") or [None]):
        cur = value["current"]
        lo, hi = value["difference_ci"]
        parts.append(f"value {value['candidate']:.4f} vs {cur:.4f}, difference {value['difference'] / cur:+.2%} "
                     f"[{lo / cur:+.2%}, {hi / cur:+.2%}] of current's"
                     + (f", MDE {mde:.2%}" if (mde := (result.get("verdict") or {}).get("mde_relative")) is not None
                        else ""))
    if est and est.get("difference") is not None:
        lo, hi = est["difference_ci"]
        parts.append(f"{est['task']} kept {est['candidate']:.1f} vs {est['current']:.1f}, difference "
                     f"{est['difference']:+.1f} [{lo:+.1f}, {hi:+.1f}] on {result['window']['rows']} rows "
                     f"at r={result['targets']['r']:g}")
    more = (result.get("verdict") or {}).get("more_hours")
    if decision == "inconclusive" and more is not None:
        parts.append(f"about {more:.3g} h more logged traffic would resolve it")
    if result.get("reasons"):
        parts.append("; ".join(result["reasons"]))
    return "; ".join(parts)
