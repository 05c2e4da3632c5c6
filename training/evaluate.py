"""`rta eval`: the paper's tables and figures for a bundle's teacher on a log set.

What the report holds (report.json, report.md, PNGs in the output directory):

* Table I   AUC-ROC / AUC-PR per task: DAUM (mean of the M SWAG-sampled probabilities), the
            single-pass SWA-mean network and the teacher's last iterate; with --baselines also
            MLP, Transformer, PLE-MLP, PLE-Transformer trained on the same split.
* Table II  AUC of DAUM's score on the residual traffic after passing the most uncertain share:
            click by click-u at 0/5/10/15/20 %, deal by deal-u and by click-u at
            0/0.5/1/1.5/2 %, for every uncertainty measure (and random passing as reference).
* Fig. 2    deals passed downstream vs passing share, per uncertainty source task. Definition:
            the `share` most uncertain requests (by the source task's u) pass directly; of the
            rest, exactly `block_share` x N requests - those with the lowest DAUM deal
            probability - are blocked, so the overall block share is the same at every passing
            share. "Correctly kept in the rest" = deals in the rest that are not blocked.
            Downstream deals = deals passed directly + deals correctly kept.
* with true probabilities (synthetic worlds): calibration per task against the truth, and how
  well each uncertainty measure ranks the requests whose prediction is farthest from the
  truth (Spearman of u vs |p - p_true| and vs the log-odds error, top-10 % overlap).
* Student    when the bundle has student.onnx: the student as served (onnxruntime) vs the
            teacher on the same rows: AUCs, Spearman and top-5/10/20 % overlap of u, overlaid
            histograms (paper Fig. 5), residual AUC (Fig. 3) and deals kept (Fig. 4) for both.

When the logs are the ones the bundle was trained on (same request ids), only the held-out test
split is evaluated; other logs are evaluated whole.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from torch.nn.utils import vector_to_parameters

from model.ple import BASELINES, MultiTaskNet
from model.uncertainty import MEASURES, TeacherPrediction
from stream.errors import DataError
from training.logs import Attribution, LogSet, describe_labels, load_logs
from training.metrics import (
    auc_roc,
    average_precision,
    calibration,
    residual_mask,
    spearman,
    top_overlap,
)

CLICK_SHARES = (0.0, 0.05, 0.10, 0.15, 0.20)
DEAL_SHARES = (0.0, 0.005, 0.010, 0.015, 0.020)
FIG2_SHARES = tuple(np.round(np.linspace(0.0, 0.2, 11), 3))
DEFAULT_BLOCK_SHARE = 0.5


def _log(msg: str) -> None:
    click.echo(f"[rta eval] {msg}", err=True)


# ---- predictions --------------------------------------------------------------------------
@torch.no_grad()
def predict_probs(model: MultiTaskNet, x: np.ndarray, idx: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Single-pass probabilities [N, T] of a network with its current weights."""
    model.eval()
    xt, it = torch.from_numpy(x), torch.from_numpy(idx)
    out = [torch.sigmoid(model(xt[s : s + batch_size], it[s : s + batch_size]))
           for s in range(0, len(x), batch_size)]
    return torch.cat(out).numpy().astype(np.float32)


LIGHTGBM = "LightGBM (per task)"
BASELINE_NAMES = (*BASELINES, LIGHTGBM)


def train_lightgbm(pre: Any, splits: Any, logs: LogSet, seed: int, threads: int = 1) -> dict[str, Any]:
    """One gradient-boosted tree model per task (what an ad team would pick instead of a deep
    multi-task net): raw numeric features (NaN = missing) + the bundle's categorical codes as
    LightGBM categoricals, early-stopped on the validation split, trained on the fit split."""
    import lightgbm as lgb

    def inputs(ls: LogSet) -> np.ndarray:
        _, codes = pre.transform(ls.num, ls.cat)
        return np.concatenate([ls.num.astype(np.float32), codes.astype(np.float32)], axis=1)

    started = time.perf_counter()
    n_num = len(pre.spec.numeric)
    cats = list(range(n_num, n_num + len(pre.spec.categorical)))
    xf, xv, xe = inputs(splits.fit), inputs(splits.valid), inputs(logs)
    params = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 50,
              "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "cat_smooth": 10,
              "max_cat_to_onehot": 8, "num_threads": threads, "seed": seed, "verbose": -1}
    p, trees = [], {}
    for j, t in enumerate(splits.fit.tasks):
        fit_set = lgb.Dataset(xf, np.ascontiguousarray(splits.fit.labels[:, j]), categorical_feature=cats,
                              free_raw_data=False)
        valid_set = lgb.Dataset(xv, np.ascontiguousarray(splits.valid.labels[:, j]), categorical_feature=cats,
                                reference=fit_set)
        booster = lgb.train(params, fit_set, num_boost_round=400, valid_sets=[valid_set],
                            callbacks=[lgb.early_stopping(30, verbose=False)])
        trees[t] = int(booster.best_iteration or booster.current_iteration())
        p.append(booster.predict(xe, num_iteration=booster.best_iteration or None))
    return {"p": np.stack(p, axis=1).astype(np.float32), "seconds": round(time.perf_counter() - started, 1),
            "n_params": None, "trees": trees, "history": []}


def train_baselines(bundle: dict[str, Any], pre: Any, splits: Any, x: np.ndarray, idx: np.ndarray,
                    progress: bool = True, logs: LogSet | None = None,
                    only: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """The Table I baselines (+ a per-task LightGBM when `logs`, the evaluated rows, are given),
    trained on the bundle's fit split with its profile's schedule; `only` picks some of them."""
    from training.pipeline import Batch, fit_network, net_config

    profile, seed = bundle["profile"], bundle["meta"]["seed"]
    fit, valid = Batch.of(pre, splits.fit), Batch.of(pre, splits.valid)
    out = {}
    if logs is not None and (only is None or LIGHTGBM in only):
        out[LIGHTGBM] = train_lightgbm(pre, splits, logs, seed, threads=torch.get_num_threads())
        _log(f"baseline {LIGHTGBM}: {out[LIGHTGBM]['seconds']}s, trees {out[LIGHTGBM]['trees']}")
    for name, fields in BASELINES.items():
        if only is not None and name not in only:
            continue
        started = time.perf_counter()
        sizes = profile.transformer_net if fields["expert"] == "transformer" else {}
        cfg = net_config(profile, pre, splits.fit.tasks, **{**sizes, **fields})
        model, history = fit_network(cfg, profile, fit, valid, seed, epochs=profile.baseline_epochs,
                                     desc=name, progress=progress)
        out[name] = {"p": predict_probs(model, x, idx), "seconds": round(time.perf_counter() - started, 1),
                     "n_params": sum(p.numel() for p in model.parameters()), "history": history["epochs"]}
        _log(f"baseline {name}: {out[name]['seconds']}s")
    return out


# ---- the tables ---------------------------------------------------------------------------
def table1(probs: dict[str, np.ndarray], y: np.ndarray, tasks: tuple[str, ...]) -> dict[str, Any]:
    rows = {}
    for name, p in probs.items():
        row = {t: {"auc_roc": auc_roc(y[:, j], p[:, j]), "auc_pr": average_precision(y[:, j], p[:, j])}
               for j, t in enumerate(tasks)}
        row["avg"] = {k: float(np.mean([row[t][k] for t in tasks])) for k in ("auc_roc", "auc_pr")}
        rows[name] = row
    return rows


def residual_curve(y: np.ndarray, p: np.ndarray, u: np.ndarray, shares: tuple[float, ...]) -> list[dict]:
    out = []
    for s in shares:
        keep = residual_mask(u, s)
        out.append({"share": float(s), "n": int(keep.sum()), "positives": int(y[keep].sum()),
                    "auc_roc": auc_roc(y[keep], p[keep]), "auc_pr": average_precision(y[keep], p[keep])})
    return out


def _monotone(values: list[float]) -> bool:
    return bool(np.all(np.diff(values) > 0))


def table2(pred: TeacherPrediction, y: np.ndarray, tasks: tuple[str, ...], seed: int = 0) -> dict[str, Any]:
    """Residual AUC after passing the most uncertain share, per measure (+ random passing)."""
    c, d = tasks.index("click"), tasks.index("deal")
    rand = np.random.default_rng(seed).random(len(y))
    out: dict[str, Any] = {"random": {
        "click": residual_curve(y[:, c], pred.mean[:, c], rand, CLICK_SHARES),
        "deal": residual_curve(y[:, d], pred.mean[:, d], rand, DEAL_SHARES)}}
    for m in MEASURES:
        u = pred.measure(m)
        cc = residual_curve(y[:, c], pred.mean[:, c], u[:, c], CLICK_SHARES)
        dd = residual_curve(y[:, d], pred.mean[:, d], u[:, d], DEAL_SHARES)
        dc = residual_curve(y[:, d], pred.mean[:, d], u[:, c], DEAL_SHARES)
        auc = {k: [r["auc_roc"] for r in v] for k, v in (("cc", cc), ("dd", dd), ("dc", dc))}
        out[m] = {
            "click_by_click": cc, "deal_by_deal": dd, "deal_by_click": dc,
            "directions": {
                "click_by_click_monotone_up": _monotone(auc["cc"]),
                "click_by_click_change": auc["cc"][-1] - auc["cc"][0],
                "deal_by_deal_change": auc["dd"][-1] - auc["dd"][0],
                "deal_by_click_change": auc["dc"][-1] - auc["dc"][0],
                "deal_click_beats_deal_at_2pct": auc["dc"][-1] > auc["dd"][-1],
            },
        }
    return out


def downstream_deals(y_deal: np.ndarray, p_deal: np.ndarray, u: np.ndarray, share: float,
                     block_share: float) -> dict[str, int]:
    """Fig. 2 at one passing share (see the module docstring for the definition)."""
    n = len(y_deal)
    passed = ~residual_mask(u, share)
    n_block = int(round(n * block_share))
    rest = np.flatnonzero(~passed)
    blocked = rest[np.argsort(p_deal[rest], kind="mergesort")[:n_block]]
    direct = int(y_deal[passed].sum())
    lost = int(y_deal[blocked].sum())
    total = int(y_deal.sum()) - lost
    return {"direct": direct, "kept": total - direct, "total": total, "blocked_deals": lost}


def fig2(pred: TeacherPrediction, y: np.ndarray, tasks: tuple[str, ...], block_share: float,
         seed: int = 0) -> dict[str, Any]:
    if block_share + max(FIG2_SHARES) > 1:
        raise DataError(f"block share {block_share} + passing share {max(FIG2_SHARES)} exceeds 1")
    d = tasks.index("deal")
    yd, pd = y[:, d], pred.mean[:, d]
    rand = np.random.default_rng(seed).random(len(y))
    out: dict[str, Any] = {"block_share": block_share, "shares": list(FIG2_SHARES), "deals": int(yd.sum())}

    def curve(u: np.ndarray) -> dict[str, list[int]]:
        pts = [downstream_deals(yd, pd, u, s, block_share) for s in FIG2_SHARES]
        return {k: [pt[k] for pt in pts] for k in ("direct", "kept", "total", "blocked_deals")}

    out["random"] = curve(rand)
    for m in MEASURES:
        u = pred.measure(m)
        out[m] = {t: curve(u[:, j]) for j, t in enumerate(tasks)}
    return out


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def truth_checks(pred: TeacherPrediction, logs: LogSet) -> dict[str, Any]:
    """Calibration vs the true probabilities, and uncertainty vs distance from the truth."""
    tasks, truth, y = logs.tasks, logs.truth, logs.labels
    out: dict[str, Any] = {"calibration": {t: calibration(pred.mean[:, j], truth[:, j], y[:, j])
                                           for j, t in enumerate(tasks)}}
    err_abs = np.abs(pred.mean - truth)
    err_logit = np.abs(_logit(pred.mean) - _logit(truth))
    ranking: dict[str, Any] = {}
    for m in MEASURES:
        u = pred.measure(m)
        # rows: the task whose error is ranked; columns: the task whose uncertainty ranks it
        ranking[m] = {
            "spearman_abs": [[spearman(u[:, s], err_abs[:, t]) for s in range(len(tasks))] for t in range(len(tasks))],
            "spearman_logit": [[spearman(u[:, s], err_logit[:, t]) for s in range(len(tasks))] for t in range(len(tasks))],
            "top10_abs": [[top_overlap(u[:, s], err_abs[:, t]) for s in range(len(tasks))] for t in range(len(tasks))],
        }
    out["uncertainty_vs_error"] = ranking
    out["mean_abs_error"] = {t: float(err_abs[:, j].mean()) for j, t in enumerate(tasks)}
    return out


# ---- teacher vs student ----------------------------------------------------------------------
def student_fidelity(bundle_dir: Path, pred: TeacherPrediction, logs: LogSet, out_dir: Path) -> dict[str, Any]:
    """The student as served (onnxruntime, raw features in) against the teacher on the same rows.

    Scores through `stream.scorer.Scorer`, so the hashes, the fingerprint and the in-graph
    preprocessing are the ones the worker uses; the teacher's u is the measure the student was
    distilled on (manifest `uncertainty.measure`).
    """
    from stream.scorer import Scorer
    from training.fidelity import acceptance, fidelity_report

    scorer = Scorer.load(bundle_dir)
    chunks = [scorer.score(logs.num[i:i + 65536], logs.cat[i:i + 65536]) for i in range(0, len(logs), 65536)]
    s_p = np.concatenate([c[0] for c in chunks])
    s_u = np.concatenate([c[1] for c in chunks])
    if "u_ambiguity" in [o.name for o in scorer.serving.get_outputs()]:
        # a novelty bundle serves ambiguity + novelty; the distillation is the ambiguity head's
        # (read from the graph that serves, which may hold int8 weights)
        s_u = np.concatenate([scorer.run(["u_ambiguity"], logs.num[i:i + 65536], logs.cat[i:i + 65536])[0]
                              for i in range(0, len(logs), 65536)])
    measure = scorer.manifest.get("uncertainty", {}).get("measure", "prob_var")
    mode = scorer.manifest.get("uncertainty", {}).get("rescale", {}).get("mode")
    source_map = scorer.manifest.get("uncertainty_source") or {}
    fid = fidelity_report(pred.mean, pred.measure(measure), s_p, s_u, logs.labels, scorer.tasks,
                          out_dir=out_dir, source_map=source_map, primary_mode=mode or "student")
    source = source_map.get("deal", "click") if "deal" in scorer.tasks else scorer.tasks[0]
    return {"version": scorer.version, "measure": measure, "target_mode": mode,
            "tasks": fid["tasks"], "residual_auc": fid["residual_auc"], "deals_kept": fid["deals_kept"],
            "acceptance": acceptance(fid, source), "plots": [f"fidelity/{p}" for p in fid.get("plots", [])],
            "u": s_u}


def teacher_references(model: MultiTaskNet, swag: Any, pre: Any, logs: LogSet, profile: Any, seed: int,
                       pred: TeacherPrediction, student_u: np.ndarray, tasks: tuple[str, ...],
                       measure: str = "prob_var") -> dict[str, Any]:
    """How much of the teacher's u is its particular weight draws, and what the student follows.

    The teacher's u comes from M weight draws (seed) shared by every row. A second set of draws
    (seed + 1) ranks the rows differently; how differently says how much of the ranking is the
    posterior and how much the draw. The student, distilled from the teacher's own draws,
    is compared with the other set too: close to the teacher's self-agreement means it learned
    the teacher as a whole, not only its posterior. With `distill_samples` > M the student was
    trained on a larger-M estimate instead; it is compared with that as well.
    """
    from training.pipeline import teacher_predict

    other = teacher_predict(model, swag, pre, logs, profile, seed + 1).measure(measure)
    first = pred.measure(measure)
    out: dict[str, Any] = {"measure": measure, "n_samples": profile.n_samples, "tasks": {}}
    big = None
    m_big = getattr(profile, "distill_samples", 0) or 0
    if m_big > profile.n_samples:
        big = teacher_predict(model, swag, pre, logs, profile, seed, n_samples=m_big).measure(measure)
        out["distill_samples"] = m_big
    for j, t in enumerate(tasks):
        row = {"teacher_vs_teacher_other_draw": {"spearman": spearman(first[:, j], other[:, j]),
                                                 "top10_overlap": top_overlap(first[:, j], other[:, j], 0.1)},
               "student_vs_teacher_other_draw": {"spearman": spearman(student_u[:, j], other[:, j]),
                                                 "top10_overlap": top_overlap(student_u[:, j], other[:, j], 0.1)}}
        if big is not None:
            row["teacher_vs_teacher_large_m"] = {"spearman": spearman(first[:, j], big[:, j]),
                                                 "top10_overlap": top_overlap(first[:, j], big[:, j], 0.1)}
            row["student_vs_teacher_large_m"] = {"spearman": spearman(student_u[:, j], big[:, j]),
                                                 "top10_overlap": top_overlap(student_u[:, j], big[:, j], 0.1)}
        out["tasks"][t] = row
    return out


# ---- the whole report ---------------------------------------------------------------------
def evaluate_bundle(bundle_dir: str | Path, logs: LogSet, out_dir: str | Path, baselines: bool = False,
                    splits: Any = None, block_share: float = DEFAULT_BLOCK_SHARE, eval_scope: str = "test split",
                    progress: bool = True, only_baselines: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Compute every table and figure for `logs` and write them into `out_dir`.

    Logs with the world's `true_source` column (docs/world.md "Shifts") also get the shift
    section (training/ood.py): OOD AUROC of every signal, deals kept per source."""
    from training.pipeline import load_teacher, teacher_predict
    from training.report import write_report

    t0 = time.perf_counter()
    model, swag, pre, bundle = load_teacher(bundle_dir)
    profile, meta = bundle["profile"], bundle["meta"]
    tasks = tuple(meta["tasks"])
    if tuple(logs.tasks) != tasks:
        raise DataError(f"{logs.source}: tasks {logs.tasks} differ from the bundle's {tasks}")
    missing = [t for t in ("click", "deal") if t not in tasks]
    if missing:
        raise DataError(f"the paper's tables need a {missing[0]!r} task; this bundle has {', '.join(tasks)}")
    if logs.spec.fingerprint() != pre.spec.fingerprint():
        names = set(pre.spec.names) ^ set(logs.spec.names)
        col = sorted(names)[0] if names else "(order or kind)"
        raise DataError(f"{logs.source}: features differ from the bundle's (column {col!r})")
    y = logs.labels
    x, idx = pre.transform(logs.num, logs.cat)

    started = time.perf_counter()
    pred = teacher_predict(model, swag, pre, logs, profile, seed=meta["seed"])
    daum_s = time.perf_counter() - started
    probs: dict[str, np.ndarray] = {}
    timing = {"daum_predict_s": round(daum_s, 2), "rows": len(logs), "samples": profile.n_samples}
    if baselines:
        if splits is None:
            raise DataError("--baselines needs the logs the bundle was trained on (to train on the same split)")
        trained = train_baselines(bundle, pre, splits, x, idx, progress, logs=logs, only=only_baselines)
        for name, b in trained.items():
            probs[name] = b["p"]
        timing["baselines_s"] = {name: b["seconds"] for name, b in trained.items()}
    probs["DAUM (SWAG, M-sample mean)"] = pred.mean
    last = predict_probs(model, x, idx)
    vector_to_parameters(swag.mean.to(torch.float32), model.parameters())
    probs["SWA mean weights (1 pass)"] = predict_probs(model, x, idx)
    probs[f"teacher last iterate ({model.cfg.arch}-{model.cfg.expert})"] = last

    report: dict[str, Any] = {
        "bundle": str(bundle["bundle_dir"]), "logs": logs.source, "scope": eval_scope, "rows": len(logs),
        "tasks": list(tasks), "label_rate": y.mean(axis=0).tolist(), "profile": profile.name,
        "teacher": {"arch": model.cfg.arch, "expert": model.cfg.expert, "n_params": swag.n_params,
                    "swag_snapshots": swag.n_snapshots, "swag_rank": swag.rank, "n_samples": profile.n_samples,
                    "swag_scale": profile.swag_scale, "base_rate": meta["base_rate"]},
        "table1": table1(probs, y, tasks),
        "table2": table2(pred, y, tasks, seed=meta["seed"]),
        "fig2": fig2(pred, y, tasks, block_share, seed=meta["seed"]),
        "uncertainty_summary": {m: {t: {"mean": float(pred.measure(m)[:, j].mean()),
                                        "p99": float(np.quantile(pred.measure(m)[:, j], 0.99))}
                                    for j, t in enumerate(tasks)} for m in MEASURES},
    }
    if logs.truth is not None:
        report["truth"] = truth_checks(pred, logs)
    if (Path(bundle["bundle_dir"]) / "student.onnx").exists():
        started = time.perf_counter()
        report["student"] = student_fidelity(Path(bundle["bundle_dir"]), pred, logs, Path(out_dir) / "fidelity")
        report["student"]["references"] = teacher_references(
            model, swag, pre, logs, profile, meta["seed"], pred, report["student"]["u"], tasks,
            report["student"]["measure"])
        del report["student"]["u"]
        timing["student_s"] = round(time.perf_counter() - started, 1)
    source = _sources(logs)
    if source is not None and (Path(bundle["bundle_dir"]) / "student.onnx").exists():
        from training.ood import shift_section

        started = time.perf_counter()
        fit = splits.fit if splits is not None else _training_splits(bundle).fit
        base = {n: probs[n] for n in probs if n in BASELINE_NAMES}
        report["shift"] = shift_section(Path(bundle["bundle_dir"]), model, swag, pre, profile, meta["seed"],
                                        fit, logs, pred, source, base, Path(out_dir))
        timing["shift_s"] = round(time.perf_counter() - started, 1)
    timing["total_s"] = round(time.perf_counter() - t0, 1)
    report["timing"] = timing
    write_report(report, Path(out_dir), train_log=Path(bundle["bundle_dir"]) / "train_log.json")
    if "shift" in report:
        from training.ood import shift_markdown

        with open(Path(out_dir) / "report.md", "a") as f:
            f.write(shift_markdown(report["shift"], tasks))
    return report


def _sources(logs: LogSet) -> np.ndarray | None:
    """The world's `true_source` per row, when the logs carry it (truth: evaluation only)."""
    from training.ood import read_sources

    try:
        return read_sources(logs.source, logs.request_id) if logs.source else None
    except (OSError, ValueError):
        return None


def _training_splits(bundle: dict[str, Any]) -> Any:
    """The splits of the logs the bundle was trained on (baselines train on its fit split)."""
    from training.pipeline import make_splits

    train_logs = load_logs(bundle["meta"]["logs"], tasks=tuple(bundle["meta"]["tasks"]))
    if train_logs.fingerprint() != bundle["meta"]["logs_fingerprint"]:
        raise DataError(f"{bundle['meta']['logs']}: not the logs the bundle was trained on (fingerprint differs)")
    return make_splits(train_logs, bundle["profile"], bundle["meta"]["seed"])


@click.command("eval")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Model directory or one bundle version directory.")
@click.option("--logs", "logs_path", required=True, type=click.Path(path_type=Path),
              help="Logged traffic (Parquet/JSONL file or directory).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Report directory (report.json, report.md, PNGs).")
@click.option("--baselines", is_flag=True,
              help="Also train MLP, Transformer, PLE-MLP, PLE-Transformer and a per-task LightGBM on the "
                   "bundle's training split.")
@click.option("--baseline", "only", multiple=True, type=click.Choice(BASELINE_NAMES),
              help="Train only these baselines (repeatable; implies --baselines).")
@click.option("--block-share", type=click.FloatRange(0.0, 0.8), default=DEFAULT_BLOCK_SHARE,
              show_default=True, help="Overall block share held fixed in the Fig. 2 analog.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads (default: every idle core; env RTA_TORCH_THREADS).")
@click.option("--attribution", default=None,
              help="Logged layout: attribution windows, e.g. 'click=15m,deal=7d'.")
@click.option("--as-of-ms", type=int, default=None, help="Logged layout: labels as of [default: newest event].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(model_dir: Path, logs_path: Path, out: Path, baselines: bool, only: tuple[str, ...],
             block_share: float, threads: int | None, attribution: str | None, as_of_ms: int | None,
             quiet: bool) -> None:
    """Paper-style tables and plots (Table I/II, Fig. 2, calibration, student fidelity) for a bundle."""
    from training.pipeline import load_teacher, make_splits, use_all_cores

    use_all_cores(threads)
    baselines = baselines or bool(only)
    _, _, _, bundle = load_teacher(model_dir)
    logs = load_logs(logs_path, tasks=tuple(bundle["meta"]["tasks"]),
                     attribution=Attribution.parse(attribution, as_of_ms))
    _log(describe_labels(logs))
    splits = None
    if logs.fingerprint() == bundle["meta"]["logs_fingerprint"]:
        splits = make_splits(logs, bundle["profile"], bundle["meta"]["seed"])
        target, scope = splits.test, "held-out test split of the training logs"
    else:
        target, scope = logs, "all rows (logs not used in training)"
        if baselines:  # the baselines train on the bundle's own training split, as the bundle did
            splits = _training_splits(bundle)
    if target.masked:
        n_all = len(target)
        target = target.observed()
        scope += f", {len(target)} of {n_all} rows with every label observed (passed traffic, windows closed)"
        if len(target) == 0:
            raise DataError(f"{logs_path}: no row has every label observed; nothing to evaluate")
    _log(f"evaluating {bundle['bundle_dir']} on {len(target)} rows: {scope}")
    report = evaluate_bundle(bundle["bundle_dir"], target, out, baselines=baselines, splits=splits,
                             block_share=block_share, eval_scope=scope, progress=not quiet,
                             only_baselines=only or None)
    click.echo(json.dumps({"report": str(out / "report.md"), "rows": report["rows"],
                           "seconds": report["timing"]["total_s"]}))
