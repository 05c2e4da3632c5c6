"""`rta bench latency`: the worker's own latency, against a passthrough at the same rate, same run.

An end-to-end percentile on this machine is mostly the broker's and the box's: the embedded
broker's fetch does not wake on new data, and the load generator, the broker, the reader and
the worker share two cores. So the bench runs, in one sitting and each on FRESH topics (the
embedded broker's fetch cost grows with what a topic has stored):

- **passthrough**: its own process, consume -> produce, with the worker's consumer and producer
  configuration, batch size, batch wait and commit policy (`Checkpoint`). It produces the first
  400 bytes of each request (a decision is ~400 bytes): copying the whole 2.3 KB request moved
  5x the worker's bytes through the broker and the reader, and gave the passthrough the worse
  tail of the two (produced -> read p99 ~500 ms against the worker's ~50-200 ms, same runs);
- **worker**: `rta serve` as its own process;

and offers each the same fixed rate (ts stamped at send), reading the output topic back. The
worker's added latency is the difference of the two runs' percentiles. The worker's side is split
by the timestamps its messages carry: sent -> decided (the decision's own ts_ms, after the
policy: broker in, fetch, batch wait, decode, score), decided -> produced (the Kafka timestamp
of the decision: encode, produce call), produced -> read (linger, broker, the reader's fetch).
`--rounds 2` interleaves the order (passthrough first, then worker first). Prints one JSON object.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from bench.worker import (
    _bundle,
    _stack,
    _world,
    latency_figures,
    offer_and_read,
    percentiles,
    serve_command,
)
from stream.config import load_settings
from stream.kafka import ensure_topics, make_admin

DECISION_BYTES = 400  # what the passthrough produces per request: about a decision's size


def passthrough_process() -> None:
    """The passthrough as a process (argv: group batch_size batch_wait_ms commit_interval_ms):
    requests topic -> decisions topic, each request's first DECISION_BYTES, until SIGTERM. Same
    consumer (the worker's group settings), producer and checkpoint policy as `rta serve`."""
    from stream.checkpoint import Checkpoint, DeliveryReports
    from stream.kafka import consume_ready, make_consumer, make_producer
    from stream.worker import GROUP_DEFAULTS

    group, batch_size, wait_ms, commit_ms = sys.argv[1], *map(int, sys.argv[2:5])
    settings = load_settings()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    reports = DeliveryReports()
    producer = make_producer(settings, **reports.producer_config())
    consumer = make_consumer(settings, group, GROUP_DEFAULTS)
    cp = Checkpoint(consumer, producer, reports, commit_interval_s=commit_ms / 1000)
    src, dst = settings.topic("requests"), settings.topic("decisions")
    consumer.subscribe([src])
    produce = producer.produce
    while not stopping:
        msgs = consume_ready(consumer, batch_size, wait_ms / 1000)  # the worker's loop
        if msgs:
            msgs = [m for m in msgs if m.error() is None]
            for m in msgs:
                produce(dst, m.value()[:DECISION_BYTES], m.key())
            producer.poll(0)
            cp.store_offsets(src, np.fromiter([m.partition() for m in msgs], np.int32, len(msgs)),
                             np.fromiter([m.offset() for m in msgs], np.int64, len(msgs)))
        else:
            producer.poll(0)
        if cp.expired():
            cp.commit()
    cp.commit()
    consumer.close()


def _passthrough_command(group: str, batch_size: int, batch_wait_ms: int, commit_ms: int) -> list[str]:
    return [sys.executable, "-c", "from bench.latency import passthrough_process; passthrough_process()",
            group, str(batch_size), str(batch_wait_ms), str(commit_ms)]


def _stages(run: Any) -> dict[str, Any]:
    """Where one run's time went, by the timestamps its output carries (module docstring)."""
    out = {"sent_to_produced": percentiles(run.produced_ms - run.send_ms),
           "produced_to_read": percentiles(run.recv_ms - run.produced_ms)}
    if np.isfinite(run.decided_ms).any():
        out["sent_to_decided"] = percentiles(run.decided_ms - run.send_ms)
        out["decided_to_produced"] = percentiles(run.produced_ms - run.decided_ms)
    return out


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return round(float(np.median(got)), 2) if got else None


def _added(worker: dict[str, Any], passthrough: dict[str, Any]) -> dict[str, float | None]:
    return {k: (round(worker[k] - passthrough[k], 2) if worker[k] is not None and passthrough[k] is not None
                else None) for k in ("p50_ms", "p99_ms", "p999_ms")}


def fetch_probe(settings: Any, wait_ms: int, stored: int, seconds: float) -> dict[str, Any]:
    """One caught-up consumer (`fetch.wait.max.ms` = wait_ms) and one message at a time on a
    fresh 1-partition topic holding `stored` batches: send -> consume latency, and how many
    fetch requests a second the consumer sends (librdkafka statistics). What the embedded
    broker's fetch (no wake-up on new data, a listing of the stored batches per check) asks of
    the setting, with little of the box's CPU noise in it: one message in flight."""
    import json

    from confluent_kafka import OFFSET_END, TopicPartition

    from stream.kafka import make_consumer, make_producer

    topic = f"{settings.topic('requests')}.probe-{wait_ms}-{stored}-{time.monotonic_ns()}"
    ensure_topics(make_admin(settings), [topic], 1)
    producer = make_producer(settings, **{"linger.ms": 0})
    for i in range(stored):  # one batch each: a flush per message
        producer.produce(topic, b"x" * 100, b"s%d" % i)
        producer.flush(10)
    fetches: list[int] = []

    def stats(text: str) -> None:
        doc = json.loads(text)
        fetches.append(sum(b.get("req", {}).get("Fetch", 0) for b in doc.get("brokers", {}).values()))

    consumer = make_consumer(settings, f"probe-{time.monotonic_ns()}", **{
        "fetch.wait.max.ms": wait_ms, "statistics.interval.ms": 500, "stats_cb": stats})
    consumer.assign([TopicPartition(topic, 0, OFFSET_END)])
    consumer.consume(10, 1.0)  # connect and fetch once
    lat: list[float] = []
    t_end = time.monotonic() + seconds
    f0 = None
    while time.monotonic() < t_end:
        time.sleep(0.02)
        sent = time.perf_counter()
        producer.produce(topic, b"p", b"p")
        producer.poll(0)
        got = False
        while not got and time.perf_counter() - sent < 5:
            got = any(m.error() is None and m.key() == b"p" for m in consumer.consume(1, 0.5))
        if got:
            lat.append(1000 * (time.perf_counter() - sent))
        if f0 is None and fetches:
            f0 = (fetches[-1], time.monotonic())
    consumer.consume(1, 0.6)  # one more statistics report
    consumer.close()
    p = np.percentile(lat, [50, 99]) if lat else [np.nan, np.nan]
    rate = ((fetches[-1] - f0[0]) / (time.monotonic() - f0[1])) if f0 and fetches else None
    return {"fetch_wait_max_ms": wait_ms, "stored_batches": stored, "messages": len(lat),
            "p50_ms": round(float(p[0]), 2), "p99_ms": round(float(p[1]), 2),
            "max_ms": round(max(lat), 2) if lat else None,
            "fetch_requests_per_s": round(rate, 1) if rate is not None else None}


@click.command(name="latency")
@click.option("--rate", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Offered requests/s, the same for both runs.")
@click.option("--seconds", type=click.FloatRange(min=1), default=10.0, show_default=True,
              help="Duration of each run.")
@click.option("--rounds", type=click.IntRange(min=1, max=10), default=1, show_default=True,
              help="Pairs of runs; every second pair runs the worker first.")
@click.option("--features", type=click.IntRange(28, 108), default=108, show_default=True,
              help="Features per request (the world's catalogue, first N).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--batch-wait-ms", type=click.IntRange(min=0), default=None,
              help="Batch wait of both processes [default: rta serve's].")
@click.option("--commit-interval-ms", type=click.IntRange(min=0), default=1000, show_default=True,
              help="The passthrough's commit interval (rta serve's default is 1 s).")
@click.option("--quantize", type=click.Choice(["int8", "none"]), default="int8", show_default=True)
@click.option("--fetch-probe", "probe_waits", default="", show_default=True,
              help="Instead: the one-message probe (fetch_probe) at these fetch.wait.max.ms values, "
                   "e.g. '10,20,50', on an empty topic and one holding --probe-stored batches.")
@click.option("--probe-stored", type=click.IntRange(min=0), default=3000, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the JSON here.")
def latency(rate: int, seconds: float, rounds: int, features: int, batch_size: int, batch_wait_ms: int | None,
            commit_interval_ms: int, quantize: str, probe_waits: str, probe_stored: int, out: str | None) -> None:
    """Passthrough and worker at the same offered rate on fresh topics: p50/p99/p99.9 of both,
    the worker's added latency, and the worker-side stages."""
    import json

    from stream.worker import WorkerConfig

    wait = WorkerConfig().batch_wait_ms if batch_wait_ms is None else batch_wait_ms
    try:
        waits = [int(x) for x in probe_waits.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"--fetch-probe takes comma-separated integers (ms), got {probe_waits!r}") from None
    if any(w < 0 for w in waits):
        raise click.BadParameter("--fetch-probe values must be >= 0 ms")
    work = Path(tempfile.mkdtemp(prefix="rta-bench-latency-"))
    if waits:
        try:
            with _stack(load_settings(), work) as settings:
                settings = settings.with_topic_prefix(f"probe{os.getpid()}")
                rows = [fetch_probe(settings, w, stored, seconds)
                        for stored in dict.fromkeys((0, probe_stored)) for w in waits]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        text = json.dumps({"bench": "latency.fetch_probe", "seconds": seconds, "probes": rows,
                           "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}},
                          indent=2)
        if out:
            Path(out).write_text(text + "\n")
        click.echo(text)
        return
    results: list[dict[str, Any]] = []
    try:
        with _stack(load_settings(), work) as settings:
            from dataclasses import replace

            from stream.policy import Targets
            from stream.window import RedisStore

            tag = f"lat{os.getpid()}"
            settings = replace(settings, model_dir=work / "models", state_dir=work / ".rta", redis_prefix=f"bench:{tag}")
            click.echo("bench: building requests and a bundle ...", err=True)
            spec, num, cat = _world(20_000, features)
            _bundle(settings.model_dir, spec, num, cat, None if quantize == "none" else quantize)
            store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
            store.set_targets(Targets(0.25, 0.05, 0.01), "bench", "bench latency")
            for r in range(rounds):
                order = ("passthrough", "worker") if r % 2 == 0 else ("worker", "passthrough")
                row: dict[str, Any] = {"round": r + 1, "order": list(order)}
                for phase in order:
                    click.echo(f"bench: {phase} at {rate}/s (round {r + 1}) ...", err=True)
                    s = settings.with_topic_prefix(f"{tag}-{r}-{phase}")  # fresh topics per phase
                    ensure_topics(make_admin(s), s.topics.values(), s.partitions)
                    group = f"{tag}-{r}-{phase}"
                    cmd = (serve_command(group, batch_size, wait) if phase == "worker"
                           else _passthrough_command(group, batch_size, wait, commit_interval_ms))
                    run = offer_and_read(s, cmd, work / f"{phase}-{r}.log", s.topic("decisions"), spec, num, cat,
                                         rate, seconds, False, decisions=phase == "worker")
                    row[phase] = {**latency_figures(run, rate), "stages": _stages(run),
                                  "load_avg_1m": round(os.getloadavg()[0], 2)}
                row["worker_added"] = _added(row["worker"], row["passthrough"])
                results.append(row)
            store.clear()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from stream.kafka import CONSUMER_DEFAULTS

    result = {"bench": "latency", "rate": rate, "seconds": seconds, "features": features,
              "batch_size": batch_size, "batch_wait_ms": wait,
              "consumer_defaults": {k: v for k, v in CONSUMER_DEFAULTS.items() if k.startswith("fetch")},
              "rounds": results,
              # across rounds: the median (a load spike from elsewhere lands in one run of a pair)
              "worker_added_median": {k: _median([r["worker_added"][k] for r in results])
                                      for k in ("p50_ms", "p99_ms", "p999_ms")},
              "passthrough_p99_ms_median": _median([r["passthrough"]["p99_ms"] for r in results]),
              "worker_p99_ms_median": _median([r["worker"]["p99_ms"] for r in results]),
              "worker_added_p99_ms_max": max((r["worker_added"]["p99_ms"] or np.inf) for r in results),
              "target_worker_added_p99_ms": 20.0,
              "worker_p99_ms_max": max((r["worker"]["p99_ms"] or np.inf) for r in results),
              "target_p99_ms": 100.0,
              "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    click.echo(text)
