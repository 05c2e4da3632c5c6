"""`rta topics create|list`: provision the topics of `Settings.topics` on the configured cluster.

Works on any Kafka cluster (bootstrap and librdkafka pass-through from the usual settings) and
is idempotent: existing topics are reported and left alone.
"""

from __future__ import annotations

import click

from infra.stack import wait_kafka
from stream.config import Settings, load_settings
from stream.kafka import ensure_topics, make_admin


@click.group(name="topics")
def topics() -> None:
    """Provision the topics on the configured cluster."""


def _reachable(settings: Settings, timeout: float) -> None:
    # One clear line instead of librdkafka retrying in the background for the whole timeout.
    wait_kafka(settings.kafka_bootstrap, timeout, kafka_conf=settings.kafka)


@topics.command()
@click.option("--partitions", type=click.IntRange(min=1), default=None,
              help="Partitions per new topic [default: settings, 3].")
@click.option("--replication", type=click.IntRange(min=1), default=1, show_default=True,
              help="Replication factor per new topic.")
@click.option("--bootstrap", default=None, help="Kafka bootstrap servers [default: settings].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Config file (TOML/JSON).")
@click.option("--timeout", type=click.FloatRange(min=1), default=15.0, show_default=True)
def create(partitions: int | None, replication: int, bootstrap: str | None,
           config_file: str | None, timeout: float) -> None:
    """Create every topic role's topic if missing; print created/exists per topic."""
    settings = load_settings(config_file, kafka_bootstrap=bootstrap)
    _reachable(settings, timeout)
    n = partitions or settings.partitions
    result = ensure_topics(make_admin(settings), settings.topics.values(), n, replication, timeout)
    for role, name in settings.topics.items():
        click.echo(f"{name:32} {result[name]:8} ({role})")


@topics.command(name="list")
@click.option("--bootstrap", default=None, help="Kafka bootstrap servers [default: settings].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Config file (TOML/JSON).")
@click.option("--timeout", type=click.FloatRange(min=1), default=15.0, show_default=True)
@click.pass_context
def list_(ctx: click.Context, bootstrap: str | None, config_file: str | None, timeout: float) -> None:
    """Each topic role: its topic, partition count or MISSING. Exit 1 if any is missing."""
    settings = load_settings(config_file, kafka_bootstrap=bootstrap)
    _reachable(settings, timeout)
    md = make_admin(settings).list_topics(timeout=timeout)
    missing = False
    for role, name in settings.topics.items():
        meta = md.topics.get(name)
        if meta is None or meta.error is not None:
            missing = True
            click.echo(f"{name:32} MISSING  ({role})")
        else:
            click.echo(f"{name:32} {len(meta.partitions):3} partitions ({role})")
    ctx.exit(1 if missing else 0)
