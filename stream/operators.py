"""`rta ratio get|set|history`: the operators' handle on the live targets.

Targets (``r`` block share, ``p_u`` direct-pass share, ``epsilon`` explore share) live in the
Redis hash ``<redis_prefix>:ratio:targets``; every worker's controller reads them at each
refresh (a few times a second), so a `set` takes effect within a second. `set` validates
(0 <= r < 1, 0 <= p_u, epsilon, r + p_u + epsilon <= 1, r moves by at most ``--max-step``),
produces the audit entry {who, when, old, new, reason, version} to the Kafka audit topic and
waits for the broker's acknowledgement (the DURABLE record: no acknowledgement, no change),
then writes the targets and the entry atomically (WATCH/MULTI) to the capped list
``<redis_prefix>:ratio:audit`` (the 1,000 newest, for `history`).

`rta ratio acl` prints (or applies) the Redis ACL users of least privilege: workers write
window buckets and read targets; operators write targets and append the audit list.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import time
from typing import Any

import click

from stream.config import Settings, load_settings, redact
from stream.errors import RtaError
from stream.policy import check_targets
from stream.window import (
    ACL_ROLES,
    COUNTS,
    N_COUNTS,
    RedisStore,
    StoreUnavailable,
    acl_rules,
    apply_acl,
    counts_dict,
)

AUDIT_TOPIC_TIMEOUT = 3.0


def _settings(ctx: click.Context) -> Settings:
    return ctx.obj["settings"]


def _store(settings: Settings) -> RedisStore:
    return RedisStore.from_url(settings.redis_url, settings.redis_prefix, socket_timeout=2.0, connect_timeout=2.0)


def _unreachable(settings: Settings, exc: StoreUnavailable) -> RtaError:
    return RtaError(f"redis at {redact(settings.redis_url)}: {exc}; start it (rta dev up) or set RTA_REDIS_URL")


@click.group()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Config file (TOML/JSON/YAML).")
@click.option("--redis-url", default=None, help="Redis URL (else RTA_REDIS_URL, config, dev stack).")
@click.option("--redis-prefix", default=None, help="Key prefix of this deployment (default rta).")
@click.pass_context
def ratio(ctx: click.Context, config_file: str | None, redis_url: str | None, redis_prefix: str | None) -> None:
    """Target interception ratio: get, set, history (live, audited)."""
    ctx.ensure_object(dict)
    ctx.obj["settings"] = load_settings(config_file, redis_url=redis_url, redis_prefix=redis_prefix)


@ratio.command("set", context_settings={"ignore_unknown_options": True})  # R may be "-0.1"
@click.argument("r", type=float)
@click.option("--pass-share", "p_u", type=float, default=None,
              help="Direct pass share p_u for the most uncertain requests (default: keep).")
@click.option("--explore", "epsilon", type=float, default=None,
              help="Exploration share epsilon passed at random (default: keep).")
@click.option("--reason", required=True, help="Why (kept in the audit trail).")
@click.option("--who", default=None, help="Who is changing it (default: $USER).")
@click.option("--audit-topic/--no-audit-topic", default=True, show_default=True,
              help="Record the change on the audit topic first (the durable record; no change without it). "
                   "--no-audit-topic: Redis audit list only.")
@click.option("--max-step", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Largest change of r allowed [default: ratio_max_step setting, 0.25].")
@click.pass_context
def set_cmd(ctx: click.Context, r: float, p_u: float | None, epsilon: float | None, reason: str,
            who: str | None, audit_topic: bool, max_step: float | None) -> None:
    """Set the target block share R (0 <= R < 1), live for every worker."""
    settings = _settings(ctx)
    if not reason.strip():
        raise click.BadParameter("must not be empty", param_hint="--reason")
    who = who or os.environ.get("USER") or getpass.getuser()
    store = _store(settings)
    record = _AuditRecord(settings) if audit_topic else None
    try:
        check_targets(r, p_u or 0.0, epsilon or 0.0)  # a clear message before touching Redis
        entry = store.update_targets(who, reason, r, p_u, epsilon,
                                     max_step=settings.ratio_max_step if max_step is None else max_step,
                                     before_write=record)
    except StoreUnavailable as exc:
        raise _unreachable(settings, exc) from None
    old = entry["old"] or {}
    changes = ", ".join(f"{k}: {_fmt(old.get(k))} -> {_fmt(v)}" for k, v in entry["new"].items())
    click.echo(f"{changes} (version {entry['version']}, by {who})")


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:g}"


class _AuditRecord:
    """`before_write` of a target change: the entry on the audit topic, acknowledged, or no change."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __call__(self, entry: dict[str, Any]) -> None:
        why = produce_audit(self.settings, entry)
        if why is not None:
            raise RtaError(f"audit topic {self.settings.topic('audit')} not written ({redact(why)}); targets NOT "
                           "changed (the audit topic is the durable record; --no-audit-topic skips it)")


def produce_audit(settings: Settings, entry: dict[str, Any], key: bytes = b"ratio") -> str | None:
    """None when the broker acknowledged the entry, else why not. The key names what changed
    (`ratio`, `model`), so a compacted or filtered audit reader can tell them apart."""
    try:
        from stream.kafka import make_producer

        quiet = logging.getLogger("rta.ratio.kafka")
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
        errors: list[str] = []
        producer = make_producer(
            settings, **{"message.timeout.ms": int(AUDIT_TOPIC_TIMEOUT * 1000), "linger.ms": 0,
                         "socket.connection.setup.timeout.ms": 1000, "logger": quiet,
                         "enable.idempotence": True, "acks": "all",
                         "error_cb": lambda err: errors.append(str(err))},
        )
        delivered: list[Any] = []
        producer.produce(settings.topic("audit"), key=key, value=json.dumps(entry).encode(),
                         on_delivery=lambda err, msg: delivered.append(err))
        producer.flush(AUDIT_TOPIC_TIMEOUT + 1)
        if delivered and delivered[0] is None:
            return None
        return str(delivered[0]) if delivered else (errors[0] if errors else "no answer from Kafka")
    except Exception as exc:  # any failure is reported as "not recorded"
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


@ratio.command("acl")
@click.option("--worker-user", default="rta-worker", show_default=True, help="Redis user of the workers.")
@click.option("--operator-user", default="rta-operator", show_default=True, help="Redis user of operators.")
@click.option("--apply", "apply_", is_flag=True,
              help="Create/reset both users on the configured Redis (an admin URL), passwords from "
                   "$RTA_WORKER_REDIS_PASSWORD and $RTA_OPERATOR_REDIS_PASSWORD.")
@click.pass_context
def acl_cmd(ctx: click.Context, worker_user: str, operator_user: str, apply_: bool) -> None:
    """Least-privilege Redis users: print the ACL SETUSER commands (passwords elided) or apply them."""
    settings = _settings(ctx)
    users = {"worker": worker_user, "operator": operator_user}
    if not apply_:
        for role in ACL_ROLES:
            click.echo(f"ACL SETUSER {users[role]} reset on ><password> {' '.join(acl_rules(settings.redis_prefix, role))}")
        return
    secrets = {role: os.environ.get(f"RTA_{role.upper()}_REDIS_PASSWORD") for role in ACL_ROLES}
    missing = [f"RTA_{role.upper()}_REDIS_PASSWORD" for role, pw in secrets.items() if not pw]
    if missing:
        raise RtaError(f"ratio acl --apply: set {' and '.join(missing)} (passwords are never taken as flags)")
    store = _store(settings)
    try:
        for role in ACL_ROLES:
            store._call(lambda role=role: apply_acl(store.r, settings.redis_prefix, role, users[role], secrets[role]))
    except StoreUnavailable as exc:
        raise _unreachable(settings, exc) from None
    click.echo(f"redis users {worker_user} (worker) and {operator_user} (operator) set for prefix {settings.redis_prefix}")


@ratio.command("get")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.option("--window", "window_s", type=click.IntRange(1, 3600), default=30, show_default=True,
              help="Seconds of window to report observed shares over.")
@click.pass_context
def get_cmd(ctx: click.Context, as_json: bool, window_s: int) -> None:
    """Current targets, observed shares over the window, and each live controller's thresholds."""
    settings = _settings(ctx)
    store = _store(settings)
    now = int(time.time())
    try:
        targets, meta = store.get_targets()
        snap = store.read(range(now - window_s + 1, now + 1))
        ctls = store.controllers()
    except StoreUnavailable as exc:
        raise _unreachable(settings, exc) from None
    counts = {k: 0 for k in COUNTS if k != "spare"}
    for vec in snap.buckets.values():
        for k, v in counts_dict(vec[:N_COUNTS]).items():
            counts[k] += v
    total = counts["total"]
    shares = {k: (counts[k] / total if total else None)
              for k in ("blocked", "uncertain", "explore", "invalid", "degraded")}
    out = {
        "targets": targets.to_dict() if targets else None,
        "version": int(meta.get("version", 0) or 0),
        "updated_ms": int(meta["updated_ms"]) if meta.get("updated_ms") else None,
        "updated_by": meta.get("who"),
        "window_seconds": window_s,
        "observed": {"total": total, **{f"{k}_share": v for k, v in shares.items()}},
        "controllers": [
            {k: c.get(k) for k in ("id", "degraded", "theta", "tau_u", "targets_version", "feedback", "ts_ms")}
            for c in sorted(ctls, key=lambda c: str(c.get("id")))
        ],
    }
    if as_json:
        click.echo(json.dumps(out))
        return
    if targets is None:
        click.echo("targets: not set (workers use their defaults: block nothing)")
    else:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(out["updated_ms"] / 1000)) if out["updated_ms"] else "?"
        click.echo(f"targets: r={targets.r:g} p_u={targets.p_u:g} epsilon={targets.epsilon:g} "
                   f"(version {out['version']}, {when} by {out['updated_by']})")
    if total:
        click.echo(f"observed over {window_s}s: {total} decisions, " + ", ".join(
            f"{k} {100 * v:.2f}%" for k, v in shares.items()))
    else:
        click.echo(f"observed over {window_s}s: no decisions")
    for c in out["controllers"]:
        tau = c["tau_u"]
        click.echo(f"controller {c['id']}: theta={_num(c['theta'])} tau_u={_num(tau)}"
                   f"{' DEGRADED' if c['degraded'] else ''}")


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isinf(v)):
        return "inf"
    return f"{v:.6g}"


@ratio.command("history")
@click.option("-n", "n", type=click.IntRange(1, 1000), default=20, show_default=True, help="Entries.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def history_cmd(ctx: click.Context, n: int, as_json: bool) -> None:
    """Audit trail of target changes, newest first."""
    settings = _settings(ctx)
    try:
        rows = _store(settings).history(n)
    except StoreUnavailable as exc:
        raise _unreachable(settings, exc) from None
    if not rows:
        click.echo("no target changes recorded")
    for row in rows:
        if as_json:
            click.echo(json.dumps(row))
            continue
        old, new = row.get("old") or {}, row["new"]
        diff = " ".join(f"{k}={_fmt(old.get(k))}->{_fmt(new[k])}" for k in new if old.get(k) != new[k]) or "no change"
        click.echo(f"{row['when']}  {row['who']}: {diff}  ({row['reason']})")
