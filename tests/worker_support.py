"""Helpers for the worker tests: request traffic, a paced feeder, reading topics, running workers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from confluent_kafka import TopicPartition
from student_data import random_batch

from stream.config import Settings
from stream.events import decode_decision, encode_requests
from stream.kafka import make_consumer, make_producer, produce_waiting
from stream.worker import Worker, WorkerConfig

# The CLI as a subprocess, without relying on the venv's bin/ being on PATH (CI does not put it there).
RTA = [sys.executable, "-m", "infra.cli"]

MALFORMED = [
    b"not json at all",
    b'{"v": 1, "request_id": "x"',  # truncated
    b'{"v": 2, "request_id": "r", "ts_ms": 1, "features": {}}',
    b'{"v": 1, "ts_ms": 1, "features": {}}',
    b'{"v": 1, "request_id": "r", "ts_ms": -5, "features": {}}',
    b'{"v": 1, "request_id": "r", "ts_ms": 1, "features": {"n0": "text"}}',
    b"\xff\xfe\x00",
    b"",
    b"[1, 2, 3]",
    b'{"v": 1, "request_id": "r", "ts_ms": 1, "features": {"n0": NaN}}',
]


def request_values(n: int, prefix: str = "r", seed: int = 0) -> tuple[list[str], list[bytes]]:
    """n valid canonical requests for the `student_data` bundle spec (ids prefix0..)."""
    spec, num, cat = random_batch(n, seed=seed)
    ids = [f"{prefix}{i}" for i in range(n)]
    return ids, encode_requests(ids, np.full(n, int(time.time() * 1000)), num, cat, spec)


def produce(settings: Settings, values: list[bytes], keys: list[str | None], rate: float | None = None,
            stop: threading.Event | None = None) -> None:
    """Produce to the requests topic, at `rate` messages/s if given (chunks every 10 ms)."""
    p = make_producer(settings)
    topic = settings.topic("requests")
    chunk = max(1, int(rate / 100)) if rate else len(values)
    t0 = time.monotonic()
    for start in range(0, len(values), chunk):
        if stop is not None and stop.is_set():
            break
        for v, k in zip(values[start:start + chunk], keys[start:start + chunk], strict=True):
            produce_waiting(p, topic, v, k)
        p.poll(0)
        if rate:
            due = t0 + (start + chunk) / rate
            time.sleep(max(0.0, due - time.monotonic()))
    assert p.flush(30) == 0


@contextmanager
def feeding(settings: Settings, values: list[bytes], keys: list[str | None],
            rate: float | None = None) -> Iterator[threading.Thread]:
    """Produce in a background thread; joined on exit."""
    stop = threading.Event()
    t = threading.Thread(target=produce, args=(settings, values, keys, rate, stop), daemon=True)
    t.start()
    try:
        yield t
    finally:
        stop.set()
        t.join(60)


def read_topic(settings: Settings, role: str, expect: int, timeout: float = 60.0,
               quiet: float = 0.0) -> list:
    """Every message of a topic from the start until `expect` arrived (+ `quiet` s of silence)."""
    c = make_consumer(settings, f"reader-{role}-{time.monotonic_ns()}")
    topic = settings.topic(role)
    c.assign([TopicPartition(topic, p, 0) for p in range(settings.partitions)])
    out: list = []
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            got = [m for m in c.consume(5000, 0.2) if m.error() is None]
            if got:
                out += got
                last = time.monotonic()
            if len(out) >= expect and time.monotonic() - last >= quiet:
                break
    finally:
        c.close()
    return out


def decisions(settings: Settings, expect: int, timeout: float = 60.0, quiet: float = 0.0) -> list[dict]:
    """Decoded decision events (with `_headers`), in topic order per partition."""
    out = []
    for m in read_topic(settings, "decisions", expect, timeout, quiet):
        d = decode_decision(m.value())
        d["_headers"] = dict(m.headers() or [])
        d["_key"] = m.key()
        out.append(d)
    return out


def wait_for(cond, timeout: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


@contextmanager
def serving(service, name: str) -> Iterator:
    """Any service with run()/stop() (worker, logger, simulator) in a thread; stopped, drained and
    joined on exit, its exception re-raised in the test thread."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            service.run()
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    try:
        yield service
    finally:
        service.stop()
        t.join(60)
        assert not t.is_alive(), f"{name} did not stop within 60 s"
        if errors:
            raise errors[0]


@contextmanager
def running(settings: Settings, **config) -> Iterator[Worker]:
    """A Worker in a thread (stopped, drained and joined on exit)."""
    worker = Worker(settings, WorkerConfig(**config))
    with serving(worker, f"worker-{worker.config.worker_id}") as w:
        yield w


def assigned(worker: Worker) -> int:
    return len(worker.assignment)


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment that points `rta serve` at the test's broker, Redis, topics and models."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTA_")}
    env.update({
        "RTA_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "RTA_REDIS_URL": settings.redis_url,
        "RTA_MODEL_DIR": str(settings.model_dir),
        "RTA_REDIS_PREFIX": settings.redis_prefix,
        "RTA_STATE_DIR": str(settings.state_dir),
        **{f"RTA_TOPIC_{role.upper()}": name for role, name in settings.topics.items()},
    })
    return env


def spawn_worker(settings: Settings, cwd: Path, *args: str) -> subprocess.Popen:
    """`rta serve` as a subprocess (its log goes to cwd/worker-<n>.log)."""
    cwd.mkdir(parents=True, exist_ok=True)
    log = open(cwd / f"worker-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-c", "from infra.cli import main; main()", "serve", "--no-metrics",
         "--batch-wait-ms", "20", *args],
        env=worker_env(settings), cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


@contextmanager
def worker_process(settings: Settings, cwd: Path, *args: str) -> Iterator[subprocess.Popen]:
    """`spawn_worker`, killed on exit if the test left it running (a failed assert must not leave
    a worker consuming into later tests)."""
    proc = spawn_worker(settings, cwd, *args)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def committed(settings: Settings, group: str) -> dict[int, int]:
    c = make_consumer(settings, group)
    topic = settings.topic("requests")
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(settings.partitions)], 10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def end_offsets(settings: Settings, expect: int) -> dict[int, int]:
    """Next offset per partition of the requests topic, read back (holds `expect` messages)."""
    ends = {p: 0 for p in range(settings.partitions)}
    for m in read_topic(settings, "requests", expect):
        ends[m.partition()] = max(ends[m.partition()], m.offset() + 1)
    return ends


def make_spread_bundle(model_dir: Path, version: str = "v1", seed: int = 0, publish: bool = True,
                       shift: float = 0.0) -> Path:
    """Like `student_data.make_bundle`, with output weights scaled so scores spread over several
    logit units, as a trained model's do (an untrained student scores everything ~0.48, which
    no histogram controller can split finely)."""
    from student_data import make_bundle

    return make_bundle(model_dir, version, seed=seed, publish=publish, scale=40.0, shift=shift)
