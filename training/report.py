"""Turn computed results into what an analyst reads: report.json, report.md and PNG plots."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from model.uncertainty import MEASURES  # noqa: E402

COLORS = {"click": "tab:blue", "online": "tab:green", "cart": "tab:orange", "deal": "tab:red",
          "random": "tab:gray"}


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


# ---- training curves ----------------------------------------------------------------------
def plot_loss(history: dict[str, Any], png: Path, json_path: Path | None = None) -> None:
    """Per-task train/valid BCE per epoch, and the step loss with the SWAG phase shaded."""
    if json_path is not None:
        json_path.write_text(json.dumps(history, indent=1))
    epochs = [r["epoch"] for r in history["epochs"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for j, t in enumerate(history["tasks"]):
        c = COLORS.get(t)
        axes[0].plot(epochs, [r["train"][j] for r in history["epochs"]], "-o", color=c, ms=3, label=f"{t} train")
        if "valid" in history["epochs"][0]:
            axes[0].plot(epochs, [r["valid"][j] for r in history["epochs"]], "--", color=c, label=f"{t} valid")
    axes[0].set(xlabel="epoch", ylabel="BCE", title="loss per task", yscale="log")
    axes[0].legend(fontsize=7, ncol=2)
    steps = history["steps"]
    axes[1].plot([s["epoch"] for s in steps], [s["loss"] for s in steps], lw=0.8)
    if history.get("swag_from_epoch") is not None:
        axes[1].axvspan(history["swag_from_epoch"], len(epochs), color="tab:orange", alpha=0.15,
                        label="SWAG collection")
        axes[1].legend(fontsize=8)
    axes[1].set(xlabel="epoch", ylabel="summed BCE (batch)", title="training loss")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ---- evaluation plots ---------------------------------------------------------------------
def plot_table2(t2: dict[str, Any], png: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = {"prob_var": "-o", "logit_var": "-s", "base_rate_relative": "-^"}
    for m in MEASURES:
        cc = t2[m]["click_by_click"]
        axes[0].plot([100 * r["share"] for r in cc], [r["auc_roc"] for r in cc], styles[m], label=f"click-u ({m})")
        for key, color in (("deal_by_deal", "tab:red"), ("deal_by_click", "tab:blue")):
            rows = t2[m][key]
            axes[1].plot([100 * r["share"] for r in rows], [r["auc_roc"] for r in rows], styles[m],
                         color=color, alpha=0.85, label=f"{key.replace('_', ' ')}-u ({m})")
    for ax, key in ((axes[0], "click"), (axes[1], "deal")):
        rows = t2["random"][key]
        ax.plot([100 * r["share"] for r in rows], [r["auc_roc"] for r in rows], ":", color="gray", label="random")
        ax.set(xlabel="passing share (%)", ylabel="residual AUC-ROC")
        ax.legend(fontsize=7)
    axes[0].set_title("click: residual AUC after passing the most uncertain")
    axes[1].set_title("deal: residual AUC, passing by deal-u vs click-u")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_fig2(f2: dict[str, Any], png: Path, tasks: list[str]) -> None:
    shares = [100 * s for s in f2["shares"]]
    fig, axes = plt.subplots(len(MEASURES), 4, figsize=(17, 3.6 * len(MEASURES)), squeeze=False)
    titles = ("(a) deals passed directly", "(b) deals correctly kept in the rest",
              "(c) deals passed downstream", "(d) downstream vs directly passed deals")
    for i, m in enumerate(MEASURES):
        curves = {**f2[m], "random": f2["random"]}
        for src in [*tasks, "random"]:
            cur, c = curves[src], COLORS.get(src)
            ls = ":" if src == "random" else "-"
            axes[i][0].plot(shares, cur["direct"], ls, color=c, label=src)
            axes[i][1].plot(shares, cur["kept"], ls, color=c, label=src)
            axes[i][2].plot(shares, cur["total"], ls, color=c, label=src)
            axes[i][3].plot(cur["direct"], cur["total"], ls + "o", ms=3, color=c, label=src)
        for k in range(4):
            axes[i][k].set_title(f"{titles[k]}\nuncertainty = {m}", fontsize=9)
            axes[i][k].set_xlabel("directly passed deals" if k == 3 else "passing share (%)")
            axes[i][k].legend(fontsize=7, title="u source", title_fontsize=7)
    fig.suptitle(f"Fig. 2 analog: overall block share held at {f2['block_share']:.0%}; "
                 f"{f2['deals']} deals in the evaluated traffic", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_calibration(cal: dict[str, Any], png: Path) -> None:
    tasks = list(cal)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.8), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        bins = cal[t]["bins"]
        p = [b["p"] for b in bins]
        hi = max(p + [b.get("truth", 0) for b in bins] + [b["label"] for b in bins]) * 1.05
        ax.plot([0, hi], [0, hi], ":", color="gray")
        if "truth" in bins[0]:
            ax.plot(p, [b["truth"] for b in bins], "-o", color=COLORS.get(t), ms=4, label="true probability")
        ax.plot(p, [b["label"] for b in bins], "x", color="black", label="label rate")
        ax.set(xlabel="predicted (DAUM mean)", ylabel="actual", title=f"{t}: ECE vs truth {_fmt(cal[t].get('ece_truth'))}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_uncertainty_error(ranking: dict[str, Any], tasks: list[str], png: Path) -> None:
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(5 * len(MEASURES), 4), squeeze=False)
    for ax, m in zip(axes[0], MEASURES, strict=True):
        mat = ranking[m]["spearman_abs"]
        im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                ax.text(j, i, _fmt(mat[i][j], 2), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set(xlabel="uncertainty of task", ylabel="|p - p_true| of task", title=f"Spearman, {m}")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ---- markdown -----------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows]]


def markdown(r: dict[str, Any]) -> str:
    tasks = r["tasks"]
    lines = [f"# Evaluation report: {Path(r['bundle']).name}", "",
             f"- logs: `{r['logs']}` — {r['scope']}, {r['rows']} rows; label rates "
             + ", ".join(f"{t} {v:.4f}" for t, v in zip(tasks, r["label_rate"], strict=True)),
             f"- teacher: {r['teacher']['arch']}-{r['teacher']['expert']}, {r['teacher']['n_params']} weights, "
             f"SWAG {r['teacher']['swag_snapshots']} snapshots / rank {r['teacher']['swag_rank']}, "
             f"M = {r['teacher']['n_samples']} samples, scale {r['teacher']['swag_scale']}",
             f"- timing: {json.dumps(r['timing'])}", "",
             "## Table I analog: AUC-ROC / AUC-PR", ""]
    header = ["model", *[f"{t} ROC / PR" for t in tasks], "avg ROC / PR"]
    rows = [[name, *[f"{_fmt(row[t]['auc_roc'])} / {_fmt(row[t]['auc_pr'])}" for t in [*tasks, "avg"]]]
            for name, row in r["table1"].items()]
    lines += _table(header, rows)
    lines += ["", "## Table II analog: residual traffic after passing the most uncertain share", "",
              "AUC-ROC / AUC-PR of DAUM's score on the traffic that is not passed.", ""]
    t2 = r["table2"]
    for m in MEASURES:
        lines += [f"### uncertainty = {m}", ""]
        body = []
        for i in range(len(t2[m]["click_by_click"])):
            cc, dd, dc = (t2[m][k][i] for k in ("click_by_click", "deal_by_deal", "deal_by_click"))
            body.append([f"{100 * cc['share']:.0f}%", f"{_fmt(cc['auc_roc'])} / {_fmt(cc['auc_pr'])}",
                         f"{100 * dd['share']:.1f}%", f"{_fmt(dd['auc_roc'])} / {_fmt(dd['auc_pr'])}",
                         f"{_fmt(dc['auc_roc'])} / {_fmt(dc['auc_pr'])}"])
        lines += _table(["pass", "click by click-u", "pass", "deal by deal-u", "deal by click-u"], body)
        d = t2[m]["directions"]
        lines += ["", f"Directions: click by click-u monotone up: **{d['click_by_click_monotone_up']}** "
                  f"(change {d['click_by_click_change']:+.4f}); deal by deal-u change {d['deal_by_deal_change']:+.4f}; "
                  f"deal by click-u change {d['deal_by_click_change']:+.4f}.", ""]
    rnd = t2["random"]
    lines += ["Random passing (reference): click " + ", ".join(_fmt(x["auc_roc"]) for x in rnd["click"])
              + "; deal " + ", ".join(_fmt(x["auc_roc"]) for x in rnd["deal"]), "",
              "![Table II](table2.png)", "",
              "## Fig. 2 analog: deals passed downstream", "",
              f"Block share held at {r['fig2']['block_share']:.0%} of all traffic. The most uncertain share "
              "passes directly; the rest is blocked from the lowest DAUM deal probability up until the "
              "block share is reached; downstream deals = directly passed + not blocked in the rest.", ""]
    f2 = r["fig2"]
    shares = f2["shares"]
    header = ["measure", "source", *[f"{100 * s:.0f}%" for s in shares]]
    rows = [["-", "random", *[str(v) for v in f2["random"]["total"]]]]
    for m in MEASURES:
        rows += [[m, t, *[str(v) for v in f2[m][t]["total"]]] for t in tasks]
    lines += _table(header, rows) + ["", "![Fig. 2](fig2.png)", ""]
    if "truth" in r:
        cal = r["truth"]["calibration"]
        lines += ["## Against the true probabilities", "", "### Calibration (DAUM mean)", ""]
        lines += _table(["task", "ECE vs truth", "Brier vs truth", "ECE vs labels", "AUC of the truth itself"],
                        [[t, _fmt(cal[t]["ece_truth"], 5), _fmt(cal[t]["brier_truth"], 6), _fmt(cal[t]["ece_label"], 5),
                          _fmt(cal[t]["auc_truth_ceiling"])] for t in tasks])
        lines += ["", "![calibration](calibration.png)", "",
                  "### Does uncertainty rank the requests farthest from the truth?", "",
                  "Spearman(u, |p - p_true|) / Spearman(u, |logit p - logit p_true|) / top-10% overlap "
                  "(chance = 0.10), with u of the same task and of click.", ""]
        ue = r["truth"]["uncertainty_vs_error"]
        rows = []
        c = tasks.index("click")
        for m in MEASURES:
            for i, t in enumerate(tasks):
                same = f"{_fmt(ue[m]['spearman_abs'][i][i], 3)} / {_fmt(ue[m]['spearman_logit'][i][i], 3)} / {_fmt(ue[m]['top10_abs'][i][i], 3)}"
                via = f"{_fmt(ue[m]['spearman_abs'][i][c], 3)} / {_fmt(ue[m]['spearman_logit'][i][c], 3)} / {_fmt(ue[m]['top10_abs'][i][c], 3)}"
                rows.append([m, t, same, via])
        lines += _table(["measure", "error of", "u of the same task", "u of click"], rows)
        lines += ["", "![uncertainty vs error](uncertainty_error.png)", ""]
    if "student" in r:
        lines += _student_section(r["student"], tasks)
    if (Path(r.get("_out", ".")) / "loss.png").exists():
        lines += ["## Teacher training", "", "![loss](loss.png)", ""]
    return "\n".join(lines) + "\n"


def _student_section(s: dict[str, Any], tasks: list[str]) -> list[str]:
    """Teacher vs the served student (issue: fidelity report, paper Fig. 3-5)."""
    acc = s["acceptance"]
    lines = ["## Student (ONNX, as served) vs teacher", "",
             f"Student `{s['version']}`, uncertainty = {s['measure']}, target mode {s['target_mode']}. "
             f"Acceptance (Spearman >= 0.9 and top-10% overlap >= 0.8 on the source task, AUC no more "
             f"than 0.01 below the teacher): **{'pass' if acc['passed'] else 'FAIL'}** "
             + ", ".join(f"{k} {v}" for k, v in acc.items() if k != "passed"), ""]
    rows = []
    for t in tasks:
        row = s["tasks"][t]
        u = row["uncertainty"]
        rows.append([t, _fmt(row["auc_teacher"]), _fmt(row["auc_student"]), f"{row['auc_gap']:+.4f}",
                     _fmt(u["spearman"], 3), _fmt(u["top5_overlap"], 3), _fmt(u["top10_overlap"], 3),
                     _fmt(u["top20_overlap"], 3)])
    lines += _table(["task", "AUC teacher", "AUC student", "gap", "Spearman u", "top-5%", "top-10%", "top-20%"], rows)
    ref = s.get("references")
    if ref:
        big = ref.get("distill_samples")
        lines += ["", f"How much of the teacher's u ({ref['measure']}, M = {ref['n_samples']}) is its particular "
                  "weight draws? Spearman / top-10% overlap of the teacher and of the student with a second "
                  "set of draws" + (f", and with an M = {big} estimate (the student's targets)" if big else "")
                  + ". The teacher's agreement with the other draws bounds what anything matches there; "
                  "the student, distilled from the teacher's own draws, follows those (table above).", ""]
        header = ["task", "teacher vs other draw", "student vs other draw"] + (
            [f"teacher vs M = {big}", f"student vs M = {big}"] if big else [])
        rows = []
        for t in tasks:
            r = ref["tasks"][t]
            keys = ["teacher_vs_teacher_other_draw", "student_vs_teacher_other_draw"] + (
                ["teacher_vs_teacher_large_m", "student_vs_teacher_large_m"] if big else [])
            rows.append([t, *[f"{_fmt(r[k]['spearman'], 3)} / {_fmt(r[k]['top10_overlap'], 3)}" for k in keys]])
        lines += _table(header, rows)
    lines += ["", *[f"![{p}]({p})" for p in s["plots"]], ""]
    return lines


def write_report(report: dict[str, Any], out_dir: Path, train_log: Path | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    plot_table2(report["table2"], out_dir / "table2.png")
    plot_fig2(report["fig2"], out_dir / "fig2.png", report["tasks"])
    if "truth" in report:
        plot_calibration(report["truth"]["calibration"], out_dir / "calibration.png")
        plot_uncertainty_error(report["truth"]["uncertainty_vs_error"], report["tasks"], out_dir / "uncertainty_error.png")
    if train_log is not None and (train_log.parent / "loss.png").exists():
        shutil.copyfile(train_log.parent / "loss.png", out_dir / "loss.png")
    (out_dir / "report.md").write_text(markdown({**report, "_out": str(out_dir)}))
