"""`rta bench gate`: does the promotion gate tell a better model from a worse one?

A world with a new source (docs/world.md) from 50% of its rows on. `current` is trained on the
rows before the new source. Candidates are made by recipes, and each one's TRUE value difference
is then read off the world's true probabilities on the gate's window (the gate's own value,
with y = the true probability on every row: no label noise, no off-policy step):

* with-new (seeds 0, 1): trained on rows that contain the new source (meant to be better);
* same-data: the current's rows and profile, another seed (meant to be equal);
* copy: the current bundle itself (exactly equal);
* deal-noised: the current's rows with 30% of the deal labels shuffled;
* deal-shuffled: the current's rows with every deal label shuffled (a shuffled deal head).

Small models on small data are noisy (another seed can cost 10 %), so a recipe does not decide
its class: each candidate is classed by its measured true difference (gain >= 2 %, |d| < 1 %,
loss >= 2 %; in between: not classed), which is what the acceptance bars speak of.

Training on 2 shared cores is the expensive part, so each candidate is trained ONCE; what
varies across seeds is the gate's evidence: every seed redraws the window's labels from the
true probabilities and logs the window again as `current` serving it (its own explore draws
and outcome delays, `training/offline_log.py`), then gates each candidate against `current`.
The rates are the gate's sampling error on fixed models, not the spread of training runs.
Prints one JSON object; `--plot` writes the figure of docs/results.md.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow.parquet as pq

WINDOWS = "click=300s,online=300s,cart=300s,deal=900s"


def _train(logs: Path, model_dir: Path, version: str, seed: int, profile: str) -> Path:
    """Train one model, or reuse it from an earlier run in the same --workdir (same world seed,
    same rows, same training seed: the same model)."""
    from model import bundle
    from training.pipeline import run_training
    from training.profiles import get_profile

    if (model_dir / version / bundle.MANIFEST).is_file():
        return model_dir / version
    return run_training(logs, model_dir, get_profile(profile), seed=seed, version=version, report=False,
                        progress=False, threads=1)


def _true_value(cand: Path, current: Path, holdout: Any, targets: Any) -> dict[str, float]:
    """The value difference on the window's true probabilities (the gate's own estimator, with
    every row observed and y = the true probability: no sampling noise from labels)."""
    from training.gate import GateConfig, run_gate

    truth = replace(holdout, labels=holdout.truth.copy())
    res = run_gate(cand, current, truth, targets, GateConfig(fidelity="no-regression", boot=100, window_fidelity=False),
                   holdout_from_ms=0, write=False)
    v = res["value"]
    return {"difference": _num(v["difference"]), "relative": _num(v["relative"]),
            "tasks": {t: _num(tv["relative"]) for t, tv in v["tasks"].items()}}


def _needs(lower: dict[str, list[float]], truth: dict[str, Any], delta: float, margin: float) -> dict[str, Any]:
    """Per check (the value, each guard rail): the median lower-side MDE (80 % power, share of
    current's; the lower bound is what promote / holds read) and how many times today's evidence
    (rows, or epsilon: the explore-only variance ~ sum(p) / epsilon) 80 % power to promote needs
    at this true difference: (MDE / (true + delta or margin))^2."""
    out = {}
    for t, v in lower.items():
        true = truth["relative"] if t == "value" else truth["tasks"].get(t, math.nan)
        m = float(np.nanmedian(v))
        room = true + (delta if t == "value" else margin)
        out[t] = {"true": round(true, 4), "lower_side_mde": round(m, 4),
                  "evidence_factor_80": round((m / room) ** 2, 2) if room > 0 else None}
    return out


@click.command("gate")
@click.option("--rows", type=click.IntRange(min=6_000), default=30_000, show_default=True,
              help="World rows (1000 per event-second); the last third is the gate's window.")
@click.option("--seeds", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--profile", default="tiny", show_default=True, help="Training profile of every model.")
@click.option("--explore", type=float, default=0.05, show_default=True, help="epsilon of the logged window.")
@click.option("--ratio", type=float, default=0.5, show_default=True)
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write the rates as a PNG here.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="Keep the models and logs here.")
@click.option("--window-rows", type=click.IntRange(min=1_000), default=None,
              help="Rows of the gate's window (default: a third of --rows); the models still train on the "
                   "first two thirds of --rows. The demo's gate window is ~36k rows.")
@click.option("--interval", "explore_interval", type=click.Choice(["gamma", "bootstrap", "widening"]),
              default="gamma", show_default=True, help="GateConfig.explore_interval.")
@click.option("--reward-model", type=click.Choice(["binned", "scaled"]), default="binned", show_default=True,
              help="GateConfig.reward_model (DR's q).")
def gate(rows: int, seeds: int, profile: str, explore: float, ratio: float, plot: Path | None,
         workdir: Path | None, window_rows: int | None, explore_interval: str, reward_model: str) -> None:
    """Promote / refuse / inconclusive rates of the gate per candidate class over seeds."""
    from stream.policy import Targets
    from training.gate import GateConfig, run_gate
    from training.logs import Attribution, load_logs
    from training.offline_log import make_logged_layout
    from training.replay import Step
    from training.world import WorldConfig, write

    t0 = time.perf_counter()
    tmp = Path(workdir or tempfile.mkdtemp(prefix="rta-bench-gate-"))
    cut_new, cut_gate = rows // 2, rows * 2 // 3
    total = cut_gate + (window_rows or rows - cut_gate)
    cfg = WorldConfig(span_days=total / 1000.0 / 86_400.0, new_source_from=cut_new / total, new_source_share=0.10,
                      new_source_units="smaller")
    write(tmp / "world", total, seed=7, config=cfg, progress=False)
    table = pq.read_table(tmp / "world").sort_by("ts_ms")
    pq.write_table(table.slice(0, cut_new), tmp / "old.parquet")
    pq.write_table(table.slice(0, cut_gate), tmp / "with-new.parquet")
    noised = table.slice(0, cut_new)
    deal = noised["deal"].to_numpy().copy()
    rng = np.random.default_rng(11)
    pick = np.flatnonzero(rng.random(len(deal)) < 0.30)
    deal[pick] = deal[rng.permutation(pick)]
    noised = noised.set_column(noised.schema.get_field_index("deal"), "deal", pq_array(deal))
    pq.write_table(noised, tmp / "noised.parquet")
    pq.write_table(table.slice(cut_gate), tmp / "holdout.parquet")
    models = tmp / "models"
    deal_all = table.slice(0, cut_new)
    deal_all = deal_all.set_column(deal_all.schema.get_field_index("deal"), "deal",
                                   pq_array(rng.permutation(deal_all["deal"].to_numpy())))
    pq.write_table(deal_all, tmp / "deal-shuffled.parquet")
    pool = {"old-s0": _train(tmp / "old.parquet", models, "old-s0", 0, profile),
            "old-s1": _train(tmp / "old.parquet", models, "old-s1", 1, profile),
            "with-new-s0": _train(tmp / "with-new.parquet", models, "with-new-s0", 0, profile),
            "with-new-s1": _train(tmp / "with-new.parquet", models, "with-new-s1", 1, profile),
            "deal-noised-s0": _train(tmp / "noised.parquet", models, "deal-noised-s0", 0, profile),
            "deal-shuffled-s0": _train(tmp / "deal-shuffled.parquet", models, "deal-shuffled-s0", 0, profile)}
    currents = ("old-s0", "old-s1")  # each serves in turn; every other model is its candidate
    for cur in currents:
        if not (models / f"copy-of-{cur}").is_dir():
            shutil.copytree(pool[cur], models / f"copy-of-{cur}")
    train_s = time.perf_counter() - t0
    holdout = load_logs(tmp / "holdout.parquet")
    targets = Targets(ratio, 0.02, explore)
    pairs = [(cur, k) for cur in currents for k in [*pool, f"copy-of-{cur}"] if k != cur]

    def path(k: str) -> Path:
        return models / k

    truth = {(cur, k): _true_value(path(k), path(cur), holdout, targets) for cur, k in pairs}
    counts = {pk: {"promote": 0, "refuse": 0, "inconclusive": 0} for pk in pairs}
    mde, est, lines = [], {pk: [] for pk in pairs}, []
    cfg_of = {s: GateConfig(fidelity="no-regression", boot=500, seed=s, window_fidelity=False,
                            explore_interval=explore_interval, reward_model=reward_model) for s in range(seeds)}
    task_mde: dict[str, list[float]] = {}
    explored: dict[str, list[int]] = {}
    lower: dict[tuple[str, str], dict[str, list[float]]] = {pk: {} for pk in pairs}
    z_sum = (1.959964 + 0.8416) / 1.959964  # (z_a + z_b) / z_a: a lower half-width -> an MDE
    for s in range(seeds):
        rs = np.random.default_rng(1000 + s)
        # one uniform per row: every task's label has its true marginal and the funnel stays
        # nested (a deal implies an online visit), which the offline log's outcomes assume
        drawn = replace(holdout, labels=(rs.random((len(holdout), 1)) < holdout.truth).astype(np.float32))
        for cur in currents:
            log = tmp / f"log-{cur}-{s}"
            info = make_logged_layout(path(cur), drawn, log, Step(ratio, 0.02, explore), seed=s)
            att = Attribution.parse(WINDOWS, info["newest_event_ms"] + 86_400_000)
            logged = load_logs(log, ("click", "online", "cart", "deal"), att)  # read once, gated 6 times
            for c, k in pairs:
                if c != cur:
                    continue
                res = run_gate(path(k), path(cur), logged, targets, cfg_of[s], holdout_from_ms=0, write=False)
                counts[(cur, k)][res["decision"]] += 1
                rel = _num(res["value"]["relative"])
                est[(cur, k)].append(rel)
                mde.append(_num(res["verdict"]["mde_relative"]))
                for t, tv in res["value"]["tasks"].items():  # each guard rail's own MDE, in % of current's
                    lo_t, hi_t = (_num(x) for x in tv["difference_ci"])
                    task_mde.setdefault(t, []).append((1.959964 + 0.8416) * (hi_t - lo_t) / (2 * 1.959964)
                                                      / max(_num(tv["current"]), 1e-9))
                    explored.setdefault(t, []).append(tv["explore_only_positives"]["candidate_side"])
                for t, tv in [("value", res["value"]), *res["value"]["tasks"].items()]:
                    lower[(cur, k)].setdefault(t, []).append(
                        z_sum * (_num(tv["difference"]) - _num(tv["difference_ci"][0])) / max(_num(tv["current"]), 1e-9))
                lo, hi = (_num(x) / _num(res["value"]["current"]) for x in res["value"]["difference_ci"])
                lines.append(f"seed {s} {k} vs {cur}: {res['decision']} {rel:+.2%} [{lo:+.2%}, {hi:+.2%}]")
            shutil.rmtree(log, ignore_errors=True)
    classes: dict[str, list[tuple[str, str]]] = {"gain>=2%": [], "equal(|d|<1%)": [], "loss>=2%": [],
                                                 "unclassed": []}
    for pk in pairs:
        d = truth[pk]["relative"]
        classes["gain>=2%" if d >= 0.02 else "loss>=2%" if d <= -0.02 else
                "equal(|d|<1%)" if abs(d) < 0.01 else "unclassed"].append(pk)
    window_rows = len(holdout)
    out = {
        "rows": rows, "window_rows": window_rows, "seeds": seeds, "explore_interval": explore_interval,
        "reward_model": reward_model, "profile": profile, "explore": explore,
        "ratio": ratio, "varies_across_seeds": "the window's labels (redrawn from the true probabilities), "
        "explore draws and outcome delays of the logged window; each class's model is trained once",
        "candidates": {f"{k} vs {cur}": {"true_relative": round(truth[(cur, k)]["relative"], 4),
                                         "rates": {d: n / seeds for d, n in counts[(cur, k)].items()},
                                         "estimated_relative_median": round(float(np.nanmedian(est[(cur, k)])), 4),
                                         "checks": _needs(lower[(cur, k)], truth[(cur, k)],
                                                          cfg_of[0].non_inferiority, cfg_of[0].guard_margin)}
                       for cur, k in pairs},
        "classes": {c: {"candidates": [f"{k} vs {cur}" for cur, k in ks], "runs": seeds * len(ks),
                        "rates": {d: sum(counts[k][d] for k in ks) / (seeds * len(ks)) if ks else None
                                  for d in ("promote", "refuse", "inconclusive")}}
                    for c, ks in classes.items()},
        "mde_relative_median": round(float(np.nanmedian(mde)), 4),
        # the demo's gate window is ~36k rows (18 s at 2k req/s); an MDE scales as 1/sqrt(rows)
        "mde_relative_at_36k_rows": round(float(np.nanmedian(mde)) * (window_rows / 36_000) ** 0.5, 4),
        "mde_relative_at_5k_rows": round(float(np.nanmedian(mde)) * (window_rows / 5_000) ** 0.5, 4),
        "guard_rail_mde_relative_median": {t: round(float(np.nanmedian(v)), 4) for t, v in task_mde.items()},
        "explored_positives_candidate_side_median": {t: float(np.median(v)) for t, v in explored.items()},
        "seconds": {"train": round(train_s, 1), "total": round(time.perf_counter() - t0, 1)},
        "workdir": str(tmp), "runs": lines,
    }
    click.echo(json.dumps(out, indent=1))
    if plot is not None:
        _plot(out, plot)


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def pq_array(values: np.ndarray) -> Any:
    import pyarrow as pa

    return pa.array(values)


def _plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.2))
    cands = out["candidates"]
    names = sorted(cands, key=lambda k: -cands[k]["true_relative"])
    bottom = np.zeros(len(names))
    for d, colour in (("promote", "#2a9d8f"), ("inconclusive", "#e9c46a"), ("refuse", "#e76f51")):
        v = np.array([cands[k]["rates"][d] for k in names])
        ax.bar(names, v, bottom=bottom, color=colour, label=d)
        bottom += v
    ax.set_xticks(range(len(names)), [f"{k.replace(' vs ', chr(10) + 'vs ')}\ntrue {cands[k]['true_relative']:+.1%}"
                                      for k in names], fontsize=6, rotation=0)
    ax.set_ylabel(f"share of {out['seeds']} seeds")
    ax.set_title(f"rta bench gate: {out['window_rows']}-row window, epsilon {out['explore']:g}")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
