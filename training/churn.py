"""Decision churn between two models: the share of requests whose pass/block flips at the same r.

A retrained model that keeps the same value but flips many decisions still moves traffic
between advertisers (the Airbnb seed: self-distillation toward the previous model halved
churn). `rta model diff A B --logs DIR` replays both bundles on the same rows with the same
targets, the same controller settings and the same explore draws, so a flip is the models'
doing, not the sampling's. Flips are broken down by each model's reason and by the reason
pair; value kept by each model is reported beside it (labels of a world log, or the off-policy
estimate of a logged layout), so churn can be weighed against what it buys.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from stream.policy import REASONS, ScorePolicy
from stream.scorer import Scorer
from training.logs import Attribution, LogSet, load_logs
from training.replay import (
    ReplayConfig,
    Run,
    Scored,
    Step,
    ope,
    replay_live,
    score_logs,
    value_kept,
)


def load_window(logs: LogSet | str | Path, tasks: tuple[str, ...], attribution: Attribution | None = None,
                from_ms: int | None = None, until_ms: int | None = None) -> LogSet:
    """The rows of `logs` with from_ms <= ts_ms < until_ms (either bound optional)."""
    if not isinstance(logs, LogSet):
        logs = load_logs(logs, tasks, attribution)
    return logs.between(from_ms, until_ms)


def replay_pair(model_a: str | Path, model_b: str | Path, logs: LogSet, step: Step, seed: int = 0,
                speedup: float = 1.0, threads: int = 1) -> tuple[Scored, Run, Scored, Run]:
    """Both models through the worker's engine on the same rows, targets and explore draws."""
    out: list[Any] = []
    for model in (model_a, model_b):
        scorer = Scorer.load(model, intra_threads=threads)
        sc = score_logs(logs, scorer, ScorePolicy.from_manifest(scorer.manifest))
        cfg = ReplayConfig(steps=[step], seed=seed, speedup=speedup)
        out += [sc, replay_live(sc, [step], cfg, name=f"{scorer.version} at {step.label()}")]
    return out[0], out[1], out[2], out[3]


def flips(run_a: Run, run_b: Run) -> dict[str, Any]:
    """Share of rows whose decision differs, overall and per reason (of A, of B, and the pair)."""
    n = len(run_a.block)
    flip = run_a.block != run_b.block
    names = np.asarray(REASONS, dtype=object)

    def by(reason: np.ndarray) -> dict[str, dict[str, float]]:
        rows = np.bincount(reason, minlength=len(REASONS))
        flipped = np.bincount(reason[flip], minlength=len(REASONS))
        return {names[i]: {"rows": int(rows[i]), "flipped": int(flipped[i]), "share": float(flipped[i] / rows[i])}
                for i in range(len(REASONS)) if rows[i]}

    pair = run_a.reason[flip].astype(np.int64) * len(REASONS) + run_b.reason[flip]
    counts = np.bincount(pair, minlength=len(REASONS) ** 2)
    transitions = {f"{names[i // len(REASONS)]}->{names[i % len(REASONS)]}": int(c)
                   for i, c in enumerate(counts) if c}
    return {"rows": n, "flipped": int(flip.sum()), "share": float(flip.mean()) if n else math.nan,
            "pass_to_block": float((~run_a.block & run_b.block).mean()) if n else math.nan,
            "block_to_pass": float((run_a.block & ~run_b.block).mean()) if n else math.nan,
            "by_reason_a": by(run_a.reason), "by_reason_b": by(run_b.reason),
            "transitions": transitions}


def _value(sc: Scored, run: Run) -> dict[str, Any] | None:
    """What each model keeps: labels/truth of a world log, the off-policy estimate of a logged layout."""
    if sc.logs.decisions is not None:
        est = ope(sc, run) or {}
        return {"source": "off-policy estimate (explore slice)",
                "tasks": {t: {k: v.get(k) for k in ("kept", "kept_ci", "kept_share")}
                          for t, v in est.get("tasks", {}).items()}}
    if sc.logs.masked:
        return None
    q = sc.logs.truth if sc.logs.truth is not None else sc.logs.labels
    q = q[sc.order]
    return {"source": "true probabilities" if sc.logs.truth is not None else "labels",
            "tasks": {t: {k: value_kept(run.block, q[:, j])[k] for k in ("kept", "kept_share")}
                      for j, t in enumerate(sc.tasks)}}


def diff_models(model_a: str | Path, model_b: str | Path, logs: LogSet | str | Path, step: Step,
                attribution: Attribution | None = None, seed: int = 0, speedup: float = 1.0,
                from_ms: int | None = None, until_ms: int | None = None) -> dict[str, Any]:
    """The churn report of `rta model diff A B`."""
    tasks = tuple(Scorer.load(model_a).tasks)
    window = load_window(logs, tasks, attribution, from_ms, until_ms)
    sc_a, run_a, sc_b, run_b = replay_pair(model_a, model_b, window, step, seed, speedup)
    return {"a": sc_a.model, "b": sc_b.model, "logs": window.source, "rows": len(window),
            "window": {"from_ms": int(window.ts_ms.min()), "to_ms": int(window.ts_ms.max())},
            "targets": {"r": step.r, "p_u": step.p_u, "epsilon": step.epsilon}, "seed": seed,
            "block_share": {"a": float(run_a.block.mean()), "b": float(run_b.block.mean())},
            "churn": flips(run_a, run_b), "value": {"a": _value(sc_a, run_a), "b": _value(sc_b, run_b)}}
