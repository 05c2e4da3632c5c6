"""`rta bench worker`: the worker's end-to-end events/s against a plain consume->produce
passthrough (same broker, same run, same batch size and commit policy), plus request->decision
latency percentiles at fixed offered loads. Prints one JSON object.

Both throughput runs read the same preloaded requests (the synthetic world's 108-feature
canonical JSON, unless `--features` says fewer) with a fresh consumer group; the clock runs
from the first consumed batch to the last message processed, so group joins are not counted.
The passthrough uses the same `Checkpoint` (commit only after the producer acknowledged every
message), so the only difference is the work: decode -> score -> decide -> encode + the
controller's Redis round trip.

Latency: the worker runs as its own `rta serve` process (as deployed); this process offers
requests at a fixed rate, stamping `ts_ms` at send time, and reads the decisions back;
latency = time the decision is read - the request's send time.
"""

from __future__ import annotations

import contextlib
import cProfile
import gc
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import click
import numpy as np
import orjson

from stream.checkpoint import Checkpoint, DeliveryReports
from stream.config import Settings, load_settings
from stream.events import encode_requests, encode_requests_binary, encode_requests_positional
from stream.features import FeatureSpec
from stream.kafka import (
    consume_ready,
    ensure_topics,
    make_admin,
    make_consumer,
    make_producer,
    produce_waiting,
)

# --- the stack and the model ----------------------------------------------------------------


@contextlib.contextmanager
def _stack(settings: Settings, log_dir: Path) -> Iterator[Settings]:
    """The configured cluster/Redis if any (env, file, dev stack), else embedded ones we own."""
    from dataclasses import replace

    from infra.stack import Embedded

    owned: list[Embedded] = []
    try:
        if settings.origin.get("kafka_bootstrap") not in {"flag", "env", "file", "dev-stack"}:
            k = Embedded("kafka", log_dir=log_dir)
            k.start()
            owned.append(k)
            settings = replace(settings, kafka_bootstrap=k.address)
        if settings.origin.get("redis_url") not in {"flag", "env", "file", "dev-stack"}:
            r = Embedded("redis", log_dir=log_dir)
            r.start()
            owned.append(r)
            settings = replace(settings, redis_url=r.address)
        yield settings
    finally:
        for proc in reversed(owned):
            proc.stop()


def _world(rows: int, features: int, seed: int = 0) -> tuple[FeatureSpec, np.ndarray, np.ndarray]:
    """Feature matrices of `rows` synthetic requests (the world's catalogue, first `features`)."""
    import pyarrow as pa

    from training.world import WorldConfig, feature_kinds, generate_table

    table = generate_table(rows, seed, WorldConfig(features=features))
    kinds = feature_kinds(table.schema)
    numeric = tuple(n for n, k in kinds.items() if k == "numeric")
    categorical = tuple(n for n, k in kinds.items() if k == "categorical")
    num = np.column_stack([table.column(n).to_numpy(zero_copy_only=False) for n in numeric]).astype(np.float32)
    cat = np.empty((rows, len(categorical)), dtype=object)
    for j, n in enumerate(categorical):
        col = table.column(n)
        if pa.types.is_dictionary(col.type):
            col = col.cast(pa.string())
        cat[:, j] = [v if v is not None else "" for v in col.to_pylist()]
    return FeatureSpec(numeric, categorical), num, cat


def _bundle(model_dir: Path, spec: FeatureSpec, num: np.ndarray, cat: np.ndarray,
            quantize: str | None = None, name: str = "bench-v1", publish: bool = True, seed: int = 0) -> Path:
    """A student bundle for this spec with untrained weights (spread out so scores vary like a
    trained model's): the worker's cost does not depend on how well the model was trained."""
    import torch

    from model import bundle
    from model.export import export_bundle
    from model.preprocess import Preprocessor
    from model.student import Student, StudentConfig

    pre = Preprocessor.fit(spec, num, cat)
    torch.manual_seed(seed)
    student = Student(pre.n_inputs, pre.cardinalities, ["click", "online", "cart", "deal"], StudentConfig())
    with torch.no_grad():
        student.head2_w.mul_(40.0)
    out = model_dir / name
    export_bundle(out, pre, student.eval(), metrics={"bench": True}, quantize=quantize)
    if publish:
        bundle.publish(out)
    return out


def _copy_bundle(model: Path, model_dir: Path, spec: FeatureSpec) -> Path:
    """A trained bundle served as it is (a copy, published in the bench's model dir), so the
    worker's figures can be read for what `rta train` ships (its int8 graph, where kept)."""
    import shutil

    from model import bundle
    from stream.errors import ConfigError

    src = bundle.resolve_bundle(model)
    theirs = bundle.verify_spec(src, bundle.read_manifest(src))
    if theirs.fingerprint() != spec.fingerprint():
        raise ConfigError(f"--model {model}: its {len(theirs.names)} features are not the bench's "
                          f"{len(spec.names)} world features (give --features {len(theirs.names)} or another bundle)")
    out = model_dir / src.name
    shutil.copytree(src, out)
    bundle.publish(out)
    return out


def _requests(spec: FeatureSpec, num: np.ndarray, cat: np.ndarray, ids: list[str], ts_ms: int,
              positional: bool | str) -> list[bytes]:
    """positional: False (canonical JSON), True (positional JSON) or "binary" (msgpack + float32)."""
    enc = (encode_requests_binary if positional == "binary" else
           encode_requests_positional if positional else encode_requests)
    n = len(ids)
    return enc(ids, np.full(n, ts_ms, np.int64), num[:n], cat[:n], spec)


def _produce(settings: Settings, values: list[bytes], keys: list[str]) -> None:
    p = make_producer(settings)
    topic = settings.topic("requests")
    for v, k in zip(values, keys, strict=True):
        produce_waiting(p, topic, v, k)
    if p.flush(60):
        raise click.ClickException("bench: could not preload the requests topic")


# --- throughput ---------------------------------------------------------------------------


def _passthrough_topic(settings: Settings) -> str:
    return settings.topic("decisions") + ".passthrough"


def passthrough(settings: Settings, n: int, batch_size: int, batch_wait_ms: int,
                commit_interval_s: float, group: str) -> dict[str, float]:
    """Plain consume -> produce the same bytes, committing with the same Checkpoint policy."""
    reports = DeliveryReports()
    producer = make_producer(settings, **reports.producer_config())
    consumer = make_consumer(settings, group, **{"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000})
    cp = Checkpoint(consumer, producer, reports, commit_interval_s=commit_interval_s)
    src, dst = settings.topic("requests"), _passthrough_topic(settings)
    consumer.subscribe([src])
    done, t0 = 0, None
    wait_s = batch_wait_ms / 1000
    deadline = time.monotonic() + 300
    while done < n and time.monotonic() < deadline:
        msgs = consume_ready(consumer, batch_size, wait_s)  # the worker's loop
        if not msgs:
            producer.poll(0)
            continue
        if t0 is None:
            t0 = time.perf_counter()
        produce = producer.produce
        for m in msgs:
            produce(dst, m.value(), m.key())
        producer.poll(0)
        cp.store_offsets(src, np.fromiter([m.partition() for m in msgs], np.int32, len(msgs)),
                         np.fromiter([m.offset() for m in msgs], np.int64, len(msgs)))
        done += len(msgs)
        if cp.expired():
            cp.commit()
    cp.commit()
    seconds = time.perf_counter() - (t0 or time.perf_counter())
    consumer.close()
    return {"events": done, "seconds": round(seconds, 3), "events_per_s": round(done / max(seconds, 1e-9), 1)}


class _TimedConsume:
    """The worker's consumer, with the wall and thread-CPU time of its loop's consume() calls
    counted (the rest of the client passes through untouched)."""

    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer
        self.calls, self.wall_s, self.cpu_s = 0, 0.0, 0.0

    def consume(self, *args: Any, **kwargs: Any) -> Any:
        w, c = time.perf_counter(), time.thread_time()
        try:
            return self._consumer.consume(*args, **kwargs)
        finally:
            self.calls += 1
            self.wall_s += time.perf_counter() - w
            self.cpu_s += time.thread_time() - c

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def worker_run(settings: Settings, n: int, batch_size: int, batch_wait_ms: int,
               commit_interval_s: float, group: str, profile: str | None) -> dict[str, float]:
    """The real worker, in-process, over the same preloaded requests."""
    from stream.worker import Worker, WorkerConfig

    w = Worker(settings, WorkerConfig(group_id=group, batch_size=batch_size, batch_wait_ms=batch_wait_ms,
                                      commit_interval_s=commit_interval_s, seed=0))
    first: list[float] = []
    original = w.process

    def timed(msgs: Any) -> None:
        if not first:
            first.append(time.perf_counter())
        original(msgs)
        if w.stats.events >= n:
            w.stop()

    w.process = timed  # type: ignore[method-assign]
    polled = _TimedConsume(w.consumer)  # the loop's consume() wall time: where a fetch waits
    w.consumer = polled  # type: ignore[assignment]
    gc_s = [0.0, 0.0]  # seconds inside the cyclic garbage collector, collections

    def gc_clock(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_s.append(time.thread_time())
        elif len(gc_s) > 2:
            gc_s[0] += time.thread_time() - gc_s.pop()
            gc_s[1] += 1

    gc.callbacks.append(gc_clock)
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    try:
        w.run(max_seconds=300)
    finally:
        gc.callbacks.remove(gc_clock)
    end = time.perf_counter()
    if prof:
        prof.disable()
        prof.dump_stats(profile)
    seconds = end - first[0] if first else float("nan")
    s = w.stats
    events = max(s.events, 1)
    return {"events": s.events, "seconds": round(seconds, 3), "events_per_s": round(s.events / seconds, 1),
            "busy_s": round(s.busy_s, 3), "busy_cpu_s": round(s.busy_cpu_s, 3),
            # the stable figures: CPU time of the worker thread inside `process`, per event
            "us_per_event_busy": round(1e6 * s.busy_cpu_s / events, 2),
            "us_per_event_busy_wall": round(1e6 * s.busy_s / events, 2),
            "events_per_s_per_busy_core": round(events / max(s.busy_cpu_s, 1e-9), 1),
            "stages_us_per_event": {k: {"cpu": round(1e6 * s.stage_cpu_s[k] / events, 2),
                                        "wall": round(1e6 * s.stage_s[k] / events, 2)} for k in s.stage_s},
            "gc_cpu_s": round(gc_s[0], 3), "gc_collections": int(gc_s[1]),
            "consume_calls": polled.calls, "consume_wall_s": round(polled.wall_s, 3),
            "consume_cpu_s": round(polled.cpu_s, 3),
            "blocked_share": round(s.blocked / max(s.events, 1), 4)}


# --- latency at fixed offered loads -------------------------------------------------------


def _worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTA_")}
    env.update({"RTA_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "RTA_REDIS_URL": settings.redis_url,
                "RTA_MODEL_DIR": str(settings.model_dir), "RTA_REDIS_PREFIX": settings.redis_prefix,
                "RTA_STATE_DIR": str(settings.state_dir),
                **{f"RTA_TOPIC_{r.upper()}": t for r, t in settings.topics.items()}})
    return env


def serve_command(group: str, batch_size: int, batch_wait_ms: int) -> list[str]:
    """`rta serve` as its own process (as deployed), reading the env of `_worker_env`."""
    return [sys.executable, "-c", "from infra.cli import main; main()", "serve", "--no-metrics",
            "--group", group, "--batch-size", str(batch_size), "--batch-wait-ms", str(batch_wait_ms)]


def latency_at(settings: Settings, spec: FeatureSpec, num: np.ndarray, cat: np.ndarray, rate: int,
               seconds: float, positional: bool, batch_size: int, batch_wait_ms: int,
               log_dir: Path) -> dict[str, Any]:
    """Offer `rate` requests/s for `seconds` to a `rta serve` process; percentiles of latency."""
    log_path = log_dir / f"worker-{rate}.log"
    run = offer_and_read(settings, serve_command(f"lat-{rate}", batch_size, batch_wait_ms), log_path,
                         settings.topic("decisions"), spec, num, cat, rate, seconds, positional)
    return {**latency_figures(run, rate), **_commit_figures(log_path)}


class OfferedRun(NamedTuple):
    """One fixed-rate run: per request (index = key L<i>), wall-clock ms (NaN = not read)."""

    send_ms: np.ndarray  # the request's send time (also its ts_ms)
    recv_ms: np.ndarray  # when the reader got the output message
    produced_ms: np.ndarray  # the output message's Kafka timestamp (its producer's produce() call)
    decided_ms: np.ndarray  # a decision body's own ts_ms (the worker's clock after the policy); NaN else
    achieved_per_s: float


# The load generator's request templates: this id and ts_ms are replaced at each send (same widths).
_POOL = 4096
_RID_HOLE, _TS_HOLE = "L#########", 1_000_000_000_000
_RID_FIELD, _TS_FIELD = b'"request_id":"%s"' % _RID_HOLE.encode(), b'"ts_ms":%d' % _TS_HOLE
_DECIDED_TS = re.compile(rb'"ts_ms":(\d+)')


def offer_and_read(settings: Settings, command: list[str], log_path: Path, read_topic: str,
                   spec: FeatureSpec, num: np.ndarray, cat: np.ndarray, rate: int, seconds: float,
                   positional: bool | str, decisions: bool = True) -> OfferedRun:
    """Start `command` (a worker or a passthrough process on `settings`' topics), warm it up,
    offer `rate` requests/s for `seconds` (ts stamped at send) and read its output topic back
    (`decisions`: its messages are decisions, whose own ts_ms is read too)."""
    from confluent_kafka import TopicPartition

    n = int(rate * seconds)
    send_ms = np.zeros(n, np.float64)
    recv_ms, produced_ms, decided_ms = (np.full(n, np.nan, np.float64) for _ in range(3))
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, env=_worker_env(settings), stdout=log, stderr=subprocess.STDOUT)
    reader = make_consumer(settings, f"lat-reader-{rate}-{time.monotonic_ns()}", **{"fetch.wait.max.ms": 5})
    reader.assign([TopicPartition(read_topic, p, 0) for p in range(settings.partitions)])
    stop = threading.Event()
    find_ts = _DECIDED_TS.findall

    def read() -> None:
        while not stop.is_set():
            msgs = reader.consume(2000, 0.002)  # a short wait: it is not batching what it stamps
            now = time.time() * 1000
            for m in msgs:
                if m.error() is None and m.key()[:1] == b"L":  # not the warm-up's decisions
                    i = int(m.key()[1:])
                    recv_ms[i] = now
                    produced_ms[i] = m.timestamp()[1]
                    if decisions:  # a decision carries one ts_ms: the worker's, after the policy
                        found = find_ts(m.value())
                        if found:
                            decided_ms[i] = float(found[0])

    t = threading.Thread(target=read, daemon=True)
    producer = make_producer(settings, **{"linger.ms": 1})
    topic = settings.topic("requests")
    try:
        # Warm up before the clock starts: the process joins the group and handles requests on
        # every partition, through the producer that will offer the load. A cold producer
        # holds its first messages until it has the topic's metadata, which would show up as
        # ~0.5-1 s of "worker latency" in the first second of the run.
        warm_ids = [f"w{i}" for i in range(8 * settings.partitions)]
        for v, k in zip(_requests(spec, num, cat, warm_ids, int(time.time() * 1000), positional),
                        warm_ids, strict=True):
            produce_waiting(producer, topic, v, k)
        producer.flush(30)
        _wait_decided(settings, set(warm_ids), proc, topic=read_topic)
        # JSON requests are encoded before the clock starts, with a placeholder id and ts_ms that
        # each send patches in place: encoding 10k requests/s would take the load generator (and
        # the reader thread beside it) a core of their own on this 2-core box.
        pool = (None if positional == "binary" else
                _requests(spec, num[:_POOL], cat[:_POOL], [_RID_HOLE] * min(_POOL, len(num)), _TS_HOLE, positional))
        t.start()
        chunk = max(1, rate // 200)  # every 5 ms
        t0 = time.monotonic()
        for start in range(0, n, chunk):
            due = t0 + start / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            idx = range(start, min(start + chunk, n))
            now = time.time() * 1000
            ids = [f"L{i:09d}" for i in idx]
            if pool is None:
                values = _requests(spec, num[[i % len(num) for i in idx]], cat[[i % len(cat) for i in idx]],
                                   ids, int(now), positional)
            else:
                ts = b'"ts_ms":%d' % int(now)
                values = [pool[i % len(pool)].replace(_RID_FIELD, b'"request_id":"%s"' % k.encode(), 1)
                          .replace(_TS_FIELD, ts, 1) for i, k in zip(idx, ids, strict=True)]
            send_ms[start:start + len(ids)] = now
            for v, k in zip(values, ids, strict=True):
                producer.produce(topic, v, k)
            producer.poll(0)
        producer.flush(30)
        achieved = n / (time.monotonic() - t0)
        deadline = time.monotonic() + 60
        while np.isnan(recv_ms).any() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        if t.is_alive():
            t.join(10)
        reader.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    return OfferedRun(send_ms, recv_ms, produced_ms, decided_ms, achieved)


def percentiles(x: np.ndarray) -> dict[str, float | None]:
    """p50 / p99 / p99.9 (ms) of the finite values."""
    got = x[np.isfinite(x)]
    if not got.size:
        return {"p50_ms": None, "p99_ms": None, "p999_ms": None}
    p = np.percentile(got, [50, 99, 99.9])
    return {"p50_ms": round(float(p[0]), 2), "p99_ms": round(float(p[1]), 2), "p999_ms": round(float(p[2]), 2)}


def latency_figures(run: OfferedRun, rate: int) -> dict[str, Any]:
    """End-to-end percentiles of one run, its first second, and what was lost."""
    lat = run.recv_ms - run.send_ms
    got = lat[np.isfinite(lat)]
    first = lat[:rate][np.isfinite(lat[:rate])]  # the first second of the load
    return {"offered_per_s": rate, "achieved_per_s": round(run.achieved_per_s, 1), "decided": int(got.size),
            "missing": int(len(lat) - got.size), **percentiles(lat),
            "max_ms": round(float(got.max()), 2) if got.size else None,
            "first_second_max_ms": round(float(first.max()), 2) if first.size else None}


def _commit_figures(log_path: Path) -> dict[str, Any]:
    """The worker's checkpoint commits (from its `stopped` log line): the loop consumes nothing
    while one runs, so long commits show up in the latency tail."""
    for line in reversed(log_path.read_bytes().splitlines()):
        with contextlib.suppress(orjson.JSONDecodeError):
            rec = orjson.loads(line)
            if isinstance(rec, dict) and rec.get("event") == "stopped" and rec.get("commits"):
                return {"commits": rec["commits"], "commit_mean_ms": round(1e3 * rec["commit_s"] / rec["commits"], 1),
                        "commit_max_ms": round(1e3 * rec["commit_max_s"], 1)}
    return {}


def _wait_decided(settings: Settings, rids: set[str], proc: subprocess.Popen, timeout: float = 90,
                  topic: str | None = None) -> None:
    from confluent_kafka import TopicPartition

    c = make_consumer(settings, f"warm-{time.monotonic_ns()}")
    c.assign([TopicPartition(topic or settings.topic("decisions"), p, 0) for p in range(settings.partitions)])
    waiting = {r.encode() for r in rids}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise click.ClickException(f"bench: the worker exited with code {proc.returncode}")
            waiting -= {m.key() for m in c.consume(100, 0.2) if m.error() is None}
            if not waiting:
                return
        raise click.ClickException(f"bench: the worker left {len(waiting)} warm-up requests "
                                   f"undecided after {timeout:g} s")
    finally:
        c.close()


# --- CLI ----------------------------------------------------------------------------------


@click.command(name="worker")
@click.option("--events", "n", type=click.IntRange(min=1000), default=60_000, show_default=True,
              help="Requests preloaded for the throughput runs.")
@click.option("--features", type=click.IntRange(28, 108), default=108, show_default=True,
              help="Features per request (the world's catalogue, first N; the world needs >= 28).")
@click.option("--positional", is_flag=True, help="Send positional requests (fingerprint + array).")
@click.option("--binary", is_flag=True, help="Send binary requests (msgpack, numbers as float32 bytes).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--batch-wait-ms", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--commit-interval-ms", type=click.IntRange(min=0), default=1000, show_default=True)
@click.option("--loads", default="2000,5000,10000", show_default=True,
              help="Offered loads (requests/s) for the latency runs; '' skips them.")
@click.option("--seconds", type=click.FloatRange(min=1), default=10.0, show_default=True,
              help="Duration of each latency run.")
@click.option("--profile", "profile_out", type=click.Path(dir_okay=False), default=None,
              help="Write a cProfile of the worker's throughput run here.")
@click.option("--quantize", type=click.Choice(["int8", "none"]), default="int8", show_default=True,
              help="The student graph's weights: int8 (what `rta train` serves where the parity gate "
                   "holds, model.export.quantize_serving) or none (float32).")
@click.option("--model", "model", type=click.Path(exists=True, file_okay=False), default=None,
              help="Serve this bundle (or a model dir's current version) instead of the bench's "
                   "untrained one; its features must be the world's first --features.")
@click.option("--canary-share", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Also serve a second untrained bundle as a canary on this share of requests "
                   "(stream.canary: the routing's cost).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the JSON here.")
def worker(n: int, features: int, positional: bool, binary: bool, batch_size: int, batch_wait_ms: int,
           commit_interval_ms: int, loads: str, seconds: float, profile_out: str | None,
           quantize: str, model: str | None, canary_share: float | None, out: str | None) -> None:
    """Worker events/s vs a plain consume->produce passthrough; latency at fixed loads."""
    try:
        rates = [int(x) for x in loads.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"--loads must be comma-separated integers, got {loads!r}") from None
    if any(r <= 0 for r in rates):
        raise click.BadParameter("--loads must be positive")
    if binary and positional:
        raise click.UsageError("--binary and --positional are two formats: give one")
    positional = "binary" if binary else positional  # type: ignore[assignment]
    work = Path(tempfile.mkdtemp(prefix="rta-bench-worker-"))
    try:
        base = load_settings()
        with _stack(base, work) as settings:
            from dataclasses import replace

            settings = replace(settings, model_dir=work / "models", state_dir=work / ".rta",
                               redis_prefix=f"bench:{os.getpid()}").with_topic_prefix(f"bench{os.getpid()}")
            click.echo("bench: building requests and a bundle ...", err=True)
            spec, num, cat = _world(max(n, 20_000), features)
            bundle_dir = (_bundle(settings.model_dir, spec, num, cat, None if quantize == "none" else quantize)
                          if model is None else _copy_bundle(Path(model), settings.model_dir, spec))
            if canary_share is not None:
                from stream import canary

                _bundle(settings.model_dir, spec, num, cat, None if quantize == "none" else quantize,
                        name="bench-v2", publish=False, seed=1)
                canary.start(settings.model_dir, "bench-v2", canary_share, "bench", "bench worker canary")
            import json as _json

            serving = _json.loads((bundle_dir / "manifest.json").read_text()).get("serving", {})
            from stream.policy import Targets
            from stream.window import RedisStore

            store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
            store.set_targets(Targets(0.25, 0.05, 0.01), "bench", "bench worker")
            ensure_topics(make_admin(settings), [*settings.topics.values(), _passthrough_topic(settings)],
                          settings.partitions)
            ids = [f"T{i}" for i in range(n)]
            values = _requests(spec, np.resize(num, (n, num.shape[1])), np.resize(cat, (n, cat.shape[1])),
                               ids, int(time.time() * 1000), positional)
            t_pre = time.perf_counter()
            _produce(settings, values, ids)
            preload_s = time.perf_counter() - t_pre
            mean_bytes = float(np.mean([len(v) for v in values[:1000]]))
            del values
            click.echo("bench: passthrough ...", err=True)
            pt = passthrough(settings, n, batch_size, batch_wait_ms, commit_interval_ms / 1000, "bench-pt")
            click.echo("bench: worker ...", err=True)
            wk = worker_run(settings, n, batch_size, batch_wait_ms, commit_interval_ms / 1000, "bench-worker",
                            profile_out)
            latency = []
            for rate in rates:
                click.echo(f"bench: latency at {rate}/s ...", err=True)
                lat_settings = settings.with_topic_prefix(f"lat{rate}")
                ensure_topics(make_admin(lat_settings), lat_settings.topics.values(), settings.partitions)
                latency.append(latency_at(lat_settings, spec, num, cat, rate, seconds, positional,
                                          batch_size, batch_wait_ms, work))
            store.clear()
        result = {
            "bench": "worker",
            "events": n, "features": features, "request_bytes_mean": round(mean_bytes, 1),
            "format": "binary" if positional == "binary" else "positional" if positional else "canonical",
            "serving_graph": {"file": serving.get("file"), "weights": serving.get("weights")},
            "batch_size": batch_size, "batch_wait_ms": batch_wait_ms, "commit_interval_ms": commit_interval_ms,
            "canary_share": canary_share, "passthrough": pt, "worker": wk,
            "ratio": round(wk["events_per_s"] / pt["events_per_s"], 3), "target_ratio": 0.5,
            # the broker's own speed in this run: the preload (produce + flush of every request)
            # and the passthrough (consume -> produce), so a ratio can be read against the day's broker
            "broker": {"preload_produce_per_s": round(n / max(preload_s, 1e-9), 1),
                       "passthrough_per_s": pt["events_per_s"]},
            "us_per_event_busy": wk["us_per_event_busy"], "target_us_per_event_busy": 20.0,
            "latency": latency,
            "broker_kind": "embedded Tansu" if settings.origin.get("kafka_bootstrap") not in
            {"flag", "env", "file", "dev-stack"} else settings.kafka_bootstrap,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "load_avg_1m": round(os.getloadavg()[0], 2)},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    click.echo(text)
