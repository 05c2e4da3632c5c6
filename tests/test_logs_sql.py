"""`rta logs sql`: DuckDB over the logged layout, checked against independent readers (pyarrow
datasets) and against the production reader (training.logs.load_logged) for the labelled view."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from replay_support import world_and_bundle

from training.logs import Attribution, load_logged
from training.logs_sql import run_sql
from training.offline_log import make_logged_layout
from training.replay import Step

ROWS = 5_000


def _rta(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RTA_TORCH_THREADS": "1"})


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """A logged layout (r=0.3, p_u=0.02, 5 % explore) with one impression file duplicated, as
    a logger crash between rename and commit leaves it."""
    tmp = tmp_path_factory.mktemp("sql")
    world, bundle = world_and_bundle(tmp, ROWS, seed=3)
    info = make_logged_layout(bundle, world, tmp / "log", Step(0.3, 0.02, 0.05), seed=1)
    first = sorted((tmp / "log" / "impressions").rglob("*.parquet"))[0]
    shutil.copy(first, first.with_name("replayed-" + first.name))
    return {"log": tmp / "log", "info": info, "dup_rows": pq.read_metadata(first).num_rows}


def test_views_agree_with_independent_readers(layout, tmp_path):
    log = layout["log"]
    imp = ds.dataset(log / "impressions", format="parquet", partitioning="hive").to_table()
    out = ds.dataset(log / "outcomes", format="parquet", partitioning="hive").to_table()
    assert imp.num_rows == ROWS + layout["dup_rows"]
    # CSV on stdout: every impression row as logged (duplicates included), its block share
    got = run_sql(log, "SELECT count(*) AS n, count(DISTINCT request_id) AS ids, "
                       "avg((decision = 'block')::INT) AS share FROM impressions", "csv")
    row = next(csv.DictReader(io.StringIO(got)))
    share = pc.mean(pc.cast(pc.equal(imp["decision"], "block"), "int64")).as_py()
    assert int(row["n"]) == imp.num_rows and int(row["ids"]) == ROWS
    assert float(row["share"]) == pytest.approx(share, abs=1e-12)
    # Parquet out: outcomes per event, read back by pyarrow
    dest = tmp_path / "o" / "events.parquet"
    assert run_sql(log, "SELECT event, count(*) AS n FROM outcomes GROUP BY event", "parquet", dest) is None
    t = pq.read_table(dest)
    want = {e: n for e, n in zip(*[c.to_pylist() for c in out.group_by("event").aggregate(
        [("event", "count")]).columns], strict=True)}
    assert dict(zip(t["event"].to_pylist(), t["n"].to_pylist(), strict=True)) == want
    # partition columns prune: one hour's rows
    hour = imp["hour"][0].as_py()
    n_hour = run_sql(log, f"SELECT count(*) FROM impressions WHERE hour = {hour}", "csv")
    assert int(n_hour.splitlines()[1]) == pc.sum(pc.equal(imp["hour"], hour)).as_py()


def test_labelled_view_is_the_production_readers_rows(layout):
    att = Attribution({"click": 300.0, "online": 300.0, "cart": 300.0, "deal": 900.0})
    logs = load_logged(layout["log"], attribution=att)
    got = run_sql(layout["log"], "SELECT count(*) AS n, " + ", ".join(
        f"count(label_{t}) AS lab_{t}, sum(label_{t}) AS pos_{t}" for t in logs.tasks) + " FROM labelled",
        "csv", attribution=att)
    row = next(csv.DictReader(io.StringIO(got)))
    assert int(row["n"]) == len(logs) == ROWS  # deduplicated: the duplicated file counts once
    for t in logs.tasks:
        assert int(row[f"lab_{t}"]) == logs.info["labelled"][t]
        assert int(row[f"pos_{t}"] or 0) == logs.info["positives"][t]
    # blocked rows are never labelled (their outcomes could not be seen)
    bad = run_sql(layout["log"], "SELECT count(*) FROM labelled WHERE decision = 'block' AND "
                                 "label_click IS NOT NULL", "csv", attribution=att)
    assert int(bad.splitlines()[1]) == 0


def test_cli_table_and_one_line_errors(layout, tmp_path):
    res = _rta("logs", "sql", "--logs", str(layout["log"]),
               "SELECT reason, count(*) AS n FROM impressions GROUP BY reason ORDER BY n DESC", "--max-rows", "2")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["reason", "n"] and lines[2].split()[0] == "score"
    assert "(2 rows)" in res.stdout and "more rows" in res.stdout
    cases = [
        (["SELEC 1"], "syntax error"),
        (["SELECT nope FROM impressions"], "nope"),
        (["SELECT 1", "--format", "parquet"], "needs --out"),
        (["SELECT 1", "--logs", str(tmp_path)], "not a logged layout"),
    ]
    for extra, needle in cases:
        args = ["logs", "sql", "--logs", str(layout["log"]), *extra]
        res = _rta(*args)
        assert res.returncode == 2, (extra, res.stderr)
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("rta: ") and needle in res.stderr, res.stderr
