"""Helpers for the logger tests: a Logger in a thread, `rta log` as a process, reading the log."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
from worker_support import serving, worker_env

from stream.config import Settings
from stream.logger.service import Logger, LoggerConfig


def group_of(settings: Settings) -> str:
    """The logger group of one test: its own (on the embedded Tansu, a group id reused by the
    next test with other topics was seen to stall the join for over a minute)."""
    return f"rta-logger.{settings.topic('requests')}"


@contextmanager
def logging_to(settings: Settings, out: Path, **config) -> Iterator[Logger]:
    """A Logger in a thread (stopped, drained and joined on exit), in the test's group."""
    config.setdefault("group_id", group_of(settings))
    with serving(Logger(settings, LoggerConfig(out_dir=out, **config)), "logger") as lg:
        yield lg


def spawn_logger(settings: Settings, out: Path, cwd: Path, *args: str,
                 metrics_port: int | None = None) -> subprocess.Popen:
    """`rta log` as a subprocess (its log goes to cwd/logger-<n>.log); metrics only on a port given."""
    cwd.mkdir(parents=True, exist_ok=True)
    log = open(cwd / f"logger-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115 - closed with the process
    metrics = ["--no-metrics"] if metrics_port is None else ["--metrics-port", str(metrics_port)]
    return subprocess.Popen(
        [sys.executable, "-c", "from infra.cli import main; main()", "log", "--out", str(out), *metrics,
         "--group", group_of(settings), *args], env=worker_env(settings), cwd=cwd, stdout=log,
        stderr=subprocess.STDOUT)


def scrape(port: int, series: str) -> float:
    """One series of a spawned logger's /metrics (-1: not up yet, or not exported yet)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return -1.0
    line = [x for x in text.splitlines() if x.startswith(series + " ")]
    return float(line[0].split()[-1]) if line else -1.0


def open_files_buffered(port: int) -> float:
    """Rows a spawned logger holds in open (not yet rolled) files: their offsets cannot commit."""
    return scrape(port, 'rta_log_buffered{side="open_files"}')


def read_log(out: Path, kind: str = "impressions") -> pa.Table:
    """Every row of one kind, with the hive partition columns (pyarrow.dataset)."""
    root = out / kind
    if not root.is_dir():
        return pa.table({})
    return ds.dataset(root, format="parquet", partitioning="hive").to_table()


def duckdb_count(out: Path, kind: str, distinct: str = "request_id") -> tuple[int, int]:
    """(rows, distinct `distinct`) of one kind, read by DuckDB (an independent Parquet reader)."""
    import duckdb

    glob = str(out / kind / "*" / "*" / "*.parquet")
    con = duckdb.connect()
    try:
        return con.execute(f"SELECT count(*), count(DISTINCT {distinct}) "
                           f"FROM read_parquet('{glob}', hive_partitioning=true, union_by_name=true)").fetchone()
    finally:
        con.close()


# --------------------------------------------------------------------------- the live pipeline


def world_bundle(model_dir: Path, version: str = "w1", rows: int = 4000, seed: int = 0) -> Path:
    """A published student bundle on the world's feature spec with untrained weights spread
    like a trained model's (scores over several logit units): what the live tests serve."""
    import torch

    from model import bundle
    from model.export import export_bundle
    from model.preprocess import Preprocessor
    from model.student import Student, StudentConfig
    from stream.features import FeatureSpec
    from training.world import WorldConfig, feature_kinds, generate_table

    table = generate_table(rows, seed, WorldConfig())
    kinds = feature_kinds(table.schema)
    spec = FeatureSpec(tuple(n for n, k in kinds.items() if k == "numeric"),
                       tuple(n for n, k in kinds.items() if k == "categorical"))
    num = np.column_stack([table.column(n).to_numpy(zero_copy_only=False) for n in spec.numeric]).astype(np.float32)
    cat = np.column_stack([table.column(n).cast(pa.string()).fill_null("").to_numpy(zero_copy_only=False)
                           for n in spec.categorical]).astype(object)
    pre = Preprocessor.fit(spec, num, cat)
    torch.manual_seed(seed)
    student = Student(pre.n_inputs, pre.cardinalities, ["click", "online", "cart", "deal"],
                      StudentConfig(hidden=(32, 16)))
    with torch.no_grad():
        student.head2_w.mul_(40.0)
    out = Path(model_dir) / version
    export_bundle(out, pre, student.eval(), metrics={"test": True})
    bundle.publish(out)
    return out


def committed_offsets(settings: Settings, group: str, role: str) -> dict[int, int]:
    """Committed offset per partition of one topic for a group (-1001: none yet)."""
    from confluent_kafka import TopicPartition

    from stream.kafka import make_consumer

    c = make_consumer(settings, group)
    try:
        tps = c.committed([TopicPartition(settings.topic(role), p) for p in range(settings.partitions)], 10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def dedup_impressions(table: pa.Table) -> pa.Table:
    """One row per request_id: a row with a decision wins over one without (a replay after a
    crash can write a request again after its decision was committed), else the first."""
    order = np.lexsort((np.arange(table.num_rows), table["decision"].is_null().to_numpy(zero_copy_only=False)))
    table = table.take(pa.array(order))
    _, first_at = np.unique(table["request_id"].to_numpy(zero_copy_only=False), return_index=True)
    return table.take(pa.array(np.sort(first_at)))


@dataclass
class LiveLog:
    """What the live pipeline left behind (the replay acceptance reads it)."""

    log_dir: Path
    model_dir: Path
    truth_dir: Path
    decisions: dict[str, dict]  # request_id -> the decision event the worker published
    outcomes_published: int
    logger_restarts: int
    killed_mid_stream: bool


def _assigned(log_glob: list[Path]) -> bool:
    return any(b'"event":"assigned"' in p.read_bytes() for p in log_glob)


def live_pipeline(settings: Settings, workdir: Path, n: int = 50_000, rate: float = 2500.0,
                  seed: int = 11, time_scale: float = 600.0, kill_logger: bool = True) -> LiveLog:
    """The issue's pipeline, every stage its own `rta` process on the test's broker, topics and
    Redis: `rta world stream --truth` (n requests) -> `rta serve` -> `rta world outcomes` ->
    `rta log` (`kill -9`ed once it has renamed files, while the stream runs, and restarted,
    when `kill_logger`). Returns once the logger committed every request and outcome and every
    process exited 0 on SIGTERM."""
    import json
    import signal

    from worker_support import decisions, read_topic, spawn_worker, wait_for

    from stream.events import OUTCOME_EVENTS, decode_outcome
    from stream.policy import Targets
    from stream.window import RedisStore

    log_dir, truth_dir = workdir / "log", workdir / "truth"
    model_dir = Path(settings.model_dir)
    world_bundle(model_dir)
    RedisStore.from_url(settings.redis_url, settings.redis_prefix).set_targets(
        Targets(0.3, 0.05, 0.02), "test", "live log")
    rta = [sys.executable, "-c", "from infra.cli import main; main()"]
    logger_args = ("--roll-seconds", "1", "--batch-wait-ms", "20")
    restarts, killed_mid_stream = 0, False
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["worker"] = spawn_worker(settings, workdir, "--group", f"live-worker.{settings.topic('requests')}")
        procs["outcomes"] = subprocess.Popen(
            [*rta, "world", "outcomes", "--truth", str(truth_dir), "--time-scale", str(time_scale),
             "--seed", str(seed), "--group", f"rta-outcomes.{settings.topic('requests')}"], env=worker_env(settings), cwd=workdir, stdout=subprocess.PIPE,
            stderr=open(workdir / "outcomes.log", "wb"), text=True)  # noqa: SIM115 - closed with the process
        procs["logger"] = spawn_logger(settings, log_dir, workdir, *logger_args)
        wait_for(lambda: _assigned(list(workdir.glob("worker-*.log")))
                 and _assigned(list(workdir.glob("logger-*.log"))), 120, "worker and logger assigned", step=0.5)
        procs["stream"] = subprocess.Popen(
            [*rta, "world", "stream", "--count", str(n), "--rate", str(rate), "--seed", str(seed),
             "--truth", str(truth_dir), "--quiet"], env=worker_env(settings), cwd=workdir,
            stdout=subprocess.PIPE, stderr=open(workdir / "stream.log", "wb"), text=True)  # noqa: SIM115
        if kill_logger:
            # kill -9 once some files are renamed (and their offsets committed), mid-stream
            wait_for(lambda: len(list((log_dir / "impressions").rglob("*.parquet"))) >= 2, 120,
                     "the first logger's files", step=0.2)
            killed_mid_stream = procs["stream"].poll() is None
            procs["logger"].send_signal(signal.SIGKILL)
            procs["logger"].wait(30)
            restarts += 1
            procs["logger"] = spawn_logger(settings, log_dir, workdir, *logger_args)
        out, _ = procs["stream"].communicate(timeout=600)
        assert procs["stream"].returncode == 0, (workdir / "stream.log").read_text()[-2000:]
        assert json.loads(out.strip().splitlines()[-1])["delivered"] == n
        got = decisions(settings, n, timeout=300, quiet=0.5)
        by_id = {d["request_id"]: d for d in got}
        # what the simulator must publish: the labels of passed requests, clipped to the funnel
        t = read_truth(truth_dir)
        passed = np.fromiter((by_id[r]["decision"] == "pass" for r in t["request_id"].to_pylist()), bool,
                             t.num_rows)
        lab = {e: t[e].to_numpy() > 0 for e in OUTCOME_EVENTS}
        lab["online"] &= lab["click"]
        lab["cart"] &= lab["online"]
        lab["deal"] &= lab["online"]
        expected = int(sum(np.count_nonzero(passed & lab[e]) for e in OUTCOME_EVENTS))
        outcomes = read_topic(settings, "outcomes", expected, timeout=300, quiet=1.0)
        assert len({(o["request_id"], o["event"]) for o in map(decode_outcome, (m.value() for m in outcomes))}) \
            == expected

        def logged_all() -> bool:
            req = committed_offsets(settings, group_of(settings), "requests")
            res = committed_offsets(settings, group_of(settings), "outcomes")
            return sum(max(o, 0) for o in req.values()) >= n and sum(max(o, 0) for o in res.values()) >= len(outcomes)

        wait_for(logged_all, 180, "the logger committed every request and outcome", step=0.5)
        for name in ("logger", "outcomes", "worker"):
            procs[name].send_signal(signal.SIGTERM)
            procs[name].wait(60)
            assert procs[name].returncode == 0, f"{name} exited {procs[name].returncode}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return LiveLog(log_dir, model_dir, truth_dir, by_id, len(outcomes), restarts, killed_mid_stream)


def read_truth(truth_dir: Path) -> pa.Table:
    """Every truth chunk `rta world stream --truth` wrote (evaluation only)."""
    import pyarrow.parquet as pq

    return pq.read_table(truth_dir)
