"""`rta model list|show|promote|rollback|diff`: the registry's operator commands.

`list`, `show` and `rollback` read and switch the model directory only (no torch, no replay);
`promote` runs the gate (training/gate.py) unless `--force`; `diff` is the churn report
(training/churn.py). Every switch needs `--reason`, goes to the Kafka audit topic first (as
`rta ratio set` does; `--no-audit-topic` skips it) and to `<model_dir>/registry.jsonl`.
"""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path
from typing import Any

import click

from model import bundle, registry
from stream.config import Settings, load_settings
from stream.errors import BundleError, ConfigError
from stream.logger.storage import LOCATION

EXIT_REFUSED = 3
EXIT_INCONCLUSIVE = 4  # the gate could not tell: not promoted, and it says how much more traffic would


def exit_code(result: dict[str, Any]) -> int:
    """0 promote, 3 refuse, 4 inconclusive (the gate's three outcomes)."""
    return {"promote": 0, "refuse": EXIT_REFUSED, "inconclusive": EXIT_INCONCLUSIVE}[
        result.get("decision") or ("promote" if result.get("passed") else "refuse")]


def _settings(config_file: str | None, redis_url: str | None, redis_prefix: str | None) -> Settings:
    return load_settings(config_file, redis_url=redis_url, redis_prefix=redis_prefix)


def audit_to_topic(settings: Settings) -> Any:
    """The audit hook of `registry.switch`: the entry on the Kafka audit topic, acknowledged
    (the same producer `rta ratio set` uses), or why not."""
    from stream.operators import produce_audit

    return lambda entry: produce_audit(settings, entry, key=b"model")


def who_default(who: str | None) -> str:
    return who or os.environ.get("USER") or getpass.getuser()


def model_dir_option(f: Any) -> Any:
    return click.option("--model-dir", required=True, type=click.Path(path_type=Path),
                        help="Model directory: <model_dir>/<version>/ bundles and `current`.")(f)


def switch_options(f: Any) -> Any:
    for opt in reversed([
        click.option("--reason", default=None, help="Why (required; kept in the audit trail)."),
        click.option("--who", default=None, help="Who (default: $USER)."),
        click.option("--audit-topic/--no-audit-topic", default=True, show_default=True,
                     help="Record the switch on the Kafka audit topic first (no switch without its "
                          "acknowledgement); --no-audit-topic: registry.jsonl only."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                     help="Config file (TOML/JSON/YAML)."),
        click.option("--redis-url", default=None, help="Redis URL (live targets for the gate)."),
        click.option("--redis-prefix", default=None, help="Key prefix of this deployment (default rta)."),
    ]):
        f = opt(f)
    return f


def gate_options(f: Any) -> Any:
    for opt in reversed([
        click.option("--ratio", type=float, default=None,
                     help="r for the gate's replay when Redis is unreachable or holds no targets."),
        click.option("--pass-share", type=float, default=0.0, show_default=True, help="p_u with --ratio."),
        click.option("--explore", type=float, default=0.0, show_default=True, help="epsilon with --ratio."),
        click.option("--task", default=None, help="Gate task [default: the score function's heaviest, deal]."),
        click.option("--fidelity", type=click.Choice(["required", "no-regression"]), default="required",
                     show_default=True, help="required: the student's fidelity acceptance must pass; "
                                             "no-regression: no check the current passes may fail."),
        click.option("--min-positives", type=click.IntRange(min=1), default=10, show_default=True,
                     help="Fewest matured positives of the gate task in the window before it may promote."),
        click.option("--non-inferiority", type=float, default=0.01, show_default=True,
                     help="delta: promote while the value difference's lower bound > -delta x current's value."),
        click.option("--guard-margin", type=float, default=0.05, show_default=True,
                     help="Per-task guard rail: a task's kept positives may not drop by more than this share."),
        click.option("--holdout-from-ms", type=int, default=None,
                     help="First ts_ms of the gate window [default: after the candidate's lineage data_to_ms]."),
        click.option("--window-hours", type=float, default=None,
                     help="Only the newest hours of the holdout [default: all of it]."),
        click.option("--attribution", default=None, help="Attribution windows, e.g. 'click=15m,deal=7d'."),
        click.option("--as-of-ms", type=int, default=None, help="Labels as of [default: newest event]."),
        click.option("--speedup", type=float, default=1.0, show_default=True,
                     help="Event time runs this much faster through the replay controller (sparse logs)."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Explore draws and bootstrap."),
    ]):
        f = opt(f)
    return f


def need_reason(reason: str | None, action: str) -> str:
    if reason is None or not reason.strip():
        raise click.UsageError(f"{action} needs --reason TEXT (kept in the audit trail)")
    return reason.strip()


def gate_from_options(candidate: Path, current: Path, logs: Path, settings: Settings, o: dict[str, Any]) -> dict[str, Any]:
    """Run the gate with the CLI's gate options (shared by promote and retrain)."""
    from training.gate import live_targets, run_gate
    from training.logs import Attribution

    cfg = gate_config(o)
    targets, source = live_targets(settings, o["ratio"], o["pass_share"], o["explore"])
    return run_gate(candidate, current, logs, targets, cfg, Attribution.parse(o["attribution"], o["as_of_ms"]),
                    holdout_from_ms=o["holdout_from_ms"], targets_source=source)


EVIDENCE = ("auto", "canary", "off-policy")


def gate_config(o: dict[str, Any]) -> Any:
    """The gate's settings from the CLI's gate options (one place for promote, retrain, canary)."""
    from training.gate import GateConfig

    if not o["speedup"] > 0:
        raise ConfigError(f"--speedup must be > 0, got {o['speedup']}")
    return GateConfig(task=o["task"], fidelity=o["fidelity"], min_positives=o["min_positives"], seed=o["seed"],
                      speedup=o["speedup"], window_hours=o["window_hours"], non_inferiority=o["non_inferiority"],
                      guard_margin=o["guard_margin"])


def canary_or_none(model_dir: Path, version: str, current: str | None, logs: Path, evidence: str,
                   o: dict[str, Any]) -> dict[str, Any] | None:
    """The gate's result on the canary's own arms (training/canary_judge.py: a randomised
    comparison, stronger than the off-policy replay) when `evidence` allows it and a canary of
    `version` ran beside `current`; None: judge off-policy. `--evidence canary` without usable
    canary evidence is an error; with `auto` the reason it was not used is one line on stderr."""
    from training.canary_judge import canary_applies, canary_gate
    from training.logs import Attribution

    if evidence == "off-policy":
        return None
    run, why = canary_applies(model_dir, version, current)
    if run is not None:
        try:
            return canary_gate(model_dir, version, logs, gate_config(o), Attribution.parse(o["attribution"],
                                                                                      o["as_of_ms"]), run=run)
        except ValueError as exc:  # the logs hold none of the canary's decisions
            why = f"{logs}: {exc}"
    if evidence == "canary":
        raise BundleError(f"no canary evidence for {version}: {why or 'no canary of it in registry.jsonl'}")
    if why is not None:  # a canary ran, but cannot judge: say why the replay gate judges instead
        click.echo(f"[rta model] canary evidence not used ({why}); judging off-policy", err=True)
    return None


@click.group("model")
def model() -> None:
    """Model registry: versions, lineage, promotion gate, rollback (audited)."""


@model.command("list")
@model_dir_option
@click.option("--json", "as_json", is_flag=True, help="JSON out.")
def list_cmd(model_dir: Path, as_json: bool) -> None:
    """Versions with metrics, lineage, gate result and who switched to them last."""
    rows = registry.summary(model_dir)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo(f"{model_dir}: no versions")
        return
    for r in rows:
        if "error" in r:
            click.echo(f"  {r['version']}: {r['error']}")
            continue
        mark = "*" if r["current"] else " "
        last = r["last_switch"]
        switched = (f"{last['action']} by {last['who']} at {last['at']}{' (forced)' if last['forced'] else ''}: "
                    f"{last['reason']}") if last else "-"
        fid = {True: "passed", False: "failed", None: "-"}[r["fidelity_passed"]]
        click.echo(f"{mark} {r['version']}  created {r['created_at']}  parent {r['parent'] or '-'}  "
                   f"fidelity {fid}  gate {r['gate'] or '-'}  last switch: {switched}")
    log = registry.read_log(model_dir)
    if log:
        click.echo(f"registry.jsonl: {len(log)} switches; newest: {log[-1]['action']} {log[-1]['old']} -> "
                   f"{log[-1]['new']} by {log[-1]['who']} ({log[-1]['reason']})")


def _distribution_summary(manifest: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """Rows and a few quantiles of the score distribution the controller starts from."""
    from stream.prior import ScoreDistribution

    dist = ScoreDistribution.from_manifest(manifest, where=f"{path}/manifest.json")
    return None if dist is None else dist.summary()


@model.command("show")
@click.argument("version")
@model_dir_option
def show_cmd(version: str, model_dir: Path) -> None:
    """One version: manifest metrics, lineage, gate result, its switches (JSON)."""
    path = registry.version_dir(model_dir, version)
    m = bundle.read_manifest(path)
    metrics = m.get("metrics", {})
    fid = metrics.get("fidelity") or {}
    out = {"version": version, "current": bundle.current_version(model_dir) == version,
           "created_at": m.get("created_at"), "tasks": m["tasks"],
           "feature_fingerprint": m["feature_spec"].get("fingerprint"),
           "lineage": registry.lineage(path), "fidelity": {"acceptance": fid.get("acceptance"),
                                                           "tasks": fid.get("tasks")},
           "metrics": {k: v for k, v in metrics.items() if k != "fidelity"},
           "gate": registry.read_gate(path),
           "serving": m.get("serving"),  # which graph serves, its weights (int8/float32) and why
           "score_distribution": _distribution_summary(m, path),
           "switches": [e for e in registry.read_log(model_dir) if version in (e.get("new"), e.get("old"))]}
    click.echo(json.dumps(out, indent=1, default=str))


@model.command("promote")
@click.argument("version")
@model_dir_option
@click.option("--logs", "logs_path", type=LOCATION, default=None,
              help="Logged traffic for the gate (`rta log` layout, or a world log with labels).")
@click.option("--force", is_flag=True, help="Promote even if the gate refuses or cannot run (audited as forced).")
@click.option("--evidence", type=click.Choice(EVIDENCE), default="auto", show_default=True,
              help="auto: the canary's own arms when a canary of VERSION ran beside the current model (and "
                   "--logs holds its decisions), else off-policy; canary: only the canary's; off-policy: "
                   "replay the logs (training/gate.py).")
@switch_options
@gate_options
def promote_cmd(version: str, model_dir: Path, logs_path: Path | None, force: bool, evidence: str,
                reason: str | None, who: str | None, audit_topic: bool, config_file: str | None,
                redis_url: str | None, redis_prefix: str | None, **gate_opts: Any) -> None:
    """Gate VERSION against `current` on the newest logged window it did not train on (or on its
    canary's own arms, see --evidence); promote it if the gate passes (or with --force)."""
    reason = need_reason(reason, "promote")
    settings = _settings(config_file, redis_url, redis_prefix)
    candidate = registry.version_dir(model_dir, version)
    current = bundle.current_version(model_dir)
    if current == version:
        raise ConfigError(f"{version} is already current in {model_dir}")
    result = None
    if current is None:
        if not force:
            raise BundleError(f"{model_dir}: no current version to gate against; promote the first one with --force")
    elif logs_path is None:
        if not force:
            raise click.UsageError("promote runs the gate on logged traffic: pass --logs DIR (or --force)")
    else:
        result = canary_or_none(model_dir, version, current, logs_path, evidence, gate_opts)
        if result is None:
            result = gate_from_options(candidate, bundle.resolve_bundle(model_dir), logs_path, settings, gate_opts)
    from training.gate import outcome_line

    if result is not None:
        click.echo(f"[rta model] gate: {outcome_line(result)}", err=True)
    if result is not None and not result["passed"] and not force:
        outcome = "inconclusive" if exit_code(result) == EXIT_INCONCLUSIVE else "refused"
        click.echo(json.dumps({"outcome": outcome, "candidate": version, "current": current, "gate": result},
                              default=str))
        raise click.exceptions.Exit(exit_code(result))
    forced = force and (result is None or not result["passed"])
    entry = registry.switch(model_dir, version, "promote", who_default(who), reason,
                            audit=audit_to_topic(settings) if audit_topic else None, forced=forced, gate=result,
                            expect_current=current)
    click.echo(f"[rta model] current: {entry['old'] or '-'} -> {version}{' (forced)' if forced else ''}", err=True)
    _end_canary_of(model_dir, version, who_default(who), reason, settings if audit_topic else None)
    click.echo(json.dumps({"outcome": "promoted", "candidate": version, "current": current, "forced": forced,
                           "gate": result}, default=str))


@model.command("rollback")
@model_dir_option
@switch_options
def rollback_cmd(model_dir: Path, reason: str | None, who: str | None, audit_topic: bool,
                 config_file: str | None, redis_url: str | None, redis_prefix: str | None) -> None:
    """Point `current` back at the version it held before the current one (audited)."""
    reason = need_reason(reason, "rollback")
    current = bundle.current_version(model_dir)
    if current is None:
        raise BundleError(f"{model_dir}: no current version to roll back")
    previous = registry.previous_version(model_dir)
    if previous is None:
        chain = registry.history_chain(model_dir)
        if chain and chain[-1] != current:
            raise BundleError(f"{model_dir}: current ({current}) was not switched through `rta model` (last "
                              f"recorded: {chain[-1]}); promote the version you want explicitly")
        raise BundleError(f"{model_dir}: no previous version to roll back to ({current} is the first "
                          "in registry.jsonl)")
    settings = _settings(config_file, redis_url, redis_prefix)
    entry = registry.switch(model_dir, previous, "rollback", who_default(who), reason,
                            audit=audit_to_topic(settings) if audit_topic else None, expect_current=current)
    click.echo(f"current: {entry['old']} -> {entry['new']} (rollback by {entry['who']})")


@model.command("diff")
@click.argument("a")
@click.argument("b")
@model_dir_option
@click.option("--logs", "logs_path", required=True, type=click.Path(path_type=Path),
              help="Logged traffic or a world log: the rows both models decide.")
@click.option("--ratio", type=float, required=True, help="Target block share r, the same for both.")
@click.option("--pass-share", type=float, default=0.0, show_default=True)
@click.option("--explore", type=float, default=0.0, show_default=True)
@click.option("--from-ms", type=int, default=None, help="Only rows with ts_ms >= this.")
@click.option("--until-ms", type=int, default=None, help="Only rows with ts_ms < this.")
@click.option("--attribution", default=None, help="Attribution windows of a logged layout.")
@click.option("--as-of-ms", type=int, default=None)
@click.option("--speedup", type=float, default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
def diff_cmd(a: str, b: str, model_dir: Path, logs_path: Path, ratio: float, pass_share: float, explore: float,
             from_ms: int | None, until_ms: int | None, attribution: str | None, as_of_ms: int | None,
             speedup: float, seed: int) -> None:
    """Decision churn A -> B: share of requests whose decision flips at the same r, per reason."""
    from training.churn import diff_models
    from training.logs import Attribution
    from training.replay import Step, _finite

    if not speedup > 0:
        raise ConfigError(f"--speedup must be > 0, got {speedup}")
    step = Step(ratio, pass_share, explore)
    step.targets()
    rep = diff_models(registry.version_dir(model_dir, a), registry.version_dir(model_dir, b), logs_path, step,
                      Attribution.parse(attribution, as_of_ms), seed, speedup, from_ms, until_ms)
    c = rep["churn"]
    click.echo(f"[rta model] {a} -> {b} at r={ratio:g}: {c['share']:.2%} of {c['rows']} decisions flip "
               f"(pass->block {c['pass_to_block']:.2%}, block->pass {c['block_to_pass']:.2%})", err=True)
    click.echo(json.dumps(_finite(rep), indent=1))


def _end_canary_of(model_dir: Path, version: str, who: str, reason: str, settings: Settings | None) -> None:
    """A promoted version's canary is over: its state is cleared through the audited path (the
    workers then serve it as current only). A failure to record that is one line, not an error:
    the promotion itself is done."""
    from stream import canary

    try:
        state = canary.read_canary(model_dir)
        if state is None or state.version != version:
            return
        canary.stop(model_dir, who, f"promoted: {reason}", audit_to_topic(settings) if settings else None,
                    expect_version=version)
        click.echo(f"[rta model] canary of {version} ended (promoted)", err=True)
    except (BundleError, ConfigError, OSError) as exc:
        click.echo(f"[rta model] promoted, but the canary of {version} was not ended: {exc}; "
                   "run `rta model canary --stop`", err=True)


def _add_canary() -> None:
    from stream.canary import canary_cmd
    from training.canary_judge import judge_cmd, watch_cmd

    model.add_command(canary_cmd)
    model.add_command(judge_cmd)
    model.add_command(watch_cmd)


_add_canary()
