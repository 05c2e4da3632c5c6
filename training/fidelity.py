"""Teacher vs student: does the one-pass student keep what the M-pass teacher knows?

The paper's Fig. 3-5 claims the distilled model keeps the passing gains and the uncertainty
distribution, closest in the high-uncertainty region. This module measures that on held-out
traffic: rank agreement of uncertainties (Spearman, top-k overlap), the tail (quantile ratios
and Spearman within the teacher's top 10%), AUC of both, residual AUC after passing the most
uncertain (Fig. 3), deals kept downstream by click- vs deal-uncertainty (Fig. 4) and overlaid
uncertainty histograms (Fig. 5). Arrays in, a JSON-able dict (+ PNGs) out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from training.metrics import auc_roc, residual_mask, spearman, top_overlap

TOP_SHARES = (0.05, 0.10, 0.20)
CLICK_PASSING = (0.0, 0.05, 0.10, 0.15, 0.20)
DEAL_PASSING = (0.0, 0.005, 0.01, 0.015, 0.02)
DOWNSTREAM_PASSING = (0.0, 0.02, 0.05, 0.10, 0.15, 0.20)
DOWNSTREAM_BLOCK_SHARE = 0.5  # block this share of traffic; the pass budget is 1 - r
TAIL_QUANTILES = (0.5, 0.9, 0.99)


def residual_auc(y: np.ndarray, score: np.ndarray, u: np.ndarray, share: float) -> float:
    """AUC on the traffic left after passing the `share` most uncertain requests (by u)."""
    keep = residual_mask(u, share)
    return auc_roc(y[keep], score[keep])


def deals_kept(y: np.ndarray, score: np.ndarray, u: np.ndarray, share: float,
               block_share: float = DOWNSTREAM_BLOCK_SHARE) -> float:
    """Share of all positives passed downstream: the `share` most uncertain pass directly,
    the rest of the pass budget (1 - block_share) goes to the highest scores."""
    n = u.size
    budget = int(round((1.0 - block_share) * n))
    k = min(int(round(share * n)), budget)
    passed = np.zeros(n, bool)
    if k:
        passed[np.argpartition(-u, k - 1)[:k]] = True
    rest = np.flatnonzero(~passed)
    m = budget - k
    if m > 0:
        passed[rest[np.argpartition(-score[rest], m - 1)[:m]]] = True
    total = float(y.sum())
    return float(y[passed].sum() / total) if total else float("nan")


def _tail(t_u: np.ndarray, s_u: np.ndarray) -> dict[str, Any]:
    top = t_u >= np.quantile(t_u, 0.9)
    rho_top = spearman(t_u[top], s_u[top]) if top.sum() > 2 else float("nan")
    ratios = {f"q{int(q * 100)}": float(np.quantile(s_u, q) / max(np.quantile(t_u, q), 1e-30))
              for q in TAIL_QUANTILES}
    return {"spearman_top10": float(rho_top), "quantile_ratio_student_over_teacher": ratios}


def _uncertainty_fidelity(t_u: np.ndarray, s_u: np.ndarray) -> dict[str, Any]:
    return {
        "spearman": spearman(t_u, s_u),
        **{f"top{int(s * 100)}_overlap": top_overlap(t_u, s_u, s) for s in TOP_SHARES},
        **_tail(t_u, s_u),
    }


def fidelity_report(
    teacher_p: np.ndarray,
    teacher_u: np.ndarray,
    student_p: np.ndarray,
    student_u: np.ndarray,
    labels: np.ndarray,
    tasks: list[str] | tuple[str, ...],
    out_dir: str | Path | None = None,
    source_map: dict[str, str] | None = None,
    target_modes: dict[str, np.ndarray] | None = None,
    primary_mode: str = "student",
) -> dict[str, Any]:
    """Teacher vs student on one labelled set; all arrays [N, T] in `tasks` order.

    `target_modes` maps a target mode (e.g. "quantile") to the u [N, T] of a student that
    differs from the others only in that mode (same rows, same budget); the report says which
    keeps the teacher's high-uncertainty tail (`tail_winner`). The served student is not in
    that race: it may have had a larger budget. With `out_dir`, writes fidelity.json and three
    PNGs there.
    """
    tasks = list(tasks)
    col = {t: i for i, t in enumerate(tasks)}
    source_map = source_map or {}
    y = np.asarray(labels)
    report: dict[str, Any] = {"rows": int(y.shape[0]), "tasks": {}, "target_modes": {}}
    for t, j in col.items():
        auc_t, auc_s = auc_roc(y[:, j], teacher_p[:, j]), auc_roc(y[:, j], student_p[:, j])
        report["tasks"][t] = {
            "auc_teacher": auc_t, "auc_student": auc_s, "auc_gap": auc_t - auc_s,
            "uncertainty": _uncertainty_fidelity(teacher_u[:, j], student_u[:, j]),
        }
    for name, su in (target_modes or {}).items():
        report["target_modes"][name] = {t: _uncertainty_fidelity(teacher_u[:, j], su[:, j]) for t, j in col.items()}
    if target_modes:
        report["tail_winner"] = _tail_winner(report["target_modes"], tasks, source_map)
    modes = {f"served, {primary_mode}": student_u,
             **{f"{name}, comparison": su for name, su in (target_modes or {}).items()}}
    curves = _curves(teacher_p, teacher_u, student_p, student_u, y, col)
    report["residual_auc"] = curves["residual_auc"]
    report["deals_kept"] = curves["deals_kept"]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fidelity.json").write_text(json.dumps(report, indent=2))
        _plots(out, teacher_u, modes, tasks, curves)
        report["plots"] = ["fidelity_hist.png", "fidelity_residual_auc.png", "fidelity_deals_kept.png"]
    return report


def _tail_winner(by_mode: dict[str, dict[str, dict[str, Any]]], tasks: list[str],
                 source_map: dict[str, str]) -> dict[str, Any]:
    """Per source task: which target mode has the higher top-10% overlap (ties -> Spearman in tail)."""
    sources = sorted({source_map.get(t, t) for t in tasks} & set(tasks))
    out = {}
    for t in sources:
        scored = {m: (v[t]["top10_overlap"], v[t]["spearman_top10"]) for m, v in by_mode.items()}
        out[t] = {"best": max(scored, key=lambda m: scored[m]),
                  "top10_overlap": {m: s[0] for m, s in scored.items()},
                  "spearman_top10": {m: s[1] for m, s in scored.items()}}
    return out


def _curves(tp: np.ndarray, tu: np.ndarray, sp: np.ndarray, su: np.ndarray, y: np.ndarray,
            col: dict[str, int]) -> dict[str, Any]:
    """Fig. 3 (residual AUC vs passing) and Fig. 4 (deals kept) for teacher and student."""
    panels = []
    if "click" in col:
        panels.append(("click", "click", CLICK_PASSING))
    target = "deal" if "deal" in col else list(col)[-1]
    panels.append((target, target, DEAL_PASSING))
    if "click" in col and target != "click":
        panels.append((target, "click", DEAL_PASSING))
    residual: dict[str, Any] = {}
    for task, src, shares in panels:
        j, k = col[task], col[src]
        residual[f"{task}_by_{src}_u"] = {
            "passing": list(shares),
            "teacher": [residual_auc(y[:, j], tp[:, j], tu[:, k], s) for s in shares],
            "student": [residual_auc(y[:, j], sp[:, j], su[:, k], s) for s in shares],
        }
    kept: dict[str, Any] = {"passing": list(DOWNSTREAM_PASSING), "block_share": DOWNSTREAM_BLOCK_SHARE}
    j = col[target]
    for src in dict.fromkeys(["click", target]):
        if src not in col:
            continue
        k = col[src]
        kept[f"by_{src}_u"] = {
            "teacher": [deals_kept(y[:, j], tp[:, j], tu[:, k], s) for s in DOWNSTREAM_PASSING],
            "student": [deals_kept(y[:, j], sp[:, j], su[:, k], s) for s in DOWNSTREAM_PASSING],
        }
    return {"residual_auc": residual, "deals_kept": kept, "target": target}


def _plots(out: Path, teacher_u: np.ndarray, modes: dict[str, np.ndarray], tasks: list[str],
           curves: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Fig. 5: overlaid uncertainty histograms (log-spaced bins: the tail is what matters).
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for j, t in enumerate(tasks):
        ax = axes[0, j]
        vals = [teacher_u[:, j]] + [u[:, j] for u in modes.values()]
        pos = np.concatenate([v[v > 0] for v in vals])
        lo, hi = (np.quantile(pos, 0.001), pos.max()) if pos.size else (1e-8, 1.0)
        bins = np.geomspace(max(lo, 1e-12), max(hi, lo * 10, 1e-11), 60)
        ax.hist(np.clip(teacher_u[:, j], bins[0], None), bins=bins, histtype="stepfilled", alpha=0.35,
                label="teacher", color="k")
        for name, u in modes.items():
            comparison = name.endswith("comparison")
            ax.hist(np.clip(u[:, j], bins[0], None), bins=bins, histtype="step", lw=0.9 if comparison else 1.6,
                    ls="--" if comparison else "-", label=f"student ({name})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{t} uncertainty")
        ax.set_xlabel("u (teacher scale)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fidelity_hist.png", dpi=110)
    plt.close(fig)

    # Fig. 3: residual AUC after passing the most uncertain share.
    res = curves["residual_auc"]
    fig, axes = plt.subplots(1, len(res), figsize=(4.2 * len(res), 3.2), squeeze=False)
    for ax, (name, c) in zip(axes[0], res.items(), strict=True):
        x = 100 * np.asarray(c["passing"])
        ax.plot(x, c["teacher"], "o-", color="k", label="teacher (M SWAG passes)")
        ax.plot(x, c["student"], "s--", color="tab:blue", label="student (1 pass)")
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("passed directly (%)")
        ax.set_ylabel("residual AUC")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fidelity_residual_auc.png", dpi=110)
    plt.close(fig)

    # Fig. 4: positives of the target task kept downstream, by source of uncertainty.
    kept = curves["deals_kept"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    x = 100 * np.asarray(kept["passing"])
    colors = {"click": "tab:blue"}
    for key, c in kept.items():
        if not key.startswith("by_"):
            continue
        src = key[3:-2]
        color = colors.get(src, "tab:red")
        ax.plot(x, c["teacher"], "o-", color=color, label=f"teacher, {src}-u")
        ax.plot(x, c["student"], "s--", color=color, alpha=0.7, label=f"student, {src}-u")
    ax.set_xlabel("passed directly (%)")
    ax.set_ylabel(f"{curves['target']} kept downstream (share)")
    ax.set_title(f"block share {kept['block_share']:.0%}: direct pass + best scores")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fidelity_deals_kept.png", dpi=110)
    plt.close(fig)


def acceptance(report: dict[str, Any], source: str = "click") -> dict[str, Any]:
    """The issue's bar: Spearman >= 0.9 and top-10% overlap >= 0.8 on the source task,
    student AUC no more than 0.01 below the teacher's on every task (better is fine)."""
    src = report["tasks"].get(source) or next(iter(report["tasks"].values()))
    checks = {
        "spearman_source>=0.9": src["uncertainty"]["spearman"] >= 0.9,
        "top10_overlap_source>=0.8": src["uncertainty"]["top10_overlap"] >= 0.8,
        "auc_within_0.01_every_task": all(v["auc_gap"] <= 0.01 or np.isnan(v["auc_gap"])
                                          for v in report["tasks"].values()),
    }
    return {"passed": all(checks.values()), **checks}


# ---- the gate's fidelity: on the whole gate window, with intervals ---------------------------
LABEL_FREE_BARS = {"spearman_source": 0.9, "top10_overlap_source": 0.8}
P_RANK_BAR = 0.9  # teacher vs student probability ranks, every task
AUC_GAP_BAR = 0.01


def _boot_stat(fn: Any, arrays: tuple[np.ndarray, ...], boot: int, rng: np.random.Generator) -> np.ndarray:
    n = len(arrays[0])
    out = np.empty(boot)
    for b in range(boot):
        idx = rng.integers(0, n, n)
        out[b] = fn(*(a[idx] for a in arrays))
    return out


def window_fidelity(teacher_p: np.ndarray, teacher_u: np.ndarray, student_p: np.ndarray, student_u: np.ndarray,
                    labels: np.ndarray, tasks: list[str], source: str, boot: int = 200, confidence: float = 0.95,
                    seed: int = 0, min_positives: int = 50) -> dict[str, Any]:
    """Teacher vs student on the gate's window, every check with a bootstrap interval.

    Label-free (every row, no label needed): the source task's uncertainty Spearman and top-10 %
    overlap (the acceptance bars), and each task's probability-rank Spearman. Label-based (AUC
    gap teacher - student) only for tasks with `min_positives` matured positives; otherwise
    reported, not gating. A check FAILS only when its whole interval is on the wrong side of the
    bar (a 1,446-row validation set cannot tell 0.76 from 0.80; failing on a point estimate
    refused a model that kept 94 % of deals)."""
    rng = np.random.default_rng(seed)
    lo_q = (1 - confidence) / 2
    j = tasks.index(source) if source in tasks else 0

    def check(name: str, fn: Any, arrays: tuple[np.ndarray, ...], bar: float, higher_is_good: bool = True
              ) -> dict[str, Any]:
        point = float(fn(*arrays))
        b = _boot_stat(fn, arrays, boot, rng)
        b = b[np.isfinite(b)]
        ci = [float(np.quantile(b, lo_q)), float(np.quantile(b, 1 - lo_q))] if len(b) else [np.nan, np.nan]
        failed = (ci[1] < bar) if higher_is_good else (ci[0] > bar)
        return {"check": name, "value": point, "ci": ci, "bar": bar, "failed": bool(failed),
                "passed_point": bool(point >= bar if higher_is_good else point <= bar)}

    checks = [
        check(f"spearman_{tasks[j]}_uncertainty>={LABEL_FREE_BARS['spearman_source']}", spearman,
              (teacher_u[:, j], student_u[:, j]), LABEL_FREE_BARS["spearman_source"]),
        check(f"top10_overlap_{tasks[j]}_uncertainty>={LABEL_FREE_BARS['top10_overlap_source']}",
              lambda a, b: top_overlap(a, b, 0.1), (teacher_u[:, j], student_u[:, j]),
              LABEL_FREE_BARS["top10_overlap_source"]),
        *(check(f"spearman_{t}_p>={P_RANK_BAR}", spearman, (teacher_p[:, k], student_p[:, k]), P_RANK_BAR)
          for k, t in enumerate(tasks)),
    ]
    reported = []
    for k, t in enumerate(tasks):
        y = labels[:, k]
        ok = np.isfinite(y)
        pos = int(np.nansum(y[ok]))
        if pos < min_positives or pos == ok.sum():
            reported.append({"check": f"auc_gap_{t}<={AUC_GAP_BAR}", "positives": pos,
                             "note": f"fewer than {min_positives} matured positives: reported, not gating"})
            continue
        c = check(f"auc_gap_{t}<={AUC_GAP_BAR}", lambda yy, a, b: auc_roc(yy, a) - auc_roc(yy, b),
                  (y[ok], teacher_p[ok, k], student_p[ok, k]), AUC_GAP_BAR, higher_is_good=False)
        checks.append({**c, "positives": pos})
    failed = [c["check"] for c in checks if c["failed"]]
    return {"rows": int(len(teacher_u)), "bootstrap": boot, "confidence": confidence, "checks": checks,
            "not_gating": reported, "failed": failed, "passed": not failed}
