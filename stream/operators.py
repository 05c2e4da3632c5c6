"""`rta ratio get|set|history`: the operators' handle on the live targets.

Targets (``r`` block share, ``p_u`` direct-pass share, ``epsilon`` explore share) live in the
Redis hash ``<redis_prefix>:ratio:targets``; every worker's controller reads them at each
refresh (a few times a second), so a `set` takes effect within a second. `set` validates
(0 <= r < 1, 0 <= p_u, epsilon, r + p_u + epsilon <= 1), then writes the targets and an audit
entry {who, when, old, new, reason} atomically (WATCH/MULTI) to the capped list
``<redis_prefix>:ratio:audit``; the entry is also produced to the audit topic when Kafka
answers within a few seconds (Redis stays the record if it does not).
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

from stream.config import Settings, load_settings
from stream.errors import RtaError
from stream.policy import check_targets
from stream.window import COUNTS, N_COUNTS, RedisStore, StoreUnavailable, counts_dict

AUDIT_TOPIC_TIMEOUT = 3.0


def _settings(ctx: click.Context) -> Settings:
    return ctx.obj["settings"]


def _store(settings: Settings) -> RedisStore:
    return RedisStore.from_url(settings.redis_url, settings.redis_prefix, socket_timeout=2.0, connect_timeout=2.0)


def _unreachable(settings: Settings, exc: StoreUnavailable) -> RtaError:
    return RtaError(f"redis at {settings.redis_url} unreachable ({exc}); start it (rta dev up) or set RTA_REDIS_URL")


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
              help="Also produce the audit entry to the audit topic if Kafka answers.")
@click.pass_context
def set_cmd(ctx: click.Context, r: float, p_u: float | None, epsilon: float | None, reason: str,
            who: str | None, audit_topic: bool) -> None:
    """Set the target block share R (0 <= R < 1), live for every worker."""
    settings = _settings(ctx)
    if not reason.strip():
        raise click.BadParameter("must not be empty", param_hint="--reason")
    who = who or os.environ.get("USER") or getpass.getuser()
    store = _store(settings)
    try:
        check_targets(r, p_u or 0.0, epsilon or 0.0)  # a clear message before touching Redis
        entry = store.update_targets(who, reason, r, p_u, epsilon)
    except StoreUnavailable as exc:
        raise _unreachable(settings, exc) from None
    old = entry["old"] or {}
    changes = ", ".join(f"{k}: {_fmt(old.get(k))} -> {_fmt(v)}" for k, v in entry["new"].items())
    click.echo(f"{changes} (version {entry['version']}, by {who})")
    if audit_topic:
        sent = _produce_audit(settings, entry)
        if sent is not None:
            click.echo(f"rta: audit topic not written ({sent}); the Redis audit list has the entry", err=True)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:g}"


def _produce_audit(settings: Settings, entry: dict[str, Any]) -> str | None:
    """Best effort: None when delivered, else why not."""
    try:
        from stream.kafka import make_producer

        quiet = logging.getLogger("rta.ratio.kafka")
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
        errors: list[str] = []
        producer = make_producer(
            settings, **{"message.timeout.ms": int(AUDIT_TOPIC_TIMEOUT * 1000), "linger.ms": 0,
                         "socket.connection.setup.timeout.ms": 1000, "logger": quiet,
                         "error_cb": lambda err: errors.append(str(err))},
        )
        delivered: list[Any] = []
        producer.produce(settings.topic("audit"), key=b"ratio", value=json.dumps(entry).encode(),
                         on_delivery=lambda err, msg: delivered.append(err))
        producer.flush(AUDIT_TOPIC_TIMEOUT + 1)
        if delivered and delivered[0] is None:
            return None
        return str(delivered[0]) if delivered else (errors[0] if errors else "no answer from Kafka")
    except Exception as exc:  # never fail a target change because Kafka is away
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


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
