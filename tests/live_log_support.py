"""Helpers for the logger tests: a Logger in a thread, `rta log` as a process, reading the log."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
from worker_support import serving, worker_env

from stream.config import Settings
from stream.logger import Logger, LoggerConfig


@contextmanager
def logging_to(settings: Settings, out: Path, **config) -> Iterator[Logger]:
    """A Logger in a thread (stopped, drained and joined on exit)."""
    with serving(Logger(settings, LoggerConfig(out_dir=out, **config)), "logger") as lg:
        yield lg


def spawn_logger(settings: Settings, out: Path, cwd: Path, *args: str) -> subprocess.Popen:
    """`rta log` as a subprocess (its log goes to cwd/logger-<n>.log)."""
    cwd.mkdir(parents=True, exist_ok=True)
    log = open(cwd / f"logger-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-c", "from infra.cli import main; main()", "log", "--out", str(out), "--no-metrics",
         *args], env=worker_env(settings), cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


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
