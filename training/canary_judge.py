"""Judging a canary on its own arm's outcomes: a randomised comparison, the gate's rule.

The canary's arm is a hash of `request_id` (stream.canary), so the two arms are random halves
(of unequal size) of the same traffic: the difference of their kept positives per request is
an unbiased estimate of candidate minus current, with no propensity model. Per task t and arm a:

    m_a,t = kept positives per matured request of arm a  (a blocked request keeps none; a request
            whose attribution window is still open is left out: its label is not known yet)
    current_t = m_cur,t x N_t,   difference_t = (m_can,t - m_cur,t) x N_t   (N_t: matured rows)

The value is the gate's (training/gate.py): the score function's weights over every task of kept
positives / the task's positives; `positives` (estimated from the explore slice by the caller)
defaults to current's kept positives, so the value is then in units of "current's kept
positives". Intervals: a bootstrap stratified by arm (each arm resampled on its own, as many rows
as it has; `replay.bootstrap_sums`, so a resample costs O(distinct rows)). The decision is
`gate.decide`: promote / refuse / inconclusive with the same non-inferiority margin, guard rails
and minimum detectable effect.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np

from stream.canary import VALUE_FILE  # <model_dir>/: the watcher's newest judgement (canary status)
from stream.logger.storage import LOCATION

# training.gate / training.replay are imported where used: `rta model list` (which registers the
# canary-judge command) stays light


def _arm_means(kept: np.ndarray, boot: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per task: kept positives per matured row, and `boot` resampled values of it."""
    from training.replay import bootstrap_sums

    known = np.isfinite(kept)
    rows = np.concatenate([np.where(known, kept, 0.0), known.astype(np.float64)], axis=1)
    t = kept.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = rows[:, :t].sum(axis=0) / rows[:, t:].sum(axis=0)
        sums = np.vstack([bootstrap_sums(rows, min(200, boot - s), rng) for s in range(0, boot, 200)])
        return mean, sums[:, :t] / sums[:, t:]


def canary_value(kept: np.ndarray, to_canary: np.ndarray, tasks: tuple[str, ...], weights: dict[str, float],
                 positives: dict[str, float] | None = None, boot: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> dict[str, Any]:
    """The value difference canary - current from the arms' own rows. `kept`: float[N, T], 1 = a
    positive the arm's decision kept, 0 = none kept (blocked, or passed without an outcome),
    NaN = not matured; `to_canary`: bool[N], the row's arm."""
    from training.gate import _quantiles

    kept = np.asarray(kept, dtype=np.float64)
    to_canary = np.asarray(to_canary, dtype=bool)
    if kept.ndim != 2 or kept.shape != (len(to_canary), len(tasks)):
        raise ValueError(f"kept must be [rows, {len(tasks)}] aligned with the arms, got {kept.shape}")
    rng = np.random.default_rng(seed)
    m_cur, b_cur = _arm_means(kept[~to_canary], boot, rng)
    m_can, b_can = _arm_means(kept[to_canary], boot, rng)
    n_t = np.isfinite(kept).sum(axis=0).astype(np.float64)
    out: dict[str, Any] = {"tasks": {}}
    cur_value, val = 0.0, 0.0
    val_b = np.zeros(len(b_cur))
    for j, t in enumerate(tasks):
        cur = float(m_cur[j] * n_t[j])
        d = float((m_can[j] - m_cur[j]) * n_t[j])
        d_b = (b_can[:, j] - b_cur[:, j]) * n_t[j]
        pos = (positives or {}).get(t, cur)
        scale = weights.get(t, 0.0) / pos if pos and pos > 0 else 0.0
        if math.isfinite(d):
            cur_value += scale * cur
            val += scale * d
            val_b += scale * np.nan_to_num(d_b)
        ci = _quantiles(d_b, confidence)
        out["tasks"][t] = {
            "weight": weights.get(t, 0.0), "population": int(n_t[j]), "positives": pos,
            "current": cur, "candidate": cur + d, "difference": d, "difference_ci": ci,
            "relative": d / cur if cur > 0 else math.nan,
            "relative_ci": [v / cur for v in ci] if cur > 0 else [math.nan, math.nan],
            "kept_per_row": {"current": float(m_cur[j]), "canary": float(m_can[j])},
            "kept_positives": {"current": float(np.nansum(kept[~to_canary, j])),
                               "canary": float(np.nansum(kept[to_canary, j]))},
        }
    # each arm's own value (as if it decided all matured traffic), for status and /metrics
    arm_b = {"current": np.zeros(len(b_cur)), "canary": np.zeros(len(b_can))}
    arm_v = {"current": 0.0, "canary": 0.0}
    for j, t in enumerate(tasks):
        pos = (positives or {}).get(t, float(m_cur[j] * n_t[j]))
        scale = weights.get(t, 0.0) / pos if pos and pos > 0 else 0.0
        for arm, m, b in (("current", m_cur, b_cur), ("canary", m_can, b_can)):
            if math.isfinite(float(m[j])):
                arm_v[arm] += scale * float(m[j] * n_t[j])
                arm_b[arm] += scale * np.nan_to_num(b[:, j] * n_t[j])
    out["arms"] = {a: {"value": arm_v[a], "ci": _quantiles(arm_b[a], confidence)} for a in arm_v}
    vci = _quantiles(val_b, confidence)
    out.update(current=cur_value, candidate=cur_value + val, difference=val, difference_ci=vci,
               se=float(np.std(val_b, ddof=1)) if len(val_b) > 1 else math.nan,
               relative=val / cur_value if cur_value > 0 else math.nan,
               rows={"current": int((~to_canary).sum()), "canary": int(to_canary.sum())},
               bootstrap=boot, confidence=confidence,
               estimator="randomised comparison of the canary's arm with current's (hash of request_id), "
                         "bootstrap stratified by arm",
               unit="score-weighted share of each task's positives kept")
    return out


def judge_canary(kept: np.ndarray, to_canary: np.ndarray, tasks: tuple[str, ...], weights: dict[str, float],
                 cfg: Any = None, window_hours: float = 1.0,
                 positives: dict[str, float] | None = None, gate_task: str | None = None) -> dict[str, Any]:
    """The gate's three outcomes on canary evidence: {"decision", "why", "value", ...}. Fewer than
    `cfg.min_positives` kept positives of the gate task over both arms: inconclusive."""
    from training.gate import GateConfig, decide

    cfg = cfg or GateConfig()
    value = canary_value(kept, to_canary, tasks, weights, positives, cfg.boot, cfg.confidence, cfg.seed)
    task = gate_task or max(weights, key=lambda t: weights[t])
    verdict = decide(value, cfg, window_hours)
    seen = sum(value["tasks"][task]["kept_positives"].values()) if task in value["tasks"] else 0.0
    # neither a promotion nor a refusal (which the watch turns into an automatic stop) rests on a
    # handful of positives: a 6-vs-0 deal split came out "refuse", and identical arms were
    # stopped in 10 % of 15-round watches when a refusal needed no minimum
    if verdict["decision"] in ("promote", "refuse") and seen < cfg.min_positives:
        verdict = {**verdict, "decision": "inconclusive",
                   "why": f"inconclusive: {seen:.0f} kept {task} positives over both arms, fewer than "
                          f"{cfg.min_positives}"}
    return {**verdict, "value": value, "evidence": "canary", "gate_task": task}


def canary_evidence(logs: Any, current: str, candidate: str, share: float, since_ms: int | None = None,
                    until_ms: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """`kept` and `to_canary` for `judge_canary` from `rta log`'s layout (training.logs.load_logged):
    the rows of the canary's period (first to last row the candidate decided) whose decision came
    from the arm their request_id hashes to (stream.canary.canary_arm at `share`): a request current
    decided inside the canary's share (a worker that could not load the canary) is left out, so
    the arms stay the random split. A blocked row whose window has closed kept no positive (0); a
    row whose window is open is left out (NaN).

    `since_ms`/`until_ms`: the run's own span (its canary-start entry, and the stop that ended
    it), so an older canary of the same version, or current alone between two canaries, never
    joins the arms. Applied when the log has rows of the candidate inside that span; a log on
    another clock (a simulated or replayed one) keeps the candidate's span, and `info` says which."""
    from stream.canary import canary_arm

    if logs.decisions is None or "model" not in logs.decisions.column_names:
        raise ValueError("canary evidence needs the logged layout's decision columns (model, decision)")
    model = np.asarray(logs.decisions.column("model").to_pylist(), dtype=object)
    blocked = np.asarray(logs.decisions.column("decision").to_pylist(), dtype=object) == "block"
    by_cand = model == candidate
    if not by_cand.any():
        raise ValueError(f"no logged decision of {candidate}: has its canary run (and the logger logged it)?")
    ts = np.asarray(logs.ts_ms)
    span = np.ones(len(ts), dtype=bool)
    if since_ms is not None:
        span &= ts >= since_ms
    if until_ms is not None:
        span &= ts <= until_ms
    period_source = "the run's start and stop"
    if not (by_cand & span).any():
        span, period_source = np.ones(len(ts), dtype=bool), "the candidate's logged rows (none inside the run's span)"
    in_run = by_cand & span
    period = (ts >= ts[in_run].min()) & (ts <= ts[in_run].max())  # inside the span by construction
    hashed = canary_arm(logs.request_id, share)
    rows = period & ((by_cand & hashed) | ((model == current) & ~hashed))
    as_of = logs.info["as_of_ms"]
    windows = logs.info["attribution_windows_s"]
    closed = np.stack([(as_of - ts) >= 1000.0 * windows[t] for t in logs.tasks], axis=1)
    kept = np.asarray(logs.labels, dtype=np.float64).copy()
    kept[blocked[:, None] & closed & np.isnan(kept)] = 0.0
    info = {"rows": int(rows.sum()), "period_ms": [int(ts[in_run].min()), int(ts[in_run].max())],
            "period_source": period_source,
            "left_out_off_arm": int((period & ((by_cand & ~hashed) | ((model == current) & hashed))).sum())}
    return kept[rows], by_cand[rows], info


def canary_run(model_dir: Any, version: str) -> dict[str, Any]:
    """The newest canary-start of `version` in registry.jsonl (its share and the current it ran beside)."""
    from model import registry
    from stream.errors import BundleError

    starts = [e for e in registry.read_log(model_dir) if e.get("action") == "canary-start" and e.get("new") == version]
    if not starts:
        raise BundleError(f"{model_dir}: no canary of {version} in registry.jsonl (start one: rta model canary "
                          f"{version} --share S --reason ...)")
    return starts[-1]


def run_span(model_dir: Any, run: dict[str, Any]) -> tuple[int | None, int | None]:
    """(start, end) of one canary run in ms: its canary-start entry, and the first entry after it
    that ended it (a canary-stop, a promote, or another canary-start); None where unknown."""
    from model import registry

    since = run.get("ts_ms")
    if since is None:
        return None, None
    later = [e for e in registry.read_log(model_dir) if (e.get("ts_ms") or 0) > since
             and e.get("action") in ("canary-stop", "canary-start", "promote")]
    return int(since), (int(min(e["ts_ms"] for e in later)) if later else None)


def canary_applies(model_dir: Any, version: str, current: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """(the canary run of `version` that can judge it against `current`, None), (None, why not)
    when it ran beside another current (its arms compared the candidate with a model that is no
    longer served), or (None, None) when no canary of it is in registry.jsonl."""
    from stream.errors import BundleError

    try:
        run = canary_run(model_dir, version)
    except BundleError:
        return None, None
    if run.get("old") != current:
        return None, (f"the canary of {version} ran beside {run.get('old')}, not the current {current}: "
                      "its evidence does not compare the candidate with what is served")
    return run, None


def canary_gate(model_dir: Any, version: str, logs_path: Any, cfg: Any = None, attribution: Any = None,
                run: dict[str, Any] | None = None, write: bool = True, fidelity: bool = True) -> dict[str, Any]:
    """The gate's result (the shape of `training.gate.run_gate`'s, so `rta model promote`,
    `outcome_line`, `exit_code` and the audit entry read it unchanged) judged on the canary's own
    arms: the value and guard rails by `judge_canary` (`gate.decide`); fidelity as the off-policy
    gate measures it (`gate.gate_fidelity`: teacher vs student on the canary's logged rows, a
    failure only beyond its interval; the acceptance recorded at distillation only for a bundle
    without a teacher). The distillation-time acceptance alone rests on ~1.5k validation rows and
    refused a v2 whose window fidelity passed (top-10 % overlap 0.813 [0.802, 0.828]).
    `fidelity=False` (the watch: it judges value only) skips it. Written to <candidate>/gate.json
    unless `write=False`."""
    from pathlib import Path

    from model import bundle, registry
    from training.churn import load_window
    from training.gate import GateConfig, gate_fidelity, gate_task, score_weights
    from training.logs import load_logged
    from training.replay import _finite

    cfg = cfg or GateConfig()
    root = Path(model_dir)
    cand_dir = registry.version_dir(root, version)
    current = bundle.current_version(root)
    run = run or canary_run(root, version)
    cand_manifest = registry.verify(cand_dir)
    cur_manifest = bundle.read_manifest(bundle.resolve_bundle(root))
    tasks = tuple(cand_manifest["tasks"])
    logs = load_logged(logs_path, tasks, attribution)
    since, until = run_span(root, run)
    kept, to_canary, info = canary_evidence(logs, str(run.get("old")), version, float(run["share"]), since, until)
    hours = max((info["period_ms"][1] - info["period_ms"][0]) / 3.6e6, 1e-6)
    task = gate_task(cand_manifest, cfg.task)
    weights = {cfg.task: 1.0} if cfg.task is not None else score_weights(cand_manifest)
    out = judge_canary(kept, to_canary, tasks, weights, cfg, hours, gate_task=task)
    value = out.pop("value")
    if fidelity:
        period = info["period_ms"]
        window = load_window(logs_path, tasks, attribution, int(period[0]), int(period[1]) + 1)
        fid = gate_fidelity(cand_dir, cand_manifest, bundle.resolve_bundle(root), cur_manifest, window, cfg)
    else:
        fid = {"passed": True, "source": "not judged (value only)"}
    decision = "refuse" if not fid["passed"] else out["decision"]
    reasons = [r for r in (None if fid["passed"] else fid["why"], None if out["decision"] == "promote"
                           else out["why"]) if r]
    t = value["tasks"].get(task, {})
    ratio = None
    if "target_ratio" in logs.decisions.column_names:
        tr = np.asarray(logs.decisions.column("target_ratio").to_numpy(zero_copy_only=False), dtype=np.float64)
        ratio = float(np.nanmedian(tr)) if np.isfinite(tr).any() else None
    estimate = {"evidence": "canary", "task": task, "decision": decision, "value": value["difference"],
                "value_ci": value["difference_ci"], "value_current": value["current"],
                "value_relative": value["relative"], "mde_relative": out.get("mde_relative"),
                **{k: t.get(k) for k in ("candidate", "current", "difference", "difference_ci")},
                "positives_in_sample": sum(t.get("kept_positives", {}).values()),
                "rows": value["rows"], "share": run["share"]}
    result = {"candidate": version, "current": current, "evidence": "canary",
              "gated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "targets": {"r": ratio, "source": "logged target_ratio (median over the canary's period)"},
              "canary": {"share": run["share"], "started": run.get("at"), "started_by": run.get("who"), **info},
              "window": {"logs": str(logs_path), "layout": "logged", "from_ms": info["period_ms"][0],
                         "to_ms": info["period_ms"][1], "rows": info["rows"],
                         "labels_as_of_ms": logs.info.get("as_of_ms")},
              "fidelity": fid, "value": value, "estimate": estimate,
              "verdict": out,
              "decision": decision, "passed": decision == "promote", "reasons": reasons}
    result = _finite(result)
    if write:
        registry.write_gate(cand_dir, result)
    return result




def value_summary(result: dict[str, Any]) -> dict[str, Any]:
    """What status and /metrics show of a canary judgement: per-arm value with intervals, the
    difference, the guard rails, the decision."""
    v, verdict = result["value"], result.get("verdict") or {}
    return {"version": result["candidate"], "current": result["current"], "decision": result["decision"],
            "value_decision": verdict.get("decision"), "why": verdict.get("why"), "arms": v.get("arms"),
            "difference": v.get("difference"), "difference_ci": v.get("difference_ci"),
            "relative": v.get("relative"), "rows": v.get("rows"), "confidence": v.get("confidence"),
            "guard_rails": {t: g.get("state") for t, g in (verdict.get("guard_rails") or {}).items()},
            "period_ms": (result.get("canary") or {}).get("period_ms"), "unit": v.get("unit")}


class WatchMetrics:
    """The watcher's Prometheus registry; `health()` as stream.metrics.MetricsServer expects."""

    DECISIONS = ("promote", "refuse", "inconclusive", "waiting", "none")

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        r = self.registry = CollectorRegistry()
        self.value = Gauge("rta_canary_value", "Each arm's value (share of current's kept positives, "
                           "score-weighted) on its matured rows, with its interval.", ["arm", "bound"], registry=r)
        self.difference = Gauge("rta_canary_value_difference", "Canary minus current value, with its interval.",
                                ["bound"], registry=r)
        self.decision = Gauge("rta_canary_value_decision", "The newest judgement of the canary's arms (1 = it).",
                              ["decision"], registry=r)
        self.rounds = Counter("rta_canary_watch_rounds", "Judgements made.", registry=r)
        self.stops = Counter("rta_canary_watch_stops", "Canaries stopped on a value guard rail.", registry=r)
        self.last: dict[str, Any] = {"state": "none"}

    def observe(self, rec: dict[str, Any]) -> None:
        self.rounds.inc()
        self.last = rec
        state = rec.get("decision") or rec.get("state", "none")
        for d in self.DECISIONS:
            self.decision.labels(d).set(1.0 if d == state else 0.0)
        for arm, a in (rec.get("arms") or {}).items():
            for bound, x in zip(("point", "low", "high"), [a.get("value"), *(a.get("ci") or [None, None])],
                                strict=True):
                self.value.labels(arm, bound).set(math.nan if x is None else x)
        for bound, x in zip(("point", "low", "high"), [rec.get("difference"), *(rec.get("difference_ci") or
                                                                                 [None, None])], strict=True):
            self.difference.labels(bound).set(math.nan if x is None else x)

    def health(self) -> tuple[bool, dict[str, Any]]:
        alerts = ["canary_value_refused"] if self.last.get("stopped") else []
        return self.last.get("state") != "error", {"last": self.last, "alerts": alerts}


def watch_once(model_dir: Any, logs_path: Any, cfg: Any, attribution: Any, audit: Any = None,
               who: str = "canary-watch", stop: bool = True) -> dict[str, Any]:
    """One judgement of the canary in force on its arms' matured outcomes: written to
    <model_dir>/canary-value.json; a value guard rail breached with confidence (the judge's
    `refuse`: the value difference, or a guarded task's, below its floor beyond the interval)
    stops it through the audited path (`stream.canary.stop(automatic=True)`)."""
    from pathlib import Path

    from model import bundle
    from stream import canary
    from stream.errors import BundleError, DataError

    root = Path(model_dir)
    state = canary.read_canary(root)
    if state is None:
        return {"state": "none", "at_ms": int(time.time() * 1000)}
    current = bundle.current_version(root)
    run, why = canary_applies(root, state.version, current)
    rec: dict[str, Any] = {"state": "waiting", "version": state.version, "at_ms": int(time.time() * 1000)}
    if run is None:
        return {**rec, "why": why or f"no canary-start of {state.version} in registry.jsonl"}
    try:
        result = canary_gate(root, state.version, logs_path, cfg, attribution, run=run, write=False,
                             fidelity=False)
    except (ValueError, DataError) as exc:  # no decision of the canary logged yet, no matured row yet
        return {**rec, "why": str(exc)}
    rec = {**rec, "state": "judged", **value_summary(result)}
    if stop and (result.get("verdict") or {}).get("decision") == "refuse":
        why = " ".join(str(result["verdict"]["why"]).split())
        try:
            entry = canary.stop(root, who, f"automatic rollback: value guard rail: {why}", audit, automatic=True,
                                evidence={k: rec[k] for k in ("arms", "difference", "difference_ci", "rows",
                                                              "guard_rails", "period_ms")},
                                expect_version=state.version)
            rec["stopped"] = entry is not None
        except (BundleError, OSError) as exc:
            rec.update(stopped=False, stop_error=str(exc))
    from model.bundle import _atomic_write

    _atomic_write(root / VALUE_FILE, json.dumps(rec, default=str).encode())
    return rec


def _cli() -> Any:
    import json
    from pathlib import Path

    import click

    @click.command("canary-judge")
    @click.argument("version")
    @click.option("--model-dir", required=True, type=click.Path(path_type=Path), help="Model directory.")
    @click.option("--logs", "logs_path", required=True, type=LOCATION,
                  help="`rta log`'s layout holding the canary's period.")
    @click.option("--attribution", default=None, help="Attribution windows, e.g. 'click=15m,deal=7d'.")
    @click.option("--as-of-ms", type=int, default=None, help="Labels as of [default: the log's as-of].")
    @click.option("--min-positives", type=click.IntRange(min=1), default=10, show_default=True)
    @click.option("--non-inferiority", type=float, default=0.01, show_default=True)
    @click.option("--guard-margin", type=float, default=0.05, show_default=True)
    @click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
    def judge_cmd(version: str, model_dir: Path, logs_path: Path, attribution: str | None, as_of_ms: int | None,
                  min_positives: int, non_inferiority: float, guard_margin: float, seed: int) -> None:
        """Judge a canary on its own arm's matured outcomes (the gate's rule): JSON, exit 0 promote,
        3 refuse, 4 inconclusive. Promoting stays `rta model promote` (this is the evidence)."""
        from training.gate import GateConfig, outcome_line
        from training.logs import Attribution
        from training.model_cli import exit_code

        cfg = GateConfig(min_positives=min_positives, non_inferiority=non_inferiority, guard_margin=guard_margin,
                         seed=seed)
        from stream.errors import DataError

        try:
            out = canary_gate(model_dir, version, logs_path, cfg, Attribution.parse(attribution, as_of_ms),
                              write=False)
        except ValueError as exc:  # the logs hold none of the canary's decisions: one line, not a traceback
            raise DataError(f"{logs_path}: {exc}") from exc
        click.echo(f"[rta model] canary evidence: {outcome_line(out)}", err=True)
        click.echo(json.dumps(out, default=str))
        raise SystemExit(exit_code(out))

    @click.command("canary-watch")
    @click.option("--model-dir", required=True, type=click.Path(path_type=Path), help="Model directory.")
    @click.option("--logs", "logs_path", required=True, type=LOCATION,
                  help="`rta log`'s layout the logger writes (read again each round).")
    @click.option("--interval", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
                  help="Seconds between judgements.")
    @click.option("--once", is_flag=True, help="One judgement, then exit (cron).")
    @click.option("--attribution", default=None, help="Attribution windows, e.g. 'click=15m,deal=7d'.")
    @click.option("--min-positives", type=click.IntRange(min=1), default=10, show_default=True)
    @click.option("--non-inferiority", type=float, default=0.01, show_default=True)
    @click.option("--guard-margin", type=float, default=0.05, show_default=True)
    @click.option("--confidence", type=float, default=0.99, show_default=True,
                  help="Of the intervals a stop needs (every round looks again: stricter than the gate's 0.95).")
    @click.option("--stop/--no-stop", "stop_", default=True, show_default=True,
                  help="Stop the canary (audited) when its value guard rail is breached with confidence.")
    @click.option("--audit-topic/--no-audit-topic", default=True, show_default=True,
                  help="Record a stop on the Kafka audit topic first.")
    @click.option("--metrics-port", type=int, default=None, help="Serve /metrics and /healthz on this port.")
    @click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, help="Config file.")
    def watch_cmd(model_dir: Path, logs_path: Path, interval: float, once: bool, attribution: str | None,
                  min_positives: int, non_inferiority: float, guard_margin: float, confidence: float, stop_: bool,
                  audit_topic: bool, metrics_port: int | None, config_file: str | None) -> None:
        """Judge the canary in force on its arms' matured outcomes every --interval seconds:
        per-arm value with intervals to <model_dir>/canary-value.json (`rta model canary status`)
        and /metrics; stop it (audited, automatic) when a value guard rail is breached."""
        import signal

        from stream.config import load_settings
        from stream.metrics import MetricsServer
        from stream.operators import produce_audit
        from training.gate import GateConfig
        from training.logs import Attribution

        cfg = GateConfig(min_positives=min_positives, non_inferiority=non_inferiority, guard_margin=guard_margin,
                         confidence=confidence, boot=400)
        Attribution.parse(attribution)  # a bad --attribution is one line now, not on the first round
        settings = load_settings(config_file)
        audit = (lambda entry: produce_audit(settings, entry, key=b"model")) if audit_topic else None
        metrics = WatchMetrics()
        server = MetricsServer(metrics, "0.0.0.0", metrics_port) if metrics_port is not None else None  # type: ignore[arg-type]
        done = []
        signal.signal(signal.SIGTERM, lambda *_: done.append(1))
        try:
            while not done:
                try:
                    rec = watch_once(model_dir, logs_path, cfg, Attribution.parse(attribution), audit, stop=stop_)
                except Exception as exc:  # noqa: BLE001 - one bad round (a torn file) never stops the watch
                    rec = {"state": "error", "why": f"{type(exc).__name__}: {exc}".splitlines()[0]}
                metrics.observe(rec)
                click.echo(json.dumps(rec, default=str))
                if rec.get("stopped"):
                    click.echo(f"[rta model] canary {rec['version']} stopped: {rec['why']}", err=True)
                if once:
                    return
                end = time.monotonic() + interval
                while not done and time.monotonic() < end:
                    time.sleep(min(0.2, interval))
        finally:
            if server is not None:
                server.close()

    return judge_cmd, watch_cmd


judge_cmd, watch_cmd = _cli()
