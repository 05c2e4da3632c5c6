"""The promotion gate: is the candidate at least as good as the served model on traffic it never saw?

Rule (all must hold, else the candidate is refused):

1. the candidate bundle verifies (manifest, every file's sha256, feature spec);
2. fidelity: the student's recorded acceptance (`training/fidelity.py: acceptance`, stored in
   the manifest's `metrics.fidelity.acceptance` by distillation) passed (`required`, the
   default), or, with `no-regression`, no check fails that passes for the current model;
3. value: both models are replayed through the worker's engine (`training/replay.py`) on the
   newest logged window NOT used in training (rows with ts_ms > the candidate's lineage
   `data_to_ms`), at the live targets (Redis, else `--ratio`), same controller and explore
   draws. The value kept on the gate task (default: the task the score function weighs most,
   deal) is estimated for both on the SAME rows: on a logged layout, self-normalised IPS over
   the explore slice (`replay.ope_sample`, the estimator of `rta replay`); on a fully labelled
   world log, the labels themselves (weight 1). The interval is a paired percentile bootstrap
   (95%) of the DIFFERENCE candidate - current: each resample draws one set of rows and
   evaluates both models on it, so the noise the two estimates share (which positives happened
   to be in the explore slice) cancels; two separate intervals would overlap far more often
   and refuse nothing. The candidate is refused when the whole interval lies below zero
   (worse beyond the interval), or when the sample holds fewer than `min_positives` positives
   (no evidence is not evidence of no harm).

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
import pyarrow.dataset as ds

from model import bundle, registry
from stream.errors import BundleError, ConfigError, DataError
from stream.policy import Targets
from training.churn import flips, load_window, replay_pair
from training.logs import Attribution, is_logged_layout
from training.replay import Scored, Step, _finite, ope_sample

FIDELITY_MODES = ("required", "no-regression")


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

    def __post_init__(self) -> None:
        if self.fidelity not in FIDELITY_MODES:
            raise ConfigError(f"--fidelity must be one of {', '.join(FIDELITY_MODES)}, got {self.fidelity!r}")
        if self.boot < 100 or not 0.5 < self.confidence < 1 or self.min_positives < 1:
            raise ConfigError("gate: bootstrap >= 100, 0.5 < confidence < 1 and min positives >= 1")
        if self.window_hours is not None and not self.window_hours > 0:
            raise ConfigError(f"--window-hours must be > 0, got {self.window_hours}")


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


def newest_ts_ms(path: str | Path) -> int | None:
    """Newest ts_ms of a log path (the impressions of a logged layout), reading that column only."""
    root = Path(path)
    if not root.exists():
        return None
    if is_logged_layout(root):
        root = root / "impressions"
    try:
        col = ds.dataset(root, format="parquet", exclude_invalid_files=True).to_table(columns=["ts_ms"])["ts_ms"]
    except Exception:  # noqa: BLE001 - JSONL or an odd file: the caller asks for --holdout-from-ms
        return None
    import pyarrow.compute as pc

    return None if len(col) == 0 else int(pc.max(col).as_py())


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
    newest = newest_ts_ms(lin["logs"]) if lin.get("logs") else None
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


def _sample(sc: Scored, j: int) -> tuple[np.ndarray, np.ndarray, int, str]:
    """Rows, weights and population of the estimate: the explore slice of a logged layout, every
    labelled valid row of a world log."""
    if sc.logs.decisions is not None:
        mask, w, n_pop = ope_sample(sc, j)
        return mask, w, n_pop, "self-normalised IPS on the explore slice"
    mask = sc.valid & np.isfinite(sc.logs.labels[sc.order, j])
    return mask, np.ones(int(mask.sum())), int(mask.sum()), "labels of every row (world log)"


def paired_estimate(sc: Scored, j: int, passed_c: np.ndarray, passed_u: np.ndarray, boot: int,
                    confidence: float, seed: int) -> dict[str, Any]:
    """Value kept by candidate and current on one task and the paired bootstrap of their difference."""
    mask, w, n_pop, estimator = _sample(sc, j)
    y = np.nan_to_num(sc.logs.labels[sc.order][mask, j]).astype(np.float64)
    kc, ku = passed_c[mask].astype(np.float64), passed_u[mask].astype(np.float64)
    m = len(y)
    out: dict[str, Any] = {"estimator": estimator, "population": n_pop, "sample_rows": m,
                           "positives_in_sample": int(y.sum()),
                           "interval": f"paired percentile bootstrap ({boot}) of candidate - current, "
                                       f"{confidence:.0%}"}
    if m == 0 or w.sum() <= 0:
        return {**out, "candidate": math.nan, "current": math.nan, "difference": math.nan,
                "difference_ci": [math.nan, math.nan]}
    def est(k: np.ndarray) -> float:
        return n_pop * float((w * k * y).sum() / w.sum())

    rng = np.random.default_rng(seed)
    diff_b, c_b, u_b = np.empty(boot), np.empty(boot), np.empty(boot)
    for s in range(0, boot, 100):  # resample in blocks: bounded memory
        nb = min(100, boot - s)
        idx = rng.integers(0, m, (nb, m))
        wb, yb = w[idx], y[idx]
        sw = wb.sum(1)
        c_b[s:s + nb] = n_pop * (wb * kc[idx] * yb).sum(1) / sw
        u_b[s:s + nb] = n_pop * (wb * ku[idx] * yb).sum(1) / sw
        diff_b[s:s + nb] = c_b[s:s + nb] - u_b[s:s + nb]
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2

    def ci(b: np.ndarray) -> list[float]:
        return [float(np.quantile(b, lo_q)), float(np.quantile(b, hi_q))]

    c, u = est(kc), est(ku)
    return {**out, "ess": round(float(w.sum() ** 2 / (w ** 2).sum()), 1),
            "candidate": c, "candidate_ci": ci(c_b), "current": u, "current_ci": ci(u_b),
            "difference": c - u, "difference_ci": ci(diff_b),
            "positives": n_pop * float((w * y).sum() / w.sum())}


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
        result.update(verification=str(exc), passed=False)
        reasons.append(f"bundle verification failed: {exc}")
        result = _finite(result)
        if write and (cand_dir / bundle.MANIFEST).is_file():
            registry.write_gate(cand_dir, result)
        return result
    cur_manifest = bundle.read_manifest(cur_dir)
    fid = fidelity_check(cand_manifest, cur_manifest, cfg.fidelity)
    result["fidelity"] = fid
    if not fid["passed"]:
        reasons.append(fid["why"])

    from_ms, from_source = holdout_start(cand_dir, holdout_from_ms, cur_dir)
    window = load_window(logs, tuple(cand_manifest["tasks"]), attribution, from_ms)
    if cfg.window_hours is not None:
        window = load_window(window, window.tasks, None, int(window.ts_ms.max() - cfg.window_hours * 3_600_000))
    logged = window.decisions is not None
    if not logged and window.masked:
        raise DataError(f"{window.source}: the gate needs logged traffic (an `rta log` layout) or a world log "
                        "with every label")
    step = Step(targets.r, targets.p_u, targets.epsilon)
    sc_c, run_c, sc_u, run_u = replay_pair(cand_dir, cur_dir, window, step, cfg.seed, cfg.speedup)
    task = gate_task(cand_manifest, cfg.task)
    tasks = list(cand_manifest["tasks"])
    per_task = {t: paired_estimate(sc_c, j, ~run_c.block, ~run_u.block, cfg.boot, cfg.confidence, cfg.seed)
                for j, t in enumerate(tasks)}
    est = {"task": task, **per_task[task]}
    result.update(
        window={"logs": window.source, "layout": "logged" if logged else "world", "from_ms": int(window.ts_ms.min()),
                "to_ms": int(window.ts_ms.max()), "rows": len(window), "holdout_from_ms": from_ms,
                "holdout_from": from_source},
        estimate=est,
        tasks={t: {k: v.get(k) for k in ("candidate", "current", "difference", "difference_ci",
                                         "positives_in_sample")} for t, v in per_task.items()},
        block_share={"candidate": float(run_c.block.mean()), "current": float(run_u.block.mean())},
        churn={k: v for k, v in flips(run_u, run_c).items() if k in ("share", "pass_to_block", "block_to_pass")},
    )
    if est["positives_in_sample"] < cfg.min_positives:
        reasons.append(f"not enough evidence: {est['positives_in_sample']} {task} positives in the "
                       f"{est['sample_rows']}-row sample (need {cfg.min_positives})")
    elif est["difference_ci"][1] < 0:
        reasons.append(f"worse beyond the interval: {task} kept {est['candidate']:.1f} vs {est['current']:.1f} "
                       f"(difference {est['difference']:.1f}, {cfg.confidence:.0%} CI "
                       f"[{est['difference_ci'][0]:.1f}, {est['difference_ci'][1]:.1f}])")
    result["passed"] = not reasons
    result = _finite(result)
    if write:
        registry.write_gate(cand_dir, result)
    return result


def outcome_line(result: dict[str, Any]) -> str:
    """One line for the terminal."""
    head = f"{result['candidate']} vs {result['current']}: " + ("passed" if result.get("passed") else "refused")
    est = result.get("estimate")
    parts = [head]
    if est and est.get("difference") is not None and math.isfinite(est.get("difference", math.nan)):
        lo, hi = est["difference_ci"]
        parts.append(f"{est['task']} kept {est['candidate']:.1f} vs {est['current']:.1f}, difference "
                     f"{est['difference']:+.1f} [{lo:+.1f}, {hi:+.1f}] on {result['window']['rows']} rows "
                     f"at r={result['targets']['r']:g}")
    if result.get("reasons"):
        parts.append("; ".join(result["reasons"]))
    return "; ".join(parts)
