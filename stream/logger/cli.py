"""`rta log`: the command line of the logger (flags -> LoggerConfig -> Logger.run)."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import pyarrow as pa
from confluent_kafka import KafkaException

from stream.config import Settings, load_settings
from stream.errors import RtaError, StackError
from stream.features import DEFAULT_TASKS
from stream.logger.service import ROLES, Logger, LoggerConfig
from stream.logger.storage import LOCATION

log = logging.getLogger("rta.logger")


def _first_line(exc: Exception) -> str:
    """An OSError's (or pyarrow error's) reason on one line (an S3 error's text can span several)."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


# --- CLI ----------------------------------------------------------------------------------


def check_topics(settings: Settings, roles: tuple[str, ...] = ROLES) -> None:
    """The broker answers and the topics of `roles` exist, else a one-line StackError."""
    from stream.kafka import make_admin

    try:
        meta = make_admin(settings).list_topics(timeout=10)
    except KafkaException as exc:
        raise StackError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc.args[0].str()}") from None
    missing = [settings.topic(r) for r in roles if settings.topic(r) not in meta.topics]
    if missing:
        raise StackError(f"topic(s) {', '.join(missing)} do not exist on {settings.kafka_bootstrap}; "
                         "run `rta topics create`")
    if "requests" in roles and "decisions" in roles:
        req, dec = settings.topic("requests"), settings.topic("decisions")
        n_req, n_dec = len(meta.topics[req].partitions), len(meta.topics[dec].partitions)
        if n_req != n_dec:
            raise StackError(f"{req} has {n_req} partitions and {dec} {n_dec}: the logger joins request and "
                             "decision by partition, so both topics need the same count")


@click.command(name="log")
@click.option("--out", "out_dir", type=LOCATION, required=True,
              help="Root of the logged traffic (impressions/ and outcomes/ under it): a directory or "
                   "s3://bucket/prefix (credentials from the AWS environment, endpoint from RTA_S3_ENDPOINT "
                   "or AWS_ENDPOINT_URL; docs/operations.md).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Config file (TOML/JSON).")
@click.option("--bootstrap", default=None, help="Kafka bootstrap servers [default: settings].")
@click.option("--group", "group_id", default="rta-logger", show_default=True, help="Consumer group id.")
@click.option("--batch-size", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Most messages per consume call.")
@click.option("--batch-wait-ms", type=click.IntRange(min=0), default=100, show_default=True,
              help="Longest wait to fill a batch.")
@click.option("--roll-mb", type=click.FloatRange(min=0, min_open=True), default=64.0, show_default=True,
              help="Roll a file when its rows hold this many MiB in memory (Arrow, before compression).")
@click.option("--roll-seconds", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Roll a file this long after its first row (bounds how stale the log and the "
                   "committed offsets are).")
@click.option("--join-timeout-s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Event time a request waits for its decision (and the reverse) once its partition "
                   "has moved past it.")
@click.option("--idle-s", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="A requests partition silent this long (read to its end) counts as at wall clock minus "
                   "this, so decisions whose request never comes are dropped when traffic stops.")
@click.option("--max-buffered", type=click.IntRange(min=1), default=200_000, show_default=True,
              help="Most requests + decisions waiting for their pair; a partition over its share pauses "
                   "until the other side catches up (back-pressure: a stall costs latency, never rows).")
@click.option("--max-open-files", type=click.IntRange(min=1), default=48, show_default=True,
              help="Most files filling at once per kind (one per event hour); beyond it the oldest rolls.")
@click.option("--model-dir", type=click.Path(file_okay=False), default=None,
              help="Bundles whose feature specs name positional requests [default: settings].")
@click.option("--tasks", default=",".join(DEFAULT_TASKS), show_default=True,
              help="Tasks whose p_<task>, u_<task> columns to write.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=9410, show_default=True,
              help="Port for /metrics and /healthz (0: any free port).")
@click.option("--no-metrics", is_flag=True, help="Do not start the HTTP server.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def log_cmd(out_dir: Path | str, config_file: str | None, bootstrap: str | None, group_id: str, batch_size: int,
            batch_wait_ms: int, roll_mb: float, roll_seconds: float, join_timeout_s: float,
            max_buffered: int, idle_s: float, tasks: str, metrics_port: int, no_metrics: bool,
            log_level: str, max_open_files: int = 48, model_dir: str | None = None) -> None:
    """Requests + decisions + outcomes -> logged traffic (Parquet by event hour); at-least-once."""
    from stream.logs import setup_json_logging

    setup_json_logging(log_level)
    settings = load_settings(config_file, kafka_bootstrap=bootstrap, model_dir=model_dir)
    check_topics(settings)
    cfg = LoggerConfig(out_dir=out_dir, group_id=group_id, batch_size=batch_size, batch_wait_ms=batch_wait_ms,
                       roll_bytes=max(1, int(roll_mb * (1 << 20))), roll_seconds=roll_seconds,
                       join_timeout_s=join_timeout_s, max_buffered=max_buffered, idle_s=idle_s,
                       max_open_files=max_open_files, tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
                       metrics_port=None if no_metrics else metrics_port)
    try:
        logger = Logger(settings, cfg)
    except (OSError, pa.ArrowException) as exc:  # the metrics port is taken, --out is not writable
        raise RtaError(f"log: cannot start: {_first_line(exc)}") from None
    if logger.server is not None:
        log.info("metrics on http://%s:%d/metrics", cfg.metrics_host, logger.server.port,
                 extra={"event": "metrics", "port": logger.server.port})
    try:
        logger.run(install_signals=True)
    except (OSError, pa.ArrowException) as exc:  # disk full, permissions: offsets past it stay uncommitted
        raise RtaError(f"log: cannot write under {out_dir}: {_first_line(exc)}") from None
    except RtaError:
        raise
    except Exception as exc:  # a bug or input nobody foresaw: one line out, the trace in the log
        log.exception("logger stopped", extra={"event": "crashed"})
        raise RtaError(f"log: stopped ({type(exc).__name__}: {exc}); nothing past the last renamed "
                       "file was committed") from None
