"""`rta retrain`: one shot for cron / a CronJob / the compose trainer profile.

    logs of the last --since-hours (minus the newest --holdout-hours, kept for the gate)
      -> train a candidate from the current model's settings (its profile)
      -> gate it against `current` on the held-out window (training/gate.py)
      -> promote (audited, like `rta model promote`) or refuse

With `--canary S` a candidate the gate passes, or cannot judge (inconclusive), starts a canary at
share S beside `current` (outcome "canary") instead of switching; `rta model promote` later judges
it on its own arms. A refused candidate starts nothing.

Prints ONE JSON line on stdout, {"outcome", "candidate", "current", "gate"}, and one human
line on stderr. Exit 0 promoted (or, with --canary, its canary started), 3 refused by the gate (or before training: too few matured
labels, no closed window to gate on), 4 inconclusive (the gate could not tell at this sample;
not promoted), 2 bad input / an error (1: a crash).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from model import bundle, registry
from stream.errors import BundleError, ConfigError, DataError
from stream.logger.storage import LOCATION
from training.debias import DEBIAS_MODES, DEFAULT_DEBIAS
from training.gate import gate_task, live_targets, outcome_line
from training.logs import newest_logged_ts_ms
from training.model_cli import (
    EXIT_INCONCLUSIVE,
    EXIT_REFUSED,
    _settings,
    audit_to_topic,
    exit_code,
    gate_from_options,
    gate_options,
    need_reason,
    switch_options,
    who_default,
)
from training.profiles import PROFILES, Profile, get_profile

HOUR_MS = 3_600_000


def train_window(logs: Path | str, since_hours: float, holdout_hours: float | None) -> dict[str, Any]:
    """[since_ms, until_ms) for training, from the newest logged row; the newest `holdout_hours`
    (None: none, the gate reads other logs) stay out of training for the gate."""
    if not since_hours > 0 or (holdout_hours is not None and not holdout_hours > 0):
        raise ConfigError("--since-hours and --holdout-hours must be > 0")
    if holdout_hours is not None and holdout_hours >= since_hours:
        raise ConfigError(f"--holdout-hours {holdout_hours:g} leaves nothing to train on in --since-hours "
                          f"{since_hours:g}")
    newest = newest_logged_ts_ms(logs)  # a path or s3://
    if newest is None:
        raise DataError(f"{logs}: no logged rows (need Parquet with ts_ms: an `rta log` layout or a world log)")
    until = None if holdout_hours is None else int(newest - holdout_hours * HOUR_MS) + 1
    return {"since_ms": int(newest - since_hours * HOUR_MS), "until_ms": until, "newest_ms": newest}


def gate_can_judge(window: dict[str, Any], attribution: Any, task: str) -> str | None:
    """Why the gate cannot judge any candidate on this held-out window (None: it can): no
    held-out row can have a closed attribution window for the gate's task, so the gate would
    find no evidence and refuse after the whole training (and the same open windows would leave
    that task's training labels positives only)."""
    as_of = attribution.as_of_ms if attribution.as_of_ms is not None else window["newest_ms"]
    closed_until = as_of - attribution.window(task) * 1000  # rows at or before this are closed
    if window["until_ms"] is not None and closed_until < window["until_ms"]:
        return (
            f"the gate's task {task!r} has a {attribution.window(task) / 3600:g} h attribution window, so no "
            f"row of the held-out window (the newest {(window['newest_ms'] - window['until_ms']) / 3.6e6:.3g} h) "
            "has its label yet; set shorter windows (--attribution / $RTA_ATTRIBUTION), gate on another "
            "task (--task), or gate on older logs (--gate-logs)")
    return None


def matured_labels(logs: Path, tasks: tuple[str, ...], attribution: Any, window: dict[str, Any]) -> dict[str, Any]:
    """Per task, the training window's matured labels (passed rows whose attribution window has
    closed, `training.logs`): rows, positives and their share of the passed rows."""
    from training.logs import load_logs

    lg = load_logs(logs, tasks, attribution).between(window["since_ms"], window["until_ms"])
    lab = lg.labels
    passed = int(np.isfinite(lab).any(axis=1).sum()) if lg.masked else len(lg)
    if lg.decisions is not None:
        import pyarrow.compute as pc

        passed = int(pc.sum(pc.equal(lg.decisions.column("decision"), "pass")).as_py() or 0)
    out = {}
    for j, t in enumerate(tasks):
        obs = np.isfinite(lab[:, j])
        out[t] = {"matured": int(obs.sum()), "positives": int(np.nansum(lab[:, j])),
                  "share_of_passed": round(float(obs.sum()) / passed, 4) if passed else 0.0}
    return {"as_of_ms": lg.info.get("as_of_ms"), "passed": passed, "tasks": out}


def too_few_matured(labels: dict[str, Any], min_positives: int) -> str | None:
    """Why the window's matured labels cannot train every task (None: they can)."""
    short = [f"{t} {v['positives']} positives in {v['matured']} matured rows ({v['share_of_passed']:.0%} of "
             f"passed)" for t, v in labels["tasks"].items() if v["positives"] < min_positives]
    if not short:
        return None
    return (f"too few matured labels (need {min_positives} positives per task, --min-matured): "
            f"{'; '.join(short)}; retrain on older logs (--since-hours), wait for the windows to close, "
            "or set shorter windows (--attribution / $RTA_ATTRIBUTION)")


def parent_profile(current: Path) -> Profile:
    """The settings the current model was trained with (its teacher checkpoint's profile)."""
    from training.pipeline import load_teacher

    return load_teacher(current)[3]["profile"]


def start_canary(model_dir: Path, version: str, share: float, who: str, reason: str, audit: Any,
                 current: str, gate: dict[str, Any]) -> dict[str, Any]:
    """A gated candidate starts a canary beside `current` (stream.canary.start: audited, verified)
    instead of switching; the entry carries the off-policy gate's decision and interval."""
    from stream import canary

    now = bundle.current_version(model_dir)
    if now != current:
        raise BundleError(f"current moved to {now} while this retrain was gated against {current}; "
                          "canary NOT started")
    est = gate.get("estimate") or {}
    return canary.start(model_dir, version, share, who, reason, audit,
                        gate={"decision": gate.get("decision"), "passed": gate.get("passed"),
                              "value_relative": est.get("value_relative"), "value_ci": est.get("value_ci")})


@click.command("retrain")
@click.option("--logs", "logs_path", required=True, type=LOCATION,
              help="Logged traffic (`rta log` layout): trained on, and the gate's window.")
@click.option("--model-dir", required=True, type=click.Path(path_type=Path), help="Model directory (has `current`).")
@click.option("--since-hours", type=float, required=True, help="Train on the logs of the last H hours.")
@click.option("--holdout-hours", type=float, default=None,
              help="Newest hours kept out of training for the gate [default: a fifth of --since-hours; none "
                   "with --gate-logs].")
@click.option("--gate-logs", type=LOCATION, default=None,
              help="Gate on this log set instead of --logs (e.g. a fresher day).")
@click.option("--profile", "profile_name", type=click.Choice(sorted(PROFILES)), default=None,
              help="Training profile [default: the current model's own settings].")
@click.option("--debias", type=click.Choice(DEBIAS_MODES), default=None,
              help=f"How the biased labels are weighed [default: the trainer's, {DEFAULT_DEBIAS}].")
@click.option("--anchor-parent/--no-anchor", default=False, show_default=True,
              help="Distil the new student toward the current one (less decision churn).")
@click.option("--version", default=None, help="Candidate version name [default: UTC timestamp].")
@click.option("--force", is_flag=True, help="Promote even if the gate refuses (audited as forced).")
@click.option("--canary", "canary_share", type=float, default=None,
              help="Share in (0, 1): a candidate the gate passes, or cannot judge (inconclusive), starts "
                   "a canary at this share (audited, rta model canary) instead of becoming current; "
                   "promote it later on its own arms' evidence (rta model promote V --logs DIR).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--min-matured", type=click.IntRange(min=1), default=20, show_default=True,
              help="Fewest matured positives (window closed) per task in the training window; fewer: "
                   "refused before training.")
@switch_options
@gate_options
def retrain(logs_path: Path, model_dir: Path, since_hours: float, holdout_hours: float | None,
            gate_logs: Path | None, profile_name: str | None, debias: str | None, anchor_parent: bool,
            version: str | None, force: bool, canary_share: float | None, threads: int | None, quiet: bool, min_matured: int, reason: str | None,
            who: str | None, audit_topic: bool, config_file: str | None, redis_url: str | None,
            redis_prefix: str | None, **gate_opts: Any) -> None:
    """Recent logs -> train (from the current model's settings) -> gate -> promote or refuse."""
    from training.logs import Attribution
    from training.pipeline import TEACHER_FILE, run_training

    reason = need_reason(reason, "retrain")
    if canary_share is not None and not 0.0 < canary_share < 1.0:
        raise click.BadParameter(f"must be in (0, 1), got {canary_share:g}", param_hint="--canary")
    settings = _settings(config_file, redis_url, redis_prefix)
    current = bundle.current_version(model_dir)
    if current is None:
        raise BundleError(f"{model_dir}: no current version to retrain from (train and publish one with rta train)")
    current_dir = bundle.resolve_bundle(model_dir)
    if holdout_hours is None and gate_logs is None:
        holdout_hours = since_hours / 5
    window = train_window(logs_path, since_hours, holdout_hours)
    attribution = Attribution.parse(gate_opts["attribution"], gate_opts["as_of_ms"])
    # Everything the gate needs is checked before the (long) training, not after it.
    live_targets(settings, gate_opts["ratio"], gate_opts["pass_share"], gate_opts["explore"])
    cur_manifest = bundle.read_manifest(current_dir)
    why_not = None if gate_logs is not None else gate_can_judge(
        window, attribution, gate_task(cur_manifest, gate_opts["task"]))
    labels = None
    if why_not is None:
        labels = matured_labels(logs_path, tuple(cur_manifest["tasks"]), attribution, window)
        window = {**window, "labels": labels}
        why_not = too_few_matured(labels, min_matured)
    if why_not is not None:  # a refusal (exit 3, as the gate would give after training), now
        click.echo(json.dumps({"outcome": "refused", "candidate": None, "current": current,
                               "gate": {"passed": False, "decision": "refuse",
                                        "reasons": [f"not enough evidence: {why_not}"], "retrain": window}}))
        click.echo(f"rta retrain: refused before training: {why_not}", err=True)
        raise click.exceptions.Exit(EXIT_REFUSED)
    if not profile_name and not (current_dir / TEACHER_FILE).is_file():
        raise BundleError(f"{current_dir}: a serving-only bundle (no {TEACHER_FILE}) records no training "
                          "settings; pass --profile")
    profile = get_profile(profile_name) if profile_name else parent_profile(current_dir)
    version = version or time.strftime("v%Y%m%d-%H%M%S", time.gmtime())
    if (Path(model_dir) / version).exists():
        raise BundleError(f"{Path(model_dir) / version} already exists; pick another --version")
    # a serving-only current (no teacher weights) cannot be warm-started from
    parent = current_dir if (current_dir / TEACHER_FILE).is_file() else None
    kwargs = {"parent": parent, "since_ms": window["since_ms"], "until_ms": window["until_ms"],
              "anchor": current_dir if anchor_parent else None, "publish": False,
              **({"debias": debias} if debias is not None else {})}
    t0 = time.perf_counter()
    # trained in a staging dir beside the versions: whatever the trainer does with `current`
    # there, the served `current` moves only through the gate and registry.switch
    staging = Path(model_dir) / f".staging-{version}"
    try:
        built = run_training(logs_path, staging, profile, seed=gate_opts["seed"], version=version,
                             report=False, progress=not quiet, threads=threads,
                             attribution=attribution,
                             **kwargs)
        candidate = Path(model_dir) / version
        built.rename(candidate)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    train_s = time.perf_counter() - t0
    result = gate_from_options(candidate, current_dir, gate_logs or logs_path, settings, gate_opts)
    result["retrain"] = {"train_seconds": round(train_s, 1), "profile": profile.name, **window,
                         "debias": debias, "anchor": current if anchor_parent else None}
    registry.write_gate(candidate, result)
    promote = result["passed"] or force
    # a canary gathers the evidence an inconclusive gate lacked (its arms are a randomised
    # comparison, judged later by `rta model promote`); a refusal starts nothing
    canary = canary_share is not None and (promote or result.get("decision") == "inconclusive")
    audit = audit_to_topic(settings) if audit_topic else None
    extra: dict[str, Any] = {}
    if canary:
        extra["canary"] = start_canary(model_dir, candidate.name, canary_share, who_default(who),
                                       f"retrain: {reason}", audit, current, result)
    elif promote:
        registry.switch(model_dir, candidate.name, "promote", who_default(who), f"retrain: {reason}",
                        audit=audit, forced=not result["passed"], gate=result, expect_current=current)
    outcome = "canary" if canary else "promoted" if promote else (
        "inconclusive" if exit_code(result) == EXIT_INCONCLUSIVE else "refused")
    click.echo(json.dumps({"outcome": outcome, "candidate": candidate.name, "current": current, "gate": result,
                           **extra}, default=str, allow_nan=False))
    click.echo(f"rta retrain: {outcome}{' (forced)' if promote and not result['passed'] else ''}: "
               f"{outcome_line(result)}", err=True)
    if not (promote or canary):
        raise click.exceptions.Exit(exit_code(result))
