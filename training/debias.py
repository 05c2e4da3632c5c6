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

import json
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


# ---- the comparison of docs/results.md ------------------------------------------------------
def _blocked(bundle_dir: Any, test: LogSet, ratio: float) -> tuple[np.ndarray, Any]:
    """Which rows of `test` (in event-time order) a model blocks when the lowest-score `ratio`
    share is blocked, and its scores."""
    from stream.policy import ScorePolicy
    from stream.scorer import Scorer
    from training.replay import score_logs

    scorer = Scorer.load(bundle_dir, intra_threads=1)
    sc = score_logs(test, scorer, ScorePolicy.from_manifest(scorer.manifest))
    block = np.zeros(len(sc.e), bool)
    block[np.argsort(sc.e, kind="stable")[: int(round(ratio * len(sc.e)))]] = True
    return block, sc


def _evaluate(bundle_dir: Any, test: LogSet, ratio: float) -> dict[str, float]:
    """What a model does on a fresh world log with truth: deal calibration against the true
    probabilities, deal AUC on the sampled labels, and the deals kept when the lowest-score
    `ratio` share is blocked (against the oracle blocking as many)."""
    from training.metrics import auc_roc, calibration

    block, sc = _blocked(bundle_dir, test, ratio)
    j = list(test.tasks).index("deal")
    truth = test.truth[sc.order, j].astype(np.float64)
    y = test.labels[sc.order, j]
    p = sc.p[:, j].astype(np.float64)
    cal = calibration(p, truth, y)
    k = int(block.sum())
    total = truth.sum()
    return {"auc_deal": round(auc_roc(y, p), 4), "ece_deal": round(cal["ece_truth"], 5),
            "mean_p_over_truth": round(float(p.mean() / truth.mean()), 3),
            "deals_kept": round(1.0 - float(truth[block].sum()) / total, 4),
            "oracle_kept": round(1.0 - float(np.sort(truth)[:k].sum()) / total, 4)}


def compare(out: Any, rows: int = 150_000, profile_name: str = "tiny", ratio: float = 0.5,
            explore: float = 0.05, seeds: tuple[int, ...] = (0,), threads: int = 1) -> list[dict[str, Any]]:
    """For each seed: a model v0 trained on one world filters another at `ratio` (explore slice
    `explore`) into a logged layout; on those requests a model is trained with full labels and
    one per debias mode on the log; all are scored on a third, fresh world with truth."""
    from pathlib import Path

    from training.logs import Attribution, load_logs
    from training.offline_log import make_logged_layout
    from training.pipeline import run_training
    from training.profiles import get_profile
    from training.replay import Step
    from training.world import WorldConfig, write

    out = Path(out)
    profile = get_profile(profile_name, max_train_rows=None)
    results = []
    for seed in seeds:
        d = out / f"seed{seed}"
        worlds = {name: d / name for name in ("base", "logged", "test")}
        for i, (name, path) in enumerate(worlds.items()):
            if not path.exists():
                n = rows if name == "logged" else rows // 2
                # 1000 requests per event-second, as live: the filter's controller works on event
                # time (a week-long span would leave it in its cold start, passing everything)
                write(path, n, seed=1000 * seed + 100 * (i + 1), config=WorldConfig(span_days=n / 1000 / 86_400),
                      progress=False)
        models = d / "models"
        if not (models / "v0").exists():
            run_training(worlds["base"], models, profile, seed=seed, version="v0", report=False,
                         progress=False, threads=threads, publish=True)
        log_dir = d / "log"
        if not log_dir.exists():
            info = make_logged_layout(models / "v0", worlds["logged"], log_dir, Step(ratio, 0.02, explore),
                                      seed=seed)
            (d / "log.json").write_text(json.dumps(info))
        if json.loads((d / "log.json").read_text())["blocked"] == 0:
            raise DataError(f"{log_dir}: the logging filter blocked nothing; no bias to correct")
        newest = int(json.loads((d / "log.json").read_text())["newest_event_ms"])
        att = Attribution.parse("click=30m,online=30m,cart=30m,deal=30m", newest + 86_400_000)
        test = load_logs(worlds["test"])
        for mode in ("full labels", *DEBIAS_MODES):
            version = mode.replace(" ", "-")
            if not (models / version).exists():
                src = worlds["logged"] if mode == "full labels" else log_dir
                run_training(src, models, profile, seed=seed, version=version, report=False, progress=False,
                             threads=threads, attribution=att, debias="none" if mode == "full labels" else mode,
                             publish=False)
            results.append({"seed": seed, "training": mode, **_evaluate(models / version, test, ratio)})
        # retraining from v0 on its own log, with and without distilling toward v0's student:
        # decisions flipped against v0 at the same r on the fresh world, and what it costs
        base, _ = _blocked(models / "v0", test, ratio)
        for name, anchor in (("v0 (served)", None), ("retrained from v0", None), ("retrained, --anchor v0", "v0")):
            version = {"v0 (served)": "v0", "retrained from v0": "warm", "retrained, --anchor v0": "warm-anchor"}[name]
            if not (models / version).exists():
                run_training(log_dir, models, profile, seed=seed, version=version, report=False, progress=False,
                             threads=threads, attribution=att, parent=models / "v0",
                             anchor=None if anchor is None else models / anchor, publish=False)
            block, _ = _blocked(models / version, test, ratio)
            results.append({"seed": seed, "training": name, "churn_vs_v0": round(float((block != base).mean()), 4),
                            **_evaluate(models / version, test, ratio)})
    return results


def _table(results: list[dict[str, Any]]) -> str:
    head = ("| seed | trained on | deal AUC | deal ECE (truth) | mean p / mean truth | deals kept at r | oracle "
            "| decisions flipped vs v0 |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        churn = f"{r['churn_vs_v0']:.4f}" if "churn_vs_v0" in r else ""
        lines.append(f"| {r['seed']} | {r['training']} | {r['auc_deal']:.4f} | {r['ece_deal']:.5f} | "
                     f"{r['mean_p_over_truth']:.3f} | {r['deals_kept']:.4f} | {r['oracle_kept']:.4f} | {churn} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import sys

    import click

    @click.command()
    @click.option("--out", required=True, type=click.Path(file_okay=False))
    @click.option("--rows", type=int, default=150_000, show_default=True, help="Rows of the logged world.")
    @click.option("--profile", "profile_name", default="tiny", show_default=True)
    @click.option("--ratio", type=float, default=0.5, show_default=True)
    @click.option("--explore", type=float, default=0.05, show_default=True)
    @click.option("--seeds", default="0", show_default=True)
    def main(out: str, rows: int, profile_name: str, ratio: float, explore: float, seeds: str) -> None:
        """Full labels vs --debias none|ips|explore-only on the same requests (docs/results.md)."""
        res = compare(out, rows, profile_name, ratio, explore, tuple(int(s) for s in seeds.split(",")))
        click.echo(_table(res))
        click.echo(json.dumps(res), file=sys.stderr)

    main()
