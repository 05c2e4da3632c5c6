"""Traffic the model has never seen: candidate epistemic signals, side by side, and what a filter keeps.

Used by `rta eval` when the logs carry the world's `true_source` column (docs/world.md "Shifts"):

* `candidate_signals`: per task, every candidate on the same rows: the teacher's SWAG measures
  (scale 1, the paper's; and a 10x covariance scale), the Mahalanobis distance of the teacher's
  representation (each task tower's input, one Gaussian fitted on training rows), and the input
  novelty statistics of `model/novelty.py` (weighted surprise, out-of-range share, unseen share).
* `ood_auroc`: AUROC of each signal for new-source (and drifting-client) rows against known rows.
* `deals_kept`: what a filter at block share r with uncertain-pass share p_u keeps of each
  source's deals (expected deals = sum of the true deal probability over passed rows, which
  has far less noise than the labels), against an oracle blocking the same share by the truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model.novelty import Novelty
from training.metrics import auc_roc

RATIOS = (0.3, 0.5)
PASS_SHARES = (0.0, 0.02, 0.05)
BIG_SCALE = 10.0


def read_sources(path: str | Path, request_id: np.ndarray) -> np.ndarray | None:
    """`true_source` per row of a log set (aligned on request_id), or None when the logs lack it."""
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or "true_source" not in pq.read_schema(files[0]).names:
        return None
    t = pa.concat_tables([pq.read_table(f, columns=["request_id", "true_source"]) for f in files])
    ids = t["request_id"].to_numpy(zero_copy_only=False).astype(str)
    src = t["true_source"].cast(pa.string()).to_numpy(zero_copy_only=False).astype(str)
    order = np.argsort(ids)
    pos = np.searchsorted(ids[order], request_id.astype(str))
    pos = np.clip(pos, 0, len(ids) - 1)
    found = ids[order][pos] == request_id.astype(str)
    return np.where(found, src[order][pos], "known")


@torch.no_grad()
def tower_inputs(model: Any, x: np.ndarray, idx: np.ndarray, batch_size: int = 8192) -> list[np.ndarray]:
    """Each task tower's input (the teacher's representation for that task), float32[N, d] per task."""
    grabbed: list[list[torch.Tensor]] = [[] for _ in model.towers]
    hooks = [tower[0].register_forward_hook(lambda _m, inp, _out, j=j: grabbed[j].append(inp[0].detach()))
             for j, tower in enumerate(model.towers)]
    try:
        model.eval()
        xt, it = torch.from_numpy(x), torch.from_numpy(idx)
        for s in range(0, len(x), batch_size):
            model(xt[s:s + batch_size], it[s:s + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(g).numpy().astype(np.float32) for g in grabbed]


class Mahalanobis:
    """One Gaussian per task on the teacher's tower inputs; score = squared Mahalanobis distance."""

    def __init__(self, reps: list[np.ndarray], ridge: float = 1e-3) -> None:
        self.mean, self.prec = [], []
        for r in reps:
            r = r.astype(np.float64)
            mu = r.mean(axis=0)
            cov = np.cov(r - mu, rowvar=False) + ridge * np.eye(r.shape[1])
            self.mean.append(mu)
            self.prec.append(np.linalg.inv(cov))

    def score(self, reps: list[np.ndarray]) -> np.ndarray:
        out = []
        for r, mu, p in zip(reps, self.mean, self.prec, strict=True):
            d = r.astype(np.float64) - mu
            out.append(np.einsum("ij,jk,ik->i", d, p, d))
        return np.stack(out, axis=1).astype(np.float32)


def candidate_signals(model: Any, swag: Any, pre: Any, profile: Any, fit_num: np.ndarray, fit_cat: np.ndarray,
                      num: np.ndarray, cat: np.ndarray, seed: int, n_tasks: int,
                      novelty: Novelty | None = None, fit_rows: int = 50_000) -> dict[str, np.ndarray]:
    """Every candidate signal on (num, cat), as float32[N, T] (task-free signals repeated per task)."""
    from torch.nn.utils import vector_to_parameters

    x, idx = pre.transform(num, cat)
    out: dict[str, np.ndarray] = {}
    for scale, tag in ((profile.swag_scale, ""), (BIG_SCALE, f" scale {BIG_SCALE:g}")):
        pred = swag.predict(model, x, idx, n_samples=profile.n_samples, scale=scale, seed=seed,
                            method=profile.inference)
        for m in ("prob_var", "logit_var") + (("base_rate_relative",) if not tag else ()):
            out[f"SWAG {m}{tag}"] = pred.measure(m)
    rows = np.random.default_rng(seed).permutation(len(fit_num))[:fit_rows]
    fx, fidx = pre.transform(fit_num[rows], fit_cat[rows])
    state = [p.detach().clone() for p in model.parameters()]
    vector_to_parameters(swag.mean.to(torch.float32), model.parameters())  # the SWA mean network
    try:
        maha = Mahalanobis(tower_inputs(model, fx, fidx))
        out["Mahalanobis (teacher representation)"] = maha.score(tower_inputs(model, x, idx))
    finally:
        with torch.no_grad():
            for p, s in zip(model.parameters(), state, strict=True):
                p.copy_(s)
    nov = novelty or Novelty.fit(pre, fit_num, fit_cat)
    rep = lambda v: np.repeat(np.asarray(v, np.float32)[:, None], n_tasks, axis=1)  # noqa: E731
    out["input novelty (weighted surprise)"] = rep(nov.score(pre, num, cat))
    for name, v in nov.shares(pre, num, cat).items():
        out[f"input {name.replace('_', ' ')}"] = rep(v)
    return out


def ood_auroc(signals: dict[str, np.ndarray], source: np.ndarray, tasks: tuple[str, ...]) -> dict[str, Any]:
    """AUROC of each signal (per task) for `new` vs `known` rows and `drift` vs `known` rows."""
    known = source == "known"
    out: dict[str, Any] = {}
    for other in ("new", "drift"):
        rows = known | (source == other)
        if not (source == other).any() or not known.any():
            continue
        y = (source[rows] == other).astype(np.int8)
        out[other] = {name: {t: auc_roc(y, s[rows, j]) for j, t in enumerate(tasks)}
                      for name, s in signals.items()}
    return out


def filter_decisions(e: np.ndarray, u: np.ndarray | None, r: float, p_u: float) -> np.ndarray:
    """Passed mask of the policy's rule at steady state: the top p_u by u pass, then r of ALL rows
    (the lowest e among the rest) are blocked. Ties in u break by row order (stable)."""
    n = len(e)
    passed_u = np.zeros(n, bool)
    if u is not None and p_u > 0:
        passed_u[np.argsort(-np.asarray(u, np.float64), kind="stable")[: int(round(p_u * n))]] = True
    rest = np.flatnonzero(~passed_u)
    block = rest[np.argsort(np.asarray(e, np.float64)[rest], kind="stable")[: int(round(r * n))]]
    passed = np.ones(n, bool)
    passed[block] = False
    return passed


def deals_kept(e: np.ndarray, u: np.ndarray | None, true_deal: np.ndarray, source: np.ndarray,
               r: float, p_u: float) -> dict[str, float]:
    """Expected deals kept, per source and overall, and known traffic's kept share vs the oracle."""
    passed = filter_decisions(e, u, r, p_u)
    oracle = filter_decisions(true_deal, None, r, 0.0)
    out = {}
    for name in ("all", "known", "new", "drift"):
        m = np.ones(len(e), bool) if name == "all" else source == name
        if m.any():
            total = float(true_deal[m].sum())
            out[name] = float(true_deal[m & passed].sum()) / total
            if name in ("all", "known"):
                out[f"{name}_vs_oracle"] = out[name] / (float(true_deal[m & oracle].sum()) / total)
    return out


def deals_kept_grid(filters: dict[str, tuple[np.ndarray, np.ndarray | None]], true_deal: np.ndarray,
                    source: np.ndarray) -> dict[str, Any]:
    """`deals_kept` for every filter (name -> (e, u or None)) at every r and p_u."""
    out: dict[str, Any] = {}
    for name, (e, u) in filters.items():
        shares = PASS_SHARES if u is not None else (0.0,)
        out[name] = {f"r={r:g} p_u={p:g}": deals_kept(e, u, true_deal, source, r, p)
                     for r in RATIOS for p in shares}
    return out


def select_uncertainty(pred: Any, labels: np.ndarray, tasks: tuple[str, ...] | list[str],
                       default_measure: str, default_map: dict[str, str], r: float = 0.3,
                       p_u: float = 0.05) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Choose the uncertainty measure and, per task, its source task on validation (the paper's
    open question 3).

    Criterion for task t with (source s, measure m): the share of task t's positives a filter
    keeps when the top `p_u` by u_{s,m} pass and `r` of all rows with the lowest teacher p_t are
    blocked. The measure is the best one for the primary task (deal if present, else the last);
    each task then takes its best source under that measure. A choice replaces the default only
    when it keeps more than one binomial standard error more: validation is small and sparse
    tasks have few positives, so a smaller gain is noise.
    """
    from model.uncertainty import MEASURES

    tasks = list(tasks)
    y = np.asarray(labels)
    mean = np.asarray(pred.mean)
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for j, t in enumerate(tasks):
        pos = y[:, j] > 0.5
        scores[t] = {}
        for m in MEASURES:
            u_all = pred.measure(m)
            scores[t][m] = {}
            for k, s in enumerate(tasks):
                passed = filter_decisions(mean[:, j], u_all[:, k], r, p_u)
                scores[t][m][s] = float(passed[pos].mean()) if pos.any() else float("nan")

    def se(t: str, v: float) -> float:
        n_pos = max(int((y[:, tasks.index(t)] > 0.5).sum()), 1)
        return float(np.sqrt(max(v * (1 - v), 1e-12) / n_pos))

    primary = "deal" if "deal" in tasks else tasks[-1]
    d_src = default_map.get(primary, primary)
    base = scores[primary][default_measure][d_src]
    best_m, best_s = max(((m, s) for m in MEASURES for s in tasks), key=lambda ms: scores[primary][ms[0]][ms[1]])
    measure = best_m if scores[primary][best_m][best_s] > base + se(primary, base) else default_measure
    source_map: dict[str, str] = {}
    for t in tasks:
        d = default_map.get(t, t)
        cur = scores[t][measure][d]
        s_best = max(tasks, key=lambda s: scores[t][measure][s])
        source_map[t] = s_best if scores[t][measure][s_best] > cur + se(t, cur) else d
    record = {"criterion": f"positives kept at r={r:g}, p_u={p_u:g} on validation (teacher)",
              "rows": int(len(y)), "positives": {t: int((y[:, j] > 0.5).sum()) for j, t in enumerate(tasks)},
              "default": {"measure": default_measure, "source_map": dict(default_map)},
              "chosen": {"measure": measure, "source_map": source_map}, "scores": scores,
              "rule": "replace the default only when better by more than one binomial standard error"}
    return measure, source_map, record


# ---- the `rta eval` section -----------------------------------------------------------------
def served_outputs(bundle_dir: Path, num: np.ndarray, cat: np.ndarray) -> dict[str, np.ndarray]:
    """The served student's outputs through `stream.scorer.Scorer` (the worker's path): p, served u,
    and, for a novelty bundle, its ambiguity head and novelty."""
    from stream.scorer import Scorer

    scorer = Scorer.load(bundle_dir)
    names = [o.name for o in scorer.serving.get_outputs()]
    keys = ["p", "u", *(n for n in ("u_ambiguity", "novelty") if n in names)]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for s in range(0, len(num), 65536):  # one call of the serving graph per chunk, all outputs
        for k, v in zip(keys, scorer.run(keys, num[s:s + 65536], cat[s:s + 65536]), strict=True):
            parts[k].append(v)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    if "novelty" in out:
        out["novelty"] = out["novelty"][:, 0]
    out["manifest"] = scorer.manifest
    return out


def shift_section(bundle_dir: Path, model: Any, swag: Any, pre: Any, profile: Any, seed: int, fit: Any,
                  logs: Any, pred: Any, source: np.ndarray, baseline_probs: dict[str, np.ndarray],
                  out_dir: Path) -> dict[str, Any]:
    """OOD AUROC of every signal per task, the served signal's fidelity to the teacher's, and deals
    kept per source at r x p_u for the served student, today's measure and the baselines."""
    from model.novelty import Novelty
    from stream.policy import ScorePolicy, combine_uncertainty
    from training.metrics import spearman

    tasks = tuple(logs.tasks)
    served = served_outputs(bundle_dir, logs.num, logs.cat)
    manifest = served.pop("manifest")
    policy = ScorePolicy.from_manifest(manifest)
    src_j = policy.source_index
    unc = manifest.get("uncertainty", {})
    nov_cfg = unc.get("novelty")
    novelty = Novelty.from_dict(nov_cfg["model"]) if nov_cfg else None
    signals = candidate_signals(model, swag, pre, profile, fit.num, fit.cat, logs.num, logs.cat, seed,
                                len(tasks), novelty=novelty)
    measure = unc.get("measure", "prob_var")
    signals["served student u (as the policy reads it)"] = served["u"]
    if "u_ambiguity" in served:
        signals["served student ambiguity head alone"] = served["u_ambiguity"]
    section: dict[str, Any] = {"rows": int(len(logs)), "sources": {s: int((source == s).sum()) for s in
                                                                    ("known", "new", "drift")},
                               "measure": measure, "policy_source": policy.source,
                               "ood_auroc": ood_auroc(signals, source, tasks)}
    teacher_u = pred.measure(measure)
    if novelty is not None:
        teacher_u = combine_uncertainty(teacher_u, novelty.score(pre, logs.num, logs.cat), nov_cfg["gate"],
                                        np.asarray(nov_cfg["ceiling"]))
    section["fidelity_served_vs_teacher"] = {
        t: {"spearman": spearman(served["u"][:, j], teacher_u[:, j]),
            "spearman_new_source": spearman(served["u"][source == "new", j], teacher_u[source == "new", j])
            if (source == "new").sum() > 2 else None}
        for j, t in enumerate(tasks)}
    if logs.truth is None:
        return section
    deal = tasks.index("deal")
    filters: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
        "served student": (policy.score(served["p"]), served["u"][:, src_j]),
        f"teacher DAUM, {measure} of {policy.source}": (policy.score(pred.mean), pred.measure(measure)[:, src_j]),
    }
    if "u_ambiguity" in served:
        filters["served student, ambiguity only"] = (policy.score(served["p"]), served["u_ambiguity"][:, src_j])
    for name, p in baseline_probs.items():
        filters[name] = (policy.score(p), None)
    section["deals_kept"] = deals_kept_grid(filters, logs.truth[:, deal], source)
    section["deals_kept_note"] = ("expected deals (sum of true_deal) over passed rows / over all rows of the "
                                  "source; *_vs_oracle: divided by what an oracle blocking the same share by "
                                  "true_deal keeps; thresholds at the steady state the controller holds")
    plot_ood_auroc(section["ood_auroc"], tasks, out_dir / "ood_auroc.png")
    return section


def plot_ood_auroc(auroc: dict[str, Any], tasks: tuple[str, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(auroc)
    fig, axes = plt.subplots(1, len(kinds), figsize=(7 * len(kinds), 5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        names = list(auroc[kind])
        w = 0.8 / len(tasks)
        for j, t in enumerate(tasks):
            ax.barh(np.arange(len(names)) + j * w, [auroc[kind][n][t] for n in names], height=w, label=t)
        ax.set_yticks(np.arange(len(names)) + 0.4 - w / 2, names, fontsize=8)
        ax.axvline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlim(0, 1)
        ax.set_title(f"OOD AUROC: {kind} vs known rows")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def shift_markdown(section: dict[str, Any], tasks: tuple[str, ...]) -> str:
    """The shift section of report.md."""
    lines = ["", "## Traffic the model has never seen (world shifts)", "",
             f"Rows {section['rows']}: " + ", ".join(f"{k} {v}" for k, v in section["sources"].items())
             + f". Served measure `{section['measure']}`, the policy reads task `{section['policy_source']}`.", ""]
    for kind, rows in section["ood_auroc"].items():
        lines += [f"OOD AUROC, {kind} vs known:", "", "| signal | " + " | ".join(tasks) + " |",
                  "|---|" + "---|" * len(tasks)]
        lines += [f"| {n} | " + " | ".join(f"{v[t]:.3f}" for t in tasks) + " |" for n, v in rows.items()]
        lines.append("")
    lines += ["Served u vs the teacher's (same combination) Spearman: " + ", ".join(
        f"{t} {v['spearman']:.3f}" for t, v in section["fidelity_served_vs_teacher"].items()), ""]
    if "deals_kept" in section:
        lines += ["Expected deals kept (share of each source's deals; known vs oracle):", "",
                  "| filter | setting | all | known | new | drift | known vs oracle |", "|---|---|---|---|---|---|---|"]
        for name, grid in section["deals_kept"].items():
            for setting, k in grid.items():
                lines.append(f"| {name} | {setting} | {k['all']:.3f} | {k['known']:.3f} | {k.get('new', float('nan')):.3f} "
                             f"| {k.get('drift', float('nan')):.3f} | {k['known_vs_oracle']:.4f} |")
        lines += ["", section["deals_kept_note"], ""]
    lines.append("![OOD AUROC](ood_auroc.png)")
    return "\n".join(lines) + "\n"
