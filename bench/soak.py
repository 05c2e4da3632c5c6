"""`rta bench soak`: the worker fleet under faults, end to end, on a stack this run owns.

Offers `--requests` requests at `--rate` to `--workers` `rta serve` processes in one group while
it (1) SIGKILLs a worker `--kills` times (a replacement starts at once), (2) restarts Redis
`--redis-restarts` times (it comes back EMPTY: no targets, no window), and (3) mixes in
`--malformed` undecodable messages, `--oversized` of them 2 MB requests that compress to a few
KB (the broker takes them; they exceed the producer's message.max.bytes uncompressed). Then it
reads every decision back and checks what an operator relies on:

- every request has a decision (none lost), malformed ones `pass`/`invalid` and dead-lettered;
- every worker is alive at the end and exits 0 on SIGTERM;
- the block share, over the decisions made from `--settle-s` after each disturbance until the
  next one, is within 1 pp of the target r (`max_block_share_error_pp`; the segment before the
  first disturbance is reported too, it holds the cold start).

Prints one JSON object (and writes it, plus a PNG of the block share per second against the
target with the disturbances marked, under `--out`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import click
import numpy as np
import orjson

from stream.config import Settings, load_settings
from stream.kafka import ensure_topics, make_admin, make_consumer, make_producer, produce_waiting
from stream.policy import Targets
from stream.window import RedisStore

MALFORMED = (b"not json", b'{"v": 1, "request_id": "x"', b'{"v": 2, "request_id": "r", "ts_ms": 1, "features": {}}',
             b"\xff\xfe\x00", b"[1, 2]", b'{"v": 1, "ts_ms": 1, "features": {}}')
BIG_BYTES = 2_000_000


@dataclass(frozen=True)
class SoakConfig:
    """One soak run (the `rta bench soak` flags)."""

    requests: int = 500_000
    rate: int = 5000
    workers: int = 2
    kills: int = 3
    redis_restarts: int = 1
    malformed: int = 1000
    oversized: int = 20
    r: float = 0.25
    p_u: float = 0.05
    epsilon: float = 0.01
    settle_s: float = 8.0
    features: int = 28
    partitions: int = 4
    timeout_s: float = 300.0  # for every decision to arrive after the feed ends


def _bad_message(k: int, oversized: bool) -> bytes:
    if oversized:
        return b'{"v":1,"request_id":"bad' + str(k).encode() + b'","ts_ms":1,"features":{"x":"' + b"a" * BIG_BYTES + b'"}}'
    return MALFORMED[k % len(MALFORMED)].replace(b'"request_id": "r"', b'"request_id": "bad' + str(k).encode() + b'"')


class _Feeder(threading.Thread):
    """Offers the requests at a fixed rate, the bad ones mixed in; `sent` counts progress."""

    def __init__(self, settings: Settings, values: list[bytes], keys: list[str], rate: int) -> None:
        super().__init__(name="soak-feeder", daemon=True)
        self.settings, self.values, self.keys, self.rate = settings, values, keys, rate
        self.sent = 0
        self.error: BaseException | None = None
        self.done_at: float | None = None  # time.time() once every request is delivered
        self.stop = threading.Event()  # a failed run stops offering before the test moves on

    def run(self) -> None:
        try:
            p = make_producer(self.settings, **{"message.max.bytes": 5_000_000})
            topic = self.settings.topic("requests")
            chunk = max(1, self.rate // 100)
            t0 = time.monotonic()
            for start in range(0, len(self.values), chunk):
                if self.stop.is_set():
                    break
                for v, k in zip(self.values[start:start + chunk], self.keys[start:start + chunk], strict=True):
                    produce_waiting(p, topic, v, k)
                self.sent = min(start + chunk, len(self.values))
                p.poll(0)
                time.sleep(max(0.0, t0 + self.sent / self.rate - time.monotonic()))
            if p.flush(60):
                raise RuntimeError("soak: the feeder could not deliver every request")
            self.done_at = time.time()
        except BaseException as exc:  # reported by the main thread
            self.error = exc


class _Reader(threading.Thread):
    """Reads a topic from the start: per message (key, decision, reason, ts_ms)."""

    def __init__(self, settings: Settings, role: str) -> None:
        super().__init__(name=f"soak-{role}", daemon=True)
        self.settings, self.role = settings, role
        self.rows: list[tuple[str, bool, str, int]] = []
        self.dlq: list[tuple[bytes | None, int, dict[str, bytes]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        from confluent_kafka import TopicPartition

        c = make_consumer(self.settings, f"soak-read-{time.monotonic_ns()}",
                          **{"max.partition.fetch.bytes": 8_000_000, "fetch.max.bytes": 64_000_000})
        topic = self.settings.topic(self.role)
        c.assign([TopicPartition(topic, p, 0) for p in range(self.settings.partitions)])
        try:
            while not self.stop.is_set():
                for m in c.consume(5000, 0.2):
                    if m.error() is not None:
                        continue
                    if self.role == "dlq":
                        self.dlq.append((m.key(), len(m.value() or b""), dict(m.headers() or [])))
                    else:
                        d = orjson.loads(m.value())
                        self.rows.append((d["request_id"], d["decision"] == "block", d["reason"], int(d["ts_ms"])))
        finally:
            c.close()


def stop_threads(*threads: threading.Thread, timeout: float = 30.0) -> None:
    """Stop and join a run's feeders and readers on every exit path: a thread left polling a
    topic the test's teardown deletes shares librdkafka with the rest of the test session."""
    for t in threads:
        t.stop.set()  # type: ignore[attr-defined]
    for t in threads:
        if t.ident is not None:
            t.join(timeout)


def _spawn(settings: Settings, cwd: Path, n: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTA_")}
    env.update({"RTA_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "RTA_REDIS_URL": settings.redis_url,
                "RTA_MODEL_DIR": str(settings.model_dir), "RTA_REDIS_PREFIX": settings.redis_prefix,
                "RTA_STATE_DIR": str(settings.state_dir),
                **{f"RTA_TOPIC_{r.upper()}": t for r, t in settings.topics.items()}})
    log = open(cwd / f"worker-{n}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "infra.cli", "serve", "--no-metrics", "--group", "soak",
                             "--commit-interval-ms", "500", "--worker-id", f"soak-{n}"],
                            env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def _traffic(cfg: SoakConfig, model_dir: Path, seed: int = 0) -> tuple[list[bytes], list[str], list[str]]:
    """(values, keys, request ids of the valid ones): the world's requests cycled, bad ones
    at random positions; publishes a spread-out bundle for the world's feature spec."""
    from bench.worker import _bundle, _requests, _world

    spec, num, cat = _world(min(cfg.requests, 20_000), cfg.features, seed)
    _bundle(model_dir, spec, num, cat)
    rows = len(num)
    ids = [f"s{i}" for i in range(cfg.requests)]
    values: list[bytes] = []
    now = int(time.time() * 1000)
    for start in range(0, cfg.requests, rows):
        part = ids[start:start + rows]
        values += _requests(spec, num, cat, part, now, positional=False)
    keys = list(ids)
    rng = np.random.default_rng(seed)
    bad_at = sorted(rng.choice(np.arange(cfg.requests // 20, cfg.requests), cfg.malformed, replace=False).tolist(),
                    reverse=True)
    big = set(rng.choice(cfg.malformed, min(cfg.oversized, cfg.malformed), replace=False).tolist())
    for k, at in enumerate(bad_at):
        values.insert(at, _bad_message(k, k in big))
        keys.insert(at, f"bad{k}")
    return values, keys, ids


@contextlib.contextmanager
def owned_stack(log_dir: Path) -> Iterator[tuple[str, Any, Any]]:
    """An embedded broker and Redis owned by this run (the soak restarts Redis)."""
    from infra.stack import Embedded

    kafka, redis_ = Embedded("kafka", log_dir=log_dir), Embedded("redis", log_dir=log_dir)
    kafka.start()
    try:
        redis_.start()
        try:
            yield kafka.address, redis_.address, redis_
        finally:
            redis_.stop()
    finally:
        kafka.stop()


def run_soak(cfg: SoakConfig, settings: Settings, redis_server: Any, workdir: Path,
             progress: bool = False) -> dict[str, Any]:
    """The soak on `settings`' broker and Redis; `redis_server.restart()` restarts Redis empty."""
    say = (lambda msg: print(f"soak: {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    workdir.mkdir(parents=True, exist_ok=True)
    ensure_topics(make_admin(settings), settings.topics.values(), settings.partitions)
    values, keys, ids = _traffic(cfg, Path(settings.model_dir))
    RedisStore.from_url(settings.redis_url, settings.redis_prefix).set_targets(
        Targets(cfg.r, cfg.p_u, cfg.epsilon), "soak", "soak start")
    # the disturbances spread evenly over the feed, Redis restarts between the kills
    kinds = ["kill"] * cfg.kills
    for j in range(cfg.redis_restarts):
        kinds.insert(min(len(kinds), 1 + 2 * j), "redis")
    plan = [(kind, (i + 1) / (len(kinds) + 1)) for i, kind in enumerate(kinds)]
    reader, dlq = _Reader(settings, "decisions"), _Reader(settings, "dlq")
    reader.start()
    dlq.start()
    procs = [_spawn(settings, workdir, i) for i in range(cfg.workers)]
    spawned = cfg.workers
    events: list[dict[str, Any]] = []
    t_start = time.time()
    feeder = _Feeder(settings, values[200:], keys[200:], cfg.rate)
    try:
        # wait until the fleet decides (group joined) before offering load
        warm = _Feeder(settings, values[:200], keys[:200], cfg.rate)
        warm.run()
        _wait(lambda: len({r[0] for r in reader.rows}) >= 200, 120, "the workers deciding", procs)
        t_feed = time.time()
        feeder.start()
        for kind, frac in plan:
            _wait(lambda frac=frac: feeder.sent >= frac * len(feeder.values) or feeder.error is not None,
                  cfg.requests / cfg.rate * 3 + 60, f"{kind} at {frac:.0%}", [])
            at = time.time()
            if kind == "kill":
                victim = procs.pop(0)
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait(10)
                procs.append(_spawn(settings, workdir, spawned))
                spawned += 1
            else:
                redis_server.restart()
            events.append({"kind": kind, "at_s": round(at - t_feed, 1), "ts_ms": int(at * 1000)})
            say(f"{kind} at {at - t_feed:.1f} s ({feeder.sent} offered)")
        feeder.join()
        if feeder.error is not None:
            raise feeder.error
        t_fed = time.time()
        want = set(ids)
        _wait(lambda: want <= {r[0] for r in reader.rows}, cfg.timeout_s, "every request decided", procs)
        t_done = time.time()
        alive = [p.poll() is None for p in procs]
        codes = []
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            codes.append(p.wait(60))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        time.sleep(0.5)
        stop_threads(feeder, reader, dlq)
    return _figures(cfg, ids, reader.rows, dlq.dlq, events, alive, codes,
                    {"feed_s": round(t_fed - t_feed, 1), "drain_s": round(t_done - t_fed, 1),
                     "total_s": round(time.time() - t_start, 1)}, workdir)


def _wait(cond, timeout: float, what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            if p.poll() is not None and p.returncode not in (-signal.SIGKILL,):
                raise click.ClickException(f"soak: a worker exited with code {p.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise click.ClickException(f"soak: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def _figures(cfg: SoakConfig, ids: list[str], rows: list, dead: list, events: list[dict[str, Any]],
             alive: list[bool], codes: list[int], times: dict[str, float], workdir: Path) -> dict[str, Any]:
    rid = np.array([r[0] for r in rows], dtype=object)
    block = np.array([r[1] for r in rows], dtype=bool)
    reason = np.array([r[2] for r in rows], dtype=object)
    ts = np.array([r[3] for r in rows], dtype=np.int64)
    _, first = np.unique(rid, return_index=True)  # first decision of each request (replays repeat)
    first = np.sort(first)
    decided = set(rid[first].tolist())
    bad = np.array([str(x).startswith("bad") for x in rid[first]])
    valid_first = first[~bad]
    # segments: from `settle_s` after the start / each disturbance until the next one
    segments = []
    starts = [int(ts[valid_first].min()) if len(valid_first) else 0, *(e["ts_ms"] for e in events)]
    ends = [*(e["ts_ms"] for e in events), int(ts.max()) + 1 if len(ts) else 0]
    for k, (t0, t1) in enumerate(zip(starts, ends, strict=True)):
        sel = first[(ts[first] >= t0 + int(cfg.settle_s * 1000)) & (ts[first] < t1)]
        share = float(block[sel].mean()) if len(sel) else None
        segments.append({"after": events[k - 1]["kind"] if k else "start", "decisions": int(len(sel)),
                         "block_share": None if share is None else round(share, 4),
                         "error_pp": None if share is None else round(100 * (share - cfg.r), 2)})
    # judged: the segments after a disturbance (the start one holds the cold start's overshoot)
    errs = [abs(s["error_pp"]) for s in segments[1:] if s["error_pp"] is not None and s["decisions"] >= 2000]
    bad_ids = {f"bad{k}" for k in range(cfg.malformed)}
    truncated = sum(1 for _, _, h in dead if "rta-truncated" in h)
    out = {
        "bench": "soak", "config": asdict(cfg), "times": times,
        "requests": len(ids), "decided": len(set(ids) & decided), "missing": len(set(ids) - decided),
        "decision_events": len(rows), "duplicates": int(len(rows) - len(first)),
        "malformed_decided_invalid": int(sum(1 for i in first if rid[i] in bad_ids and not block[i]
                                             and reason[i] == "invalid")),
        "dlq_messages": len(dead), "dlq_truncated": truncated,
        "disturbances": events, "segments": segments,
        "max_block_share_error_pp": max(errs) if errs else None,
        "workers_alive_at_end": all(alive), "worker_exit_codes": codes,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "soak.json").write_text(json.dumps(out, indent=1))
    _plot(ts[first], block[first], events, cfg, workdir / "soak.png")
    return out


def _plot(ts: np.ndarray, block: np.ndarray, events: list[dict[str, Any]], cfg: SoakConfig, path: Path) -> None:
    """Block share per second against the target, disturbances marked (what an analyst checks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not len(ts):
        return
    sec = (ts - ts.min()) // 1000
    n = np.bincount(sec)
    b = np.bincount(sec, weights=block.astype(float))
    ok = n >= 50
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(np.flatnonzero(ok), b[ok] / n[ok], lw=1, label="block share (per second)")
    ax.axhline(cfg.r, color="k", ls="--", lw=1, label=f"target r = {cfg.r:g}")
    ax.axhspan(cfg.r - 0.01, cfg.r + 0.01, color="k", alpha=0.08, label="+-1 pp")
    for e in events:
        x = (e["ts_ms"] - ts.min()) / 1000
        ax.axvline(x, color="r" if e["kind"] == "kill" else "b", lw=1, alpha=0.7)
        ax.text(x, ax.get_ylim()[1], " kill -9" if e["kind"] == "kill" else " redis restart", fontsize=7,
                va="top", color="r" if e["kind"] == "kill" else "b")
    ax.set_xlabel("seconds")
    ax.set_ylabel("block share")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command(name="soak")
@click.option("--requests", "n", type=click.IntRange(min=10_000), default=500_000, show_default=True)
@click.option("--rate", type=click.IntRange(min=100), default=5000, show_default=True, help="Offered requests/s.")
@click.option("--workers", type=click.IntRange(1, 4), default=2, show_default=True)
@click.option("--kills", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--redis-restarts", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--malformed", type=click.IntRange(min=0), default=1000, show_default=True)
@click.option("--oversized", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--settle-s", type=click.FloatRange(min=0), default=8.0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Write soak.json and soak.png here.")
@click.option("--logger", "logger_soak", is_flag=True,
              help="Soak `rta log` instead (bench/logsoak.py): a stalled worker, kill -9 of the logger, odd inputs.")
@click.option("--stall-s", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="--logger: how long the worker is SIGSTOPped.")
@click.option("--logger-kills", type=click.IntRange(min=0), default=2, show_default=True,
              help="--logger: kill -9s of the logger.")
def soak(n: int, rate: int, workers: int, kills: int, redis_restarts: int, malformed: int, oversized: int,
         settle_s: float, out: str | None, logger_soak: bool = False, stall_s: float = 120.0,
         logger_kills: int = 2) -> None:
    """The worker fleet under kill -9, Redis restarts and malformed input (own embedded stack);
    with --logger, the logger under a stalled worker, kill -9 and odd inputs."""
    if logger_soak:
        from bench.logsoak import LoggerSoakConfig, run_logger_soak

        lcfg = LoggerSoakConfig(requests=n, rate=rate, stall_s=stall_s, logger_kills=logger_kills)
        _on_owned_stack(lcfg.partitions, out, lambda settings, _, where: run_logger_soak(lcfg, settings, where,
                                                                                           progress=True))
        return
    cfg = SoakConfig(requests=n, rate=rate, workers=workers, kills=kills, redis_restarts=redis_restarts,
                     malformed=malformed, oversized=min(oversized, malformed), settle_s=settle_s)
    _on_owned_stack(cfg.partitions, out, lambda settings, redis_server, where: run_soak(
        cfg, settings, redis_server, where, progress=True))


def _on_owned_stack(partitions: int, out: str | None, run: Any) -> None:
    """`run(settings, redis_server, out_dir)` on a broker and Redis this run owns; prints its JSON."""
    with tempfile.TemporaryDirectory(prefix="rta-soak-") as tmp:
        tmp_path = Path(tmp)
        with owned_stack(tmp_path) as (bootstrap, redis_url, redis_server):
            settings = replace(load_settings(env={}), kafka_bootstrap=bootstrap, redis_url=redis_url,
                               model_dir=tmp_path / "models", state_dir=tmp_path / "state",
                               partitions=partitions, redis_prefix="soak")
            result = run(settings, redis_server, Path(out) if out else tmp_path / "out")
    click.echo(json.dumps(result))
