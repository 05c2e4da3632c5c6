"""`rta world generate|stream`: the synthetic world as logged Parquet or as live request events.

`stream` publishes rows of the same world (same seed -> same features, ids and truth) to the
requests topic, rate-limited, keyed by request_id, optionally writing the matching ground
truth so a demo can compare the filter's decisions with the oracle.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stream.config import Settings, load_settings
from stream.errors import BundleError, StackError
from stream.events import encode_requests, encode_requests_positional
from stream.features import FeatureSpec
from training.world import DEFAULT_FEATURES, PERIODS, TASKS, WorldConfig, generate, write

_FLUSH_TIMEOUT_S = 30.0


def shift_options(fn: Any) -> Any:
    """The shift flags of `generate` and `stream` (docs/world.md "Shifts"), as one decorator."""
    opts = [
        click.option("--new-source-from", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help="Fraction of the rows from which a new high-intent source with out-of-distribution "
                          "features (other units, unseen categories) appears (default: never)."),
        click.option("--new-source-share", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     default=0.05, show_default=True, help="Share of all traffic from the new source once it starts."),
        click.option("--new-source-units", type=click.Choice(["larger", "smaller"]), default="larger",
                     show_default=True, help="The new source's units: larger (cents, ms, ...) or smaller "
                                             "(thousands, minutes, years, ...) than the known traffic's."),
        click.option("--drift-source-from", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help="Fraction of the rows from which a known client's time features drift in scale "
                          "(default: never)."),
        click.option("--drift-source-share", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     default=0.10, show_default=True, help="Share of known traffic on the drifting client."),
        click.option("--drift-source-scale", type=click.FloatRange(1, 10_000), default=10.0, show_default=True,
                     help="Unit factor the drifting features reach at the end of the rows."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _shift_config(kw: dict[str, Any]) -> dict[str, Any]:
    """WorldConfig fields from the shift flags (popped from the command's kwargs)."""
    return {name: kw.pop(name) for name in ("new_source_from", "new_source_share", "new_source_units",
                                            "drift_source_from",
                                            "drift_source_share", "drift_source_scale")}


@click.group()
def world() -> None:
    """Synthetic traffic: logged Parquet with true probabilities, or live request events."""


@world.command("generate")
@click.option("--rows", type=click.IntRange(min=1), required=True, help="Number of requests.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample seed (the world's structure is fixed; the seed picks the sample).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("data/world"),
              show_default=True, help="Output directory (part-*.parquet + _world.json).")
@click.option("--drift", type=click.FloatRange(-10, 10), default=0.0, show_default=True,
              help="Logit units intent and click propensity move over the span (0 = stationary).")
@click.option("--features", type=click.IntRange(min=28), default=DEFAULT_FEATURES, show_default=True,
              help="Number of feature columns (beyond 108: extra noise features).")
@click.option("--shards", type=click.IntRange(min=1), default=1, show_default=True,
              help="Number of Parquet files (content does not depend on it).")
@click.option("--span-days", type=click.FloatRange(min=0, min_open=True), default=7.0, show_default=True,
              help="Time the requests' ts_ms cover.")
@shift_options
@click.option("--period", type=click.Choice(PERIODS), default="all", show_default=True,
              help="Write only the rows before / after the first shift starts (a time-ordered split).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def generate_cmd(rows: int, seed: int, out: Path, drift: float, features: int, shards: int,
                 span_days: float, period: str, quiet: bool, **shifts: Any) -> None:
    """Write logged traffic (DESIGN.md log format) with true probabilities."""
    if shards > rows:
        raise click.BadParameter(f"{shards} shards for {rows} rows; use at most one shard per row",
                                 param_hint="'--shards'")
    cfg = WorldConfig(features=features, drift=drift, span_days=span_days, **_shift_config(shifts))
    info = write(out, rows, seed, cfg, shards=shards, progress=not quiet, period=period)
    click.echo(json.dumps({
        "out": str(out), "rows": info["rows"], "seed": seed, "features": features, "period": period,
        **({"sources": info["sources"]} if "sources" in info else {}),
        "files": [f["file"] for f in info["files"]], "base_rates": info["base_rates"],
        "seconds": info["seconds"], "rows_per_s": round(info["rows"] / max(info["seconds"], 1e-9)),
    }))


# ----------------------------------------------------------------------------- stream
def _short(x: np.ndarray) -> np.ndarray:
    """float32 values as the shortest float64 that reads back the same (short JSON)."""
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.floor(np.log10(np.abs(x)))
        scale = 10.0 ** np.clip(6 - np.nan_to_num(mag, nan=0.0, posinf=0.0, neginf=0.0), -30, 30)
        out = np.round(x * scale) / scale
    return np.where(np.isfinite(out), out, x)


def _matrices(batch: pa.RecordBatch, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
    """The `stream.features` batch representation of a world batch, in spec order."""
    have = set(batch.schema.names)
    missing = [n for n in spec.names if n not in have]
    if missing:
        raise BundleError(f"the bundle's spec needs features the world does not make: {missing[:5]}")
    n = batch.num_rows
    num = np.empty((n, len(spec.numeric)), dtype=np.float64)
    for j, name in enumerate(spec.numeric):
        num[:, j] = _short(batch.column(name).to_numpy(zero_copy_only=False))
    cat = np.empty((n, len(spec.categorical)), dtype=object)
    for j, name in enumerate(spec.categorical):
        col = batch.column(name)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        cat[:, j] = col.fill_null("").to_numpy(zero_copy_only=False)
    return num, cat


def _bundle_spec(model_dir: Path) -> FeatureSpec:
    from model.bundle import read_manifest, resolve_bundle

    try:
        manifest = read_manifest(resolve_bundle(model_dir))
        return FeatureSpec.from_dict(manifest["feature_spec"])
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(f"cannot read the feature spec of the bundle in {model_dir}: {exc}") from None


def truth_table(batch: pa.RecordBatch, ts_ms: np.ndarray) -> pa.Table:
    """What the world knows about sent requests: request_id, the send ts_ms, the sampled labels,
    and every `true_*` column the world has (whatever scenarios add)."""
    cols: dict[str, Any] = {"request_id": batch.column("request_id"), "ts_ms": pa.array(ts_ms, pa.int64())}
    cols.update({t: batch.column(t) for t in TASKS})
    cols.update({c: batch.column(c) for c in batch.schema.names if c.startswith("true_")})
    return pa.table(cols)


class TruthChunks:
    """Truth rows to `DIR/truth-<seed>-<start>-<n>.parquet`, one file per `rows` rows or
    `seconds`, each written under a hidden temp name and renamed: a reader polling DIR only
    ever sees whole files, in name order = send order."""

    def __init__(self, directory: Path, seed: int, rows: int = 16_384, seconds: float = 1.0) -> None:
        self.dir, self.rows, self.seconds = Path(directory), rows, seconds
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix = f"truth-{seed}-{time.time_ns() // 1_000_000}"
        self.tables: list[pa.Table] = []
        self.n = 0
        self.files = 0
        self.since = time.monotonic()

    def add(self, table: pa.Table) -> None:
        self.tables.append(table)
        self.n += table.num_rows
        if self.n >= self.rows or time.monotonic() - self.since >= self.seconds:
            self.flush()

    def flush(self) -> None:
        if self.tables:
            final = self.dir / f"{self.prefix}-{self.files:06d}.parquet"
            temp = self.dir / f".{final.name}.tmp"
            pq.write_table(pa.concat_tables(self.tables), temp, compression="zstd")
            temp.replace(final)
            self.files += 1
        self.tables, self.n, self.since = [], 0, time.monotonic()

    def close(self) -> None:
        self.flush()


def stream_requests(settings: Settings, count: int, rate: float = 0.0, seed: int = 0,
                    config: WorldConfig | None = None, spec: FeatureSpec | None = None,
                    positional: bool = False, truth_out: Path | None = None,
                    progress: bool = False, truth_dir: Path | None = None,
                    startup_timeout: float = 10.0) -> dict[str, Any]:
    """Publish `count` world rows as request events; returns what was sent.

    `spec` selects and orders features (a bundle's spec; required for positional). Events carry
    the wall-clock send time as ts_ms. `truth_out` is one Parquet file written as the stream
    goes; `truth_dir` gets the same rows in chunk files renamed into place as the stream runs
    (`TruthChunks`), so a downstream simulator running meanwhile picks them up. Raises
    StackError when the broker is unreachable (within `startup_timeout` s), the topic is
    missing, or events are not acknowledged.
    """
    from confluent_kafka import KafkaException

    from stream.kafka import make_admin, make_producer, produce_waiting, wait_reachable

    cfg = config or WorldConfig()
    spec = spec or cfg.feature_spec()
    topic = settings.topic("requests")
    wait_reachable(settings, startup_timeout)  # one line, not librdkafka's retries, when nothing answers
    try:
        meta = make_admin(settings).list_topics(timeout=10)
    except KafkaException as exc:
        raise StackError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc.args[0].str()}") from None
    if topic not in meta.topics:
        raise StackError(f"topic {topic} does not exist on {settings.kafka_bootstrap}; run `rta topics create`")
    encode = encode_requests_positional if positional else encode_requests
    producer = make_producer(settings)
    try:
        # Learn the topic's partition leaders before the first event is stamped: a cold producer
        # holds its first messages until it has them, which would read as decision latency.
        producer.list_topics(topic, timeout=10)
    except KafkaException as exc:
        raise StackError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc.args[0].str()}") from None
    stats = {"delivered": 0, "failed": 0, "error": None}

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is None:
            stats["delivered"] += 1
        else:
            stats["failed"] += 1
            stats["error"] = stats["error"] or err.str()

    chunk = 2048 if rate <= 0 else max(1, min(512, int(rate / 50)))  # ~20 ms of traffic per chunk
    truth_writer: pq.ParquetWriter | None = None
    chunks = TruthChunks(truth_dir, seed) if truth_dir is not None else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=count, unit="ev", file=sys.stderr, desc="stream")
    sent, first_id, last_id = 0, None, None
    started = time.monotonic()
    try:
        for block in generate(count, seed, cfg):
            for lo in range(0, block.num_rows, chunk):
                batch = block.slice(lo, chunk)
                if rate > 0:
                    ahead = started + sent / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                ids = batch.column("request_id").to_pylist()
                ts = np.full(batch.num_rows, time.time_ns() // 1_000_000, dtype=np.int64)
                num, cat = _matrices(batch, spec)
                for rid, value in zip(ids, encode(ids, ts, num, cat, spec), strict=True):
                    produce_waiting(producer, topic, value, rid, on_delivery=on_delivery)
                producer.poll(0)
                if chunks is not None:
                    chunks.add(truth_table(batch, ts))
                if truth_out is not None:
                    cols = {"request_id": batch.column("request_id"), "ts_ms": pa.array(ts)}
                    cols.update({c: batch.column(c) for t in TASKS for c in (t, f"true_{t}")})
                    if cfg.shifted:
                        cols["true_source"] = batch.column("true_source")
                    table = pa.table(cols)
                    if truth_writer is None:
                        truth_out.parent.mkdir(parents=True, exist_ok=True)
                        truth_writer = pq.ParquetWriter(truth_out, table.schema, compression="zstd")
                    truth_writer.write_table(table)
                first_id = first_id or ids[0]
                last_id = ids[-1]
                sent += batch.num_rows
                if bar is not None:
                    bar.update(batch.num_rows)
        remaining = producer.flush(_FLUSH_TIMEOUT_S)
    finally:
        if truth_writer is not None:
            truth_writer.close()
        if chunks is not None:
            chunks.close()
        if bar is not None:
            bar.close()
    elapsed = time.monotonic() - started
    summary = {
        "topic": topic, "bootstrap": settings.kafka_bootstrap, "sent": sent,
        "delivered": stats["delivered"], "failed": stats["failed"],
        "format": "positional" if positional else "canonical", "fingerprint": spec.fingerprint(),
        "seed": seed, "first_request_id": first_id, "last_request_id": last_id,
        "seconds": round(elapsed, 3), "events_per_s": round(sent / max(elapsed, 1e-9)),
        "truth_out": str(truth_out) if truth_out else None,
        "truth_dir": str(truth_dir) if truth_dir else None,
        "truth_files": chunks.files if chunks is not None else 0,
    }
    if remaining or stats["failed"]:
        why = stats["error"] or f"not acknowledged within {_FLUSH_TIMEOUT_S:.0f}s"
        raise StackError(f"{stats['failed'] + remaining} of {sent} events to {topic} not delivered: {why}")
    return summary


@world.command("stream")
@click.option("--rate", type=click.FloatRange(min=0), default=1000.0, show_default=True,
              help="Events per second (0 = as fast as possible).")
@click.option("--count", type=click.IntRange(min=1), required=True, help="Number of events.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="World sample seed.")
@click.option("--drift", type=click.FloatRange(-10, 10), default=0.0, show_default=True)
@click.option("--features", type=click.IntRange(min=28), default=DEFAULT_FEATURES, show_default=True)
@click.option("--positional", is_flag=True,
              help="Positional fast path (fp + x in the bundle's feature order); needs --model-dir.")
@click.option("--model-dir", type=click.Path(exists=True, path_type=Path), default=None,
              help="Bundle (or model dir whose `current` is followed) whose feature spec to send.")
@click.option("--truth-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write request_id -> labels and true probabilities here (Parquet).")
@click.option("--truth", "truth_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the sent requests' labels and true_* columns here, in chunk files renamed "
                   "into place as the stream runs (what `rta world outcomes` reads).")
@click.option("--bootstrap", default=None, help="Kafka bootstrap servers (else env/config/dev stack).")
@click.option("--startup-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds to wait for the cluster to answer before failing with one line.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Config file (TOML/JSON).")
@shift_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def stream_cmd(rate: float, count: int, seed: int, drift: float, features: int, positional: bool,
               model_dir: Path | None, truth_out: Path | None, bootstrap: str | None,
               config_file: str | None, quiet: bool, truth_dir: Path | None = None,
               startup_timeout: float = 10.0, **shifts: Any) -> None:
    """Publish synthetic request events to the requests topic, keyed by request_id."""
    if positional and model_dir is None:
        raise click.UsageError("--positional needs --model-dir (the fingerprint is the bundle's)")
    settings = load_settings(config_file, kafka_bootstrap=bootstrap)
    spec = _bundle_spec(model_dir) if model_dir is not None else None
    cfg = WorldConfig(features=features, drift=drift, **_shift_config(shifts))
    summary = stream_requests(settings, count, rate, seed, cfg, spec=spec, positional=positional,
                              truth_out=truth_out, progress=not quiet, truth_dir=truth_dir,
                              startup_timeout=startup_timeout)
    click.echo(json.dumps(summary))


# ----------------------------------------------------------------------------- outcomes
def _register_outcomes() -> None:
    from training.outcomes import outcomes_cmd

    world.add_command(outcomes_cmd)


_register_outcomes()
