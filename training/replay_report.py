"""What an analyst reads after `rta replay`: report.md, report.html and PNG plots.

matplotlib is imported only when plots are drawn: its import alone is ~1.5-2 s of a 200k-row
replay, which `rta replay --no-plots` does not pay."""

from __future__ import annotations

import html
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from stream.policy import REASONS

PLOTS = ("block_share.png", "reason_mix.png", "task_kept.png", "operating_curve.png")


def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors() -> dict[str, str]:
    from training.report import COLORS

    return COLORS


def _windowed(t_s: np.ndarray, flag: np.ndarray, window: float) -> tuple[np.ndarray, np.ndarray]:
    """(event-second, share of `flag` over the trailing `window` seconds), one point a second."""
    sec = np.floor(t_s - t_s[0]).astype(np.int64)
    total = np.bincount(sec).astype(np.float64)
    hits = np.bincount(sec, weights=flag.astype(np.float64), minlength=len(total))
    w = int(max(1, round(window)))
    ct, ch = np.cumsum(total), np.cumsum(hits)
    if len(ct) > w:
        ct[w:] = ct[w:] - ct[:-w].copy()
        ch[w:] = ch[w:] - ch[:-w].copy()
    keep = ct > 0
    return np.flatnonzero(keep).astype(np.float64), ch[keep] / ct[keep]


def plot_block_share(sc: Any, runs: list[Any], window: float, png: Path) -> None:
    """Block share over the controller's window vs the target, over event time."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    t_s = sc.ts_ms.astype(np.float64) / 1000.0
    for run in runs[:6]:
        x, y = _windowed(t_s, run.block, window)
        ax.plot(x, y, lw=1, label=f"{run.name}: block share ({window:g} s window)")
        if run.steps:
            target = np.array([s.r for s in run.steps])[run.step]
            ax.plot(t_s - t_s[0], target, "--", lw=1, color="k", alpha=0.6)
    ax.set(xlabel="event time since the first row (s)", ylabel="block share", title="block share vs target")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_reason_mix(report: dict[str, Any], png: Path) -> None:
    plt = _pyplot()
    runs = report["runs"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(runs) + 3), 4))
    bottom = np.zeros(len(runs))
    for r in REASONS:
        for what in ("pass", "block"):
            v = np.array([run["reason_mix"].get(r, {}).get(what, 0) / run["rows"] for run in runs])
            if v.any():
                ax.bar(range(len(runs)), v, bottom=bottom, label=f"{what} ({r})")
                bottom += v
    ax.set_xticks(range(len(runs)), [run["name"] for run in runs], rotation=20, fontsize=7, ha="right")
    ax.set(ylabel="share of rows", title="decisions by reason")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.savefig(png, dpi=110, bbox_inches="tight")  # the legend sits outside the axes
    plt.close(fig)


def plot_task_kept(report: dict[str, Any], png: Path) -> None:
    """Share of each task's value kept per run (truth), or the OPE estimate with its CI."""
    plt = _pyplot()
    colors = _colors()
    runs, tasks = report["runs"], report["tasks"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(runs) + 3), 4))
    width = 0.8 / len(tasks)
    for j, t in enumerate(tasks):
        xs = np.arange(len(runs)) + (j - (len(tasks) - 1) / 2) * width
        vals, lo, hi = [], [], []
        for run in runs:
            v = (run.get("value") or {}).get(t)
            o = ((run.get("ope") or {}).get("tasks") or {}).get(t, {})
            if v:
                vals.append(v["kept_share"])
                lo.append(0.0)
                hi.append(0.0)
            elif "kept_share" in o and math.isfinite(o["kept_share"]):
                vals.append(o["kept_share"])
                lo.append(o["kept_share"] - o["kept_share_ci"][0])
                hi.append(o["kept_share_ci"][1] - o["kept_share"])
            else:
                vals.append(np.nan)
                lo.append(0.0)
                hi.append(0.0)
        ax.bar(xs, vals, width, yerr=[lo, hi], color=colors.get(t), label=t, capsize=2)
        for x, v in zip(xs, vals, strict=True):
            if not np.isfinite(v):  # no truth and no closed window: say so rather than draw nothing
                ax.text(x, 0.02, "n/a", ha="center", fontsize=7, rotation=90)
    ax.set_xticks(range(len(runs)), [run["name"] for run in runs], rotation=20, fontsize=7, ha="right")
    ax.set(ylabel="share of positives kept (passed)", ylim=(0, 1.05), title="per-task kept share")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.savefig(png, dpi=110, bbox_inches="tight")  # the legend sits outside the axes
    plt.close(fig)


def plot_operating_curve(report: dict[str, Any], png: Path) -> None:
    """Value kept vs block share: the score-only curve (truth) and each run's point."""
    plt = _pyplot()
    colors = _colors()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    task = report.get("operating_curve_task", "deal")
    curve = report.get("operating_curve") or []
    if curve:
        ax.plot([c["block_share"] for c in curve], [c["kept_share"] for c in curve], "-", color="tab:red",
                label=f"block lowest score ({task}, truth)")
        ax.plot([0, 1], [1, 0], ":", color=colors["random"], label="random filter")
    for run in report["runs"]:
        v = (run.get("value") or {}).get(task)
        o = ((run.get("ope") or {}).get("tasks") or {}).get(task, {})
        if v:
            ax.plot(v["block_share"], v["kept_share"], "o", label=run["name"])
        elif "kept_share" in o and math.isfinite(o["kept_share"]):
            ax.errorbar(run["block_share"], o["kept_share"],
                        yerr=[[o["kept_share"] - o["kept_share_ci"][0]], [o["kept_share_ci"][1] - o["kept_share"]]],
                        fmt="s", capsize=3, label=f"{run['name']} (OPE, 95% CI)")
    ax.set(xlabel="block share", ylabel=f"{task} value kept", xlim=(0, 1), ylim=(0, 1.02),
           title="operating curve")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left")
    else:  # logged thresholds without truth: nothing to place on the curve
        ax.text(0.5, 0.5, "no truth and no estimate for this run", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _f(v: Any, d: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{d}f}" if isinstance(v, float) else str(v)


def markdown(report: dict[str, Any], plots: bool = True) -> str:
    """report.md: every figure of report.json an analyst reads first (and the PNGs, if drawn)."""
    lines = [f"# Replay of {report['logs']}", "",
             f"Model `{report['model']}` ({report['bundle']}), {report['rows']} rows, mode "
             f"**{report['mode']}**" + (f" ({report['sweep_mode']})" if report.get("sweep_mode") else "")
             + (f", event time x{report['speedup']:.4g} ({report.get('speedup_source') or 'flag'})"
                if report.get("speedup") is not None else "")
             + f", seed {report['seed']}.", ""]
    load = report.get("load", {})
    if load.get("layout") == "logged":
        c = load["counts"]
        lines += ["## Input (logged layout)", "",
                  f"As of {load['as_of_ms']} ms; attribution windows (s): "
                  + ", ".join(f"{t} {w:g}" for t, w in load["attribution_windows_s"].items()) + ".", "",
                  "| count | value |", "|---|---|"]
        lines += [f"| {k.replace('_', ' ')} | {v} |" for k, v in c.items() if not isinstance(v, dict)]
        lines += [f"| labelled rows ({t}) | {v} |" for t, v in load["labelled"].items()]
        lines.append("")
    for run in report["runs"]:
        lines += [f"## {run['name']}", "", f"Block share {_f(run['block_share'])} over {run['rows']} rows "
                  f"({_f(run['event_span_s'], 1)} event-seconds).", ""]
        if "steps" in run:
            lines += ["| step | r | p_u | epsilon | rows | settled rows | settled block share | error pp | "
                      "uncertain share | error pp |", "|---|---|---|---|---|---|---|---|---|---|"]
            for s in run["steps"]:
                t = s["targets"]
                lines.append(f"| {s['step']} | {t['r']:g} | {t['p_u']:g} | {t['epsilon']:g} | {s['rows']} | "
                             f"{s.get('settled_rows', 0)} | {_f(s.get('settled_block_share'))} | "
                             f"{_f(s.get('settled_error_pp'), 3)} | {_f(s.get('settled_uncertain_share'))} | "
                             f"{_f(s.get('settled_uncertain_error_pp'), 3)} |")
            lines += ["", "Settled = decisions after the first 30 event-seconds of the step.", ""]
        if "match" in run:
            m = run["match"]
            lines += [f"Reproduction of the logged decisions: decision {_f(m['decision_match'], 6)}, decision and "
                      f"reason {_f(m['decision_and_reason_match'], 6)} of {m['decided_rows']} decided rows "
                      f"({m['undecided_rows']} undecided, {m['mismatched']} mismatched; largest |score - logged "
                      f"score| {_f(m['max_abs_score_diff'], 9)}).", ""]
        if "observed_kept" in run:
            lines += ["Positives the logged filter kept (observed on its passed rows, windows closed): "
                      + ", ".join(f"{t} {v}" for t, v in run["observed_kept"].items()) + ".", ""]
        lines += ["| reason | pass | block |", "|---|---|---|"]
        lines += [f"| {r} | {v['pass']} | {v['block']} |" for r, v in run["reason_mix"].items()]
        lines.append("")
        if "value" in run:
            lines += [f"Value kept ({run['truth_source']}):", "",
                      "| task | kept share | oracle | random | kept | total |", "|---|---|---|---|---|---|"]
            for t, v in run["value"].items():
                lines.append(f"| {t} | {_f(v['kept_share'])} | {_f(v['oracle_share'])} | {_f(v['random_share'])} | "
                             f"{_f(v['kept'], 1)} | {_f(v['total'], 1)} |")
            lines.append("")
        o = run.get("ope")
        if o and "tasks" in o:
            lines += [f"Off-policy estimates ({o['estimator']}, {o['bootstrap']} bootstrap resamples, 95% CI):", "",
                      "| task | kept (est.) | 95% CI | kept share (est.) | 95% CI | explore rows | ESS | population |",
                      "|---|---|---|---|---|---|---|---|"]
            for t, v in o["tasks"].items():
                if "kept" not in v:
                    lines.append(f"| {t} | n/a | | | | {v['explore_rows']} | | {v['population']} |")
                    continue
                lines.append(f"| {t} | {_f(v['kept'], 1)} | [{_f(v['kept_ci'][0], 1)}, {_f(v['kept_ci'][1], 1)}] | "
                             f"{_f(v['kept_share'])} | [{_f(v['kept_share_ci'][0])}, {_f(v['kept_share_ci'][1])}] | "
                             f"{v['explore_rows']} | {_f(v['ess'], 0)} | {v['population']} |")
            lines.append("")
        elif o:
            lines += [f"Off-policy estimates: {o.get('note')}", ""]
    if plots:
        lines += [f"![{p}]({p})" for p in PLOTS] + [""]
    if "timing" in report:
        lines += [f"Timing: {report['timing']}", ""]
    return "\n".join(lines)


def write_replay_report(report: dict[str, Any], sc: Any, runs: list[Any], out: Path, plots: bool = True) -> None:
    """The PNGs (unless `plots` is False), report.md and a self-contained-enough report.html
    (PNGs beside it)."""
    if plots:
        window = float(report["controller"]["window_seconds"]) * float(report.get("speedup") or 1.0)
        plot_block_share(sc, runs, window, out / PLOTS[0])
        plot_reason_mix(report, out / PLOTS[1])
        plot_task_kept(report, out / PLOTS[2])
        plot_operating_curve(report, out / PLOTS[3])
    md = markdown(report, plots)
    (out / "report.md").write_text(md)
    body = []
    for line in md.splitlines():
        if line.startswith("!["):
            src = line[line.index("(") + 1:-1]
            body.append(f'<p><img src="{html.escape(src)}" alt="{html.escape(src)}" style="max-width:100%"></p>')
        elif line.startswith("|"):
            if set(line) <= {"|", "-"}:
                continue
            cells = "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|"))
            body.append(f"<tr>{cells}</tr>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    # wrap consecutive rows into tables
    out_html, in_table = [], False
    for b in body:
        if b.startswith("<tr>") and not in_table:
            out_html.append('<table border="1" cellspacing="0" cellpadding="3">')
            in_table = True
        if not b.startswith("<tr>") and in_table:
            out_html.append("</table>")
            in_table = False
        out_html.append(b)
    if in_table:
        out_html.append("</table>")
    (out / "report.html").write_text("<!doctype html><html><head><meta charset='utf-8'><title>rta replay</title>"
                                     "</head><body style='font-family:sans-serif'>" + "\n".join(out_html)
                                     + "</body></html>\n")
