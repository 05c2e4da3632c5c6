"""Logs on object storage: the logged layout on a real S3 server (SeaweedFS `weed mini` on
loopback, started by tests/conftest.py), read by every reader and written by `rta log --out
s3://...`; checked against the same layout on disk and against an independent reader
(pyarrow.dataset over its own S3FileSystem)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from replay_support import world_and_bundle

from stream.logger.storage import resolve
from training.logs import load_logged, load_logs
from training.offline_log import make_logged_layout
from training.replay import Step

ROWS = 3_000


def _rta(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "RTA_TORCH_THREADS": "1", **(env or {})})


def _independent(s3_server, uri: str, kind: str) -> ds.Dataset:
    """A reader that shares nothing with ours: its own S3FileSystem with explicit keys."""
    fs = pafs.S3FileSystem(access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                           endpoint_override=s3_server.endpoint.split("://")[1], scheme="http",
                           region="us-east-1")
    return ds.dataset(f"{uri.removeprefix('s3://')}/{kind}", filesystem=fs, format="parquet",
                      partitioning="hive")


def _upload(local: Path, uri: str) -> None:
    fs, root = resolve(uri)
    pafs.copy_files(str(local), root, destination_filesystem=fs)


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def local_layout(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3layout")
    world, bundle = world_and_bundle(tmp, ROWS, seed=5)
    make_logged_layout(bundle, world, tmp / "log", Step(0.3, 0.02, 0.05), seed=1)
    return {"log": tmp / "log", "bundle": bundle, "world": tmp / "world-5"}


def test_readers_take_the_same_rows_from_s3_and_never_a_killed_upload(local_layout, s3, s3_server):
    local = local_layout["log"]
    _upload(local, s3)
    fs, root = resolve(s3)
    hour_dir = sorted(p for p in (local / "impressions").glob("date=*/hour=*"))[0].relative_to(local)
    key = f"{root}/{hour_dir}/part-killed-000001.parquet"
    # a writer killed mid-upload: 24 MiB sent as multipart parts, never completed
    before = _bytes_under(s3_server.data_dir)
    code = ("import os\nfrom stream.logger.storage import resolve\n"
            f"fs, _ = resolve({s3!r})\nout = fs.open_output_stream({key!r})\n"
            "for _ in range(6):\n    out.write(os.urandom(4 << 20))\n"
            "out.flush()  # waits for the parts sent so far\nos.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-500:]
    assert _bytes_under(s3_server.data_dir) - before > 8 << 20  # the parts did reach the server
    assert fs.get_file_info(key).type == pafs.FileType.NotFound
    # and names no reader takes: a local writer's temp name, a hidden one
    for junk in (".part-x-000001.parquet.tmp", "_staging.parquet"):
        with fs.open_output_stream(f"{root}/{hour_dir}/{junk}") as out:
            out.write(b"not parquet")

    want, got = load_logged(local), load_logged(s3)
    assert got.source == s3 and len(got) == len(want) == ROWS
    np.testing.assert_array_equal(got.request_id, want.request_id)
    np.testing.assert_array_equal(got.ts_ms, want.ts_ms)
    np.testing.assert_array_equal(got.labels, want.labels)  # NaN (unobserved) in the same places
    np.testing.assert_array_equal(got.num, want.num)
    assert got.decisions.equals(want.decisions)
    assert got.info["counts"] == want.info["counts"]
    # load_logs dispatches a URI the same way; the independent reader counts the same rows
    assert len(load_logs(s3)) == ROWS
    assert _independent(s3_server, s3, "impressions").count_rows() == ROWS


def test_a_world_log_on_s3_trains_from_the_same_rows(local_layout, s3):
    """`rta train --logs s3://...` reads a flat world log (a prefix of Parquet objects)."""
    _upload(local_layout["world"], s3)
    want, got = load_logs(local_layout["world"]), load_logs(s3)
    np.testing.assert_array_equal(got.request_id, want.request_id)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.num, want.num)


def test_replay_and_sql_read_s3_as_they_read_disk(local_layout, s3, tmp_path):
    local = local_layout["log"]
    _upload(local, s3)
    outs = {}
    for name, logs in (("disk", str(local)), ("s3", s3)):
        r = _rta("replay", "--model", str(local_layout["bundle"]), "--logs", logs, "--out", str(tmp_path / name),
                 "--thresholds", "logged", "--no-plots", "--quiet")
        assert r.returncode == 0, r.stderr[-2000:]
        outs[name] = pq.read_table(tmp_path / name / "decisions.parquet")
    assert outs["s3"].num_rows == ROWS and outs["s3"].equals(outs["disk"])
    query = ("SELECT date, hour, count(*) AS n, sum((decision = 'block')::INT) AS blocked FROM impressions "
             "WHERE hour >= 0 GROUP BY ALL ORDER BY ALL")
    texts = {}
    for name, logs in (("disk", str(local)), ("s3", s3)):
        r = _rta("logs", "sql", "--logs", logs, query, "--format", "csv")
        assert r.returncode == 0, r.stderr[-2000:]
        texts[name] = r.stdout
        r = _rta("logs", "sql", "--logs", logs, "SELECT event, count(*) FROM outcomes GROUP BY 1 ORDER BY 1",
                 "--format", "csv")
        assert r.returncode == 0, r.stderr[-2000:]
        texts[name + "-outcomes"] = r.stdout
    assert texts["s3"] == texts["disk"] and texts["s3"].count("\n") > 1
    assert texts["s3-outcomes"] == texts["disk-outcomes"] and texts["s3-outcomes"].count("\n") > 1


def test_wrong_credentials_or_bucket_are_one_line_and_never_print_the_secret(local_layout, s3, s3_server):
    _upload(local_layout["log"], s3)
    secret = "wr0ng" + s3_server.secret_key[5:]
    r = _rta("logs", "sql", "--logs", s3, "SELECT count(*) FROM impressions", env={"AWS_SECRET_ACCESS_KEY": secret})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert s3 in r.stderr and secret not in r.stderr + r.stdout and s3_server.secret_key not in r.stderr
    r = _rta("replay", "--model", str(local_layout["bundle"]), "--logs", s3.replace("s3://", "s3://no-such-"),
             "--out", "unused", "--no-plots")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    r = _rta("logs", "sql", "--logs", "s3://", "SELECT 1")
    assert r.returncode == 2 and "s3://bucket/prefix" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_rta_log_to_s3_commits_only_whole_objects_and_kill_9_loses_nothing(settings, s3, s3_server, tmp_path):
    """`rta log --out s3://...` on the real broker: nothing is committed while the rows sit in
    open files, and a kill -9 then leaves no object; a restart writes every row once more under
    final keys that the production reader and an independent reader both take whole."""
    from live_log_support import (
        committed_offsets,
        group_of,
        logging_to,
        open_files_buffered,
        spawn_logger,
    )
    from test_logger import _decisions, _produce, _requests
    from worker_support import committed, wait_for

    from infra.stack import free_port
    from stream.events import encode_outcome
    from stream.logger.storage import list_files

    n = 2000
    ids, ts, reqs = _requests(n, "s")
    bodies, _ = _decisions(ids, ts)
    _produce(settings, "requests", reqs, ids)
    _produce(settings, "decisions", bodies, ids)
    clicked = ids[:200:4]
    _produce(settings, "outcomes", [encode_outcome(r, "click", int(t) + 2000) for r, t in
                                    zip(clicked, ts[:200:4], strict=True)], clicked)
    port = free_port()
    proc = spawn_logger(settings, s3, tmp_path, "--roll-mb", "1000", "--roll-seconds", "3600",
                        "--batch-wait-ms", "20", metrics_port=port)

    def buffered() -> float:
        return open_files_buffered(port)

    try:
        wait_for(lambda: buffered() == n + len(clicked), 120, "every row joined and buffered", step=0.3)
        assert all(o <= 0 for o in committed(settings, group_of(settings)).values())
        proc.kill()  # SIGKILL: the open files are lost, and so is nothing else
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list_files(s3) == ([], set())  # no object, no partial one
    with logging_to(settings, s3, roll_seconds=0.3, batch_wait_ms=20) as lg:
        wait_for(lambda: sum(committed(settings, group_of(settings)).values()) == n and sum(
            committed_offsets(settings, group_of(settings), "outcomes").values()) == len(clicked), 120,
            "all committed")
    assert lg.stats.impressions == n and lg.stats.outcomes == len(clicked)
    files, _ = list_files(s3)
    assert len({f.path for f in files}) == len(files) >= 2  # impressions and outcomes, unique keys
    assert all(f.name.startswith("part-") and f.suffix == ".parquet" for f in files)
    imp = _independent(s3_server, s3, "impressions").to_table()
    assert sorted(imp["request_id"].to_pylist()) == sorted(ids)
    assert sorted(_independent(s3_server, s3, "outcomes").to_table()["request_id"].to_pylist()) == sorted(clicked)
    logged = load_logged(s3)
    assert len(logged) == n and logged.info["counts"]["outcome_rows_read"] == len(clicked)


@pytest.mark.slow
def test_rta_log_with_a_missing_bucket_stops_in_one_line(settings, s3, tmp_path):
    from live_log_support import spawn_logger

    proc = spawn_logger(settings, s3.replace("s3://", "s3://no-such-"), tmp_path)
    assert proc.wait(60) == 2
    text = next(tmp_path.glob("logger-*.log")).read_text()
    assert "no such bucket" in text and "Traceback" not in text, text


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rta_retrain_trains_and_gates_from_logs_on_s3(s3, tmp_path):
    """The nightly loop with its logs on S3: `rta retrain --logs s3://... --gate-logs s3://...`
    trains on the one, gates on the other, promotes, and records the URI as the lineage."""
    from gate_support import rta, split_world_and_v0

    from infra.stack import free_port
    from model import bundle, registry

    train, holdout, models = split_world_and_v0(tmp_path, 30_000, seed=5)
    fs, root = resolve(s3)
    for name, local in (("train", train), ("holdout", holdout)):
        with fs.open_output_stream(f"{root}/{name}/part-00000.parquet") as out:
            out.write(local.read_bytes())
    res = rta("retrain", "--logs", f"{s3}/train", "--gate-logs", f"{s3}/holdout/part-00000.parquet",
              "--model-dir", str(models), "--since-hours", "24", "--profile", "tiny", "--version", "s1",
              "--reason", "nightly", "--ratio", "0.5", "--pass-share", "0.02",
              "--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--no-audit-topic", "--quiet",
              "--threads", "1", "--fidelity", "no-regression", timeout=540)
    assert res.returncode == 0, res.stderr[-2000:]
    assert bundle.current_version(models) == "s1"
    assert registry.lineage(models / "s1")["logs"] == f"{s3}/train"


SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzz9SeCr3t"


def _one_line(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_uris_with_credentials_or_empty_components_are_one_line_and_never_echo_the_secret(tmp_path):
    """Refused before any request (no S3 server needed): pyarrow's own `s3://KEY:SECRET@bucket`
    form, and paths pyarrow refuses (ArrowInvalid, no OSError) at the logger's first roll."""
    from stream.errors import ConfigError
    from stream.logger.storage import s3_endpoint

    creds = f"s3://AKIAEXAMPLE:{SECRET}@rta/p"
    for args in (("logs", "sql", "--logs", creds, "SELECT 1"),
                 ("train", "--logs", creds, "--out", str(tmp_path / "m")),
                 ("log", "--out", creds, "--no-metrics"),
                 ("replay", "--model", str(tmp_path), "--logs", creds, "--out", str(tmp_path / "r"))):
        r = _rta(*args)
        _one_line(r)
        assert "credentials do not belong in the URI" in r.stderr, r.stderr
        assert SECRET not in r.stdout + r.stderr and "AKIAEXAMPLE" not in r.stdout + r.stderr, args
    for bad in ("s3://rta/a//b", "s3://rta/a/../b", "s3://rta/./b"):
        r = _rta("logs", "sql", "--logs", bad, "SELECT 1")
        _one_line(r)
        assert "path component" in r.stderr, r.stderr
    with pytest.raises(ConfigError, match="credentials"):
        resolve(f"s3://{SECRET}@rta/p")
    os.environ["RTA_S3_ENDPOINT_SAVED"] = os.environ.get("RTA_S3_ENDPOINT", "")
    try:
        os.environ["RTA_S3_ENDPOINT"] = f"http://user:{SECRET}@127.0.0.1:9"
        with pytest.raises(ConfigError) as err:
            s3_endpoint()
        assert SECRET not in str(err.value)
    finally:
        os.environ["RTA_S3_ENDPOINT"] = os.environ.pop("RTA_S3_ENDPOINT_SAVED")
        if not os.environ["RTA_S3_ENDPOINT"]:
            del os.environ["RTA_S3_ENDPOINT"]


def test_retrain_names_a_storage_error_not_missing_rows(local_layout, s3, s3_server, tmp_path):
    """`newest_logged_ts_ms` (retrain's first S3 read) lets credentials, endpoint and bucket
    errors through as one line; only a missing prefix or non-Parquet files mean "no rows"."""
    from stream.errors import DataError
    from training.logs import newest_logged_ts_ms

    _upload(local_layout["log"], s3)
    assert newest_logged_ts_ms(s3) is not None
    assert newest_logged_ts_ms(f"{s3}-nothing-here") is None
    with pytest.raises(DataError, match="no such bucket"):
        newest_logged_ts_ms(s3.replace("s3://", "s3://no-such-"))
    models = tmp_path / "models"
    shutil.copytree(local_layout["bundle"], models / "v1")
    (models / "current").symlink_to("v1")
    wrong = "wr0ng" + s3_server.secret_key[5:]
    r = _rta("retrain", "--logs", s3, "--model-dir", str(models), "--since-hours", "24", "--reason", "test",
             env={"AWS_SECRET_ACCESS_KEY": wrong})
    _one_line(r)
    assert "ACCESS_DENIED" in r.stderr and "no logged rows" not in r.stderr, r.stderr
    assert wrong not in r.stdout + r.stderr
    r = _rta("retrain", "--logs", s3, "--model-dir", str(models), "--since-hours", "24", "--reason", "test",
             env={"RTA_S3_ENDPOINT": "http://127.0.0.1:9"})
    _one_line(r)
    assert "NETWORK_CONNECTION" in r.stderr and "no logged rows" not in r.stderr, r.stderr


def _shut(*socks) -> None:
    import contextlib

    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(2)


class _FlakyLink:
    """A TCP link to the S3 server that can be cut: while cut it accepts and at once closes
    every connection (what a load balancer's blip or a reset looks like to the client)."""

    def __init__(self, upstream: str) -> None:
        import socket
        import threading

        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.cut_until = 0.0
        self.refused = 0
        self.live: list = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._threading = threading
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import time

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if time.monotonic() < self.cut_until:
                self.refused += 1
                conn.close()
                continue
            up = socket.create_connection(self.upstream)
            self.live += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                self._threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(src, dst)

    def cut(self, seconds: float) -> None:
        """Refuse new connections for `seconds` and reset the open ones (the client keeps its
        connections alive, so a cut must break those too)."""
        import time

        self.cut_until = time.monotonic() + seconds
        live, self.live = self.live, []
        _shut(*live)

    def close(self) -> None:
        self.sock.close()


def test_an_s3_blip_is_retried_with_the_rows_held_and_a_long_outage_fails_holding_them(s3, s3_server,
                                                                                      monkeypatch):
    """The logger's sink through a link cut for 2 s: the roll waits it out (same key, no
    duplicate) instead of stopping the logger; cut for good: the roll fails, the rows still
    hold their offsets and no object exists."""
    import pyarrow as pa

    from stream.logger import files
    from stream.logger.files import HOUR_MS, _Sink, open_root
    from stream.logger.storage import list_files

    link = _FlakyLink(s3_server.endpoint.split("://", 1)[1])
    try:
        monkeypatch.setenv("RTA_S3_ENDPOINT", f"http://127.0.0.1:{link.port}")
        fs, root, _ = open_root(s3)
        sink = _Sink(root, "impressions", "blip", lambda t: t, fs)
        hour = 493_000
        ids = [f"r{i}" for i in range(500)]
        sink.add(pa.table({"request_id": ids, "ts_ms": np.full(500, hour * HOUR_MS + 5, np.int64)}), {("req", 0): 7})
        link.cut(2.0)
        path, rows, _ = sink.roll(hour)
        assert link.refused > 0 and rows == 500 and sink.holds() == {} and not sink.files
        found, _ = list_files(s3)
        assert [str(f) for f in found] == [path]  # one object: the retries reused its key
        assert _independent(s3_server, s3, "impressions").to_table().column("request_id").to_pylist() == ids

        monkeypatch.setattr(files, "UPLOAD_BACKOFF_S", (0.2, 0.2))
        sink.add(pa.table({"request_id": ["x"], "ts_ms": np.full(1, hour * HOUR_MS, np.int64)}), {("req", 0): 9})
        link.cut(3600.0)
        with pytest.raises(OSError):
            sink.roll(hour)
        assert sink.holds() == {("req", 0): 9} and sink.files[hour].rows == 1
        link.cut(0.0)
        assert len(list_files(s3)[0]) == 1
    finally:
        link.close()
