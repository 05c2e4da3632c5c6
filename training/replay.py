"""`rta replay`: logged traffic through the worker's own decision engine, on event time.

Analysts ask "what would the filter have done" (at other targets, with another model) and
"does replay reproduce what the live system did". Replay answers with the worker's own parts:

* the score step `stream.engine.score_batch` (the bundle's `Scorer` + `ScorePolicy`), on the
  (num, cat) matrices the worker's decoder makes (missing -> NaN / "");
* `stream.policy.decide`, in batches;
* `stream.controller.RatioController` on `stream.window.MemoryStore`, its clock driven by the
  rows' `ts_ms` (event time), so a day of traffic replays in seconds and the 30 s window, the
  0.25 s refresh cadence and the feedback integral behave as they did live.

Modes:

* ``thresholds="logged"``: every row is decided with its logged theta, tau_u and logged
  explore flag (reason ``explore``); scores are recomputed by the bundle. On the bundle that
  served the log this reproduces the live decisions row for row (`match` in the report).
* live targets: `Step(r, p_u, epsilon)`; several steps either one after another over event
  time (`sweep_mode="steps"`, each for `step_seconds` of event time) or as separate replays of
  the whole log (`sweep_mode="grid"`: one point of the operating curve each).

Evaluation (never an input to the decisions): the world's truth (a world log's `true_<task>`
columns and labels, or `--truth DIR` joined by request_id) gives value kept vs the oracle and a
random filter; a logged layout's explore slice gives off-policy estimates (`ope`).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stream.controller import ControllerConfig, RatioController
from stream.engine import score_batch
from stream.errors import ConfigError, DataError
from stream.logger.storage import LOCATION
from stream.policy import DEGRADED, REASONS, SCORE, UNCERTAIN, ScorePolicy, Targets, decide
from stream.prior import ScoreDistribution
from stream.scorer import Scorer
from stream.window import MemoryStore
from training.logs import Attribution, LogSet, load_logs

ENGINES = ("local", "ray")
SCORE_CHUNK = 2048  # rows per onnxruntime call (32k-row calls ran 1.2-1.4x slower: activations out of cache)
WARMUP_S = 30.0  # event-seconds after a step not counted in its settled share (the window)
# Automatic event-time compression (`auto_speedup`): a sparse or sampled log is run through the
# controller at AUTO_RATE rows per (compressed) event-second, but never in fewer than
# AUTO_MIN_SPAN_S event-seconds (ten windows: time to warm up and settle), and never slower
# than it was logged.
AUTO_RATE = 1000.0
AUTO_MIN_SPAN_S = 300.0
_REASON_NAMES = np.asarray(REASONS, dtype=object)


@dataclass(frozen=True)
class Step:
    """Live targets of one replay step (or one grid point)."""

    r: float
    p_u: float = 0.0
    epsilon: float = 0.0

    def targets(self) -> Targets:
        return Targets(self.r, self.p_u, self.epsilon)  # validates: infeasible -> InfeasibleTargets

    def label(self) -> str:
        return f"r={self.r:g} p_u={self.p_u:g} eps={self.epsilon:g}"


def parse_sweep(text: str, p_u: float = 0.0, epsilon: float = 0.0) -> list[Step]:
    """"r=0.2,0.3,0.5;p_u=0,0.02" -> the grid of every combination (r varies slowest)."""
    keys = {"r": "r", "ratio": "r", "p_u": "p_u", "pass_share": "p_u", "explore": "epsilon",
            "epsilon": "epsilon", "eps": "epsilon"}
    values: dict[str, list[float]] = {"r": [], "p_u": [p_u], "epsilon": [epsilon]}
    seen = set()
    for part in filter(None, (p.strip() for p in text.split(";"))):
        m = re.fullmatch(r"([a-z_]+)\s*=\s*(.+)", part)
        if not m or m.group(1) not in keys:
            raise ConfigError(f"--sweep: {part!r} is not KEY=V1,V2,... with KEY one of r, p_u, explore")
        key = keys[m.group(1)]
        try:
            values[key] = [float(v) for v in m.group(2).split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--sweep: {part!r} has a value that is not a number") from None
        if not values[key]:
            raise ConfigError(f"--sweep: {part!r} lists no value")
        seen.add(key)
    if "r" not in seen:
        raise ConfigError("--sweep needs r=..., e.g. --sweep 'r=0.2,0.3,0.5;p_u=0,0.02'")
    steps = [Step(r, q, e) for r, q, e in itertools.product(values["r"], values["p_u"], values["epsilon"])]
    for s in steps:
        s.targets()
    return steps


@dataclass
class ReplayConfig:
    """How to replay (the `rta replay` flags)."""

    thresholds: str = "live"  # "live" | "logged"
    steps: list[Step] = field(default_factory=lambda: [Step(0.3)])
    sweep_mode: str = "grid"  # "grid": one replay of the whole log each; "steps": one after another
    step_seconds: float | None = None  # steps mode: event-seconds per step (None: the span split evenly)
    batch_rows: int = 1000  # most rows per decide() call, like the worker's batch
    speedup: float | None = None  # event time runs this much faster through the controller; None: auto
    seed: int = 0  # explore draws
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    progress: bool = False
    engine: str = "local"  # "local" | "ray": where the rows are scored (training.replay_ray)
    workers: int = 2  # scoring actors with --engine ray

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.thresholds not in ("live", "logged"):
            raise ConfigError(f"--thresholds must be 'live' or 'logged', got {self.thresholds!r}")
        if self.sweep_mode not in ("steps", "grid"):
            raise ConfigError(f"--sweep-mode must be 'steps' or 'grid', got {self.sweep_mode!r}")
        if self.thresholds == "live" and not self.steps:
            raise ConfigError("live replay needs targets (--ratio or --sweep)")
        for s in self.steps:
            s.targets()
        if self.batch_rows < 1 or (self.speedup is not None and not self.speedup > 0):
            raise ConfigError("batch rows must be >= 1 and speedup > 0")
        if self.step_seconds is not None and not self.step_seconds > 0:
            raise ConfigError(f"--step-seconds must be > 0, got {self.step_seconds}")


@dataclass
class Run:
    """One replay's decisions, aligned with the scored rows (event-time order)."""

    name: str
    block: np.ndarray  # bool[N]
    reason: np.ndarray  # uint8[N] index into REASONS
    propensity: np.ndarray  # float32[N]
    theta: np.ndarray  # float64[N] in force for the row
    tau_u: np.ndarray  # float64[N]
    step: np.ndarray  # int16[N] index into `steps` (0 in logged mode)
    steps: list[Step]


@dataclass
class Scored:
    """A log set scored by the bundle, rows in event-time order."""

    logs: LogSet
    order: np.ndarray  # rows of `logs` in event-time order
    ts_ms: np.ndarray
    p: np.ndarray
    u_tasks: np.ndarray
    e: np.ndarray
    u: np.ndarray
    valid: np.ndarray
    tasks: list[str]
    model: str
    score_s: float
    prior: ScoreDistribution | None = None  # the bundle's score distribution (controller cold start)


class _Clock:
    """The controller's clock: the event time of the batch being decided."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# ---- scoring ------------------------------------------------------------------------------
def _feature_columns(logs: LogSet, scorer: Scorer) -> tuple[list[int], list[int]]:
    """The log's column of each of the bundle's numeric and categorical features, in its spec
    order. A feature the bundle needs and the log lacks is an error."""
    spec = scorer.spec
    have_num = {n: j for j, n in enumerate(logs.spec.numeric)}
    have_cat = {n: j for j, n in enumerate(logs.spec.categorical)}
    for name in spec.numeric:
        if name not in have_num:
            kind = "categorical in the log" if name in have_cat else "missing from the log"
            raise DataError(f"{logs.source}: the bundle's numeric feature {name!r} is {kind}")
    for name in spec.categorical:
        if name not in have_cat:
            kind = "numeric in the log" if name in have_num else "missing from the log"
            raise DataError(f"{logs.source}: the bundle's categorical feature {name!r} is {kind}")
    return [have_num[n] for n in spec.numeric], [have_cat[n] for n in spec.categorical]


def feature_matrices(logs: LogSet, scorer: Scorer) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's (num, cat) in its spec order from the log's columns, as the decoder makes
    them (NaN / "" = missing)."""
    num_idx, cat_idx = _feature_columns(logs, scorer)
    num = logs.num if num_idx == list(range(logs.num.shape[1])) else logs.num[:, num_idx]
    cat = logs.cat if cat_idx == list(range(logs.cat.shape[1])) else logs.cat[:, cat_idx]
    return num, cat


def feature_codes(logs: LogSet, scorer: Scorer, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(num, cat) of the rows in `order` as the graph takes them: `cat` the worker's codes
    (`stream.codes`, the bundle's vocabulary). From a loaded log's dictionary form each column's
    few distinct words are looked up once and the rows gather them (no string per row);
    otherwise the strings go through `Scorer.codes`, the worker's path. Same codes either way."""
    num_idx, cat_idx = _feature_columns(logs, scorer)
    num = logs.num[order]
    if num_idx != list(range(logs.num.shape[1])):
        num = num[:, num_idx]
    cols = logs.cat_columns
    if scorer.encoder is None or cols is None:
        _, cat = feature_matrices(logs, scorer)
        return num, scorer.codes(cat)[order]
    codes = np.empty((len(cat_idx), len(order)), np.int64)  # column by column; the chunks copy rows out
    for j, c in enumerate(cat_idx):
        codes[j] = scorer.encoder.encode_dictionary(j, cols.words[c], cols.index[c][order])
    return num, codes.T


def score_logs(logs: LogSet, scorer: Scorer, policy: ScorePolicy, progress: bool = False,
               blocks: Callable[..., Any] | None = None) -> Scored:
    """Score every row with the worker's score step, in event-time order. `blocks(num, cat,
    SCORE_CHUNK)`, if given, scores elsewhere (`training.replay_ray`): it yields (slice,
    (p, u_tasks, e, u)) in row order, chunked at the same SCORE_CHUNK boundaries as here."""
    t0 = time.perf_counter()
    if len(logs) == 0:
        raise DataError(f"{logs.source}: no rows to replay")
    if tuple(scorer.tasks) != tuple(logs.tasks):
        raise DataError(f"{logs.source}: tasks {list(logs.tasks)} differ from the bundle's {scorer.tasks}")
    order = np.argsort(logs.ts_ms, kind="stable")
    # codes before the event-time reorder and the chunks, so both move int64, not strings
    num, cat = feature_codes(logs, scorer, order)
    n, t = len(order), len(scorer.tasks)
    p = np.empty((n, t), np.float32)
    u_tasks = np.empty((n, t), np.float32)
    e = np.empty(n, np.float32)
    u = np.empty(n, np.float32)
    bar = _bar(n, "score", progress)
    chunks = blocks(num, cat, SCORE_CHUNK) if blocks is not None else (
        (sl, score_batch(scorer, policy, num[sl], cat[sl]))
        for sl in (slice(s, min(n, s + SCORE_CHUNK)) for s in range(0, n, SCORE_CHUNK)))
    for sl, out in chunks:
        p[sl], u_tasks[sl], e[sl], u[sl] = out
        bar.update(sl.stop - sl.start)
    bar.close()
    # the decoder refuses a number beyond float32 (inf after the cast): such a row was invalid live
    valid = ~np.isinf(num).any(axis=1)
    if logs.decisions is not None:
        reason = logs.decisions.column("reason").take(pa.array(order))
        valid &= ~pc.fill_null(pc.equal(reason, "invalid"), False).to_numpy(zero_copy_only=False)
    return Scored(logs, order, logs.ts_ms[order], p, u_tasks, e, u, valid, list(scorer.tasks),
                  scorer.version, time.perf_counter() - t0,
                  ScoreDistribution.from_manifest(scorer.manifest, where=f"{scorer.path}/manifest.json"))


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", unit_scale=True, desc=desc, disable=not enabled,
                file=sys.stderr, mininterval=0.5, leave=False)


# ---- deciding -----------------------------------------------------------------------------
def replay_logged(sc: Scored) -> Run:
    """Each row with its logged theta, tau_u and explore flag: the live decision, recomputed."""
    d = sc.logs.decisions
    if d is None:
        raise DataError(f"{sc.logs.source}: --thresholds logged needs a logged layout (decision columns); "
                        "this is a world log")
    take = pa.array(sc.order)
    col = {c: d.column(c).take(take) for c in ("reason", "threshold", "tau_u", "propensity")}
    reason = col["reason"]
    explore = pc.fill_null(pc.equal(reason, "explore"), False).to_numpy(zero_copy_only=False)
    degraded = pc.fill_null(pc.equal(reason, "degraded"), False).to_numpy(zero_copy_only=False)
    theta = pc.fill_null(col["threshold"], math.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    tau_u = pc.fill_null(col["tau_u"], math.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    # draw 0 < 0.5 explores, 1 does not: the logged flag, through decide() itself
    dec = decide(sc.e, sc.u, sc.valid, np.where(explore, 0.0, 1.0), theta, tau_u, 0.5)
    out_reason = dec.reason.copy()
    out_reason[degraded & np.isin(dec.stage, (SCORE, UNCERTAIN))] = DEGRADED  # score/uncertain path, degraded live
    logged_p = pc.fill_null(col["propensity"], math.nan).to_numpy(zero_copy_only=False).astype(np.float32)
    prop = np.where(np.isfinite(logged_p), logged_p, dec.propensity).astype(np.float32)
    n = len(sc.e)
    return Run("logged thresholds", dec.block, out_reason, prop, theta, tau_u, np.zeros(n, np.int16), [])


def _batches(t_s: np.ndarray, refresh_s: float, batch_rows: int, cuts: list[int]) -> np.ndarray:
    """Batch boundaries: a new batch per controller refresh slot, at most `batch_rows` rows,
    and at every step change."""
    n = len(t_s)
    slot = np.floor(t_s / refresh_s).astype(np.int64)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(slot)) + 1, cuts, [n]]).astype(np.int64)
    starts = np.unique(starts[(starts >= 0) & (starts <= n)])
    out = [starts[:1]]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        if b - a > batch_rows:
            out.append(np.arange(a + batch_rows, b, batch_rows))
        out.append(np.array([b]))
    return np.unique(np.concatenate(out)).astype(np.int64)


def auto_speedup(ts_ms: np.ndarray, rate: float = AUTO_RATE, min_span_s: float = AUTO_MIN_SPAN_S) -> float:
    """The event-time compression for a log: its rows run through the controller at `rate` rows
    per event-second, in at least `min_span_s` event-seconds, never slower than logged (>= 1).

    Why: the controller's window, refresh cadence and feedback are in event-seconds, tuned for
    live traffic at a few thousand rows/s. A 1 % sample of a week holds a few rows per window
    (below the controller's `min_rows`: it never moves) and steps through ~600k seconds, one
    nearly empty batch per refresh slot (cost per event-second). Compressed, the window holds
    thousands of rows and a batch per refresh holds hundreds: the cost follows the rows. A log
    at live density (>= `rate` rows/s, or too short for `min_span_s`) is left as it was."""
    n = len(ts_ms)
    if n < 2:
        return 1.0
    span_s = float(ts_ms.max() - ts_ms.min()) / 1000.0
    target_span = max(n / rate, min_span_s)
    return max(1.0, span_s / target_span)


def speedup_of(sc: Scored, cfg: ReplayConfig) -> float:
    """The compression a replay of `sc` uses: `cfg.speedup`, or `auto_speedup` when None."""
    return float(cfg.speedup) if cfg.speedup is not None else auto_speedup(sc.ts_ms)


def replay_live(sc: Scored, steps: list[Step], cfg: ReplayConfig, step_of_row: np.ndarray | None = None,
                name: str = "live targets") -> Run:
    """Replay with its own controller on event time; `step_of_row` says which step's targets
    hold for each row (None: the first step for every row)."""
    n = len(sc.e)
    t_s = sc.ts_ms.astype(np.float64) / 1000.0 / speedup_of(sc, cfg)
    step_of_row = np.zeros(n, np.int16) if step_of_row is None else step_of_row.astype(np.int16)
    cuts = (np.flatnonzero(np.diff(step_of_row)) + 1).tolist()
    bounds = _batches(t_s, cfg.controller.refresh_interval, cfg.batch_rows, cuts)
    clock = _Clock()
    clock.t = t_s[0]
    store = MemoryStore(cfg.controller.spec, keep_seconds=cfg.controller.window_seconds + 60,
                        targets=steps[int(step_of_row[0])].targets())
    ctl = RatioController(store, cfg.controller, clock=clock, controller_id="replay")
    # the worker's cold start: the bundle's score distribution until the window holds the log's rows
    ctl.set_model(sc.model, sc.prior if sc.prior is not None and sc.prior.spec == cfg.controller.spec else None)
    draw = np.random.default_rng(cfg.seed).random(n)
    block = np.zeros(n, bool)
    reason = np.zeros(n, np.uint8)
    prop = np.zeros(n, np.float32)
    theta = np.zeros(n, np.float64)
    tau_u = np.zeros(n, np.float64)
    current = int(step_of_row[0])
    bar = _bar(n, name, cfg.progress)
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        k = int(step_of_row[a])
        if k != current:  # a step of the sweep: what `rta ratio set` does live
            s = steps[k]
            store.update_targets("replay", f"sweep step {k}", s.r, s.p_u, s.epsilon)
            current = k
        clock.t = t_s[b - 1]
        th = ctl.thresholds()
        d = decide(sc.e[a:b], sc.u[a:b], sc.valid[a:b], draw[a:b], th.theta, th.tau_u,
                   th.targets.epsilon, th.degraded)
        ctl.observe(sc.e[a:b], sc.u[a:b], d)
        block[a:b], reason[a:b], prop[a:b] = d.block, d.reason, d.propensity
        theta[a:b], tau_u[a:b] = th.theta, th.tau_u
        bar.update(b - a)
    bar.close()
    return Run(name, block, reason, prop, theta, tau_u, step_of_row, list(steps))


def step_rows(ts_ms: np.ndarray, n_steps: int, step_seconds: float | None) -> np.ndarray:
    """Step index per row: consecutive event-time spans of `step_seconds` (the last step holds
    to the end), or the log's span split evenly."""
    t = (ts_ms - ts_ms[0]).astype(np.float64) / 1000.0
    span = max(float(t[-1]), 1e-9)
    length = step_seconds if step_seconds is not None else span / n_steps * (1 + 1e-12)
    return np.minimum(np.floor(t / length), n_steps - 1).astype(np.int16)


def run_replay(sc: Scored, cfg: ReplayConfig) -> list[Run]:
    """Every run the config asks for."""
    if cfg.thresholds == "logged":
        return [replay_logged(sc)]
    if cfg.sweep_mode == "grid" or len(cfg.steps) == 1:
        return [replay_live(sc, [s], cfg, name=s.label()) for s in cfg.steps]
    rows = step_rows(sc.ts_ms, len(cfg.steps), cfg.step_seconds)
    return [replay_live(sc, cfg.steps, cfg, rows, name="sweep steps")]


# ---- evaluation -----------------------------------------------------------------------------
def join_truth(sc: Scored, truth_dir: str | Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(labels, true probabilities) per scored row from `rta world stream --truth` output (or a
    world log), joined by request_id; rows without truth are NaN."""
    root = Path(truth_dir)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*.parquet") if not p.name.startswith((".", "_")))
    if not files:
        raise DataError(f"{root}: no Parquet truth files")
    tasks = sc.tasks
    parts = []
    for f in files:
        t = pq.read_table(f)
        if "request_id" not in t.schema.names:
            raise DataError(f"{f}: column 'request_id' is missing (a truth file needs it)")
        keep = ["request_id"] + [c for c in [*tasks, *(f"true_{x}" for x in tasks)] if c in t.schema.names]
        parts.append(t.select(keep))
    table = pa.concat_tables(parts, promote_options="default")
    rid = pa.array(sc.logs.request_id[sc.order].astype(str), pa.string())
    pos = pc.index_in(rid, value_set=table["request_id"].combine_chunks())
    ok = pc.is_valid(pos).to_numpy(zero_copy_only=False)
    at = pos.to_numpy(zero_copy_only=False)[ok].astype(np.int64)

    def matrix(prefix: str) -> np.ndarray | None:
        names = [f"{prefix}{x}" for x in tasks]
        if not all(c in table.schema.names for c in names):
            return None
        m = np.full((len(rid), len(tasks)), np.nan, np.float32)
        for j, c in enumerate(names):
            m[ok, j] = pc.cast(table[c], pa.float32()).to_numpy()[at]
        return m

    return matrix(""), matrix("true_")


def value_kept(block: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """Value (expected deals etc.) kept by a filter vs the oracle and a random filter blocking
    as many rows; `q` NaN rows are left out."""
    ok = np.isfinite(q)
    q, block = q[ok].astype(np.float64), block[ok]
    total = float(q.sum())
    k = int(block.sum())
    kept = float(q[~block].sum())
    oracle = total - float(np.sort(q)[:k].sum())
    random = total * (1.0 - k / max(len(q), 1))
    return {"total": total, "kept": kept, "kept_share": kept / total if total else math.nan,
            "oracle_kept": oracle, "oracle_share": oracle / total if total else math.nan,
            "random_kept": random, "random_share": random / total if total else math.nan,
            "block_share": k / max(len(q), 1)}


def operating_curve(e: np.ndarray, q: np.ndarray, valid: np.ndarray, shares: np.ndarray) -> list[dict[str, float]]:
    """Value kept when blocking the lowest-score share x of valid traffic (score only)."""
    ok = valid & np.isfinite(q) & np.isfinite(e)
    e, q = e[ok], q[ok].astype(np.float64)
    if not len(q) or q.sum() <= 0:
        return []
    cum = np.concatenate([[0.0], np.cumsum(q[np.argsort(e, kind="stable")])])
    total = cum[-1]
    return [{"block_share": float(x), "kept_share": float(1.0 - cum[int(round(x * len(q)))] / total)}
            for x in shares]


def _explore_rows(sc: Scored) -> np.ndarray:
    reason = sc.logs.decisions.column("reason").take(pa.array(sc.order))
    return pc.fill_null(pc.equal(reason, "explore"), False).to_numpy(zero_copy_only=False)


def ope_sample(sc: Scored, j: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The off-policy sample of task `j` on a logged layout: (mask over scored rows, their
    inverse-propensity weights, population size). Shared by `ope` and the promotion gate, so
    both estimate over the same rows with the same weights.

    Population: valid rows whose attribution window closed; sample: its explore rows with an
    observed label and a usable propensity."""
    d = sc.logs.decisions
    prop = pc.fill_null(d.column("propensity").take(pa.array(sc.order)), math.nan).to_numpy(
        zero_copy_only=False).astype(np.float64)
    info = sc.logs.info
    as_of = info.get("as_of_ms", int(sc.ts_ms.max()))
    # valid rows only: invalid ones are never explored (and pass under every filter)
    closed = ((as_of - sc.ts_ms) >= info.get("attribution_windows_s", {}).get(sc.tasks[j], 0.0) * 1000.0) & sc.valid
    sample = (_explore_rows(sc) & closed & np.isfinite(sc.logs.labels[sc.order, j]) & (prop > 0)
              & np.isfinite(prop))
    return sample, 1.0 / prop[sample], int(closed.sum())


def bootstrap_sums(values: np.ndarray, boot: int, rng: np.random.Generator) -> np.ndarray:
    """Column sums of `boot` resamples (with replacement, as many rows as `values` has) of the
    rows of `values` [m, q] -> [boot, q].

    Rows that are equal are one group and a resample is only how often it draws each group: a
    multinomial of m draws over the groups (p = group size / m), the same distribution as
    drawing row indices, at O(groups) per resample instead of O(m). The explore slice has few
    distinct rows (one propensity per target, 0/1 labels and decisions)."""
    groups, size = np.unique(values, axis=0, return_counts=True)
    counts = rng.multinomial(len(values), size / len(values), size=boot)
    return counts.astype(np.float64) @ groups


def ope(sc: Scored, run: Run, boot: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """Self-normalised IPS estimates, from the explore slice, of the positives each task's
    filter `run` keeps (and their share of all positives), with percentile-bootstrap 95% CIs.

    Population: valid rows whose attribution window closed (labels could be seen had they passed).
    Explore rows are a uniform random sample of valid traffic with propensity epsilon, so
    weighting their observed labels by 1/propensity estimates totals over the population."""
    if sc.logs.decisions is None:
        return None
    if not _explore_rows(sc).any():
        return {"note": "no explore rows in the log: no unbiased estimate is possible"}
    labels = sc.logs.labels[sc.order]
    rng = np.random.default_rng(seed)
    passed = ~run.block
    out: dict[str, Any] = {"estimator": "self-normalised IPS on the explore slice", "bootstrap": boot,
                           "confidence": 0.95, "tasks": {}}
    for j, t in enumerate(sc.tasks):
        sample, w, n_pop = ope_sample(sc, j)
        y = np.nan_to_num(labels[sample, j]).astype(np.float64)
        k = passed[sample].astype(np.float64)
        m = len(y)
        if m == 0:
            out["tasks"][t] = {"population": n_pop, "explore_rows": 0, "note": "no explore row with a closed window"}
            continue
        ess = float(w.sum() ** 2 / (w ** 2).sum())
        kept = n_pop * float((w * k * y).sum() / w.sum())
        pos = n_pop * float((w * y).sum() / w.sum())
        sw, swy, swky = bootstrap_sums(np.stack([w, w * y, w * k * y], axis=1), boot, rng).T
        kept_b = n_pop * swky / sw
        with np.errstate(invalid="ignore", divide="ignore"):
            share_b = swky / swy
        share_b = share_b[np.isfinite(share_b)]
        out["tasks"][t] = {
            "population": n_pop, "explore_rows": m, "ess": round(ess, 1), "positives_in_sample": int(y.sum()),
            "kept": kept, "kept_ci": [float(np.quantile(kept_b, 0.025)), float(np.quantile(kept_b, 0.975))],
            "positives": pos,
            "kept_share": kept / pos if pos > 0 else math.nan,
            "kept_share_ci": ([float(np.quantile(share_b, 0.025)), float(np.quantile(share_b, 0.975))]
                              if len(share_b) else [math.nan, math.nan]),
        }
    return out


def summarize(sc: Scored, run: Run, truth: tuple[np.ndarray | None, np.ndarray | None],
              cfg: ReplayConfig) -> dict[str, Any]:
    """Everything report.json says about one run."""
    n = len(run.block)
    t_s = sc.ts_ms.astype(np.float64) / 1000.0
    speedup = speedup_of(sc, cfg)
    reasons = np.bincount(run.reason, minlength=len(REASONS))
    blocked_by = np.bincount(run.reason[run.block], minlength=len(REASONS))
    out: dict[str, Any] = {
        "name": run.name, "rows": n, "block_share": float(run.block.mean()),
        "reason_mix": {r: {"pass": int(reasons[i] - blocked_by[i]), "block": int(blocked_by[i])}
                       for i, r in enumerate(REASONS) if reasons[i]},
        "event_span_s": float(t_s[-1] - t_s[0]),
        "speedup": speedup if run.steps else None,  # logged thresholds: no controller
    }
    steps = []
    for k, s in enumerate(run.steps):
        rows = run.step == k
        if not rows.any():
            continue
        start = float(t_s[int(np.argmax(rows))])  # the step's first decision (rows are in event order)
        settled = rows & (t_s >= start + WARMUP_S * speedup)
        row = {"step": k, "targets": {"r": s.r, "p_u": s.p_u, "epsilon": s.epsilon}, "start_s": start,
               "rows": int(rows.sum()), "block_share": float(run.block[rows].mean())}
        if settled.any():
            bs = float(run.block[settled].mean())
            us = float((run.reason[settled] == UNCERTAIN).mean())
            row.update(settled_rows=int(settled.sum()), settled_block_share=bs,
                       settled_error_pp=abs(bs - s.r) * 100, settled_uncertain_share=us,
                       settled_uncertain_error_pp=abs(us - s.p_u) * 100)
        steps.append(row)
    if steps:
        out["steps"] = steps
        errs = [s["settled_error_pp"] for s in steps if "settled_error_pp" in s]
        out["max_settled_error_pp"] = max(errs) if errs else None
    if cfg.thresholds == "logged" and sc.logs.decisions is not None:
        d = sc.logs.decisions
        take = pa.array(sc.order)
        logged_dec = d.column("decision").take(take)
        decided = pc.is_valid(logged_dec).to_numpy(zero_copy_only=False)
        lb = pc.fill_null(pc.equal(logged_dec, "block"), False).to_numpy(zero_copy_only=False)
        lr = pc.fill_null(d.column("reason").take(take), "").to_numpy(zero_copy_only=False)
        same = (lb == run.block) & (lr == _REASON_NAMES[run.reason])
        score = pc.fill_null(d.column("score").take(take), math.nan).to_numpy(zero_copy_only=False)
        diff = np.abs(score - sc.e.astype(np.float64))
        bad = np.flatnonzero(decided & ~same)
        logged_model = pc.fill_null(d.column("model").take(take), "").to_numpy(zero_copy_only=False)
        out["match"] = {"decided_rows": int(decided.sum()), "undecided_rows": int((~decided).sum()),
                        "decision_match": float((lb == run.block)[decided].mean()) if decided.any() else math.nan,
                        "decision_and_reason_match": float(same[decided].mean()) if decided.any() else math.nan,
                        "mismatched": int(len(bad)),
                        "mismatched_request_ids": sc.logs.request_id[sc.order][bad[:20]].tolist(),
                        "max_abs_score_diff": float(np.nanmax(diff[decided])) if decided.any() else math.nan,
                        # a log spanning a model roll: rows another version decided cannot match
                        "other_model_rows": int((decided & (logged_model != sc.model)).sum())}
    labels, true_p = truth
    tasks = sc.tasks
    q_source = "true probabilities" if true_p is not None else ("labels" if labels is not None else None)
    q_all = true_p if true_p is not None else labels
    if q_all is not None:
        out["truth_source"] = q_source
        out["value"] = {t: value_kept(run.block, q_all[:, j]) for j, t in enumerate(tasks)}
        if labels is not None:
            out["labels_kept"] = {t: value_kept(run.block, labels[:, j]) for j, t in enumerate(tasks)}
    if sc.logs.decisions is not None and cfg.thresholds == "live":
        out["ope"] = ope(sc, run, seed=cfg.seed)
    elif sc.logs.decisions is not None:
        # the logged filter's own value needs no estimate: its passed rows' labels were observed
        lab = sc.logs.labels[sc.order]
        out["observed_kept"] = {t: int(np.nansum(lab[~run.block, j])) for j, t in enumerate(tasks)}
    return out


# ---- the whole replay -----------------------------------------------------------------------
def decisions_table(sc: Scored, runs: list[Run]) -> pa.Table:
    """decisions.parquet: one row per (run, request), the decision fields of the contract.
    Built from the arrays as they are: a string column is an index per row into its few words
    (`_words`), so no Python string is made per row."""
    parts = []
    rid = pa.array(sc.logs.request_id[sc.order], pa.string())
    n = len(sc.order)
    model = _words(np.zeros(n, np.int32), [sc.model])
    for k, run in enumerate(runs):
        steps = run.steps or [None]
        r = np.array([s.r if s else math.nan for s in steps])[run.step]
        cols: dict[str, Any] = {
            "run": pa.array(np.full(n, k, np.int16)), "step": pa.array(run.step),
            "request_id": rid, "ts_ms": pa.array(sc.ts_ms, pa.int64()),
            "decision": _words(run.block, ["pass", "block"]),
            "reason": _words(run.reason, list(REASONS)),
            "score": pa.array(sc.e.astype(np.float64)), "uncertainty": pa.array(sc.u.astype(np.float64)),
            "threshold": pa.array(run.theta), "tau_u": pa.array(run.tau_u),
            "target_ratio": pa.array(r if run.steps else _logged(sc, "target_ratio")),
            "propensity": pa.array(run.propensity.astype(np.float64)),
            "model": model,
        }
        for j, t in enumerate(sc.tasks):
            cols[f"p_{t}"] = pa.array(sc.p[:, j].astype(np.float64))
        for j, t in enumerate(sc.tasks):
            cols[f"u_{t}"] = pa.array(sc.u_tasks[:, j].astype(np.float64))
        if not run.steps and sc.logs.decisions is not None:
            take = pa.array(sc.order)
            cols["logged_decision"] = sc.logs.decisions.column("decision").take(take)
            cols["logged_reason"] = sc.logs.decisions.column("reason").take(take)
        parts.append(pa.table(cols))
    return pa.concat_tables(parts, promote_options="default")


def _words(index: np.ndarray, words: list[str]) -> pa.Array:
    """The string column whose row i is `words[index[i]]`: dictionary-encoded, then decoded by
    Arrow (C++), so decisions.parquet's columns keep their plain string type."""
    codes = pa.DictionaryArray.from_arrays(pa.array(np.asarray(index, np.int32)), pa.array(words, pa.string()))
    return codes.cast(pa.string())


def write_decisions(table: pa.Table, path: Path) -> None:
    """decisions.parquet, zstd; Parquet dictionary pages for the string columns only (the float
    columns' distinct values would overflow a dictionary page: tried, then written plain, which
    took twice as long for a 40% larger file)."""
    words = [f.name for f in table.schema if pa.types.is_string(f.type)]
    pq.write_table(table, path, compression="zstd", use_dictionary=words)


def _logged(sc: Scored, name: str) -> np.ndarray:
    return pc.fill_null(sc.logs.decisions.column(name).take(pa.array(sc.order)), math.nan).to_numpy(
        zero_copy_only=False).astype(np.float64)


def replay(model: str | Path, logs: LogSet | str | Path, out: str | Path, cfg: ReplayConfig,
           truth_dir: str | Path | None = None, attribution: Attribution | None = None,
           threads: int = 1, write: bool = True, log: Callable[[str], None] | None = None,
           plots: bool = True) -> dict[str, Any]:
    """Replay `logs` through `model` and write decisions.parquet + report.{json,md,html} + PNGs
    (unless `plots` is False) into `out`; returns the report dict. The function the CLI, the
    benchmark and tests call."""
    t0 = time.perf_counter()
    say = log or (lambda _m: None)
    scorer = Scorer.load(model, intra_threads=threads)
    policy = ScorePolicy.from_manifest(scorer.manifest)
    if not isinstance(logs, LogSet):
        logs = load_logs(logs, tuple(scorer.tasks), attribution)
    if cfg.thresholds == "logged" and logs.decisions is None:
        raise DataError(f"{logs.source}: --thresholds logged needs a logged layout (decision columns); "
                        "this is a world log")
    t_load = time.perf_counter() - t0
    say(f"{len(logs)} rows from {logs.source}" + (f" ({_counts_line(logs)})" if logs.info else ""))
    t_engine = 0.0  # Ray's start and stop (not in score_s)
    if cfg.engine == "ray":
        from training.replay_ray import RayScoring

        t_engine = time.perf_counter()
        with RayScoring(scorer.path, cfg.workers, threads) as pool:
            t_engine = time.perf_counter() - t_engine
            sc = score_logs(logs, scorer, policy, cfg.progress, blocks=pool.blocks)
            t_stop = time.perf_counter()
        t_engine += time.perf_counter() - t_stop
    else:
        sc = score_logs(logs, scorer, policy, cfg.progress)
    speedup: float | None = None
    if cfg.thresholds == "live":
        speedup = speedup_of(sc, cfg)
        say(_speedup_line(sc, cfg, speedup))
    t1 = time.perf_counter()
    runs = run_replay(sc, cfg)
    t_decide = time.perf_counter() - t1
    truth: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
    if truth_dir is not None:
        truth = join_truth(sc, truth_dir)
    elif not logs.masked and logs.decisions is None:
        truth = (logs.labels[sc.order], None if logs.truth is None else logs.truth[sc.order])
    report: dict[str, Any] = {
        "model": scorer.version, "bundle": str(scorer.path), "logs": logs.source, "rows": len(logs),
        "mode": cfg.thresholds, "sweep_mode": cfg.sweep_mode if cfg.thresholds == "live" else None,
        "speedup": speedup, "speedup_source": None if speedup is None else ("flag" if cfg.speedup is not None else "auto"),
        "seed": cfg.seed, "tasks": sc.tasks,
        "engine": {"name": cfg.engine, **({"workers": cfg.workers} if cfg.engine == "ray" else {})},
        "policy": policy.describe(), "controller": {"window_seconds": cfg.controller.window_seconds,
                                                     "refresh_interval": cfg.controller.refresh_interval},
        "load": logs.info or {"layout": "flat"},
        "runs": [summarize(sc, r, truth, cfg) for r in runs],
    }
    if truth[0] is not None or truth[1] is not None:
        q = truth[1] if truth[1] is not None else truth[0]
        j = sc.tasks.index("deal") if "deal" in sc.tasks else len(sc.tasks) - 1
        report["operating_curve"] = operating_curve(sc.e, q[:, j], sc.valid, np.linspace(0, 0.9, 19))
        report["operating_curve_task"] = sc.tasks[j]
    t2 = time.perf_counter()
    if write:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_decisions(decisions_table(sc, runs), out_dir / "decisions.parquet")
        from training.replay_report import write_replay_report

        write_replay_report(report, sc, runs, out_dir, plots=plots)
    t3 = time.perf_counter()
    report["timing"] = {"load_s": round(t_load, 3), "score_s": round(sc.score_s, 3),
                        "decide_s": round(t_decide, 3), "write_s": round(t3 - t2, 3),
                        **({"engine_start_stop_s": round(t_engine, 3)} if cfg.engine == "ray" else {}),
                        "total_s": round(t3 - t0, 3), "rows_per_s": round(len(logs) / max(t3 - t0, 1e-9))}
    if write:
        # strict JSON: NaN/inf (an estimate without data, tau_u with p_u = 0) become null
        (Path(out) / "report.json").write_text(json.dumps(_finite(report), indent=1, default=_json_default,
                                                          allow_nan=False))
    return report


def _speedup_line(sc: Scored, cfg: ReplayConfig, speedup: float) -> str:
    """What the controller sees of the log's density: the compression, chosen or given, and
    the rows per window it gives (a warning when the controller cannot move on so few)."""
    ctl = cfg.controller
    span_s = max(float(sc.ts_ms[-1] - sc.ts_ms[0]) / 1000.0, 1e-3)
    per_window = len(sc.ts_ms) / span_s * speedup * ctl.window_seconds
    how = "--speedup" if cfg.speedup is not None else "chosen automatically"
    line = (f"event time x{speedup:.4g} ({how}): ~{per_window:.0f} rows per {ctl.window_seconds} s "
            f"controller window over {span_s / speedup:.0f} event-seconds")
    if per_window < 2 * ctl.min_rows:
        line += (f"; warning: the controller needs {ctl.min_rows} rows per window to move, so shares are "
                 + ("not held (drop --speedup to let replay choose)" if cfg.speedup is not None
                    else "not held on so small a log"))
    return line


def _finite(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    if isinstance(o, float | np.floating) and not math.isfinite(float(o)):
        return None
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _counts_line(logs: LogSet) -> str:
    c = logs.info.get("counts", {})
    parts = [f"{v} {k.replace('_', ' ')}" for k, v in c.items()
             if isinstance(v, int) and v and k not in ("impression_rows_read", "outcome_rows_read")]
    lab = ", ".join(f"{t} {v}" for t, v in logs.labelled().items())
    return "; ".join([*parts, f"labelled rows: {lab}"])


# ---- CLI ------------------------------------------------------------------------------------
@click.command("replay")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Bundle directory, or a model directory (its `current`).")
@click.option("--logs", "logs_path", required=True, type=LOCATION,
              help="Logged traffic: `rta log` layout (impressions/ + outcomes/) or a world log "
                   "(a path or s3://bucket/prefix).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Report directory: decisions.parquet, report.json/.md/.html, PNGs.")
@click.option("--thresholds", type=click.Choice(["live", "logged"]), default="live", show_default=True,
              help="logged: each row's logged theta/tau_u/explore flag (reproduces live decisions); "
                   "live: replay's own controller holding --ratio/--sweep.")
@click.option("--ratio", type=float, default=None, help="Target block share r (live mode).")
@click.option("--pass-share", type=float, default=0.0, show_default=True, help="Target uncertain pass share p_u.")
@click.option("--explore", type=float, default=0.0, show_default=True, help="Explore share epsilon.")
@click.option("--sweep", default=None, help="What-if targets, e.g. 'r=0.2,0.3,0.5;p_u=0,0.02,0.05'.")
@click.option("--sweep-mode", type=click.Choice(["grid", "steps"]), default="grid", show_default=True,
              help="grid: one replay of the whole log per combination; steps: combinations one after "
                   "another over event time.")
@click.option("--step-seconds", type=float, default=None,
              help="Steps mode: event-seconds per step [default: the log's span split evenly].")
@click.option("--truth", "truth_dir", type=click.Path(exists=True, path_type=Path), default=None,
              help="World truth (`rta world stream --truth`), joined by request_id: evaluation only.")
@click.option("--attribution", default=None,
              help="Attribution windows of the logged layout, e.g. 'click=15m,deal=7d'.")
@click.option("--as-of-ms", type=int, default=None, help="Labels as of this time [default: newest event].")
@click.option("--speedup", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Event time runs this much faster through the controller [default: chosen from "
                   "the log's density, ~1000 rows per event-second and >= 300 event-seconds; 1 for "
                   "a log at live density].")
@click.option("--batch-rows", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Explore draws.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="onnxruntime threads.")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="ray: score on Ray actors (local mode, or the cluster in RTA_RAY_ADDRESS; extra [ray]); "
                   "same decisions as local.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Scoring actors with --engine ray.")
@click.option("--no-plots", is_flag=True,
              help="Skip the PNGs (report.json/.md/.html and decisions.parquet still written): "
                   "matplotlib's import and drawing are ~2-3 s whatever the row count.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def replay_cmd(model_dir: Path, logs_path: Path | str, out: Path, thresholds: str, ratio: float | None,
               pass_share: float, explore: float, sweep: str | None, sweep_mode: str,
               step_seconds: float | None, truth_dir: Path | None, attribution: str | None,
               as_of_ms: int | None, speedup: float | None, batch_rows: int, seed: int, threads: int,
               no_plots: bool, quiet: bool, engine: str = "local", workers: int = 2) -> None:
    """Replay logged traffic through the worker's engine on event time; write the report."""
    if thresholds == "logged" and (ratio is not None or sweep):
        raise click.UsageError("--thresholds logged uses the logged thresholds; drop --ratio/--sweep")
    if thresholds == "live":
        if sweep and ratio is not None:
            raise click.UsageError("give --ratio or --sweep, not both")
        if sweep:
            steps = parse_sweep(sweep, pass_share, explore)
        elif ratio is not None:
            steps = [Step(ratio, pass_share, explore)]
            steps[0].targets()
        else:
            raise click.UsageError("live replay needs --ratio R or --sweep '...' (or --thresholds logged)")
    else:
        steps = []
    cfg = ReplayConfig(thresholds=thresholds, steps=steps, sweep_mode=sweep_mode, step_seconds=step_seconds,
                       batch_rows=batch_rows, speedup=speedup, seed=seed, progress=not quiet,
                       engine=engine, workers=workers)
    report = replay(model_dir, logs_path, out, cfg, truth_dir=truth_dir,
                    attribution=Attribution.parse(attribution, as_of_ms), threads=threads,
                    log=lambda m: click.echo(f"[rta replay] {m}", err=True), plots=not no_plots)
    for run in report["runs"]:
        click.echo(f"[rta replay] {run_line(run)}", err=True)
    click.echo(json.dumps({"report": str(out / "report.md"), "rows": report["rows"],
                           "rows_per_s": report["timing"]["rows_per_s"]}))


def run_line(run: dict[str, Any]) -> str:
    """One line per run for the terminal: shares, match, value, estimates with their ESS."""
    parts = [f"{run['name']}: block share {run['block_share']:.4f}"]
    if run.get("steps") and run.get("speedup") is not None:
        parts.append(f"event time x{run['speedup']:.4g}")
    if run.get("max_settled_error_pp") is not None:
        parts.append(f"max settled error {run['max_settled_error_pp']:.3f} pp")
    if "match" in run:
        m = run["match"]
        parts.append(f"reproduces {m['decision_and_reason_match']:.4%} of {m['decided_rows']} logged decisions "
                     f"({m['undecided_rows']} undecided)")
    if "value" in run and "deal" in run["value"]:
        v = run["value"]["deal"]
        parts.append(f"deals kept {v['kept_share']:.3f} (oracle {v['oracle_share']:.3f}, random {v['random_share']:.3f})")
    o = (run.get("ope") or {}).get("tasks", {}).get("deal")
    if o and "kept" in o:
        parts.append(f"OPE deals kept {o['kept']:.1f} [{o['kept_ci'][0]:.1f}, {o['kept_ci'][1]:.1f}] "
                     f"(ESS {o['ess']:.0f} of {o['explore_rows']} explore rows)")
    return "; ".join(parts)

